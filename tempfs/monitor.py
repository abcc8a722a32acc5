"""What the daemon saw: counters with recent windows, operation latencies, events and alerts.

Guarantees:
- Every counter has a total since the mount and its counts over any recent window up to a day
  (ten-second buckets), so status can say "in the last minute / hour / day".
- Every event is one JSON line in the events file (time, kind, level, message and its fields:
  path, pid, uid, command where they apply) and one line in the daemon's log.
- An alert is raised once per condition: raising it again does nothing until `clear()` re-arms
  it. A raised alert is logged at WARNING, written as an event, and handed to the optional
  alert command (run with the alert's fields in TEMPFS_ALERT_* environment variables and a
  timeout, outside the FUSE loop); a command that fails or hangs is logged, never fatal.
- It holds no file content and no key material; messages carry paths and process facts only.
"""
from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import time
from collections import Counter, defaultdict, deque
from pathlib import Path
from typing import Any, Callable, Optional

import trio

from .clock import iso_utc
from . import workers

log = logging.getLogger(__name__)

BUCKET_SECONDS = 10
WINDOW_SECONDS = 86400
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                   2.5, 5.0, 10.0)
ALERT_QUEUE = 100


class Latency:
    """A histogram of one operation's durations, in the shape Prometheus expects."""

    def __init__(self) -> None:
        self.buckets = [0] * len(LATENCY_BUCKETS)  # cumulative counts are derived when read
        self.count = 0
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        self.count += 1
        self.sum += seconds
        for i, bound in enumerate(LATENCY_BUCKETS):
            if seconds <= bound:
                self.buckets[i] += 1
                break

    def cumulative(self) -> list[tuple[float, int]]:
        out, running = [], 0
        for bound, n in zip(LATENCY_BUCKETS, self.buckets):
            running += n
            out.append((bound, running))
        out.append((math.inf, self.count))
        return out


class Monitor:
    def __init__(self, *, events_path: Optional[Path] = None, alert_command: Optional[str] = None,
                 alert_timeout: float = 10.0, now: Callable[[], float] = time.monotonic) -> None:
        self.totals: Counter[str] = Counter()
        self.latency: dict[str, Latency] = defaultdict(Latency)
        self.active_alerts: dict[str, dict] = {}
        self.alerts_raised = 0
        self._buckets: dict[str, deque[list]] = defaultdict(deque)  # key -> [[bucket, count], ...]
        self._now = now
        self._events = _open_events(events_path)
        self.events_path = events_path
        self._alert_command = alert_command
        self._alert_timeout = alert_timeout
        self._alert_send, self._alert_receive = trio.open_memory_channel(ALERT_QUEUE)

    # ---- counters ------------------------------------------------------------------------
    def count(self, key: str, n: int = 1) -> None:
        self.totals[key] += n
        bucket = int(self._now() // BUCKET_SECONDS)
        window = self._buckets[key]
        if window and window[-1][0] == bucket:
            window[-1][1] += n
        else:
            window.append([bucket, n])
            while window and window[0][0] <= bucket - WINDOW_SECONDS // BUCKET_SECONDS:
                window.popleft()

    def recent(self, key: str, seconds: float) -> int:
        """How many `key` were counted in the last `seconds` (to the bucket)."""
        first = int(self._now() // BUCKET_SECONDS) - math.ceil(seconds / BUCKET_SECONDS) + 1
        return sum(n for bucket, n in self._buckets.get(key, ()) if bucket >= first)

    def observe(self, op: str, seconds: float) -> None:
        self.latency[op].observe(seconds)

    # ---- events --------------------------------------------------------------------------
    def event(self, kind: str, message: str, level: int = logging.INFO, **fields: Any) -> None:
        """Records one event: a JSON line in the events file and a line in the log."""
        record = {"time": _iso_now(), "kind": kind, "level": logging.getLevelName(level), "message": message,
                  **fields}
        details = " ".join(f"{k}={v}" for k, v in fields.items())
        log.log(level, "%s: %s%s", kind, message, f": {details}" if details else "")
        if self._events is not None:
            try:
                self._events.write(json.dumps(record, default=str) + "\n")
            except (OSError, ValueError) as e:
                log.error("cannot write the events file %s (%s); events go to the log only", self.events_path, e)
                self._events = None

    # ---- alerts --------------------------------------------------------------------------
    def alert(self, condition: str, message: str, **fields: Any) -> bool:
        """Raises the alert of `condition` unless it is already raised; True if raised now."""
        if condition in self.active_alerts:
            return False
        record = {"condition": condition, "message": message, "since": _iso_now(), **fields}
        self.active_alerts[condition] = record
        self.alerts_raised += 1
        self.event("alert", message, logging.WARNING, condition=condition, **fields)
        if self._alert_command:
            try:
                self._alert_send.send_nowait(record)
            except trio.WouldBlock:
                log.error("alert command backlog full: %s not handed to it", condition)
        return True

    def clear(self, condition: str) -> None:
        """The condition has cleared: its alert may be raised again."""
        record = self.active_alerts.pop(condition, None)
        if record is not None:
            self.event("alert_cleared", record["message"], condition=condition)

    async def run_alert_command(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Hands each raised alert to the alert command, one at a time."""
        task_status.started()
        async for record in self._alert_receive:
            await workers.run_sync(self._run_command, record)

    def _run_command(self, record: dict) -> None:
        env = {**os.environ, **{f"TEMPFS_ALERT_{k.upper()}": str(v) for k, v in record.items()}}
        try:
            result = subprocess.run(self._alert_command, shell=True, env=env, timeout=self._alert_timeout,
                                    stdin=subprocess.DEVNULL, capture_output=True, text=True)
        except subprocess.TimeoutExpired:
            log.error("alert command timed out after %.0f s (alert %s)", self._alert_timeout, record["condition"])
            return
        except OSError as e:
            log.error("alert command could not run: %s (alert %s)", e, record["condition"])
            return
        if result.returncode != 0:
            log.error("alert command exited %d (alert %s): %s", result.returncode, record["condition"],
                      result.stderr.strip()[-500:])

    def close(self) -> None:
        if self._events is not None:
            self._events.close()
            self._events = None


def _open_events(path: Optional[Path]):
    if path is None:
        return None
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        return open(fd, "a", buffering=1, encoding="utf-8")
    except OSError as e:
        log.error("cannot open the events file %s (%s); events go to the log only", path, e)
        return None


def _iso_now() -> str:
    return iso_utc(time.time_ns(), millis=True)
