"""Shared fixtures: mount a real tempfs in a temporary directory.

Every mount runs as its own process (`python -m tempfs mount ... --foreground`),
because pyfuse3 keeps global state: one process serves one mount.  Mounts are
detected through /proc/self/mountinfo (fstype ``fuse.tempfs``), never with
``os.path.ismount``, which is False on a dead "Transport endpoint is not
connected" mount.

Teardown always unmounts (``fusermount3 -u``, then ``-uz`` if busy) and makes
sure the daemon process it started is gone.
"""
from __future__ import annotations

import ctypes
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent

MOUNT_TIMEOUT = 20.0  # seconds to wait for a mount to go live
EXIT_TIMEOUT = 20.0  # seconds to wait for a daemon to exit after unmount
POLL = 0.02

# The seed's tree (see shared/seed/temp-folder-README.en.md).
AREAS = ["cache", "cleanup", "processing", "sessions"]
SEED_TREE = {
    "processing": {
        "face_recognition": ["frames", "features", "results"],
        "defect_detection": ["frames", "detections", "results"],
        "common": ["uploads", "downloads", "conversions"],
    },
    "cache": ["models", "images", "videos", "data"],
    "sessions": ["user_sessions", "system_sessions", "api_sessions"],
    "cleanup": ["scheduled", "failed", "manual"],
}


def _walk_schema(tree, prefix=""):
    if isinstance(tree, dict):
        for name, sub in tree.items():
            path = f"{prefix}{name}"
            yield path, False
            yield from _walk_schema(sub, path + "/")
    else:
        for name in tree:
            yield f"{prefix}{name}", True


# (relative path, is_leaf) for every schema folder
SCHEMA_DIRS = list(_walk_schema(SEED_TREE))
LEAF_DIRS = [p for p, leaf in SCHEMA_DIRS if leaf]
BRANCH_DIRS = [p for p, leaf in SCHEMA_DIRS if not leaf]

# Every mountpoint and every pid this test session created.
_ALL_MOUNTPOINTS: set[str] = set()
_ALL_PIDS: set[int] = set()


# ---------------------------------------------------------------- helpers

def _unescape_mountinfo(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and field[i + 1:i + 4].isdigit() and len(field[i + 1:i + 4]) == 3:
            out.append(chr(int(field[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def mountinfo_full() -> list[tuple[int, str, str]]:
    """[(mount id, mountpoint, fstype)] from /proc/self/mountinfo, in mount order."""
    result = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields = left.split()
            if len(fields) < 5 or not right:
                continue
            result.append((int(fields[0]), _unescape_mountinfo(fields[4]), right.split()[0]))
    return result


def mountinfo() -> list[tuple[str, str]]:
    """[(mountpoint, fstype)] from /proc/self/mountinfo."""
    return [(mp, fs) for _, mp, fs in mountinfo_full()]


def mount_ids(path, fstype="fuse.tempfs") -> set[int]:
    path = os.path.abspath(os.fspath(path))
    return {mid for mid, mp, fs in mountinfo_full() if mp == path and fs == fstype}


def mount_fstype(path) -> str | None:
    """fstype of the mount at exactly `path` (the last one, if stacked), else None."""
    path = os.path.abspath(os.fspath(path))
    fstype = None
    for mp, fs in mountinfo():
        if mp == path:
            fstype = fs
    return fstype


def is_tempfs_mounted(path) -> bool:
    return mount_fstype(path) == "fuse.tempfs"


def answers(path, timeout: float) -> bool:
    """True when the filesystem at `path` answers statfs (which always reaches the daemon,
    unlike stat, which the kernel may answer from its attribute cache).  Runs in a thread,
    so a hung daemon cannot hang the test beyond `timeout`."""
    result = []

    def probe():
        try:
            os.statvfs(path)
            result.append(True)
        except OSError:
            result.append(False)

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(max(0.0, timeout))
    return bool(result and result[0])


def fuse_mounts_under(prefix) -> list[str]:
    prefix = os.fspath(prefix).rstrip("/") + "/"
    return [mp for mp, fs in mountinfo() if fs.startswith("fuse") and (mp + "/").startswith(prefix)]


def fusermount(path, lazy=False) -> subprocess.CompletedProcess:
    args = ["fusermount3", "-uz" if lazy else "-u", os.fspath(path)]
    return subprocess.run(args, capture_output=True, text=True, timeout=30)


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        return state not in ("Z", "X")
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def pids_with_arg(arg: str) -> list[int]:
    """pids (other than ours) whose command line contains `arg` exactly as one argument."""
    found = []
    me = os.getpid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if os.fsencode(arg) in argv and pid_alive(int(entry)):
            found.append(int(entry))
    return found


def kill_pid(pid: int, timeout: float = 5.0) -> None:
    """SIGTERM, then SIGKILL, one pid we started."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if not pid_alive(pid):
            return
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and pid_alive(pid):
            time.sleep(POLL)


_libc = ctypes.CDLL(None, use_errno=True)
_PR_SET_PDEATHSIG = 1


def _die_with_parent():  # preexec_fn: the daemon gets SIGTERM if pytest dies
    _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def tempfs_env(extra: dict | None = None) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("LC_ALL", "C.UTF-8")
    if extra:
        env.update(extra)
    return env


def run_tempfs(*args, cwd=None, timeout=60, env=None, check=False) -> subprocess.CompletedProcess:
    """Run `python -m tempfs ARGS` to completion (text output captured)."""
    cmd = [sys.executable, "-m", "tempfs", *map(os.fspath, args)]
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env=tempfs_env(env), stdin=subprocess.DEVNULL)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} exited {proc.returncode}\nstdout: {proc.stdout}\nstderr: {proc.stderr}")
    return proc


def tail(text: str, n: int = 40) -> str:
    return "\n".join(text.splitlines()[-n:])


def run_script(name: str, *args: str, tmp_path, timeout: float = 130) -> tuple[subprocess.CompletedProcess, dict]:
    """Runs scripts/NAME (its work below tmp_path) and returns its result and its figures
    (`name value unit` lines); fails if it left a mount behind (detached first)."""
    cmd = [sys.executable, str(REPO_ROOT / "scripts" / name), *args]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=tempfs_env(),
                           stdin=subprocess.DEVNULL)
    finally:
        leftovers = fuse_mounts_under(tmp_path)
        for mp in leftovers:
            subprocess.run(["fusermount3", "-uz", mp], capture_output=True)
    assert not leftovers, f"{name} left mounts behind: {leftovers}"
    return r, dict(re.findall(r"^(\w+) (\S+) \S+$", r.stdout, re.M))


def store_sql(store: Path, statement: str, args=()) -> list[tuple]:
    """Runs SQL on a store's metadata database, as an outside edit (the store not in use)."""
    conn = sqlite3.connect(store / "meta.sqlite")
    try:
        rows = conn.execute(statement, args).fetchall()
        conn.commit()
        return rows
    finally:
        conn.close()


def executed_statements(db) -> list[str]:
    """The SQL of every statement `db.execute` runs from now on (a trigger's are not its own)."""
    statements: list[str] = []
    execute = db.execute
    db.execute = lambda sql, args=(), held_ok=False: statements.append(sql) or execute(sql, args, held_ok)
    return statements


def wait_until(predicate, timeout=5.0, interval=0.05):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval)


# ---------------------------------------------------------------- Mount

class Stopped:
    """What Mount.stop() found: true when clean; else its repr (what an assert shows) says why."""

    def __init__(self, problems: list[str], log_tail: str) -> None:
        self.problems = problems
        self.log_tail = log_tail

    def __bool__(self) -> bool:
        return not self.problems

    def __repr__(self) -> str:
        if not self.problems:
            return "Stopped(clean)"
        return f"Stopped({'; '.join(self.problems)}; the daemon's log ends:\n{self.log_tail})"


class MountFailed(AssertionError):
    pass


class Mount:
    """One tempfs mount in a temporary directory, driven through the CLI.

    Layout under `base`: mnt/, store/, tempfs.toml, keys/tempfs.key, logs.
    The key lives outside both the mountpoint and the store.
    """

    def __init__(self, base: Path, config_text: str = ""):
        Path(base).mkdir(parents=True, exist_ok=True)
        self.base = Path(base).resolve()
        self.mnt = self.base / "mnt"
        self.store = self.base / "store"
        self.config = self.base / "tempfs.toml"
        self.key_dir = self.base / "keys"
        self.key_file = self.key_dir / "tempfs.key"
        self.log = self.base / "daemon.log"
        self.mnt.mkdir(exist_ok=True)
        self.key_dir.mkdir(mode=0o700, exist_ok=True)
        if config_text is not None:
            self.config.write_text(config_text)
        self.proc: subprocess.Popen | None = None
        self.generation = 0
        self._logs: list[Path] = []
        _ALL_MOUNTPOINTS.add(str(self.mnt))

    # -- paths
    def path(self, *parts) -> Path:
        return self.mnt.joinpath(*parts)

    def __truediv__(self, other) -> Path:
        return self.mnt / other

    def mount_args(self, *extra, mnt=None, store=None, config=None, key_file=None) -> list[str]:
        return ["mount", os.fspath(mnt or self.mnt),
                "--store", os.fspath(store or self.store),
                "--config", os.fspath(config or self.config),
                "--key-file", os.fspath(key_file or self.key_file),
                *map(os.fspath, extra)]

    # -- state
    @property
    def mounted(self) -> bool:
        return is_tempfs_mounted(self.mnt)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def log_text(self) -> str:
        """Everything the daemon(s) of this Mount logged so far (all generations)."""
        parts = []
        for p in self._logs:
            try:
                parts.append(p.read_text(errors="replace"))
            except FileNotFoundError:
                pass
        return "".join(parts)

    def wait_log(self, predicate, timeout=5.0) -> str:
        """Poll the log until predicate(text) is true; returns the text either way."""
        deadline = time.monotonic() + timeout
        while True:
            text = self.log_text()
            if predicate(text) or time.monotonic() >= deadline:
                return text
            time.sleep(0.05)

    # -- mount / unmount
    def start(self, *extra, timeout=MOUNT_TIMEOUT) -> "Mount":
        """Spawn the foreground daemon and wait until the mount is live."""
        assert self.proc is None or self.proc.poll() is not None, "already running"
        self.generation += 1
        log = self.base / f"daemon.{self.generation}.log"
        self._logs.append(log)
        self.log = log
        cmd = [sys.executable, "-m", "tempfs", *self.mount_args(*extra), "--foreground"]
        before = mount_ids(self.mnt)  # a stale (dead) mount may already be there
        with open(log, "wb") as logf:
            self.proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                cwd=self.base, env=tempfs_env(), start_new_session=True,
                preexec_fn=_die_with_parent)
        _ALL_PIDS.add(self.proc.pid)
        deadline = time.monotonic() + timeout
        while True:
            # A tempfs mount is there; it is ours once it answers (a stale mount of a
            # killed daemon answers ENOTCONN, and mount ids are reused, so the id alone
            # cannot tell the new mount from the stale one). The daemon may detach the stale
            # mount just before the probe, which then answers from the folder underneath: a
            # tempfs mount must still be there after it.
            if is_tempfs_mounted(self.mnt) and (mount_ids(self.mnt) - before or
                                               answers(self.mnt, deadline - time.monotonic())) \
                    and is_tempfs_mounted(self.mnt):
                return self
            rc = self.proc.poll()
            if rc is not None:
                self.proc = None
                raise MountFailed(f"tempfs mount exited {rc} before the mount went live:\n"
                                  f"{tail(log.read_text(errors='replace'))}")
            if time.monotonic() >= deadline:
                self.stop()
                raise MountFailed(f"mount not live after {timeout}s:\n{tail(self.log_text())}")
            time.sleep(POLL)

    def stop(self, timeout=EXIT_TIMEOUT) -> "Stopped":
        """Unmount and make sure the daemon is gone; never raises. The result is true when the
        unmount was clean (plain `fusermount3 -u` worked and the daemon exited by itself), and
        else says what was not, with the end of the daemon's log."""
        problems = []
        fstype = mount_fstype(self.mnt)
        if fstype is not None and fstype.startswith("fuse"):
            r = fusermount(self.mnt)
            if r.returncode != 0:
                problems.append(f"fusermount3 -u: {r.stderr.strip()}")
        proc = self.proc
        if proc is not None:
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                problems.append(f"the daemon had not exited {timeout} s after")
        # Anything still there: lazy unmount, then kill what we started.
        if any(mp == str(self.mnt) for mp in fuse_mounts_under(self.mnt.parent)):
            problems.append("still mounted: detached lazily")
            fusermount(self.mnt, lazy=True)
        if proc is not None:
            if proc.poll() is None:
                problems.append("the daemon was killed")
                kill_pid(proc.pid)
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    pass
            self.proc = None
        # A background daemon (tempfs mount without --foreground) of this mountpoint.
        others = pids_with_arg(str(self.mnt))
        if others:
            wait_until(lambda: not any(pid_alive(p) for p in others), timeout=timeout)
            for pid in others:
                if pid_alive(pid):
                    problems.append(f"background daemon {pid} was killed")
                    kill_pid(pid)
        return Stopped(problems, tail(self.log_text()) if problems else "")

    def remount(self, *extra) -> "Mount":
        """Unmount cleanly, then mount again on the same store/key/config."""
        assert self.stop(), f"unmount was not clean:\n{tail(self.log_text())}"
        return self.start(*extra)

    # -- CLI conveniences
    def status(self) -> dict:
        r = run_tempfs("status", self.mnt, "--json", cwd=self.base)
        assert r.returncode == 0, f"status failed ({r.returncode}): {r.stderr}{r.stdout}"
        return json.loads(r.stdout)

    def mount_expect_failure(self, *extra, timeout=MOUNT_TIMEOUT, mnt=None, store=None,
                             config=None, key_file=None, env=None, foreground=False):
        """Run `tempfs mount` that is expected to fail.  Returns (returncode,
        stdout, stderr).  By default the ordinary (background) mode is used, as
        a user would; its daemon log goes to a file.  If it mounts instead, it
        is unmounted, its daemon ended, and the test fails."""
        target = Path(mnt or self.mnt)
        was_mounted = is_tempfs_mounted(target)
        before_ids = mount_ids(target)
        self.generation += 1
        log = self.base / f"failed-mount.{self.generation}.log"
        self._logs.append(log)
        args = self.mount_args(*extra, mnt=mnt, store=store, config=config, key_file=key_file)
        cmd = [sys.executable, "-m", "tempfs", *args,
               *(["--foreground"] if foreground else ["--log-file", os.fspath(log)])]
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, cwd=self.base, env=tempfs_env(env),
                                start_new_session=True, preexec_fn=_die_with_parent)
        _ALL_PIDS.add(proc.pid)
        try:
            try:
                out, err = proc.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                raise AssertionError(f"tempfs mount neither failed nor returned within {timeout}s: {cmd}")
            if mount_ids(target) - before_ids:
                raise AssertionError(f"tempfs mount succeeded (exit {proc.returncode}) but should "
                                     f"have failed: {cmd}\n{err.decode(errors='replace')}")
            return proc.returncode, out.decode(errors="replace"), err.decode(errors="replace")
        finally:
            if proc.poll() is None:
                kill_pid(proc.pid)
                proc.wait(timeout=5)
            if mount_ids(target) - before_ids:
                fusermount(target)
                time.sleep(0.5)
                if mount_ids(target) - before_ids:
                    fusermount(target, lazy=True)
            if not was_mounted:
                daemons = pids_with_arg(os.fspath(target))
                _ALL_PIDS.update(daemons)
                for pid in daemons:
                    kill_pid(pid)


# ---------------------------------------------------------------- fixtures

@pytest.fixture
def make_mount(tmp_path):
    """Factory: make_mount(config_text="", start=True, name=None, base=None) -> Mount.

    Every Mount it made is unmounted and its daemon ended at teardown."""
    made: list[Mount] = []

    def factory(config_text: str = "", start: bool = True, name: str | None = None,
                base: Path | None = None, extra=()) -> Mount:
        if base is None:
            base = tmp_path / (name or f"m{len(made)}")
        m = Mount(base, config_text)
        made.append(m)
        if start:
            m.start(*extra)
        return m

    yield factory
    problems = []
    for m in reversed(made):
        if not m.stop():
            problems.append(str(m.mnt))
    # Don't mask a test failure with a teardown error; just make sure nothing is left.
    for m in made:
        assert not any(mp == str(m.mnt) for mp in fuse_mounts_under(m.mnt.parent)), \
            f"mount left behind at {m.mnt}"


@pytest.fixture
def mounted(make_mount) -> Mount:
    """A live tempfs mount with an empty config (all defaults)."""
    return make_mount()


@pytest.fixture(scope="session", autouse=True)
def _no_mount_left_behind(tmp_path_factory):
    """At the end of the session: no fuse mount under pytest's tmp, no daemon alive."""
    base = tmp_path_factory.getbasetemp()
    yield
    leftovers = set(fuse_mounts_under(base))
    leftovers |= {mp for mp, fs in mountinfo() if fs.startswith("fuse") and mp in _ALL_MOUNTPOINTS}
    for mp in leftovers:
        fusermount(mp, lazy=True)
    alive = [pid for pid in _ALL_PIDS if pid_alive(pid)]
    for pid in alive:
        kill_pid(pid)
    assert not leftovers, f"fuse mounts left behind: {sorted(leftovers)}"
    assert not alive, f"daemon processes left behind: {alive}"
