"""Prometheus metrics: `tempfs mount --metrics-addr HOST:PORT` serves /metrics with real numbers,
read on the daemon's trio thread (never from the HTTP thread), and a bad address is refused
before anything is mounted."""
from __future__ import annotations

import os
import socket
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from types import SimpleNamespace

import pytest
import trio
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from conftest import run_tempfs, wait_until
from tempfs.metrics import AddressError, TempFSCollector, parse_address, render, take_snapshot
from tempfs.monitor import Latency

KiB = 1024
BLOCK = 128 * KiB
UPLOADS = "processing/common/uploads"


# ------------------------------------------------------------------ helpers

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(port: int) -> dict[tuple, float]:
    """{(sample name, sorted label items): value} of one scrape, parsed by prometheus_client."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        assert r.status == 200
        text = r.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def scrape_ready(port: int, timeout: float = 10.0) -> dict[tuple, float]:
    """A scrape once the daemon's loop answers them (the endpoint listens from before the mount
    goes live, and shows no tempfs metrics until the daemon's loop runs)."""
    deadline = time.monotonic() + timeout
    while True:
        samples = scrape(port)
        if any(name == "tempfs_area_files" for name, _ in samples) or time.monotonic() > deadline:
            return samples
        time.sleep(0.05)


def value(samples: dict, name: str, **labels) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def write_synced(path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


# ------------------------------------------------------------------ a real mount

def test_metrics_report_real_values(make_mount):
    port = free_port()
    m = make_mount(extra=("--metrics-addr", f"127.0.0.1:{port}"))
    random_data = os.urandom(700 * KiB)
    text_data = b"frame 0001 ok\n" * 80_000      # ~1.1 MB, compresses well
    write_synced(m.path("cache/images/a.bin"), random_data)
    write_synced(m.path(UPLOADS, "b.txt"), text_data)
    write_synced(m.path("cache/models/c.bin"), random_data)   # deduplicated with a.bin
    assert m.path("cache/images/a.bin").read_bytes() == random_data
    assert m.path(UPLOADS, "b.txt").read_bytes() == text_data
    with pytest.raises(PermissionError):
        open(m.path("at_the_root.log"), "w")
    with open(m.path("cache/images/a.bin"), "rb") as f:  # a small read: the kernel gets the rest of its block
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_RANDOM)
        assert os.pread(f.fileno(), 4 * KiB, 8 * KiB) == random_data[8 * KiB:12 * KiB]
    wait_until(lambda: value(scrape_ready(port), "tempfs_page_cache_filled_bytes_total") >= BLOCK - 4 * KiB)

    status = m.status()
    samples = scrape_ready(port)
    for area, info in status["areas"].items():
        assert abs(value(samples, "tempfs_area_stored_bytes", area=area) - info["stored_bytes"]) <= BLOCK, area
        assert value(samples, "tempfs_area_logical_bytes", area=area) == info["logical_bytes"], area
        assert value(samples, "tempfs_area_files", area=area) == info["files"], area
        assert value(samples, "tempfs_area_limit_bytes", area=area) == info["limit_bytes"], area
        assert value(samples, "tempfs_evicted_total", area=area) == 0
    assert value(samples, "tempfs_area_files", area="cache") == 2
    assert value(samples, "tempfs_area_logical_bytes", area="cache") == 2 * len(random_data)
    # dedup: the cache stores its two identical files once, and compression shrinks the text
    assert value(samples, "tempfs_area_stored_bytes", area="cache") < 1.2 * len(random_data)
    assert 0 < value(samples, "tempfs_area_stored_bytes", area="processing") < len(text_data) / 4

    written = 2 * len(random_data) + len(text_data)
    assert value(samples, "tempfs_written_bytes_total") >= written
    assert value(samples, "tempfs_read_bytes_total") > 0
    assert value(samples, "tempfs_refused_total", reason="layout") >= 1
    assert value(samples, "tempfs_refused_total", reason="full") == 0
    assert value(samples, "tempfs_integrity_errors_total") == 0
    assert value(samples, "tempfs_creates_total") >= 3
    assert value(samples, "tempfs_cleanup_runs_total", result="failed") == 0
    assert value(samples, "tempfs_cache_hits_total") + value(samples, "tempfs_cache_misses_total") >= 0
    assert value(samples, "tempfs_dirty_bytes") >= 0
    assert value(samples, "tempfs_alerts_active") == 0
    assert value(samples, "tempfs_disk_free_bytes") > 0
    assert value(samples, "tempfs_metrics_snapshot_age_seconds") < 1

    # the latency histogram: write and create were observed; buckets are cumulative up to +Inf
    for op in ("write", "create", "lookup"):
        count = value(samples, "tempfs_operation_seconds_count", op=op)
        assert count > 0, op
        assert value(samples, "tempfs_operation_seconds_bucket", op=op, le="+Inf") == count
        assert value(samples, "tempfs_operation_seconds_sum", op=op) > 0
        buckets = sorted((float(dict(labels)["le"]), v) for (name, labels), v in samples.items()
                         if name == "tempfs_operation_seconds_bucket" and dict(labels)["op"] == op)
        assert [v for _, v in buckets] == sorted(v for _, v in buckets), op

    # the counters move with what happens, scrape after scrape
    os.unlink(m.path(UPLOADS, "b.txt"))
    after = wait_until(lambda: (s := scrape(port)) and value(s, "tempfs_deletes_total") >= 1 and s, timeout=5)
    assert after, "the deletion never showed"
    assert value(after, "tempfs_cleanup_runs_total", result="ok") >= value(samples, "tempfs_cleanup_runs_total",
                                                                          result="ok")

    # a small write into a file the daemon has not read back is stored as a patch
    assert value(after, "tempfs_patches_stored_total") == 0
    patched, content = m.path("cache/images/p.bin"), os.urandom(300 * KiB)  # content no other file has
    write_synced(patched, content)
    with open(patched, "r+b") as f:
        f.seek(1000)
        f.write(b"patch")
        f.flush()
        os.fsync(f.fileno())
    assert wait_until(lambda: value(scrape(port), "tempfs_patches_stored_total") == 1, timeout=5)
    assert m.status()["daemon"]["patches_stored"] == 1
    assert patched.read_bytes() == content[:1000] + b"patch" + content[1005:]


def test_refused_full_and_eviction_are_counted(make_mount):
    port = free_port()
    m = make_mount('[policy.sessions]\nmax_size = "1MB"\n[policy.cleanup]\nmax_size = "1MB"\n',
                   extra=("--metrics-addr", f"127.0.0.1:{port}"))
    with pytest.raises(OSError):
        write_synced(m.path("sessions/user_sessions/big"), os.urandom(2 * 1024 * KiB))
    for i in range(3):  # cleanup/ evicts: the third file pushes the first out
        write_synced(m.path(f"cleanup/manual/f{i}"), os.urandom(450 * KiB))
    samples = scrape_ready(port)
    assert value(samples, "tempfs_refused_total", reason="full") >= 1
    assert value(samples, "tempfs_evicted_total", area="cleanup") >= 1
    assert value(samples, "tempfs_area_stored_bytes", area="cleanup") <= 1024 * KiB


def test_background_mount_passes_the_address_and_unmount_closes_it(make_mount):
    port = free_port()
    m = make_mount(start=False)
    r = run_tempfs(*m.mount_args("--metrics-addr", f"127.0.0.1:{port}", "--log-file", m.base / "bg.log"),
                   cwd=m.base)
    assert r.returncode == 0, r.stderr + r.stdout
    assert f"http://127.0.0.1:{port}/metrics" in r.stdout
    (m.path("cache/data/x")).write_bytes(b"x" * 5000)
    samples = wait_until(lambda: (s := scrape_ready(port)) and value(s, "tempfs_area_files", area="cache") == 1 and s)
    assert samples
    r = run_tempfs("umount", m.mnt, cwd=m.base)
    assert r.returncode == 0, r.stderr
    with pytest.raises((urllib.error.URLError, ConnectionError)):
        scrape(port)


@pytest.mark.parametrize("address", ["nonsense", "127.0.0.1", "127.0.0.1:", ":9100", "127.0.0.1:0",
                                     "127.0.0.1:70000", "127.0.0.1:http", "::1:9100", "[::1]9100",
                                     "no-such-host.invalid:9100"])
def test_bad_metrics_address_is_a_usage_error(make_mount, address):
    m = make_mount(start=False)
    for foreground in (False, True):
        rc, out, err = m.mount_expect_failure("--metrics-addr", address, foreground=foreground)
        lines = [line for line in err.splitlines() if line.strip()]
        assert rc == 2, (address, rc, err)
        assert len(lines) == 1 and "--metrics-addr" in lines[0], err
    assert not (m.store / "meta.sqlite").exists()


def test_port_in_use_fails_the_mount_cleanly(make_mount):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        m = make_mount(start=False)
        for foreground in (False, True):
            rc, out, err = m.mount_expect_failure("--metrics-addr", f"127.0.0.1:{port}", foreground=foreground)
            assert rc == 2, err
            line = [line for line in err.splitlines() if line.strip()][-1]
            assert f"127.0.0.1:{port}" in line and "cannot listen" in line, line
        assert not (m.store / "meta.sqlite").exists(), "the store was touched"
    # the same address works once it is free
    m.start("--metrics-addr", f"127.0.0.1:{port}")
    assert value(scrape_ready(port), "tempfs_area_files", area="cache") == 0


# ------------------------------------------------------------------ pieces, without a mount

def test_parse_address():
    assert parse_address("127.0.0.1:9100") == ("127.0.0.1", 9100)
    assert parse_address("0.0.0.0:1") == ("0.0.0.0", 1)
    assert parse_address("[::1]:9100") == ("::1", 9100)
    assert parse_address("localhost:65535") == ("localhost", 65535)
    for bad in ("9100", "host", "127.0.0.1:65536", "127.0.0.1:-1", "::1:80", "[::1]", ":80"):
        with pytest.raises(AddressError):
            parse_address(bad)


def fake_ops(hits=3):
    latency = {"write": Latency(), "read": Latency()}
    latency["write"].observe(0.002)
    latency["write"].observe(0.3)
    return SimpleNamespace(
        page_cache=SimpleNamespace(stored_bytes=8192),
        monitor=SimpleNamespace(totals=Counter(expired=4, refused=2, refused_full=1, cleanup_runs=9,
                                               cleanup_failures=1, bytes_written=10, **{"evicted:cache": 1}),
                                latency=latency, active_alerts={"x": {}}),
        space=SimpleNamespace(rules={"cache": None, "sessions": None}, evicted=Counter(cache=1),
                              limit=lambda area: 1000 if area == "cache" else None, free_bytes=lambda: 5000),
        store=SimpleNamespace(blocks=SimpleNamespace(hits=hits, misses=1, dirty_bytes=7, patches_stored=6),
                              reclaiming=[5, 6, 9],
                              usage=lambda: {"areas": {"cache": {"files": 2, "logical_bytes": 30, "stored_bytes": 20},
                                                       "sessions": {"files": 0, "logical_bytes": 0,
                                                                    "stored_bytes": 0}},
                                             "total": {}}))


def rendered(snapshot) -> dict:
    registry = CollectorRegistry(auto_describe=False)

    class Fixed:
        def collect(self):
            return render(snapshot)
    registry.register(Fixed())
    text = generate_latest(registry).decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_render_of_a_snapshot():
    samples = rendered(take_snapshot(fake_ops()))
    assert value(samples, "tempfs_area_stored_bytes", area="cache") == 20
    assert value(samples, "tempfs_area_limit_bytes", area="cache") == 1000
    assert ("tempfs_area_limit_bytes", (("area", "sessions"),)) not in samples  # no limit: absent
    assert value(samples, "tempfs_expired_total") == 4
    assert value(samples, "tempfs_evicted_total", area="cache") == 1
    assert value(samples, "tempfs_refused_total", reason="layout") == 2
    assert value(samples, "tempfs_refused_total", reason="full") == 1
    assert value(samples, "tempfs_cleanup_runs_total", result="ok") == 9
    assert value(samples, "tempfs_cleanup_runs_total", result="failed") == 1
    assert value(samples, "tempfs_written_bytes_total") == 10
    assert value(samples, "tempfs_read_bytes_total") == 0
    assert value(samples, "tempfs_cache_hits_total") == 3
    assert value(samples, "tempfs_cache_misses_total") == 1
    assert value(samples, "tempfs_page_cache_filled_bytes_total") == 8192
    assert value(samples, "tempfs_patches_stored_total") == 6
    assert value(samples, "tempfs_dirty_bytes") == 7
    assert value(samples, "tempfs_reclaiming_files") == 3
    assert value(samples, "tempfs_alerts_active") == 1
    assert value(samples, "tempfs_disk_free_bytes") == 5000
    assert value(samples, "tempfs_operation_seconds_count", op="write") == 2
    assert value(samples, "tempfs_operation_seconds_bucket", op="write", le="0.0025") == 1
    assert value(samples, "tempfs_operation_seconds_bucket", op="write", le="0.5") == 2
    assert ("tempfs_operation_seconds_count", (("op", "read"),)) not in samples  # never observed


def test_snapshot_is_taken_on_the_trio_thread_and_a_busy_loop_serves_the_last_one():
    ops = fake_ops()
    threads = []
    usage = ops.store.usage
    ops.store.usage = lambda: threads.append(threading.get_ident()) or usage()
    collector = TempFSCollector(timeout=0.3)
    assert list(collector.collect()) == []  # not attached yet: nothing to show

    async def main():
        collector.attach(ops, trio.lowlevel.current_trio_token())
        first = await trio.to_thread.run_sync(collector.snapshot)
        assert first["cache_hits"] == 3
        assert threads == [threading.get_ident()]  # the store was read on the trio thread only
        ops.store.blocks.hits = 5
        got = {}
        scraper = threading.Thread(target=lambda: got.update(snapshot=collector.snapshot()))
        started = time.monotonic()
        scraper.start()
        time.sleep(1.0)  # the trio thread is busy: the scrape cannot be answered in time
        scraper.join()
        assert got["snapshot"] is first and time.monotonic() - started < 1.5
        await trio.sleep(0.05)  # the late request runs now, on the trio thread
        assert (await trio.to_thread.run_sync(collector.snapshot))["cache_hits"] == 5
        assert set(threads) == {threading.get_ident()}
        collector.detach()

    trio.run(main)
    assert collector.snapshot()["cache_hits"] == 5  # detached: the last one
