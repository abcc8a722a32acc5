"""The rows the metadata database keeps in memory across changes (Database.keep): inodes,
names, block maps and areas' stored bytes answered without a query must always be what the
database holds.

A random sequence of store operations runs over a small tree; after each, every inode, name,
block map and the area's stored bytes the store answers for is compared with a fresh read of the database (which first
writes the sizes and times of written files that the store holds back). Use times, written behind
(Store.touch_used), must still order eviction and survive a reopen; written sizes and times must
be written by the commit, or before any statement that reads them; a deleted file's blocks are
freed once, not again when the kernel forgets it.
"""
from __future__ import annotations

import errno
import os
import stat
import tempfile
import time
from pathlib import Path
from typing import Callable

import pytest
import trio
from hypothesis import example, given, settings
from hypothesis import strategies as st

from conftest import executed_statements
from tempfs.codec import MASTER_KEY_BYTES, ContentCodec
from tempfs.layout import Kind
from tempfs.store import Store, StoreError
from tempfs.store.db import MISSING, Database
from tempfs.store.store import _INODE_QUERY, Inode

UID, GID = os.getuid(), os.getgid()
NAMES = [b"a", b"b", b"c"]


def opened(path: Path, key: bytes, clock: Callable[[], int]) -> tuple[Store, int]:
    """A store with the folders cache/ and cache/data/ (returned: the leaf), of policy "cache"."""
    store = Store(path, ContentCodec(key), dirty_limit=1 << 24, cache_limit=1 << 24, clock=clock)
    store.ensure_folder("cache", Kind.BRANCH, 0o755, UID, GID, policy="cache")
    return store, store.ensure_folder("cache/data", Kind.LEAF, 0o755, UID, GID, policy="cache")


def test_a_kept_row_stays_until_a_change_names_it_or_names_nothing(tmp_path):
    db = Database(tmp_path / "db")
    db.execute("CREATE TABLE t (k INTEGER PRIMARY KEY, v TEXT)")
    db.execute("INSERT INTO t VALUES (1, 'one'), (2, 'two')")
    assert db.keyed_one(1, "SELECT v FROM t WHERE k=?", (1,)) == ("one",)
    db.keep(2, ("two",))
    db.change("UPDATE t SET v='uno' WHERE k=1", (), keys=(1,))
    assert db.kept(1) is MISSING
    assert db.kept(2) == ("two",)  # a change that names other keys leaves it
    assert db.keyed_one(1, "SELECT v FROM t WHERE k=?", (1,)) == ("uno",)
    db.execute("UPDATE t SET v='deux' WHERE k=2")  # names nothing: every kept row goes
    assert db.kept(1) is MISSING and db.kept(2) is MISSING
    db.keep(1, ("uno",))
    db.execute("SAVEPOINT s")
    db.change("UPDATE t SET v='x' WHERE k=2", (), keys=(2,))
    db.rollback_to("s")  # moves no change counter: a rollback forgets what was kept
    assert db.kept(1) is MISSING
    db.keep(3, None)  # known not to exist
    assert db.kept(3) is None
    db.close()


class Tree:
    """A store with one leaf folder, driven by step tuples; knows which names it made."""

    def __init__(self, path: Path) -> None:
        self.now = 1_700_000_000_000_000_000
        self.store, self.leaf = opened(path, os.urandom(MASTER_KEY_BYTES), lambda: self.now)
        self.store.apply_policies({"cache": 3600 * 10**9})  # longer than a ttl step sets: both rule deadlines
        self.ctimes: dict[int, int] = {}
        self.folders = [self.leaf]
        self.seen: set[int] = {1, self.leaf}

    def step(self, op: str, a: int, b: int, n: int) -> None:
        self.now += 1_000_000
        store, leaf = self.store, self.folders[a // len(NAMES) % len(self.folders)]
        name, other = NAMES[a % len(NAMES)], NAMES[b % len(NAMES)]
        ino = store.lookup(leaf, name)
        try:
            if op == "file":
                self.seen.add(store.make(leaf, name, stat.S_IFREG | 0o644, UID, GID).id)
            elif op == "dir":
                node = store.make(leaf, name, stat.S_IFDIR | 0o755, UID, GID)
                self.seen.add(node.id)
                self.folders.append(node.id)
            elif op == "symlink":
                self.seen.add(store.make(leaf, name, stat.S_IFLNK | 0o777, UID, GID, target=b"../x" * n).id)
            elif op == "link" and ino is not None:
                store.link(ino, leaf, other)
            elif op == "unlink":  # as if not open (its content goes, with the reclaimer) when n is even
                store.unlink(leaf, name, want_dir=False, discard=n % 2 == 0)
            elif op == "rmdir":
                store.unlink(leaf, name, want_dir=True)
            elif op == "rename":
                store.rename(leaf, name, self.folders[b % len(self.folders)], other, exchange=n % 3 == 0)
            elif op == "write" and ino is not None:
                trio.run(store.write, ino, n * 70_000, bytes([n]) * (n * 700 + 1))  # blocks 0 to 2
            elif op == "zeros" and ino is not None:  # its blocks become holes
                trio.run(store.write, ino, 0, bytes(store.inode(ino).size))
            elif op == "truncate" and ino is not None:
                trio.run(store.truncate, ino, n * 70_000)
            elif op == "sync":
                trio.run(store.sync)
            elif op == "attrs" and ino is not None:
                store.set_attrs(ino, mode=stat.S_IFMT(store.inode(ino).mode) | 0o600 + n)
            elif op == "ttl" and ino is not None:
                store.set_ttl(ino, n or None)
            elif op == "xattr" and ino is not None:
                store.set_xattr(ino, b"user.k", b"v" * n) if n else store.remove_xattr(ino, b"user.k")
            elif op == "expire" and ino is not None:
                store.expire(ino)
            elif op == "remove" and store.unlinked:  # the kernel forgot one without a name left
                store.remove_inode(sorted(store.unlinked)[n % len(store.unlinked)])
            elif op == "reclaim":
                store.reclaim(n or None)
            elif op == "rollback":
                store.db.execute("SAVEPOINT s")
                store.set_attrs(store.lookup(leaf, name) or leaf, uid=n)
                store.db.rollback_to("s")
                store.db.execute("RELEASE s")
        except StoreError as e:
            assert e.errno in (errno.EEXIST, errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.ENOTEMPTY,
                               errno.EPERM, errno.EXDEV, errno.EINVAL), e

    def check(self) -> None:
        """What the store answers equals a fresh read, for every inode, name, block map and
        xattr absence it ever made."""
        store = self.store
        answers = {}
        for ino in self.seen:  # first: with what is held back (Store._held) applied
            try:
                answers[ino] = store.inode(ino)
            except StoreError:
                answers[ino] = None
        for ino in sorted(self.seen):
            for blockno in range(3):
                fresh_map = tuple(store.db.execute("SELECT layer, object, tag FROM blocks WHERE inode=? AND blockno=? "
                                                   "ORDER BY layer", (ino, blockno)))
                assert store.blocks._mapped(ino, blockno, verify=False) == fresh_map, (ino, blockno)
            answered = answers[ino]
            if answered is not None:  # every change moves ctime on (the clock does, at each step)
                assert answered.ctime_ns >= self.ctimes.get(ino, 0), ino
                self.ctimes[ino] = answered.ctime_ns
            fresh = store.db.one(_INODE_QUERY, (ino,))  # names the inodes table: writes what is held back
            if fresh is None:
                assert answered is None, ino
            else:
                assert answered == store._inode_of(fresh), ino
                assert isinstance(answered, Inode)
        for ino in self.seen:  # "has no xattrs", kept for new inodes, is true; none outlives its inode
            if store.db.kept(("xattrs", ino)) is False:
                assert store.db.one("SELECT COUNT(*) FROM xattrs WHERE inode=?", (ino,)) == (0,), ino
        assert store.db.one("SELECT COUNT(*) FROM xattrs WHERE inode NOT IN (SELECT id FROM inodes)") == (0,)
        answered_usage = store.area_stored("cache")
        assert answered_usage == (store.db.one("SELECT stored_bytes FROM area_usage WHERE area='cache'") or (0,))[0]
        for folder in self.folders:
            for name in NAMES:
                row = store.db.one("SELECT inode FROM entries WHERE parent=? AND name=?",
                                   (folder, store.names.name(folder, name)))
                assert store.lookup(folder, name) == (row[0] if row else None), (folder, name)
                named = store.named(folder, name)
                assert (named.id if named else None) == (row[0] if row else None)
                assert named is None or named == store._inode_of(store.db.one(_INODE_QUERY, (named.id,)))


# files and their content more often than the rest
OPS = ["file", "file", "dir", "symlink", "link", "unlink", "rmdir", "rename", "write", "write", "write",
       "zeros", "truncate", "sync", "sync", "attrs", "ttl", "xattr", "expire", "remove", "reclaim",
       "rollback"]
STEPS = st.lists(st.tuples(st.sampled_from(OPS), st.integers(0, 7), st.integers(0, 7), st.integers(0, 4)),
                 min_size=10, max_size=50)


@settings(max_examples=200, deadline=None)
@given(steps=STEPS)
@example(steps=[("file", 0, 0, 0), ("write", 0, 0, 2), ("sync", 0, 0, 0), ("truncate", 0, 0, 0)])  # maps past the end
@example(steps=[("file", 0, 0, 0), ("write", 0, 0, 2), ("sync", 0, 0, 0), ("zeros", 0, 0, 0), ("sync", 0, 0, 0)])
@example(steps=[("file", 0, 0, 0), ("write", 0, 0, 2), ("sync", 0, 0, 0), ("write", 0, 0, 2), ("sync", 0, 0, 0)])  # a patch
@example(steps=[("file", 0, 0, 0), ("xattr", 0, 0, 2), ("unlink", 0, 0, 0), ("remove", 0, 0, 0)])
@example(steps=[("file", 0, 0, 0), ("write", 0, 0, 2), ("sync", 0, 0, 0), ("unlink", 0, 0, 0), ("reclaim", 0, 0, 0),
                ("remove", 0, 0, 0), ("reclaim", 0, 0, 1)])
def test_every_answer_from_kept_rows_is_what_the_database_holds(steps):
    with tempfile.TemporaryDirectory() as where:
        tree = Tree(Path(where) / "store")
        try:
            for step in steps:
                tree.step(*step)
                tree.check()
        finally:
            tree.store.close()


def test_use_times_are_written_together_and_order_eviction_before_and_after_a_reopen(tmp_path):
    key = os.urandom(MASTER_KEY_BYTES)
    now = [1_700_000_000_000_000_000]
    store, leaf = opened(tmp_path / "store", key, lambda: now[0])
    files = [store.make(leaf, name, stat.S_IFREG | 0o644, UID, GID).id for name in NAMES]
    for ino in files:
        trio.run(store.write, ino, 0, b"x" * 100)
    trio.run(store.sync)
    statements: list[str] = []
    store.db.conn.set_trace_callback(statements.append)
    for ino in reversed(files):  # used last first
        now[0] += 1_000_000
        store.touch_used(ino)
    assert not any("SET used_ns" in sql for sql in statements)  # nothing written yet
    assert store.least_recently_used("cache", 10) == list(reversed(files))
    assert sum("SET used_ns" in sql for sql in statements) == len(files)  # one statement, run per file
    now[0] += 1_000_000
    store.touch_used(files[-1])
    store.close()  # writes what is pending
    store, _ = opened(tmp_path / "store", key, lambda: now[0])
    assert store.least_recently_used("cache", 10) == [files[1], files[0], files[2]]
    store.close()


def test_written_sizes_and_times_are_held_back_until_the_commit_or_a_statement_on_inodes(tmp_path):
    key = os.urandom(MASTER_KEY_BYTES)
    now = [1_700_000_000_000_000_000]
    store, leaf = opened(tmp_path / "store", key, lambda: now[0])
    files = [store.make(leaf, name, stat.S_IFREG | 0o644, UID, GID).id for name in NAMES]
    store.commit_now()
    statements: list[str] = []
    store.db.conn.set_trace_callback(statements.append)
    for i, ino in enumerate(files):
        now[0] += 1_000_000
        trio.run(store.write, ino, 0, b"x" * (100 + i))
    assert not any("SET size" in sql for sql in statements)  # nothing written yet
    for i, ino in enumerate(files):  # but answered
        node = store.inode(ino)
        assert (node.size, node.mtime_ns) == (100 + i, now[0] - (len(files) - 1 - i) * 1_000_000)
        assert store.named(leaf, NAMES[i]) == node
    store.due(now[0], 10)  # names the inodes table: what is held back is written first
    assert sum("SET size" in sql for sql in statements) == len(files)  # one statement, run per file
    assert statements.index(next(sql for sql in statements if "SET size" in sql)) < \
        statements.index(next(sql for sql in statements if "expires_ns <=" in sql))
    now[0] += 1_000_000
    trio.run(store.write, files[0], 200, b"y")
    store.close()  # writes what is held back
    store, _ = opened(tmp_path / "store", key, lambda: now[0])
    assert [store.inode(ino).size for ino in files] == [201, 101, 102]
    assert store.inode(files[0]).mtime_ns == store.inode(files[0]).ctime_ns == now[0]
    store.close()


def test_attributes_set_are_held_back_like_sizes_and_answered_until_written(tmp_path):
    """chown, chmod and utimes (three setattr requests a file under `tar x`) cost no statement
    each: they are written with the commit, and the deadline follows the new ctime."""
    key = os.urandom(MASTER_KEY_BYTES)
    now = [1_700_000_000_000_000_000]
    life = 3600 * 10**9
    store, leaf = opened(tmp_path / "store", key, lambda: now[0])
    store.apply_policies({"cache": life})
    ino = store.make(leaf, b"f", stat.S_IFREG | 0o600, UID, GID).id
    store.commit_now()
    statements: list[str] = []
    store.db.conn.set_trace_callback(statements.append)
    now[0] += 1_000_000
    trio.run(store.write, ino, 0, b"x" * 10)
    store.set_attrs(ino, uid=UID + 1, gid=GID + 1)
    store.set_attrs(ino, mode=stat.S_IFREG | 0o644)
    now[0] += 1_000_000
    store.set_attrs(ino, atime_ns=5, mtime_ns=6)
    assert not any(sql.startswith("UPDATE inodes") for sql in statements)
    expected = (stat.S_IFREG | 0o644, UID + 1, GID + 1, 10, 5, 6, now[0], now[0] + life)
    node = store.inode(ino)
    assert (node.mode, node.uid, node.gid, node.size, node.atime_ns, node.mtime_ns, node.ctime_ns,
            node.expires_ns) == expected
    assert store.named(leaf, b"f") == node
    store.commit_now()
    assert sum(sql.startswith("UPDATE inodes") for sql in statements) == 1  # all of them in one
    store.close()
    store, _ = opened(tmp_path / "store", key, lambda: now[0])
    node = store.inode(ino)
    assert (node.mode, node.uid, node.gid, node.size, node.atime_ns, node.mtime_ns, node.ctime_ns,
            node.expires_ns) == expected
    store.close()


def test_a_folder_s_link_count_and_times_are_held_back_as_names_come_and_go(tmp_path):
    """Creating, removing and renaming names in a folder (a file at a time under `tar x` or
    `rm -r`) writes the folder's row once a commit, not once a name; it is answered meanwhile,
    and a removed name's link count too."""
    key = os.urandom(MASTER_KEY_BYTES)
    now = [1_700_000_000_000_000_000]
    store, leaf = opened(tmp_path / "store", key, lambda: now[0])
    before = store.inode(leaf).nlink
    store.commit_now()
    statements: list[str] = []
    store.db.conn.set_trace_callback(statements.append)
    files = [store.make(leaf, name, stat.S_IFREG | 0o644, UID, GID).id for name in NAMES]
    store.make(leaf, b"sub", stat.S_IFDIR | 0o755, UID, GID)
    now[0] += 1_000_000
    store.rename(leaf, b"a", leaf, b"z")
    removed = store.unlink(leaf, b"b", want_dir=False)
    assert not any(sql.startswith("UPDATE inodes") for sql in statements)
    folder = store.inode(leaf)
    assert (folder.nlink, folder.mtime_ns, folder.ctime_ns) == (before + 1, now[0], now[0])
    assert removed.nlink == 0 and store.inode(files[1]).nlink == 0
    assert store.inode(files[0]).ctime_ns == now[0]  # a rename changes the file's ctime
    store.commit_now()
    store.close()
    store, _ = opened(tmp_path / "store", key, lambda: now[0])
    folder = store.inode(leaf)
    assert (folder.nlink, folder.mtime_ns, folder.ctime_ns) == (before + 1, now[0], now[0])
    assert store.inode(files[0]).ctime_ns == now[0]
    with pytest.raises(StoreError):
        store.inode(files[1])  # unnamed: gone at the reopen
    store.close()


def test_a_deleted_file_the_kernel_still_knows_frees_its_blocks_once_in_few_statements(tmp_path):
    store, leaf = opened(tmp_path / "store", os.urandom(MASTER_KEY_BYTES), time.time_ns)
    ino = store.make(leaf, b"f", stat.S_IFREG | 0o644, UID, GID).id
    trio.run(store.write, ino, 0, os.urandom(300_000))
    trio.run(store.sync)
    statements = executed_statements(store.db)
    node = store.unlink(leaf, b"f", want_dir=False, discard=True)  # not open: what fs does
    assert node.nlink == 0 and ino in store.reclaiming
    store.discard_content(node)  # fs asks again once the name is gone: nothing more to do
    assert store.reclaim() == 1  # the reclaimer frees the content
    assert store.inode(ino).size == 0
    store.remove_inode(ino)  # the kernel forgot it
    assert store.reclaim() == 1
    assert sum(sql.startswith("DELETE FROM blocks") for sql in statements) == 1
    # the size; the link count (and the folder's) is held back, written before it in one
    # statement per set of columns; each last reference dropped in one
    assert sum(sql.startswith("UPDATE inodes") and "WHERE id=?" in sql for sql in statements) == 1
    assert sum(sql.startswith("DELETE FROM objects") for sql in statements) == 3
    assert not any(sql.startswith("UPDATE objects") for sql in statements)
    assert store.db.one("SELECT COUNT(*) FROM blocks WHERE inode=?", (ino,)) == (0,)
    assert store.db.one("SELECT COUNT(*) FROM objects") == (0,)
    store.close()


def test_a_file_just_written_and_stored_is_looked_up_without_a_query(tmp_path):
    """The flush that stores a file's blocks moves its inode row's stored bytes (a trigger) and
    reads the row again, and the commit keeps it as it writes its size: a stat after that is
    answered from memory, and right."""
    store, leaf = opened(tmp_path / "store", os.urandom(MASTER_KEY_BYTES), time.time_ns)
    ino = store.make(leaf, b"f", stat.S_IFREG | 0o644, UID, GID).id
    trio.run(store.write, ino, 0, os.urandom(5000))
    store.named(leaf, b"f")  # the entry kept, as a create leaves it
    trio.run(store.sync)
    statements = executed_statements(store.db)
    node = store.named(leaf, b"f")
    assert statements == []
    assert node.size == 5000 and node.stored_bytes > 5000
    assert node == store._inode_of(store.db.one(_INODE_QUERY, (ino,)))
    store.close()
