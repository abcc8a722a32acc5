"""The store: a tree of inodes, names, xattrs and file content kept in one folder on disk.

It knows POSIX semantics (errno, link counts, timestamps) but nothing of FUSE or of the
layout's rules, which belong to the layer above. Every operation's metadata changes are made
without an `await` in between, so a batched commit never catches half of one.

Guarantees: the store holds no plaintext content (see codec) and no plaintext name, symlink
target or extended attribute (see names): callers pass and get plaintext, the database sees only
ciphertext, and metadata that fails authentication raises `DamagedMetadata` instead of being
shown; one daemon at a time (flock); a wrong key is detected before anything is read or written;
`sync()` makes everything written so far durable.
"""
from __future__ import annotations

import errno
import fcntl
import logging
import os
import shutil
import sqlite3
import stat
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterable, Optional

import trio

from ..codec import ContentCodec, IntegrityError
from .. import workers
from ..layout import Kind
from ..names import MetadataCipher
from .blocks import AREA_USAGE, COMPACT_DEAD, COMPACT_IDLE, INLINE_MAX, BlockStore
from .db import MISSING, Database
from .objects import ObjectFiles
from .packs import PackFiles
from . import reclaim

log = logging.getLogger(__name__)

ROOT_INODE = 1
BLOCK_SIZE = 128 * 1024
COMMIT_INTERVAL = 1.0
SYNC_ROUNDS = 3  # a durable commit's syncs of the packs before the last, which blocks (Store._sync_packs)
MAX_FILE_SIZE = 2**63 - 1
COMPACT_INTERVAL = 30.0  # seconds between looks for mostly dead packs
RECLAIM_DEAD = 0.01      # when the disk is short, a pack this dead is compacted
UNCLEAN_MARK = "unclean"  # present while a daemon has the store open (see Store.__init__)
DAMAGED_NAME = "<damaged name>"  # shown for a name that fails authentication


class StoreError(Exception):
    """An operation that POSIX refuses; `errno` says how."""

    def __init__(self, code: int, message: str = "") -> None:
        super().__init__(message or os.strerror(code))
        self.errno = code


class StoreOpenError(Exception):
    """The store cannot be opened; the message says why and what to do."""


class StoreLockedError(StoreOpenError):
    pass


class WrongKeyError(StoreOpenError):
    pass


class DamagedMetadata(Exception):
    """A name, symlink target or xattr of inode `inode` fails authentication: the store was
    altered outside tempfs (or damaged)."""

    def __init__(self, inode: int, what: str) -> None:
        super().__init__(f"inode {inode}: {what} fails authentication")
        self.inode, self.what = inode, what


@dataclass(slots=True)
class Inode:
    id: int
    mode: int
    uid: int
    gid: int
    size: int
    nlink: int
    rdev: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int
    kind: int
    area: Optional[str]
    target: Optional[bytes]
    policy: Optional[str]
    expires_ns: Optional[int]
    stored_bytes: int
    life_ns: Optional[int]  # its policy's max_age
    ttl_deadline_ns: Optional[int]

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)


_S_IFMT = 0o170000  # the file-type bits of st_mode
_INODE_COLUMNS = ("id, mode, uid, gid, size, nlink, rdev, atime_ns, mtime_ns, ctime_ns, kind, area, target, "
                  "policy, expires_ns, stored_bytes, life_ns, ttl_deadline_ns")
_INODE_QUERY = f"SELECT {_INODE_COLUMNS} FROM inodes WHERE id=?"
_NAMED_QUERY = (f"SELECT {', '.join('i.' + c for c in _INODE_COLUMNS.split(', '))} FROM entries e "
                "JOIN inodes i ON i.id = e.inode WHERE e.parent=? AND e.name=?")
_SETTABLE = {"mode", "uid", "gid", "size", "atime_ns", "mtime_ns", "ctime_ns"}


class Store:
    def __init__(self, path: Path, codec: ContentCodec, *, dirty_limit: int, cache_limit: int,
                 clock: Callable[[], int] = time.time_ns, inline_max: int = INLINE_MAX,
                 patch_max: Optional[int] = None) -> None:
        """Opens (or creates) the store at `path`, locking it; raises StoreOpenError."""
        self.path = path
        self.clock = clock
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._lock_fd = _lock(path / "lock")
        self.names = MetadataCipher(codec.metadata_key)
        try:
            used_before = (path / "meta.sqlite").exists()  # a new store has none yet
            self.db = Database(path / "meta.sqlite")
            self._open_database(codec, used_before)
        except sqlite3.DatabaseError as e:
            os.close(self._lock_fd)
            raise StoreOpenError(f"{path / 'meta.sqlite'}: the metadata database is unreadable ({e}); "
                                 "run tempfs fsck, or move the store away to start afresh") from None
        except BaseException:
            os.close(self._lock_fd)
            raise
        self.lifetimes: dict[str, Optional[int]] = {}
        # inodes whose last name went since the store opened: only these can need freeing when
        # the kernel forgets them or they are closed (a superset: a later link() leaves it here)
        self.unlinked: set[int] = set()
        # of those, whose content was freed (and db.forgotten then: a rollback undoes it)
        self._emptied: dict[int, int] = {}
        # of those, what waits for the reclaimer (reclaim.py)
        self.reclaiming = reclaim.ReclaimQueue()
        self._reclaim_wanted = trio.Event()
        self._used: dict[int, int] = {}  # touch_used() times not written yet
        # inode columns changed and not written yet (written files' size and times, setattr's
        # owner, mode and times, a folder's link count and times as names come and go in it, a
        # removed name's link count): one statement a commit, not one a request (`tar x` sets
        # three attributes of each file, and adds a name to a folder). inode() and named()
        # answer with them; any other statement that names the inodes table writes them first
        self._held: dict[int, dict[str, int]] = {}
        self.db.hold_back("inodes", self._write_held)
        self.packs = PackFiles(path / "packs")
        self.blocks = BlockStore(self.db, self.objects, self.packs, codec, BLOCK_SIZE, dirty_limit, cache_limit,
                                 inline_max, patch_max)
        self.blocks.on_stored = self._keep_inodes
        # STORE/unclean exists while the store is open and goes at a clean close(): found here,
        # the last opener died (SIGKILL, power cut), so the daemon runs the quick check before
        # serving; close() removes it only once that is done (the check clears needs_recovery).
        self.needs_recovery = (path / UNCLEAN_MARK).exists()
        try:
            self._purge_unlinked()
            self.commit_now()
        except sqlite3.DatabaseError as e:  # damage past the pages read so far
            self.db.conn.close()
            os.close(self._lock_fd)
            raise StoreOpenError(f"{path / 'meta.sqlite'}: the metadata database is damaged ({e}); keep a copy "
                                 "of the store (sqlite3's .recover may salvage it), or move it away to start afresh") from None
        _create_durably(path / UNCLEAN_MARK)

    def _open_database(self, codec: ContentCodec, used_before: bool) -> None:
        if self.db.is_new:
            # meta.sqlite emptied, or lost beside packs: starting afresh would hide the loss
            if used_before or any(next(self.path.glob(files), None) for files in ("objects/??/*", "packs/*")):
                raise StoreOpenError(f"{self.path / 'meta.sqlite'}: the metadata database is missing or empty, but "
                                     "the store was in use: without it its files cannot be read. Restore it, "
                                     "or move the store away to start afresh")
            self.db.create_schema()  # one transaction with what follows: a crash leaves no half store
            self.db.set_meta("key_check", codec.key_check_value())
            self.db.set_meta("digest", codec.digest_algorithm)
            self.db.set_meta("object_levels", 1)
            now = self.clock()
            self.db.execute("INSERT INTO inodes(id, mode, uid, gid, nlink, atime_ns, mtime_ns, ctime_ns, kind) "
                            "VALUES (?, ?, ?, ?, 2, ?, ?, ?, ?)",
                            (ROOT_INODE, stat.S_IFDIR | 0o755, os.getuid(), os.getgid(), now, now, now, Kind.ROOT))
            self.db.commit(durable=True)
        elif self.db.get_meta("key_check") != codec.key_check_value():
            raise WrongKeyError(f"{self.path}: the key does not open this store (wrong key file?)")
        else:
            self.db.migrate(secure_metadata=lambda: self._secure_metadata(codec))
        # what the store was made with (none recorded: before schema 5): the digest its objects
        # are deduplicated by, and how deep its object folders nest
        try:
            codec.use_digest(self.db.get_meta("digest") or "blake2b")
            self.objects = ObjectFiles(self.path / "objects", self.db.get_meta("object_levels") or 2)
        except ValueError as e:
            raise StoreOpenError(f"{self.path / 'meta.sqlite'}: {e} (a newer tempfs?)") from None
        # dead objects' files that a daemon before schema 6 kept to rewrite: nothing refers to them
        shutil.rmtree(self.path / "objects" / "free", ignore_errors=True)

    def _secure_metadata(self, codec: ContentCodec) -> None:
        """Migration of a store written before names were encrypted and block map entries and
        digests authenticated (schema version 3), inside its transaction."""
        db, names = self.db, self.names
        for ino, blockno, object_id in db.execute("SELECT inode, blockno, object FROM blocks").fetchall():
            db.execute("UPDATE blocks SET tag=? WHERE inode=? AND blockno=?",
                       (codec.block_tag(ino, blockno, object_id), ino, blockno))
        for object_id, digest, wrapped in db.execute("SELECT id, digest, wrapped_key FROM objects").fetchall():
            try:
                db.execute("UPDATE objects SET wrapped_key=? WHERE id=?",
                           (codec.bind_digest(object_id, digest, wrapped), object_id))
            except IntegrityError:
                log.error("object %016x: its key fails authentication; left as it is for tempfs fsck", object_id)
        for entry_id, parent, name in db.execute("SELECT id, parent, name FROM entries").fetchall():
            db.execute("UPDATE entries SET name=? WHERE id=?", (names.name(parent, name), entry_id))
        for ino, target in db.execute("SELECT id, target FROM inodes WHERE target IS NOT NULL").fetchall():
            db.execute("UPDATE inodes SET target=? WHERE id=?", (names.target(ino, target), ino))
        for ino, name, value in db.execute("SELECT inode, name, value FROM xattrs").fetchall():
            stored = names.xattr_name(ino, name)
            db.execute("UPDATE xattrs SET name=?, value=? WHERE inode=? AND name=?",
                       (stored, names.xattr_value(ino, stored, value), ino, name))
        self.db.shred_after_commit()

    def close(self) -> None:
        self.reclaim()
        self.packs.close()
        self.packs.sync()
        self._write_behind()
        self.db.close()
        if not self.needs_recovery:
            (self.path / UNCLEAN_MARK).unlink(missing_ok=True)
        os.close(self._lock_fd)

    # ---- transactions --------------------------------------------------------------------
    async def sync(self) -> None:
        """Frees what deleted files held, flushes all dirty data and makes every change so far durable."""
        self.reclaim()
        await self.blocks.flush_all()
        await self.commit(durable=True)

    async def commit(self, durable: bool = False, shred: bool = False) -> None:
        """Commits the metadata changes so far; `durable` makes them, and every object they
        reference, survive a power cut (objects first, so metadata never points at lost data);
        `shred` also checkpoints the metadata's log, so that nothing removed so far (names,
        keys) survives in it."""
        if shred:
            self.reclaim()  # what waits holds keys and names the shred is asked to leave no trace of
            self.db.shred_after_commit()
        if durable:
            await self._sync_packs()
        # after that wait, with none before the commit: what is held back joins the changes that
        # came meanwhile (a name removed, and its link count held, must commit together)
        self._write_behind()
        if durable or self.db.dirty:
            await workers.run_sync(self.db.commit_deferred(durable))

    async def _sync_packs(self) -> None:
        """Makes every pack append whose row may be in the open transaction durable. The flusher
        runs while a sync waits, and its rows join this transaction: synced again until a sync
        finds nothing new, and at last without yielding, so that no more can come."""
        for _ in range(SYNC_ROUNDS):
            if self.packs.synced():  # nothing appended since the last sync, none running: no trip
                return
            await workers.run_sync(self.packs.sync)
        self.packs.sync()

    async def compact(self, min_dead: float = COMPACT_DEAD, max_packs: int = 8, idle: float = COMPACT_IDLE) -> int:
        """Moves what lives in packs at least `min_dead` dead (by bytes) to new packs, and
        deletes them once the move is durable; returns how many went. A pack being filled is
        taken too once nothing was appended to it for `idle` seconds."""
        packs = (await self.blocks.compact_candidates(min_dead, idle))[:max_packs]
        if not packs:
            return 0
        for pack in packs:
            await self.blocks.move_pack(pack)
        await self.commit(durable=True)  # before the old packs go: a power cut keeps one copy
        for pack in packs:
            self.blocks.remove_pack_if_dead(pack)
        await self.commit()
        log.info("compacted %d packs", len(packs))
        return len(packs)

    async def reclaim_disk(self) -> int:
        """Gives the disk back every dead byte worth moving for (the disk is short): compacts
        every pack that holds dead objects, those being appended to too; returns how many
        packs went."""
        self.reclaim()  # what deleted files held turns into dead bytes first
        gone = 0
        while (n := await self.compact(min_dead=RECLAIM_DEAD, idle=0)) > 0:
            gone += n
        return gone

    async def run_compactor(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            await trio.sleep(COMPACT_INTERVAL)
            try:
                while await self.compact() > 0:
                    pass
            except (sqlite3.Error, OSError) as e:  # e.g. the disk is full: retried at the next look
                log.error("cannot compact packs (%s)", e)

    def commit_now(self) -> None:
        """Commits from synchronous code (opening, laying out the tree, tools)."""
        self._write_behind()
        self.db.commit()

    async def run_committer(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            await trio.sleep(COMMIT_INTERVAL)
            if self.db.dirty or self._used or self._held:
                try:
                    await self.commit()
                except (sqlite3.Error, OSError) as e:  # e.g. the disk is full: the changes wait
                    log.error("cannot commit metadata (%s); retrying", e)

    # ---- inodes and names ----------------------------------------------------------------
    # Inode rows are kept (Database.keep) under their number, entries under (folder, stored
    # name), "has no xattrs" under _xattrs_key(inode): every statement below that changes one
    # names the keys it changes.
    def inode(self, ino: int) -> Inode:
        row = self.db.keyed_one(ino, _INODE_QUERY, (ino,), held_ok=True)
        if row is None:
            raise StoreError(errno.ENOENT)
        return self._inode_of(row)

    def _inode_of(self, row: tuple) -> Inode:
        """The inode of a row read from the database, with what was written to it since."""
        node = Inode(*self._current(row))
        if node.target is not None:
            try:
                node.target = self.names.plain_target(node.id, node.target)
            except IntegrityError:
                raise DamagedMetadata(node.id, "the symlink target") from None
        return node

    def _current(self, row: tuple) -> tuple:
        """An inode row read from the database, with the columns held back since (_hold)."""
        held = self._held.get(row[0])
        return row if held is None else _with_held(row, held)

    def lookup(self, parent: int, name: bytes) -> Optional[int]:
        key = (parent, self.names.name(parent, name))
        entry = self.db.keyed_one(key, "SELECT inode FROM entries WHERE parent=? AND name=?", key)
        return None if entry is None else entry[0]

    def named(self, parent: int, name: bytes) -> Optional[Inode]:
        """The inode the entry `name` of folder `parent` refers to (lookup and inode in one query)."""
        key = (parent, self.names.name(parent, name))
        entry = self.db.kept(key)
        if entry is not MISSING:
            return None if entry is None else self.inode(entry[0])
        row = self.db.one(_NAMED_QUERY, key, held_ok=True)
        self.db.keep(key, None if row is None else (row[0],))
        if row is None:
            return None
        self.db.keep(row[0], row)
        return self._inode_of(row)

    def children(self, parent: int, after: int = 0, limit: int = 1000) -> list[tuple[int, bytes, int]]:
        """(entry id, name, inode) of a folder's entries past readdir offset `after`."""
        rows = self.db.execute("SELECT id, name, inode FROM entries WHERE parent=? AND id>? ORDER BY id LIMIT ?",
                               (parent, after, limit)).fetchall()
        return [(entry_id, self._plain_name(parent, name, ino), ino) for entry_id, name, ino in rows]

    def _plain_name(self, parent: int, stored: bytes, ino: int) -> bytes:
        try:
            return self.names.plain_name(parent, stored)
        except IntegrityError:
            raise DamagedMetadata(ino, "a name") from None

    def shown_name(self, parent: int, stored: bytes) -> str:
        """A stored name as text for messages, or a placeholder when it fails authentication."""
        try:
            return self.names.plain_name(parent, stored).decode(errors="replace")
        except IntegrityError:
            return DAMAGED_NAME

    def path_of(self, ino: int) -> str:
        """One path of an inode below the root, for messages."""
        parts: list[str] = []
        while ino != ROOT_INODE and len(parts) < 4096:
            row = self.db.one("SELECT parent, name FROM entries WHERE inode=? LIMIT 1", (ino,))
            if row is None:
                parts.append("<unlinked>")
                break
            ino = row[0]
            parts.append(self.shown_name(row[0], row[1]))
        return "/" + "/".join(reversed(parts))

    def make(self, parent: int, name: bytes, mode: int, uid: int, gid: int, *,
             rdev: int = 0, target: Optional[bytes] = None, kind: int = Kind.FREE) -> Inode:
        """Creates a new inode named `name` in folder `parent`."""
        folder = self._folder(parent)
        if self.named(parent, name) is not None:  # the kernel's lookup just asked the same
            raise StoreError(errno.EEXIST)
        now = self.clock()
        is_dir = stat.S_ISDIR(mode)
        area = folder.area if folder.area is not None else name.decode(errors="surrogateescape")
        size = len(target) if target is not None else 0
        nlink, life = 2 if is_dir else 1, self.lifetimes.get(folder.policy)
        ino = self.db.insert(
            "INSERT INTO inodes(mode, uid, gid, size, nlink, rdev, atime_ns, mtime_ns, ctime_ns, kind, area, "
            "policy, life_ns, used_ns) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (mode, uid, gid, size, nlink, rdev, now, now, now, kind, area, folder.policy, life, now),
            held_ok=True)  # a new row: nothing held
        # the row as the database now holds it (_INODE_COLUMNS), so that no query reads it back
        row = (ino, mode, uid, gid, size, nlink, rdev, now, now, now, int(kind), area, None, folder.policy,
               _deadline(now, life, None), 0, life, None)
        node = Inode(*row)
        self.db.keep(_xattrs_key(node.id), False)  # a new inode has none: nothing to look up or delete
        if target is not None:  # sealed to its inode, whose number exists only now
            self.db.change("UPDATE inodes SET target=? WHERE id=?", (self.names.target(node.id, target), node.id),
                           (node.id,))
            node.target = target
        else:
            self.db.keep(node.id, row)
        self._add_entry(parent, name, node.id, now, dir_delta=int(is_dir))
        return node

    def link(self, ino: int, parent: int, name: bytes) -> Inode:
        node = self.inode(ino)
        folder = self._folder(parent)
        if node.is_dir:
            raise StoreError(errno.EPERM)
        if node.area != folder.area:
            raise StoreError(errno.EXDEV, "hard links cannot cross areas")
        if self.lookup(parent, name) is not None:
            raise StoreError(errno.EEXIST)
        now = self.clock()
        self._hold(ino, {"nlink": node.nlink + 1, "ctime_ns": now})
        self._add_entry(parent, name, ino, now, dir_delta=0)
        return self.inode(ino)

    def unlink(self, parent: int, name: bytes, *, want_dir: bool, discard: bool = False) -> Inode:
        """Removes a name (rmdir when `want_dir`); returns the inode with its new link count.
        `discard`: the file is not open, so if that was its last name its content goes
        (discard_content())."""
        node = self.named(parent, name)
        if node is None:
            raise StoreError(errno.ENOENT)
        if want_dir and not node.is_dir:
            raise StoreError(errno.ENOTDIR)
        if not want_dir and node.is_dir:
            raise StoreError(errno.EISDIR)
        if node.is_dir and self.children(node.id, limit=1):
            raise StoreError(errno.ENOTEMPTY)
        return self._remove_entry(parent, name, node, self.clock(), discard)

    def rename(self, old_parent: int, old_name: bytes, new_parent: int, new_name: bytes, *,
               noreplace: bool = False, exchange: bool = False) -> Optional[Inode]:
        """Moves a name; returns the inode it replaced (with its new link count), if any."""
        ino = self.lookup(old_parent, old_name)
        if ino is None:
            raise StoreError(errno.ENOENT)
        node = self.inode(ino)
        target_ino = self.lookup(new_parent, new_name)
        if target_ino == ino:
            return None
        if exchange:
            return self._exchange(old_parent, old_name, node, new_parent, new_name, target_ino)
        if target_ino is not None and noreplace:
            raise StoreError(errno.EEXIST)
        now = self.clock()
        replaced = None
        if target_ino is not None:
            target = self.inode(target_ino)
            self._check_replace(node, target)
            replaced = self._remove_entry(new_parent, new_name, target, now)
        old_key = (old_parent, self.names.name(old_parent, old_name))
        new_key = (new_parent, self.names.name(new_parent, new_name))
        self.db.change("UPDATE entries SET parent=?, name=? WHERE parent=? AND name=?", (*new_key, *old_key),
                       (old_key, new_key))
        self._moved(node, old_parent, new_parent, now)
        return replaced

    def _exchange(self, old_parent: int, old_name: bytes, node: Inode, new_parent: int, new_name: bytes,
                  target_ino: Optional[int]) -> None:
        if target_ino is None:
            raise StoreError(errno.ENOENT)
        target = self.inode(target_ino)
        now = self.clock()
        for key, ino in (((old_parent, self.names.name(old_parent, old_name)), target_ino),
                         ((new_parent, self.names.name(new_parent, new_name)), node.id)):
            self.db.change("UPDATE entries SET inode=? WHERE parent=? AND name=?", (ino, *key), (key,))
        self._moved(node, old_parent, new_parent, now)
        self._moved(target, new_parent, old_parent, now)
        return None

    def _check_replace(self, node: Inode, target: Inode) -> None:
        if target.is_dir and not node.is_dir:
            raise StoreError(errno.EISDIR)
        if node.is_dir and not target.is_dir:
            raise StoreError(errno.ENOTDIR)
        if target.is_dir and self.children(target.id, limit=1):
            raise StoreError(errno.ENOTEMPTY)

    def _moved(self, node: Inode, old_parent: int, new_parent: int, now: int) -> None:
        self._hold(node.id, {"ctime_ns": now})
        delta = 1 if node.is_dir and old_parent != new_parent else 0
        self._touch_folder(old_parent, now, -delta)
        self._touch_folder(new_parent, now, delta)
        folder = self._folder(new_parent)
        if (folder.area, folder.policy) != (node.area, node.policy):
            self._adopt(node.id, folder)

    def _adopt(self, ino: int, folder: Inode) -> None:
        """A subtree moved into `folder`: it takes the folder's area and expiry policy."""
        self.db.execute(  # names no kept row: a subtree's go with all the others
            "WITH RECURSIVE sub(id) AS (SELECT ? UNION SELECT e.inode FROM entries e JOIN sub ON e.parent = sub.id) "
            "UPDATE inodes SET area=?, policy=?, life_ns=? WHERE id IN (SELECT id FROM sub)",
            (ino, folder.area, folder.policy, self.lifetimes.get(folder.policy)))

    def _folder(self, ino: int) -> Inode:
        folder = self.inode(ino)
        if not folder.is_dir:
            raise StoreError(errno.ENOTDIR)
        return folder

    def _add_entry(self, parent: int, name: bytes, ino: int, now: int, dir_delta: int) -> None:
        key = (parent, self.names.name(parent, name))
        self.db.change("INSERT INTO entries(parent, name, inode) VALUES (?, ?, ?)", (*key, ino), (key,))
        self.db.keep(key, (ino,))
        self._touch_folder(parent, now, dir_delta)

    def expire(self, ino: int) -> list[tuple[int, bytes]]:
        """Removes every name and the content of a closed entry whose deadline passed (or that
        is evicted), as if deleted, and returns the (folder, name) pairs it had (those that
        still authenticate). The folders' own times and deadlines stay as they were: an expiry
        is not a change a program made there."""
        names = []
        for parent, stored in self.db.execute("SELECT parent, name FROM entries WHERE inode=?", (ino,)).fetchall():
            try:
                names.append((parent, self.names.plain_name(parent, stored)))
            except IntegrityError:
                log.error("inode %d: a name in folder %d fails authentication; removed unseen", ino, parent)
        node = self.inode(ino)
        self.db.execute("DELETE FROM entries WHERE inode=?", (ino,))
        emptied = ", size=0" if self._discard_blocks(node) else ""
        # with no deadline it leaves the reaper's index, waiting only for the kernel to forget it
        self.db.execute(f"UPDATE inodes SET nlink=0, life_ns=NULL, ttl_deadline_ns=NULL{emptied} WHERE id=?", (ino,))
        self.unlinked.add(ino)
        if node.is_dir:
            for parent, _name in names:
                self.db.execute("UPDATE inodes SET nlink=nlink-1 WHERE id=?", (parent,))
        return names

    def discard_content(self, node: Inode) -> None:
        """Frees the content of a file that has no name left and is not open: nobody can open
        it again, so what it holds goes before the kernel forgets the inode: its data not
        stored yet now, what is stored (its space, and once the commit lands its keys) with
        the reclaimer."""
        self.blocks.drop_dirty_after(node.id, 0)
        if node.stored_bytes:
            self._ask_reclaim(node.id, remove=False)

    def remove_inode(self, ino: int) -> None:
        """Destroys, with the reclaimer, an inode that has no name left and no user."""
        self._ask_reclaim(ino, remove=True)

    def _ask_reclaim(self, ino: int, remove: bool) -> None:
        self.reclaiming.ask(ino, remove)
        self._reclaim_wanted.set()

    def reclaim(self, limit: Optional[int] = None) -> int:
        """Frees now what deleted files wait to give back (the `limit` oldest); returns how
        many went. One that fails waits again, with those after it, and the error is raised."""
        taken = self.reclaiming.take(len(self.reclaiming) if limit is None else limit)
        for i, (ino, remove) in enumerate(taken):
            try:
                self._reclaim_one(ino, remove)
            except BaseException:
                for later, later_remove in taken[i:]:
                    self.reclaiming.ask(later, later_remove)
                raise
        return len(taken)

    def _reclaim_one(self, ino: int, remove: bool) -> None:
        row = self.db.keyed_one(ino, _INODE_QUERY, (ino,), held_ok=True)
        # its link count as held (unlinked since the last commit); its symlink target as stored,
        # so that a damaged one goes too
        node = None if row is None else Inode(*self._current(row))
        if node is None or node.nlink > 0:
            return  # gone already, or named again (a rollback undid its removal)
        if remove:
            self.destroy_inode(ino)
        elif self._discard_blocks(node):
            self.db.change("UPDATE inodes SET size=0 WHERE id=?", (ino,), (ino,))

    async def run_reclaimer(self, last_request: Callable[[], float], *,
                            task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Gives back what deleted files held when reclaim.py says, a slice at a time, looking
        again after each; `last_request()`: when (time.perf_counter()) the last request came."""
        task_status.started()
        while True:
            await self._reclaim_wanted.wait()
            self._reclaim_wanted = trio.Event()
            while self.reclaiming:
                if not self.reclaiming.due(time.perf_counter() - last_request() >= reclaim.QUIET):
                    await trio.sleep(reclaim.QUIET)
                    continue
                try:
                    self.reclaim(reclaim.SLICE)
                except (sqlite3.Error, OSError) as e:  # e.g. the disk is full: they wait, and are retried
                    log.error("cannot free what deleted files held (%s); retrying in %.0f s", e, reclaim.AGE)
                    await trio.sleep(reclaim.AGE)
                await trio.sleep(0)  # the requests that came meanwhile go first

    def _discard_blocks(self, node: Inode) -> bool:
        """Frees a file's content now, but for the size, which the caller sets to 0 if this says so."""
        if not node.stored_bytes and not self.blocks.dirty_bytes_of(node.id):
            return False
        self.blocks.drop_after(node.id, 0)
        self._emptied[node.id] = self.db.forgotten
        return True

    def due(self, now: int, limit: int) -> list[int]:
        """Entries whose deadline has passed, earliest first (an index range: the cost grows with
        what is due, not with the tree)."""
        return [r[0] for r in self.db.execute(
            "SELECT id FROM inodes WHERE expires_ns <= ? ORDER BY expires_ns LIMIT ?", (now, limit))]

    def next_deadline(self, after: int = -1) -> Optional[int]:
        row = self.db.one("SELECT min(expires_ns) FROM inodes WHERE expires_ns > ?", (after,))
        return row[0]

    def set_ttl(self, ino: int, seconds: Optional[float]) -> None:
        """Shortens an entry's life to `seconds` from now (never past its policy's max_age);
        None gives it back its policy's life."""
        deadline = None if seconds is None else self.clock() + int(seconds * 1e9)
        self.db.change("UPDATE inodes SET ttl_deadline_ns=? WHERE id=?", (deadline, ino), (ino,))

    def touch_used(self, ino: int) -> None:
        """Marks a file as used now (opened or closed): eviction takes the least recently used.
        Written with the next commit, or before the order is asked for: one statement for all."""
        self._used[ino] = self.clock()

    def _write_behind(self) -> None:
        """Writes what is held in memory: inode columns changed (by writes, setattr), use times."""
        if self.db.holding:
            self.db.write_held()  # _write_held(), once (its statements would ask for it again)
        self._write_used()

    def _write_held(self) -> None:
        if not self._held:
            return
        kept = {ino: self.db.kept(ino) for ino in self._held}
        by_columns: dict[tuple[str, ...], list[tuple]] = {}  # one statement per set of columns changed
        for ino, held in self._held.items():
            columns = tuple(sorted(held, key=_COLUMN_INDEX.__getitem__))
            by_columns.setdefault(columns, []).append((*(held[c] for c in columns), ino))
        for columns, rows in by_columns.items():
            self.db.change_many(f"UPDATE inodes SET {', '.join(c + '=?' for c in columns)} WHERE id=?", rows,
                                list(self._held))
        for ino, held in self._held.items():  # kept as they are now written
            if kept[ino] not in (MISSING, None):
                self.db.keep(ino, _with_held(kept[ino], held))
        self._held.clear()

    def _keep_inodes(self, inodes: set[int]) -> None:
        """Reads again, in one query, the rows of files whose stored bytes a flush moved (the
        first lookup of a file just written then costs no query)."""
        wanted = [ino for ino in inodes if self.db.kept(ino) is MISSING]
        if wanted:
            rows = self.db.execute(f"SELECT {_INODE_COLUMNS} FROM inodes WHERE id IN ({','.join('?' * len(wanted))})",
                                   wanted, held_ok=True).fetchall()
            for row in rows:
                self.db.keep(row[0], row)

    def _write_used(self) -> None:
        if self._used:
            # used_ns is no column of a kept row
            self.db.change_many("UPDATE inodes SET used_ns=? WHERE id=?", [(t, i) for i, t in self._used.items()])
            self._used.clear()

    def least_recently_used(self, area: str, limit: int, skip: int = 0) -> list[int]:
        """Files of `area` that hold stored content, least recently used first."""
        self._write_used()
        return [r[0] for r in self.db.execute(
            "SELECT id FROM inodes WHERE area=? AND kind=? AND nlink>0 AND stored_bytes>0 AND (mode & ?) = ? "
            "ORDER BY used_ns LIMIT ? OFFSET ?", (area, Kind.FREE, _S_IFMT, stat.S_IFREG, limit, skip))]

    def is_empty(self, ino: int) -> bool:
        return not self.children(ino, limit=1)

    def apply_policies(self, lifetimes: dict[str, Optional[int]]) -> None:
        """Sets each policy's max_age (ns, None for no expiry by age) on every entry it governs."""
        self.lifetimes = dict(lifetimes)
        for policy, life in lifetimes.items():
            self.db.execute("UPDATE inodes SET life_ns=? WHERE policy=? AND kind=?", (life, policy, Kind.FREE))

    def _remove_entry(self, parent: int, name: bytes, node: Inode, now: int, discard: bool = False) -> Inode:
        """Removes one name of `node`; returns the node with its new link count (if that is 0
        and `discard`, its content goes: discard_content())."""
        key = (parent, self.names.name(parent, name))
        self.db.change("DELETE FROM entries WHERE parent=? AND name=?", key, (key,))
        nlink = 0 if node.is_dir else node.nlink - 1
        self._hold(node.id, {"nlink": nlink, "ctime_ns": now})
        if nlink == 0:
            self.unlinked.add(node.id)
            if discard:
                self.discard_content(node)
        self._touch_folder(parent, now, -int(node.is_dir))
        return replace(node, nlink=nlink, ctime_ns=now)

    def _touch_folder(self, ino: int, now: int, nlink_delta: int) -> None:
        folder = self.inode(ino)
        self._hold(ino, {"nlink": folder.nlink + nlink_delta, "mtime_ns": now, "ctime_ns": now})

    def destroy_inode(self, ino: int) -> None:
        """Destroys now an inode that has no name left and no user: its content, xattrs and row."""
        if self._emptied.pop(ino, None) != self.db.forgotten:  # else nothing was written to it since
            self.blocks.drop_after(ino, 0)
        self._used.pop(ino, None)
        self._held.pop(ino, None)
        if self.db.kept(_xattrs_key(ino)) is not False:
            self.db.change("DELETE FROM xattrs WHERE inode=?", (ino,), (_xattrs_key(ino),))
        self.db.change("DELETE FROM inodes WHERE id=?", (ino,), (ino,), held_ok=True)  # nothing held of it now
        self.unlinked.discard(ino)

    def _purge_unlinked(self) -> None:
        """At open, no kernel holds a reference any more: inodes without a name can go."""
        for (ino,) in self.db.execute("SELECT id FROM inodes WHERE nlink=0").fetchall():
            self.destroy_inode(ino)

    # ---- attributes ----------------------------------------------------------------------
    def set_attrs(self, ino: int, **fields: int) -> None:
        """Sets attribute columns (mode, uid, gid, atime_ns, mtime_ns, ctime_ns); ctime follows."""
        unknown = set(fields) - _SETTABLE
        if unknown:
            raise ValueError(f"cannot set {unknown}")
        fields.setdefault("ctime_ns", self.clock())
        self._hold(ino, fields)

    def get_xattr(self, ino: int, name: bytes) -> Optional[bytes]:
        if self.db.kept(_xattrs_key(ino)) is False:
            return None
        stored = self.names.xattr_name(ino, name)
        row = self.db.one("SELECT value FROM xattrs WHERE inode=? AND name=?", (ino, stored))
        if row is None:
            return None
        try:
            return self.names.plain_xattr_value(ino, stored, row[0])
        except IntegrityError:
            raise DamagedMetadata(ino, "an extended attribute") from None

    def set_xattr(self, ino: int, name: bytes, value: bytes) -> None:
        stored = self.names.xattr_name(ino, name)
        self.db.change("INSERT OR REPLACE INTO xattrs(inode, name, value) VALUES (?, ?, ?)",
                       (ino, stored, self.names.xattr_value(ino, stored, value)), (_xattrs_key(ino),))
        self.set_attrs(ino)

    def remove_xattr(self, ino: int, name: bytes) -> bool:
        removed = self.db.change("DELETE FROM xattrs WHERE inode=? AND name=?",
                                 (ino, self.names.xattr_name(ino, name))) > 0
        if removed:
            self.set_attrs(ino)
        return removed

    def xattr_names(self, ino: int) -> list[bytes]:
        try:
            return [self.names.plain_xattr_name(ino, r[0])
                    for r in self.db.execute("SELECT name FROM xattrs WHERE inode=?", (ino,))]
        except IntegrityError:
            raise DamagedMetadata(ino, "an extended attribute's name") from None

    # ---- content -------------------------------------------------------------------------
    async def read(self, ino: int, offset: int, size: int) -> bytes:
        return await self.blocks.read(ino, offset, size, self.inode(ino).size)

    async def write(self, ino: int, offset: int, data: bytes) -> None:
        if not data:
            return
        if offset + len(data) > MAX_FILE_SIZE:
            raise StoreError(errno.EFBIG)
        node = self.inode(ino)
        if offset > node.size:
            await self.blocks.cut_tail(ino, node.size, node.area)
        await self.blocks.write(ino, offset, data, node.area, size=node.size)
        held = self._held.get(ino, {})  # the size now: a truncation may have run during the write
        size = held["size"] if "size" in held else self.inode(ino).size
        now = self.clock()
        self._hold(ino, {"size": max(size, offset + len(data)), "mtime_ns": now, "ctime_ns": now})
        self._emptied.pop(ino, None)

    def _hold(self, ino: int, columns: dict[str, int]) -> None:
        """Changes inode columns in memory, written with the next commit (or the next statement
        that names the inodes table)."""
        self._held.setdefault(ino, {}).update(columns)
        self.db.holding = True

    async def truncate(self, ino: int, size: int) -> None:
        if size > MAX_FILE_SIZE:
            raise StoreError(errno.EFBIG)
        node = self.inode(ino)
        await self.blocks.cut_tail(ino, min(size, node.size), node.area)
        self.blocks.drop_after(ino, size)
        now = self.clock()
        self._hold(ino, {"size": size, "mtime_ns": now, "ctime_ns": now})

    async def fsync(self, ino: int) -> None:
        await self.blocks.flush_inode(ino, inline_patches=True)
        await self.commit(durable=True)

    # ---- accounting ----------------------------------------------------------------------
    def usage(self) -> dict:
        """Per area: files, logical bytes, stored bytes (objects shared by areas count in each);
        total: stored bytes once per object, and the bytes of the packs on disk (their live
        objects, and dead ones not compacted yet)."""
        areas = {self.shown_name(ROOT_INODE, name): {"files": 0, "logical_bytes": 0, "stored_bytes": 0}
                 for (name,) in self.db.execute("SELECT name FROM entries WHERE parent=?", (ROOT_INODE,))}
        for area, files, logical in self.db.execute(
                "SELECT area, COUNT(*), CAST(TOTAL(size) AS INTEGER) FROM inodes "
                "WHERE kind=? AND area IS NOT NULL AND (mode & ?) != ? GROUP BY area",
                (Kind.FREE, _S_IFMT, stat.S_IFDIR)):
            areas[area] = {"files": files, "logical_bytes": logical, "stored_bytes": 0}
        for area, stored in self.db.execute("SELECT area, stored_bytes FROM area_usage"):
            areas.setdefault(area, {"files": 0, "logical_bytes": 0, "stored_bytes": 0})["stored_bytes"] = stored
        files, logical = self.db.one("SELECT COUNT(*), CAST(TOTAL(size) AS INTEGER) FROM inodes "
                                     "WHERE kind=? AND (mode & ?) != ?", (Kind.FREE, _S_IFMT, stat.S_IFDIR))
        total = {"files": files, "logical_bytes": logical, "stored_bytes": self.stored_bytes(),
                 "objects": self._total("objects"), "pack_bytes": sum(self.packs.sizes()[0].values())}
        return {"areas": areas, "total": total}

    def savings(self) -> dict:
        """Per area and in total: bytes saved by deduplication (blocks sharing an object) and by
        compression (distinct objects stored smaller than their plaintext; the seal's overhead
        makes it slightly negative for incompressible data). A scan of the block map."""
        referenced = dict(self.db.execute(
            "SELECT i.area, SUM(o.plain_size) FROM blocks b JOIN inodes i ON i.id = b.inode "
            "JOIN objects o ON o.id = b.object GROUP BY i.area"))
        unique = dict(self.db.execute(
            "SELECT a.area, SUM(o.plain_size) FROM area_objects a JOIN objects o ON o.id = a.object GROUP BY a.area"))
        stored = dict(self.db.execute("SELECT area, stored_bytes FROM area_usage"))
        areas = {area: _saved(referenced.get(area, 0), unique.get(area, 0), stored.get(area, 0))
                 for area in set(referenced) | set(unique)}
        all_unique = self.db.one("SELECT COALESCE(SUM(plain_size), 0) FROM objects")[0]
        return {"areas": areas, "total": _saved(sum(referenced.values()), all_unique, self.stored_bytes())}

    @property
    def last_check_ns(self) -> Optional[int]:
        """When the whole-store check last ran (None: never)."""
        return self.db.get_meta("last_check_ns")

    def record_check(self, when_ns: int) -> None:
        self.db.set_meta("last_check_ns", when_ns)

    def folder_usage(self) -> dict[str, dict[str, int]]:
        """Per schema folder: the files below it (down to the next schema folder; a hard link
        counts per name), their logical bytes and stored bytes (shared objects per file), the
        oldest file's last change and the next file deadline (ns). One
        walk of the tree below the schema folders: its cost grows with the tree."""
        usage = {path: {"files": 0, "logical_bytes": 0, "stored_bytes": 0, "oldest_ns": None, "next_deadline_ns": None}
                 for path in self.schema_paths()}
        rows = self.db.execute(
            "WITH RECURSIVE below(id, folder) AS ("
            " SELECT e.inode, e.parent FROM entries e JOIN inodes p ON p.id = e.parent"
            "  WHERE p.kind != ? AND p.id != ?"
            " UNION ALL"
            " SELECT e.inode, below.folder FROM below JOIN inodes d ON d.id = below.id AND d.kind = ?"
            "  JOIN entries e ON e.parent = below.id) "
            "SELECT below.folder, COUNT(*), CAST(TOTAL(i.size) AS INTEGER), SUM(i.stored_bytes), min(i.ctime_ns), min(i.expires_ns) "
            "FROM below JOIN inodes i ON i.id = below.id WHERE i.kind = ? AND (i.mode & ?) != ? GROUP BY below.folder",
            (Kind.FREE, ROOT_INODE, Kind.FREE, Kind.FREE, _S_IFMT, stat.S_IFDIR))
        for folder, files, logical, stored, oldest, deadline in rows.fetchall():
            usage[self.path_of(folder).lstrip("/")] = {"files": files, "logical_bytes": logical, "stored_bytes": stored,
                                                       "oldest_ns": oldest, "next_deadline_ns": deadline}
        return usage

    def area_times(self) -> dict[str, tuple[Optional[int], Optional[int]]]:
        """Per area: the oldest entry's last change and the next deadline (ns)."""
        return {area: (oldest, deadline) for area, oldest, deadline in self.db.execute(
            "SELECT area, min(ctime_ns), min(expires_ns) FROM inodes WHERE kind=? AND nlink>0 AND area IS NOT NULL "
            "GROUP BY area", (Kind.FREE,))}

    def inode_count(self) -> int:
        return self.db.one("SELECT COUNT(*) FROM inodes")[0]

    def stored_bytes(self) -> int:
        """The store's content on disk, each object once."""
        return self._total("stored_bytes")

    def area_stored(self, area: str) -> int:
        """An area's stored bytes, each object it references once."""
        usage = self.db.kept(AREA_USAGE)  # asked at every write: each area's, in one row
        if usage is MISSING:
            usage = dict(self.db.execute("SELECT area, stored_bytes FROM area_usage").fetchall())
            self.db.keep(AREA_USAGE, usage)
        return usage.get(area, 0)

    def sole_objects(self, area: str, ino: int, first: int, last: int) -> dict[int, int]:
        """Block number -> stored bytes, for the blocks first..last of a file whose objects
        (base and patches) nothing else in `area` uses: what rewriting those blocks whole
        frees there."""
        return dict(self.db.execute(
            "SELECT b.blockno, SUM(o.stored_size) FROM blocks b "
            "JOIN area_objects a ON a.area = ? AND a.object = b.object AND a.refs = 1 "
            "JOIN objects o ON o.id = b.object WHERE b.inode = ? AND b.blockno BETWEEN ? AND ? GROUP BY b.blockno",
            (area, ino, first, last)))

    def subtree_stored(self, ino: int) -> int:
        """Stored bytes of an entry and everything below it (shared objects counted per file),
        plus what its files hold in memory not yet stored."""
        rows = self.db.execute(
            "WITH RECURSIVE sub(id) AS (SELECT ? UNION SELECT e.inode FROM entries e JOIN sub ON e.parent = sub.id) "
            "SELECT i.id, i.stored_bytes FROM inodes i JOIN sub ON sub.id = i.id", (ino,)).fetchall()
        return sum(stored + self.blocks.dirty_bytes_of(i) for i, stored in rows)

    def _total(self, name: str) -> int:
        return self.db.one("SELECT value FROM totals WHERE name=?", (name,))[0]

    def ensure_folder(self, path: str, kind: int, mode: int, uid: int, gid: int, policy: Optional[str] = None) -> int:
        """Makes sure a schema folder exists with `kind` and `policy` (which its new entries
        inherit) and returns its inode. Schema folders never expire."""
        parent = ROOT_INODE
        parts = path.split("/")
        for i, part in enumerate(parts):
            name = part.encode()
            ino = self.lookup(parent, name)
            if ino is None:
                ino = self.make(parent, name, stat.S_IFDIR | mode, uid, gid).id
            elif not self.inode(ino).is_dir:
                raise StoreOpenError(f"{path}: the store has a non-folder where the config declares a schema folder")
            parent = ino
        self.db.execute("UPDATE inodes SET kind=?, policy=?, life_ns=NULL, ttl_deadline_ns=NULL WHERE id=?",
                        (kind, policy, parent))
        return parent

    def schema_paths(self) -> list[str]:
        """The schema folders, as paths below the root."""
        return sorted(self.path_of(ino).lstrip("/") for (ino,) in
                      self.db.execute("SELECT id FROM inodes WHERE kind != ? AND id != ?", (Kind.FREE, ROOT_INODE)))

    def unmark_schema(self, keep: Iterable[int]) -> list[str]:
        """Turns schema folders that the config no longer declares into ordinary folders."""
        keep = set(keep) | {ROOT_INODE}
        gone = [ino for (ino,) in self.db.execute("SELECT id FROM inodes WHERE kind != ?", (Kind.FREE,))
                if ino not in keep]
        paths = [self.path_of(ino) for ino in gone]
        for ino in gone:
            self.db.execute("UPDATE inodes SET kind=? WHERE id=?", (Kind.FREE, ino))
        return paths


def _xattrs_key(ino: int) -> tuple:
    return ("xattrs", ino)


_COLUMN_INDEX = {name: i for i, name in enumerate(_INODE_COLUMNS.split(", "))}


def _with_held(row: tuple, held: dict[str, int]) -> tuple:
    """An inode row with the columns changed since it was read; its deadline follows its ctime
    as the database's expires_ns does."""
    out = list(row)
    for name, value in held.items():
        out[_COLUMN_INDEX[name]] = value
    if "ctime_ns" in held:
        out[_COLUMN_INDEX["expires_ns"]] = _deadline(held["ctime_ns"], row[_COLUMN_INDEX["life_ns"]],
                                                     row[_COLUMN_INDEX["ttl_deadline_ns"]])
    return tuple(out)


def _deadline(ctime_ns: int, life_ns: Optional[int], ttl_deadline_ns: Optional[int]) -> Optional[int]:
    """An entry's deadline as the database computes its expires_ns (db.py _EXPIRES)."""
    if life_ns is None:
        return ttl_deadline_ns
    return min(ctime_ns + life_ns, ctime_ns + life_ns if ttl_deadline_ns is None else ttl_deadline_ns)


def _saved(referenced: int, unique: int, stored: int) -> dict[str, int]:
    return {"dedup_saved_bytes": referenced - unique, "compression_saved_bytes": unique - stored}


def _create_durably(path: Path) -> None:
    """Creates an empty file and makes its name survive a power cut."""
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
    fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _lock(path: Path) -> int:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise StoreLockedError(f"{path.parent}: the store is in use by another tempfs daemon "
                               "(unmount it first: tempfs umount MOUNTPOINT)") from None
    return fd
