"""Pack files: sealed objects appended back to back in files of up to PACK_MAX bytes under
STORE/packs/, each located by the (pack, offset, stored size) of its metadata row.

Creating a file per object cost more CPU than sealing it (ext4's inode allocator slows down
under the create/delete churn of a temp store); appending to an open file costs a copy. Each
stream (an area, or the compactor) appends to its own pack, so what is written together, and
expires together, shares files: a pack mostly empties as a whole and is then deleted. The
compactor (BlockStore.compact) moves what lives in a mostly dead pack to a new one.

Guarantees:
- Bytes are only appended past every reservation made so far, never written over, so the bytes
  a row points at never change while it does.
- `sync()` makes every append since the last sync durable (and the folder entry of each new
  pack), so metadata committed after it never points at data a power cut lost; a sync that
  starts while another runs returns only after it (that one may be fsyncing its packs). A
  pack that fills up has its writeback started at once (sync_file_range, no waiting), so an
  fsync after a large write finds most of it on disk already instead of writing it all then.
- A pack is deleted only when `busy()` is false: it is not being appended to and every append
  into it has been settled (its row inserted, or given up), so no reference can be on its way.
  A pack emptied while being appended to is ended (`release`), so it goes too.
- Reads are bounded in size and a short read is an error: every byte read back is untrusted.
"""
from __future__ import annotations

import ctypes
import logging
import os
import re
import secrets
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Hashable, Iterable, Mapping

from .objects import MAX_OBJECT_BYTES

log = logging.getLogger(__name__)

PACK_MAX = 32 * 1024 * 1024  # bytes appended to a pack before the next one starts
_IOV_MAX = 1024  # buffers one pwritev() takes (Linux)
_PACK_NAME = re.compile(r"[0-9a-f]{16}")
_SYNC_FILE_RANGE_WRITE = 2  # <fcntl.h>: start writing the dirty pages out, do not wait


@dataclass(eq=False)
class _OpenPack:
    id: int
    fd: int
    end: int = 0        # the next append's offset
    writers: int = 0    # appends running now
    last_append: float = 0.0  # time.monotonic() of the last one
    retired: bool = False  # full: its fd closes when its last append ends


class PackFiles:
    def __init__(self, root: Path) -> None:
        self.root = root
        self._lock = threading.Lock()  # appends run in worker threads
        self._sync_lock = threading.Lock()  # held through a sync's fsyncs
        self._open: dict[Hashable, _OpenPack] = {}  # stream -> the pack it appends to
        self._unsettled: Counter[int] = Counter()  # pack -> appends whose row is not settled
        self._unsynced: set[int] = set()
        self._folder_unsynced = False

    def path(self, pack_id: int) -> Path:
        return self.root / f"{pack_id:016x}"

    # ---- appending (worker threads) ----------------------------------------------------------
    def append(self, data: bytes, stream: Hashable) -> tuple[int, int]:
        """Appends sealed bytes to the stream's pack; returns (pack, offset). The caller settles
        the append (`settle`) once the row pointing at it is in the metadata, or given up."""
        return self.append_many([data], stream)[0]

    def append_many(self, items: list[bytes], stream: Hashable) -> list[tuple[int, int]]:
        """append() of each item, in one write per pack: concurrent writes to one file wait for
        each other in the kernel, so fewer of them cost less."""
        places: list[tuple[_OpenPack, int]] = []
        filled: list[int] = []  # packs this append ended because they are full
        with self._lock:
            try:
                for data in items:
                    pack = self._open.get(stream)
                    if pack is None or (pack.end and pack.end + len(data) > PACK_MAX):
                        if pack is not None:
                            filled.append(pack.id)
                            self._retire(pack)
                            del self._open[stream]  # even if no new one can be made (the disk is full)
                        pack = self._open[stream] = self._start()
                    if not places or places[-1][0] is not pack:
                        pack.writers += 1  # a retired pack keeps its fd until its writers are done
                    places.append((pack, pack.end))
                    pack.end += len(data)
                    pack.last_append = time.monotonic()
                    self._unsettled[pack.id] += 1
            except BaseException:
                self._give_up(places)
                raise
        runs: dict[_OpenPack, list[int]] = {}  # pack -> the items it takes, in order
        for i, (pack, _) in enumerate(places):
            runs.setdefault(pack, []).append(i)
        try:
            for pack, run in runs.items():
                _pwritev_all(pack.fd, [items[i] for i in run], places[run[0]][1])
        except BaseException:
            with self._lock:
                self._give_up(places)
            raise
        with self._lock:
            self._written(runs)
        for pack_id in filled:
            self._start_writeback(pack_id)
        return [(pack.id, offset) for pack, offset in places]

    def _start_writeback(self, pack_id: int) -> None:
        """Asks the kernel to start writing a pack's dirty pages to disk now rather than at the
        next fsync (which then waits for less: 32 files of 32 MiB written, then fsynced, took 0.63 s
        to fsync, 0.02 s with this; a virtio disk). Only a hint: an append still running into
        the pack is written by that fsync."""
        if _sync_file_range is None:
            return
        try:
            fd = os.open(self.path(pack_id), os.O_RDONLY)
        except OSError:
            return  # deleted since
        try:
            if _sync_file_range(fd, 0, 0, _SYNC_FILE_RANGE_WRITE) != 0:
                log.debug("writeback of pack %016x not started: %s", pack_id, os.strerror(ctypes.get_errno()))
        finally:
            os.close(fd)

    def _give_up(self, places: list[tuple[_OpenPack, int]]) -> None:
        """Appends reserved that will not be made (under the lock)."""
        for pack, _ in places:
            self._unsettle(pack.id)
        self._written(dict.fromkeys(pack for pack, _ in places))

    def _written(self, packs: Iterable[_OpenPack]) -> None:
        """The writers of these packs are done (under the lock)."""
        for pack in packs:
            pack.writers -= 1
            if pack.retired and pack.writers == 0:
                os.close(pack.fd)
            self._unsynced.add(pack.id)

    def _start(self) -> _OpenPack:
        """A new, empty pack (under the lock)."""
        self.root.mkdir(exist_ok=True)  # the store folder itself is never made here
        pack_id = secrets.randbits(63)
        fd = os.open(self.path(pack_id), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        self._folder_unsynced = True
        return _OpenPack(pack_id, fd)

    def _retire(self, pack: _OpenPack) -> None:
        pack.retired = True
        if pack.writers == 0:
            os.close(pack.fd)

    def _unsettle(self, pack_id: int) -> None:
        self._unsettled[pack_id] -= 1
        if self._unsettled[pack_id] <= 0:
            del self._unsettled[pack_id]

    def settle(self, pack_ids: Iterable[int]) -> None:
        """One call per append returned: its row is in the metadata, or will never be."""
        with self._lock:
            for pack_id in pack_ids:
                self._unsettle(pack_id)

    def busy(self, pack_id: int) -> bool:
        """Being appended to, or holding appends not yet settled: not to be deleted."""
        with self._lock:
            return pack_id in self._unsettled or any(p.id == pack_id for p in self._open.values())

    def release(self, pack_id: int) -> bool:
        """True if nothing can come into the pack any more (it is not busy, or was being appended
        to with no append unsettled: it is ended, and the stream's next append starts a new one)."""
        with self._lock:
            if pack_id in self._unsettled:
                return False
            self._end({pack_id})
            return True

    def seal_idle(self, dead_bytes: Mapping[int, int], min_dead: float, idle: float) -> None:
        """Ends the packs nothing was appended to for `idle` seconds that are at least `min_dead`
        dead (so the compactor can take them: a quiet area's last pack would otherwise keep
        its dead bytes until it fills)."""
        now = time.monotonic()
        with self._lock:
            self._end({pack.id for pack in self._open.values()
                       if now - pack.last_append >= idle and pack.id not in self._unsettled
                       and dead_bytes.get(pack.id, 0) >= min_dead * pack.end})

    def seal_all(self) -> None:
        with self._lock:
            self._end({pack.id for pack in self._open.values()})

    def _end(self, pack_ids: set[int]) -> None:
        """(Under the lock.)"""
        for stream, pack in list(self._open.items()):
            if pack.id in pack_ids:
                self._retire(pack)
                del self._open[stream]

    # ---- reading, syncing, deleting ----------------------------------------------------------
    def read(self, pack_id: int, offset: int, size: int) -> bytes:
        if not 0 <= size <= MAX_OBJECT_BYTES or offset < 0:
            raise OSError(f"pack {pack_id:016x}: no object of {size} bytes at {offset}")
        fd = os.open(self.path(pack_id), os.O_RDONLY)
        try:
            data = os.pread(fd, size, offset)
        finally:
            os.close(fd)
        if len(data) != size:
            raise OSError(f"pack {pack_id:016x} ends before the object at {offset} ({len(data)} of {size} bytes)")
        return data

    def sync(self) -> None:
        """fsyncs every pack appended to since the last sync, and the folder if a pack was made."""
        # held through the fsyncs: a sync that finds nothing pending may come while another,
        # which took the packs its caller appended to, is still fsyncing them
        with self._sync_lock:
            self._sync_pending()

    def synced(self) -> bool:
        """Whether every append made so far is durable: none waits for a sync, none is in one."""
        with self._lock:
            return not self._unsynced and not self._folder_unsynced and not self._sync_lock.locked()

    def _sync_pending(self) -> None:
        with self._lock:
            pending, self._unsynced = self._unsynced, set()
            folder, self._folder_unsynced = self._folder_unsynced, False
        try:
            for pack_id in pending:
                try:
                    fd = os.open(self.path(pack_id), os.O_RDONLY)
                except FileNotFoundError:
                    continue  # deleted since: nothing references it
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            if folder:
                fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        except OSError:
            with self._lock:  # not durable: the next sync tries again
                self._unsynced |= pending
                self._folder_unsynced |= folder
            raise

    def remove(self, pack_id: int) -> bool:
        """Deletes a pack unless it is busy; True if it is gone."""
        if self.busy(pack_id):
            return False
        self.path(pack_id).unlink(missing_ok=True)
        with self._lock:
            self._unsynced.discard(pack_id)
        return True

    def sizes(self) -> tuple[dict[int, int], list[str]]:
        """{pack id: size} of the pack files on disk, and the paths of other files there."""
        packs: dict[int, int] = {}
        strays: list[str] = []
        try:
            entries = list(os.scandir(self.root))
        except FileNotFoundError:
            return packs, strays
        for entry in entries:
            try:
                if _PACK_NAME.fullmatch(entry.name) and entry.is_file(follow_symlinks=False) \
                        and int(entry.name, 16) < 2**63:
                    packs[int(entry.name, 16)] = entry.stat(follow_symlinks=False).st_size
                else:
                    strays.append(entry.path)
            except FileNotFoundError:
                continue  # deleted meanwhile
        return packs, strays

    def close(self) -> None:
        self.seal_all()


def _pwritev_all(fd: int, buffers: list[bytes], offset: int) -> None:
    views = [memoryview(b) for b in buffers if b]
    while views:
        n = os.pwritev(fd, views[:_IOV_MAX], offset)
        offset += n
        while views and n >= len(views[0]):
            n -= len(views.pop(0))
        if n:
            views[0] = views[0][n:]


def _load_sync_file_range():
    """The C library's sync_file_range (Linux), which Python's os module lacks; None elsewhere."""
    try:
        function = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


_sync_file_range = _load_sync_file_range()
