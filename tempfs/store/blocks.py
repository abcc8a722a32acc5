"""File content as fixed-size blocks: dirty blocks in memory, clean blocks in an LRU, sealed
objects on disk, identical blocks stored once.

Guarantees:
- A missing block is a hole and reads as zeros; an all-zero block is stored as a hole.
- A block's bytes never extend past its file's size, so growing a file shows zeros.
- An object is appended to its area's pack (packs.py) before the metadata that references it;
  a pack goes only after the commit that drops the last reference into it, and the compactor
  moves what lives in a mostly dead pack before it goes, durably (`move_pack`).
- A small sealed object (at most `inline_max` bytes: small files, file tails) is kept in its
  metadata row instead of a pack, so it is stored, made durable and removed with the commit
  that references it.
- Dirty data is bounded by `dirty_limit`: a writer that would pass it waits for the flusher.
  A dirty block counts at what it holds (a small file's block, or a 4 KiB write over a stored
  block, a patch to be, about 5 KiB), and a new one may be made only with room for a whole
  block and its overhead, so that the write it is made for never waits with it empty. The
  areas' limits and `du` count every dirty block as a whole block, the most it may store.
  A dirty block is stored once FLUSH_AGE old (an overlay, OVERLAY_AGE); once half the
  limit is held, every whole block is stored, and the overlays holding most until what is
  held falls back to PRESSURE_LEFT of that half.
- A change to part of a stored block that is not cached is stored as a patch laid over it
  (patch.py), at most MAX_PATCHES per block and `patch_max` bytes each; past either, the block
  is loaded and stored whole, which drops its patches. A reader gets the block with its
  patches applied in order.
- Sealing, hashing and disk I/O run in worker threads; the trio thread only touches SQLite, and
  seals a flush batch of small objects that all stay inline (small files) or of patches
  itself, which costs less than the trip.
- A file read in order has its next blocks loaded ahead, several at once, into the clean LRU
  (objects are immutable, so a block loaded ahead is never stale; a read that fails because the
  compactor moved its object meanwhile is retried); a reader that asks for one
  being loaded waits for that load instead of starting its own.
"""
from __future__ import annotations

import logging
import secrets
import sqlite3
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional

import trio

from ..codec import SEAL_OVERHEAD, ContentCodec, IntegrityError
from .. import workers
from .db import MISSING, Database
from .objects import MAX_OBJECT_BYTES, ObjectFiles
from .packs import PackFiles
from . import patch

log = logging.getLogger(__name__)

FLUSH_AGE = 2.0          # seconds a block may stay dirty when there is no pressure
# An overlay (changes to part of a stored block, a patch to be) waits longer, so that more
# writes land in it and one patch stores them all; under pressure those holding most go first,
# and the flusher stops once what is held falls to PRESSURE_LEFT of the pressure mark.
# Random 4 KiB writes (fio, queue depth 1) ran 1.08x as fast (A/B; 1.13x with every batch of
# patches sealed on the trio thread, SEAL_HERE_BYTES). In process (scripts/bench_store.py
# --workloads patch), flushing every overlay under pressure took 168 us a write against
# 111-146; flushing down to 0.5 or 0.9 of the mark, within the noise of 0.75.
OVERLAY_AGE = 10.0
PRESSURE_LEFT = 0.75
FLUSH_PARALLELISM = 3    # batches sealed at once (2 cores, plus disk waits)
FLUSH_BATCH = 8          # blocks per trip to a worker thread: a trip costs ~0.2 ms
# A batch of small objects (inline, or patches) up to this many bytes is sealed on the trio
# thread, and so is any batch of patches (at most FLUSH_BATCH * patch_max bytes). A trip to a
# worker wakes two threads, and while the workers run Python every SQLite call of the trio
# thread (which gives the GIL up) waits to get it back (scripts/bench_gil.py). Sealed here,
# random 4 KiB writes ran 1.19x as fast and small files were created 1.17x as fast (A/B); every
# batch of patches, random writes 1.28x (A/B, with the overlays of OVERLAY_AGE: 1.13x).
SEAL_HERE_BYTES = 64 * 1024
# what a dirty block takes in memory beside the bytes written into it
DIRTY_OVERHEAD = 1024
INLINE_MAX = 16 * 1024   # sealed objects up to this size live in the metadata, not in packs
MAX_PATCHES = 8          # patches a stored block may carry; the next change loads and stores it whole
READAHEAD_BLOCKS = 8     # blocks loaded ahead of a reader that reads a file in order
READAHEAD_BATCH = 4      # asked for once this many are left to ask: one query, one trip to a worker
READAHEAD_PARALLELISM = 4
READERS_TRACKED = 1024   # files whose next block in order is remembered
COMPACT_DEAD = 0.5       # a pack this dead (by bytes) has what lives in it moved, and goes
COMPACT_IDLE = 30.0      # seconds without an append after which a pack being filled may be compacted
RUN_BITS = 24
RUN_IDS = 1 << RUN_BITS  # object ids taken in order from one random start (_new_object_id)
COMPACTED = ("compacted",)  # the pack stream of moved objects (areas' streams are their names)
# The key every area's stored bytes are kept under (Database.keep): every change to the block
# map names it, since the accounting triggers move them (db.py)
AREA_USAGE = ("area usage",)


class BlockReadError(Exception):
    """A block could not be read back: missing, unreadable or unauthentic object."""

    def __init__(self, inode: int, blockno: int, reason: str) -> None:
        super().__init__(f"inode {inode} block {blockno}: {reason}")
        self.inode, self.blockno, self.reason = inode, blockno, reason


@dataclass(eq=False)
class DirtyBlock:
    """A block written since it was last stored: its whole content (`data`), or what was
    written over its stored content (`overlay`), to be stored as a patch."""
    data: bytearray
    tag: Optional[str] = None  # the area it will be charged to once stored
    since: float = field(default_factory=time.monotonic)
    version: int = 0
    flushing: Optional[trio.Event] = None  # set when the flush (or fill-in) holding it ends
    overlay: Optional[patch.Overlay] = None
    # the block map rows (layer, object, tag) under it, as known since it was made dirty: only
    # its own flushes change them meanwhile. None: not known, to be read when needed
    stored: Optional[tuple] = None
    held: int = 0  # what it is counted at in BlockStore.held_bytes

    def put(self, start: int, piece: memoryview) -> None:
        if self.overlay is None:
            data = self.data
            inside = min(len(piece), max(len(data) - start, 0))  # what overwrites bytes it holds
            if inside:
                data[start:start + inside] = piece[:inside]
            if inside < len(piece):
                # grown with +=: a slice assignment that grows a bytearray copies the piece
                # twice, and took 2-3x as long for a block written in order (CPython 3.11)
                if start > len(data):
                    data += bytes(start - len(data))
                data += piece[inside:]
        else:
            self.overlay.write(start, piece)
            whole = self.overlay.covers()
            if whole is not None:  # nothing stored shows through any more
                self.data, self.overlay = whole, None
        self.version += 1

    def cut(self, keep: int) -> None:
        if self.overlay is not None:
            self.overlay.truncate(keep)
        elif len(self.data) > keep:
            del self.data[keep:]
        else:
            return
        self.version += 1


class BlockStore:
    def __init__(self, db: Database, objects: ObjectFiles, packs: PackFiles, codec: ContentCodec,
                 block_size: int, dirty_limit: int, cache_limit: int, inline_max: int = INLINE_MAX,
                 patch_max: Optional[int] = None) -> None:
        self.db, self.objects, self.packs, self.codec = db, objects, packs, codec
        self.block_size = block_size
        self._zeros = bytes(block_size)  # an all-zero block is a hole
        self.inline_max = inline_max
        # the largest patch (encoded) stored; a larger change loads the block. 0: no patches
        self.patch_max = block_size // 4 if patch_max is None else patch_max
        self.dirty_limit = max(dirty_limit, 4 * block_size)
        self.cache_limit = cache_limit
        self.dirty: dict[tuple[int, int], DirtyBlock] = {}
        self.dirty_bytes = 0  # a block each, as they may store: the areas' pending bytes, du
        self.held_bytes = 0  # each at what it holds (plus DIRTY_OVERHEAD): bounded by dirty_limit
        self.dirty_by_tag: Counter[Optional[str]] = Counter()
        self._dirty_blocknos: dict[int, set[int]] = {}  # inode -> its dirty blocks: no scan of them all per file
        self._next_id = 0  # _new_object_id
        self._clean: OrderedDict[int, bytes] = OrderedDict()
        self._clean_bytes = 0
        self._flush_slots = trio.CapacityLimiter(FLUSH_PARALLELISM)
        self._flush_wanted = trio.Event()  # stays set until the flusher takes it: no lost wake-up
        self._room_lot = trio.lowlevel.ParkingLot()
        self.dead_bytes: Counter[int] = Counter()  # pack -> bytes of its objects dropped since the store opened
        self._packs_scanned = False  # compact_candidates has looked at every pack once
        self.doomed: set[int] = set()     # object files (schema < 6) whose row is gone, removed after the commit
        self.hits = self.misses = 0       # block reads answered from memory / from the store
        self.patches_stored = 0           # changes stored as patches (instead of whole blocks)
        self._maps_kept = 0               # moves on when a range of block maps goes (drop_after)
        self._loading: dict[int, trio.Event] = {}  # object id -> set when its load ahead ends
        self._reading_ahead = False                  # run_read_ahead is running
        self._in_order: dict[int, tuple[int, int]] = {}  # inode -> (next block asked, first not yet asked ahead)
        self._ahead_send, self._ahead_receive = trio.open_memory_channel(64)
        # told the files whose block maps a flush batch changed (the triggers moved their stored bytes)
        self.on_stored: Callable[[set[int]], None] = lambda inodes: None

    # ---- reading -------------------------------------------------------------------------
    async def read(self, inode: int, offset: int, size: int, file_size: int) -> bytes:
        end = min(offset + size, file_size)
        if offset >= end:
            return b""
        first, last = offset // self.block_size, (end - 1) // self.block_size
        self._read_ahead(inode, first, last)
        blocks = await self._blocks(inode, range(first, last + 1))
        pieces = []
        for blockno, block in zip(range(first, last + 1), blocks):
            base = blockno * self.block_size
            start, stop = max(offset, base) - base, min(end, base + self.block_size) - base
            piece = block[start:stop]  # a whole block read is the block itself, not a copy
            pieces.append(piece)
            if len(piece) < stop - start:  # what a hole or a short block reads as
                pieces.append(bytes(stop - start - len(piece)))
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)

    def _read_ahead(self, inode: int, first: int, last: int) -> None:
        """Asks for the blocks after `last` when this read continues the previous one."""
        if not self._reading_ahead or self.cache_limit < 2 * READAHEAD_BLOCKS * self.block_size:
            return  # no loader running (tools, tests), or nowhere to keep the blocks
        expected, asked = self._in_order.get(inode, (0, 0))
        if len(self._in_order) >= READERS_TRACKED:
            self._in_order.clear()
        # the kernel's own readahead may send the next requests slightly out of order
        if not expected - 1 <= first <= expected + 2:
            self._in_order[inode] = (last + 1, 0)
            return
        start, stop = max(asked, last + 1), last + 1 + READAHEAD_BLOCKS
        if stop - start < READAHEAD_BATCH:  # enough asked for already: ask in batches
            self._in_order[inode] = (last + 1, asked)
            return
        self._in_order[inode] = (last + 1, stop)
        wanted = [(object_id, facts) for object_id, facts in self._mapped_range(inode, start, stop).items()
                  if object_id not in self._clean and object_id not in self._loading]
        for i in range(0, len(wanted), READAHEAD_BATCH):
            batch = dict(wanted[i:i + READAHEAD_BATCH])
            try:
                self._ahead_send.send_nowait(batch)
            except trio.WouldBlock:
                return  # far behind: the reader loads the rest itself
            for object_id in batch:  # marked now, not when the loader gets to it: a reader asking first waits
                self._loading[object_id] = trio.Event()

    def _mapped_range(self, inode: int, start: int, stop: int) -> dict[int, Optional[tuple]]:
        """The distinct objects blocks start..stop-1 are stored in (bases and patches), with
        their _sealing_facts: those of blocks not dirty whose block map entries authenticate
        (the reader meets, and reports, the others). One query, which also answers _mapped()
        for these blocks."""
        layers: dict[int, list[tuple]] = {blockno: [] for blockno in range(start, stop)}
        facts: dict[int, Optional[tuple]] = {}
        for blockno, layer, object_id, tag, *known in self.db.execute(
                f"SELECT blockno, layer, object, tag, {_FACTS} FROM blocks LEFT JOIN objects ON objects.id=blocks.object "
                "WHERE inode=? AND blockno>=? AND blockno<? ORDER BY blockno, layer", (inode, start, stop)):
            layers[blockno].append((layer, object_id, tag))
            facts[object_id] = None if known[0] is None else tuple(known)  # no wrapped key: no object row
        out: dict[int, Optional[tuple]] = {}
        for blockno, rows in layers.items():
            if self._forged(inode, blockno, rows) is None:  # only rows that authenticate are kept (_mapped)
                self.db.keep(self._map_key(inode, blockno), tuple(rows))
                if (inode, blockno) not in self.dirty:
                    out.update((object_id, facts[object_id]) for _, object_id, _ in rows)
        return out

    async def run_read_ahead(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Loads the objects _read_ahead asked for, READAHEAD_PARALLELISM at a time."""
        slots = trio.CapacityLimiter(READAHEAD_PARALLELISM)
        self._reading_ahead = True
        task_status.started()
        try:
            async with trio.open_nursery() as nursery:
                async for facts in self._ahead_receive:
                    nursery.start_soon(self._load_ahead, facts, slots)
        finally:
            self._reading_ahead = False
            for loading in self._loading.values():  # asked for, never loaded: readers load them
                loading.set()
            self._loading.clear()

    async def _load_ahead(self, facts: dict[int, Optional[tuple]], slots: trio.CapacityLimiter) -> None:
        """Loads objects with the facts _mapped_range read (if the compactor moved one since,
        its load fails, and the reader loads it again itself)."""
        try:
            async with slots:
                loaded = await workers.run_sync(self._load_many, facts)
            for object_id, plain in loaded.items():
                if not isinstance(plain, Exception):  # a failure is the reader's to report
                    self._remember(object_id, plain)
        finally:
            for object_id in facts:
                loading = self._loading.pop(object_id, None)
                if loading is not None:
                    loading.set()

    async def _blocks(self, inode: int, blocknos: range) -> list[bytes]:
        """The current content of some blocks of a file: what is stored, under what was
        written since, with one trip to the worker threads for all the objects not cached."""
        dirty = [self.dirty.get((inode, blockno)) for blockno in blocknos]
        if not any(dirty):  # the common case
            stored = await self._stored(inode, blocknos)
            return [stored[blockno] for blockno in blocknos]
        # an overlay is taken now: if the flusher stores it meanwhile, it is still laid over
        overlays = {blockno: block.overlay for blockno, block in zip(blocknos, dirty)
                    if block is not None and block.overlay is not None}
        stored = await self._stored(inode, [b for b, block in zip(blocknos, dirty) if block is None or b in overlays])
        found = []
        for blockno, block in zip(blocknos, dirty):
            if blockno in overlays:
                found.append(overlays[blockno].over(stored[blockno]))
            else:
                found.append(stored[blockno] if block is None else bytes(block.data))
        return found

    async def _stored(self, inode: int, blocknos: Iterable[int]) -> dict[int, bytes]:
        """What is stored of some blocks of a file: each base with its patches applied."""
        for _attempt in range(3):
            await self._loads_ahead_done(inode, blocknos)
            layers = {blockno: self._mapped(inode, blockno) for blockno in blocknos}
            have: dict[int, bytes] = {}  # taken now: loading the others may push them out of the cache
            wanted: set[int] = set()
            for rows in layers.values():
                missing = False
                for _, object_id, _ in rows:
                    plain = self._clean.get(object_id)
                    if plain is None:
                        wanted.add(object_id)
                        missing = True
                    else:
                        self._clean.move_to_end(object_id)
                        have[object_id] = plain
                if missing:
                    self.misses += 1
                elif rows:
                    self.hits += 1
            if wanted:
                facts = self._sealing_facts_of(wanted)
                loaded = await workers.run_sync(self._load_many, facts)
                failed = next(((o, e) for o, e in loaded.items() if isinstance(e, Exception)), None)
                if failed is not None:
                    object_id, error = failed
                    blockno = next(b for b, rows in layers.items() if any(r[1] == object_id for r in rows))
                    if self._mapped(inode, blockno) == layers[blockno] and self._sealing_facts(object_id) == facts[object_id]:
                        raise BlockReadError(inode, blockno, str(error))
                    continue  # rewritten or moved (compacted) while we read it: read again
                for object_id, plain in loaded.items():
                    self._remember(object_id, plain)
                have.update(loaded)
            return {blockno: self._compose(inode, blockno, rows, have) for blockno, rows in layers.items()}
        raise BlockReadError(inode, next(iter(blocknos)), "blocks keep changing under the reader")

    def _compose(self, inode: int, blockno: int, rows: tuple, plain: dict[int, bytes]) -> bytes:
        """A stored block from its layers' plaintexts."""
        if not rows:
            return b""
        if len(rows) == 1 and rows[0][0] == 0:
            return plain[rows[0][1]]  # the common case: a base, no patches
        base = plain[rows[0][1]] if rows[0][0] == 0 else b""
        try:
            return patch.apply(base, [plain[object_id] for layer, object_id, _ in rows if layer > 0], self.block_size)
        except IntegrityError as e:
            raise BlockReadError(inode, blockno, str(e)) from None

    async def _loads_ahead_done(self, inode: int, blocknos: Iterable[int]) -> None:
        """Waits for the loads ahead of these blocks' objects, rather than load them twice."""
        if not self._loading:  # the common case: nothing is being loaded ahead
            return
        for blockno in blocknos:
            for _, object_id, _ in self._mapped(inode, blockno, verify=False):  # the reader verifies next
                loading = self._loading.get(object_id)
                if loading is not None:
                    await loading.wait()

    def _mapped(self, inode: int, blockno: int, verify: bool = True) -> tuple[tuple[int, int, bytes], ...]:
        """(layer, object, tag) of each layer a block is stored in, in order (none: a hole);
        `verify`: raise BlockReadError if a tag fails. Only rows that authenticate are kept, so
        rows found kept are not checked again (a random write's block has up to MAX_PATCHES+1)."""
        key = self._map_key(inode, blockno)
        rows = self.db.kept(key)
        if rows is not MISSING:
            return rows
        rows = tuple(self.db.execute(_MAPPING, (inode, blockno)))
        forged = self._forged(inode, blockno, rows)
        if forged is None:
            self.db.keep(key, rows)
        elif verify:
            layer, object_id, _ = forged
            raise BlockReadError(inode, blockno, f"the block map entry for object {object_id:016x} "
                                                 f"(layer {layer}) fails authentication")
        return rows

    def _map_key(self, inode: int, blockno: int) -> tuple:
        """Where a block's map is kept (Database.keep), beside the inode rows the store keeps
        under their number."""
        return ("map", self._maps_kept, inode, blockno)

    def _forged(self, inode: int, blockno: int, rows: Iterable[tuple]) -> Optional[tuple]:
        """The first of a block's map rows whose tag does not authenticate it, if any."""
        block_tag = self.codec.block_tag
        return next((row for row in rows if row[2] != block_tag(inode, blockno, row[1], row[0])), None)

    def _sealing_facts(self, object_id: int) -> Optional[tuple]:
        """(wrapped key, digest, sealed bytes if inline, pack, offset, stored size) of an object,
        as the metadata records them."""
        return self.db.one(f"SELECT {_FACTS} FROM objects WHERE id=?", (object_id,))

    def _sealing_facts_of(self, object_ids: Iterable[int]) -> dict[int, Optional[tuple]]:
        """_sealing_facts of several objects, in one query."""
        ids = list(object_ids)
        found = {row[0]: row[1:] for row in self.db.execute(
            f"SELECT id, {_FACTS} FROM objects WHERE id IN ({','.join('?' * len(ids))})", ids)}
        return {object_id: found.get(object_id) for object_id in ids}

    def _load_many(self, facts: dict[int, Optional[tuple]]) -> dict[int, bytes | Exception]:
        return {object_id: self._load(object_id, known) for object_id, known in facts.items()}

    def _load(self, object_id: int, facts: Optional[tuple]) -> bytes | Exception:
        try:
            if facts is None:
                raise IntegrityError(f"object {object_id:016x} is not in the object table")
            wrapped_key, digest, *where = facts
            plain = self.codec.open(object_id, self.sealed(object_id, *where), wrapped_key, digest)
            if len(plain) > self.block_size:
                raise IntegrityError(f"object {object_id:016x} is larger than a block")
            return plain
        except (OSError, IntegrityError) as e:
            return e

    def sealed(self, object_id: int, inline: Optional[bytes], pack: Optional[int] = None,
               offset: Optional[int] = None, size: int = 0) -> bytes:
        """An object's sealed bytes: its row's (`inline`), its pack's or (before schema 6) its
        file's. Runs in worker threads."""
        if inline is None:
            if pack is not None:
                return self.packs.read(pack, offset, size)
            return self.objects.read(object_id)
        if len(inline) > MAX_OBJECT_BYTES:
            raise IntegrityError(f"object {object_id:016x} is larger than any object tempfs writes")
        return bytes(inline)

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
    async def write(self, inode: int, offset: int, data: bytes, tag: Optional[str] = None,
                    size: Optional[int] = None) -> None:
        """Writes into dirty blocks; `tag` names whom they are charged to until stored. `size`,
        the file's size before the write, spares reading back the blocks wholly past it (which
        truncation and deletion leave unmapped)."""
        pos = 0
        data = memoryview(data)  # each block's piece copied once, into its dirty block
        while pos < len(data):
            blockno, start = divmod(offset + pos, self.block_size)
            n = min(self.block_size - start, len(data) - pos)
            unmapped = size is not None and blockno * self.block_size >= size  # past the end: nothing stored
            while True:
                block = await self._dirty_block(inode, blockno, self.replaces(blockno, start, n, size), tag, unmapped)
                if block.overlay is None:
                    if self.held_bytes + start + n - len(block.data) <= self.dirty_limit:
                        break
                    await self._wait_for_room()  # it grows past the limit
                    continue
                grown = block.overlay.encoded_size() + patch.EXTENT_BYTES + n > self.patch_max
                if self.held_bytes + (self.block_size - block.held if grown else n) > self.dirty_limit:
                    await self._wait_for_room()
                elif grown:
                    await self._fill_in((inode, blockno), block)  # first: if that fails, nothing was written
                else:
                    break
            block.put(start, data[pos:pos + n])
            self._count_held(block)
            pos += n

    def replaces(self, blockno: int, start: int, n: int, size: Optional[int]) -> bool:
        """Whether writing `n` bytes at `start` in block `blockno` leaves nothing of what is
        stored of it: the block lies past the file's end (`size`), which it never extends
        past, or the write covers it up to its end or the file's."""
        base = blockno * self.block_size
        if size is not None and base >= size:
            return True
        return start == 0 and (n == self.block_size or (size is not None and base + n >= size))

    async def _dirty_block(self, inode: int, blockno: int, fresh: bool, tag: Optional[str],
                           unmapped: bool = False) -> DirtyBlock:
        """The dirty block `blockno`: empty if `fresh` (nothing of its stored content survives
        the write), else an overlay of its stored content when loading that would cost a read
        and more patches may pile on it, else its stored content."""
        key = (inode, blockno)
        while True:
            block = self.dirty.get(key)
            if block is not None:
                return block
            # room for all a write may put in it: a new block must not wait once made, since until
            # the write's first piece is in it, it stands for its stored block and holds nothing
            # (a reader would read zeros; stored, or left by a write cancelled there, a hole)
            if self.held_bytes + DIRTY_OVERHEAD + self.block_size > self.dirty_limit:
                await self._wait_for_room()
                continue
            block = DirtyBlock(bytearray(), tag, stored=() if unmapped else None)
            if not fresh:
                mapped = block.stored = self._mapped(inode, blockno)
                if self._patchable(mapped):
                    block.overlay = patch.Overlay(self.block_size)
                else:
                    block.data += (await self._blocks(inode, range(blockno, blockno + 1)))[0]
                    if key in self.dirty or self._mapped(inode, blockno) != mapped:
                        continue  # written, flushed or truncated while we read: the base is stale
            self.dirty[key] = block
            self._dirty_blocknos.setdefault(inode, set()).add(blockno)
            self.dirty_bytes += self.block_size
            self.dirty_by_tag[tag] += self.block_size
            self._count_held(block)
            # woken here, as a block is made dirty, not after every write: then it ran in many
            # small rounds, and sequential writes took 1.16x the CPU (A/B)
            if self.held_bytes > self.dirty_limit // 2:
                self._flush_wanted.set()
            return block

    async def _wait_for_room(self) -> None:
        self._flush_wanted.set()
        await self._room_lot.park()

    def _count_held(self, block: DirtyBlock) -> None:
        """Counts a dirty block again after it changed (it grows, or an overlay becomes a whole block)."""
        now = DIRTY_OVERHEAD + (len(block.data) if block.overlay is None else block.overlay.encoded_size())
        self.held_bytes += now - block.held
        block.held = now

    def _patchable(self, mapped: tuple) -> bool:
        """Whether a change to a stored block is best stored as a patch: the block is stored,
        not cached (else its content costs nothing) and has room for another patch."""
        return (0 < len(mapped) <= MAX_PATCHES and self.patch_max > 0
                and not all(row[1] in self._clean for row in mapped))

    async def _fill_in(self, key: tuple[int, int], block: DirtyBlock) -> None:
        """Turns an overlay grown too large for a patch into the whole block, by loading what
        is stored under it. Holds the block as a flush does, so its stored layers stay put."""
        while block.flushing is not None:
            await block.flushing.wait()
        if self.dirty.get(key) is not block or block.overlay is None:
            return  # stored (as a patch) or truncated meanwhile, or filled in by another write
        block.flushing = trio.Event()
        try:
            stored = (await self._stored(key[0], [key[1]]))[key[1]]
            if self.dirty.get(key) is block:  # the overlay has every write made while loading
                block.data, block.overlay = bytearray(block.overlay.over(stored)), None
                block.version += 1
                self._count_held(block)
        finally:
            block.flushing.set()
            block.flushing = None

    async def cut_tail(self, inode: int, size: int, tag: Optional[str] = None) -> None:
        """Makes sure the block holding byte `size` keeps nothing at or past it."""
        blockno, keep = divmod(size, self.block_size)
        if keep == 0 or ((inode, blockno) not in self.dirty and not self._mapped(inode, blockno, verify=False)):
            return
        block = await self._dirty_block(inode, blockno, False, tag)
        block.cut(keep)
        self._count_held(block)

    def drop_after(self, inode: int, size: int) -> None:
        """Forgets every block wholly at or past `size` (truncation, deletion with size 0)."""
        first = self.drop_dirty_after(inode, size)
        # read, then deleted: cheaper than DELETE ... RETURNING (a temporary table), and an
        # empty file costs one query
        rows = self.db.execute("SELECT object FROM blocks WHERE inode=? AND blockno>=?", (inode, first)).fetchall()
        if not rows:
            return
        self.db.change("DELETE FROM blocks WHERE inode=? AND blockno>=?", (inode, first), (inode, AREA_USAGE))
        self._maps_kept += 1  # every block map kept so far is out of reach: a range cannot be named
        for (object_id,) in rows:
            self._decref(object_id)

    def dirty_bytes_of(self, inode: int) -> int:
        """What the file's dirty blocks may store: a whole block each (du, the kernel's cache time)."""
        blocknos = self._dirty_blocknos.get(inode)
        return len(blocknos) * self.block_size if blocknos else 0

    def drop_dirty_after(self, inode: int, size: int) -> int:
        """drop_after() of the blocks not stored yet only; returns the first block dropped."""
        first = -(-size // self.block_size)
        for blockno in [b for b in self._dirty_blocknos.get(inode, ()) if b >= first]:
            self._discard_dirty((inode, blockno))
        return first

    def _discard_dirty(self, key: tuple[int, int]) -> None:
        block = self.dirty.pop(key)
        blocknos = self._dirty_blocknos[key[0]]
        blocknos.discard(key[1])
        if not blocknos:
            del self._dirty_blocknos[key[0]]
        self.held_bytes -= block.held
        self.dirty_bytes -= self.block_size
        self.dirty_by_tag[block.tag] -= self.block_size
        self._room_lot.unpark_all()

    # ---- flushing ------------------------------------------------------------------------
    async def run_flusher(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            with trio.move_on_after(FLUSH_AGE / 2):
                await self._flush_wanted.wait()
            self._flush_wanted = trio.Event()
            try:
                await self.flush_keys(self._due(time.monotonic()))
            except (OSError, sqlite3.Error) as e:  # a full disk, a locked database: keep the data, retry
                log.error("cannot store written data (%s); retrying in %.0f s", e, FLUSH_AGE)
                await trio.sleep(FLUSH_AGE)

    def _due(self, now: float) -> list[tuple[int, int]]:
        """The dirty blocks to store now: those old enough and, once half the dirty limit is
        held, every whole block and then the overlays holding most until what stays held is
        down to PRESSURE_LEFT of that half."""
        pressure = self.held_bytes > self.dirty_limit // 2
        dirty = self.dirty
        due, overlays = [], []
        left = self.held_bytes
        for key, block in dirty.items():
            if block.flushing is not None:
                left -= block.held  # already on its way
            elif now - block.since > (FLUSH_AGE if block.overlay is None else OVERLAY_AGE) or (
                    pressure and block.overlay is None):
                due.append(key)
                left -= block.held
            elif pressure:
                overlays.append(key)  # keys alone: a tuple each made this 3x as slow (8,192 overlays)
        overlays.sort(key=lambda k: dirty[k].held, reverse=True)
        mark = self.dirty_limit // 2 * PRESSURE_LEFT
        for key in overlays:
            if left <= mark:
                break
            due.append(key)
            left -= dirty[key].held
        return due

    async def flush_inode(self, inode: int, inline_patches: bool = False) -> None:
        """Stores a file's dirty blocks. `inline_patches`: for a `fsync`, whose commit is made
        durable at once: its patches are kept in their metadata rows, if small enough, where the
        commit's own fsync covers them, instead of in a pack that would need one of its own
        (an append and a `fsync` of 4 KiB, as a journal makes, cost one disk flush, not two)."""
        while keys := [(inode, b) for b in self._dirty_blocknos.get(inode, ())]:
            await self.flush_keys(keys, inline_patches)

    async def flush_tagged(self, tag: Optional[str]) -> None:
        while keys := [k for k, b in self.dirty.items() if b.tag == tag]:
            await self.flush_keys(keys)

    async def flush_all(self) -> None:
        while self.dirty:
            await self.flush_keys(list(self.dirty))

    async def flush_keys(self, keys: list[tuple[int, int]], inline_patches: bool = False) -> None:
        """Stores these dirty blocks (`inline_patches`: see flush_inode). If the disk fails
        (ENOSPC, EIO) or the database refuses (locked by another process) the blocks concerned
        stay dirty and the first error is raised once every batch has run."""
        failures: list[OSError] = []
        async with trio.open_nursery() as nursery:
            for i in range(0, len(keys), FLUSH_BATCH):
                nursery.start_soon(self._flush_batch, keys[i:i + FLUSH_BATCH], failures, inline_patches)
        if failures:
            raise failures[0]

    async def _flush_batch(self, keys: list[tuple[int, int]], failures: list[OSError],
                           inline_patches: bool) -> None:
        async with self._flush_slots:
            claimed: list[_Claim] = []
            busy: list[trio.Event] = []
            for key in keys:
                block = self.dirty.get(key)
                if block is None:
                    continue
                if block.flushing is not None:
                    busy.append(block.flushing)
                    continue
                block.flushing = trio.Event()
                if block.overlay is None:
                    claimed.append(_Claim(key, block, block.version, bytes(block.data)))
                else:
                    claimed.append(_Claim(key, block, block.version, block.overlay.encode(), patch=True))
            try:
                if claimed:
                    await self._seal_batch(claimed, inline_patches)
            except (OSError, sqlite3.Error) as e:
                failures.append(e)
            finally:
                for claim in claimed:
                    claim.block.flushing.set()
                    claim.block.flushing = None
        for event in busy:
            await event.wait()

    async def _seal_batch(self, claimed: list["_Claim"], inline_patches: bool) -> None:
        """Stores a batch of blocks: two trips to the worker threads (hash, then seal and write
        what is new), or none for a batch of small objects (kept inline, or patches); then one
        synchronous metadata update."""
        here = all(c.patch for c in claimed) or (
            sum(len(c.plain) for c in claimed) <= SEAL_HERE_BYTES
            and all(c.patch or len(c.plain) + SEAL_OVERHEAD <= self.inline_max for c in claimed))
        digests = self._digests(claimed) if here else await workers.run_sync(self._digests, claimed)
        new: dict[bytes, tuple[int, bytes, Optional[str]]] = {}
        makers: dict[bytes, _Claim] = {}  # digest -> the claim a new object is made for
        for claim, digest in zip(claimed, digests):
            claim.digest = digest
            # a patch is seldom stored twice: not worth a lookup (a second copy is not kept)
            if digest is not None and digest not in new and (claim.patch or self._object_of(digest) is None):
                new[digest] = (self._new_object_id(), claim.plain, claim.block.tag)
                makers[digest] = claim
        items = [(object_id, plain, digest, tag, makers[digest].patch)
                 for digest, (object_id, plain, tag) in new.items()]
        written = self._seal_and_write_many(items, inline_patches) if here else await workers.run_sync(
            self._seal_and_write_many, items, inline_patches)
        added: dict[bytes, int] = {}  # digest -> the object this batch stored for it
        try:
            # what a row does not take (a concurrent batch stored the same content first, or the
            # database refuses) stays as dead bytes in its pack, for the compactor. A row starts
            # with the reference of the block it was made for (one statement less per object)
            for digest, (object_id, plain, _), (stored_size, wrapped_key, inline, pack, offset) in zip(
                    new, new.values(), written):
                if self.db.change(
                        "INSERT INTO objects(id, digest, refcount, plain_size, stored_size, wrapped_key, data, pack, "
                        "offset) VALUES (?, ?, 1, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                        (object_id, digest, len(plain), stored_size, wrapped_key, inline, pack, offset)):
                    added[digest] = object_id
        finally:
            self.packs.settle(w[3] for w in written if w[3] is not None)
        unclaimed = []  # objects whose maker's block changed meanwhile: the reference they started with goes
        for claim in claimed:
            made = claim.digest in added and makers[claim.digest] is claim
            if not self._settle(claim, added, made) and made:
                unclaimed.append(added[claim.digest])
        for object_id in unclaimed:  # after the others of the batch that share it took theirs
            self._decref(object_id)
        self.on_stored({claim.key[0] for claim in claimed})

    def _settle(self, claim: "_Claim", added: dict[bytes, int], made: bool) -> bool:
        """Points the block map at what was stored, if the block is still live (else False);
        `made`: the object was made for it, and already counts its reference."""
        if self.dirty.get(claim.key) is not claim.block:  # truncated or deleted meanwhile
            return False
        object_id = None
        if claim.digest is not None:
            object_id = added.get(claim.digest) or self._object_of(claim.digest)
            if object_id is None:
                return False  # the object it matched lost its last reference meanwhile: flush again later
            if not made:
                self.db.change("UPDATE objects SET refcount=refcount+1 WHERE id=?", (object_id,))
        block = claim.block
        if claim.patch:
            block.stored = self._add_patch(claim.key, object_id, block.stored)
        else:
            block.stored = self._map(claim.key, object_id, block.stored)
        if claim.block.version == claim.version:
            # not kept in the clean cache: the kernel's page cache already holds what was written
            self._discard_dirty(claim.key)
        return True

    def _digests(self, claimed: list["_Claim"]) -> list[Optional[bytes]]:
        """The dedup digest of each block or patch, None for an all-zero block (a hole)."""
        return [None if not c.patch and self._all_zero(c.plain) else self.codec.digest(c.plain) for c in claimed]

    def _all_zero(self, data: bytes) -> bool:
        # a comparison stops at the first byte that differs; bytes.count(0) reads them all
        return data == (self._zeros if len(data) == self.block_size else bytes(len(data)))

    def _seal_and_write_many(self, items: list[tuple[int, bytes, bytes, Optional[str], bool]],
                             inline_patches: bool) -> list[tuple]:
        """(stored size, wrapped key, sealed bytes if kept inline, pack, offset) of each item
        (object id, plain, digest, tag, is a patch); the others are appended to their area's pack,
        one write per area. A patch goes to a pack, however small, unless `inline_patches`
        (flush_inode): inline, it put a page of the database through the WAL at every random
        4 KiB write (random writes 1.22x as fast in a pack, A/B)."""
        sealed = [self.codec.seal(object_id, plain, digest) for object_id, plain, digest, _, _ in items]
        places: dict[int, tuple[int, int]] = {}  # item -> (pack, offset)
        by_tag: dict[Optional[str], list[int]] = {}
        for i, ((data, _), (_, _, _, tag, is_patch)) in enumerate(zip(sealed, items)):
            if (is_patch and not inline_patches) or len(data) > self.inline_max:
                by_tag.setdefault(tag, []).append(i)
        try:
            for tag, indexes in by_tag.items():
                places.update(zip(indexes, self.packs.append_many([sealed[i][0] for i in indexes], tag)))
        except OSError:
            self.packs.settle(pack for pack, _ in places.values())  # nothing references them
            raise
        return [(len(data), wrapped_key, None if i in places else data, *places.get(i, (None, None)))
                for i, (data, wrapped_key) in enumerate(sealed)]

    def _new_object_id(self) -> int:
        """Ids in order from a random start: a batch's rows then land in the same pages of the
        objects table and its indexes, where random ids dirtied a page each, and the commit wrote
        each page to the log (a commit cost 2.5x as much per random write, on SQLite alone).
        A new random start in each daemon and every RUN_IDS ids, so that an id a crashed daemon
        sealed into a pack is practically never taken again; one found taken is passed (its row
        is not added, and the block is stored again). The order tells no more than where an
        object lies in its pack does."""
        if self._next_id % RUN_IDS == 0:
            self._next_id = secrets.randbits(63 - RUN_BITS) << RUN_BITS | 1
        self._next_id += 1
        return self._next_id - 1

    def _object_of(self, digest: bytes) -> Optional[int]:
        row = self.db.one("SELECT id FROM objects WHERE digest=?", (digest,))
        return None if row is None else row[0]

    def _map(self, key: tuple[int, int], object_id: Optional[int], old: Optional[tuple] = None) -> tuple:
        """Points a block at an object (which already counts this reference), or makes it a
        hole; its patches go. `old`: its rows, if known. Returns its rows now."""
        if old is None:
            old = self._mapped(*key, verify=False)
        touched = (key[0], self._map_key(*key), AREA_USAGE)  # the inode row's stored bytes move with its blocks
        if object_id is None or any(row[0] > 0 for row in old):
            self.db.change("DELETE FROM blocks WHERE inode=? AND blockno=?" + (" AND layer>0" if object_id else ""), key,
                           touched)
        if object_id is not None:
            # an upsert, not INSERT OR REPLACE: REPLACE deletes without firing the accounting triggers
            tag = self.codec.block_tag(*key, object_id)
            self.db.change("INSERT INTO blocks(inode, blockno, layer, object, tag) VALUES (?, ?, 0, ?, ?) "
                           "ON CONFLICT (inode, blockno, layer) DO UPDATE SET object=excluded.object, tag=excluded.tag",
                           (*key, object_id, tag), touched)
        rows = () if object_id is None else ((0, object_id, tag),)
        self.db.keep(touched[1], rows)
        for _, old_object, _ in old:
            self._decref(old_object)
        return rows

    def _add_patch(self, key: tuple[int, int], object_id: int, under: tuple) -> tuple:
        """Lays a patch (an object which already counts this reference) over a stored block
        whose rows are `under`; returns its rows now."""
        layer = under[-1][0] + 1 if under else 1
        tag = self.codec.block_tag(*key, object_id, layer)
        touched = (key[0], self._map_key(*key), AREA_USAGE)
        self.db.change("INSERT INTO blocks(inode, blockno, layer, object, tag) VALUES (?, ?, ?, ?, ?)",
                       (*key, layer, object_id, tag), touched)
        self.patches_stored += 1
        rows = under + ((layer, object_id, tag),)
        self.db.keep(touched[1], rows)
        return rows

    def _decref(self, object_id: int) -> None:
        """One reference fewer: the last one drops the object."""
        self._release(object_id, references=1)

    def _drop_if_unreferenced(self, object_id: int) -> None:
        self._release(object_id, references=0)

    def _release(self, object_id: int, references: int) -> None:
        """Drops `references` of an object, and the object once none is left (read, then
        deleted or counted down: cheaper than DELETE ... RETURNING, which costs a temporary table)."""
        row = self.db.one(f"SELECT {_STORAGE} FROM objects WHERE id=?", (object_id,))
        if row is None:
            return
        if row[0] <= references:
            self.db.change("DELETE FROM objects WHERE id=?", (object_id,))
            self._dropped(object_id, row)
        elif references:
            self.db.change("UPDATE objects SET refcount=refcount-? WHERE id=?", (references, object_id))

    def _dropped(self, object_id: int, row: tuple) -> None:
        """What follows the deletion of an object's row (its _STORAGE columns: `row`)."""
        _, inline, pack, stored_size = row
        self.db.shred_after_commit()
        self._forget_object(object_id)
        if pack is not None:
            self.dead_bytes[pack] += stored_size
            self.remove_pack_if_dead(pack)
        elif not inline:  # an object file (before schema 6); an inline object goes with its row
            self.doomed.add(object_id)
            self.db.after_commit(lambda: self._remove_doomed(object_id))

    # ---- compaction ----------------------------------------------------------------------
    async def compact_candidates(self, min_dead: float = COMPACT_DEAD, idle: float = COMPACT_IDLE) -> list[int]:
        """Packs nothing appends to (or nothing did for `idle` seconds) and at least `min_dead`
        dead: all of them the first time (what a crash or an older daemon left), then those
        that lost objects since."""
        self.packs.seal_idle(self.dead_bytes, min_dead, idle)
        sizes, _strays = await workers.run_sync(self.packs.sizes)
        if self._packs_scanned:
            live = {pack: self.db.one("SELECT coalesce(SUM(stored_size), 0) FROM objects WHERE pack=?", (pack,))[0]
                    for pack in list(self.dead_bytes)}
        else:
            live = dict.fromkeys(sizes, 0)
            live.update(self.db.execute("SELECT pack, SUM(stored_size) FROM objects WHERE pack IS NOT NULL GROUP BY pack"))
            self._packs_scanned = True
        out = []
        for pack, live_bytes in live.items():
            size = sizes.get(pack)
            if size is None:
                self.dead_bytes.pop(pack, None)  # gone
            elif live_bytes <= (1 - min_dead) * size and not self.packs.busy(pack):
                out.append(pack)
        return out

    async def move_pack(self, pack: int) -> None:
        """Appends the objects living in `pack` to a new pack, made durable before the rows
        point at it. The pack itself goes once that is committed durably (remove_pack_if_dead)."""
        rows = self.db.execute("SELECT id, offset, stored_size FROM objects WHERE pack=?", (pack,)).fetchall()
        moved = await workers.run_sync(self._copy_out, pack, rows)
        try:
            for object_id, offset, new_pack, new_offset in moved:  # unless dropped meanwhile
                self.db.execute("UPDATE objects SET pack=?, offset=? WHERE id=? AND pack=? AND offset=?",
                                (new_pack, new_offset, object_id, pack, offset))
        finally:
            self.packs.settle(m[2] for m in moved)

    def _copy_out(self, pack: int, rows: list[tuple[int, int, int]]) -> list[tuple[int, int, int, int]]:
        out: list[tuple[int, int, int, int]] = []
        try:
            for object_id, offset, size in rows:
                try:
                    data = self.packs.read(pack, offset, size)
                except OSError as e:  # left where it is: dropped meanwhile, or damage the check reports
                    log.debug("object %016x not moved: %s", object_id, e)
                    continue
                out.append((object_id, offset, *self.packs.append(data, COMPACTED)))
            self.packs.sync()
        except OSError:
            self.packs.settle(m[2] for m in out)
            raise
        return out

    def pack_referenced(self, pack: int) -> bool:
        """Some object row points into the pack."""
        return self.db.one("SELECT 1 FROM objects WHERE pack=? LIMIT 1", (pack,)) is not None

    def remove_pack_if_dead(self, pack: int) -> None:
        """Deletes a pack after the commit if no row points into it any more, nor can."""
        if not self.pack_referenced(pack) and self.packs.release(pack):
            self.dead_bytes.pop(pack, None)
            self.db.after_commit(lambda: self.packs.remove(pack))

    def _remove_doomed(self, object_id: int) -> None:
        try:
            self.objects.remove(object_id)
        finally:
            self.doomed.discard(object_id)


_STORAGE = "refcount, data IS NOT NULL, pack, stored_size"  # what dropping an object needs
_FACTS = "wrapped_key, digest, data, pack, offset, stored_size"  # what loading it needs
_MAPPING = "SELECT layer, object, tag FROM blocks WHERE inode=? AND blockno=? ORDER BY layer"  # what _mapped asks


@dataclass(eq=False)
class _Claim:
    """A dirty block taken by a flush: its content, or its overlay, as of `version`."""
    key: tuple[int, int]
    block: DirtyBlock
    version: int
    plain: bytes  # the block's content, or the encoded patch of its overlay
    patch: bool = False
    digest: Optional[bytes] = None
