"""What the long-running scripts (crashtest.py, soak.py) share: a tempfs daemon started as a child
of the harness, waited for until it answers, and always unmounted and ended at the end.

The daemon dies (unmounting cleanly, on SIGTERM) with the harness; mounts are found through
/proc/self/mountinfo (tempfs.mounts), since a dead FUSE mount is no longer a mount point for
`os.path.ismount`.
"""
from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tempfs.mounts import find_mount, fusermount_unmount  # noqa: E402 (the tree of this script)


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """In a child (preexec_fn): the kernel sends it `sig` when the harness dies."""
    ctypes.CDLL(None).prctl(1, sig, 0, 0, 0)  # PR_SET_PDEATHSIG


def script_env() -> dict:
    """The environment of every child: this tree's tempfs, unbuffered output."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    return env


def mounted(path: Path) -> bool:
    entry = find_mount(path)
    return entry is not None and entry.fstype.startswith("fuse")


def answers(path: Path, timeout: float) -> bool:
    """Whether the filesystem at `path` answers statfs (always a request to the daemon), asked
    from a thread so that a hung daemon cannot hang the harness."""
    result: list[bool] = []

    def probe() -> None:
        try:
            os.statvfs(path)
            result.append(True)
        except OSError:
            result.append(False)
    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout)
    return bool(result and result[0])


def start_daemon(mount_args: list[str], mnt: Path, log: Path, timeout: float,
                 cwd: Path | None = None) -> subprocess.Popen:
    """`tempfs mount MNT ARGS --foreground`, its output appended to `log`; returns once the mount
    answers; raises RuntimeError if the daemon exits first or `timeout` passes."""
    cmd = [sys.executable, "-m", "tempfs", "mount", str(mnt), *mount_args, "--foreground"]
    with open(log, "ab") as f:
        daemon = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT,
                                  env=script_env(), cwd=cwd, start_new_session=True, preexec_fn=die_with_parent)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if daemon.poll() is not None:
            raise RuntimeError(f"the daemon exited {daemon.returncode} before mounting:\n"
                               f"{log.read_text(errors='replace')[-3000:]}")
        if mounted(mnt) and answers(mnt, 5):
            return daemon
        time.sleep(0.05)
    raise RuntimeError(f"not mounted within {timeout:.0f} s:\n{log.read_text(errors='replace')[-3000:]}")


def unmount(mnt: Path, daemon: subprocess.Popen, timeout: float) -> tuple[str | None, int]:
    """Unmounts (retrying while busy, detaching at last) and waits for the daemon (killed after
    `timeout`). Returns why the clean unmount failed (None if it did not) and the exit code."""
    problem = None
    for _ in range(50):
        r = fusermount_unmount(mnt)
        if r.returncode == 0:
            break
        time.sleep(0.2)
    else:
        problem = f"cannot unmount {mnt}: {r.stderr.strip()}"
        fusermount_unmount(mnt, lazy=True)
    try:
        code = daemon.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        daemon.kill()
        code = daemon.wait()
    return problem, code


def tear_down(mnt: Path, daemon: subprocess.Popen | None, timeout: float) -> None:
    """At the end, whatever happened: the daemon unmounted and ended, no mount left behind."""
    if daemon is not None and daemon.poll() is None:
        fusermount_unmount(mnt)
        try:
            daemon.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait()
    if mounted(mnt):
        fusermount_unmount(mnt, lazy=True)
