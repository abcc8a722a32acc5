"""The reclaimer: what deleted files held is freed after the unlink, soon, and before room is judged."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tempfs.store import reclaim
from tempfs.store.reclaim import ReclaimQueue

from conftest import wait_until

pytestmark = pytest.mark.timeout(120)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_oldest_asked_go_first_and_removal_wins():
    queue = ReclaimQueue(Clock())
    queue.ask(5, remove=False)
    queue.ask(3, remove=False)
    queue.ask(5, remove=True)   # the kernel forgot it meanwhile: its row goes too, still first
    queue.ask(3, remove=False)  # asked again: nothing changes
    queue.ask(9, remove=True)
    assert len(queue) == 3 and 3 in queue
    assert queue.take(2) == [(5, True), (3, False)]
    assert 5 not in queue and len(queue) == 1
    assert queue.take(10) == [(9, True)]
    assert queue.take(10) == [] and not queue


def test_it_is_due_when_quiet_when_old_or_past_the_backlog():
    clock = Clock()
    queue = ReclaimQueue(clock)
    assert not queue.due(quiet=True)  # nothing to do
    queue.ask(1, remove=True)
    assert queue.due(quiet=True)
    assert not queue.due(quiet=False)
    clock.now += reclaim.AGE - 0.01
    queue.ask(2, remove=True)  # a newer one does not make the first younger
    assert not queue.due(quiet=False)
    clock.now += 0.01
    assert queue.due(quiet=False)
    queue.take(1)
    assert not queue.due(quiet=False)  # what is left is young
    for ino in range(10, 10 + reclaim.BACKLOG):
        queue.ask(ino, remove=False)
    assert queue.due(quiet=False)


def _write_stored(path, data: bytes) -> None:
    """Writes a file and fsyncs it: stored, it counts in its area at its stored size."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _area(m, area: str) -> dict:
    return m.status()["areas"][area]


def test_deleted_files_are_freed_by_the_reclaimer_once_the_tree_is_quiet(mounted):
    folder = mounted.path("cache/data")
    for i in range(50):
        _write_stored(folder / f"f{i}", os.urandom(20_000))
    assert _area(mounted, "cache")["stored_bytes"] >= 50 * 20_000
    subprocess.run(["sh", "-c", f"rm {folder}/f*"], check=True)
    assert list(folder.iterdir()) == []
    assert wait_until(lambda: _area(mounted, "cache")["stored_bytes"] == 0, timeout=10)
    assert mounted.status()["daemon"]["reclaiming_files"] == 0


def test_requests_that_never_pause_do_not_hold_the_reclaimer_back_past_its_age(mounted):
    folder = mounted.path("cache/data")
    for i in range(20):
        _write_stored(folder / f"f{i}", os.urandom(20_000))
    for i in range(20):
        os.unlink(folder / f"f{i}")
    # status is a request: asked every 5 ms, no pause of QUIET comes, so only AGE lets it work
    def waiting() -> int:
        return json.loads(os.getxattr(mounted.mnt, "user.tempfs.status"))["daemon"]["reclaiming_files"]
    assert waiting() == 20
    assert wait_until(lambda: waiting() == 0, timeout=10, interval=0.005)
    assert _area(mounted, "cache")["stored_bytes"] == 0


def test_a_full_area_frees_what_deleted_files_held_before_it_refuses(make_mount):
    """Files deleted a moment ago, not reclaimed yet, still count in their area: a write that
    needs their room gets it from them, not ENOSPC (sessions/ refuses when full)."""
    m = make_mount('[policy.sessions]\nmax_size = "1MB"\n')
    folder = m.path("sessions/user_sessions")
    for i in range(4):
        _write_stored(folder / f"old{i}", os.urandom(200_000))
    # deletes and the write at once, in one process: long before the reclaimer would look
    script = (f"import os\n"
              f"for i in range(4): os.unlink('{folder}/old%d' % i)\n"
              f"with open('{folder}/new', 'wb') as f:\n"
              f"    f.write(os.urandom(900_000)); f.flush(); os.fsync(f.fileno())\n")
    subprocess.run([sys.executable, "-c", script], check=True, timeout=60)
    assert sorted(p.name for p in folder.iterdir()) == ["new"]
    area = _area(m, "sessions")
    assert area["refused_full"] == 0 and area["evicted"] == 0
    assert 900_000 <= area["stored_bytes"] <= area["limit_bytes"]
