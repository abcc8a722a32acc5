"""`tempfs mount --ephemeral`: a fresh key that lives only in the daemon's memory.

While mounted it is an ordinary tempfs; no key file or key slot is written, and the key is in
no command line. A clean unmount empties the store folder; after a crash (SIGKILL) the store
is unreadable, and the next mount of it (ephemeral or not) removes it and starts empty. A
store a running daemon holds is never wiped, and a persistent store is never taken.
"""
from __future__ import annotations

import os
import signal

import pytest

from conftest import _ALL_PIDS, fusermount, is_tempfs_mounted, pid_alive, run_tempfs, tail, wait_until
from test_fstab import helper_installed, prepare, run, umount_and_wait  # noqa: F401 (a fixture)
from test_passphrase import daemon_argv, one_line, store_snapshot, without_key_file, write_synced

UPLOADS = "processing/common/uploads"
REMOVED = "removed the content of an ephemeral store"


def ephemeral_mount(make_mount, **kw):
    m = without_key_file(make_mount(start=False, **kw))
    m.start("--ephemeral")
    return m


def files_under(folder) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def test_ephemeral_mount_lives_in_memory_and_leaves_nothing(make_mount):
    m = ephemeral_mount(make_mount)
    data = os.urandom(400_000)
    write_synced(m.path(UPLOADS, "frame.raw"), data)
    m.path("cache/data/t.csv").write_text("a,b\n")
    assert m.path(UPLOADS, "frame.raw").read_bytes() == data
    assert m.status()["daemon"]["key"] == "ephemeral (memory only)"
    assert os.listdir(m.key_dir) == [] and not (m.store / "keyslot.json").exists()
    assert (m.store / "ephemeral").exists() and files_under(m.store / "packs")
    with open(f"/proc/{m.pid}/limits") as f:
        core = next(line for line in f if line.startswith("Max core file size")).split()[4:6]
    assert core == ["0", "0"]  # no core dump can carry the key to the disk
    assert m.stop(), tail(m.log_text())
    assert os.listdir(m.store) == []
    assert "ephemeral store removed" in m.log_text()
    # the next ephemeral mount starts empty
    m.start("--ephemeral")
    assert os.listdir(m.path(UPLOADS)) == []


@pytest.mark.parametrize("next_mount", ["ephemeral", "key file"])
def test_after_sigkill_the_next_mount_removes_the_old_content(make_mount, next_mount):
    m = ephemeral_mount(make_mount)
    write_synced(m.path(UPLOADS, "secret.raw"), os.urandom(300_000))
    os.kill(m.pid, signal.SIGKILL)
    m.proc.wait(timeout=10)
    m.proc = None
    fusermount(m.mnt, lazy=True)
    assert not is_tempfs_mounted(m.mnt)
    old = files_under(m.store)
    assert "ephemeral" in old and any(name.startswith("packs/") for name in old), old
    # unreadable now: fsck says why, and changes nothing
    r = run_tempfs("fsck", "--store", m.store, cwd=m.base)
    assert r.returncode == 4 and "ephemeral" in r.stderr and "key is gone" in r.stderr, r.stderr
    assert files_under(m.store) == old

    if next_mount == "ephemeral":
        m.start("--ephemeral")
    else:
        del m.mount_args  # conftest's command line again, with its --key-file
        m.start()
        assert m.key_file.exists() and not (m.store / "ephemeral").exists()
    log = m.log_text()
    assert log.count(REMOVED) == 1, tail(log)
    assert os.listdir(m.path(UPLOADS)) == []
    assert files_under(m.store / "packs") == []
    m.path(UPLOADS, "new.txt").write_text("a fresh start")
    assert m.path(UPLOADS, "new.txt").read_text() == "a fresh start"


def test_a_store_in_use_is_never_wiped(make_mount):
    m = ephemeral_mount(make_mount)
    write_synced(m.path(UPLOADS, "in-use.raw"), b"x" * 200_000)
    objects = files_under(m.store / "packs")
    other = without_key_file(make_mount(start=False, name="other"))
    one_line(other.mount_expect_failure("--ephemeral", store=m.store), 5, "in use")
    del other.mount_args
    one_line(other.mount_expect_failure(store=m.store), 5, "in use")
    assert files_under(m.store / "packs") == objects
    assert m.path(UPLOADS, "in-use.raw").read_bytes() == b"x" * 200_000
    assert not other.key_file.exists()


def test_a_persistent_store_is_never_taken(make_mount):
    m = make_mount()
    write_synced(m.path(UPLOADS, "keep.txt"), b"persistent")
    assert m.stop()
    before = store_snapshot(m.store)
    without_key_file(m)
    one_line(m.mount_expect_failure("--ephemeral"), 2, "persistent tempfs store", "--store")
    assert store_snapshot(m.store) == before
    # nor a folder holding anything else
    other = without_key_file(make_mount(start=False, name="other"))
    other.store.mkdir()
    (other.store / "notes.txt").write_text("mine")
    one_line(other.mount_expect_failure("--ephemeral"), 2, "notes.txt")
    assert os.listdir(other.store) == ["notes.txt"]


def test_ephemeral_takes_no_key_file_or_passphrase(make_mount):
    m = make_mount(start=False)
    one_line(m.mount_expect_failure("--ephemeral"), 2, "--ephemeral", "--key-file")
    assert not m.store.exists() and not m.key_file.exists()


def test_background_ephemeral_mount(make_mount):
    """The re-executed daemon makes the key: the parent passes --ephemeral, never a key."""
    m = without_key_file(make_mount(start=False))
    r = run_tempfs(*m.mount_args("--ephemeral", "--log-file", m.log), cwd=m.base, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "ephemeral (memory only)" in r.stdout
    pid = int(os.getxattr(m.mnt, "user.tempfs.pid"))
    _ALL_PIDS.add(pid)
    argv = daemon_argv(pid)
    assert b"--ephemeral" in argv and b"--key-file" not in argv and b"--passphrase-file" not in argv
    m.path("cache/data/t.txt").write_text("for now")
    r = run_tempfs("umount", m.mnt, cwd=m.base, timeout=60)
    assert r.returncode == 0, r.stderr
    assert wait_until(lambda: not pid_alive(pid), timeout=30)
    assert os.listdir(m.store) == [] and os.listdir(m.key_dir) == []


def test_mount_t_fuse_tempfs_ephemeral(helper_installed, make_mount):
    m = prepare(make_mount(start=False))
    run("mount", "-t", "fuse.tempfs", m.store, m.mnt, "-o", f"config={m.config},ephemeral,log_file={m.log}")
    m.path("cache/data/t.txt").write_text("for now")
    assert not m.key_file.exists()
    umount_and_wait(m)
    assert os.listdir(m.store) == []
