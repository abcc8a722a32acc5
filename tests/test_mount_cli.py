"""`tempfs mount` / `umount` / `status`: bad input gets a clear error and loses nothing.

Exit codes of `tempfs mount`: 0 ok; 1 unexpected; 2 usage; 3 config error; 4 key
error; 5 store locked; 6 mountpoint problem; 7 FUSE unavailable.  Each failure
prints one line on stderr.  After every failed mount the store is unchanged.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shlex
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import (AREAS, _ALL_PIDS, fuse_mounts_under, fusermount, is_tempfs_mounted,
                      kill_pid, mountinfo, pid_alive, pids_with_arg, run_tempfs, tail,
                      tempfs_env, wait_until)

MiB = 1024 * 1024
UPLOADS = "processing/common/uploads"


# ------------------------------------------------------------------ helpers


def store_snapshot(store: Path) -> dict:
    """Every entry under the store: type, mode, size and content hash."""
    snap = {}
    for p in sorted(store.rglob("*")):
        st = p.lstat()
        entry = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode))
        if p.is_file():
            entry += (st.st_size, hashlib.sha256(p.read_bytes()).hexdigest())
        snap[str(p.relative_to(store))] = entry
    return snap


def assert_failure(result, code: int, *words: str):
    """(rc, stdout, stderr) from a failed mount: the exit code, one line on stderr,
    and each of `words` (case-insensitive) in that line."""
    rc, out, err = result
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == code, f"exit {rc}, expected {code}; stderr: {err!r}; stdout: {out!r}"
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{err}"
    for w in words:
        assert w.lower() in lines[0].lower(), f"{w!r} not in the message: {lines[0]!r}"
    return lines[0]


@pytest.fixture
def existing(make_mount):
    """A store that was mounted once, holds two files, and is now unmounted."""
    m = make_mount()
    with open(m.path(UPLOADS, "kept.bin"), "wb") as f:
        f.write(b"kept " * 10_000)
        f.flush()  # Python buffers up to st_blksize
        os.fsync(f.fileno())
    m.path("cache/models/model.cache").write_bytes(os.urandom(200_000))
    assert m.stop(), tail(m.log_text())
    assert m.key_file.exists()
    return m


def check_existing_intact(m):
    """Mount it again: the data is all there."""
    m.start()
    assert m.path(UPLOADS, "kept.bin").read_bytes() == b"kept " * 10_000
    assert m.path("cache/models/model.cache").stat().st_size == 200_000
    assert m.stop()


# ------------------------------------------------------------------ first use


def test_first_mount_creates_key_and_config(make_mount):
    m = make_mount(config_text=None, start=False)
    assert not m.config.exists() and not m.key_file.exists()
    m.start()
    assert sorted(os.listdir(m.mnt)) == AREAS
    assert m.key_file.exists()
    assert stat.S_IMODE(m.key_file.stat().st_mode) == 0o600
    assert m.config.exists()
    assert (m.store / "meta.sqlite").exists()
    assert m.stop()
    # the config written with defaults mounts again unchanged
    cfg = m.config.read_bytes()
    m.start()
    assert m.stop()
    assert m.config.read_bytes() == cfg


# ------------------------------------------------------------------ key errors


def test_wrong_key_for_an_existing_store(existing, make_mount):
    other = make_mount(name="other")  # a second store, with its own fresh key
    assert other.stop()
    assert other.key_file.read_bytes() != existing.key_file.read_bytes()
    before = store_snapshot(existing.store)
    res = existing.mount_expect_failure(key_file=other.key_file)
    assert_failure(res, 4, "key")
    assert store_snapshot(existing.store) == before
    assert not is_tempfs_mounted(existing.mnt)
    check_existing_intact(existing)


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604])
def test_key_file_readable_by_others(existing, mode):
    os.chmod(existing.key_file, mode)
    before = store_snapshot(existing.store)
    key = existing.key_file.read_bytes()
    res = existing.mount_expect_failure()
    assert_failure(res, 4, "key")
    assert store_snapshot(existing.store) == before
    assert existing.key_file.read_bytes() == key
    assert stat.S_IMODE(existing.key_file.stat().st_mode) == mode  # not silently "fixed"
    os.chmod(existing.key_file, 0o600)
    check_existing_intact(existing)


def test_missing_key_for_an_existing_store(existing):
    saved = existing.key_file.with_name("saved.key")
    existing.key_file.rename(saved)
    before = store_snapshot(existing.store)
    res = existing.mount_expect_failure()
    assert_failure(res, 4, "key")
    assert store_snapshot(existing.store) == before
    assert not existing.key_file.exists(), "a new key was made for an existing store"
    saved.rename(existing.key_file)
    check_existing_intact(existing)


@pytest.mark.parametrize("where", ["store", "mount"])
def test_key_inside_the_store_or_the_mount_is_refused(make_mount, where):
    m = make_mount(start=False)
    m.store.mkdir()
    key = (m.store if where == "store" else m.mnt) / "tempfs.key"
    res = m.mount_expect_failure(key_file=key)
    assert_failure(res, 4, "key")
    assert not key.exists()


# ------------------------------------------------------------------ lock and mountpoint


def test_store_locked_by_a_running_mount(make_mount):
    m = make_mount()
    (m.path(UPLOADS, "live.txt")).write_text("still here")
    second_mnt = m.base / "mnt2"
    second_mnt.mkdir()
    res = m.mount_expect_failure(mnt=second_mnt)
    assert_failure(res, 5)
    assert not fuse_mounts_under(second_mnt)
    # the running mount is unharmed
    assert m.proc.poll() is None
    assert (m.path(UPLOADS, "live.txt")).read_text() == "still here"
    assert sorted(os.listdir(m.mnt)) == AREAS


def test_mountpoint_missing(existing):
    before = store_snapshot(existing.store)
    missing = existing.base / "does-not-exist"
    res = existing.mount_expect_failure(mnt=missing)
    assert_failure(res, 6)
    assert not missing.exists(), "the missing mountpoint was created"
    assert store_snapshot(existing.store) == before


def test_mountpoint_not_a_directory(existing):
    before = store_snapshot(existing.store)
    f = existing.base / "a-file"
    f.write_text("x")
    res = existing.mount_expect_failure(mnt=f)
    assert_failure(res, 6)
    assert f.read_text() == "x"
    assert store_snapshot(existing.store) == before


def test_mountpoint_not_empty_and_allow_nonempty(existing):
    hidden = existing.mnt / "precious.txt"
    hidden.write_text("do not hide me")
    before = store_snapshot(existing.store)
    res = existing.mount_expect_failure()
    assert_failure(res, 6)
    assert store_snapshot(existing.store) == before
    assert hidden.read_text() == "do not hide me"
    existing.start("--allow-nonempty")
    assert sorted(os.listdir(existing.mnt)) == AREAS
    assert existing.path(UPLOADS, "kept.bin").read_bytes() == b"kept " * 10_000
    assert existing.stop()
    assert hidden.read_text() == "do not hide me"


def test_mountpoint_already_a_live_mount(make_mount):
    m = make_mount()
    other = make_mount(name="other", start=False)
    res = other.mount_expect_failure(mnt=m.mnt)
    assert_failure(res, 6)
    assert [mp for mp, fs in mountinfo() if mp == str(m.mnt)] == [str(m.mnt)]
    assert sorted(os.listdir(m.mnt)) == AREAS
    assert m.proc.poll() is None


def test_fuse_unavailable(existing):
    """/dev/fuse hidden in a private mount namespace -> exit 7."""
    before = store_snapshot(existing.store)
    mount_cmd = [sys.executable, "-m", "tempfs", *existing.mount_args(), "--foreground"]
    script = ("set -e; mount -t tmpfs tmpfs /dev; "
              "mknod -m 666 /dev/null c 1 3; mknod -m 666 /dev/zero c 1 5; "
              "mknod -m 666 /dev/random c 1 8; mknod -m 666 /dev/urandom c 1 9; "
              "ln -s /proc/self/fd /dev/fd; "
              "exec " + shlex.join(mount_cmd))
    r = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                       capture_output=True, text=True, timeout=60, env=tempfs_env(),
                       cwd=existing.base)
    if r.returncode != 0 and "unshare" in r.stderr and "Operation not permitted" in r.stderr:
        pytest.skip("cannot make a private mount namespace here")
    assert not is_tempfs_mounted(existing.mnt)
    assert_failure((r.returncode, r.stdout, r.stderr), 7, "fuse")
    assert store_snapshot(existing.store) == before


# ------------------------------------------------------------------ config errors


def test_malformed_config_names_the_line(existing):
    existing.config.write_text('[policy.cache]\nmax_age = "12h"\nmax_size = \n[memory]\n')
    before = store_snapshot(existing.store)
    res = existing.mount_expect_failure()
    line = assert_failure(res, 3)
    assert re.search(r"line\D{0,3}3\b|:3\b", line), f"no line number 3 in {line!r}"
    assert str(existing.config) in line or existing.config.name in line
    assert store_snapshot(existing.store) == before


def test_invalid_config_value_names_the_key_and_line(existing):
    existing.config.write_text('[policy.cache]\nmax_age = "12h"\n\nmax_size = "lots"\n')
    before = store_snapshot(existing.store)
    res = existing.mount_expect_failure()
    line = assert_failure(res, 3, "max_size")
    assert re.search(r"line\D{0,3}4\b|:4\b", line), f"no line number 4 in {line!r}"
    assert store_snapshot(existing.store) == before


def test_config_with_values_mounts(make_mount):
    m = make_mount(config_text='[policy.cache]\nmax_age = "12h"\nmax_size = "5000MB"\n'
                               '[memory]\ndirty_limit = "64MB"\n')
    assert sorted(os.listdir(m.mnt)) == AREAS


def test_usage_error_exit_2(tmp_path):
    r = run_tempfs("mount", "--no-such-option", tmp_path, cwd=tmp_path)
    assert r.returncode == 2, (r.returncode, r.stderr)
    r = run_tempfs("frobnicate", cwd=tmp_path)
    assert r.returncode == 2, (r.returncode, r.stderr)


# ------------------------------------------------------------------ background mount, umount, status


def background_mount(m, *extra):
    """`tempfs mount` without --foreground; it must return once the mount is live
    (and the daemon must not hold the caller's stdout/stderr open)."""
    try:
        return run_tempfs(*m.mount_args(*extra), cwd=m.base, timeout=60)
    except subprocess.TimeoutExpired:
        daemons = pids_with_arg(str(m.mnt))
        _ALL_PIDS.update(daemons)
        pytest.fail("background `tempfs mount` did not return within 60 s (mounted: "
                    f"{is_tempfs_mounted(m.mnt)}); does the daemon keep the caller's "
                    "stdout/stderr pipes open?")


def test_background_mount_then_umount(make_mount):
    m = make_mount(start=False)
    bg_log = m.base / "bg.log"
    daemons: list[int] = []
    try:
        r = background_mount(m, "--log-file", bg_log)
        assert r.returncode == 0, f"{r.returncode}: {r.stderr}"
        # it returned only once the mount was live
        assert is_tempfs_mounted(m.mnt), "background mount returned before the mount was live"
        daemons = pids_with_arg(str(m.mnt))
        _ALL_PIDS.update(daemons)
        assert daemons, "no daemon process found for the mount"
        assert str(bg_log) in r.stdout, f"log file not named on stdout: {r.stdout!r}"
        assert sorted(os.listdir(m.mnt)) == AREAS
        m.path(UPLOADS, "bg.txt").write_text("written in the background mount")
        r = run_tempfs("umount", m.mnt, cwd=m.base, timeout=60)
        assert r.returncode == 0, f"umount: {r.returncode}: {r.stderr}"
        assert not is_tempfs_mounted(m.mnt)
        assert not any(pid_alive(p) for p in daemons), "daemon still running after umount"
        assert bg_log.exists()
        for named_paths in (bg_log, bg_log.with_name("bg-events.jsonl")):  # for the owner only
            assert named_paths.stat().st_mode & 0o077 == 0, named_paths
    finally:
        if any(mp == str(m.mnt) for mp, fs in mountinfo() if fs.startswith("fuse")):
            fusermount(m.mnt, lazy=True)
        for p in daemons:
            kill_pid(p)
    m.start()
    assert m.path(UPLOADS, "bg.txt").read_text() == "written in the background mount"


def test_umount_while_a_file_is_open_refuses_and_keeps_serving(mounted):
    f = mounted.path(UPLOADS, "held.txt")
    with open(f, "w") as held:
        held.write("held data")
        held.flush()
        r = run_tempfs("umount", mounted.mnt, cwd=mounted.base, timeout=60)
        assert r.returncode != 0, "umount succeeded while a file was open"
        assert len([line for line in r.stderr.splitlines() if line.strip()]) == 1, r.stderr
        assert "busy" in r.stderr.lower() or "open" in r.stderr.lower(), r.stderr
        assert mounted.proc.poll() is None
        held.write(" and more")
    assert f.read_text() == "held data and more"
    assert mounted.stop()


def test_umount_of_a_non_mount_fails(tmp_path):
    r = run_tempfs("umount", tmp_path, cwd=tmp_path)
    assert r.returncode != 0
    assert r.stderr.strip()


def test_status_json_shape(mounted):
    (mounted.path(UPLOADS, "a.bin")).write_bytes(b"a" * 100_000)
    (mounted.path(UPLOADS, "b.bin")).write_bytes(b"")
    (mounted.path("sessions/api_sessions/s.json")).write_bytes(b"{}" * 1000)
    with open(mounted.path("cache/images/x.jpg"), "wb") as f:
        f.write(os.urandom(300_000))
        f.flush()  # Python buffers up to st_blksize
        os.fsync(f.fileno())
    os.mkdir(mounted.path("cache/images/dir"))  # folders are not files
    status = mounted.status()
    assert set(status) >= {"areas", "total"}
    assert set(status["areas"]) == set(AREAS)
    for name, area in [*status["areas"].items(), ("total", status["total"])]:
        assert set(area) >= {"files", "logical_bytes", "stored_bytes"}, name
        for k in ("files", "logical_bytes", "stored_bytes"):
            assert isinstance(area[k], int) and area[k] >= 0, (name, k, area[k])
    a = status["areas"]
    assert (a["processing"]["files"], a["processing"]["logical_bytes"]) == (2, 100_000)
    assert (a["sessions"]["files"], a["sessions"]["logical_bytes"]) == (1, 2000)
    assert (a["cache"]["files"], a["cache"]["logical_bytes"]) == (1, 300_000)
    assert (a["cleanup"]["files"], a["cleanup"]["logical_bytes"]) == (0, 0)
    assert status["total"]["files"] == 4
    assert status["total"]["logical_bytes"] == 402_000
    # human-readable status works too and names the areas
    r = run_tempfs("status", mounted.mnt, cwd=mounted.base)
    assert r.returncode == 0, r.stderr
    for area in AREAS:
        assert area in r.stdout


def test_status_on_a_non_mount(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    for target in (empty, tmp_path / "missing"):
        r = run_tempfs("status", target, "--json", cwd=tmp_path)
        assert r.returncode != 0, r.stdout
        assert r.stderr.strip(), "no message on stderr"
        assert "mount" in r.stderr.lower()


# ------------------------------------------------------------------ crashes and corruption


def test_sigkill_then_mount_again(make_mount):
    m = make_mount()
    data = os.urandom(500_000)
    with open(m.path(UPLOADS, "durable.bin"), "wb") as f:
        f.write(data)
        f.flush()  # Python buffers up to st_blksize
        os.fsync(f.fileno())
    os.mkdir(m.path(UPLOADS, "dir"))
    with open(m.path(UPLOADS, "dir", "small.txt"), "wb") as f:
        f.write(b"small and synced")
        f.flush()  # Python buffers up to st_blksize
        os.fsync(f.fileno())
    os.kill(m.pid, signal.SIGKILL)
    m.proc.wait(timeout=10)
    # the stale mount: still in mountinfo, but dead
    assert is_tempfs_mounted(m.mnt)
    # (os.stat may still answer from the kernel's attribute cache; statfs always asks)
    with pytest.raises(OSError) as ei:
        os.statvfs(m.mnt)
    assert ei.value.errno == errno.ENOTCONN
    m.start()
    fuse_here = [mp for mp, fs in mountinfo() if mp == str(m.mnt) and fs.startswith("fuse")]
    assert len(fuse_here) == 1, f"stale mount not cleaned up: {fuse_here}"
    assert sorted(os.listdir(m.mnt)) == AREAS
    assert m.path(UPLOADS, "durable.bin").read_bytes() == data
    assert m.path(UPLOADS, "dir", "small.txt").read_bytes() == b"small and synced"
    # and it keeps working
    m.path(UPLOADS, "after.txt").write_text("after the crash")
    m.remount()
    assert m.path(UPLOADS, "after.txt").read_text() == "after the crash"


def test_sigkill_then_background_mount_again(make_mount):
    m = make_mount()
    with open(m.path("cache/data/d.txt"), "wb") as f:
        f.write(b"synced before the kill")
        f.flush()  # Python buffers up to st_blksize
        os.fsync(f.fileno())
    os.kill(m.pid, signal.SIGKILL)
    m.proc.wait(timeout=10)
    m.proc = None
    daemons = []
    try:
        r = background_mount(m, "--log-file", m.base / "bg.log")
        daemons = pids_with_arg(str(m.mnt))
        _ALL_PIDS.update(daemons)
        assert r.returncode == 0, f"{r.returncode}: {r.stderr}"
        assert m.path("cache/data/d.txt").read_bytes() == b"synced before the kill"
        r = run_tempfs("umount", m.mnt, cwd=m.base, timeout=60)
        assert r.returncode == 0, r.stderr
        assert not any(mp == str(m.mnt) for mp, fs in mountinfo() if fs.startswith("fuse"))
    finally:
        if any(mp == str(m.mnt) for mp, fs in mountinfo() if fs.startswith("fuse")):
            fusermount(m.mnt, lazy=True)
        for p in daemons:
            kill_pid(p)


def _packs(store: Path) -> dict[Path, int]:
    return {p: p.stat().st_size for p in (store / "packs").rglob("*") if p.is_file()}


def _write_and_find_objects(m, rel, data) -> dict[Path, tuple[int, int]]:
    """Write a file, fsync it, and return where its objects were appended: {pack: (start, end)}."""
    before = _packs(m.store)
    with open(m.path(rel), "wb") as f:
        f.write(data)
        f.flush()  # Python buffers up to st_blksize
        os.fsync(f.fileno())
    return {pack: (before.get(pack, 0), size) for pack, size in _packs(m.store).items() if size != before.get(pack, 0)}


@pytest.mark.parametrize("damage", ["flip", "missing"])
def test_damaged_object_gives_eio_and_everything_else_works(make_mount, damage):
    m = make_mount()
    # the bystander is in another area, so in another pack: the victim's can go missing whole
    files = {f"{UPLOADS}/victim.bin": os.urandom(60_000),
             "cache/data/bystander.bin": os.urandom(60_000),
             "cache/data/other.txt": b"compressible line\n" * 3000}
    objects = {rel: _write_and_find_objects(m, rel, data) for rel, data in files.items()}
    victim = f"{UPLOADS}/victim.bin"
    assert objects[victim], f"fsync of {victim} appended no object under {m.store / 'packs'}"
    assert m.stop()
    for pack, (start, end) in objects[victim].items():
        if damage == "flip":
            raw = bytearray(pack.read_bytes())
            raw[(start + end) // 2] ^= 0x01
            pack.write_bytes(bytes(raw))
        else:
            pack.unlink()
    m.start()
    for _ in range(2):  # and again: the failure is not cached as good data
        with pytest.raises(OSError) as ei:
            m.path(victim).read_bytes()
        assert ei.value.errno == errno.EIO, ei.value
    text = m.wait_log(lambda t: "victim.bin" in t and "integrity" in t.lower())
    lines = [line for line in text.splitlines() if "victim.bin" in line]
    assert any("integrity" in line.lower() for line in lines), \
        f"no integrity error naming the file's path in the log:\n{tail(text)}"
    assert any(victim in line for line in lines), f"log does not name the path {victim}: {lines}"
    # the daemon is alive, other files read fine, metadata of the victim still works
    assert m.proc.poll() is None
    for rel, data in files.items():
        if rel != victim:
            assert m.path(rel).read_bytes() == data
    assert m.path(victim).stat().st_size == 60_000
    m.path(UPLOADS, "new.txt").write_text("new")
    assert m.path(UPLOADS, "new.txt").read_text() == "new"
    os.unlink(m.path(victim))  # a damaged file can be removed
    assert os.listdir(m.path(UPLOADS)) == ["new.txt"]
