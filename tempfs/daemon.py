"""One mount's life: open the store, lay out the tree, serve FUSE requests, and on unmount or
SIGINT/SIGTERM flush everything and close the store cleanly.
"""
from __future__ import annotations

import ctypes
import functools
import logging
import os
import signal
import sqlite3
import stat
import time
from pathlib import Path
from typing import Optional

import pyfuse3
import trio

from . import layout, workers
from .config import Access, Config
from .fs import SCHEMA_FOLDER_MODE, TempFS
from .monitor import Monitor
from .request_wait import RequestWait, installed
from .space import AreaRule
from .mounts import fusermount_unmount, set_read_ahead
from .store import Store
from .store.check import check_store

log = logging.getLogger(__name__)

CHECK_POLL = 1.0  # how often the daemon looks whether the whole-store check is due
STORE_POLL = 1.0  # how often it looks whether its store folder is still there
MALLOC_ARENAS = 2
_M_ARENA_MAX = -8  # mallopt parameter (malloc.h)
# The kernel's default (128 KiB) has a sequential reader ask for one block per request; 512 KiB
# requests cost the request loop a quarter as many trips (cold sequential read 1.27x, measured)
READ_AHEAD_KIB = 512
SHUTDOWN_RETRY = 60.0  # how long unmounting retries storing what is left (full disk, locked database)


def prepare_tree(store: Store, config: Config) -> None:
    """Makes every schema folder exist with its kind and policy, and applies each policy's
    max_age to the entries it governs; folders the config dropped become ordinary."""
    kinds = layout.schema_kinds(config.folders)
    store.apply_policies({path: int(policy.max_age * 1e9) if policy.auto_cleanup else None
                          for path, policy in config.policies.items()})
    keep = [store.ensure_folder(path, kinds[path], SCHEMA_FOLDER_MODE, os.getuid(), os.getgid(),
                                policy=config.policy_key(path))
            for path in config.folders]
    for path, ino in zip(config.folders, keep):
        _apply_access(store, ino, path, config.access.get(path, Access()))
    for path in store.unmark_schema(keep):
        log.warning("%s is no longer declared by the config: it is now an ordinary folder", path)
    store.commit_now()


def _apply_access(store: Store, ino: int, path: str, access: Access) -> None:
    """Gives a schema folder the owner, group and mode the config sets (tempfs's defaults where
    it sets none), at every mount: the kernel enforces them (default_permissions)."""
    node = store.inode(ino)
    wanted = {"mode": stat.S_IFDIR | (SCHEMA_FOLDER_MODE if access.mode is None else access.mode),
              "uid": os.getuid() if access.owner is None else access.owner,
              "gid": os.getgid() if access.group is None else access.group}
    changes = {k: v for k, v in wanted.items() if getattr(node, k) != v}
    if changes:
        store.set_attrs(ino, **changes)
        log.info("%s/: access set to owner %d, group %d, mode %04o", path, wanted["uid"], wanted["gid"],
                 stat.S_IMODE(wanted["mode"]))


def area_rules(config: Config) -> dict[str, AreaRule]:
    """Each area's size limit, and whether tempfs may evict there (auto_cleanup off: it deletes
    nothing by itself, so a full area refuses writes)."""
    rules = {}
    for area in config.areas:
        policy = config.policies[area]
        rules[area] = AreaRule(policy.max_size, policy.on_full == "evict" and policy.auto_cleanup)
    for path, policy in config.policies.items():
        area = path.split("/")[0]
        if "/" in path and policy.max_size != config.policies[area].max_size:
            log.warning("policy.%s.max_size is not enforced: size limits apply per area (%s/)", path, area)
    return rules


def _limit_malloc_arenas() -> None:
    """glibc gives each worker thread that seals or loads blocks an arena of its own (up to 8 per
    core), and 128 KiB buffers freed in one arena are not reused by another: with two arenas,
    peak RSS on sequential and random I/O fell from 446 to 249 MiB, at the same throughput."""
    try:
        ctypes.CDLL(None).mallopt(_M_ARENA_MAX, MALLOC_ARENAS)
    except (OSError, AttributeError):  # not glibc
        log.debug("mallopt unavailable: malloc arenas left as they are")


def mount_options(store_path: Path) -> set[str]:
    return {"fsname=tempfs:" + str(store_path), "subtype=tempfs", "default_permissions", "allow_other"}


def serve(store: Store, config: Config, mountpoint: Path, events_path: Optional[Path] = None,
          metrics=None, key_path: Optional[Path | str] = None) -> None:
    """Mounts and serves until unmounted; always leaves the store closed and the mount gone.
    Events (refusals, expiries, evictions, alerts, ...) go to `events_path` as JSON lines."""
    _limit_malloc_arenas()
    prepare_tree(store, config)
    monitor = Monitor(events_path=events_path, alert_command=config.alerts.command,
                      alert_timeout=config.alerts.command_timeout)
    ops = TempFS(store, area_rules(config), config.min_free, monitor, config.alerts)
    ops.key_path = None if key_path is None else str(key_path)
    if store.needs_recovery:  # the last daemon died: repair what a crash leaves, before serving
        ops.last_check = check_after_crash(store, monitor)
    pyfuse3.init(ops, str(mountpoint), mount_options(store.path))
    monitor.event("mounted", f"mounted {store.path} at {mountpoint}", store=str(store.path),
                  mountpoint=str(mountpoint), pid=os.getpid())
    daemon = _Daemon(store, ops, mountpoint, config.check_interval, config.request_spin)
    daemon.metrics = metrics  # a metrics.MetricsServer (already listening), or None
    try:
        trio.run(daemon.run)
    finally:
        pyfuse3.close(unmount=daemon.must_unmount)
        _close_store(store)
        monitor.event("unmounted", f"unmounted {mountpoint}; store closed", mountpoint=str(mountpoint))
        monitor.close()


def check_after_crash(store: Store, monitor: Monitor) -> Optional[dict]:
    """The quick part of the whole-store check (objects' bytes present, not read), with repairs:
    after an unclean shutdown it removes the packs that a crash between appending objects and
    committing them (or between a commit and the removals after it) leaves, and finds
    anything else amiss. Returns its report for status (None if it failed); logs a summary."""
    log.warning("%s was not closed cleanly (the daemon was killed or the machine stopped): "
                "running the quick store check before serving", store.path)
    try:
        report = trio.run(functools.partial(check_store, store, repair=True, verify_content=False))
    except Exception as e:
        log.exception("the quick store check after an unclean shutdown failed; serving anyway")
        monitor.alert("check_failed", f"the quick store check after an unclean shutdown failed: {e}")
        return None
    result = report.to_dict()
    result["kind"] = "quick, after an unclean shutdown"
    log.warning("quick store check after an unclean shutdown: %d objects present, %d repaired, %d damaged, "
                "in %.2f s", report.objects_checked, len(report.repaired), len(report.damaged), result["seconds"])
    if report.damaged:
        monitor.alert("store_damage", f"the quick store check after an unclean shutdown found "
                      f"{len(report.damaged)} problems it cannot repair (see the log)", problems=len(report.damaged))
    else:
        store.needs_recovery = False  # the next clean close marks the store clean again
    return result


def _close_store(store: Store) -> None:
    """Closes the store; while another process holds its database, retries for a while rather
    than lose the last changes."""
    deadline = time.monotonic() + SHUTDOWN_RETRY
    while True:
        try:
            store.close()
            return
        except sqlite3.OperationalError as e:
            if time.monotonic() >= deadline:
                raise
            log.error("cannot close the store (%s); retrying", e)
            time.sleep(1.0)


def _identity(store_path: Path) -> Optional[tuple[int, ...]]:
    """What tells the store folder and its database from a removed or replaced one."""
    try:
        folder, db = os.stat(store_path), os.stat(store_path / "meta.sqlite")
    except OSError:  # gone, or no longer reachable
        return None
    return folder.st_dev, folder.st_ino, db.st_dev, db.st_ino


class _Daemon:
    def __init__(self, store: Store, ops: TempFS, mountpoint: Path, check_interval: float,
                 request_spin: float = 0.0) -> None:
        self.store = store
        self.ops = ops
        self.request_spin = request_spin
        self.mountpoint = mountpoint
        self.check_interval_ns = int(check_interval * 1e9)
        self.must_unmount = True

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(self.store.blocks.run_flusher)
            await nursery.start(self.store.blocks.run_read_ahead)
            await nursery.start(self.ops.page_cache.run)
            await nursery.start(self.store.run_committer)
            await nursery.start(self.store.run_reclaimer, lambda: self.ops.last_request)
            await nursery.start(self.store.run_compactor)
            await nursery.start(self.ops.run_reaper)
            await nursery.start(self.ops.space.run_watch)
            await nursery.start(self._run_checks)
            await nursery.start(self._watch_store)
            await nursery.start(self.ops.monitor.run_alert_command)
            if self.metrics is not None:
                await nursery.start(self.metrics.run, self.ops)
            nursery.start_soon(self._on_signals)
            nursery.start_soon(self._tune_read_ahead)
            with installed(self._request_wait()):
                await pyfuse3.main()
            self.must_unmount = self._terminated_by_us
            nursery.cancel_scope.cancel()
        await self._store_everything()

    def _request_wait(self) -> RequestWait:
        """Spinning for the next request while a handler or a worker thread works would hold
        back their wake-ups (a worker's result reaches its task through the trio loop). On one
        CPU the program cannot send its next request while the daemon spins."""
        spin = self.request_spin
        if spin and len(os.sched_getaffinity(0)) < 2:
            log.info("one CPU to run on: the daemon sleeps between requests ([requests] spin ignored)")
            spin = 0.0
        return RequestWait(spin, busy=lambda: self.ops.in_flight > 0 or workers.running() > 0,
                           counts=self.ops.monitor.totals)

    _terminated_by_us = False
    metrics = None

    async def _tune_read_ahead(self) -> None:
        """Sets the mount's readahead once the kernel has its answer to INIT, which would
        otherwise cap it back to the default. Never asked through the mount itself: a daemon
        waiting on its own mount holds it, and an unmount that came early would fail as busy."""
        await self.ops.initialized.wait()
        if set_read_ahead(self.mountpoint, READ_AHEAD_KIB):
            log.debug("readahead of %s set to %d KiB", self.mountpoint, READ_AHEAD_KIB)

    async def _run_checks(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """The seed's weekly whole-tree cleanup, made a check of the whole store: due
        `check_interval` after the last one (a new store starts its week at its first mount;
        a store whose check fell due while unmounted is checked at once)."""
        if self.store.last_check_ns is None:
            self.store.record_check(self.store.clock())
        task_status.started()
        while True:
            if self.store.clock() - self.store.last_check_ns >= self.check_interval_ns:
                await self._check_once()
            await trio.sleep(CHECK_POLL)

    async def _watch_store(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Notices the store folder (or its database) removed or replaced under the running
        daemon: nothing could be stored any more, so from then on every change is refused with
        EIO (reads of what is still reachable go on), said once in the log and as an alert."""
        identity = _identity(self.store.path)
        task_status.started()
        while _identity(self.store.path) == identity:
            await trio.sleep(STORE_POLL)
        self.ops.store_lost = f"the store {self.store.path} was removed or replaced while mounted"
        log.error("%s: every change now fails with EIO, and what was written since the last commit cannot "
                  "be stored; unmount (tempfs umount %s), then restore the store or mount a new one",
                  self.ops.store_lost, self.mountpoint)
        self.ops.monitor.alert("store_lost", self.ops.store_lost, store=str(self.store.path))

    async def _store_everything(self) -> None:
        """At unmount: stores all written data and commits; a full disk or a database another
        process holds is retried for SHUTDOWN_RETRY seconds before what is left is given up."""
        deadline = trio.current_time() + SHUTDOWN_RETRY
        while True:
            try:
                await self.store.sync()
                return
            except (OSError, sqlite3.Error) as e:
                if self.ops.store_lost or trio.current_time() >= deadline:
                    log.error("unmounting: cannot store what was written (%s): %d bytes of it are lost",
                              e, self.store.blocks.dirty_bytes)
                    return
                log.error("unmounting: cannot store what was written yet (%s); retrying", e)
                await trio.sleep(1.0)

    async def _check_once(self) -> None:
        """Runs the check (it logs each repair and problem itself) and keeps its report for status."""
        started = self.store.clock()
        monitor = self.ops.monitor
        try:
            report = await check_store(self.store, repair=True)
        except Exception as e:
            monitor.count("check_failures")
            log.exception("whole-store check failed; next try in %.0f s", self.check_interval_ns / 1e9)
            monitor.alert("check_failed", f"the whole-store check failed: {e}")
        else:
            monitor.count("check_runs")
            monitor.clear("check_failed")
            self.ops.last_check = report.to_dict()
            if report.damaged:
                monitor.alert("store_damage", f"the whole-store check found {len(report.damaged)} problems it "
                              "cannot repair (see the log)", problems=len(report.damaged))
            else:
                monitor.clear("store_damage")
        self.store.record_check(started)

    async def _on_signals(self) -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for signum in signals:
                log.info("%s: unmounting %s", signal.Signals(signum).name, self.mountpoint)
                result = await workers.run_sync(fusermount_unmount, self.mountpoint)
                if result.returncode != 0:
                    # busy: stop serving; close() then detaches the mount lazily
                    log.warning("unmount failed (%s); detaching lazily", result.stderr.strip())
                    self._terminated_by_us = True
                    pyfuse3.terminate()
