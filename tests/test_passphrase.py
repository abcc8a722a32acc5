"""Passphrase-protected stores, through real mounts: `tempfs mount` with a passphrase from a
file, the environment or a systemd credential; `tempfs passwd`; `tempfs fsck`; mount(8).

A store given a passphrase at its first mount gets a random master key wrapped in
STORE/keyslot.json (scrypt + AES-256-GCM) and no key file. A wrong or missing passphrase fails
with exit 4 and one line, before anything in the store is read or written; the passphrase is
never in a command line, a log or a message.
"""
from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path

import pytest

from conftest import _ALL_PIDS, pid_alive, run_tempfs, tail, wait_until
from tempfs.mount_helper import parse_args
from test_fstab import helper_installed, prepare, run, umount_and_wait  # noqa: F401 (a fixture)

PASS = "correct horse battery staple"
NEW = "tr0ub4dor & 3, with spaces"
UPLOADS = "processing/common/uploads"
SLOT = "keyslot.json"


# ------------------------------------------------------------------ helpers

def secret_file(m, secret: str = PASS, name: str = "passphrase", mode: int = 0o600) -> Path:
    path = m.key_dir / name
    path.write_text(secret + "\n")
    os.chmod(path, mode)
    return path


def without_key_file(m):
    """The Mount's command lines lose the --key-file conftest always adds (unless given one)."""
    plain = type(m).mount_args.__get__(m)

    def mount_args(*extra, key_file=None, **kw):
        args = plain(*extra, **kw)
        i = args.index("--key-file")
        del args[i:i + 2]
        return args + (["--key-file", os.fspath(key_file)] if key_file else [])
    m.mount_args = mount_args
    return m


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


def one_line(result, code: int, *words: str, logged: bool = False) -> str:
    """The failure's exit code and its one line on stderr (the last one when the daemon logs
    there too: `logged`, a foreground mount), holding each of `words`."""
    rc, out, err = result
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == code, f"exit {rc}, expected {code}: {err!r} {out!r}"
    assert len(lines) == 1 or (logged and lines), err
    lines = lines[-1:]
    for w in words:
        assert w.lower() in lines[0].lower(), lines[0]
    return lines[0]


def write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


@pytest.fixture
def protected(make_mount):
    """A store protected by PASS (from a file), holding one file, unmounted."""
    m = without_key_file(make_mount(start=False))
    m.passfile = secret_file(m)
    m.start("--passphrase-file", m.passfile)
    m.data = os.urandom(300_000)
    write_synced(m.path(UPLOADS, "kept.bin"), m.data)
    assert m.stop(), tail(m.log_text())
    return m


def daemon_argv(pid: int) -> list[bytes]:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read().split(b"\0")


def background_mount(m, *extra, env=None):
    """`tempfs mount` without --foreground (as a user runs it); the daemon's pid is recorded."""
    r = run_tempfs(*m.mount_args(*extra, "--log-file", m.log), cwd=m.base, env=env, timeout=60)
    if r.returncode == 0:
        pid = int(os.getxattr(m.mnt, "user.tempfs.pid"))
        _ALL_PIDS.add(pid)
        return r, pid
    return r, None


def umount(m, pid: int) -> None:
    r = run_tempfs("umount", m.mnt, cwd=m.base, timeout=60)
    assert r.returncode == 0, r.stderr
    assert wait_until(lambda: not pid_alive(pid), timeout=30)


# ------------------------------------------------------------------ mount with a passphrase

def test_passphrase_from_a_file(make_mount):
    m = without_key_file(make_mount(start=False))
    passfile = secret_file(m)
    m.start("--passphrase-file", passfile)
    assert not m.key_file.exists() and os.listdir(m.key_dir) == ["passphrase"]  # no key file
    slot = m.store / SLOT
    assert stat.S_IMODE(slot.stat().st_mode) == 0o600
    assert PASS.encode() not in slot.read_bytes()
    assert m.status()["daemon"]["key"] == f"passphrase ({slot})"
    write_synced(m.path(UPLOADS, "a.txt"), b"behind a passphrase")
    m.remount("--passphrase-file", passfile)
    assert m.path(UPLOADS, "a.txt").read_bytes() == b"behind a passphrase"
    assert PASS not in m.log_text()


def test_passphrase_from_the_environment(make_mount, monkeypatch):
    m = without_key_file(make_mount(start=False))
    monkeypatch.setenv("TEMPFS_PASSPHRASE", PASS)
    m.start()
    write_synced(m.path(UPLOADS, "a.txt"), b"env")
    assert (m.store / SLOT).exists() and not m.key_file.exists()
    m.remount()
    assert m.path(UPLOADS, "a.txt").read_bytes() == b"env"
    assert m.stop()
    monkeypatch.setenv("TEMPFS_PASSPHRASE", "not it")
    one_line(m.mount_expect_failure(), 4, "wrong passphrase", "$TEMPFS_PASSPHRASE")


def test_passphrase_from_a_systemd_credential(make_mount, monkeypatch):
    m = without_key_file(make_mount(start=False))
    creds = m.base / "credentials"
    creds.mkdir(mode=0o700)
    (creds / "tempfs-passphrase").write_text(PASS)
    os.chmod(creds / "tempfs-passphrase", 0o400)  # as systemd's LoadCredential= makes it
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    monkeypatch.delenv("TEMPFS_PASSPHRASE", raising=False)
    m.start()
    write_synced(m.path(UPLOADS, "a.txt"), b"credential")
    assert m.stop()
    # the same passphrase from a file opens it: the credential is the passphrase, nothing more
    monkeypatch.delenv("CREDENTIALS_DIRECTORY")
    m.start("--passphrase-file", secret_file(m))
    assert m.path(UPLOADS, "a.txt").read_bytes() == b"credential"


def test_passphrase_never_in_argv_log_or_alert_environment(make_mount, monkeypatch):
    """Background mount: the daemon is re-executed with the passphrase *file*; a passphrase from
    the environment is dropped from the daemon's environment once used (alert commands run
    without it)."""
    m = without_key_file(make_mount(start=False, config_text=(
        '[alerts]\nrefusals_per_minute = 1\ncommand = "env > \\"$TEMPFS_TEST_ENV_DUMP\\""\n')))
    dump = m.base / "alert-env.txt"
    monkeypatch.setenv("TEMPFS_TEST_ENV_DUMP", str(dump))
    passfile = secret_file(m)
    r, pid = background_mount(m, "--passphrase-file", passfile)
    assert r.returncode == 0, r.stderr
    argv = daemon_argv(pid)
    assert os.fsencode(passfile) in argv and not any(PASS.encode() in a for a in argv)
    assert f"passphrase ({m.store / SLOT})" in r.stdout
    umount(m, pid)

    monkeypatch.setenv("TEMPFS_PASSPHRASE", PASS)
    r, pid = background_mount(m)
    assert r.returncode == 0, r.stderr
    assert not any(PASS.encode() in a for a in daemon_argv(pid))
    for _ in range(3):  # refused at the root: raises the refusals alert, whose command dumps its env
        with pytest.raises(PermissionError):
            os.mkdir(m.path(f"not-here-{_}"))
    assert wait_until(lambda: dump.exists() and dump.stat().st_size > 0, timeout=20), tail(m.log_text())
    env = dump.read_text()
    assert "TEMPFS_ALERT_CONDITION" in env and "TEMPFS_PASSPHRASE" not in env and PASS not in env
    umount(m, pid)
    assert PASS not in m.log_text() and PASS not in r.stdout + r.stderr


def test_permissive_passphrase_file_is_refused(make_mount):
    m = without_key_file(make_mount(start=False))
    passfile = secret_file(m, mode=0o644)
    line = one_line(m.mount_expect_failure("--passphrase-file", passfile), 4, "chmod 600", str(passfile))
    assert PASS not in line
    assert not m.store.exists()


def test_empty_passphrase_is_refused(make_mount):
    m = without_key_file(make_mount(start=False))
    one_line(m.mount_expect_failure("--passphrase-file", secret_file(m, secret="")), 4, "empty")
    one_line(m.mount_expect_failure(env={"TEMPFS_PASSPHRASE": ""}), 4, "empty")
    assert not m.store.exists()


@pytest.mark.parametrize("how", ["file", "env"])
@pytest.mark.parametrize("foreground", [False, True])
def test_wrong_passphrase_changes_nothing(protected, how, foreground):
    m = protected
    before = store_snapshot(m.store)
    if how == "file":
        result = m.mount_expect_failure("--passphrase-file", secret_file(m, "wrong one", name="wrong"),
                                        foreground=foreground)
    else:
        result = m.mount_expect_failure(env={"TEMPFS_PASSPHRASE": "wrong one"}, foreground=foreground)
    line = one_line(result, 4, "wrong passphrase", str(m.store), logged=foreground)
    assert "wrong one" not in line and PASS not in line
    assert store_snapshot(m.store) == before


def test_missing_passphrase_names_the_three_sources(protected, monkeypatch):
    monkeypatch.delenv("TEMPFS_PASSPHRASE", raising=False)
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    before = store_snapshot(protected.store)
    one_line(protected.mount_expect_failure(), 4,
             "protected by a passphrase", "--passphrase-file", "TEMPFS_PASSPHRASE", "tempfs-passphrase")
    assert store_snapshot(protected.store) == before


def test_key_file_given_for_a_passphrase_store_is_refused(protected):
    from tempfs.keys import create_key_file
    create_key_file(protected.key_file)
    before = store_snapshot(protected.store)
    one_line(protected.mount_expect_failure("--passphrase-file", protected.passfile, key_file=protected.key_file),
             2, "--key-file", "passphrase")
    assert store_snapshot(protected.store) == before


def test_key_file_store_given_a_passphrase_is_refused(make_mount):
    m = make_mount()
    write_synced(m.path(UPLOADS, "a.txt"), b"key file store")
    assert m.stop()
    before = store_snapshot(m.store)
    one_line(m.mount_expect_failure(env={"TEMPFS_PASSPHRASE": PASS}), 4, "key file", "$TEMPFS_PASSPHRASE",
             "tempfs passwd")
    assert store_snapshot(m.store) == before and not (m.store / SLOT).exists()


# ------------------------------------------------------------------ passwd

def _objects(store: Path) -> dict:
    return {str(p.relative_to(store)): p.read_bytes() for p in (store / "packs").rglob("*") if p.is_file()}


def passwd(m, *args, env=None):
    return run_tempfs("passwd", "--store", m.store, *args, cwd=m.base, env=env, timeout=60)


def test_passwd_changes_the_passphrase_and_nothing_else(protected):
    m = protected
    before = store_snapshot(m.store)
    objects = _objects(m.store)
    assert objects
    newfile = secret_file(m, NEW, name="new")
    r = passwd(m, "--passphrase-file", m.passfile, "--new-passphrase-file", newfile)
    assert r.returncode == 0, r.stderr
    assert "passphrase changed" in r.stdout and PASS not in r.stdout + r.stderr and NEW not in r.stdout + r.stderr
    after = store_snapshot(m.store)
    assert {k: v for k, v in after.items() if k != SLOT} == {k: v for k, v in before.items() if k != SLOT}
    assert after[SLOT] != before[SLOT] and after[SLOT][1] == 0o600
    assert _objects(m.store) == objects
    assert [n for n in os.listdir(m.store) if n.startswith(".")] == []  # no temp file left
    # the old passphrase no longer opens it; the new one does, with the data intact
    one_line(m.mount_expect_failure("--passphrase-file", m.passfile), 4, "wrong passphrase")
    m.start("--passphrase-file", newfile)
    assert m.path(UPLOADS, "kept.bin").read_bytes() == m.data


def test_passwd_while_mounted(protected):
    m = protected
    m.start("--passphrase-file", m.passfile)
    r = passwd(m, env={"TEMPFS_PASSPHRASE": PASS, "TEMPFS_NEW_PASSPHRASE": NEW})
    assert r.returncode == 0, r.stderr
    write_synced(m.path(UPLOADS, "during.txt"), b"written after passwd")
    assert m.stop()
    m.start("--passphrase-file", secret_file(m, NEW, name="new"))
    assert m.path(UPLOADS, "kept.bin").read_bytes() == m.data
    assert m.path(UPLOADS, "during.txt").read_bytes() == b"written after passwd"


def test_passwd_with_a_wrong_or_missing_passphrase_changes_nothing(protected):
    m = protected
    slot = (m.store / SLOT).read_bytes()
    r = passwd(m, env={"TEMPFS_PASSPHRASE": "wrong", "TEMPFS_NEW_PASSPHRASE": NEW})
    assert r.returncode == 4 and "wrong passphrase" in r.stderr, r.stderr
    r = passwd(m, env={"TEMPFS_NEW_PASSPHRASE": NEW})
    assert r.returncode == 4 and "protected by a passphrase" in r.stderr, r.stderr
    r = passwd(m, "--passphrase-file", m.passfile)
    assert r.returncode == 2 and "--new-passphrase-file" in r.stderr and "TEMPFS_NEW_PASSPHRASE" in r.stderr
    assert (m.store / SLOT).read_bytes() == slot


def test_passwd_adds_a_passphrase_to_a_key_file_store(make_mount):
    m = make_mount()
    write_synced(m.path(UPLOADS, "a.txt"), b"from the key-file days")
    assert m.stop()
    objects = _objects(m.store)
    before = store_snapshot(m.store)
    other = make_mount(name="other")  # a wrong key file: refused, nothing written
    assert other.stop()
    r = passwd(m, "--key-file", other.key_file, env={"TEMPFS_NEW_PASSPHRASE": NEW})
    assert r.returncode == 4 and "does not open" in r.stderr, r.stderr
    assert not (m.store / SLOT).exists()

    r = passwd(m, "--key-file", m.key_file, env={"TEMPFS_NEW_PASSPHRASE": NEW})
    assert r.returncode == 0, r.stderr
    assert "still opens the store" in r.stdout
    assert _objects(m.store) == objects
    assert {k: v for k, v in store_snapshot(m.store).items() if k != SLOT} == before  # the slot alone
    without_key_file(m)
    m.start("--passphrase-file", secret_file(m, NEW, name="new"))
    assert m.path(UPLOADS, "a.txt").read_bytes() == b"from the key-file days"
    assert m.stop()
    # a lost passphrase is reset with the key file
    r = passwd(m, "--key-file", m.key_file, env={"TEMPFS_NEW_PASSPHRASE": "third"})
    assert r.returncode == 0, r.stderr
    m.key_file.unlink()  # the admin removes the key file: the passphrase alone opens the store
    m.start("--passphrase-file", secret_file(m, "third", name="third"))
    assert m.path(UPLOADS, "a.txt").read_bytes() == b"from the key-file days"


# ------------------------------------------------------------------ fsck

def test_fsck_opens_a_passphrase_store(protected):
    m = protected
    r = run_tempfs("fsck", "--store", m.store, "--passphrase-file", m.passfile, cwd=m.base)
    assert r.returncode == 0, r.stdout + r.stderr
    r = run_tempfs("fsck", "--store", m.store, "--json", cwd=m.base, env={"TEMPFS_PASSPHRASE": PASS})
    assert r.returncode == 0 and json.loads(r.stdout)["objects_checked"] >= 1, r.stderr
    before = store_snapshot(m.store)
    r = run_tempfs("fsck", "--store", m.store, cwd=m.base)
    assert r.returncode == 4 and "protected by a passphrase" in r.stderr, r.stderr
    r = run_tempfs("fsck", "--store", m.store, cwd=m.base, env={"TEMPFS_PASSPHRASE": "wrong"})
    assert r.returncode == 4 and "wrong passphrase" in r.stderr, r.stderr
    assert store_snapshot(m.store) == before


# ------------------------------------------------------------------ mount(8)

def test_helper_options():
    r = parse_args(["/s", "/m", "-o", "config=/c,passphrase_file=/p/pp"])
    assert r.passphrase_file == Path("/p/pp") and r.key_file is None
    assert r.mount_argv() == ["mount", "/m", "--store", "/s", "--config", "/c", "--passphrase-file", "/p/pp"]
    r = parse_args(["/s", "/m", "-o", "config=/c,ephemeral"])
    assert r.ephemeral and r.mount_argv()[-1] == "--ephemeral" and "--key-file" not in r.mount_argv()
    assert "--key-file" in parse_args(["/s", "/m", "-o", "config=/c,key_file=/k"]).mount_argv()


def test_mount_t_fuse_tempfs_with_a_passphrase_file(helper_installed, make_mount):
    m = prepare(without_key_file(make_mount(start=False)))
    passfile = secret_file(m)
    opts = f"config={m.config},passphrase_file={passfile},log_file={m.log},nofail"
    run("mount", "-t", "fuse.tempfs", m.store, m.mnt, "-o", opts)
    assert (m.store / SLOT).exists() and not m.key_file.exists()
    m.path("cache/data/t.csv").write_text("a,b\n")
    pid = int(os.getxattr(m.mnt, "user.tempfs.pid"))
    assert not any(PASS.encode() in a for a in daemon_argv(pid))
    umount_and_wait(m)
    run("mount", "-t", "fuse.tempfs", m.store, m.mnt, "-o", opts)
    assert m.path("cache/data/t.csv").read_text() == "a,b\n"
    umount_and_wait(m)

