"""The metadata database: one SQLite file in WAL mode holding inodes, names, block maps, objects
and xattrs.

Guarantees: changes are grouped into transactions that the caller commits (in batches, and at
once on fsync); a commit is atomic, so a crash leaves the tree as of a commit; a commit asked to
be durable survives a power cut too (the WAL is fsynced); freed pages are overwritten
(secure_delete), so destroyed object keys do not linger in the file. Changes a caller holds
back in memory (hold_back) are written before any statement that names their table; the
caller writes them before it commits.
"""
from __future__ import annotations

import logging
import os
import sqlite3
from pathlib import Path
from typing import Any, Callable, Hashable, Iterable, Optional

log = logging.getLogger(__name__)

SCHEMA_VERSION = 7
KEPT_ROWS = 1 << 16  # rows keep() holds across the changes that do not name them
MISSING = object()   # kept() of a key nothing is kept under

# An entry's deadline: its last change inside tempfs (ctime, which programs cannot set back)
# plus its policy's max_age, or earlier if a program shortened it (user.tempfs.ttl).
_EXPIRES = ("CASE WHEN life_ns IS NULL THEN ttl_deadline_ns "
            "ELSE min(ctime_ns + life_ns, coalesce(ttl_deadline_ns, ctime_ns + life_ns)) END")

# A block is its base (layer 0) and the patches written over it since (store/patch.py).
_BLOCKS = """
CREATE TABLE blocks (
    inode INTEGER NOT NULL, blockno INTEGER NOT NULL, layer INTEGER NOT NULL DEFAULT 0, object INTEGER NOT NULL,
    tag BLOB,                             -- codec.block_tag: the entry is authentic
    PRIMARY KEY (inode, blockno, layer)
) WITHOUT ROWID;
CREATE INDEX blocks_object ON blocks(object);
"""

_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value BLOB);
CREATE TABLE inodes (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    mode INTEGER NOT NULL, uid INTEGER NOT NULL, gid INTEGER NOT NULL,
    size INTEGER NOT NULL DEFAULT 0, nlink INTEGER NOT NULL DEFAULT 1, rdev INTEGER NOT NULL DEFAULT 0,
    atime_ns INTEGER NOT NULL, mtime_ns INTEGER NOT NULL, ctime_ns INTEGER NOT NULL,
    kind INTEGER NOT NULL DEFAULT 0,      -- layout.Kind
    area TEXT,                            -- top-level schema folder, NULL for the root
    target BLOB,                          -- symlink target (sealed: names.MetadataCipher)
    policy TEXT,                          -- the schema folder whose policy applies
    life_ns INTEGER,                      -- its max_age; NULL: no expiry by age
    ttl_deadline_ns INTEGER,              -- a deadline a program set (user.tempfs.ttl)
    expires_ns INTEGER GENERATED ALWAYS AS ({expires}) VIRTUAL,
    used_ns INTEGER,                      -- last open or close: least recently used goes first
    stored_bytes INTEGER NOT NULL DEFAULT 0  -- sum of its blocks' stored sizes (kept by triggers)
);
CREATE INDEX inodes_area ON inodes(area);
CREATE INDEX inodes_expires ON inodes(expires_ns) WHERE expires_ns IS NOT NULL;
CREATE INDEX inodes_lru ON inodes(area, used_ns);
CREATE TABLE entries (
    id INTEGER PRIMARY KEY AUTOINCREMENT, -- stable readdir offset
    parent INTEGER NOT NULL, name BLOB NOT NULL, inode INTEGER NOT NULL,  -- name: encrypted
    UNIQUE (parent, name)
);
CREATE INDEX entries_inode ON entries(inode);
CREATE TABLE objects (
    id INTEGER PRIMARY KEY, digest BLOB NOT NULL UNIQUE, refcount INTEGER NOT NULL,
    plain_size INTEGER NOT NULL, stored_size INTEGER NOT NULL, wrapped_key BLOB NOT NULL,
    data BLOB,                            -- the sealed object if small (inline), else NULL
    pack INTEGER, offset INTEGER          -- where it is appended (packs.py); NULL: inline, or its own file (before 6)
);
CREATE INDEX objects_pack ON objects(pack) WHERE pack IS NOT NULL;
{blocks}CREATE TABLE xattrs (
    inode INTEGER NOT NULL, name BLOB NOT NULL, value BLOB NOT NULL,
    PRIMARY KEY (inode, name)
) WITHOUT ROWID;
""".format(expires=_EXPIRES, blocks=_BLOCKS)

# What a block map change does to the counters below (and what moving a file to another area does).
_BLOCK_TRIGGERS = """
CREATE TRIGGER block_added AFTER INSERT ON blocks BEGIN
    UPDATE inodes SET stored_bytes = stored_bytes + coalesce((SELECT stored_size FROM objects WHERE id = NEW.object), 0)
        WHERE id = NEW.inode;
    INSERT INTO area_objects(area, object, refs)
        SELECT area, NEW.object, 1 FROM inodes WHERE id = NEW.inode AND area IS NOT NULL
        ON CONFLICT (area, object) DO UPDATE SET refs = refs + 1;
END;
CREATE TRIGGER block_removed AFTER DELETE ON blocks BEGIN
    UPDATE inodes SET stored_bytes = stored_bytes - coalesce((SELECT stored_size FROM objects WHERE id = OLD.object), 0)
        WHERE id = OLD.inode;
    UPDATE area_objects SET refs = refs - 1
        WHERE object = OLD.object AND area = (SELECT area FROM inodes WHERE id = OLD.inode);
    DELETE FROM area_objects
        WHERE object = OLD.object AND area = (SELECT area FROM inodes WHERE id = OLD.inode) AND refs <= 0;
END;
CREATE TRIGGER block_remapped AFTER UPDATE OF object ON blocks BEGIN
    UPDATE inodes SET stored_bytes = stored_bytes - coalesce((SELECT stored_size FROM objects WHERE id = OLD.object), 0)
        + coalesce((SELECT stored_size FROM objects WHERE id = NEW.object), 0) WHERE id = NEW.inode;
    UPDATE area_objects SET refs = refs - 1
        WHERE object = OLD.object AND area = (SELECT area FROM inodes WHERE id = OLD.inode);
    DELETE FROM area_objects
        WHERE object = OLD.object AND area = (SELECT area FROM inodes WHERE id = OLD.inode) AND refs <= 0;
    INSERT INTO area_objects(area, object, refs)
        SELECT area, NEW.object, 1 FROM inodes WHERE id = NEW.inode AND area IS NOT NULL
        ON CONFLICT (area, object) DO UPDATE SET refs = refs + 1;
END;
CREATE TRIGGER inode_changed_area AFTER UPDATE OF area ON inodes WHEN OLD.area IS NOT NEW.area BEGIN
    INSERT INTO area_objects(area, object, refs)
        SELECT NEW.area, object, COUNT(*) FROM blocks WHERE inode = NEW.id AND NEW.area IS NOT NULL
        GROUP BY object
        ON CONFLICT (area, object) DO UPDATE SET refs = refs + excluded.refs;
    UPDATE area_objects SET refs = refs - (SELECT COUNT(*) FROM blocks
                                           WHERE inode = NEW.id AND object = area_objects.object)
        WHERE area = OLD.area AND object IN (SELECT object FROM blocks WHERE inode = NEW.id);
    DELETE FROM area_objects WHERE area = OLD.area AND refs <= 0;
END;

"""

# Stored bytes, kept exact by triggers in the same transaction as the change that moves them,
# so a limit check is one indexed read and a crash never leaves the counters behind the data.
# An area pays for each object it references once (area_objects counts its references), however
# many of its blocks share it; an object shared by two areas counts in both. `totals` holds the
# whole store's figures, each object once, as on disk.
# A block whose object row is lost (damage the check reports) counts 0, so its file can still go.
_ACCOUNTING = """
CREATE TABLE area_objects (
    area TEXT NOT NULL, object INTEGER NOT NULL, refs INTEGER NOT NULL,
    PRIMARY KEY (area, object)
) WITHOUT ROWID;
CREATE TABLE area_usage (area TEXT PRIMARY KEY, stored_bytes INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE totals (name TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
INSERT INTO totals VALUES ('stored_bytes', 0), ('objects', 0);

CREATE TRIGGER object_added AFTER INSERT ON objects BEGIN
    UPDATE totals SET value = value + NEW.stored_size WHERE name = 'stored_bytes';
    UPDATE totals SET value = value + 1 WHERE name = 'objects';
END;
CREATE TRIGGER object_removed AFTER DELETE ON objects BEGIN
    UPDATE totals SET value = value - OLD.stored_size WHERE name = 'stored_bytes';
    UPDATE totals SET value = value - 1 WHERE name = 'objects';
END;

{block_triggers}
CREATE TRIGGER area_object_added AFTER INSERT ON area_objects BEGIN
    INSERT INTO area_usage(area, stored_bytes)
        VALUES (NEW.area, coalesce((SELECT stored_size FROM objects WHERE id = NEW.object), 0))
        ON CONFLICT (area) DO UPDATE SET stored_bytes = stored_bytes + excluded.stored_bytes;
END;
CREATE TRIGGER area_object_removed AFTER DELETE ON area_objects BEGIN
    UPDATE area_usage SET stored_bytes = stored_bytes - coalesce((SELECT stored_size FROM objects WHERE id = OLD.object), 0)
        WHERE area = OLD.area;
END;
""".replace("{block_triggers}", _BLOCK_TRIGGERS)

# Recomputes every counter from the block map (a migration, or a repair by the check).
_RECOUNT = """
DELETE FROM area_objects;
DELETE FROM area_usage;
INSERT INTO area_objects(area, object, refs)
    SELECT i.area, b.object, COUNT(*) FROM blocks b JOIN inodes i ON i.id = b.inode
    WHERE i.area IS NOT NULL GROUP BY i.area, b.object;
UPDATE inodes SET stored_bytes = coalesce((SELECT SUM(o.stored_size) FROM blocks b JOIN objects o ON o.id = b.object
                                           WHERE b.inode = inodes.id), 0);
UPDATE totals SET value = (SELECT coalesce(SUM(stored_size), 0) FROM objects) WHERE name = 'stored_bytes';
UPDATE totals SET value = (SELECT COUNT(*) FROM objects) WHERE name = 'objects';
"""


class Database:
    """A SQLite connection with batched commits and hooks that run after a commit lands."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.conn = sqlite3.connect(path, isolation_level="DEFERRED")
        self.conn.execute("PRAGMA journal_mode=WAL")
        # NORMAL: a commit survives the daemon's death; commit(durable=True) adds the fsync
        # that makes it survive a power cut, and is what fsync(2) on a file asks for.
        self.conn.execute("PRAGMA synchronous=NORMAL")
        self.conn.execute("PRAGMA secure_delete=ON")
        self.conn.execute("PRAGMA foreign_keys=OFF")
        self.conn.execute("PRAGMA cache_size=-16384")  # 16 MiB page cache
        self._after_commit: list[Callable[[], None]] = []
        self._kept: dict[Hashable, Optional[tuple]] = {}
        self._kept_at: Optional[int] = None  # total_changes when the kept rows were last valid
        self._shred = False
        self._checkpoint_blocked = False
        self.forgotten = 0  # forget_reads() calls: a rollback, or an error that may have been one
        self._held_table = ""  # see hold_back()
        self._write_held: Optional[Callable[[], None]] = None
        self.holding = False

    @property
    def is_new(self) -> bool:
        row = self.conn.execute("SELECT name FROM sqlite_master WHERE name='meta'").fetchone()
        return row is None

    def create_schema(self) -> None:
        """Creates the tables in a transaction left open for the caller to fill and commit."""
        self.conn.executescript("BEGIN;" + _SCHEMA + _ACCOUNTING)
        self.set_meta("schema_version", SCHEMA_VERSION)

    def migrate(self, secure_metadata: Callable[[], None]) -> None:
        """Brings a store written by an older tempfs up to SCHEMA_VERSION; `secure_metadata`
        encrypts and authenticates what version 3 kept in plaintext (names, symlink targets,
        xattrs) or unauthenticated (block map entries, dedup digests)."""
        version = self.get_meta("schema_version")
        if version == 1:  # expiry columns
            for column in ("policy TEXT", "life_ns INTEGER", "ttl_deadline_ns INTEGER"):
                self.conn.execute(f"ALTER TABLE inodes ADD COLUMN {column}")
            self.conn.execute(f"ALTER TABLE inodes ADD COLUMN expires_ns INTEGER "
                              f"GENERATED ALWAYS AS ({_EXPIRES}) VIRTUAL")
            self.conn.execute("CREATE INDEX inodes_expires ON inodes(expires_ns) WHERE expires_ns IS NOT NULL")
            self.set_meta("schema_version", 2)
            self.commit()
            version = 2
        if version == 2:  # size accounting and LRU
            self.conn.execute("BEGIN")
            for column in ("used_ns INTEGER", "stored_bytes INTEGER NOT NULL DEFAULT 0"):
                self.conn.execute(f"ALTER TABLE inodes ADD COLUMN {column}")
            self.conn.execute("UPDATE inodes SET used_ns = ctime_ns")
            self.conn.execute("CREATE INDEX inodes_lru ON inodes(area, used_ns)")
            self._run_script(_ACCOUNTING)
            self.recount()
            self.set_meta("schema_version", 3)
            self.commit()
            version = 3
        if version == 3:  # encrypted and authenticated metadata
            self.conn.execute("BEGIN")
            self.conn.execute("ALTER TABLE blocks ADD COLUMN tag BLOB")
            secure_metadata()
            self.set_meta("schema_version", 4)
            self.commit()
            version = 4
        if version == 4:  # small objects inline
            self.conn.execute("BEGIN")
            if "data" not in {row[1] for row in self.conn.execute("PRAGMA table_info(objects)")}:
                self.conn.execute("ALTER TABLE objects ADD COLUMN data BLOB")
            self.set_meta("schema_version", 5)
            self.commit()
            version = 5
        if version == 5:  # objects appended to pack files
            self.conn.execute("BEGIN")
            columns = {row[1] for row in self.conn.execute("PRAGMA table_info(objects)")}
            for column in ("pack INTEGER", "offset INTEGER"):
                if column.split()[0] not in columns:
                    self.conn.execute(f"ALTER TABLE objects ADD COLUMN {column}")
            self.conn.execute("CREATE INDEX IF NOT EXISTS objects_pack ON objects(pack) WHERE pack IS NOT NULL")
            self.set_meta("schema_version", 6)
            self.commit()
            version = 6
        if version == 6:  # patches: a block map entry per layer
            self.conn.execute("BEGIN")
            for trigger in ("block_added", "block_removed", "block_remapped", "inode_changed_area"):
                self.conn.execute(f"DROP TRIGGER {trigger}")  # they name the table being replaced
            self.conn.execute("ALTER TABLE blocks RENAME TO blocks_6")
            self.conn.execute("DROP INDEX blocks_object")
            self._run_script(_BLOCKS)
            self.conn.execute("INSERT INTO blocks(inode, blockno, layer, object, tag) "
                              "SELECT inode, blockno, 0, object, tag FROM blocks_6")
            self.conn.execute("DROP TABLE blocks_6")
            self._run_script(_BLOCK_TRIGGERS)  # after the copy, which moves no counter
            self.set_meta("schema_version", 7)
            self.commit()
        elif version != SCHEMA_VERSION:
            raise sqlite3.DatabaseError(f"schema version {version!r} is newer than this tempfs ({SCHEMA_VERSION})")

    def recount(self) -> None:
        """Recomputes the stored-bytes counters from the block map, inside the open transaction."""
        self._run_script(_RECOUNT)

    def _run_script(self, script: str) -> None:
        # executescript() would commit first; these statements must join the caller's transaction
        statement = ""
        for line in script.splitlines(keepends=True):
            statement += line
            if sqlite3.complete_statement(statement):
                self.conn.execute(statement)
                statement = ""

    def get_meta(self, key: str) -> Any:
        row = self.conn.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return None if row is None else row[0]

    def set_meta(self, key: str, value: Any) -> None:
        self.conn.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (key, value))

    def hold_back(self, table: str, write_held: Callable[[], None]) -> None:
        """Lets the caller hold changes to rows of `table` in memory (it sets `holding` while
        it does): every statement that names the table first runs `write_held`, which writes
        them, except reads asked with `held_ok` (whose caller applies what it holds)."""
        self._held_table, self._write_held = table, write_held

    def _write_held_before(self, sql: str) -> None:
        if self._held_table in sql:
            self.write_held()

    def write_held(self) -> None:
        """Writes what the caller holds back (hold_back()) now."""
        self.holding = False  # first: writing them names the table too
        try:
            self._write_held()
        except BaseException:
            self.holding = True
            raise

    def execute(self, sql: str, args: Iterable[Any] = (), held_ok: bool = False) -> sqlite3.Cursor:
        if self.holding and not held_ok:
            self._write_held_before(sql)
        try:
            return self.conn.execute(sql, tuple(args))
        except sqlite3.Error:
            self.forget_reads()  # some errors roll back the whole transaction
            raise

    def one(self, sql: str, args: Iterable[Any] = (), held_ok: bool = False) -> Optional[tuple]:
        return self.execute(sql, args, held_ok).fetchone()

    def change(self, sql: str, args: Iterable[Any], keys: Iterable[Hashable] = (),
               held_ok: bool = False) -> int:
        """Runs a statement that may change, with its triggers, the rows kept under `keys` and
        no other kept row (execute() drops them all); returns how many rows it changed itself.
        `held_ok`: it touches nothing held back (hold_back()), which may stay held. (Callers
        use no RETURNING: SQLite runs such a statement into a temporary table first, and
        without it creates ran 1.3x as fast.)"""
        return self._change(sql, args, keys, held_ok).rowcount

    def insert(self, sql: str, args: Iterable[Any], held_ok: bool = False) -> int:
        """change() of an INSERT of one row, returning its rowid."""
        return self._change(sql, args, (), held_ok).lastrowid

    def _change(self, sql: str, args: Iterable[Any], keys: Iterable[Hashable], held_ok: bool) -> sqlite3.Cursor:
        before = self.conn.total_changes
        cursor = self.execute(sql, args, held_ok)
        self._changed(before, keys)
        return cursor

    def change_many(self, sql: str, args: Iterable[tuple], keys: Iterable[Hashable] = ()) -> None:
        """change() of one statement over each tuple of `args`."""
        if self.holding:
            self._write_held_before(sql)
        before = self.conn.total_changes
        try:
            self.conn.executemany(sql, args)
        except sqlite3.Error:
            self.forget_reads()
            raise
        self._changed(before, keys)

    def _changed(self, before: int, keys: Iterable[Hashable]) -> None:
        if before == self._kept_at:
            self._kept_at = self.conn.total_changes
            for key in keys:
                self._kept.pop(key, None)

    def kept(self, key: Hashable) -> Any:
        """The row kept under `key` (None for a row known not to exist), or MISSING.

        Kept rows outlive changes: they go only with a change() that names their key, a
        statement run by other means (execute()), or a rollback (forget_reads()): every
        INSERT, UPDATE and DELETE of this connection, its triggers' too, moves total_changes,
        but a rollback does not."""
        if self.conn.total_changes != self._kept_at:
            self._kept.clear()
            self._kept_at = self.conn.total_changes
        return self._kept.get(key, MISSING)

    def keep(self, key: Hashable, row: Optional[tuple]) -> None:
        """Keeps what the database holds now under `key` (read, or returned by a change)."""
        if self.kept(key) is MISSING and len(self._kept) >= KEPT_ROWS:
            self._kept.clear()
        self._kept[key] = row

    def keyed_one(self, key: Hashable, sql: str, args: tuple, held_ok: bool = False) -> Optional[tuple]:
        """one(sql, args), kept under `key`."""
        row = self.kept(key)
        if row is MISSING:
            row = self.one(sql, args, held_ok)
            self.keep(key, row)
        return row

    def forget_reads(self) -> None:
        self._kept_at = None
        self.forgotten += 1

    def rollback_to(self, savepoint: str) -> None:
        self.forget_reads()
        self.conn.execute(f"ROLLBACK TO {savepoint}")

    def shred_after_commit(self) -> None:
        """Secrets were deleted: after the commit, checkpoint and truncate the WAL so that the
        older page images that still hold them do not outlive it (secure_delete only zeroes
        the pages of the main file)."""
        self._shred = True

    def after_commit(self, hook: Callable[[], None]) -> None:
        """Runs `hook` once the current transaction has committed (e.g. deleting packs
        that the committed metadata no longer references)."""
        self._after_commit.append(hook)

    @property
    def dirty(self) -> bool:
        return self.conn.in_transaction or bool(self._after_commit) or self._shred

    def commit(self, durable: bool = False) -> None:
        """Commits and runs the after-commit work at once."""
        self.commit_deferred(durable)()

    def commit_deferred(self, durable: bool = False) -> Callable[[], None]:
        """Commits, and returns the after-commit work now due as one callable for the caller
        to run later, e.g. in a worker thread (it only touches files); for a `durable` commit,
        that starts with the fsync of the WAL, and the commit is durable once it returns."""
        try:
            self.conn.commit()
        except sqlite3.Error:
            self.forget_reads()
            raise
        if self._shred:
            self._shred = not self._checkpointed()
        hooks, self._after_commit = self._after_commit, []
        wal = Path(str(self.path) + "-wal") if durable else None

        def after_commit() -> None:
            if wal is not None:
                self._fsync(wal)
            _run_all(hooks)
        return after_commit

    def _checkpointed(self) -> bool:
        """Copies the WAL into the main file and truncates it. Another process reading the
        database (sqlite3, tempfs passwd) can block that: it is retried at the next commit."""
        busy, _, _ = self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        if busy and not self._checkpoint_blocked:  # said once, not at every retry
            log.warning("the metadata log could not be checkpointed (another process reads the database): "
                        "deleted keys and names stay in it until it can be; retrying every commit")
        self._checkpoint_blocked = bool(busy)
        return not busy

    @staticmethod
    def _fsync(path: Path) -> None:
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def close(self) -> None:
        self.commit()
        self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        self.conn.close()


def _run_all(hooks: list[Callable[[], None]]) -> None:
    for hook in hooks:
        try:
            hook()
        except OSError as e:
            log.warning("cleanup after commit failed: %s", e)
