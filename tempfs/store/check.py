"""The whole-store check ("fsck"): `tempfs fsck` offline, and the running daemon once a week.

What it checks, and repairs when asked (`repair=True`):
- every block refers to an object in the object table; a block whose object is missing is
  reported as damage naming the file (its bytes are lost; they are never turned into zeros);
- blocks of inodes that no longer exist are removed;
- each object's refcount equals the number of blocks referring to it; an object that no block
  uses is dropped (row deleted, file removed after the commit, its key shredded);
- names refer to existing inodes in existing folders; an inode with a link count but no name
  (unreachable) is removed; link counts agree with the names (a file: its names; a folder:
  2 + its subfolders);
- every object (in its pack, its row if inline, or its own file before schema 6) exists,
  authenticates (`ContentCodec.open`),
  holds at most one block, and matches its recorded size and dedup digest
  (`verify_content=False` only checks it exists and its size);
- the accounting counters (inodes.stored_bytes, area_objects, area_usage, totals) agree with
  the block map; if not, they are recomputed (`Database.recount`);
- packs that no row points into (left by a crash between appending objects and committing
  them) are removed, unless being appended to or holding appends not yet settled
  (`PackFiles.busy`); so are object files (before schema 6) that no row refers to; other files
  in the object and pack folders are only reported.

Guarantees:
- It never loses data that is readable: damage it cannot repair is reported, naming the files
  affected, and left as it is. With `repair=False` it changes nothing.
- It can run inside the daemon's trio loop while the filesystem is in use: the trio thread runs
  SQL in short chunks with checkpoints between them, object files are read and authenticated in
  worker threads (64 at a time), each chunk sees a consistent state (every store operation
  changes the metadata without an `await` in between), a problem seen on an object is
  re-checked against its row before being reported (it may have been dropped or moved
  meanwhile), a pack being appended to is never touched, and a file whose row was deleted is left
  to the commit that removes it (the check commits and waits ORPHAN_GRACE before it looks again).
- Repairs are committed durably at the end; each repair is atomic (a SAVEPOINT), so a repair
  that SQLite refuses leaves nothing half done and is reported as damage instead.
"""
from __future__ import annotations

import logging
import os
import re
import secrets
import sqlite3
import stat
import time
from collections import Counter, defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional

import trio

from ..codec import IntegrityError
from .. import workers
from .objects import shards
from .store import DAMAGED_NAME, ROOT_INODE, Store

log = logging.getLogger(__name__)

MIN_ID, MAX_ID = -(1 << 63), (1 << 63) - 1
OBJECTS_PER_RANGE = 500    # objects per SQL chunk (ids are random: ranges of the id space)
INODES_PER_CHUNK = 256
ENTRIES_PER_CHUNK = 1000
ROWS_PER_IN = 500          # ids per "IN (...)" query
VERIFY_BATCH = 64          # objects read and authenticated per trip to a worker thread
LINES_PER_KIND = 50        # report lines of one kind; the rest are counted in one more line
USERS_SHOWN = 5            # files named per damaged object
MAX_TREE_ROUNDS = 32       # removing an unreachable folder orphans its children: another round
ORPHAN_GRACE = 0.5         # seconds for the after-commit removals under way to finish
_S_IFMT, _S_IFDIR = 0o170000, stat.S_IFDIR
_OBJECT_NAME = re.compile(r"[0-9a-f]{16}")


@dataclass
class CheckReport:
    objects_checked: int = 0  # object rows whose file was verified (or, quick, found)
    bytes_checked: int = 0    # stored bytes read and authenticated (0 when quick)
    repaired: list[str] = field(default_factory=list)   # one line per repair made
    damaged: list[str] = field(default_factory=list)    # one line per problem left in the store
    started_ns: int = 0
    finished_ns: int = 0
    warnings: list[str] = field(default_factory=list)   # oddities reported only (stray files)

    @property
    def clean(self) -> bool:
        """Nothing repaired, nothing damaged."""
        return not self.repaired and not self.damaged

    def to_dict(self) -> dict:
        return {"clean": self.clean, "objects_checked": self.objects_checked,
                "bytes_checked": self.bytes_checked, "repaired": list(self.repaired),
                "damaged": list(self.damaged), "warnings": list(self.warnings),
                "started_ns": self.started_ns, "finished_ns": self.finished_ns,
                "seconds": round((self.finished_ns - self.started_ns) / 1e9, 3)}


async def check_store(store: Store, *, repair: bool = True, verify_content: bool = True,
                      progress: Optional[Callable[[int, int], None]] = None) -> CheckReport:
    """Checks the whole store (see the module doc); `progress(done, total)` follows the objects
    verified. Returns the report; repairs are committed durably before it returns."""
    checker = _Checker(store, repair, verify_content, progress)
    await checker.run()
    return checker.report


class _Checker:
    def __init__(self, store: Store, repair: bool, verify: bool,
                 progress: Optional[Callable[[int, int], None]]) -> None:
        self.store, self.db = store, store.db
        self.repair, self.verify, self.progress = repair, verify, progress
        self.report = CheckReport()
        self._lines: Counter[tuple[str, str]] = Counter()  # (list, kind) -> lines so far
        self._dropped: set[int] = set()   # objects this check dropped: files go after the commit
        self._dangling = False            # blocks refer to objects missing from the table

    async def run(self) -> None:
        self.report.started_ns = time.time_ns()
        mode = "repairing" if self.repair else "not repairing"
        log.info("checking the store %s (%s, %s)", self.store.path, mode,
                 "verifying content" if self.verify else "quick")
        await self._check_object_refs()
        await self._check_tree()
        files, strays = await workers.run_sync(_list_object_files, self.store.objects.root,
                                               self.store.objects.levels)
        packs, pack_strays = await workers.run_sync(self.store.packs.sizes)
        await self._check_content(files, packs)
        await self._check_counters()
        await self._check_orphans(files)
        await self._check_pack_orphans(packs)
        self._report_strays(strays + pack_strays)
        self._close_tallies()
        if self.report.repaired:
            await self.store.commit(durable=True)
        self.report.finished_ns = time.time_ns()
        log.info("store check done: %d objects, %d bytes checked, %d repaired, %d damaged",
                 self.report.objects_checked, self.report.bytes_checked,
                 len(self.report.repaired), len(self.report.damaged))

    # ---- report lines ------------------------------------------------------------------------
    def _note(self, where: str, kind: str, line: str) -> None:
        self._lines[(where, kind)] += 1
        if self._lines[(where, kind)] > LINES_PER_KIND:
            return
        getattr(self.report, where).append(line)
        level = logging.INFO if where == "repaired" else logging.WARNING
        log.log(level, "store check: %s", line)

    def _damaged(self, kind: str, line: str) -> None:
        self._note("damaged", kind, line)

    def _fix(self, kind: str, problem: str, action: str, repair: Callable[[], None]) -> bool:
        """Repairs a problem atomically (when repairing) and reports it; True if repaired."""
        if not self.repair:
            self._damaged(kind, f"{problem} (not repaired)")
            return False
        try:
            with self._savepoint():
                repair()
        except sqlite3.Error as e:
            self._damaged(kind, f"{problem}: the repair failed ({e})")
            return False
        self._note("repaired", kind, f"{problem}: {action}")
        return True

    def _close_tallies(self) -> None:
        for (where, kind), n in self._lines.items():
            if n > LINES_PER_KIND:
                line = f"... and {n - LINES_PER_KIND} more like the above ({kind})"
                getattr(self.report, where).append(line)
                log.log(logging.INFO if where == "repaired" else logging.WARNING, "store check: %s", line)

    @contextmanager
    def _savepoint(self) -> Iterator[None]:
        """One repair as a unit: on an SQL error its changes and its after-commit work are undone."""
        db = self.db
        if not db.conn.in_transaction:
            db.execute("BEGIN")  # so that RELEASE does not commit
        hooks = len(db._after_commit)  # noqa: SLF001 (same package: undo its file removals too)
        db.execute("SAVEPOINT tempfs_check")
        try:
            yield
        except BaseException:
            db.rollback_to("tempfs_check")
            db.execute("RELEASE tempfs_check")
            del db._after_commit[hooks:]  # noqa: SLF001
            raise
        db.execute("RELEASE tempfs_check")

    def _users(self, object_id: int) -> str:
        """The files (and their blocks) that use an object, for a damage line."""
        by_inode: dict[int, list[int]] = defaultdict(list)
        for ino, blockno in self.db.execute("SELECT DISTINCT inode, blockno FROM blocks WHERE object=? "  # one per layer
                                            "ORDER BY inode, blockno LIMIT 1000", (object_id,)):
            by_inode[ino].append(blockno)
        if not by_inode:
            return "(used by no file)"
        names = [f"{self._name(ino)} ({_blocks_text(b)})" for ino, b in list(by_inode.items())[:USERS_SHOWN]]
        more = len(by_inode) - USERS_SHOWN
        return ", ".join(names) + (f" and {more} more files" if more > 0 else "")

    def _name(self, ino: int) -> str:
        path = self.store.path_of(ino)
        return f"inode {ino} (no name)" if "<unlinked>" in path else path

    # ---- objects against the block map --------------------------------------------------------
    def _object_count(self) -> int:
        row = self.db.one("SELECT value FROM totals WHERE name='objects'")
        return max(0, min(row[0] if row else 0, 10**9))

    async def _check_object_refs(self) -> None:
        """Refcounts, blocks of missing objects and blocks of missing inodes, one id range at a time."""
        for lo, hi in _id_ranges(self._object_count()):
            self._object_range(lo, hi)
            await trio.sleep(0)

    def _object_range(self, lo: int, hi: int) -> None:
        rows = dict(self.db.execute("SELECT id, refcount FROM objects WHERE id BETWEEN ? AND ?", (lo, hi)))
        used = dict(self.db.execute("SELECT object, COUNT(*) FROM blocks WHERE object BETWEEN ? AND ? "
                                    "GROUP BY object", (lo, hi)))
        for object_id in sorted(used.keys() - rows.keys()):
            self._dangling = True
            self._damaged("blocks of missing objects", f"{self._users(object_id)}: lost, object "
                          f"{object_id:016x} is missing from the object table")
        for object_id, refcount in rows.items():
            count = used.get(object_id, 0)
            if count == 0:
                self._drop_unreferenced(object_id, refcount)
            elif count != refcount:
                self._fix("refcounts", f"object {object_id:016x} has refcount {refcount} but "
                          f"{_count(count, 'block')} {'uses' if count == 1 else 'use'} it",
                          "corrected", lambda o=object_id, c=count: self._set_refcount(o, c))
        self._blocks_of_missing_inodes(lo, hi)
        self._unauthentic_blocks(lo, hi)

    def _set_refcount(self, object_id: int, count: int) -> None:
        self.db.execute("UPDATE objects SET refcount=? WHERE id=?", (count, object_id))

    def _drop_unreferenced(self, object_id: int, refcount: int) -> None:
        size = self.db.one("SELECT stored_size FROM objects WHERE id=?", (object_id,))[0]

        def drop() -> None:
            self._set_refcount(object_id, 0)
            self.store.blocks._drop_if_unreferenced(object_id)  # noqa: SLF001 (its own drop path)
            self._dropped.add(object_id)
        self._fix("unreferenced objects", f"object {object_id:016x} ({size} bytes, refcount {refcount}) "
                  "is used by no block", "dropped", drop)

    def _blocks_of_missing_inodes(self, lo: int, hi: int) -> None:
        rows = self.db.execute("SELECT b.inode, b.blockno, b.layer, b.object FROM blocks b WHERE b.object BETWEEN ? AND ? "
                               "AND NOT EXISTS (SELECT 1 FROM inodes i WHERE i.id = b.inode)", (lo, hi)).fetchall()
        for ino, blockno, layer, object_id in rows:
            self._fix("blocks of missing inodes", f"block {blockno} of inode {ino}, which does not exist, "
                      f"uses object {object_id:016x}", "removed",
                      lambda i=ino, b=blockno, n=layer, o=object_id: self._remove_block(i, b, n, o))

    def _unauthentic_blocks(self, lo: int, hi: int) -> None:
        """Block map entries edited outside tempfs (e.g. pointing a file at another's object):
        damage, left as found, since the right object is unknowable."""
        tag = self.store.blocks.codec.block_tag
        for ino, blockno, layer, object_id, stored in self.db.execute(
                "SELECT inode, blockno, layer, object, tag FROM blocks WHERE object BETWEEN ? AND ?", (lo, hi)).fetchall():
            if stored != tag(ino, blockno, object_id, layer):
                self._damaged("unauthentic block map entries", f"{self._name(ino)} (block {blockno}): its entry "
                              f"for object {object_id:016x} fails authentication")

    def _remove_block(self, ino: int, blockno: int, layer: int, object_id: int) -> None:
        self.db.execute("DELETE FROM blocks WHERE inode=? AND blockno=? AND layer=?", (ino, blockno, layer))
        self.store.blocks._decref(object_id)  # noqa: SLF001 (drops the object with its last user)

    # ---- the tree ----------------------------------------------------------------------------
    async def _check_tree(self) -> None:
        if self.db.one("SELECT 1 FROM inodes WHERE id=?", (ROOT_INODE,)) is None:
            self._damaged("root", "the root folder (inode 1) is missing: the tree cannot be reached")
        for _round in range(MAX_TREE_ROUNDS):
            await self._check_entries()
            removed = await self._check_links()
            if not removed:
                break

    async def _check_entries(self) -> None:
        after = -1
        while True:
            rows = self.db.execute(
                "SELECT e.id, e.parent, e.name, e.inode, (SELECT mode FROM inodes WHERE id = e.inode), "
                "(SELECT mode FROM inodes WHERE id = e.parent) FROM entries e WHERE e.id > ? ORDER BY e.id LIMIT ?",
                (after, ENTRIES_PER_CHUNK)).fetchall()
            if not rows:
                return
            for row in rows:
                self._check_entry(*row)
            after = rows[-1][0]
            await trio.sleep(0)

    def _check_entry(self, entry_id: int, parent: int, name: bytes, ino: int,
                     mode: Optional[int], parent_mode: Optional[int]) -> None:
        shown = self.store.shown_name(parent, name)
        if parent_mode is None or parent_mode & _S_IFMT != _S_IFDIR:
            what = "does not exist" if parent_mode is None else "is not a folder"
            problem = f"the name {shown!r} of inode {ino} lies in inode {parent}, which {what}"
        elif mode is None:
            problem = f"{self.store.path_of(parent).rstrip('/')}/{shown} names inode {ino}, which does not exist"
        else:
            if shown == DAMAGED_NAME:  # altered outside tempfs: which name it was is unknowable
                self._damaged("names", f"a name of inode {ino} in {self.store.path_of(parent)} fails authentication")
            return
        self._fix("names", problem, "name removed",
                  lambda: self.db.execute("DELETE FROM entries WHERE id=?", (entry_id,)))

    async def _check_links(self) -> int:
        """Link counts against names; removes unreachable inodes. Returns how many it removed."""
        unreachable: list[int] = []
        after = -1
        while True:
            rows = self.db.execute(
                "SELECT i.id, i.mode, i.nlink, (SELECT COUNT(*) FROM entries e WHERE e.inode = i.id), "
                "(SELECT COUNT(*) FROM entries e JOIN inodes c ON c.id = e.inode "
                " WHERE e.parent = i.id AND (c.mode & ?) = ?) "
                "FROM inodes i WHERE i.id > ? ORDER BY i.id LIMIT ?",
                (_S_IFMT, _S_IFDIR, after, INODES_PER_CHUNK)).fetchall()
            if not rows:
                break
            for row in rows:
                unreachable += self._check_link(*row)
            after = rows[-1][0]
            await trio.sleep(0)
        return self._remove_unreachable(unreachable)

    def _check_link(self, ino: int, mode: int, nlink: int, names: int, subdirs: int) -> list[int]:
        is_dir = mode & _S_IFMT == _S_IFDIR
        if ino != ROOT_INODE and names == 0:
            return [ino] if nlink > 0 else []  # nlink 0: unlinked, maybe still open
        expected = 2 + subdirs if is_dir else names
        if nlink != expected:
            self._fix("link counts", f"{self._name(ino)} has link count {nlink}, expected {expected}",
                      "corrected", lambda: self.db.execute("UPDATE inodes SET nlink=? WHERE id=?", (expected, ino)))
        return []

    def _remove_unreachable(self, inodes: list[int]) -> int:
        removed = [ino for ino in inodes if self._removed_if_unreachable(ino)]
        if removed:
            shown = ", ".join(map(str, removed[:20])) + (", ..." if len(removed) > 20 else "")
            self._note("repaired", "unreachable inodes", f"{len(removed)} unreachable inodes (a link count but "
                       f"no name) removed with their content: {shown}")
        return len(removed)

    def _removed_if_unreachable(self, ino: int) -> bool:
        row = self.db.one("SELECT nlink FROM inodes WHERE id=? AND NOT EXISTS (SELECT 1 FROM entries WHERE inode=?)",
                          (ino, ino))
        if row is None or row[0] <= 0:
            return False  # named or unlinked meanwhile
        problem = f"inode {ino} has link count {row[0]} but no name (unreachable)"
        if not self.repair:
            self._damaged("unreachable inodes", f"{problem} (not repaired)")
            return False
        try:
            with self._savepoint():
                self.store.destroy_inode(ino)
        except sqlite3.Error as e:
            self._damaged("unreachable inodes", f"{problem}: the repair failed ({e})")
            return False
        return True

    # ---- object content ----------------------------------------------------------------------
    async def _check_content(self, files: dict[int, int], packs: dict[int, int]) -> None:
        total, done, start = self._object_count(), 0, MIN_ID
        while start is not None:
            batch = self.db.execute("SELECT id, wrapped_key, stored_size, digest, data, pack, offset FROM objects "
                                    "WHERE id >= ? ORDER BY id LIMIT ?", (start, VERIFY_BATCH)).fetchall()
            if not batch:
                return
            start = batch[-1][0] + 1 if batch[-1][0] < MAX_ID else None
            if self.verify:
                results = await workers.run_sync(self._verify_batch, batch)
            else:
                results = await workers.run_sync(self._sizes_on_disk, batch, files, packs)
            for row, result in zip(batch, results):
                self._judge(row, result)
            done += len(batch)
            if self.progress is not None:
                self.progress(done, max(total, done))

    def _verify_batch(self, batch: list[tuple]) -> list[object]:
        """In a worker thread: (size on disk, plaintext digest) of each object, or the error."""
        out: list[object] = []
        for object_id, wrapped_key, size, digest, inline, pack, offset in batch:
            try:
                sealed = self.store.blocks.sealed(object_id, inline, pack, offset, size)
                plain = self.store.blocks.codec.open(object_id, sealed, wrapped_key, digest)
                if len(plain) > self.store.blocks.block_size:
                    raise IntegrityError(f"holds {len(plain)} bytes, more than a block")
                out.append((len(sealed), self.store.blocks.codec.digest(plain)))
            except (OSError, IntegrityError) as e:
                out.append(e)
        return out

    def _sizes_on_disk(self, batch: list[tuple], files: dict[int, int], packs: dict[int, int]) -> list[object]:
        """In a worker thread (quick check): each object's size on disk, or the error."""
        out: list[object] = []
        for object_id, _key, size, _digest, inline, pack, offset in batch:
            try:
                if inline is not None:
                    out.append((len(inline), None))
                    continue
                if pack is not None:
                    out.append(_room_in_pack(self.store.packs.path(pack), packs.get(pack), offset, size))
                    continue
                out.append((files[object_id] if object_id in files else
                            os.stat(self.store.objects.path(object_id)).st_size, None))
            except OSError as e:
                out.append(e)
        return out

    def _judge(self, row: tuple, result: object) -> None:
        object_id, wrapped_key, stored_size, digest, _inline, pack, offset = row
        if self.db.one("SELECT 1 FROM objects WHERE id=? AND wrapped_key=? AND pack IS ? AND offset IS ?",
                       (object_id, wrapped_key, pack, offset)) is None:
            return  # dropped or moved while we read it
        self.report.objects_checked += 1
        if isinstance(result, Exception):
            self._damaged("unreadable objects", f"{self._users(object_id)}: unreadable, object "
                          f"{object_id:016x} {_reason(result)}")
            return
        size, plain_digest = result
        if self.verify:
            self.report.bytes_checked += size
            if plain_digest != digest:
                self._fix("digests", f"object {object_id:016x} has a wrong dedup digest", "corrected",
                          lambda: self._set_digest(object_id, plain_digest))
        if size != stored_size:
            self._size_differs(object_id, size, stored_size)

    def _size_differs(self, object_id: int, size: int, stored_size: int) -> None:
        problem = f"object {object_id:016x} is {size} bytes on disk, {stored_size} recorded"
        if not self.verify:  # unauthenticated: a truncated file looks the same
            self._damaged("object sizes", f"{self._users(object_id)}: suspect, {problem} (truncated?)")
            return
        self._fix("object sizes", problem, "recorded size corrected",
                  lambda: self.db.execute("UPDATE objects SET stored_size=? WHERE id=?", (size, object_id)))

    def _set_digest(self, object_id: int, digest: bytes) -> None:
        taken = self.db.one("SELECT id FROM objects WHERE digest=?", (digest,))
        # an object that already holds this content keeps the digest; this one just stops deduplicating
        value = digest if taken is None else secrets.token_bytes(len(digest))
        self.db.execute("UPDATE objects SET digest=? WHERE id=?", (value, object_id))

    # ---- accounting counters -----------------------------------------------------------------
    async def _check_counters(self) -> None:
        wrong = []
        n = await self._check_inode_counters()
        if n:
            wrong.append(f"inodes.stored_bytes of {n} inodes")
        expected = _Sums()
        n = await self._check_area_objects(expected)
        if n:
            wrong.append(f"area_objects ({n} rows)")
        wrong += self._check_sums(expected)
        if wrong and self._dangling:  # recount() would fail on them (NOT NULL)
            self._damaged("counters", "the accounting counters differ from the block map: " + ", ".join(wrong)
                          + " (not recomputed while blocks refer to missing objects)")
        elif wrong:
            self._fix("counters", "the accounting counters differ from the block map: " + ", ".join(wrong),
                      "recomputed", self.db.recount)

    async def _check_inode_counters(self) -> int:
        wrong, after = 0, -1
        while True:
            rows = self.db.execute(
                "SELECT i.id, i.stored_bytes, (SELECT coalesce(SUM(o.stored_size), 0) FROM blocks b "
                "JOIN objects o ON o.id = b.object WHERE b.inode = i.id) FROM inodes i WHERE i.id > ? "
                "ORDER BY i.id LIMIT ?", (after, INODES_PER_CHUNK)).fetchall()
            if not rows:
                return wrong
            wrong += sum(1 for _ino, stored, expected in rows if stored != expected)
            after = rows[-1][0]
            await trio.sleep(0)

    async def _check_area_objects(self, expected: "_Sums") -> int:
        """Compares area_objects with the block map, one id range at a time, and sums what
        area_usage and totals should hold."""
        areas, wrong = self._areas(), 0
        for lo, hi in _id_ranges(self._object_count()):
            refs = {(a, o): n for a, o, n in self.db.execute(
                "SELECT i.area, b.object, COUNT(*) FROM blocks b JOIN inodes i ON i.id = b.inode "
                "WHERE b.object BETWEEN ? AND ? AND i.area IS NOT NULL GROUP BY i.area, b.object", (lo, hi))}
            actual = {}
            for area in areas | {a for a, _o in refs}:
                actual.update({(area, o): n for o, n in self.db.execute(
                    "SELECT object, refs FROM area_objects WHERE area=? AND object BETWEEN ? AND ?", (area, lo, hi))})
            wrong += sum(1 for key in refs.keys() | actual.keys() if refs.get(key) != actual.get(key))
            sizes = dict(self.db.execute("SELECT id, stored_size FROM objects WHERE id BETWEEN ? AND ?", (lo, hi)))
            expected.add(sizes, refs)
            await trio.sleep(0)
        return wrong

    def _areas(self) -> set[str]:
        """The areas of area_objects, by skipping along its primary key."""
        areas: set[str] = set()
        row = self.db.one("SELECT area FROM area_objects ORDER BY area LIMIT 1")
        while row is not None:
            areas.add(row[0])
            row = self.db.one("SELECT area FROM area_objects WHERE area > ? ORDER BY area LIMIT 1", (row[0],))
        return areas

    def _check_sums(self, expected: "_Sums") -> list[str]:
        """area_usage and totals against the sums of the chunks; the store may have changed between
        chunks, so a difference is confirmed by one query before it counts."""
        if not _sums_differ(expected, *self._counters()):
            return []
        counters = self._counters()
        confirmed = _Sums(bytes=0, objects=0)
        confirmed.bytes, confirmed.objects = self.db.one("SELECT coalesce(SUM(stored_size), 0), COUNT(*) FROM objects")
        confirmed.areas.update(dict(self.db.execute(
            "SELECT ao.area, SUM(o.stored_size) FROM area_objects ao JOIN objects o ON o.id = ao.object "
            "GROUP BY ao.area")))
        return _sums_differ(confirmed, *counters)

    def _counters(self) -> tuple[dict[str, int], dict[str, int]]:
        return dict(self.db.execute("SELECT name, value FROM totals")), dict(
            self.db.execute("SELECT area, stored_bytes FROM area_usage"))

    # ---- orphans -----------------------------------------------------------------------------
    async def _check_orphans(self, files: dict[int, int]) -> None:
        # A file is written before its row is inserted (in flight meanwhile), and removed after
        # the commit that deletes its row: an id with a file, no row and not in flight is an
        # orphan, or a file that the coming commit's own work removes.
        skip = self.store.blocks.doomed | self._dropped
        orphans = await self._without_rows([o for o in files if o not in skip])
        if not orphans:
            return
        await self.store.commit()  # runs that work (ours; the daemon's committer may be at it too)
        await trio.sleep(ORPHAN_GRACE)
        orphans = [o for o in await self._without_rows(orphans) if o not in self.store.blocks.doomed]
        await self._remove_orphans([self.store.objects.path(o) for o in orphans], "object files",
                                   ("belonged to no object", "belong to no object"))

    async def _check_pack_orphans(self, packs: dict[int, int]) -> None:
        # rows come into a pack only while it is busy (appended to, or appends unsettled): one
        # neither busy nor pointed into is an orphan, or empties with the coming commit
        def orphan(pack: int) -> bool:
            return not self.store.packs.busy(pack) and not self.store.blocks.pack_referenced(pack)

        orphans = [p for p in packs if orphan(p)]
        if not orphans:
            return
        await self.store.commit()
        await trio.sleep(ORPHAN_GRACE)
        orphans = [p for p in orphans if orphan(p)]
        await self._remove_orphans([self.store.packs.path(p) for p in orphans], "packs",
                                   ("held no live object", "hold no live object"))

    async def _remove_orphans(self, paths: list[Path], what: str, why: tuple[str, str]) -> None:
        """Removes (or, not repairing, reports) files; `why` they are orphans, in past and present."""
        count, size = await workers.run_sync(_remove_files if self.repair else _existing_files, paths)
        if count and self.repair:
            self._note("repaired", "orphans", f"{count} {what} ({size} bytes) {why[0]} "
                       "(left by an interrupted write): removed")
        elif count:
            self._damaged("orphans", f"{count} {what} ({size} bytes) {why[1]} "
                          "(left by an interrupted write) (not repaired)")

    async def _without_rows(self, ids: list[int]) -> list[int]:
        out = []
        for i in range(0, len(ids), ROWS_PER_IN):
            chunk = ids[i:i + ROWS_PER_IN]
            marks = ",".join("?" * len(chunk))
            known = {r[0] for r in self.db.execute(f"SELECT id FROM objects WHERE id IN ({marks})", chunk)}
            out += [o for o in chunk if o not in known]
            await trio.sleep(0)
        return out

    def _report_strays(self, strays: list[str]) -> None:
        for path in strays[:LINES_PER_KIND]:
            self.report.warnings.append(f"{path}: not an object file (left as it is)")
            log.warning("store check: %s is not an object file (left as it is)", path)
        if len(strays) > LINES_PER_KIND:
            self.report.warnings.append(f"... and {len(strays) - LINES_PER_KIND} more files that are not objects")


@dataclass
class _Sums:
    """What totals and area_usage should hold."""
    bytes: int = 0
    objects: int = 0
    areas: Counter = field(default_factory=Counter)

    def add(self, sizes: dict[int, int], refs: dict[tuple[str, int], int]) -> None:
        self.bytes += sum(sizes.values())
        self.objects += len(sizes)
        for area, object_id in refs:
            if object_id in sizes:
                self.areas[area] += sizes[object_id]


def _sums_differ(expected: _Sums, totals: dict[str, int], usage: dict[str, int]) -> list[str]:
    wrong = []
    if totals.get("stored_bytes") != expected.bytes:
        wrong.append("totals.stored_bytes")
    if totals.get("objects") != expected.objects:
        wrong.append("totals.objects")
    areas = sorted(a for a in usage.keys() | expected.areas.keys() if usage.get(a, 0) != expected.areas.get(a, 0))
    if areas:
        wrong.append("area_usage of " + ", ".join(areas))
    return wrong


def _id_ranges(objects: int) -> Iterator[tuple[int, int]]:
    """Ranges covering every object id, each holding about OBJECTS_PER_RANGE objects (ids are random)."""
    n = objects // OBJECTS_PER_RANGE + 1
    step = (1 << 63) // n + 1
    for k in range(n):
        yield (MIN_ID if k == 0 else k * step), (MAX_ID if k == n - 1 else (k + 1) * step - 1)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _blocks_text(blocknos: list[int]) -> str:
    spans: list[str] = []
    start = prev = blocknos[0]
    for b in blocknos[1:] + [None]:
        if b is not None and b == prev + 1:
            prev = b
            continue
        spans.append(str(start) if start == prev else f"{start}-{prev}")
        if b is not None:
            start = prev = b
    return ("block " if len(blocknos) == 1 else "blocks ") + ", ".join(spans)


def _reason(error: Exception) -> str:
    if isinstance(error, FileNotFoundError):
        return "is missing its file"
    if isinstance(error, IntegrityError):
        return f"is corrupt ({error})"
    return f"cannot be read ({error.strerror or error})" if isinstance(error, OSError) else str(error)


def _object_id(parts: tuple[str, ...], name: str, levels: int) -> Optional[int]:
    """The id of an object file at objects/<parts>/<name>, or None if it is not one."""
    if not _OBJECT_NAME.fullmatch(name) or parts != shards(name, levels)[:-1]:
        return None
    object_id = int(name, 16)
    return object_id if object_id <= MAX_ID else None


def _list_object_files(root: Path, levels: int) -> tuple[dict[int, int], list[str]]:
    """In a worker thread: {object id: size} of the object files, and the other files' paths."""
    files: dict[int, int] = {}
    strays: list[str] = []
    for folder, _subfolders, names in os.walk(root):
        parts = Path(folder).relative_to(root).parts
        for name in names:
            path = os.path.join(folder, name)
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                continue  # removed meanwhile
            object_id = _object_id(parts, name, levels)
            if object_id is None or not stat.S_ISREG(st.st_mode):
                strays.append(path)
            else:
                files[object_id] = st.st_size
    return files, strays


def _room_in_pack(path: Path, pack_size: Optional[int], offset: int, size: int) -> tuple[int, None]:
    """(size, None) if the pack holds `size` bytes at `offset`; raises OSError if not."""
    if pack_size is None:
        pack_size = path.stat().st_size  # made since the listing (raises FileNotFoundError if gone)
    if offset + size > pack_size:
        raise OSError(f"its pack {path.name} ends before it ({pack_size} bytes, the object ends at {offset + size})")
    return size, None


def _existing_files(paths: list[Path]) -> tuple[int, int]:
    """In a worker thread: how many of these files exist, and their bytes."""
    count = size = 0
    for path in paths:
        try:
            size += path.stat().st_size
            count += 1
        except FileNotFoundError:
            continue
    return count, size


def _remove_files(paths: list[Path]) -> tuple[int, int]:
    """In a worker thread: removes files; returns how many and how many bytes it removed."""
    count = size = 0
    for path in paths:
        try:
            n = path.stat().st_size
            path.unlink()
        except FileNotFoundError:
            continue
        count, size = count + 1, size + n
    return count, size
