"""Object files: one sealed block per file under STORE/objects/, sharded by id: in 256 folders
by the id's first two hex digits (objects/ab/<id>), or, in stores made before that, in 65,536
(objects/ab/cd/<id>; a folder each takes a disk block, and a new store created one for nearly
every object it wrote).

The files of dead objects are kept in objects/free/ (up to FREE_MAX) and rewritten for new
objects: on ext4 rewriting an allocated file costs a tenth of the CPU of creating one, whose
inode allocator slows down under the create/delete churn of a temp store (`recently_deleted`).

Guarantees: an object's file gets its name only once fully written, and never a name that
exists (O_EXCL, link(2)), so a committed reference can never point at a half-written file; a
reused file held only objects no committed metadata references, and whatever it held before
fails authentication as the new object; `sync()` makes every object written since the last sync
durable, so the metadata committed after it never points at data a power cut lost. Reads are
bounded in size, since every byte read back is untrusted.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import stat
import threading
from pathlib import Path

MAX_OBJECT_BYTES = 17 * 1024 * 1024
SYNCFS_OVER = 16  # more objects than this to make durable: one syncfs(2) instead of an fsync each
FREE_FOLDER = "free"  # below the objects folder: files of dead objects, to be rewritten
FREE_MAX = 512        # about 64 MiB of disk held for reuse

_libc = ctypes.CDLL(None, use_errno=True)


class ObjectFiles:
    def __init__(self, root: Path, levels: int = 1) -> None:
        if levels not in (1, 2):
            raise ValueError(f"object folders nest 1 or 2 levels deep, not {levels!r}")
        self.root = root
        self.levels = levels
        self._unsynced: set[int] = set()
        self._lock = threading.Lock()  # writes run in worker threads
        self._free_folder = root / FREE_FOLDER
        self.keep_free = True  # off while the disk nears its floor (Store.keep_free_files)
        try:  # left by the last daemon
            self._free = sorted(self._free_folder.iterdir())[:FREE_MAX]
        except FileNotFoundError:
            self._free = []

    def path(self, object_id: int) -> Path:
        return self.root.joinpath(*shards(f"{object_id:016x}", self.levels))

    def write(self, object_id: int, data: bytes) -> None:
        path = self.path(object_id)
        with self._lock:
            reused = self._free.pop() if self._free else None
        if reused is None or not self._rewrite(reused, path, data):
            self._create(path, data)
        with self._lock:
            self._unsynced.add(object_id)

    def _create(self, path: Path, data: bytes) -> None:
        fd = self._made_as_needed(path, lambda: os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        try:
            _write_all(fd, data)
        except BaseException:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise
        os.close(fd)

    def _rewrite(self, old: Path, path: Path, data: bytes) -> bool:
        """Rewrites a free file as `path`; False if it is unusable (gone, the disk refused, or not
        a plain file of its own: what sits in the store folder is untrusted, and a planted link
        must not make the daemon write elsewhere)."""
        try:
            fd = os.open(old, os.O_WRONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
            try:
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
                    raise OSError(f"{old} is not a plain file of its own")
                _write_all(fd, data)
                if os.fstat(fd).st_size != len(data):
                    os.ftruncate(fd, len(data))
            finally:
                os.close(fd)
            self._made_as_needed(path, lambda: os.link(old, path))  # never replaces a file
        except OSError:
            old.unlink(missing_ok=True)
            return False
        with contextlib.suppress(OSError):
            old.unlink()
        return True

    def _made_as_needed(self, path: Path, make):
        try:
            return make()
        except FileNotFoundError:
            # the objects folder and its shards are made as needed, the store folder never: if it
            # is gone (removed while mounted) the write fails rather than start a stray store
            for folder in reversed(path.parents[:self.levels + 1]):
                folder.mkdir(exist_ok=True)
            return make()

    def read(self, object_id: int) -> bytes:
        with open(self.path(object_id), "rb", buffering=0) as f:
            size = os.fstat(f.fileno()).st_size
            if size > MAX_OBJECT_BYTES:
                raise OSError(f"object {object_id:016x} is larger than any object tempfs writes")
            return f.read(size)

    def remove(self, object_id: int) -> None:
        """Deletes an object's file, or keeps it in the free folder for a new object."""
        path = self.path(object_id)
        with self._lock:
            self._unsynced.discard(object_id)
            keep = self.keep_free and len(self._free) < FREE_MAX
        if not (keep and self._kept_free(path)):
            path.unlink(missing_ok=True)

    def drop_free(self) -> int:
        """Deletes the files kept for reuse (the disk needs the room); returns how many."""
        with self._lock:
            free, self._free = self._free, []
        for path in free:
            path.unlink(missing_ok=True)
        return len(free)

    def _kept_free(self, path: Path) -> bool:
        free = self._free_folder / path.name
        try:
            try:
                os.rename(path, free)
            except FileNotFoundError:
                if not path.exists():
                    return True  # no file: nothing to keep or delete
                self._free_folder.mkdir(exist_ok=True)
                os.rename(path, free)
        except OSError:
            return False
        with self._lock:
            self._free.append(free)
        return True

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


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def shards(name: str, levels: int) -> tuple[str, ...]:
    """The folders and file name of object file `name` below the objects folder."""
    return (name[:2], name) if levels == 1 else (name[:2], name[2:4], name)
