"""The right to erasure: remove every entry of a mounted tempfs whose name matches a pattern,
make the removal durable, and say what went in a report that can be kept as evidence.

Guarantees:
- Only entries below the schema folders are removed; schema folders are never touched, even
  when their name matches (the search goes on below them).
- A matching folder goes with everything in it.
- When `erase` returns, the removal is durable and the content is shredded: tempfs frees a
  removed file's content as soon as it is closed and unnamed, and the final fsync of the mount's
  root commits it, deletes the packs it emptied and checkpoints the metadata so the object keys
  do not survive in it (what is left of the content in other packs cannot be decrypted). An
  entry still open by a program keeps its content until closed; the report lists it.
- The report holds names and sizes, never content.
"""
from __future__ import annotations

import errno
import fnmatch
import os
import shutil
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional

from .clock import iso_utc

STORED_XATTR = "user.tempfs.stored_size"


@dataclass
class Erased:
    path: str
    kind: str            # "file", "folder", "symlink", "other"
    logical_bytes: int
    stored_bytes: int
    entries: int = 1     # a folder counts what was inside it too


@dataclass
class ErasureReport:
    mountpoint: str
    pattern: str
    area: Optional[str]
    started: str = ""
    finished: str = ""
    host: str = field(default_factory=socket.gethostname)
    erased: list[Erased] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)   # "path: reason"
    open_when_erased: list[str] = field(default_factory=list)

    @property
    def entries(self) -> int:
        return sum(e.entries for e in self.erased)

    def to_dict(self) -> dict:
        return {"mountpoint": self.mountpoint, "pattern": self.pattern, "area": self.area, "host": self.host,
                "started": self.started, "finished": self.finished, "entries": self.entries,
                "logical_bytes": sum(e.logical_bytes for e in self.erased),
                "stored_bytes": sum(e.stored_bytes for e in self.erased),
                "erased": [vars(e) for e in self.erased], "failed": self.failed,
                "open_when_erased": self.open_when_erased}


def matcher(pattern: str):
    """A shell pattern matches whole names; a plain string (a session id) matches any name
    that contains it."""
    if not any(c in pattern for c in "*?["):
        pattern = f"*{pattern}*"
    return lambda name: fnmatch.fnmatchcase(name, pattern)


def erase(mountpoint: Path, pattern: str, schema_folders: Iterable[str], area: Optional[str] = None,
          dry_run: bool = False) -> ErasureReport:
    """Removes every matching entry below the schema folders (of one area if given)."""
    report = ErasureReport(str(mountpoint), pattern, area, started=_now())
    schema = set(schema_folders)
    matches = matcher(pattern)
    tops = [area] if area else sorted(f for f in schema if "/" not in f)
    walk = _Walk(mountpoint, schema, matches, report, dry_run, _open_inodes(mountpoint))
    for top in tops:
        walk.below(mountpoint / top)
    if not dry_run:
        _make_durable(mountpoint)
    report.finished = _now()
    return report


@dataclass
class _Walk:
    root: Path
    schema: set[str]
    matches: object
    report: ErasureReport
    dry_run: bool
    open_inodes: set[int]

    def below(self, folder: Path) -> None:
        try:
            entries = list(os.scandir(folder))
        except OSError as e:
            self.report.failed.append(f"{folder}: {e.strerror}")
            return
        for entry in entries:
            relative = os.path.relpath(entry.path, self.root)
            is_schema = relative in self.schema
            if self.matches(entry.name) and not is_schema:
                self.erase(Path(entry.path), relative)
            elif is_schema or entry.is_dir(follow_symlinks=False):
                self.below(Path(entry.path))

    def erase(self, path: Path, relative: str) -> None:
        try:
            record = _measure(path, relative)
            if os.lstat(path).st_ino in self.open_inodes:
                self.report.open_when_erased.append(relative)
            if not self.dry_run:
                if record.kind == "folder":
                    shutil.rmtree(path)
                else:
                    path.unlink()
            self.report.erased.append(record)
        except OSError as e:
            self.report.failed.append(f"{relative}: {e.strerror or e}")


def _measure(path: Path, relative: str) -> Erased:
    st = os.lstat(path)
    if not os.path.isdir(path) or os.path.islink(path):
        kind = "symlink" if os.path.islink(path) else "file" if path.is_file() else "other"
        return Erased(relative, kind, st.st_size if kind == "file" else 0, _stored(path, st))
    record = Erased(relative, "folder", 0, 0)
    for folder, dirs, files in os.walk(path):
        for name in dirs + files:
            inner = Path(folder) / name
            inner_st = os.lstat(inner)
            record.entries += 1
            if os.path.isfile(inner) and not os.path.islink(inner):
                record.logical_bytes += inner_st.st_size
                record.stored_bytes += _stored(inner, inner_st)
    return record


def _stored(path: Path, st: os.stat_result) -> int:
    try:
        return int(os.getxattr(path, STORED_XATTR, follow_symlinks=False))
    except (OSError, ValueError):
        return st.st_blocks * 512


def _open_inodes(mountpoint: Path) -> set[int]:
    """Inodes of the mount that some process on this machine holds open (from /proc). Only fds
    whose link names a path inside the mount are stat()ed: a hung filesystem elsewhere cannot
    stall the erasure."""
    dev = os.stat(mountpoint).st_dev
    prefix = str(mountpoint).rstrip("/") + "/"
    inodes = set()
    for fd_dir in Path("/proc").glob("[0-9]*/fd"):
        try:
            for fd in os.scandir(fd_dir):
                if os.readlink(fd.path).startswith(prefix):
                    st = os.stat(fd.path)
                    if st.st_dev == dev:
                        inodes.add(st.st_ino)
        except OSError:
            continue
    return inodes


def _make_durable(mountpoint: Path) -> None:
    """fsync of a folder in tempfs commits the metadata durably; the commit deletes the packs it
    emptied and checkpoints the metadata so no destroyed key survives in it."""
    fd = os.open(mountpoint, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno != errno.EINVAL:
            raise
    finally:
        os.close(fd)


def _now() -> str:
    return iso_utc(time.time_ns(), millis=True)
