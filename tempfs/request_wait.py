"""pyfuse3's wait for the next FUSE request, made to look before it sleeps.

pyfuse3 reads each request after `trio.lowlevel.wait_readable` on the FUSE device: the trio
thread registers the device with epoll and sleeps until the kernel wakes it. A program that does
one thing at a time (a create, a `stat`, an unlink, a 4 KiB write) sends its next request some
tens of microseconds after the reply, and waking a sleeping thread costs about as much again on
a VM, as much as tempfs's own work on a small request. So the wait installed here:

- returns at once when a request is already waiting (one `poll` with no timeout);
- otherwise, unless the loop has work under way (`busy()`: a request being handled, a worker
  thread working), polls the device again and again for up to `spin` seconds before it sleeps
  as before;
- stops spinning after MISSES spins in a row found nothing (a client that thinks between its
  requests would otherwise cost `spin` of CPU per request), and then tries one spin every
  PROBE_EVERY waits, which turns it back on when a request comes in time.

What it keeps: the trio loop still runs between two requests (pyfuse3 takes a trio lock before
each wait, which is a checkpoint); it never spins while `busy()` says a wake-up is coming that a
spin would hold back; a spin lasts at most `spin`. A closed or unmounted
device polls as ready, so pyfuse3 reads it and ends its loop as it would after epoll.

pyfuse3's read lock (a trio Lock, which pyfuse3's reader tasks take around each wait) is
replaced too, by ReaderLock: trio's Lock hands itself to the waiting reader at every release and
takes a checkpoint at every acquire, so every request cost a pass of trio's scheduler and a
switch between pyfuse3's two reader tasks. ReaderLock lets the task that just answered a request
read the next one, and takes a checkpoint (where trio's other tasks run) when the last one is
CHECKPOINT_EVERY old.

It goes in through the module attribute `pyfuse3.trio`, the hook `pyfuse3.asyncio` uses too,
and only for the life of the loop (`installed`).
"""
from __future__ import annotations

import contextlib
import math
import select
import time
from collections import Counter
from typing import Any, Callable, Iterator, Optional

import pyfuse3
import trio

MISSES = 8          # spins in a row that found nothing before spinning stops
PROBE_EVERY = 64    # while stopped, one wait in this many spins again
CHECKPOINT_EVERY = 1e-3  # seconds: how long trio's other tasks may wait for a stream of requests


class RequestWait:
    """`wait_readable` for pyfuse3's request loop. `counts` gets how each wait ended
    (`waits_ready`, `waits_spun`, `waits_slept`) and the time spent spinning (`spin_ns`)."""

    def __init__(self, spin: float, busy: Callable[[], bool] = lambda: False,
                 counts: Optional[Counter] = None) -> None:
        self.spin = spin
        self.busy = busy
        self.counts: Counter = counts if counts is not None else Counter()
        self._misses = 0
        self._waits_stopped = 0
        self._pollers: dict[int, Any] = {}

    async def wait_readable(self, fd: int) -> None:
        poller = self._pollers.get(fd)
        if poller is None:
            poller = self._pollers[fd] = select.poll()
            poller.register(fd, select.POLLIN)
        if poller.poll(0):
            self.counts["waits_ready"] += 1
            return
        if self._may_spin() and self._spun(poller):
            self.counts["waits_spun"] += 1
            return
        await trio.lowlevel.wait_readable(fd)
        self.counts["waits_slept"] += 1

    def _may_spin(self) -> bool:
        if self.spin <= 0 or self.busy():
            return False
        if self._misses < MISSES:
            return True
        self._waits_stopped += 1
        return self._waits_stopped % PROBE_EVERY == 0

    def _spun(self, poller: Any) -> bool:
        """Polls until a request comes or `spin` has passed; True if one came."""
        clock = time.perf_counter
        start = clock()
        deadline = start + self.spin
        came = False
        while not came:
            came = bool(poller.poll(0))
            if clock() >= deadline:
                break
        self.counts["spin_ns"] += int((clock() - start) * 1e9)
        if came:
            self._misses = self._waits_stopped = 0
        else:
            self._misses += 1
        return came


class ReaderLock:
    """The lock pyfuse3's reader tasks take around each wait for a request (`async with`). Free,
    it is taken without yielding unless the last checkpoint is CHECKPOINT_EVERY old; released,
    it wakes one waiting task, which takes it if it is still free when that task runs (so the
    task that released it may take it again first)."""

    def __init__(self) -> None:
        self._held = False
        self._waiting = trio.lowlevel.ParkingLot()
        self._checkpointed = -math.inf

    async def __aenter__(self) -> None:
        if not self._held and time.perf_counter() - self._checkpointed < CHECKPOINT_EVERY:
            self._held = True
            return
        await trio.lowlevel.checkpoint()
        self._checkpointed = time.perf_counter()
        while self._held:
            await self._waiting.park()
        self._held = True

    async def __aexit__(self, *exc_info: Any) -> None:
        self._held = False
        if self._waiting:
            self._waiting.unpark()


class _Lowlevel:
    """trio.lowlevel with `wait_readable` replaced."""

    def __init__(self, wait: RequestWait) -> None:
        self.wait_readable = wait.wait_readable

    def __getattr__(self, name: str) -> Any:
        return getattr(trio.lowlevel, name)


class _Trio:
    """The trio module as pyfuse3 sees it: trio, but for `Lock` and `lowlevel.wait_readable`."""

    Lock = ReaderLock

    def __init__(self, wait: RequestWait) -> None:
        self.lowlevel = _Lowlevel(wait)

    def __getattr__(self, name: str) -> Any:
        return getattr(trio, name)


@contextlib.contextmanager
def installed(wait: RequestWait) -> Iterator[RequestWait]:
    """pyfuse3's request loop waits with `wait` inside the block."""
    before = pyfuse3.trio
    pyfuse3.trio = _Trio(wait)
    try:
        yield wait
    finally:
        pyfuse3.trio = before
