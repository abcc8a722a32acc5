#!/usr/bin/env python3
"""The store alone, without FUSE: what writing costs tempfs's own code (sealing, SQLite, object
files), less disturbed by the kernel's request path and by other load than a mount's figures.

    bench_store.py [--size 256M] [--dir /var/tmp] [--workloads fresh,text,overwrite,patch]

fresh      incompressible data written once to a new file (one object file per 128 KiB)
text       log lines (bench.py's compressible content: lz4 shrinks a block to ~23 KiB)
overwrite  a quarter of --size written over the same file 4 more times, synced after each pass
           (every pass kills the last one's objects: the churn of a temp store)
patch      PATCH_WRITES random 4 KiB writes over a stored file of --size, then a sync: what a
           random write costs once the kernel hands it over (stored as patches: how many a
           write made, patches_per_write)

The flusher and the committer run as in the daemon. Prints, as bench.py does, one `name value
unit` line per figure: per workload its wall and CPU seconds (all threads of this process) and
its rate.
"""
from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench import Content, parse_size  # noqa: E402
from tempfs.codec import ContentCodec  # noqa: E402
from tempfs.layout import Kind  # noqa: E402
from tempfs.store import Store  # noqa: E402

MiB = 1 << 20
PATCH_WRITES = 40_000


async def _write(store: Store, ino: int, blocks: list[bytes]) -> list[tuple[float, float]]:
    """Writes `blocks` from offset 0 and syncs; [(wall, cpu)]."""
    async with trio.open_nursery() as nursery:
        await nursery.start(store.blocks.run_flusher)
        await nursery.start(store.run_committer)  # as the daemon does: a commit a second
        wall, cpu = time.perf_counter(), time.process_time()
        for i, block in enumerate(blocks):
            await store.write(ino, i * MiB, block)
        await store.sync()
        timing = (time.perf_counter() - wall, time.process_time() - cpu)
        nursery.cancel_scope.cancel()
    return [timing]


async def _patch(store: Store, ino: int, size: int, pool: bytes) -> list[tuple[float, float]]:
    """PATCH_WRITES random 4 KiB writes, each followed by a turn of the loop (as a request
    would give the flusher), then a sync; [(wall, cpu)]."""
    rng = random.Random(1)
    async with trio.open_nursery() as nursery:
        await nursery.start(store.blocks.run_flusher)
        await nursery.start(store.run_committer)  # as the daemon does: a commit a second
        wall, cpu = time.perf_counter(), time.process_time()
        for _ in range(PATCH_WRITES):
            at = rng.randrange(size // 4096) * 4096
            start = at % (len(pool) - 4096)
            await store.write(ino, at, pool[start:start + 4096])
            await trio.sleep(0)
        await store.sync()
        timing = (time.perf_counter() - wall, time.process_time() - cpu)
        nursery.cancel_scope.cancel()
    return [timing]


def run(name: str, size: int, where: Path, content: Content) -> None:
    folder = Path(tempfile.mkdtemp(prefix="bench_store.", dir=where))
    try:
        store = Store(folder / "store", ContentCodec(os.urandom(32)), dirty_limit=128 * MiB, cache_limit=0)
        ino = store.make(store.ensure_folder("cache", Kind.LEAF, 0o755, 0, 0), b"f", 0o100644, 0, 0).id
        if name == "overwrite":
            quarter = content.blocks("random", size // 4)
            other = [bytes(reversed(b)) for b in quarter]  # new content each pass, same offsets
            trio.run(_write, store, ino, quarter)  # the objects the first timed pass kills
            timings = []
            for i in range(4):
                timings += trio.run(_write, store, ino, (other, quarter)[i % 2])
            written = 4 * len(quarter) * MiB
        elif name == "patch":
            trio.run(_write, store, ino, content.blocks("random", size))
            timings = trio.run(_patch, store, ino, size, content.random_pool())
            written = PATCH_WRITES * 4096
        else:
            blocks = content.blocks("random" if name == "fresh" else "text", size)
            timings = trio.run(_write, store, ino, blocks)
            written = len(blocks) * MiB
        patches = store.blocks.patches_stored
        store.close()
        wall, cpu = sum(t[0] for t in timings), sum(t[1] for t in timings)
        print(f"{name}_seconds {wall:.2f} s\n{name}_cpu {cpu:.2f} s\n{name}_rate {written / MiB / wall:.0f} MiB/s",
              flush=True)
        if name == "patch":
            print(f"patch_write {wall / PATCH_WRITES * 1e6:.0f} us\npatches_per_write {patches / PATCH_WRITES:.2f} count",
                  flush=True)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=parse_size, default=256 * MiB)
    parser.add_argument("--dir", type=Path, default=Path("/var/tmp"), help="where the stores are made")
    parser.add_argument("--workloads", default="fresh,text,overwrite")
    args = parser.parse_args()
    content = Content()
    for name in args.workloads.split(","):
        if name not in ("fresh", "text", "overwrite", "patch"):
            parser.error(f"unknown workload {name!r}")
        run(name, args.size, args.dir, content)


if __name__ == "__main__":
    main()
