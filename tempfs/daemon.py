"""One mount's life: open the store, lay out the tree, serve FUSE requests, and on unmount or
SIGINT/SIGTERM flush everything and close the store cleanly.
"""
from __future__ import annotations

import logging
import os
import signal
import stat
from pathlib import Path
from typing import Optional

import pyfuse3
import trio

from . import layout
from .config import Access, Config
from .fs import SCHEMA_FOLDER_MODE, TempFS
from .monitor import Monitor
from .space import AreaRule
from .mounts import fusermount_unmount
from .store import Store
from .store.check import check_store

log = logging.getLogger(__name__)

CHECK_POLL = 1.0  # how often the daemon looks whether the whole-store check is due


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


def mount_options(store_path: Path) -> set[str]:
    return {"fsname=tempfs:" + str(store_path), "subtype=tempfs", "default_permissions", "allow_other"}


def serve(store: Store, config: Config, mountpoint: Path, events_path: Optional[Path] = None,
          metrics=None, key_path: Optional[Path] = None) -> None:
    """Mounts and serves until unmounted; always leaves the store closed and the mount gone.
    Events (refusals, expiries, evictions, alerts, ...) go to `events_path` as JSON lines."""
    prepare_tree(store, config)
    monitor = Monitor(events_path=events_path, alert_command=config.alerts.command,
                      alert_timeout=config.alerts.command_timeout)
    ops = TempFS(store, area_rules(config), config.min_free, monitor, config.alerts)
    ops.key_path = None if key_path is None else str(key_path)
    pyfuse3.init(ops, str(mountpoint), mount_options(store.path))
    monitor.event("mounted", f"mounted {store.path} at {mountpoint}", store=str(store.path),
                  mountpoint=str(mountpoint), pid=os.getpid())
    daemon = _Daemon(store, ops, mountpoint, config.check_interval)
    daemon.metrics = metrics  # a metrics.MetricsServer (already listening), or None
    try:
        trio.run(daemon.run)
    finally:
        pyfuse3.close(unmount=daemon.must_unmount)
        store.close()
        monitor.event("unmounted", f"unmounted {mountpoint}; store closed", mountpoint=str(mountpoint))
        monitor.close()


class _Daemon:
    def __init__(self, store: Store, ops: TempFS, mountpoint: Path, check_interval: float) -> None:
        self.store = store
        self.ops = ops
        self.mountpoint = mountpoint
        self.check_interval_ns = int(check_interval * 1e9)
        self.must_unmount = True

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(self.store.blocks.run_flusher)
            await nursery.start(self.store.run_committer)
            await nursery.start(self.ops.run_reaper)
            await nursery.start(self.ops.space.run_watch)
            await nursery.start(self._run_checks)
            await nursery.start(self.ops.monitor.run_alert_command)
            if self.metrics is not None:
                await nursery.start(self.metrics.run, self.ops)
            nursery.start_soon(self._on_signals)
            await pyfuse3.main()
            self.must_unmount = self._terminated_by_us
            nursery.cancel_scope.cancel()
        await self.store.sync()

    _terminated_by_us = False
    metrics = None

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
                result = await trio.to_thread.run_sync(fusermount_unmount, self.mountpoint)
                if result.returncode != 0:
                    # busy: stop serving; close() then detaches the mount lazily
                    log.warning("unmount failed (%s); detaching lazily", result.stderr.strip())
                    self._terminated_by_us = True
                    pyfuse3.terminate()
