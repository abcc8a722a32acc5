"""Faults under the store and odd input through the mount.

Under the store: an object file that cannot be read, the metadata database held by another
process, a damaged database at mount, the store folder removed while mounted, and the disk
filling up with no floor configured (the floor's own test is in test_limits.py). Each gives a
clear error, logged, no crash, no wrong data, and tempfs recovers once the cause is gone.

Through the mount: names with every byte Linux allows, 255 and 256-byte names, paths up to
PATH_MAX and deeper, offsets near 2**63, zero-length writes, several processes writing one
file, 16 processes creating and deleting in one folder. Each behaves as ext4 (pytest's tmp_path
is on the host's root filesystem, ext4 here; `fstype` names it in the messages) or, where ext4
differs by its own limits (a 16 TiB file), as tmpfs.
"""
from __future__ import annotations

import errno
import json
import multiprocessing
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import fusermount, run_tempfs, tail, wait_until

UPLOADS = "processing/common/uploads"
MiB = 1024 * 1024


# ------------------------------------------------------------------ helpers

def synced(path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def outcome(fn):
    """("ok", result) or ("err", errno name): what a call gives, to compare two filesystems."""
    try:
        return ("ok", fn())
    except OSError as e:
        return ("err", errno.errorcode.get(e.errno, e.errno))


def fstype(path) -> str:
    """The type of the filesystem holding `path` (the longest mountpoint above it)."""
    path, best, kind = os.path.realpath(path), "", "?"
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            mp = left.split()[4]
            if (path + "/").startswith(mp.rstrip("/") + "/") and len(mp) >= len(best):
                best, kind = mp, right.split()[0]
    return kind


def fsck(m, *extra) -> subprocess.CompletedProcess:
    return run_tempfs("fsck", "--store", m.store, "--key-file", m.key_file, "--config", m.config,
                      "--no-repair", *extra, cwd=m.base, timeout=120)


def assert_fsck_clean(m) -> None:
    r = fsck(m)
    assert r.returncode == 0, f"fsck exited {r.returncode}:\n{r.stdout}{r.stderr}"


def packs_of(store: Path) -> set[Path]:
    return {p for p in (store / "packs").rglob("*") if p.is_file()}


def no_traceback(m) -> None:
    text = m.log_text()
    assert "Traceback" not in text, tail(text, 60)


def mount_tmpfs(where: Path, size: str) -> None:
    where.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", where], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"mounting a tmpfs needs privilege: {r.stderr.strip()}")


def umount_tmpfs(where: Path) -> None:
    if subprocess.run(["umount", where], capture_output=True).returncode != 0:
        subprocess.run(["umount", "-l", where], capture_output=True)


# ------------------------------------------------------------------ under the store

@pytest.mark.parametrize("damage", ["directory", "truncated", "emptied"])
def test_unreadable_pack_is_eio_logged_and_the_rest_works(make_mount, damage):
    """(A missing or bit-flipped object is test_mount_cli's; chmod 000 means nothing to root.)"""
    m = make_mount()
    # each area appends to packs of its own: the other file's content is not in the victim's
    victim, other = m.path(UPLOADS, "victim.bin"), m.path("cache/data/other.bin")
    data = {victim: os.urandom(200_000), other: os.urandom(200_000)}
    before = packs_of(m.store)
    synced(victim, data[victim])
    mine = packs_of(m.store) - before
    synced(other, data[other])
    assert mine
    assert m.stop()
    for obj in mine:
        if damage == "directory":  # open() fails: EISDIR, an I/O error of the store
            obj.unlink()
            obj.mkdir()
        else:
            raw = obj.read_bytes()
            obj.write_bytes(raw[:len(raw) // 2] if damage == "truncated" else b"")
    m.start()
    for _ in range(2):
        with pytest.raises(OSError) as ei:
            victim.read_bytes()
        assert ei.value.errno == errno.EIO
    text = m.wait_log(lambda t: "integrity_error" in t)
    assert any("integrity_error" in line and f"/{UPLOADS}/victim.bin" in line for line in text.splitlines()), tail(text)
    assert m.proc.poll() is None
    assert other.read_bytes() == data[other]
    synced(m.path(UPLOADS, "new.bin"), b"new")
    alerts = [a["condition"] for a in m.status()["daemon"]["alerts"]]
    assert any(c.startswith("integrity:") for c in alerts), alerts
    assert m.stop()
    no_traceback(m)
    r = fsck(m)
    assert r.returncode == 10 and f"/{UPLOADS}/victim.bin" in r.stdout, r.stdout + r.stderr


def _hold_database(db: Path) -> subprocess.Popen:
    """Another process takes the metadata database's write lock (waiting for a moment between
    the daemon's commits) and holds it until told to quit."""
    p = subprocess.Popen(["sqlite3", str(db)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    p.stdin.write(".timeout 20000\nBEGIN EXCLUSIVE;\nSELECT 'locked';\n")
    p.stdin.flush()
    assert p.stdout.readline().strip() == "locked", p.stderr.read()
    return p


def _release(p: subprocess.Popen) -> None:
    if p.poll() is None:
        p.stdin.write("ROLLBACK;\n.quit\n")
        p.stdin.flush()
        p.wait(timeout=10)


@pytest.mark.timeout(150)
def test_database_held_by_another_process_while_mounted(make_mount):
    """Requests that need the database fail with EIO after SQLite's wait (5 s), logged on one
    line; written data waits in memory (its storing is retried, leaving no object file behind);
    once the lock is gone everything lands and works; the daemon never stops."""
    m = make_mount()
    before, pending = os.urandom(300_000), os.urandom(300_000)
    synced(m.path(UPLOADS, "before.bin"), before)
    m.path(UPLOADS, "pending.bin").write_bytes(pending)  # not synced: dirty in memory
    holder = _hold_database(m.store / "meta.sqlite")
    try:
        started = time.monotonic()
        with pytest.raises(OSError) as ei:
            m.path(UPLOADS, "during.bin").write_bytes(b"during")
        assert ei.value.errno == errno.EIO
        assert time.monotonic() - started < 60
        m.wait_log(lambda t: "cannot store written data (database is locked)" in t, timeout=20)
        assert m.proc.poll() is None, tail(m.log_text())
    finally:
        _release(holder)
    assert m.path(UPLOADS, "before.bin").read_bytes() == before
    synced(m.path(UPLOADS, "after.bin"), b"after")
    text = m.log_text()
    assert "failed: the metadata database: database is locked" in text, tail(text)
    assert "cannot store written data (database is locked)" in text, tail(text)
    m.remount()
    assert m.path(UPLOADS, "pending.bin").read_bytes() == pending
    assert m.path(UPLOADS, "after.bin").read_bytes() == b"after"
    assert not m.path(UPLOADS, "during.bin").exists()
    assert m.stop()
    no_traceback(m)
    assert_fsck_clean(m)  # the objects sealed while the database refused them are gone


@pytest.mark.timeout(150)
def test_unmount_while_another_process_holds_the_database_waits_for_it(make_mount):
    m = make_mount()
    pending = os.urandom(500_000)
    m.path(UPLOADS, "pending.bin").write_bytes(pending)  # dirty: stored at unmount
    holder = _hold_database(m.store / "meta.sqlite")
    try:
        assert fusermount(m.mnt).returncode == 0
        m.wait_log(lambda t: "unmounting: cannot store what was written yet" in t, timeout=30)
        assert m.proc.poll() is None  # still waiting for the database, not gone without the data
    finally:
        _release(holder)
    assert m.proc.wait(timeout=60) == 0, tail(m.log_text())
    m.start()
    assert m.path(UPLOADS, "pending.bin").read_bytes() == pending
    assert m.stop()
    no_traceback(m)
    assert_fsck_clean(m)


def _scramble(db: Path, first_page: int, last_page: int | None) -> None:
    raw = bytearray(db.read_bytes())
    rng = random.Random(first_page)
    end = len(raw) if last_page is None else min(len(raw), last_page * 4096)
    for off in range(first_page * 4096, end):
        raw[off] = rng.randrange(256)
    db.write_bytes(bytes(raw))


@pytest.mark.parametrize("damage", ["header", "every-page-but-the-first", "some-pages", "half", "empty"])
def test_damaged_database_at_mount_is_a_clear_message(make_mount, damage):
    m = make_mount()
    for i in range(300):
        m.path(UPLOADS, f"f{i}").write_bytes(os.urandom(50) * (i % 7))
    assert m.stop()
    db = m.store / "meta.sqlite"
    if damage == "header":
        db.write_bytes(b"definitely not!!" + db.read_bytes()[16:])
    elif damage == "every-page-but-the-first":
        _scramble(db, 1, None)
    elif damage == "some-pages":
        _scramble(db, 3, 12)
    elif damage == "half":
        db.write_bytes(db.read_bytes()[:db.stat().st_size // 2])
    else:  # emptied: without it the objects cannot be read; a new store must not start over them
        db.write_bytes(b"")
    damaged = db.read_bytes()
    code, out, err = m.mount_expect_failure()
    assert code == 1, (code, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "meta.sqlite" in lines[0] and "database" in lines[0], err
    assert "Traceback" not in err
    no_traceback(m)
    if damage != "empty":
        assert db.read_bytes() == damaged  # left as it was, for whoever salvages it
    # fsck says the same, without a traceback either
    r = fsck(m)
    assert r.returncode == 1 and "meta.sqlite" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_store_folder_removed_while_mounted(make_mount):
    m = make_mount()
    data = os.urandom(200_000)
    synced(m.path(UPLOADS, "kept.bin"), data)
    shutil.rmtree(m.store)
    text = m.wait_log(lambda t: "was removed or replaced while mounted" in t, timeout=10)
    assert "was removed or replaced while mounted" in text, tail(text)
    for attempt in (lambda: m.path(UPLOADS, "kept.bin").read_bytes(),
                    lambda: synced(m.path(UPLOADS, "new.bin"), b"new"),
                    lambda: os.mkdir(m.path(UPLOADS, "folder")),
                    lambda: os.rename(m.path(UPLOADS, "kept.bin"), m.path(UPLOADS, "moved.bin")),
                    lambda: os.statvfs(m.mnt)):
        with pytest.raises(OSError) as ei:
            attempt()
        assert ei.value.errno == errno.EIO, ei.value
    assert "kept.bin" in os.listdir(m.path(UPLOADS))  # what the metadata still shows, unchanged
    status = m.status()
    assert "store_lost" in [a["condition"] for a in status["daemon"]["alerts"]]
    time.sleep(2.5)  # the flusher and the free-space watch run meanwhile
    assert m.proc.poll() is None, tail(m.log_text())
    assert not m.store.exists(), "a write made a new, stray store folder"
    assert m.log_text().count("was removed or replaced while mounted: every change") == 1
    assert m.stop()
    no_traceback(m)


def test_full_disk_without_a_floor_fails_writes_keeps_data_and_recovers(make_mount, tmp_path):
    """min_free = 0: the disk really fills (the floor's own test is test_limits.py's)."""
    disk = tmp_path / "disk"
    mount_tmpfs(disk, "48m")
    m = make_mount('[space]\nmin_free = "0"\n', start=False)
    m.store = disk / "store"
    try:
        m.start()
        kept = {m.path(UPLOADS, f"k{i}"): os.urandom(MiB) for i in range(3)}
        for path, data in kept.items():
            synced(path, data)
        subprocess.run(["dd", "if=/dev/zero", f"of={disk / 'filler'}", "bs=64K", "status=none"])
        assert os.statvfs(disk).f_bavail == 0
        with pytest.raises(OSError) as ei:
            synced(m.path(UPLOADS, "new.bin"), os.urandom(3 * MiB))
        assert ei.value.errno == errno.ENOSPC
        for path, data in kept.items():
            assert path.read_bytes() == data
        assert m.proc.poll() is None
        (disk / "filler").unlink()
        retry = os.urandom(3 * MiB)
        synced(m.path(UPLOADS, "new.bin"), retry)  # by itself, no remount
        # full again, with unsynced data at unmount: the unmount waits for room
        subprocess.run(["dd", "if=/dev/zero", f"of={disk / 'filler'}", "bs=64K", "status=none"])
        pending = os.urandom(MiB)
        m.path(UPLOADS, "pending.bin").write_bytes(pending)
        assert fusermount(m.mnt).returncode == 0
        m.wait_log(lambda t: "unmounting: cannot store what was written yet" in t, timeout=30)
        (disk / "filler").unlink()
        assert m.proc.wait(timeout=60) == 0, tail(m.log_text())
        m.start()
        for path, data in {**kept, m.path(UPLOADS, "new.bin"): retry, m.path(UPLOADS, "pending.bin"): pending}.items():
            assert path.read_bytes() == data, path
        assert m.stop()
        no_traceback(m)
        assert_fsck_clean(m)
    finally:
        m.stop()
        umount_tmpfs(disk)


# ------------------------------------------------------------------ odd names and paths

def _name_outcomes(folder: bytes) -> dict:
    out = {}
    every = bytes(b for b in range(1, 256) if b != ord("/"))  # 254 bytes: every byte a name may hold
    out["every byte"] = outcome(lambda: open(folder + b"/" + every, "wb").write(b"every"))
    for b in range(1, 256):
        if b != ord("/"):
            name = bytes([b])
            out[name] = outcome(lambda: open(folder + b"/" + name, "wb").write(name))
    out["dotdot"] = outcome(lambda: open(folder + b"/..", "wb"))
    long = b"\xff" * 255  # not UTF-8
    out["255 bytes"] = outcome(lambda: open(folder + b"/" + long, "wb").write(b"long"))
    out["255 folder"] = outcome(lambda: os.mkdir(folder + b"/" + b"\xfe" * 255))
    over = b"\xff" * 256
    for what, call in {"create": lambda: open(folder + b"/" + over, "wb"),
                       "mkdir": lambda: os.mkdir(folder + b"/" + over),
                       "stat": lambda: os.stat(folder + b"/" + over),
                       "unlink": lambda: os.unlink(folder + b"/" + over),
                       "symlink": lambda: os.symlink(b"x", folder + b"/" + over),
                       "link": lambda: os.link(folder + b"/" + long, folder + b"/" + over),
                       "rename": lambda: os.rename(folder + b"/" + long, folder + b"/" + over),
                       "long symlink target": lambda: os.symlink(over * 4, folder + b"/target")}.items():
        out[f"256 {what}"] = outcome(call)
    out["rename every byte"] = outcome(lambda: os.rename(folder + b"/" + every, folder + b"/" + every[::-1]))
    out["listing"] = sorted(os.listdir(folder))
    out["contents"] = {n: open(folder + b"/" + n, "rb").read() for n in out["listing"]
                       if os.path.isfile(folder + b"/" + n)}
    return out


def test_names_with_every_byte_and_the_length_limits_as_on_ext4(make_mount, tmp_path):
    m = make_mount()
    ref = tmp_path / "reference"
    ref.mkdir()
    expected = _name_outcomes(os.fsencode(ref))
    got = _name_outcomes(os.fsencode(m.path(UPLOADS)))
    assert len(expected["listing"]) == 257  # 253 one-byte names, every byte, 255 bytes, 255 folder, target
    differ = {k: (got.get(k), v) for k, v in expected.items() if got.get(k) != v}
    assert not differ, f"tempfs vs {fstype(ref)} (tempfs, reference): {differ}"
    m.remount()  # names survive a remount byte for byte
    folder = os.fsencode(m.path(UPLOADS))
    assert sorted(os.listdir(folder)) == expected["listing"]
    assert {n: open(folder + b"/" + n, "rb").read() for n in expected["contents"]} == expected["contents"]
    assert m.stop()
    assert_fsck_clean(m)


def _create_at(folder_fd: int, name: str, data: bytes) -> int:
    fd = os.open(name, os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=folder_fd)
    try:
        return os.write(fd, data)
    finally:
        os.close(fd)


def _deep_outcomes(top: Path) -> dict:
    """A tree as deep as PATH_MAX allows by path, then deeper through folder descriptors."""
    out = {}
    part = "d" * 200
    fd = os.open(top, os.O_RDONLY)
    path = str(top)
    try:
        while len(path) + 1 + len(part) + 2 < 4096:
            os.mkdir(part, dir_fd=fd)
            fd2 = os.open(part, os.O_RDONLY, dir_fd=fd)
            os.close(fd)
            fd, path = fd2, f"{path}/{part}"
        name = "f" * (4095 - len(path) - 1)
        full = f"{path}/{name}"  # 4095 bytes: the longest path a call takes (PATH_MAX with its NUL)
        out["create at 4095"] = outcome(lambda: open(full, "w").write("deep"))
        out["read at 4095"] = outcome(lambda: open(full).read())
        out["stat at 4096"] = outcome(lambda: os.stat(full + "x"))
        out["create at 4096"] = outcome(lambda: open(full + "x", "w"))
        for _ in range(25):  # another 5000 bytes deeper
            os.mkdir(part, dir_fd=fd)
            fd2 = os.open(part, os.O_RDONLY, dir_fd=fd)
            os.close(fd)
            fd = fd2
        out["create deeper"] = outcome(lambda: _create_at(fd, "x", b"deeper"))
        out["read deeper"] = outcome(lambda: open(f"/proc/self/fd/{fd}/x").read())
    finally:
        os.close(fd)
    r = subprocess.run(["find", str(top), "-name", "x"], capture_output=True, text=True)
    out["find"] = (r.returncode, len(r.stdout.splitlines()))
    return out


def test_paths_to_path_max_and_deeper_as_on_ext4(make_mount, tmp_path):
    m = make_mount()
    ref = tmp_path / "r"
    ref.mkdir()
    expected = _deep_outcomes(ref)
    top = m.path(UPLOADS, "deep")
    top.mkdir()
    got = _deep_outcomes(top)
    # paths differ in length: the file name at 4095 differs; outcomes must not
    assert got == expected, f"tempfs vs {fstype(ref)}: {got} != {expected}"
    assert expected["create at 4095"] == ("ok", 4) and expected["stat at 4096"] == ("err", "ENAMETOOLONG")
    m.remount()
    r = subprocess.run(["find", str(top), "-name", "x"], capture_output=True, text=True)
    assert (r.returncode, len(r.stdout.splitlines())) == (0, 1), r.stderr
    subprocess.run(["rm", "-rf", str(top)], check=True)
    assert not top.exists()
    assert m.stop()
    assert_fsck_clean(m)


def _offset_outcomes(folder: Path) -> dict:
    out = {}
    fd = os.open(folder / "big", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        top = 2**63 - 1  # MAX_LFS_FILESIZE: the most a file may hold on Linux
        out["pwrite 1 at 2**63-2"] = outcome(lambda: os.pwrite(fd, b"Z", top - 1))
        out["size"] = os.fstat(fd).st_size
        out["pread at 2**63-2"] = outcome(lambda: os.pread(fd, 10, top - 1))  # the kernel refuses: EINVAL
        out["pread at 0"] = outcome(lambda: os.pread(fd, 4, 0))
        out["pwrite 2 at 2**63-2"] = outcome(lambda: os.pwrite(fd, b"AB", top - 1))
        out["pwrite 1 at 2**63-1"] = outcome(lambda: os.pwrite(fd, b"Z", top))
        out["pwrite 1 at 2**62"] = outcome(lambda: os.pwrite(fd, b"Q", 2**62))
        out["pread at 2**62"] = outcome(lambda: os.pread(fd, 2, 2**62))
        out["lseek end"] = outcome(lambda: os.lseek(fd, 0, os.SEEK_END))
        out["fsync"] = outcome(lambda: os.fsync(fd))
    finally:
        os.close(fd)
    fd = os.open(folder / "big2", os.O_RDWR | os.O_CREAT, 0o644)
    out["ftruncate 2**63-1"] = outcome(lambda: os.ftruncate(fd, 2**63 - 1))
    os.close(fd)
    return out


def test_offsets_near_2_63_as_on_tmpfs(make_mount, tmp_path):
    """ext4 stops at 16 TiB (EFBIG); tmpfs, like tempfs, takes files up to 2**63-1 bytes."""
    m = make_mount()
    ref = tmp_path / "tmpfs"
    mount_tmpfs(ref, "16m")
    try:
        expected = _offset_outcomes(ref)
    finally:
        umount_tmpfs(ref)
    got = _offset_outcomes(m.path(UPLOADS))
    assert got == expected, f"tempfs vs tmpfs: {got} != {expected}"
    assert expected["size"] == 2**63 - 1 and expected["pwrite 1 at 2**63-1"] == ("err", "EINVAL")
    # two files that large: the area's logical bytes pass 2**63 (they saturate; status works)
    status = m.status()
    assert status["areas"]["processing"]["logical_bytes"] == 2**63 - 1
    assert run_tempfs("status", m.mnt, "--folders", cwd=m.base).returncode == 0
    m.remount()
    with open(m.path(UPLOADS, "big"), "rb") as f:
        assert os.pread(f.fileno(), 1, 2**63 - 2) == b"Z" and os.pread(f.fileno(), 1, 2**62) == b"Q"
    assert os.stat(m.path(UPLOADS, "big")).st_size == 2**63 - 1
    assert m.stop()
    assert_fsck_clean(m)
    no_traceback(m)


def _zero_outcomes(folder: Path) -> dict:
    path = folder / "zero"
    path.write_bytes(b"abc")
    before = os.stat(path)
    time.sleep(0.02)
    out = {}
    fd = os.open(path, os.O_WRONLY)
    out["write"] = outcome(lambda: os.write(fd, b""))
    out["pwrite far"] = outcome(lambda: os.pwrite(fd, b"", 10**12))
    out["writev"] = outcome(lambda: os.writev(fd, [b"", b""]))
    os.close(fd)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    out["append"] = outcome(lambda: os.write(fd, b""))
    os.close(fd)
    after = os.stat(path)
    out["unchanged"] = (after.st_size, after.st_mtime_ns == before.st_mtime_ns, after.st_ctime_ns == before.st_ctime_ns)
    out["content"] = path.read_bytes()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    out["empty file write"] = outcome(lambda: os.ftruncate(fd, 0) or os.write(fd, b""))
    os.close(fd)
    out["empty size"] = os.stat(path).st_size
    return out


def test_zero_length_writes_as_on_ext4(mounted, tmp_path):
    expected = _zero_outcomes(tmp_path)
    got = _zero_outcomes(mounted.path(UPLOADS))
    assert got == expected, f"tempfs vs {fstype(tmp_path)}: {got} != {expected}"
    assert expected["unchanged"] == (3, True, True)


# ------------------------------------------------------------------ several processes at once

STRIPE = 50_001   # not a divisor of the block: neighbours share blocks
WRITERS = 8
STRIPES_EACH = 40


def _stripe(s: int) -> bytes:
    return random.Random(s).randbytes(STRIPE)


def _write_stripes(path: str, me: int) -> None:
    fd = os.open(path, os.O_WRONLY)
    mine = list(range(me, WRITERS * STRIPES_EACH, WRITERS))
    random.Random(me).shuffle(mine)
    for k, s in enumerate(mine):
        assert os.pwrite(fd, _stripe(s), s * STRIPE) == STRIPE
        if k % 10 == 9:
            os.fsync(fd)
    os.fsync(fd)
    os.close(fd)


def test_several_processes_write_disjoint_ranges_of_one_file(mounted):
    path = mounted.path(UPLOADS, "shared.bin")
    path.write_bytes(b"")
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_write_stripes, args=(str(path), i)) for i in range(WRITERS)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=90)
    assert [p.exitcode for p in procs] == [0] * WRITERS
    expected = b"".join(_stripe(s) for s in range(WRITERS * STRIPES_EACH))
    assert path.read_bytes() == expected
    mounted.remount()
    assert path.read_bytes() == expected
    assert mounted.stop()
    assert_fsck_clean(mounted)


PROCESSES = 16
ROUNDS = 120


def _churn(folder: str, me: int, results) -> None:
    """Creates, writes, renames and removes its own files and folders, and fights the others
    for a few shared names; reports the names of its own it left and any unexpected error."""
    rng = random.Random(me)
    mine: set[str] = set()
    problems = []

    def expect(what, call, allowed):
        try:
            call()
        except OSError as e:
            if e.errno not in allowed:
                problems.append(f"{what}: {e}")
    for k in range(ROUNDS):
        name = f"f{me}-{k}"
        fd = os.open(os.path.join(folder, name), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        os.write(fd, name.encode() * (k % 5))
        os.close(fd)
        mine.add(name)
        if k % 4 == 1:
            os.rename(os.path.join(folder, name), os.path.join(folder, f"r{me}-{k}"))
            mine.discard(name)
            mine.add(f"r{me}-{k}")
        if k % 3 == 2:
            victim = rng.choice(sorted(n for n in mine if not n.startswith("d")))
            os.unlink(os.path.join(folder, victim))
            mine.discard(victim)
        if k % 10 == 0:
            os.mkdir(os.path.join(folder, f"d{me}-{k}"))
            mine.add(f"d{me}-{k}")
        if k % 20 == 15:
            os.rmdir(os.path.join(folder, f"d{me}-{k - 15}"))
            mine.discard(f"d{me}-{k - 15}")
        shared = os.path.join(folder, f"shared-{rng.randrange(6)}")
        expect("create shared", lambda: os.close(os.open(shared, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)),
               (errno.EEXIST,))
        expect("unlink shared", lambda: os.unlink(os.path.join(folder, f"shared-{rng.randrange(6)}")), (errno.ENOENT,))
        expect("mkdir shared", lambda: os.mkdir(os.path.join(folder, "shared-dir")), (errno.EEXIST,))
        expect("rmdir shared", lambda: os.rmdir(os.path.join(folder, "shared-dir")), (errno.ENOENT,))
    results.put((me, sorted(mine), problems))


def _folder_facts(folder: Path) -> dict:
    names = os.listdir(folder)
    facts = {"duplicates": len(names) - len(set(names)), "names": sorted(names)}
    dirs = [n for n in names if os.path.isdir(folder / n)]
    facts["nlink"] = os.stat(folder).st_nlink
    facts["expected nlink"] = 2 + len(dirs)
    facts["bad file links"] = [n for n in names if n not in dirs and os.stat(folder / n).st_nlink != 1]
    facts["bad dir links"] = [n for n in dirs if os.stat(folder / n).st_nlink != 2]
    return facts


@pytest.mark.timeout(180)
def test_16_processes_create_and_delete_in_one_folder(mounted):
    folder = mounted.path(UPLOADS, "busy")
    folder.mkdir()
    ctx = multiprocessing.get_context("fork")
    results = ctx.Queue()
    procs = [ctx.Process(target=_churn, args=(str(folder), i, results)) for i in range(PROCESSES)]
    for p in procs:
        p.start()
    reports = [results.get(timeout=150) for _ in procs]
    for p in procs:
        p.join(timeout=30)
    assert [p.exitcode for p in procs] == [0] * PROCESSES
    problems = [line for _me, _mine, lines in reports for line in lines]
    assert not problems, problems[:10]
    own = {n for _me, mine, _ in reports for n in mine}
    facts = _folder_facts(folder)
    shared = {n for n in facts["names"] if n.startswith("shared-")}
    assert set(facts["names"]) == own | shared
    assert facts["duplicates"] == 0 and not facts["bad file links"] and not facts["bad dir links"], facts
    assert facts["nlink"] == facts["expected nlink"], facts
    mounted.remount()
    assert _folder_facts(folder) == facts
    assert mounted.stop()
    assert_fsck_clean(mounted)
