#!/usr/bin/env python3
"""Benchmark: one expiry pass over a store of N entries of which D are due.

Builds a real store (SQLite metadata, no mount) with N files spread over the cleanup/ area's
leaf folders, makes D of them due, and times what the reaper does for them: find what is due
(an index range), remove each name, destroy each inode, commit. The kernel invalidations the
daemon adds are queued to pyfuse3's notify thread and are not part of the pass.

    .venv/bin/python scripts/bench_expiry.py [--entries 1000000] [--due 10000]

Prints one line per figure: `name value unit`.
"""
from __future__ import annotations

import argparse
import os
import stat
import tempfile
import time
from pathlib import Path

from tempfs.codec import ContentCodec
from tempfs.layout import Kind
from tempfs.store import Store

HOUR_NS = 3600 * 10**9


def build(store: Store, entries: int, due: int, now: int) -> None:
    leaves = [store.ensure_folder(f"cleanup/{leaf}", Kind.LEAF, 0o1777, 0, 0, policy="cleanup")
              for leaf in ("scheduled", "failed", "manual")]
    store.ensure_folder("cleanup", Kind.BRANCH, 0o1777, 0, 0, policy="cleanup")
    first = store.db.one("SELECT coalesce(max(id), 0) + 1 FROM inodes")[0]
    mode = stat.S_IFREG | 0o644
    # the first `due` entries were changed two hours ago (past cleanup/'s hour), the rest now
    rows = ((first + i, mode, now - 2 * HOUR_NS if i < due else now, HOUR_NS) for i in range(entries))
    store.db.conn.executemany(
        "INSERT INTO inodes(id, mode, uid, gid, size, nlink, atime_ns, mtime_ns, ctime_ns, kind, area, policy, life_ns) "
        "VALUES (?1, ?2, 0, 0, 0, 1, ?3, ?3, ?3, 0, 'cleanup', 'cleanup', ?4)", rows)
    store.db.conn.executemany(
        "INSERT INTO entries(parent, name, inode) VALUES (?, ?, ?)",
        ((leaves[i % 3], f"f{i:08d}".encode(), first + i) for i in range(entries)))
    store.commit_now()


def reap_pass(store: Store, now: int) -> int:
    reaped = 0
    while due := store.due(now, 1000):
        for ino in due:
            store.expire(ino)
            store.remove_inode(ino)  # the kernel has forgotten it (no lookups in this benchmark)
            reaped += 1
    store.commit_now()
    return reaped


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=1_000_000)
    parser.add_argument("--due", type=int, default=10_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="tempfs-bench-") as tmp:
        now = time.time_ns()
        store = Store(Path(tmp) / "store", ContentCodec(os.urandom(32)), dirty_limit=64 << 20,
                      cache_limit=16 << 20, clock=lambda: now)
        t0 = time.perf_counter()
        build(store, args.entries, args.due, now)
        print(f"build_entries {args.entries} entries")
        print(f"build_seconds {time.perf_counter() - t0:.1f} s")
        t0 = time.perf_counter()
        reaped = reap_pass(store, now)
        elapsed = time.perf_counter() - t0
        print(f"reaped {reaped} entries")
        print(f"reap_pass_seconds {elapsed:.3f} s")
        print(f"reap_rate {reaped / elapsed:.0f} entries/s")
        t0 = time.perf_counter()
        idle = reap_pass(store, now)
        print(f"idle_pass_seconds {time.perf_counter() - t0:.6f} s (nothing due: {idle} reaped)")
        store.close()


if __name__ == "__main__":
    main()
