"""workers.run_sync: trio.to_thread.run_sync's promises, at less cost per trip."""
from __future__ import annotations

import threading
import time

import pytest
import trio

from tempfs import workers

from conftest import run_script


def test_the_function_runs_in_another_thread_and_its_result_comes_back():
    async def main() -> None:
        here = threading.get_ident()
        ident, total = await workers.run_sync(lambda a, b: (threading.get_ident(), a + b), 2, 3)
        assert total == 5 and ident != here

    trio.run(main)


def test_its_exception_is_raised_in_the_task():
    def fails() -> None:
        raise KeyError("lost")

    async def main() -> None:
        with pytest.raises(KeyError, match="lost"):
            await workers.run_sync(fails)
        assert workers.running() == 0

    trio.run(main)


def test_a_job_counts_as_running_until_its_task_resumes():
    release = threading.Event()

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(workers.run_sync, release.wait)
            nursery.start_soon(workers.run_sync, release.wait)
            await trio.sleep(0.05)
            assert workers.running() == 2
            release.set()
        assert workers.running() == 0

    trio.run(main)


def test_a_cancelled_task_starts_no_job_and_a_started_job_is_waited_for():
    ran, release = [], threading.Event()

    async def main() -> None:
        with trio.CancelScope() as scope:
            scope.cancel()
            await workers.run_sync(ran.append, "cancelled before")
        assert ran == []

        def slow() -> str:
            release.wait()
            time.sleep(0.1)  # long after the cancel: a task that did not wait would be gone
            ran.append("finished")
            return "done"

        with trio.CancelScope() as scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(workers.run_sync, slow)
                await trio.sleep(0.05)
                scope.cancel()  # the job is under way: its task waits for it, then sees the cancel
                release.set()
        assert ran == ["finished"] and workers.running() == 0

    trio.run(main)


def test_the_trip_benchmark_prints_both_ways(tmp_path):
    r, figures = run_script("bench_workers.py", "--trips", "200", "--repeat", "1", tmp_path=tmp_path)
    assert r.returncode == 0, r.stderr
    for way in ("to_thread", "workers"):
        assert float(figures[f"{way}_trip"]) > 0 and float(figures[f"{way}_trip_cpu"]) > 0
