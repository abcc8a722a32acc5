"""Object files: one sealed block per file under STORE/objects/, sharded by id: in 256 folders
by the id's first two hex digits (objects/ab/<id>), or, in stores made before that, in 65,536
(objects/ab/cd/<id>; a folder each takes a disk block, and a new store created one for nearly
every object it wrote).

Guarantees: an object file is created once and never rewritten (O_EXCL), so a committed
reference can never point at a half-rewritten file; `sync()` makes every object written since
the last sync durable, so the metadata committed after it never points at data a power cut lost.
Reads are bounded in size, since every byte read back is untrusted.
"""
from __future__ import annotations

import ctypes
import os
import threading
from pathlib import Path

MAX_OBJECT_BYTES = 17 * 1024 * 1024
SYNCFS_OVER = 16  # more objects than this to make durable: one syncfs(2) instead of an fsync each

_libc = ctypes.CDLL(None, use_errno=True)


class ObjectFiles:
    def __init__(self, root: Path, levels: int = 1) -> None:
        if levels not in (1, 2):
            raise ValueError(f"object folders nest 1 or 2 levels deep, not {levels!r}")
        self.root = root
        self.levels = levels
        self._unsynced: set[int] = set()
        self._lock = threading.Lock()  # writes run in worker threads

    def path(self, object_id: int) -> Path:
        return self.root.joinpath(*shards(f"{object_id:016x}", self.levels))

    def write(self, object_id: int, data: bytes) -> None:
        path = self.path(object_id)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileNotFoundError:
            # the objects folder and its shards are made as needed, the store folder never: if it
            # is gone (removed while mounted) the write fails rather than start a stray store
            for folder in reversed(path.parents[:self.levels + 1]):
                folder.mkdir(exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        except BaseException:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise
        os.close(fd)
        with self._lock:
            self._unsynced.add(object_id)

    def read(self, object_id: int) -> bytes:
        with open(self.path(object_id), "rb", buffering=0) as f:
            size = os.fstat(f.fileno()).st_size
            if size > MAX_OBJECT_BYTES:
                raise OSError(f"object {object_id:016x} is larger than any object tempfs writes")
            return f.read(size)

    def remove(self, object_id: int) -> None:
        with self._lock:
            self._unsynced.discard(object_id)
        self.path(object_id).unlink(missing_ok=True)

    def _sync_filesystem(self, pending: set[int]) -> None:
        """One syncfs(2) writes back the whole filesystem under the store (objects and their
        folders), where thousands of fsyncs would each wait for a journal commit."""
        fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            if _libc.syncfs(fd) != 0:
                err = ctypes.get_errno()
                with self._lock:
                    self._unsynced |= pending  # not durable: the next sync tries again
                raise OSError(err, os.strerror(err), str(self.root))
        finally:
            os.close(fd)

    def sync(self) -> None:
        """fsyncs every object (and its folder) written since the last sync."""
        with self._lock:
            pending, self._unsynced = self._unsynced, set()
        if len(pending) > SYNCFS_OVER and hasattr(_libc, "syncfs"):
            self._sync_filesystem(pending)
            return
        folders = set()
        for object_id in pending:
            path = self.path(object_id)
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                continue  # removed since: nothing references it any more
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            folders.update(path.parents[:self.levels])
        for folder in folders:
            fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def all_ids(self) -> set[int]:
        """Every object id present on disk (for fsck and orphan cleanup)."""
        ids = set()
        for path in self.root.glob("??/" * self.levels + "*"):
            try:
                ids.add(int(path.name, 16))
            except ValueError:
                continue
        return ids


def shards(name: str, levels: int) -> tuple[str, ...]:
    """The folders and file name of object file `name` below the objects folder."""
    return (name[:2], name) if levels == 1 else (name[:2], name[2:4], name)
