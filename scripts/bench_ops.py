#!/usr/bin/env python3
"""What each FUSE request of a small-file workload costs tempfs's own code, without the kernel:
the operations class is called directly, in-process, on a fresh store.

    bench_ops.py [--files 3000] [--dir /var/tmp] [--repeat 3]

For each file, in order, what the kernel sends when a program creates a 4 KiB file: lookup (no
such name), create, getattr of the folder (the kernel's permission check after the folder
changed), getxattr security.capability (asked before each write), write, release; then the
written blocks are stored, all at once (flush: what the flusher does in the daemon). Then lookup of each name (stat), then lookup and unlink of each.
Files hold bench.py's create_4k content: distinct (no dedup) and incompressible, so each is a
sealed object of just over 4 KiB in its metadata row.

Prints one `name value unit` line per figure: microseconds per request of each kind (the best of
--repeat runs, so load on the machine moves it less), and the SQL statements tempfs's code ran
per file in each phase (Database.execute calls; the accounting triggers run inside them). The
kernel's side and pyfuse3's request loop are not in these figures: bench.py measures them all.
"""
from __future__ import annotations

import argparse
import collections
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import pyfuse3
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import Content  # noqa: E402
from tempfs.codec import ContentCodec  # noqa: E402
from tempfs.config import default_config  # noqa: E402
from tempfs.daemon import area_rules, prepare_tree  # noqa: E402
from tempfs.fs import TempFS  # noqa: E402
from tempfs.monitor import Monitor  # noqa: E402
from tempfs.store import Store  # noqa: E402
from tempfs.store.db import Database  # noqa: E402

CAPABILITY = b"security.capability"
POOL = Content().random_pool()
STATEMENT_SHOWN = 110  # characters of a statement --statements shows


class Context:
    uid, gid, pid, umask = os.getuid(), os.getgid(), os.getpid(), 0o022


class Timings:
    """Seconds spent per request kind, and SQL statements per phase."""

    def __init__(self) -> None:
        self.seconds: collections.Counter[str] = collections.Counter()
        self.statements: collections.Counter[str] = collections.Counter()
        self._mark = time.perf_counter()

    def start(self) -> None:
        self._mark = time.perf_counter()

    def lap(self, kind: str) -> None:
        now = time.perf_counter()
        self.seconds[kind] += now - self._mark
        self._mark = now


async def _ignore_errno(call) -> None:
    try:
        await call
    except pyfuse3.FUSEError:
        pass


async def _workload(ops: TempFS, store: Store, folder: int, files: int, t: Timings, sql: list[int]) -> None:
    names = [b"f%06d" % i for i in range(files)]
    content = [Content.stamped(POOL, i, 4096) for i in range(files)]
    ctx = Context()
    async with trio.open_nursery() as nursery:
        await nursery.start(store.run_committer)  # no flusher: storing is all in "flush"
        sql[0] = 0
        t.start()
        for i, name in enumerate(names):
            await _ignore_errno(ops.lookup(folder, name, ctx))
            t.lap("lookup_missing")
            info, entry = await ops.create(folder, name, 0o644, os.O_WRONLY | os.O_CREAT, ctx)
            t.lap("create")
            await ops.getattr(folder, ctx)
            t.lap("getattr_folder")
            await _ignore_errno(ops.getxattr(entry.st_ino, CAPABILITY, ctx))
            t.lap("getxattr")
            await ops.write(info.fh, 0, content[i])
            t.lap("write")
            await ops.release(info.fh)
            t.lap("release")
        await store.sync()
        t.lap("flush")  # what the flusher had not stored yet, and the commit
        t.statements["create"] = sql[0]
        sql[0] = 0
        t.start()
        inodes = []
        for name in names:
            inodes.append((await ops.lookup(folder, name, ctx)).st_ino)
            t.lap("lookup")
        await ops.forget([(ino, 2) for ino in inodes])
        t.statements["stat"] = sql[0]
        sql[0] = 0
        t.start()
        for name in names:
            ino = (await ops.lookup(folder, name, ctx)).st_ino
            await ops.unlink(folder, name, ctx)
            await ops.forget([(ino, 1)])
            t.lap("lookup_unlink_forget")
        await store.sync()
        t.lap("unlink_commit")
        t.statements["unlink"] = sql[0]
        nursery.cancel_scope.cancel()


def run_once(files: int, where: Path, by_statement: Optional[dict[str, list]]) -> Timings:
    """One run; `by_statement`, if given, collects per SQL statement [times run, seconds]."""
    folder = Path(tempfile.mkdtemp(prefix="bench_ops.", dir=where))
    sql = [0]
    execute = Database.execute

    def counted(self, statement, args=(), held_ok=False):
        sql[0] += 1
        if by_statement is None:
            return execute(self, statement, args, held_ok)
        started = time.perf_counter()
        try:
            return execute(self, statement, args, held_ok)
        finally:
            spent = by_statement[" ".join(statement.split())[:STATEMENT_SHOWN]]
            spent[0] += 1
            spent[1] += time.perf_counter() - started

    Database.execute = counted
    try:
        # written blocks are kept until the sync (each small file holds a whole block's budget)
        store = Store(folder / "store", ContentCodec(os.urandom(32)), dirty_limit=files * 2 * 128 * 1024,
                      cache_limit=64 << 20)
        config = default_config()
        prepare_tree(store, config)
        ops = TempFS(store, area_rules(config), 0, Monitor())
        target = store.lookup(store.lookup(pyfuse3.ROOT_INODE, b"cache"), b"data")
        timings = Timings()
        trio.run(_workload, ops, store, target, files, timings, sql)
        store.close()
        return timings
    finally:
        Database.execute = execute
        shutil.rmtree(folder, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=3000)
    parser.add_argument("--dir", type=Path, default=Path("/var/tmp"), help="where the stores are made")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--statements", action="store_true",
                        help="also list each SQL statement: runs per file and microseconds per run")
    args = parser.parse_args()
    by_statement = collections.defaultdict(lambda: [0, 0.0]) if args.statements else None
    runs = [run_once(args.files, args.dir, by_statement) for _ in range(args.repeat)]
    for kind in runs[0].seconds:
        best = min(r.seconds[kind] for r in runs)
        print(f"{kind} {1e6 * best / args.files:.1f} us/file", flush=True)
    for phase in runs[0].statements:
        print(f"sql_{phase} {runs[0].statements[phase] / args.files:.1f} statements/file")
    if by_statement is not None:
        for statement, (count, seconds) in sorted(by_statement.items(), key=lambda kv: -kv[1][1]):
            print(f"# {count / args.files / args.repeat:5.2f}/file {1e6 * seconds / count:6.1f} us  {statement}")


if __name__ == "__main__":
    main()
