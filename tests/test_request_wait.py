"""The request loop's wait (tempfs/request_wait.py): it takes a waiting request at once, spins
for one that comes soon, sleeps while a request is being handled, stops spinning when spins find
nothing and starts again when one does; through a real mount, `[requests] spin` sets it."""
from __future__ import annotations

import os
import threading
import time
from collections import Counter
from types import SimpleNamespace

import pyfuse3
import pytest
import trio
import trio.testing

from tempfs import request_wait, workers
from tempfs.daemon import _Daemon
from tempfs.request_wait import MISSES, PROBE_EVERY, ReaderLock, RequestWait, installed
from conftest import run_script
from test_metrics import free_port, scrape_ready, value

MS = 1e-3


@pytest.fixture
def pipe():
    r, w = os.pipe()
    yield r, w
    for fd in (r, w):
        try:
            os.close(fd)
        except OSError:
            pass


def wait_once(wait: RequestWait, fd: int) -> None:
    trio.run(wait.wait_readable, fd)
    os.read(fd, 1)


def wait_for_late_request(wait: RequestWait, pipe: tuple[int, int], delay: float) -> None:
    """One wait, for a request (a byte in the pipe) that another thread sends `delay` later."""
    r, w = pipe
    writer = threading.Thread(target=lambda: (time.sleep(delay), os.write(w, b"x")))
    writer.start()
    try:
        wait_once(wait, r)
    finally:
        writer.join()


def test_a_waiting_request_is_taken_without_spinning_or_sleeping(pipe):
    r, w = pipe
    wait = RequestWait(spin=50 * MS)
    os.write(w, b"x")
    wait_once(wait, r)
    assert wait.counts == {"waits_ready": 1}


def test_a_request_that_comes_during_the_spin_is_taken_without_sleeping(pipe):
    wait = RequestWait(spin=2.0)
    wait_for_late_request(wait, pipe, 20 * MS)
    assert wait.counts["waits_spun"] == 1 and wait.counts["waits_slept"] == 0
    assert 15 * MS < wait.counts["spin_ns"] / 1e9 < 2.0  # it stopped when the request came


def test_while_a_request_is_being_handled_it_sleeps_at_once(pipe):
    wait = RequestWait(spin=2.0, busy=lambda: True)
    wait_for_late_request(wait, pipe, 20 * MS)
    assert wait.counts == {"waits_slept": 1}


def test_without_a_spin_it_sleeps(pipe):
    wait = RequestWait(spin=0.0)
    wait_for_late_request(wait, pipe, 5 * MS)
    assert wait.counts == {"waits_slept": 1}


def test_spins_that_find_nothing_stop_spinning_until_a_probe_finds_a_request(pipe):
    r, w = pipe
    wait = RequestWait(spin=1 * MS)

    async def requests_after_each_spin(n: int) -> None:
        for _ in range(n):  # the request comes once the waiter sleeps, always too late for a spin
            async with trio.open_nursery() as nursery:
                nursery.start_soon(wait.wait_readable, r)
                await trio.sleep(2 * MS)
                os.write(w, b"x")
            os.read(r, 1)

    trio.run(requests_after_each_spin, MISSES)
    assert wait.counts["waits_slept"] == MISSES and wait.counts["waits_spun"] == 0
    spun_ns = wait.counts["spin_ns"]
    assert spun_ns >= MISSES * 1 * MS * 1e9

    trio.run(requests_after_each_spin, PROBE_EVERY - 1)  # stopped: these sleep at once
    assert wait.counts["spin_ns"] == spun_ns

    wait.spin = 2.0  # the probe: this one spins, and a request comes during it
    wait_for_late_request(wait, pipe, 20 * MS)
    assert wait.counts["waits_spun"] == 1

    wait_for_late_request(wait, pipe, 20 * MS)  # spinning again from the next wait on
    assert wait.counts["waits_spun"] == 2


def test_a_closed_device_polls_ready_so_the_loop_reads_it_and_ends(pipe):
    r, w = pipe
    os.close(w)  # as an unmounted FUSE device, it reads as ready (and then fails or ends)
    wait = RequestWait(spin=2.0)
    trio.run(wait.wait_readable, r)
    assert wait.counts == {"waits_ready": 1}


def test_the_reader_lock_is_held_by_one_task_and_goes_to_a_waiter_when_its_holder_blocks():
    order = []

    async def reader(lock: ReaderLock, name: str, until: trio.Event) -> None:
        async with lock:
            order.append(f"{name} in")
            await until.wait()  # a handler awaiting something, with the lock held
            order.append(f"{name} out")

    async def main() -> None:
        lock, release, free = ReaderLock(), trio.Event(), trio.Event()
        free.set()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader, lock, "a", release)
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(reader, lock, "b", free)
            await trio.testing.wait_all_tasks_blocked()
            assert order == ["a in"]  # b waits for the lock
            release.set()
        assert order == ["a in", "a out", "b in", "b out"]

    trio.run(main)


@pytest.mark.parametrize("every, others_ran_meanwhile", [(10.0, False), (0.0, True)])
def test_the_reader_lock_takes_a_checkpoint_only_when_the_last_is_old(monkeypatch, every, others_ran_meanwhile):
    monkeypatch.setattr(request_wait, "CHECKPOINT_EVERY", every)
    ran = []

    async def other() -> None:
        ran.append("other")

    async def main() -> None:
        lock = ReaderLock()
        async with trio.open_nursery() as nursery:
            async with lock:  # the first one always takes a checkpoint
                pass
            nursery.start_soon(other)
            for _ in range(100):  # a task answering request after request
                async with lock:
                    pass
            assert ran == (["other"] if others_ran_meanwhile else [])
        assert ran == ["other"]

    trio.run(main)


def test_pyfuse3_sees_trio_but_for_the_wait_and_gets_trio_back_after():
    wait = RequestWait(spin=50 * MS)
    with pytest.raises(RuntimeError):
        with installed(wait):
            assert pyfuse3.trio.lowlevel.wait_readable == wait.wait_readable
            assert pyfuse3.trio.Lock is ReaderLock
            assert pyfuse3.trio.lowlevel.current_task is trio.lowlevel.current_task
            assert pyfuse3.trio.open_nursery is trio.open_nursery
            raise RuntimeError("the loop ended with an error")
    assert pyfuse3.trio is trio
    assert request_wait.trio is trio


# ------------------------------------------------------------------ a real mount

def requests_through(m, files: int) -> bytes:
    """Creates, reads back and deletes small files, one request at a time."""
    data = os.urandom(4096)
    folder = m.path("cache/data")
    for i in range(files):
        (folder / f"f{i}").write_bytes(data)
    for i in range(files):
        assert (folder / f"f{i}").read_bytes() == data
        os.unlink(folder / f"f{i}")
    return data


@pytest.mark.parametrize("spin", ["5ms", "0"])
def test_the_config_sets_the_spin_and_metrics_show_how_each_wait_ended(make_mount, spin):
    port = free_port()
    m = make_mount(f'[requests]\nspin = "{spin}"\n', extra=("--metrics-addr", f"127.0.0.1:{port}"))
    requests_through(m, 200)
    samples = scrape_ready(port)
    waits = {how: value(samples, "tempfs_request_waits_total", how=how) for how in ("ready", "spun", "slept")}
    spun_seconds = value(samples, "tempfs_request_spin_seconds_total")
    assert sum(waits.values()) >= 200 * 5  # lookup, create, write, release, ... per file
    if spin == "0":
        assert waits["spun"] == 0 and spun_seconds == 0
    else:
        assert waits["spun"] > 0 and spun_seconds > 0
    assert not list(m.path("cache/data").iterdir())


def test_the_daemon_counts_a_handler_or_a_worker_thread_at_work_as_busy():
    ops = SimpleNamespace(in_flight=0, monitor=SimpleNamespace(totals=Counter()))
    daemon = _Daemon(store=None, ops=ops, mountpoint=None, check_interval=1.0, request_spin=50e-6)

    async def main() -> None:
        wait = daemon._request_wait()
        assert not wait.busy()
        ops.in_flight = 1
        assert wait.busy()
        ops.in_flight = 0
        release = threading.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(workers.run_sync, release.wait)
            await trio.sleep(0.05)
            assert wait.busy()
            release.set()
        assert not wait.busy()

    trio.run(main)


def test_the_paced_benchmark_measures_a_mount_and_leaves_nothing(make_mount, tmp_path):
    (tmp_path / "script").mkdir()
    m = make_mount()
    r, figures = run_script("bench_paced.py", str(m.path("cache/data")), "--pid", str(m.pid), "--pauses", "0,100",
                            "--loops", "200", tmp_path=tmp_path / "script")
    assert r.returncode == 0, r.stderr
    for pause in ("0", "100"):
        assert float(figures[f"pause_{pause}us"]) > 0 and float(figures[f"pause_{pause}us_daemon_cpu"]) >= 0
    assert float(figures["pause_100us"]) < 1e6 / 100  # the pause is kept
    assert not list(m.path("cache/data").iterdir())


def test_on_one_cpu_the_daemon_sleeps_between_requests(make_mount):
    port = free_port()
    allowed = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(allowed)})  # the daemon inherits it
    try:
        m = make_mount('[requests]\nspin = "5ms"\n', extra=("--metrics-addr", f"127.0.0.1:{port}"))
    finally:
        os.sched_setaffinity(0, allowed)
    requests_through(m, 50)
    samples = scrape_ready(port)
    assert value(samples, "tempfs_request_waits_total", how="spun") == 0
    assert value(samples, "tempfs_request_spin_seconds_total") == 0
    assert "one CPU to run on" in m.log_text()
