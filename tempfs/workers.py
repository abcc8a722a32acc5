"""Worker threads for tempfs's blocking work (sealing, loading, fsync, the page cache filler).

`run_sync(fn, *args)` is `trio.to_thread.run_sync(fn, *args)` without what tempfs does not use
and pays for at every trip: trio names the worker thread for each job (two `prctl` calls and
an f-string), takes a capacity limiter (a pass of the scheduler), copies the context and sets up
the channel that `trio.from_thread` calls need. On the 2-core VM a trip took about 200 us of CPU
that way, against about 100 us through trio's thread cache (`trio.lowlevel.start_thread_soon`)
directly (`scripts/bench_workers.py`). A random read that misses makes two trips (its block's
load, then the page cache filler), a `fsync` two (the packs, then the commit).

Guarantees, as `trio.to_thread.run_sync`'s by default: the function runs in one of trio's
cached worker threads; its result, or its exception, is returned to or raised in the task that
awaits it; a task already cancelled does not start the job, and a job started is waited for to
the end (a cancellation meanwhile takes effect at the task's next checkpoint). There is no
limit on jobs at once: each caller bounds its own (flush and read-ahead batches, one filler
trip, one commit), and a read's load is bounded by the requests the kernel has in flight.
`running()` counts the jobs whose task has not resumed yet: the request loop does not spin while
one may wake it (request_wait). A `trio.from_thread` call inside the function needs its
`trio_token=` (tempfs's own code makes none).
"""
from __future__ import annotations

from typing import Callable, TypeVar

import trio

T = TypeVar("T")

_running = 0


def running() -> int:
    """Jobs handed to a worker thread whose task has not resumed yet."""
    return _running


async def run_sync(fn: Callable[..., T], *args: object) -> T:
    """Runs `fn(*args)` in a worker thread and returns what it returns (or raises what it raises)."""
    global _running
    await trio.lowlevel.checkpoint_if_cancelled()
    task = trio.lowlevel.current_task()
    token = trio.lowlevel.current_trio_token()

    def deliver(outcome) -> None:  # in the worker thread, once fn has returned
        token.run_sync_soon(trio.lowlevel.reschedule, task, outcome)

    _running += 1
    try:
        trio.lowlevel.start_thread_soon(lambda: fn(*args), deliver)
        return await trio.lowlevel.wait_task_rescheduled(_no_abort)
    finally:
        _running -= 1


def _no_abort(_raise_cancel: object) -> trio.lowlevel.Abort:
    return trio.lowlevel.Abort.FAILED  # the job runs to its end; its task waits for it
