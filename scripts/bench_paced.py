#!/usr/bin/env python3
"""What a filesystem daemon costs a program that pauses between its requests.

    bench_paced.py DIR --pid PID [--pauses 0,30,100,300] [--loops 5000]

In DIR, each loop opens one file, writes 100 bytes into it and closes it (a burst of requests:
open, getxattr, write, flush, release), then busy-waits the pause (in microseconds; busy, so the
program never sleeps, as one that computes between its files). Prints, per pause, the loops per
second and the daemon's CPU time (user + system, all threads, from /proc/PID/stat) per loop.
Run it against a tempfs mount with `[requests] spin` at its default and at "0" to see what
looking for the next request before sleeping costs when the next request is late (BENCHMARKS.md).
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path


def daemon_cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def paced_loops(path: Path, pause: float, loops: int) -> float:
    """Runs the loops; returns the seconds they took."""
    data = b"x" * 100
    started = time.perf_counter()
    for _ in range(loops):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            os.pwrite(fd, data, 0)
        finally:
            os.close(fd)
        until = time.perf_counter() + pause
        while time.perf_counter() < until:
            pass
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dir", type=Path)
    parser.add_argument("--pid", type=int, required=True, help="the filesystem daemon")
    parser.add_argument("--pauses", default="0,30,100,300", help="microseconds, comma-separated")
    parser.add_argument("--loops", type=int, default=5000)
    args = parser.parse_args()
    path = args.dir / "paced"
    try:
        for pause in (float(p) for p in args.pauses.split(",")):
            before = daemon_cpu_seconds(args.pid)
            seconds = paced_loops(path, pause * 1e-6, args.loops)
            cpu = daemon_cpu_seconds(args.pid) - before
            print(f"pause_{pause:g}us {args.loops / seconds:.0f} loops/s")
            print(f"pause_{pause:g}us_daemon_cpu {1e6 * cpu / args.loops:.0f} us/loop")
    finally:
        path.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
