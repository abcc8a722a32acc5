"""The daemon's clock: wall time in nanoseconds, injectable so that tests can move time.

With TEMPFS_TEST_CLOCK_FILE set, the clock is the wall clock plus the number of seconds
written in that file (read at every call), so a test ages every entry by hours in one write.
It is meant for tests only: the daemon logs a warning when it is in use.
"""
from __future__ import annotations

import logging
import os
import time
from typing import Callable

log = logging.getLogger(__name__)

Clock = Callable[[], int]
TEST_CLOCK_ENV = "TEMPFS_TEST_CLOCK_FILE"


def offset_clock(path: str) -> Clock:
    def now() -> int:
        try:
            with open(path) as f:
                offset = float(f.read().strip() or 0)
        except (OSError, ValueError):
            offset = 0.0
        return time.time_ns() + int(offset * 1e9)
    return now


def iso_utc(ns: int, millis: bool = False) -> str:
    """A time in nanoseconds as ISO 8601 UTC, e.g. 2026-11-26T14:09:48Z (or ...48.013Z)."""
    text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ns // 10**9))
    return f"{text}.{ns % 10**9 // 10**6:03d}Z" if millis else f"{text}Z"


def daemon_clock() -> Clock:
    path = os.environ.get(TEST_CLOCK_ENV)
    if path:
        log.warning("test clock in use: wall time plus the seconds in %s", path)
        return offset_clock(path)
    return time.time_ns
