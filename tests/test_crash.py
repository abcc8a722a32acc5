"""Crashes: the quick store check that a mount runs after an unclean shutdown, and a few cycles
of scripts/crashtest.py (SIGKILL of the daemon under writers, remount, every promise checked).
"""
from __future__ import annotations

import os
import re
import signal

import pytest

from conftest import run_script, run_tempfs, tail

UPLOADS = "processing/common/uploads"
QUICK_CHECK = "not closed cleanly"  # what the daemon logs when it runs the quick check


def _sigkill(m) -> None:
    os.kill(m.pid, signal.SIGKILL)
    m.proc.wait(timeout=10)


def _plant_orphan(store, pack_id: int, size: int = 3000):
    """A pack that no metadata points into, as a crash between appending objects and committing
    their rows leaves."""
    path = store / "packs" / f"{pack_id:016x}"  # a store's layout since schema 6
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(os.urandom(size))
    return path


def _synced(path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def test_mount_after_sigkill_runs_the_quick_check_and_removes_orphans(make_mount):
    m = make_mount()
    data = os.urandom(300_000)
    _synced(m.path(UPLOADS, "kept.bin"), data)
    _sigkill(m)
    orphan = _plant_orphan(m.store, 0x0123456789ABCDEF)
    m.start()
    text = m.wait_log(lambda t: "quick store check after an unclean shutdown" in t)
    assert QUICK_CHECK in text, tail(text)
    summary = [line for line in text.splitlines() if "quick store check after an unclean shutdown:" in line]
    assert summary and re.search(r"\b1 repaired, 0 damaged\b", summary[-1]), summary
    assert "1 packs (3000 bytes) held no live object" in text, tail(text)
    assert not orphan.exists()
    assert m.path(UPLOADS, "kept.bin").read_bytes() == data
    last = m.status()["daemon"]["last_check"]
    assert last["kind"] == "quick, after an unclean shutdown" and last["bytes_checked"] == 0
    assert len(last["repaired"]) == 1 and not last["damaged"]

    # the check has run: a clean unmount marks the store clean, and the next mount does not
    # check (an orphan planted now stays where it is)
    assert m.stop()
    second = _plant_orphan(m.store, 0x0FEDCBA987654321)
    m.start()
    assert m.path(UPLOADS, "kept.bin").read_bytes() == data
    assert QUICK_CHECK not in m.log.read_text()
    assert second.exists()
    assert m.status()["daemon"]["last_check"] is None


def test_first_mount_and_clean_remount_do_not_check(make_mount):
    m = make_mount()
    assert QUICK_CHECK not in m.log.read_text()
    m.path(UPLOADS, "f").write_bytes(b"x")
    m.remount()
    assert QUICK_CHECK not in m.log_text()


def test_offline_fsck_after_a_crash_leaves_the_quick_check_to_the_mount(make_mount):
    """fsck --no-repair changes nothing, so the store stays marked unclean: the next mount still
    runs the quick check (and a killed quick-checked mount is unclean again)."""
    m = make_mount()
    _synced(m.path(UPLOADS, "a"), b"a" * 5000)
    _sigkill(m)
    orphan = _plant_orphan(m.store, 0x00AB00CD00EF0012)
    r = run_tempfs("fsck", "--store", m.store, "--key-file", m.key_file, "--config", m.config,
                   "--no-repair", "--quick", cwd=m.base)
    assert r.returncode == 10, r.stdout + r.stderr
    assert "hold no live object" in r.stdout
    assert orphan.exists()
    m.start()
    assert QUICK_CHECK in m.log.read_text()
    assert not orphan.exists()
    # killed again right after: unclean again
    _sigkill(m)
    m.start()
    assert QUICK_CHECK in m.log.read_text()
    assert m.path(UPLOADS, "a").read_bytes() == b"a" * 5000


@pytest.mark.timeout(150)
def test_crashtest_script_a_few_cycles(tmp_path):
    """scripts/crashtest.py: SIGKILL under writers, remount, check every promise, fsck clean."""
    r, figures = run_script("crashtest.py", "--cycles", "3", "--seed", "7", "--workdir", str(tmp_path / "crash"),
                            tmp_path=tmp_path)
    assert r.returncode == 0, f"exit {r.returncode}\n{tail(r.stdout, 60)}\n{tail(r.stderr, 60)}"
    assert figures.get("cycles") == "3", r.stdout
    assert figures.get("failures") == "0", r.stdout
    assert int(figures["promises_checked"]) >= 30, r.stdout
    assert int(figures["quick_checks_run"]) == 3, r.stdout
    assert int(figures["fsck_clean"]) == 3, r.stdout
