#!/usr/bin/env python3
"""What one trip to a worker thread costs: `trio.to_thread.run_sync` against tempfs's
`workers.run_sync`, each running a function that does nothing, one trip at a time (as a read
that misses, or a `fsync`, makes them).

    bench_workers.py [--trips 3000] [--repeat 3]

Prints, as bench.py does, one `name value unit` line per figure: the wall and CPU time (all
threads of this process) per trip, best of the repeats.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tempfs import workers  # noqa: E402

WAYS = {"to_thread": trio.to_thread.run_sync, "workers": workers.run_sync}


def _nothing() -> None:
    return None


async def _trips(way: str, trips: int) -> tuple[float, float]:
    run_sync = WAYS[way]
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(trips):
        await run_sync(_nothing)
    return (time.perf_counter() - wall) / trips, (time.process_time() - cpu) / trips


async def _main(trips: int, repeat: int) -> None:
    best: dict[str, list[float]] = {}
    for _ in range(repeat):
        for way in WAYS:  # alternated, so that neither always runs first
            wall, cpu = await _trips(way, trips)
            got = best.setdefault(way, [wall, cpu])
            got[0], got[1] = min(got[0], wall), min(got[1], cpu)
    for way, (wall, cpu) in best.items():
        print(f"{way}_trip {wall * 1e6:.1f} us")
        print(f"{way}_trip_cpu {cpu * 1e6:.1f} us")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trips", type=int, default=3000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    trio.run(_main, args.trips, args.repeat)


if __name__ == "__main__":
    main()
