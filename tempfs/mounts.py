"""What the kernel has mounted where, read from /proc/self/mountinfo.

`os.path.ismount` is False on a FUSE mount whose daemon died ("Transport endpoint is not
connected"), so stale mounts are found here instead, and cleaned up with fusermount3.
"""
from __future__ import annotations

import errno
import logging
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

FSTYPE = "fuse.tempfs"
BDI_FOLDER = Path("/sys/class/bdi")  # the kernel's per-device settings, readahead among them

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MountEntry:
    mountpoint: str
    fstype: str
    source: str
    device: str  # major:minor, the name of its readahead settings in BDI_FOLDER


def _unescape(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def find_mount(path: Path) -> Optional[MountEntry]:
    """The mount whose mountpoint is exactly `path` (the last one, if stacked)."""
    target = os.path.abspath(path)
    found = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields, tail = left.split(), right.split()
            if len(fields) >= 5 and len(tail) >= 2 and _unescape(fields[4]) == target:
                found = MountEntry(target, tail[0], _unescape(tail[1]), fields[2])
    return found


def set_read_ahead(path: Path, kib: int) -> bool:
    """Lets the kernel read ahead `kib` KiB (and so send reads that large) on the mount at
    `path`; only root may. Found through mountinfo, never by asking the mount itself: its
    daemon may be the caller, not serving yet."""
    entry = find_mount(path)
    if entry is None:
        return False
    try:
        (BDI_FOLDER / entry.device / "read_ahead_kb").write_text(f"{kib}\n")
    except OSError as e:  # not root, or a read-only /sys (a container): the kernel's default stays
        log.debug("readahead of %s left at the kernel's default: %s", path, e)
        return False
    return True


def is_stale(path: Path) -> bool:
    """True when `path` is a mount whose daemon no longer answers."""
    if find_mount(path) is None:
        return False
    try:
        os.statvfs(path)  # always asks the daemon; stat() may answer from the kernel's cache
    except OSError as e:
        return e.errno in (errno.ENOTCONN, errno.ECONNABORTED)
    return False


def fusermount_unmount(path: Path, lazy: bool = False) -> subprocess.CompletedProcess:
    args = ["fusermount3", "-uz" if lazy else "-u", str(path)]
    return subprocess.run(args, capture_output=True, text=True)
