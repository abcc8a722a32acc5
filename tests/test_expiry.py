"""Expiry by age, inside the filesystem, with an injected clock (hours pass in a file write)."""
import errno
import os
import subprocess
import time

import pytest

from conftest import wait_until

HOUR = 3600


@pytest.fixture
def clock(tmp_path, monkeypatch):
    """Seconds added to the daemon's wall clock; set() moves time for every mount made after."""
    path = tmp_path / "clock"
    path.write_text("0")
    monkeypatch.setenv("TEMPFS_TEST_CLOCK_FILE", str(path))

    class Clock:
        def set(self, seconds: float) -> None:
            path.write_text(str(seconds))
    return Clock()


def gone(path) -> bool:
    try:
        os.stat(path)
    except FileNotFoundError:
        return True
    return False


def vanishes(path) -> bool:
    """After a jump of the test clock the kernel may still hold the name in its cache until
    the reaper's next pass (at most a second) invalidates it; in real time the kernel's cache
    never outlives a deadline (see test_gone_at_once_in_real_time)."""
    return wait_until(lambda: gone(path), timeout=5)


def objects_on_disk(m) -> int:
    return sum(len(files) for _, _, files in os.walk(m.base / "store" / "objects"))


def test_file_expires_at_its_deadline_and_not_before(make_mount, clock):
    m = make_mount()
    f = m.path("cleanup/manual/job.tmp")  # cleanup/: 1 h
    f.write_bytes(os.urandom(300_000))
    clock.set(HOUR - 30)
    assert f.read_bytes() and "job.tmp" in os.listdir(f.parent)
    clock.set(HOUR + 30)
    assert vanishes(f)
    assert "job.tmp" not in os.listdir(f.parent)
    with pytest.raises(FileNotFoundError):
        open(f, "rb")
    # the reaper reclaims its space
    assert wait_until(lambda: m.status()["total"]["objects"] == 0, timeout=10)
    assert wait_until(lambda: objects_on_disk(m) == 0, timeout=10)
    assert "expired" in m.log_text()


def test_area_policies_differ(make_mount, clock):
    m = make_mount()
    files = {area: m.path(f"{area}/x") for area in ("processing", "cache", "sessions", "cleanup")}
    for f in files.values():
        f.write_text("x")
    clock.set(9 * HOUR)  # past sessions (8 h) and cleanup (1 h), not cache (12 h) or processing (24 h)
    assert vanishes(files["sessions"]) and vanishes(files["cleanup"])
    assert not gone(files["cache"]) and not gone(files["processing"])
    clock.set(13 * HOUR)
    assert vanishes(files["cache"])
    assert not gone(files["processing"])


def test_age_runs_from_the_last_change_not_from_mtime(make_mount, clock):
    m = make_mount()
    f = m.path("cleanup/scheduled/old.log")
    f.write_text("from an old archive")
    subprocess.run(["touch", "-d", "2 days ago", str(f)], check=True)  # tar x, cp -p do this
    assert not gone(f)
    clock.set(HOUR - 60)
    with open(f, "a") as out:  # a change: its life starts again
        out.write("more")
    clock.set(HOUR + 60)
    assert not gone(f)
    clock.set(2 * HOUR)
    assert vanishes(f)


def test_ttl_shortens_a_life_and_never_extends_it(make_mount, clock):
    m = make_mount()
    short, long_ = m.path("cache/data/short"), m.path("cleanup/manual/long")
    short.write_text("s")
    long_.write_text("l")
    subprocess.run(["setfattr", "-n", "user.tempfs.ttl", "-v", "600", str(short)], check=True)
    subprocess.run(["setfattr", "-n", "user.tempfs.ttl", "-v", str(30 * 24 * HOUR), str(long_)], check=True)
    expires = subprocess.run(["getfattr", "--only-values", "-n", "user.tempfs.expires", str(short)],
                             capture_output=True, text=True, check=True).stdout
    assert expires.endswith("Z") and "T" in expires
    for bad in ("abc", "-5", "0", ""):
        r = subprocess.run(["setfattr", "-n", "user.tempfs.ttl", "-v", bad, str(short)], capture_output=True, text=True)
        assert r.returncode != 0 and "Invalid argument" in r.stderr, (bad, r.stderr)
    clock.set(590)
    assert not gone(short)
    clock.set(610)
    assert vanishes(short)
    clock.set(HOUR + 10)  # the 30-day TTL did not outlive cleanup/'s hour
    assert vanishes(long_)


def test_read_only_tempfs_attributes_refuse_writes(mounted):
    f = mounted.path("cache/data/f")
    f.write_text("x")
    with pytest.raises(PermissionError):
        os.setxattr(f, "user.tempfs.expires", b"2099-01-01T00:00:00Z")
    with pytest.raises(PermissionError):
        os.setxattr(mounted.path("cache/data"), "user.tempfs.ttl", b"60")  # schema folders never expire


def test_open_file_outlives_its_deadline_until_closed(make_mount, clock):
    m = make_mount()
    f = m.path("cleanup/failed/busy.bin")
    data = os.urandom(200_000)
    f.write_bytes(data)
    with open(f, "rb") as held:
        clock.set(2 * HOUR)
        time.sleep(1.5)  # a reaper pass happens meanwhile
        assert held.read() == data
        assert not gone(f)
    assert wait_until(lambda: gone(f), timeout=10)


def test_created_folders_go_when_empty_and_due_schema_folders_never(make_mount, clock):
    m = make_mount()
    deep = m.path("cleanup/manual/batch/a/b")
    deep.mkdir(parents=True)
    (deep / "f").write_text("x")
    clock.set(10 * 24 * HOUR)
    assert wait_until(lambda: gone(m.path("cleanup/manual/batch")), timeout=10)
    assert sorted(os.listdir(m.mnt)) == ["cache", "cleanup", "processing", "sessions"]
    assert sorted(os.listdir(m.path("cleanup"))) == ["failed", "manual", "scheduled"]


def test_deduplicated_content_stays_while_a_copy_lives(make_mount, clock):
    m = make_mount()
    data = os.urandom(1_000_000)
    a, b = m.path("cleanup/manual/a"), m.path("cache/data/b")
    a.write_bytes(data)
    b.write_bytes(data)
    clock.set(2 * HOUR)  # a (1 h) expires, b (12 h) lives
    assert vanishes(a)
    assert wait_until(lambda: "expired" in m.log_text(), timeout=10)
    assert b.read_bytes() == data
    m.remount()
    assert b.read_bytes() == data


def test_deadlines_survive_a_remount_and_downtime_expires_at_once(make_mount, clock):
    m = make_mount()
    f = m.path("sessions/user_sessions/user_session_sess123.json")
    f.write_text('{"user": 1}')
    m.stop()
    clock.set(9 * HOUR)  # the machine was off for 9 hours
    m.start()
    assert vanishes(f)
    assert wait_until(lambda: m.status()["total"]["files"] == 0, timeout=10)


def test_expired_name_can_be_reused_at_once(make_mount, clock):
    m = make_mount()
    f = m.path("cleanup/manual/report.txt")
    f.write_text("old")
    clock.set(2 * HOUR)
    assert vanishes(f)
    f.write_text("new")
    assert f.read_text() == "new"
    with pytest.raises(OSError) as e:
        os.mkdir(f)
    assert e.value.errno == errno.EEXIST


@pytest.mark.timeout(60)
def test_a_reclaimed_file_cannot_be_opened_again_through_a_reference_the_kernel_kept(make_mount, clock):
    """Reclaiming a closed file frees its content at once. The kernel can still reach the inode
    (an O_PATH descriptor here; in the soak test, a name it had not dropped yet when an eviction
    raced an open): opening it must fail, not read as an empty or short file."""
    m = make_mount()
    f = m.path("cleanup/failed/frame.bin")
    f.write_bytes(os.urandom(300_000))
    handle = os.open(f, os.O_PATH)  # holds the inode without opening it for tempfs
    try:
        clock.set(2 * HOUR)
        assert vanishes(f)
        with pytest.raises(FileNotFoundError):
            open(f"/proc/self/fd/{handle}", "rb")
    finally:
        os.close(handle)


def test_gone_at_once_in_real_time(make_mount):
    """No clock tricks: the kernel may cache a name only until its deadline, so the moment it
    passes, stat and open fail, even before the reaper has reclaimed anything."""
    m = make_mount('[policy.cleanup]\nmax_age = "3s"\n')
    f = m.path("cleanup/manual/short-lived")
    f.write_text("x")
    os.stat(f)  # the kernel now caches the entry
    created = time.monotonic()
    while time.monotonic() - created < 2.5:
        assert not gone(f)
        time.sleep(0.2)
    while time.monotonic() - created < 3.5:
        time.sleep(0.05)
    assert gone(f)
    with pytest.raises(FileNotFoundError):
        open(f)


def test_the_periodic_whole_store_check_runs_when_due_and_repairs(make_mount, clock):
    m = make_mount('[check]\ninterval = "30s"\n')
    data = os.urandom(300_000)
    m.path("processing/common/uploads/x").write_bytes(data)
    # an object file no metadata refers to, as a crash between writing and committing leaves
    orphan = m.base / "store" / "objects" / "1b" / "1bcd000000000001"
    orphan.parent.mkdir(parents=True, exist_ok=True)
    orphan.write_bytes(os.urandom(500))
    time.sleep(1.5)  # the daemon looks every second: not due yet
    assert orphan.exists() and m.status()["daemon"]["last_check"] is None
    assert wait_until(lambda: m.status()["daemon"]["dirty_bytes"] == 0, timeout=10)
    clock.set(60)
    assert wait_until(lambda: m.status()["daemon"]["last_check"] is not None, timeout=10)
    report = m.status()["daemon"]["last_check"]
    assert report["damaged"] == [] and report["objects_checked"] >= 3
    assert len(report["repaired"]) == 1 and "no object" in report["repaired"][0], report
    assert not orphan.exists()
    assert m.path("processing/common/uploads/x").read_bytes() == data
    # the next one is due a whole interval later, and the time survives a remount
    m.remount()
    time.sleep(1.5)
    assert m.status()["daemon"]["last_check"] is None
    clock.set(100)
    assert wait_until(lambda: m.status()["daemon"]["last_check"] is not None, timeout=10)
    assert m.status()["daemon"]["last_check"]["clean"]
