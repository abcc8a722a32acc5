"""Prometheus metrics of a running daemon, served over HTTP (`tempfs mount --metrics-addr HOST:PORT`).

Thread safety: prometheus_client answers each scrape in a thread of its own, but everything the
metrics are read from belongs to the trio thread: the store's SQLite connection is used on that
thread only, and the monitor's counters, the space accounting and the block cache are unlocked
structures that the FUSE handlers change. So the collector never reads them itself. At each
scrape it hands `take_snapshot` to the trio loop through the loop's TrioToken
(`run_sync_soon`) and waits for the result: the snapshot is built on the trio thread, between two
steps of the FUSE handlers (so its numbers are consistent with each other), as a plain dict of
numbers that the HTTP thread then renders. This costs nothing while nobody scrapes (a
scrape-independent refresh every second would run the usage query for nobody) and is never older
than the scrape. When the loop does not answer within SNAPSHOT_TIMEOUT (a long operation on the
trio thread), the scrape gets the previous snapshot and `tempfs_metrics_snapshot_age_seconds`
says how old it is; the HTTP thread never waits longer, and the trio loop never waits at all.

The HTTP socket is bound before the filesystem is mounted (a port in use fails the mount before
anything changes); scrapes answer with no tempfs metrics until the daemon's loop is attached.
"""
from __future__ import annotations

import ipaddress
import logging
import math
import socket
import threading
import time
from typing import Any, Iterator, Optional

import trio
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

log = logging.getLogger(__name__)

SNAPSHOT_TIMEOUT = 5.0      # seconds a scrape waits for the trio loop before serving the last snapshot
COMPLAIN_INTERVAL = 60.0


class AddressError(ValueError):
    """A --metrics-addr value that cannot be listened on as given."""


def parse_address(text: str) -> tuple[str, int]:
    """HOST:PORT or [IPV6]:PORT -> (host, port). HOST is an IP address or a name that resolves;
    PORT is 1..65535."""
    text = text.strip()
    if text.startswith("["):
        host, sep, port_text = text[1:].partition("]:")
        if not sep:
            raise AddressError(f"{text!r} is not HOST:PORT (an IPv6 address goes in brackets: [::1]:9100)")
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or not host:
            raise AddressError(f"{text!r} is not HOST:PORT (e.g. 127.0.0.1:9100, or 0.0.0.0:9100 for every interface)")
        if ":" in host:
            raise AddressError(f"{text!r}: an IPv6 address goes in brackets, e.g. [::1]:9100")
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise AddressError(f"{text!r}: the port must be a number from 1 to 65535")
    port = int(port_text)
    try:
        ipaddress.ip_address(host)
    except ValueError:
        try:
            socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except socket.gaierror as e:
            raise AddressError(f"{text!r}: the host {host!r} does not resolve ({e.strerror})") from None
    return host, port


# ---- the snapshot (built on the trio thread) -----------------------------------------------
def take_snapshot(ops: Any) -> dict:
    """Every number the metrics show, read from the running TempFS `ops`. Must run on the trio
    thread: it queries the store's SQLite connection and reads unlocked counters."""
    monitor, space, store = ops.monitor, ops.space, ops.store
    blocks = store.blocks
    usage = store.usage()
    area_names = sorted(set(usage["areas"]) | set(getattr(space, "rules", {})))
    areas = {}
    for area in area_names:
        info = usage["areas"].get(area, {})
        areas[area] = {"files": info.get("files", 0), "logical_bytes": info.get("logical_bytes", 0),
                       "stored_bytes": info.get("stored_bytes", 0), "limit_bytes": space.limit(area),
                       "evicted": monitor.totals[f"evicted:{area}"]}
    return {
        "taken": time.monotonic(),
        "areas": areas,
        "totals": {key: int(n) for key, n in monitor.totals.items() if ":" not in key},
        "latency": {op: (h.cumulative(), h.sum) for op, h in list(monitor.latency.items()) if h.count},
        "cache_hits": getattr(blocks, "hits", 0),
        "cache_misses": getattr(blocks, "misses", 0),
        "page_cache_filled_bytes": ops.page_cache.stored_bytes,
        "patches_stored": blocks.patches_stored,
        "dirty_bytes": blocks.dirty_bytes,
        "reclaiming_files": len(ops.store.reclaiming),
        "alerts_active": len(monitor.active_alerts),
        "disk_free_bytes": max(0, space.free_bytes()),
    }


# ---- the collector (runs in the HTTP threads) ----------------------------------------------
class TempFSCollector(Collector):
    """Renders a snapshot taken on the trio thread; see the module doc."""

    def __init__(self, timeout: float = SNAPSHOT_TIMEOUT) -> None:
        self.timeout = timeout
        self._lock = threading.Lock()
        self._ops: Any = None
        self._token: Optional[trio.lowlevel.TrioToken] = None
        self._last: Optional[dict] = None
        self._complained = -math.inf

    def attach(self, ops: Any, token: trio.lowlevel.TrioToken) -> None:
        with self._lock:
            self._ops, self._token = ops, token

    def detach(self) -> None:
        with self._lock:
            self._ops = self._token = None

    def snapshot(self) -> Optional[dict]:
        """A fresh snapshot from the trio loop, or the last one if the loop does not answer in time
        (None before the first)."""
        with self._lock:
            ops, token = self._ops, self._token
        if ops is None:
            return self._last
        done = threading.Event()
        box: dict[str, Any] = {}

        def build() -> None:  # on the trio thread; must never raise (it would crash the loop)
            try:
                box["snapshot"] = take_snapshot(ops)
            except BaseException as e:  # noqa: BLE001
                box["error"] = e
            done.set()

        try:
            token.run_sync_soon(build)
        except trio.RunFinishedError:
            return self._last
        if not done.wait(self.timeout):
            self._complain(f"the daemon did not answer within {self.timeout:.0f} s; serving the last snapshot")
            return self._last
        if "error" in box:
            self._complain(f"cannot take a snapshot: {box['error']!r}; serving the last one")
            return self._last
        with self._lock:
            self._last = box["snapshot"]
        return box["snapshot"]

    def _complain(self, message: str) -> None:
        now = time.monotonic()
        if now - self._complained >= COMPLAIN_INTERVAL:
            self._complained = now
            log.warning("metrics: %s", message)

    def collect(self) -> Iterator[Metric]:
        snap = self.snapshot()
        if snap is None:
            return
        yield from render(snap)


def render(snap: dict) -> Iterator[Metric]:
    """The metric families of one snapshot."""
    areas, totals = snap["areas"], snap["totals"]

    def per_area(name: str, doc: str, key: str) -> GaugeMetricFamily:
        family = GaugeMetricFamily(name, doc, labels=["area"])
        for area, info in sorted(areas.items()):
            if info.get(key) is not None:
                family.add_metric([area], info[key])
        return family

    yield per_area("tempfs_area_logical_bytes", "Bytes the area's files hold as programs see them.", "logical_bytes")
    yield per_area("tempfs_area_stored_bytes", "Bytes the area takes on disk after compression and "
                   "deduplication (an object shared with another area counts in both).", "stored_bytes")
    yield per_area("tempfs_area_limit_bytes", "The area's max_size (areas without a limit are absent).", "limit_bytes")
    yield per_area("tempfs_area_files", "Files (non-folders) in the area.", "files")

    def counter(name: str, doc: str, key: str) -> CounterMetricFamily:
        return CounterMetricFamily(name, doc, value=totals.get(key, 0))

    yield counter("tempfs_expired", "Entries removed at their deadline since the mount.", "expired")
    evicted = CounterMetricFamily("tempfs_evicted", "Files evicted to make room, per area, since the mount.",
                                  labels=["area"])
    for area, info in sorted(areas.items()):
        evicted.add_metric([area], info.get("evicted", 0))
    yield evicted
    refused = CounterMetricFamily("tempfs_refused", "Refused operations since the mount: layout (EPERM by the "
                                  "tree's rules or read-only attributes), full (ENOSPC by a size limit or the "
                                  "disk floor).", labels=["reason"])
    refused.add_metric(["layout"], totals.get("refused", 0))
    refused.add_metric(["full"], totals.get("refused_full", 0))
    yield refused
    cleanup = CounterMetricFamily("tempfs_cleanup_runs", "Expiry passes of the reaper since the mount.",
                                  labels=["result"])
    cleanup.add_metric(["ok"], totals.get("cleanup_runs", 0))
    cleanup.add_metric(["failed"], totals.get("cleanup_failures", 0))
    yield cleanup
    checks = CounterMetricFamily("tempfs_check_runs", "Whole-store checks run by the daemon since the mount.",
                                 labels=["result"])
    checks.add_metric(["ok"], totals.get("check_runs", 0))
    checks.add_metric(["failed"], totals.get("check_failures", 0))
    yield checks
    yield counter("tempfs_integrity_errors", "Block reads that failed authentication (answered EIO).",
                  "integrity_errors")
    yield counter("tempfs_read_bytes", "Bytes read by programs through the mount.", "bytes_read")
    yield counter("tempfs_written_bytes", "Bytes written by programs through the mount.", "bytes_written")
    yield counter("tempfs_creates", "Entries created (files, folders, links, nodes).", "creates")
    yield counter("tempfs_deletes", "Entries removed by programs (unlink, rmdir).", "deletes")
    yield CounterMetricFamily("tempfs_cache_hits", "Block reads answered from the in-memory cache.",
                              value=snap["cache_hits"])
    yield CounterMetricFamily("tempfs_cache_misses", "Block reads that had to read and decrypt a stored object.",
                              value=snap["cache_misses"])
    yield CounterMetricFamily("tempfs_page_cache_filled_bytes", "Bytes of blocks loaded for a small read that the "
                              "kernel was given beside it, so that the next reads stay in its page cache.",
                              value=snap["page_cache_filled_bytes"])
    yield CounterMetricFamily("tempfs_patches_stored", "Changes to part of a stored block stored as a patch over "
                              "it, instead of loading and storing the whole block.", value=snap["patches_stored"])

    waits = CounterMetricFamily("tempfs_request_waits", "Waits for the next FUSE request, by how they ended: "
                                "ready (one was waiting), spun (it came while the daemon looked for it), slept.",
                                labels=["how"])
    for how in ("ready", "spun", "slept"):
        waits.add_metric([how], totals.get(f"waits_{how}", 0))
    yield waits
    yield CounterMetricFamily("tempfs_request_spin_seconds", "CPU time spent looking for the next request instead "
                              "of sleeping ([requests] spin).", value=totals.get("spin_ns", 0) / 1e9)

    histogram = HistogramMetricFamily("tempfs_operation_seconds", "Time to answer a FUSE request, per operation.",
                                      labels=["op"])
    for op, (cumulative, total) in sorted(snap["latency"].items()):
        histogram.add_metric([op], [(floatToGoString(bound), count) for bound, count in cumulative], total)
    yield histogram

    yield GaugeMetricFamily("tempfs_dirty_bytes", "Written data held in memory, not yet stored.",
                            value=snap["dirty_bytes"])
    yield GaugeMetricFamily("tempfs_reclaiming_files", "Deleted files whose stored content waits for the reclaimer "
                            "(it still counts in their area).", value=snap["reclaiming_files"])
    yield GaugeMetricFamily("tempfs_alerts_active", "Alerts raised and not yet cleared.", value=snap["alerts_active"])
    yield GaugeMetricFamily("tempfs_disk_free_bytes", "Free bytes on the disk under the store.",
                            value=snap["disk_free_bytes"])
    yield GaugeMetricFamily("tempfs_metrics_snapshot_age_seconds", "How old these numbers are (above 0 only when "
                            "the daemon was too busy to answer the scrape).",
                            value=round(max(0.0, time.monotonic() - snap["taken"]), 3))


# ---- the server ----------------------------------------------------------------------------
class MetricsServer:
    """The HTTP endpoint (/metrics) with its own registry holding only tempfs's collector."""

    def __init__(self, host: str, port: int) -> None:
        """Binds and starts serving at once; raises OSError (e.g. EADDRINUSE) when it cannot."""
        self.host, self.port = host, port
        self.collector = TempFSCollector()
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self.collector)
        started = start_http_server(port, host, registry=self.registry)
        # prometheus_client >= 0.20 returns (server, thread); older ones return None
        self._httpd = started[0] if isinstance(started, tuple) else None

    async def run(self, ops: Any, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """A nursery task of the daemon: attaches the collector to this trio loop for as long as the
        daemon serves, then stops the HTTP server."""
        self.collector.attach(ops, trio.lowlevel.current_trio_token())
        log.info("metrics at http://%s/metrics", _hostport(self.host, self.port))
        task_status.started()
        try:
            await trio.sleep_forever()
        finally:
            self.collector.detach()
            self.close()

    def close(self) -> None:
        if self._httpd is not None:
            httpd, self._httpd = self._httpd, None
            httpd.shutdown()
            httpd.server_close()


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
