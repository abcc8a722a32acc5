"""mount(8) and /etc/fstab: `mount -t fuse.tempfs STORE MNT -o config=...,key_file=...`.

mount(8) (libmount) runs `/sbin/mount.fuse.tempfs STORE MNT [-sfnv] -o OPTIONS` for the type
`fuse.tempfs`; it looks in /sbin only, never in $PATH. The tests install a wrapper there that
runs `tempfs.mount_helper` of this checkout with this venv's Python (an existing helper, e.g.
the symlink scripts/mount.sh makes, is put back afterwards), serialised by a lock file so that
two test runs on one machine do not swap it under each other.

The helper starts the daemon in the background (as `tempfs mount` does) and returns once the
mount answers; that daemon is not a child of pytest. Teardown (conftest's Mount.stop) unmounts
with `fusermount3 -u`, then `-uz`, and ends any daemon whose command line names the mountpoint.
"""
from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from conftest import (REPO_ROOT, _ALL_PIDS, is_tempfs_mounted, mount_ids, pid_alive, pids_with_arg,
                      tail, tempfs_env, wait_until)
from tempfs.mount_helper import UsageError, parse_args, split_options

HELPER = Path("/sbin/mount.fuse.tempfs")
LOCK = Path("/run/lock/tempfs-test-mount-helper.lock")
UPLOADS = "processing/common/uploads"
TIMEOUT = 60  # seconds for one mount(8) / umount(8) call


# ------------------------------------------------------------------ without mounting


def test_generic_options_are_ignored():
    r = parse_args(["/s", "/m", "-o", "rw,config=/c/t.toml,key_file=/k/t.key,log_file=/l/d.log,defaults,"
                    "auto,noauto,nofail,_netdev,user,nouser,users,exec,noexec,suid,nosuid,dev,nodev,"
                    "x-systemd.automount,x-systemd.requires=a.service,X-mount.mkdir,comment=systemd.x"])
    assert (r.store, r.mountpoint, r.config, r.key_file, r.log_file) == \
        (Path("/s"), Path("/m"), Path("/c/t.toml"), Path("/k/t.key"), Path("/l/d.log"))
    assert not r.allow_nonempty and not r.fake and not r.unknown
    assert "x-systemd.automount" in r.ignored and "nofail" in r.ignored


def test_arguments_as_mount_passes_them():
    r = parse_args(["tempfs:/srv/store", "/srv/mnt", "-s", "-f", "-n", "-v",
                    "-o", "rw,config=/c", "-o", "key_file=/k,allow_nonempty,bogus", "-t", "fuse.tempfs"])
    assert r.store == Path("/srv/store")  # the spelling mount(8) and df show is accepted
    assert r.sloppy and r.fake and r.verbose and r.allow_nonempty
    assert r.unknown == ["bogus"]  # -s: ignored, with a warning
    assert parse_args(["/s", "/m", "-fnv", "-oconfig=/c,key_file=/k"]).fake


def test_quoted_option_values():
    assert split_options('rw,config="/a,b/t.toml",key_file=/k') == ["rw", "config=/a,b/t.toml", "key_file=/k"]
    with pytest.raises(UsageError):
        split_options('config="/a')


@pytest.mark.parametrize("argv, words", [
    (["/s", "/m", "-o", "config=/c,key_file=/k,bogus"], ["unknown option 'bogus'", "config="]),
    (["/s", "/m", "-o", "config=/c,key_file=/k,ro"], ["ro", "read-only"]),
    (["/s", "/m", "-s", "-o", "ro,config=/c,key_file=/k"], ["read-only"]),  # sloppy or not
    (["/s", "/m", "-o", "config=/c"], ["missing option key_file="]),
    (["/s", "/m", "-o", "key_file=/k"], ["missing option config="]),
    (["/s", "/m", "-o", "config=c.toml,key_file=/k"], ["config=c.toml", "absolute"]),
    (["/s", "/m", "-o", "config=/c,key_file="], ["key_file=", "value"]),
    (["/s", "/m", "-o", "config=/c,key_file=/k,allow_nonempty=1"], ["allow_nonempty"]),
    (["store", "/m", "-o", "config=/c,key_file=/k"], ["store", "absolute"]),
    (["/s", "-o", "config=/c,key_file=/k"], ["STORE and MOUNTPOINT"]),
    (["/s", "/m", "-t", "ext4", "-o", "config=/c,key_file=/k"], ["ext4"]),
    (["/s", "/m", "-x", "-o", "config=/c,key_file=/k"], ["-x"]),
])
def test_bad_arguments_exit_2_with_one_line(argv, words):
    r = subprocess.run([sys.executable, "-m", "tempfs.mount_helper", *argv], capture_output=True,
                       text=True, timeout=30, env=tempfs_env(), stdin=subprocess.DEVNULL)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, r.stderr
    assert len(lines) == 1 and lines[0].startswith("mount.fuse.tempfs: "), r.stderr
    for w in words:
        assert w.lower() in lines[0].lower(), lines[0]
    assert r.stdout == ""


def test_help_exits_0():
    r = subprocess.run([sys.executable, "-m", "tempfs.mount_helper", "--help"], capture_output=True,
                       text=True, timeout=30, env=tempfs_env(), stdin=subprocess.DEVNULL)
    assert r.returncode == 0 and r.stdout.startswith("usage: mount.fuse.tempfs STORE MOUNTPOINT"), r


def test_console_script_declared():
    scripts = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts.get("mount.fuse.tempfs") == "tempfs.mount_helper:main"


# ------------------------------------------------------------------ real mounts through mount(8)


@pytest.fixture(scope="module")
def helper_installed():
    """/sbin/mount.fuse.tempfs runs this checkout's helper; whatever was there comes back after."""
    if os.geteuid() != 0:
        pytest.skip("mount(8) with a FUSE helper needs root here")
    for tool in ("mount", "umount", "df", "fusermount3"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")
    LOCK.parent.mkdir(parents=True, exist_ok=True)
    with open(LOCK, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        saved = None
        if HELPER.is_symlink():
            saved = ("link", os.readlink(HELPER))
        elif HELPER.exists():
            saved = ("file", HELPER.read_bytes(), HELPER.stat().st_mode)
        wrapper = (f"#!{sys.executable}\n"
                   "# installed by tempfs's tests/test_fstab.py for the duration of the tests\n"
                   "import sys\n"
                   f"sys.path.insert(0, {str(REPO_ROOT)!r})\n"
                   "from tempfs.mount_helper import main\n"
                   "raise SystemExit(main())\n")
        tmp = HELPER.with_name(f".{HELPER.name}.{os.getpid()}")
        try:
            tmp.write_text(wrapper)
            tmp.chmod(0o755)
            os.replace(tmp, HELPER)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            pytest.skip(f"cannot install {HELPER}: {e}")
        try:
            yield HELPER
        finally:
            if saved is None:
                HELPER.unlink(missing_ok=True)
            elif saved[0] == "link":
                tmp.unlink(missing_ok=True)
                os.symlink(saved[1], tmp)
                os.replace(tmp, HELPER)
            else:
                tmp.write_bytes(saved[1])
                tmp.chmod(saved[2] & 0o7777)
                os.replace(tmp, HELPER)


def run(*cmd, check=True) -> subprocess.CompletedProcess:
    r = subprocess.run([os.fspath(c) for c in cmd], capture_output=True, text=True, timeout=TIMEOUT,
                       env=tempfs_env(), stdin=subprocess.DEVNULL)
    if check:
        assert r.returncode == 0, f"{cmd} exited {r.returncode}\nstdout: {r.stdout}\nstderr: {r.stderr}"
    return r


def options(m, *extra) -> str:
    return ",".join([f"config={m.config}", f"key_file={m.key_file}", f"log_file={m.log}", *extra])


def prepare(m):
    """Its log is where the helper's daemon writes; its pids are checked at session end."""
    m.log = m.base / "daemon.log"
    m._logs.append(m.log)
    return m


def daemon_pid(m) -> int:
    pid = int(os.getxattr(m.mnt, "user.tempfs.pid"))
    _ALL_PIDS.add(pid)
    return pid


def assert_tempfs_shown(m):
    """df and mount(8) both show the type fuse.tempfs and the source tempfs:STORE."""
    df = run("df", "--output=fstype,source", m.mnt).stdout.splitlines()
    assert df[1].split() == ["fuse.tempfs", f"tempfs:{m.store}"], df
    listing = run("mount", "-t", "fuse.tempfs").stdout.splitlines()
    assert any(line.startswith(f"tempfs:{m.store} on {m.mnt} type fuse.tempfs (") for line in listing), listing


def umount_and_wait(m):
    """Plain umount(8); the daemon flushes the store and exits."""
    pid = daemon_pid(m)
    run("umount", m.mnt)
    assert not is_tempfs_mounted(m.mnt)
    assert wait_until(lambda: not pid_alive(pid), timeout=30), f"daemon {pid} still running:\n{tail(m.log_text())}"
    assert not pids_with_arg(str(m.mnt))


def test_mount_t_fuse_tempfs(helper_installed, make_mount):
    m = prepare(make_mount(start=False))
    before = mount_ids(m.mnt)
    r = run("mount", "-t", "fuse.tempfs", m.store, m.mnt,
            "-o", options(m, "noauto", "nofail", "_netdev", "x-systemd.automount"))
    # it returned only once the mount was live
    assert is_tempfs_mounted(m.mnt) and mount_ids(m.mnt) - before, tail(m.log_text())
    assert r.stdout == "" and r.stderr == "", r
    assert sorted(os.listdir(m.mnt)) == ["cache", "cleanup", "processing", "sessions"]
    assert m.key_file.exists() and (m.store / "meta.sqlite").exists() and m.log.exists()
    assert_tempfs_shown(m)

    data = os.urandom(300_000)
    with open(m.path(UPLOADS, "kept.bin"), "wb") as f:
        f.write(data)
    assert m.path(UPLOADS, "kept.bin").read_bytes() == data
    umount_and_wait(m)
    assert "unmounted" in m.log_text()

    # the store reopens, through mount(8) again, with the file intact
    run("mount", "-t", "fuse.tempfs", m.store, m.mnt, "-o", options(m))
    assert m.path(UPLOADS, "kept.bin").read_bytes() == data
    umount_and_wait(m)


@pytest.mark.parametrize("how", ["option", "mount -r"])
def test_ro_is_refused(helper_installed, make_mount, how):
    m = prepare(make_mount(start=False))
    args = ["-o", options(m, "ro")] if how == "option" else ["-r", "-o", options(m)]
    r = run("mount", "-t", "fuse.tempfs", m.store, m.mnt, *args, check=False)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, r
    assert len(lines) == 1 and "read-only" in lines[0], r.stderr
    assert not is_tempfs_mounted(m.mnt)
    assert not m.store.exists() and not m.key_file.exists()  # nothing was touched


def test_unknown_option_is_refused(helper_installed, make_mount):
    m = prepare(make_mount(start=False))
    r = run("mount", "-t", "fuse.tempfs", m.store, m.mnt, "-o", options(m, "nofail", "compress=zstd"),
            check=False)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, r
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("mount.fuse.tempfs: unknown option 'compress=zstd'"), lines[0]
    assert not is_tempfs_mounted(m.mnt)
    assert not m.store.exists() and not m.key_file.exists()


def test_tempfs_errors_come_through_mount(helper_installed, make_mount):
    """The checks of `tempfs mount` apply, with its exit codes and one-line messages."""
    m = prepare(make_mount(start=False))
    (m.mnt / "precious.txt").write_text("do not hide me")
    r = run("mount", "-t", "fuse.tempfs", m.store, m.mnt, "-o", options(m), check=False)
    assert r.returncode == 6 and "not empty" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r
    assert not is_tempfs_mounted(m.mnt)
    run("mount", "-t", "fuse.tempfs", m.store, m.mnt, "-o", options(m, "allow_nonempty"))
    assert sorted(os.listdir(m.mnt)) == ["cache", "cleanup", "processing", "sessions"]
    # already mounted there
    r = run("mount", "-t", "fuse.tempfs", m.store, m.mnt, "-o", options(m, "allow_nonempty"), check=False)
    assert r.returncode == 6 and "already mounted" in r.stderr, r
    umount_and_wait(m)
    assert (m.mnt / "precious.txt").read_text() == "do not hide me"


def write_fstab(m, source: str, *extra) -> Path:
    fstab = m.base / "fstab"
    fstab.write_text("# test fstab\n"
                     f"{source} {m.mnt} fuse.tempfs {options(m, *extra)} 0 0\n")
    return fstab


def test_fstab_line(helper_installed, make_mount):
    m = prepare(make_mount(start=False))
    fstab = write_fstab(m, str(m.store), "noauto", "nofail")
    run("mount", "--fstab", fstab, m.mnt)
    assert is_tempfs_mounted(m.mnt), tail(m.log_text())
    assert_tempfs_shown(m)
    m.path("cache/data/table.csv").write_text("a,b\n1,2\n")
    umount_and_wait(m)
    run("mount", "-T", fstab, m.mnt)  # -T is --fstab
    assert m.path("cache/data/table.csv").read_text() == "a,b\n1,2\n"
    umount_and_wait(m)


def test_fstab_mount_all_twice(helper_installed, make_mount):
    """Spelled `tempfs:STORE`, as mountinfo shows it, the line is recognised as mounted:
    a second `mount -a` skips it instead of failing with "already mounted"."""
    m = prepare(make_mount(start=False))
    fstab = write_fstab(m, f"tempfs:{m.store}", "nofail", "_netdev")
    run("mount", "-a", "--fstab", fstab)
    ids = mount_ids(m.mnt)
    assert len(ids) == 1, tail(m.log_text())
    run("mount", "-a", "--fstab", fstab)
    assert mount_ids(m.mnt) == ids
    assert_tempfs_shown(m)
    umount_and_wait(m)
