"""File content as fixed-size blocks: dirty blocks in memory, clean blocks in an LRU, sealed
objects on disk, identical blocks stored once.

Guarantees:
- A missing block is a hole and reads as zeros; an all-zero block is stored as a hole.
- A block's bytes never extend past its file's size, so growing a file shows zeros.
- An object is written before the metadata that references it, and its file is removed only
  after the commit that drops its last reference.
- Dirty data is bounded by `dirty_limit`: a writer that would pass it waits for the flusher.
- Sealing, hashing and disk I/O run in worker threads; the trio thread only touches SQLite.
"""
from __future__ import annotations

import logging
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Optional

import trio

from ..codec import ContentCodec, IntegrityError
from .db import Database
from .objects import ObjectFiles

log = logging.getLogger(__name__)

FLUSH_AGE = 2.0          # seconds a block may stay dirty when there is no pressure
FLUSH_PARALLELISM = 4    # blocks sealed at once (2 cores, plus disk waits)


class BlockReadError(Exception):
    """A block could not be read back: missing, unreadable or unauthentic object."""

    def __init__(self, inode: int, blockno: int, reason: str) -> None:
        super().__init__(f"inode {inode} block {blockno}: {reason}")
        self.inode, self.blockno, self.reason = inode, blockno, reason


@dataclass(eq=False)
class DirtyBlock:
    data: bytearray
    since: float = field(default_factory=time.monotonic)
    version: int = 0
    flushing: Optional[trio.Event] = None


class BlockStore:
    def __init__(self, db: Database, objects: ObjectFiles, codec: ContentCodec,
                 block_size: int, dirty_limit: int, cache_limit: int) -> None:
        self.db, self.objects, self.codec = db, objects, codec
        self.block_size = block_size
        self.dirty_limit = max(dirty_limit, 4 * block_size)
        self.cache_limit = cache_limit
        self.dirty: dict[tuple[int, int], DirtyBlock] = {}
        self.dirty_bytes = 0
        self._clean: OrderedDict[int, bytes] = OrderedDict()
        self._clean_bytes = 0
        self._flush_slots = trio.CapacityLimiter(FLUSH_PARALLELISM)
        self._flusher_lot = trio.lowlevel.ParkingLot()
        self._room_lot = trio.lowlevel.ParkingLot()

    # ---- reading -------------------------------------------------------------------------
    async def read(self, inode: int, offset: int, size: int, file_size: int) -> bytes:
        end = min(offset + size, file_size)
        pieces = []
        pos = offset
        while pos < end:
            blockno, start = divmod(pos, self.block_size)
            stop = min(end - blockno * self.block_size, self.block_size)
            block = await self._block(inode, blockno)
            piece = bytes(block[start:stop])
            pieces.append(piece + bytes(stop - start - len(piece)))
            pos += stop - start
        return b"".join(pieces)

    async def _block(self, inode: int, blockno: int) -> bytes | bytearray:
        for _attempt in range(3):
            dirty = self.dirty.get((inode, blockno))
            if dirty is not None:
                return dirty.data
            object_id = self._mapped(inode, blockno)
            if object_id is None:
                return b""
            try:
                return await self._object(object_id)
            except (OSError, IntegrityError) as e:
                if self._mapped(inode, blockno) == object_id:
                    raise BlockReadError(inode, blockno, str(e)) from None
                # the block was rewritten while we read it: read the new one
        raise BlockReadError(inode, blockno, "block keeps changing under the reader")

    def _mapped(self, inode: int, blockno: int) -> Optional[int]:
        row = self.db.one("SELECT object FROM blocks WHERE inode=? AND blockno=?", (inode, blockno))
        return None if row is None else row[0]

    async def _object(self, object_id: int) -> bytes:
        plain = self._clean.get(object_id)
        if plain is not None:
            self._clean.move_to_end(object_id)
            return plain
        row = self.db.one("SELECT wrapped_key FROM objects WHERE id=?", (object_id,))
        if row is None:
            raise IntegrityError(f"object {object_id:016x} is not in the object table")
        plain = await trio.to_thread.run_sync(self._load, object_id, row[0])
        self._remember(object_id, plain)
        return plain

    def _load(self, object_id: int, wrapped_key: bytes) -> bytes:
        plain = self.codec.open(object_id, self.objects.read(object_id), wrapped_key)
        if len(plain) > self.block_size:
            raise IntegrityError(f"object {object_id:016x} is larger than a block")
        return plain

    def _remember(self, object_id: int, plain: bytes) -> None:
        if object_id in self._clean:
            return
        self._clean[object_id] = plain
        self._clean_bytes += len(plain)
        while self._clean_bytes > self.cache_limit and self._clean:
            _, old = self._clean.popitem(last=False)
            self._clean_bytes -= len(old)

    def _forget_object(self, object_id: int) -> None:
        plain = self._clean.pop(object_id, None)
        if plain is not None:
            self._clean_bytes -= len(plain)

    # ---- writing -------------------------------------------------------------------------
    async def write(self, inode: int, offset: int, data: bytes) -> None:
        pos = 0
        while pos < len(data):
            blockno, start = divmod(offset + pos, self.block_size)
            n = min(self.block_size - start, len(data) - pos)
            block = await self._dirty_block(inode, blockno, whole=(start == 0 and n == self.block_size))
            buf = block.data
            if len(buf) < start:
                buf.extend(bytes(start - len(buf)))
            buf[start:start + n] = data[pos:pos + n]
            block.version += 1
            pos += n

    async def _dirty_block(self, inode: int, blockno: int, whole: bool) -> DirtyBlock:
        key = (inode, blockno)
        while True:
            block = self.dirty.get(key)
            if block is not None:
                return block
            if self.dirty_bytes + self.block_size > self.dirty_limit:
                self._flusher_lot.unpark_all()
                await self._room_lot.park()
                continue
            base = b"" if whole else await self._block(inode, blockno)
            if key in self.dirty:
                continue  # another writer made it while we read
            block = DirtyBlock(bytearray(base))
            self.dirty[key] = block
            self.dirty_bytes += self.block_size
            if self.dirty_bytes > self.dirty_limit // 2:
                self._flusher_lot.unpark_all()
            return block

    async def cut_tail(self, inode: int, size: int) -> None:
        """Makes sure the block holding byte `size` keeps nothing at or past it."""
        blockno, keep = divmod(size, self.block_size)
        if keep == 0 or ((inode, blockno) not in self.dirty and self._mapped(inode, blockno) is None):
            return
        block = await self._dirty_block(inode, blockno, whole=False)
        if len(block.data) > keep:
            del block.data[keep:]
            block.version += 1

    def drop_after(self, inode: int, size: int) -> None:
        """Forgets every block wholly at or past `size` (truncation, deletion with size 0)."""
        first = -(-size // self.block_size)
        for key in [k for k in self.dirty if k[0] == inode and k[1] >= first]:
            self._discard_dirty(key)
        rows = self.db.execute("SELECT object FROM blocks WHERE inode=? AND blockno>=?", (inode, first)).fetchall()
        self.db.execute("DELETE FROM blocks WHERE inode=? AND blockno>=?", (inode, first))
        for (object_id,) in rows:
            self._decref(object_id)

    def _discard_dirty(self, key: tuple[int, int]) -> None:
        del self.dirty[key]
        self.dirty_bytes -= self.block_size
        self._room_lot.unpark_all()

    # ---- flushing ------------------------------------------------------------------------
    async def run_flusher(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            with trio.move_on_after(FLUSH_AGE / 2):
                await self._flusher_lot.park()
            pressure = self.dirty_bytes > self.dirty_limit // 2
            now = time.monotonic()
            due = [k for k, b in self.dirty.items() if pressure or now - b.since > FLUSH_AGE]
            await self.flush_keys(due)

    async def flush_inode(self, inode: int) -> None:
        while keys := [k for k in self.dirty if k[0] == inode]:
            await self.flush_keys(keys)

    async def flush_all(self) -> None:
        while self.dirty:
            await self.flush_keys(list(self.dirty))

    async def flush_keys(self, keys: list[tuple[int, int]]) -> None:
        async with trio.open_nursery() as nursery:
            for key in keys:
                nursery.start_soon(self._flush_one, key)

    async def _flush_one(self, key: tuple[int, int]) -> None:
        async with self._flush_slots:
            block = self.dirty.get(key)
            if block is None:
                return
            if block.flushing is not None:
                await block.flushing.wait()
                return
            block.flushing = trio.Event()
            try:
                await self._seal_block(key, block)
            finally:
                block.flushing.set()
                block.flushing = None

    async def _seal_block(self, key: tuple[int, int], block: DirtyBlock) -> None:
        version = block.version
        plain = bytes(block.data)
        object_id = await self._store(plain)
        if self.dirty.get(key) is not block:  # truncated or deleted meanwhile
            if object_id is not None:
                self._decref(object_id)
            return
        self._map(key, object_id)
        if block.version == version:
            self._discard_dirty(key)
            if object_id is not None:
                self._remember(object_id, plain)

    async def _store(self, plain: bytes) -> Optional[int]:
        """Stores a block's content (or finds it stored) and returns its object with one more
        reference, or None for a hole."""
        if plain.count(0) == len(plain):
            return None
        digest = await trio.to_thread.run_sync(self.codec.digest, plain)
        existing = self._find(digest)
        if existing is not None:
            return existing
        object_id = secrets.randbits(63)
        stored_size, wrapped_key = await trio.to_thread.run_sync(self._seal_and_write, object_id, plain)
        existing = self._find(digest)  # the same content may have landed while we sealed
        if existing is not None:
            self.objects.remove(object_id)
            return existing
        self.db.execute("INSERT INTO objects(id, digest, refcount, plain_size, stored_size, wrapped_key) "
                        "VALUES (?, ?, 1, ?, ?, ?)", (object_id, digest, len(plain), stored_size, wrapped_key))
        return object_id

    def _seal_and_write(self, object_id: int, plain: bytes) -> tuple[int, bytes]:
        sealed, wrapped_key = self.codec.seal(object_id, plain)
        self.objects.write(object_id, sealed)
        return len(sealed), wrapped_key

    def _find(self, digest: bytes) -> Optional[int]:
        row = self.db.one("SELECT id FROM objects WHERE digest=?", (digest,))
        if row is None:
            return None
        self.db.execute("UPDATE objects SET refcount=refcount+1 WHERE id=?", (row[0],))
        return row[0]

    def _map(self, key: tuple[int, int], object_id: Optional[int]) -> None:
        old = self._mapped(*key)
        if object_id is None:
            self.db.execute("DELETE FROM blocks WHERE inode=? AND blockno=?", key)
        else:
            self.db.execute("INSERT OR REPLACE INTO blocks(inode, blockno, object) VALUES (?, ?, ?)",
                            (*key, object_id))
        if old is not None:
            self._decref(old)

    def _decref(self, object_id: int) -> None:
        self.db.execute("UPDATE objects SET refcount=refcount-1 WHERE id=?", (object_id,))
        row = self.db.one("SELECT refcount FROM objects WHERE id=?", (object_id,))
        if row is not None and row[0] <= 0:
            self.db.execute("DELETE FROM objects WHERE id=?", (object_id,))
            self._forget_object(object_id)
            self.db.after_commit(lambda: self.objects.remove(object_id))
