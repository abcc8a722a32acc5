"""Unit tests of tempfs.store without a FUSE mount: real SQLite, real object files, real codec.

Async store methods are driven with trio.run; time comes from a fake clock the test controls.
"""
from __future__ import annotations

import errno
import functools
import os
import random
import sqlite3
import stat
import threading
import time
from pathlib import Path

import pytest
import trio
import trio.testing

from conftest import executed_statements, run_script
from tempfs.codec import MASTER_KEY_BYTES, ContentCodec, IntegrityError
from tempfs.layout import Kind
from tempfs.store import (ROOT_INODE, BlockReadError, DamagedMetadata, Store, StoreError, StoreLockedError,
                          StoreOpenError, WrongKeyError)
from tempfs.store.check import check_store
from tempfs.store.db import _BLOCK_TRIGGERS, SCHEMA_VERSION, Database
from tempfs.store.blocks import DIRTY_OVERHEAD, MAX_PATCHES, PRESSURE_LEFT
from tempfs.store.patch import apply
from tempfs.store.store import BLOCK_SIZE, MAX_FILE_SIZE, SYNC_ROUNDS

KiB = 1024
MiB = 1024 * 1024
BIG = 64 * MiB
UID, GID = os.getuid(), os.getgid()
FILE = stat.S_IFREG | 0o644
DIR = stat.S_IFDIR | 0o755
LINK = stat.S_IFLNK | 0o777
MARKER = b"STORE-PLAINTEXT-MARKER-51c2e8"

assert BLOCK_SIZE == 128 * KiB


class FakeClock:
    def __init__(self, start: int = 1_700_000_000_000_000_000) -> None:
        self.now = start

    def __call__(self) -> int:
        return self.now

    def tick(self, ns: int = 1_000_000) -> int:
        self.now += ns
        return self.now


def trio_test(fn):
    """Runs an async test function under trio.run with a deadline."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        async def main():
            with trio.fail_after(20):
                await fn(*args, **kwargs)
        trio.run(main)
    return wrapper


def run(async_fn, *args):
    async def main():
        with trio.fail_after(20):
            return await async_fn(*args)
    return trio.run(main)


class Opener:
    """Opens stores on paths below tmp_path and closes whatever is still open at teardown."""

    def __init__(self, tmp_path, clock):
        self.tmp_path = tmp_path
        self.clock = clock
        self.key = os.urandom(MASTER_KEY_BYTES)
        self.path = tmp_path / "store"
        self.open_stores: list[Store] = []

    def __call__(self, path=None, key=None, *, dirty_limit=BIG, cache_limit=BIG, clock=None, **options) -> Store:
        store = Store(path or self.path, ContentCodec(key or self.key), dirty_limit=dirty_limit,
                      cache_limit=cache_limit, clock=clock or self.clock, **options)
        self.open_stores.append(store)
        return store

    def close(self, store: Store) -> None:
        store.close()
        self.open_stores.remove(store)

    def teardown(self):
        for store in self.open_stores:
            try:
                store.close()
            except Exception:
                pass


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def opener(tmp_path, clock):
    o = Opener(tmp_path, clock)
    yield o
    o.teardown()


@pytest.fixture
def store(opener) -> Store:
    return opener()


def leaf(store: Store, path: str = "processing/face_recognition/frames") -> int:
    """Makes the schema folders down to a leaf (kinds as the layout gives them)."""
    parts = path.split("/")
    for i in range(1, len(parts)):
        store.ensure_folder("/".join(parts[:i]), Kind.BRANCH, 0o755, UID, GID)
    return store.ensure_folder(path, Kind.LEAF, 0o755, UID, GID)


def new_file(store: Store, parent: int, name: bytes) -> int:
    return store.make(parent, name, FILE, UID, GID).id


def objects_rows(store: Store) -> int:
    return store.db.one("SELECT COUNT(*) FROM objects")[0]


def object_ids(store: Store) -> set[int]:
    return {r[0] for r in store.db.execute("SELECT id FROM objects")}


def object_files(store: Store) -> set[int]:
    """Objects in files of their own (stores before schema 6)."""
    return store.objects.all_ids()


def pack_files(store: Store) -> set[int]:
    return set(store.packs.sizes()[0])


def packs_used(store: Store) -> set[int]:
    return {r[0] for r in store.db.execute("SELECT DISTINCT pack FROM objects WHERE pack IS NOT NULL")}


def stored_at(store: Store, object_id: int) -> tuple[Path, int, int]:
    """Where an object's sealed bytes are: its pack, offset and size."""
    pack, offset, size = store.db.one("SELECT pack, offset, stored_size FROM objects WHERE id=?", (object_id,))
    return store.packs.path(pack), offset, size


def sealed_of(store: Store, object_id: int) -> bytes:
    path, offset, size = stored_at(store, object_id)
    return path.read_bytes()[offset:offset + size]


def put_sealed(store: Store, object_id: int, sealed: bytes) -> None:
    """Overwrites an object's bytes in its pack (as an attacker with the disk could)."""
    path, offset, size = stored_at(store, object_id)
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(sealed)


def to_object_files(store: Store) -> None:
    """Moves every packed object to a file of its own, as stores before schema 6 kept them."""
    for object_id in [r[0] for r in store.db.execute("SELECT id FROM objects WHERE pack IS NOT NULL")]:
        path = store.objects.path(object_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(sealed_of(store, object_id))
        store.db.execute("UPDATE objects SET pack=NULL, offset=NULL WHERE id=?", (object_id,))
    store.commit_now()
    for pack in pack_files(store):
        store.packs.path(pack).unlink()


def errno_of(excinfo) -> int:
    return excinfo.value.errno


def compressible(n: int, seed: int = 0) -> bytes:
    line = MARKER + b" seed %d row %%08d frame features 0.125 0.250 0.500\n" % seed
    out = bytearray()
    i = 0
    while len(out) < n:
        out += line % i
        i += 1
    return bytes(out[:n])


# ---- the tree ---------------------------------------------------------------------------

def test_new_store_has_root(store, clock):
    root = store.inode(ROOT_INODE)
    assert root.is_dir and root.nlink == 2 and root.kind == Kind.ROOT
    assert root.atime_ns == root.mtime_ns == root.ctime_ns == clock.now
    assert store.children(ROOT_INODE) == []
    assert stat.S_IMODE(os.stat(store.path).st_mode) == 0o700


def test_make_lookup_children(store, clock):
    t0 = clock.now
    clock.tick()
    d = store.make(ROOT_INODE, b"area", DIR, UID, GID)
    assert d.is_dir and d.nlink == 2 and d.area == "area" and d.kind == Kind.FREE
    assert d.atime_ns == d.mtime_ns == d.ctime_ns == clock.now
    root = store.inode(ROOT_INODE)
    assert root.nlink == 3 and root.mtime_ns == root.ctime_ns == clock.now and root.atime_ns == t0

    clock.tick()
    f = store.make(d.id, b"a.bin", FILE, 1234, 5678)
    assert not f.is_dir and f.nlink == 1 and f.size == 0 and f.area == "area"
    assert (f.uid, f.gid, f.mode) == (1234, 5678, FILE)
    assert f.ctime_ns == clock.now
    assert store.inode(d.id).nlink == 2  # a file does not add a link to its folder
    assert store.inode(d.id).mtime_ns == clock.now

    s = store.make(d.id, b"ln", LINK, UID, GID, target=b"a.bin")
    assert s.target == b"a.bin" and s.size == 5
    sub = store.make(d.id, b"sub", DIR, UID, GID)
    assert store.inode(d.id).nlink == 3

    assert store.lookup(d.id, b"a.bin") == f.id
    assert store.lookup(d.id, b"nope") is None
    assert store.lookup(ROOT_INODE, b"a.bin") is None
    names = [(name, ino) for _, name, ino in store.children(d.id)]
    assert names == [(b"a.bin", f.id), (b"ln", s.id), (b"sub", sub.id)]
    # readdir offsets: entry ids continue where the last page stopped
    first = store.children(d.id, limit=2)
    assert [n for _, n, _ in first] == [b"a.bin", b"ln"]
    rest = store.children(d.id, after=first[-1][0])
    assert [n for _, n, _ in rest] == [b"sub"]
    assert store.path_of(sub.id) == "/area/sub"


def test_a_made_inode_is_what_the_database_holds(store, clock):
    """make() builds the new row itself instead of reading it back: it must match, deadline too."""
    hour = 3_600 * 10**9
    store.apply_policies({"cache/data": hour, "cache/keep": None})
    deadlines = []
    for policy in ("cache/data", "cache/keep"):
        folder = store.ensure_folder(policy, Kind.LEAF, 0o755, UID, GID, policy=policy)
        made_at = clock.tick()
        made = [store.make(folder, b"f", FILE, 1234, 5678), store.make(folder, b"d", DIR, UID, GID),
                store.make(folder, b"n", stat.S_IFIFO | 0o600, UID, GID, rdev=7)]
        store.db.forget_reads()
        for node in made:
            assert store.inode(node.id) == node
        deadlines.append(made[0].expires_ns - made_at if made[0].expires_ns is not None else None)
    assert deadlines == [hour, None]


def test_make_refusals(store):
    d = store.make(ROOT_INODE, b"area", DIR, UID, GID)
    f = new_file(store, d.id, b"f")
    with pytest.raises(StoreError) as e:
        store.make(d.id, b"f", FILE, UID, GID)
    assert errno_of(e) == errno.EEXIST
    with pytest.raises(StoreError) as e:
        store.make(d.id, b"f", DIR, UID, GID)
    assert errno_of(e) == errno.EEXIST
    with pytest.raises(StoreError) as e:
        store.make(f, b"x", FILE, UID, GID)
    assert errno_of(e) == errno.ENOTDIR
    with pytest.raises(StoreError) as e:
        store.make(999999, b"x", FILE, UID, GID)
    assert errno_of(e) == errno.ENOENT
    with pytest.raises(StoreError) as e:
        store.inode(999999)
    assert errno_of(e) == errno.ENOENT


def test_names_are_bytes_not_text(store):
    d = store.make(ROOT_INODE, b"area", DIR, UID, GID)
    odd = b"caf\xe9 \xff\xfe.jpg"
    ino = new_file(store, d.id, odd)
    assert store.lookup(d.id, odd) == ino
    assert store.lookup(d.id, b"CAF\xe9 \xff\xfe.jpg") is None
    assert [n for _, n, _ in store.children(d.id)] == [odd]


def test_link_and_unlink_counts(store, clock):
    d = store.make(ROOT_INODE, b"area", DIR, UID, GID)
    sub = store.make(d.id, b"sub", DIR, UID, GID)
    f = new_file(store, d.id, b"f")
    clock.tick()
    node = store.link(f, sub.id, b"g")
    assert node.nlink == 2 and node.ctime_ns == clock.now
    assert store.lookup(sub.id, b"g") == f
    assert store.inode(sub.id).nlink == 2
    assert store.inode(sub.id).mtime_ns == clock.now

    with pytest.raises(StoreError) as e:
        store.link(f, sub.id, b"g")
    assert errno_of(e) == errno.EEXIST
    with pytest.raises(StoreError) as e:
        store.link(sub.id, d.id, b"dirlink")
    assert errno_of(e) == errno.EPERM
    other = store.make(ROOT_INODE, b"other", DIR, UID, GID)
    with pytest.raises(StoreError) as e:
        store.link(f, other.id, b"x")
    assert errno_of(e) == errno.EXDEV
    with pytest.raises(StoreError) as e:
        store.link(f, f, b"x")
    assert errno_of(e) == errno.ENOTDIR

    clock.tick()
    node = store.unlink(d.id, b"f", want_dir=False)
    assert node.id == f and node.nlink == 1 and node.ctime_ns == clock.now
    assert store.lookup(d.id, b"f") is None
    node = store.unlink(sub.id, b"g", want_dir=False)
    assert node.nlink == 0
    # the inode row stays until the layer above says nobody holds it any more, and then until
    # the reclaimer frees it
    assert store.inode(f).nlink == 0
    store.remove_inode(f)
    assert store.inode(f).nlink == 0 and f in store.reclaiming
    assert store.reclaim() == 1
    with pytest.raises(StoreError):
        store.inode(f)


def test_unlink_refusals(store):
    d = store.make(ROOT_INODE, b"area", DIR, UID, GID)
    sub = store.make(d.id, b"sub", DIR, UID, GID)
    new_file(store, d.id, b"f")
    new_file(store, sub.id, b"inner")
    for name, want_dir, code in [(b"missing", False, errno.ENOENT), (b"missing", True, errno.ENOENT),
                                 (b"f", True, errno.ENOTDIR), (b"sub", False, errno.EISDIR),
                                 (b"sub", True, errno.ENOTEMPTY)]:
        with pytest.raises(StoreError) as e:
            store.unlink(d.id, name, want_dir=want_dir)
        assert errno_of(e) == code, name
    assert store.inode(d.id).nlink == 3
    store.unlink(sub.id, b"inner", want_dir=False)
    node = store.unlink(d.id, b"sub", want_dir=True)
    assert node.nlink == 0
    assert store.inode(d.id).nlink == 2
    assert store.lookup(d.id, b"sub") is None


def test_rename_within_and_across_folders(store, clock):
    d = store.make(ROOT_INODE, b"area", DIR, UID, GID)
    a = store.make(d.id, b"a", DIR, UID, GID)
    b = store.make(d.id, b"b", DIR, UID, GID)
    f = new_file(store, a.id, b"f")
    moved_dir = store.make(a.id, b"sub", DIR, UID, GID)
    assert store.inode(a.id).nlink == 3 and store.inode(b.id).nlink == 2

    clock.tick()
    assert store.rename(a.id, b"f", a.id, b"g") is None
    assert store.lookup(a.id, b"f") is None and store.lookup(a.id, b"g") == f
    assert store.inode(f).ctime_ns == clock.now and store.inode(f).nlink == 1
    assert store.inode(a.id).mtime_ns == clock.now

    clock.tick()
    assert store.rename(a.id, b"g", b.id, b"g") is None
    assert store.lookup(b.id, b"g") == f
    assert store.inode(a.id).mtime_ns == store.inode(b.id).mtime_ns == clock.now

    # a folder moving between parents moves its ".." link
    store.rename(a.id, b"sub", b.id, b"sub2")
    assert store.inode(a.id).nlink == 2 and store.inode(b.id).nlink == 3
    assert store.inode(moved_dir.id).nlink == 2
    store.rename(b.id, b"sub2", b.id, b"sub3")
    assert store.inode(b.id).nlink == 3

    with pytest.raises(StoreError) as e:
        store.rename(a.id, b"missing", b.id, b"x")
    assert errno_of(e) == errno.ENOENT


def test_rename_replace_file(store, clock):
    d = store.make(ROOT_INODE, b"area", DIR, UID, GID)
    src = new_file(store, d.id, b"src")
    dst = new_file(store, d.id, b"dst")
    clock.tick()
    replaced = store.rename(d.id, b"src", d.id, b"dst")
    assert replaced is not None and replaced.id == dst and replaced.nlink == 0
    assert replaced.ctime_ns == clock.now
    assert store.lookup(d.id, b"dst") == src and store.lookup(d.id, b"src") is None
    assert [n for _, n, _ in store.children(d.id)] == [b"dst"]


def test_rename_replace_hard_linked_file(store):
    d = store.make(ROOT_INODE, b"area", DIR, UID, GID)
    src = new_file(store, d.id, b"src")
    dst = new_file(store, d.id, b"dst")
    store.link(dst, d.id, b"dst-link")
    replaced = store.rename(d.id, b"src", d.id, b"dst")
    assert replaced.id == dst and replaced.nlink == 1
    assert store.lookup(d.id, b"dst-link") == dst
    assert store.lookup(d.id, b"dst") == src


def test_rename_onto_own_hard_link_is_a_no_op(store):
    d = store.make(ROOT_INODE, b"area", DIR, UID, GID)
    f = new_file(store, d.id, b"a")
    store.link(f, d.id, b"b")
    assert store.rename(d.id, b"a", d.id, b"b") is None
    assert store.lookup(d.id, b"a") == f and store.lookup(d.id, b"b") == f
    assert store.inode(f).nlink == 2


def test_rename_noreplace(store):
    d = store.make(ROOT_INODE, b"area", DIR, UID, GID)
    a = new_file(store, d.id, b"a")
    b = new_file(store, d.id, b"b")
    with pytest.raises(StoreError) as e:
        store.rename(d.id, b"a", d.id, b"b", noreplace=True)
    assert errno_of(e) == errno.EEXIST
    assert store.lookup(d.id, b"a") == a and store.lookup(d.id, b"b") == b
    assert store.rename(d.id, b"a", d.id, b"c", noreplace=True) is None
    assert store.lookup(d.id, b"c") == a


def test_rename_exchange(store, clock):
    d = store.make(ROOT_INODE, b"area", DIR, UID, GID)
    p1 = store.make(d.id, b"p1", DIR, UID, GID)
    p2 = store.make(d.id, b"p2", DIR, UID, GID)
    f = new_file(store, p1.id, b"x")
    sub = store.make(p2.id, b"y", DIR, UID, GID)
    assert store.inode(p1.id).nlink == 2 and store.inode(p2.id).nlink == 3
    clock.tick()
    assert store.rename(p1.id, b"x", p2.id, b"y", exchange=True) is None
    assert store.lookup(p1.id, b"x") == sub.id
    assert store.lookup(p2.id, b"y") == f
    # the folder moved from p2 to p1
    assert store.inode(p1.id).nlink == 3 and store.inode(p2.id).nlink == 2
    assert store.inode(f).nlink == 1 and store.inode(sub.id).nlink == 2
    assert store.inode(f).ctime_ns == store.inode(sub.id).ctime_ns == clock.now
    # exchange in one folder, and exchange with nothing
    a = new_file(store, d.id, b"a")
    b = new_file(store, d.id, b"b")
    nlink = store.inode(d.id).nlink
    store.rename(d.id, b"a", d.id, b"b", exchange=True)
    assert store.lookup(d.id, b"a") == b and store.lookup(d.id, b"b") == a
    assert store.inode(d.id).nlink == nlink
    with pytest.raises(StoreError) as e:
        store.rename(d.id, b"a", d.id, b"nothing", exchange=True)
    assert errno_of(e) == errno.ENOENT
    assert store.lookup(d.id, b"a") == b


def test_rename_folder_refusals_and_replace(store):
    d = store.make(ROOT_INODE, b"area", DIR, UID, GID)
    full = store.make(d.id, b"full", DIR, UID, GID)
    new_file(store, full.id, b"inner")
    empty = store.make(d.id, b"empty", DIR, UID, GID)
    src = store.make(d.id, b"src", DIR, UID, GID)
    f = new_file(store, d.id, b"file")
    assert store.inode(d.id).nlink == 5

    cases = [(b"src", b"full", errno.ENOTEMPTY),   # folder over non-empty folder
             (b"file", b"empty", errno.EISDIR),    # file over folder
             (b"src", b"file", errno.ENOTDIR)]     # folder over file
    for old, new, code in cases:
        with pytest.raises(StoreError) as e:
            store.rename(d.id, old, d.id, new)
        assert errno_of(e) == code, (old, new)
    assert store.lookup(d.id, b"src") == src.id and store.lookup(d.id, b"file") == f
    assert store.inode(d.id).nlink == 5

    # folder over an empty folder: the empty one loses its last link, the parent one link
    replaced = store.rename(d.id, b"src", d.id, b"empty")
    assert replaced.id == empty.id and replaced.nlink == 0
    assert store.lookup(d.id, b"empty") == src.id
    assert store.inode(d.id).nlink == 4

    # folder over an empty folder in another parent
    other = store.make(d.id, b"other", DIR, UID, GID)
    target = store.make(other.id, b"t", DIR, UID, GID)
    assert store.inode(d.id).nlink == 5 and store.inode(other.id).nlink == 3
    replaced = store.rename(d.id, b"empty", other.id, b"t")
    assert replaced.id == target.id and replaced.nlink == 0
    assert store.inode(d.id).nlink == 4 and store.inode(other.id).nlink == 3


def test_rename_across_areas_moves_the_subtree(store):
    p = leaf(store, "processing/common/uploads")
    c = leaf(store, "cache/data")
    tree = store.make(p, b"tree", DIR, UID, GID)
    deep = store.make(tree.id, b"deep", DIR, UID, GID)
    f = new_file(store, deep.id, b"f")
    assert store.inode(f).area == "processing"
    store.rename(p, b"tree", c, b"tree")
    for ino in (tree.id, deep.id, f):
        assert store.inode(ino).area == "cache"


def test_set_attrs(store, clock):
    d = store.make(ROOT_INODE, b"area", DIR, UID, GID)
    f = new_file(store, d.id, b"f")
    clock.tick()
    store.set_attrs(f, mode=stat.S_IFREG | 0o600, uid=7, gid=8, mtime_ns=123, atime_ns=456)
    node = store.inode(f)
    assert (node.mode, node.uid, node.gid, node.mtime_ns, node.atime_ns) == (stat.S_IFREG | 0o600, 7, 8, 123, 456)
    assert node.ctime_ns == clock.now
    with pytest.raises(ValueError):
        store.set_attrs(f, nlink=5)
    with pytest.raises(ValueError):
        store.set_attrs(f, kind=Kind.LEAF)


def test_xattrs(store, clock):
    d = store.make(ROOT_INODE, b"area", DIR, UID, GID)
    f = new_file(store, d.id, b"f")
    assert store.get_xattr(f, b"user.ttl") is None
    assert store.xattr_names(f) == []
    clock.tick()
    store.set_xattr(f, b"user.ttl", b"60")
    assert store.inode(f).ctime_ns == clock.now
    store.set_xattr(f, b"user.bin", b"\x00\xff\x00")
    store.set_xattr(f, b"user.empty", b"")
    assert store.get_xattr(f, b"user.ttl") == b"60"
    assert store.get_xattr(f, b"user.bin") == b"\x00\xff\x00"
    assert store.get_xattr(f, b"user.empty") == b""
    assert sorted(store.xattr_names(f)) == [b"user.bin", b"user.empty", b"user.ttl"]
    store.set_xattr(f, b"user.ttl", b"30")
    assert store.get_xattr(f, b"user.ttl") == b"30"
    assert len(store.xattr_names(f)) == 3
    # xattrs are per inode
    g = new_file(store, d.id, b"g")
    assert store.xattr_names(g) == [] and store.get_xattr(g, b"user.ttl") is None
    clock.tick()
    assert store.remove_xattr(f, b"user.ttl") is True
    assert store.inode(f).ctime_ns == clock.now
    t = clock.tick()
    assert store.remove_xattr(f, b"user.ttl") is False
    assert store.inode(f).ctime_ns == t - 1_000_000  # nothing changed
    assert store.get_xattr(f, b"user.ttl") is None
    assert sorted(store.xattr_names(f)) == [b"user.bin", b"user.empty"]
    # a hard link shares them
    store.link(f, d.id, b"f2")
    assert store.get_xattr(store.lookup(d.id, b"f2"), b"user.bin") == b"\x00\xff\x00"
    # removing the inode removes its xattrs
    store.unlink(d.id, b"f", want_dir=False)
    store.unlink(d.id, b"f2", want_dir=False)
    store.destroy_inode(f)
    assert store.db.one("SELECT COUNT(*) FROM xattrs WHERE inode=?", (f,))[0] == 0


# ---- content ----------------------------------------------------------------------------

@trio_test
async def test_write_read_timestamps_and_size(opener, clock):
    store = opener()
    f = new_file(store, leaf(store), b"f")
    clock.tick()
    await store.write(f, 0, b"hello")
    node = store.inode(f)
    assert node.size == 5 and node.mtime_ns == node.ctime_ns == clock.now
    assert await store.read(f, 0, 100) == b"hello"
    assert await store.read(f, 2, 2) == b"ll"
    assert await store.read(f, 5, 10) == b""      # at EOF
    assert await store.read(f, 100, 10) == b""    # past EOF
    clock.tick()
    await store.write(f, 3, b"LO world")
    assert store.inode(f).size == 11 and store.inode(f).mtime_ns == clock.now
    assert await store.read(f, 0, 1000) == b"helLO world"
    clock.tick()
    await store.truncate(f, 4)
    assert store.inode(f).size == 4 and store.inode(f).ctime_ns == clock.now
    assert await store.read(f, 0, 1000) == b"helL"
    with pytest.raises(StoreError) as e:
        await store.write(f, MAX_FILE_SIZE, b"x")
    assert errno_of(e) == errno.EFBIG
    with pytest.raises(StoreError) as e:
        await store.truncate(f, MAX_FILE_SIZE + 1)
    assert errno_of(e) == errno.EFBIG


@pytest.mark.parametrize("seed,cache_limit", [(1, BIG), (2, 0), (3, 3 * BLOCK_SIZE)])
@trio_test
async def test_random_writes_against_model(opener, seed, cache_limit):
    rng = random.Random(seed)
    store = opener(cache_limit=cache_limit)
    f = new_file(store, leaf(store), b"model.bin")
    model = bytearray()
    boundaries = [k * BLOCK_SIZE for k in range(1, 6)]

    def payload(n: int) -> bytes:
        kind = rng.randrange(3)
        if kind == 0:
            return rng.randbytes(n)
        if kind == 1:
            return compressible(n, seed=rng.randrange(1000))
        return bytes(n)

    for step in range(60):
        op = rng.random()
        if op < 0.7:
            if rng.random() < 0.5:
                offset = max(0, rng.choice(boundaries) + rng.randrange(-300, 300))
            else:
                offset = rng.randrange(0, 6 * BLOCK_SIZE)
            n = rng.choice([1, 7, 4096, BLOCK_SIZE - 1, BLOCK_SIZE, BLOCK_SIZE + 1, rng.randrange(1, 3 * BLOCK_SIZE)])
            data = payload(n)
            await store.write(f, offset, data)
            if offset > len(model):
                model.extend(bytes(offset - len(model)))
            model[offset:offset + n] = data
        elif op < 0.85:
            size = rng.randrange(0, 7 * BLOCK_SIZE)
            await store.truncate(f, size)
            if size < len(model):
                del model[size:]
            else:
                model.extend(bytes(size - len(model)))
        else:
            await store.sync()
        assert store.inode(f).size == len(model), step
        for _ in range(3):
            off = rng.randrange(0, len(model) + 2 * BLOCK_SIZE)
            n = rng.randrange(0, 2 * BLOCK_SIZE)
            assert await store.read(f, off, n) == bytes(model[off:off + n]), (step, off, n)
    assert await store.read(f, 0, len(model) + 10) == bytes(model)
    await store.sync()
    assert not store.blocks.dirty
    assert await store.read(f, 0, len(model) + 10) == bytes(model)
    opener.close(store)
    store = opener()
    assert store.inode(f).size == len(model)
    assert await store.read(f, 0, len(model) + 10) == bytes(model)


def layers(store: Store, ino: int, blockno: int) -> list[int]:
    return [r[0] for r in store.db.execute("SELECT layer FROM blocks WHERE inode=? AND blockno=? ORDER BY layer",
                                           (ino, blockno))]


def count_loads(store: Store) -> list[int]:
    """Counts the objects the store loads from now on (one entry per load)."""
    loads: list[int] = []
    load_many = store.blocks._load_many  # noqa: SLF001

    def counting(facts):
        loads.extend(facts)
        return load_many(facts)
    store.blocks._load_many = counting  # noqa: SLF001
    return loads


async def stored_file(opener, size: int, seed: int, **options) -> tuple[Store, int, bytearray]:
    """A store that keeps nothing it reads in memory, with one file of `size` random bytes, stored."""
    store = opener(cache_limit=0, **options)
    f = new_file(store, leaf(store), b"f")
    data = bytearray(random.Random(seed).randbytes(size))
    await store.write(f, 0, bytes(data))
    await store.sync()
    return store, f, data


@trio_test
async def test_a_small_write_into_a_stored_block_is_stored_as_a_patch_without_reading_the_block(opener):
    store, f, data = await stored_file(opener, 3 * BLOCK_SIZE, seed=1)
    loads = count_loads(store)
    for offset, piece in [(BLOCK_SIZE + 100, b"first"), (BLOCK_SIZE + 103, b"second"), (2 * BLOCK_SIZE - 2, b"xyz")]:
        await store.write(f, offset, piece)
        data[offset:offset + len(piece)] = piece
    await store.sync()
    assert loads == []
    assert layers(store, f, 1) == [0, 1] and layers(store, f, 2) == [0, 1]  # the write across two blocks: two
    patches = store.db.execute("SELECT objects.data IS NULL, objects.pack FROM blocks JOIN objects "
                               "ON objects.id = blocks.object WHERE blocks.layer > 0").fetchall()
    assert len(patches) == 2 and all(not_inline and pack is not None for not_inline, pack in patches)  # in a pack
    assert await store.read(f, 0, 4 * BLOCK_SIZE) == data
    await store.write(f, BLOCK_SIZE + 50, b"again")  # a second patch over the first
    data[BLOCK_SIZE + 50:BLOCK_SIZE + 55] = b"again"
    await store.sync()
    assert layers(store, f, 1) == [0, 1, 2]
    assert _counters(store) == _recomputed(store)
    assert (await check_store(store, repair=False)).clean
    opener.close(store)
    store = opener()
    assert await store.read(f, 0, 4 * BLOCK_SIZE) == data


@trio_test
async def test_a_fsynced_patch_stays_in_its_row_and_its_commit_fsyncs_no_pack(opener, monkeypatch):
    """An append and a fsync of a few KiB (a journal): the patch is kept in the metadata, whose
    durable commit covers it, so the fsync costs one disk flush (the log's), not a pack's too. A
    patch the flusher stores goes to a pack as before."""
    store, f, data = await stored_file(opener, BLOCK_SIZE, seed=4)
    pack_syncs = []
    real_sync = store.packs.sync
    monkeypatch.setattr(store.packs, "sync", lambda: pack_syncs.append(1) or real_sync())
    await store.write(f, 100, b"journal record")
    data[100:114] = b"journal record"
    await store.fsync(f)
    patch_rows = ("SELECT objects.data IS NOT NULL, objects.pack FROM blocks JOIN objects ON objects.id = blocks.object "
                  "WHERE blocks.layer > 0 ORDER BY blocks.layer")
    assert store.db.execute(patch_rows).fetchall() == [(1, None)] and pack_syncs == []
    await store.write(f, 200, b"flushed")
    data[200:207] = b"flushed"
    await store.sync()
    assert [inline for inline, _ in store.db.execute(patch_rows)] == [1, 0]
    assert _counters(store) == _recomputed(store)
    assert (await check_store(store, repair=False)).clean
    opener.close(store)
    store = opener()
    assert await store.read(f, 0, BLOCK_SIZE) == data


@trio_test
async def test_a_block_with_its_fill_of_patches_is_stored_whole_at_the_next_change(opener):
    store, f, data = await stored_file(opener, BLOCK_SIZE, seed=2)
    for i in range(MAX_PATCHES + 1):
        await store.write(f, 1000 * i, b"%d" % i)
        data[1000 * i:1000 * i + 1] = b"%d" % i
        await store.sync()
    assert layers(store, f, 0) == [0]
    assert objects_rows(store) == 1  # the patches and the old base went with their last reference
    assert await store.read(f, 0, BLOCK_SIZE) == data


@trio_test
async def test_changes_too_large_for_a_patch_are_stored_with_the_whole_block(opener):
    store, f, data = await stored_file(opener, BLOCK_SIZE, seed=3, patch_max=4 * KiB)
    loads = count_loads(store)
    for offset in range(0, 8 * KiB, 2 * KiB):  # every other KiB: no write joins another
        await store.write(f, offset, b"w" * KiB)
        data[offset:offset + KiB] = b"w" * KiB
    assert len(loads) == 1  # once past 4 KiB
    await store.sync()
    assert layers(store, f, 0) == [0] and objects_rows(store) == 1
    assert await store.read(f, 0, BLOCK_SIZE) == data


@trio_test
async def test_a_change_too_large_for_a_patch_over_a_damaged_block_fails_and_writes_nothing(opener):
    store, f, _ = await stored_file(opener, BLOCK_SIZE, seed=7, patch_max=4 * KiB)
    base = store.db.one("SELECT object FROM blocks WHERE inode=?", (f,))[0]
    blob = bytearray(sealed_of(store, base))
    blob[-1] ^= 1
    put_sealed(store, base, bytes(blob))
    await store.write(f, 10, b"small")  # a patch: the block is not read
    with pytest.raises(BlockReadError):
        await store.write(f, 100, bytes(8 * KiB))
    await store.sync()
    assert layers(store, f, 0) == [0, 1]  # the small write's patch, nothing of the failed one
    patch_id = store.db.one("SELECT object FROM blocks WHERE inode=? AND layer=1", (f,))[0]
    stored = store.blocks._load(patch_id, store.blocks._sealing_facts(patch_id))  # noqa: SLF001
    assert apply(bytes(BLOCK_SIZE), [stored], BLOCK_SIZE) == bytes(10) + b"small" + bytes(BLOCK_SIZE - 15)


@trio_test
async def test_a_truncation_over_a_patch_and_a_block_written_whole_over_patches(opener):
    store, f, data = await stored_file(opener, 2 * BLOCK_SIZE, seed=4)
    await store.write(f, BLOCK_SIZE + 10, b"patched")
    await store.truncate(f, BLOCK_SIZE + 12)  # cuts the patch and the block under it
    await store.truncate(f, 2 * BLOCK_SIZE)
    data[BLOCK_SIZE + 10:] = b"pa" + bytes(BLOCK_SIZE - 12)
    await store.sync()
    assert layers(store, f, 1) == [0, 1]
    assert await store.read(f, 0, 3 * BLOCK_SIZE) == data
    data[BLOCK_SIZE:] = random.Random(5).randbytes(BLOCK_SIZE)
    await store.write(f, BLOCK_SIZE, bytes(data[BLOCK_SIZE:]))
    await store.sync()
    assert layers(store, f, 1) == [0]
    assert await store.read(f, 0, 3 * BLOCK_SIZE) == data
    assert _counters(store) == _recomputed(store)


@trio_test
async def test_patches_swapped_in_the_block_map_fail_authentication(opener):
    store, f, _ = await stored_file(opener, BLOCK_SIZE, seed=6)
    for piece in (b"one", b"two"):
        await store.write(f, 10, piece)
        await store.sync()
    store.db.execute("UPDATE blocks SET layer=-layer WHERE inode=? AND layer>0", (f,))
    store.db.execute("UPDATE blocks SET layer=3+layer WHERE inode=? AND layer<0", (f,))  # 1 <-> 2
    store.db.commit()
    with pytest.raises(BlockReadError):
        await store.read(f, 0, 100)
    report = await check_store(store, repair=False)
    assert any("fails authentication" in line for line in report.damaged)


@trio_test
async def test_holes_read_as_zeros(store):
    f = new_file(store, leaf(store), b"sparse")
    await store.write(f, 3 * BLOCK_SIZE + 10, b"tail")
    size = 3 * BLOCK_SIZE + 14
    assert store.inode(f).size == size
    expected = bytes(3 * BLOCK_SIZE + 10) + b"tail"
    assert await store.read(f, 0, size) == expected
    await store.sync()
    assert objects_rows(store) == 1  # only the block with data
    assert await store.read(f, 0, size + 100) == expected
    assert await store.read(f, BLOCK_SIZE - 5, 10) == bytes(10)


@pytest.mark.parametrize("flush", [False, True])
@pytest.mark.parametrize("cut", [1, BLOCK_SIZE - 1, BLOCK_SIZE, BLOCK_SIZE + 1, 2 * BLOCK_SIZE + 77])
@trio_test
async def test_truncate_down_then_up_shows_zeros(opener, flush, cut):
    store = opener(cache_limit=0)
    f = new_file(store, leaf(store), b"t")
    data = random.Random(cut).randbytes(3 * BLOCK_SIZE)
    await store.write(f, 0, data)
    if flush:
        await store.sync()
    await store.truncate(f, cut)
    if flush:
        await store.sync()
    await store.truncate(f, 3 * BLOCK_SIZE)
    expected = data[:cut] + bytes(3 * BLOCK_SIZE - cut)
    assert await store.read(f, 0, 4 * BLOCK_SIZE) == expected
    await store.sync()
    assert await store.read(f, 0, 4 * BLOCK_SIZE) == expected
    # growing by a write past EOF instead of truncate shows zeros as well
    await store.truncate(f, cut)
    await store.write(f, 3 * BLOCK_SIZE, b"!")
    assert await store.read(f, 0, 4 * BLOCK_SIZE) == expected + b"!"
    await store.sync()
    opener.close(store)
    store = opener()
    assert await store.read(f, 0, 4 * BLOCK_SIZE) == expected + b"!"


@trio_test
async def test_truncate_to_zero_frees_objects(store):
    f = new_file(store, leaf(store), b"t")
    await store.write(f, 0, random.Random(5).randbytes(3 * BLOCK_SIZE))
    await store.sync()
    assert objects_rows(store) == 3
    await store.truncate(f, 0)
    await store.commit()
    assert objects_rows(store) == 0 and pack_files(store) == set()
    assert await store.read(f, 0, 100) == b""


@trio_test
async def test_all_zero_blocks_make_no_object(store):
    f = new_file(store, leaf(store), b"zeros")
    await store.write(f, 0, bytes(5 * BLOCK_SIZE + 123))
    await store.sync()
    assert objects_rows(store) == 0 and pack_files(store) == set()
    assert store.db.one("SELECT COUNT(*) FROM blocks")[0] == 0
    assert await store.read(f, 0, 6 * BLOCK_SIZE) == bytes(5 * BLOCK_SIZE + 123)
    # overwriting a stored block with zeros turns it back into a hole and frees its object
    await store.write(f, BLOCK_SIZE, b"\x01" * BLOCK_SIZE)
    await store.sync()
    assert objects_rows(store) == 1
    await store.write(f, BLOCK_SIZE, bytes(BLOCK_SIZE))
    await store.sync()
    assert objects_rows(store) == 0 and pack_files(store) == set()
    assert await store.read(f, 0, 6 * BLOCK_SIZE) == bytes(5 * BLOCK_SIZE + 123)


@trio_test
async def test_dedup_and_deletion_of_objects(opener):
    store = opener(cache_limit=0)
    d = leaf(store)
    data = random.Random(9).randbytes(MiB)
    files = [new_file(store, d, b"copy%d" % i) for i in range(3)]
    for ino in files:
        await store.write(ino, 0, data)
    await store.sync()
    blocks = MiB // BLOCK_SIZE
    assert objects_rows(store) == blocks
    assert packs_used(store) == pack_files(store) and len(pack_files(store)) == 1  # one area: one pack
    assert {r[0] for r in store.db.execute("SELECT refcount FROM objects")} == {3}
    assert store.usage()["total"]["stored_bytes"] < 1.01 * MiB

    for i in (0, 1):
        assert store.unlink(d, b"copy%d" % i, want_dir=False).nlink == 0
        store.destroy_inode(files[i])
    await store.commit()
    assert objects_rows(store) == blocks and packs_used(store) == pack_files(store)
    assert {r[0] for r in store.db.execute("SELECT refcount FROM objects")} == {1}
    assert await store.read(files[2], 0, 2 * MiB) == data

    packs = pack_files(store)
    store.unlink(d, b"copy2", want_dir=False)
    store.destroy_inode(files[2])
    assert objects_rows(store) == 0
    assert pack_files(store) == packs          # the pack goes only after the commit
    await store.commit()
    assert pack_files(store) == set()
    assert store.db.one("SELECT COUNT(*) FROM blocks")[0] == 0
    opener.close(store)
    store = opener()
    assert objects_rows(store) == 0 and pack_files(store) == set()


@trio_test
async def test_a_mostly_dead_pack_is_compacted_and_what_lives_in_it_still_reads(opener):
    store = opener(cache_limit=0)
    d = leaf(store)
    keep, drop = random.Random(1).randbytes(2 * BLOCK_SIZE), random.Random(2).randbytes(6 * BLOCK_SIZE)
    f, g = new_file(store, d, b"keep"), new_file(store, d, b"drop")
    await store.write(f, 0, keep)
    await store.write(g, 0, drop)
    await store.sync()
    (old,) = pack_files(store)
    assert await store.compact() == 0  # being appended to
    store.packs.seal_all()
    assert await store.compact() == 0  # nothing dead yet
    store.destroy_inode(store.unlink(d, b"drop", want_dir=False).id)
    await store.commit()
    assert pack_files(store) == {old}  # a quarter still lives in it
    assert await store.compact() == 1
    assert old not in pack_files(store) and packs_used(store) == pack_files(store)
    assert store.packs.path(packs_used(store).pop()).stat().st_size == store.usage()["total"]["stored_bytes"]
    assert await store.read(f, 0, 3 * BLOCK_SIZE) == keep
    opener.close(store)
    store = opener(cache_limit=0)
    assert await store.read(f, 0, 3 * BLOCK_SIZE) == keep
    assert (await check_store(store, repair=False)).clean


@trio_test
async def test_a_quiet_pack_being_filled_is_compacted_once_mostly_dead(opener):
    store = opener(cache_limit=0)
    d = leaf(store)
    keep = random.Random(1).randbytes(BLOCK_SIZE)
    f, g = new_file(store, d, b"keep"), new_file(store, d, b"drop")
    await store.write(f, 0, keep)
    await store.write(g, 0, random.Random(2).randbytes(3 * BLOCK_SIZE))
    await store.sync()
    (filling,) = pack_files(store)
    store.destroy_inode(store.unlink(d, b"drop", want_dir=False).id)
    await store.commit()
    assert await store.compact() == 0  # appended to a moment ago: the area may go on writing
    assert await store.compact(idle=0) == 1
    assert filling not in pack_files(store) and packs_used(store) == pack_files(store)
    assert await store.read(f, 0, 2 * BLOCK_SIZE) == keep
    g2 = new_file(store, d, b"next")  # the area's next write starts a new pack
    await store.write(g2, 0, random.Random(3).randbytes(BLOCK_SIZE))
    await store.sync()
    assert len(pack_files(store)) == 2 and await store.read(f, 0, 2 * BLOCK_SIZE) == keep


@trio_test
async def test_a_pack_left_without_rows_is_deleted_by_the_first_compaction(opener):
    """Appended, then the process died before the commit: the next daemon deletes the pack."""
    store = opener(cache_limit=0)
    f = new_file(store, leaf(store), b"f")
    await store.write(f, 0, random.Random(3).randbytes(BLOCK_SIZE))
    await store.sync()
    stray = store.packs.path(0x1234)
    stray.write_bytes(random.Random(4).randbytes(BLOCK_SIZE))
    opener.close(store)
    store = opener(cache_limit=0)
    assert await store.compact() == 1
    assert not stray.exists() and len(pack_files(store)) == 1


def test_leftover_free_object_files_of_an_older_daemon_are_removed_at_open(opener):
    store = opener()
    opener.close(store)
    free = opener.path / "objects" / "free"
    free.mkdir(parents=True)
    (free / "00000000000000ab").write_bytes(b"dead object")
    opener.close(opener())
    assert not free.exists()


def test_the_store_benchmark_measures_each_workload_and_leaves_nothing(tmp_path):
    r, figures = run_script("bench_store.py", "--size", "8M", "--dir", str(tmp_path), tmp_path=tmp_path)
    assert r.returncode == 0, r.stderr
    for name in ("fresh", "text", "overwrite"):
        assert float(figures[f"{name}_seconds"]) > 0 and float(figures[f"{name}_cpu"]) > 0
        assert float(figures[f"{name}_rate"]) > 0
    assert list(tmp_path.iterdir()) == []


def test_the_request_benchmark_counts_each_phases_statements_and_leaves_nothing(tmp_path):
    r, figures = run_script("bench_ops.py", "--files", "40", "--repeat", "1", "--statements", "--dir", str(tmp_path),
                            tmp_path=tmp_path)
    assert r.returncode == 0, r.stderr
    for kind in ("create", "write", "flush", "lookup", "lookup_unlink_forget"):
        assert float(figures[kind]) > 0
    # a stat is one query at most (none: the flush kept the rows it changed); creating and
    # deleting a file take a few statements each
    assert 0 <= float(figures["sql_stat"]) <= 1 < float(figures["sql_create"]) and float(figures["sql_unlink"]) > 1
    listed = [line for line in r.stdout.splitlines() if line.startswith("# ")]
    assert any("INSERT INTO inodes" in line for line in listed) and any("DELETE FROM inodes" in line for line in listed)
    assert list(tmp_path.iterdir()) == []


_CRASH_SCRIPT = """
import os, sys
from pathlib import Path
from tempfs.codec import ContentCodec
from tempfs.store import Store
path, key, parent = Path(sys.argv[1]), bytes.fromhex(sys.argv[2]), int(sys.argv[3])
store = Store(path, ContentCodec(key), dirty_limit=1 << 26, cache_limit=0)
ino = store.lookup(parent, b"f")
store.unlink(parent, b"f", want_dir=False)
store.destroy_inode(ino)
print(len(store.packs.sizes()[0]), flush=True)
os._exit(0)  # a crash: no commit, no close
"""


@trio_test
async def test_uncommitted_deletion_keeps_the_pack_after_crash(opener):
    """Until the commit that drops the last reference, the pack stays: a process that dies
    before that commit leaves the old (committed) tree readable."""
    import subprocess
    import sys
    from pathlib import Path
    store = opener(cache_limit=0)
    d = leaf(store)
    f = new_file(store, d, b"f")
    data = random.Random(3).randbytes(2 * BLOCK_SIZE)
    await store.write(f, 0, data)
    await store.sync()
    packs = pack_files(store)
    opener.close(store)
    repo = Path(__file__).resolve().parent.parent
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(repo), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, "-c", _CRASH_SCRIPT, str(opener.path), opener.key.hex(), str(d)],
                          capture_output=True, text=True, timeout=30, env=env)
    assert proc.returncode == 0, proc.stderr
    assert int(proc.stdout) == len(packs) == 1  # the deleting process had not removed the pack yet
    store = opener(cache_limit=0)
    assert store.lookup(d, b"f") == f
    assert pack_files(store) == packs
    assert await store.read(f, 0, 3 * BLOCK_SIZE) == data


@trio_test
async def test_same_block_within_one_file_is_stored_once(store):
    f = new_file(store, leaf(store), b"f")
    block = random.Random(4).randbytes(BLOCK_SIZE)
    await store.write(f, 0, block * 4)
    await store.sync()
    assert objects_rows(store) == 1
    assert store.db.one("SELECT refcount FROM objects")[0] == 4
    await store.write(f, 0, b"X")  # changing one copy leaves the others
    await store.sync()
    assert objects_rows(store) == 2
    assert await store.read(f, 0, 4 * BLOCK_SIZE) == b"X" + block[1:] + block * 3


@trio_test
async def test_compressible_content_stores_smaller(store):
    f = new_file(store, leaf(store), b"log.txt")
    data = compressible(MiB)
    await store.write(f, 0, data)
    await store.sync()
    total = store.usage()["total"]
    assert total["logical_bytes"] == MiB
    assert total["stored_bytes"] < MiB // 4
    on_disk = sum(p.stat().st_size for p in (store.path / "packs").rglob("*") if p.is_file())
    inline = store.db.one("SELECT coalesce(SUM(length(data)), 0) FROM objects")[0]
    assert inline > 0  # compressed blocks are small enough to live in the metadata
    assert on_disk + inline == total["stored_bytes"]


@trio_test
async def test_small_objects_live_in_the_metadata_and_go_with_their_rows(opener):
    store = opener()
    folder = leaf(store)
    small = new_file(store, folder, b"session.json")
    data = random.Random(3).randbytes(3000)
    await store.write(small, 0, data)
    big = new_file(store, folder, b"frame.raw")
    frame = random.Random(4).randbytes(BLOCK_SIZE + 100)  # a whole block in a file, its tail inline
    await store.write(big, 0, frame)
    await store.sync()
    inline = {oid for (oid,) in store.db.execute("SELECT id FROM objects WHERE data IS NOT NULL")}
    assert len(inline) == 2 and store.db.one("SELECT COUNT(*) FROM objects WHERE pack IS NOT NULL")[0] == 1
    opener.close(store)
    store = opener()
    assert await store.read(small, 0, 4096) == data
    assert await store.read(big, 0, 2 * BLOCK_SIZE) == frame
    store.destroy_inode(store.unlink(folder, b"session.json", want_dir=False).id)
    store.destroy_inode(store.unlink(folder, b"frame.raw", want_dir=False).id)
    await store.sync()
    assert objects_rows(store) == 0 and pack_files(store) == set()
    assert store.usage()["total"]["stored_bytes"] == 0


def test_a_store_keeps_the_dedup_digest_it_was_made_with(opener):
    """New stores digest with BLAKE3; one made with BLAKE2b (all before BLAKE3, which recorded
    no algorithm) keeps it, so new writes still deduplicate against its objects."""
    assert opener().db.get_meta("digest") == "blake3"
    opener.close(opener.open_stores[0])
    old_path = opener.tmp_path / "old"
    store = Store(old_path, ContentCodec(opener.key, digest="blake2b"), dirty_limit=BIG, cache_limit=0)
    data = random.Random(11).randbytes(BLOCK_SIZE)

    async def write(store, name):
        await store.write(new_file(store, leaf(store), name), 0, data)
        await store.sync()
    run(write, store, b"a")
    store.db.execute("DELETE FROM meta WHERE key='digest'")  # as a store from before BLAKE3
    store.commit_now()
    store.close()
    store = opener(old_path)  # a codec that would take BLAKE3 for a new store
    assert store.blocks.codec.digest_algorithm == "blake2b"
    run(write, store, b"b")
    assert objects_rows(store) == 1  # deduplicated against the old object


@pytest.mark.parametrize("levels", [1, 2])
def test_a_store_before_packs_keeps_reading_and_removing_its_object_files(opener, levels):
    """Before schema 6 an object had a file of its own, in 256 folders (objects/ab/<id>) or,
    before that, in 65,536 (objects/ab/cd/<id>)."""
    async def write(store, name, seed):
        data = random.Random(seed).randbytes(3 * BLOCK_SIZE)
        f = new_file(store, leaf(store), name)
        await store.write(f, 0, data)
        await store.sync()
        return f, data

    store = opener()
    store.db.set_meta("object_levels", levels)
    store.commit_now()
    opener.close(store)
    store = opener()
    f, data = run(write, store, b"old", 1)
    to_object_files(store)
    opener.close(store)
    store = opener(cache_limit=0)
    parts = {p.relative_to(store.path / "objects").parts for p in (store.path / "objects").rglob("*") if p.is_file()}
    assert len(parts) == 3 and all(len(p) == levels + 1 and p[-1].startswith("".join(p[:-1])) for p in parts)
    assert run(store.read, f, 0, 4 * BLOCK_SIZE) == data
    assert run(functools.partial(check_store, store, repair=False)).clean
    g, new_data = run(write, store, b"new", 2)  # new objects go to a pack
    assert len(object_files(store)) == 3 and len(pack_files(store)) == 1
    store.destroy_inode(store.unlink(leaf(store), b"old", want_dir=False).id)
    run(store.sync)
    assert object_files(store) == set()
    assert run(store.read, g, 0, 4 * BLOCK_SIZE) == new_data


def test_cached_reads_never_outlive_a_change_or_a_rollback(store):
    folder = leaf(store)
    f = new_file(store, folder, b"f")
    assert store.lookup(folder, b"f") == f  # kept from here on
    store.db.execute("SAVEPOINT s")
    store.rename(folder, b"f", folder, b"g")  # keeps what it changed
    assert store.lookup(folder, b"f") is None and store.lookup(folder, b"g") == f
    store.db.rollback_to("s")
    assert store.lookup(folder, b"f") == f and store.lookup(folder, b"g") is None

    async def write_and_store():
        await store.write(f, 0, random.Random(1).randbytes(1000))
        assert store.inode(f).stored_bytes == 0  # held in memory so far
        await store.sync()  # the block map's triggers update stored_bytes
    run(write_and_store)
    assert store.inode(f).stored_bytes == store.db.one("SELECT stored_size FROM objects")[0] > 0


async def stored_then_reopened(opener, name: bytes, size: int, seed: int, damage=None):
    """A store holding one file of random content, reopened with nothing cached; `damage(store,
    inode)` runs before it is closed."""
    store = opener()
    f = new_file(store, leaf(store), name)
    data = random.Random(seed).randbytes(size)
    await store.write(f, 0, data)
    await store.sync()
    if damage is not None:
        damage(store, f)
    opener.close(store)
    return opener(), f, data


@trio_test
async def test_a_file_read_in_order_has_its_next_blocks_loaded_ahead(opener):
    store, f, data = await stored_then_reopened(opener, b"model.onnx", 12 * BLOCK_SIZE, 6)
    blocks = store.blocks
    statements = executed_statements(store.db)
    async with trio.open_nursery() as nursery:
        await nursery.start(blocks.run_read_ahead)
        assert await store.read(f, 0, BLOCK_SIZE) == data[:BLOCK_SIZE]
        assert blocks.misses == 1
        for i in range(1, 12):
            assert await store.read(f, i * BLOCK_SIZE, BLOCK_SIZE) == data[i * BLOCK_SIZE:(i + 1) * BLOCK_SIZE]
        assert blocks.misses == 1  # every later block was loaded ahead (or waited for)
        # the block map of the blocks loaded ahead came with them: one query per block read on its own
        assert sum("blockno=?" in sql for sql in statements) == 1
        assert await store.read(f, 5 * BLOCK_SIZE, 10) == data[5 * BLOCK_SIZE:5 * BLOCK_SIZE + 10]
        nursery.cancel_scope.cancel()


@trio_test
async def test_a_reader_out_of_order_gets_no_loads_ahead_and_a_failed_one_is_the_readers_error(opener):
    def damage_block_2(store, f):
        object_id = store.db.one("SELECT object FROM blocks WHERE inode=? AND blockno=2", (f,))[0]
        put_sealed(store, object_id, sealed_of(store, object_id)[:-1] + b"\0")

    store, f, data = await stored_then_reopened(opener, b"frames.raw", 8 * BLOCK_SIZE, 7, damage_block_2)
    blocks = store.blocks
    async with trio.open_nursery() as nursery:
        await nursery.start(blocks.run_read_ahead)
        assert await store.read(f, 6 * BLOCK_SIZE, 100) == data[6 * BLOCK_SIZE:6 * BLOCK_SIZE + 100]
        await trio.sleep(0.05)
        assert blocks.misses == 1 and not blocks._loading  # a jump: nothing loaded ahead
        assert await store.read(f, 0, BLOCK_SIZE) == data[:BLOCK_SIZE]  # from the start: 1..8 ahead
        assert await store.read(f, BLOCK_SIZE, BLOCK_SIZE) == data[BLOCK_SIZE:2 * BLOCK_SIZE]
        with pytest.raises(BlockReadError):
            await store.read(f, 2 * BLOCK_SIZE, BLOCK_SIZE)
        assert await store.read(f, 3 * BLOCK_SIZE, BLOCK_SIZE) == data[3 * BLOCK_SIZE:4 * BLOCK_SIZE]
        nursery.cancel_scope.cancel()


@trio_test
async def test_an_altered_inline_object_reads_as_an_error(opener):
    store = opener()
    f = new_file(store, leaf(store), b"small")
    await store.write(f, 0, b"tiny content" * 10)
    await store.sync()
    (oid, sealed), = store.db.execute("SELECT id, data FROM objects").fetchall()
    flipped = bytes([sealed[0] ^ 1]) + sealed[1:]
    store.db.execute("UPDATE objects SET data=? WHERE id=?", (flipped, oid))
    store.commit_now()
    opener.close(store)
    store = opener()
    with pytest.raises(BlockReadError):
        await store.read(f, 0, 100)


def test_a_version_4_store_keeps_its_object_files_and_stores_small_objects_inline(opener):
    """Schema 5 adds objects.data, 6 packs: a store written before keeps reading from its files."""
    async def write_then_downgrade():
        store = opener(inline_max=0)  # as schema 4 stored everything
        f = new_file(store, leaf(store), b"old")
        await store.write(f, 0, b"before" * 100)
        await store.sync()
        to_object_files(store)
        store.db.execute("DROP INDEX objects_pack")
        for column in ("data", "pack", "offset"):
            store.db.execute(f"ALTER TABLE objects DROP COLUMN {column}")
        store.db.set_meta("schema_version", 4)
        store.commit_now()
        opener.close(store)
        return f

    f = run(write_then_downgrade)

    async def after():
        store = opener()
        assert store.db.get_meta("schema_version") == SCHEMA_VERSION
        assert await store.read(f, 0, 600) == b"before" * 100
        g = new_file(store, leaf(store), b"new")
        await store.write(g, 0, b"after" * 100)
        await store.sync()
        assert store.db.one("SELECT COUNT(*) FROM objects WHERE data IS NOT NULL")[0] == 1
        assert len(object_files(store)) == 1 and pack_files(store) == set()
    run(after)


@trio_test
async def test_no_plaintext_on_disk(opener):
    store = opener()
    d = leaf(store)
    data = compressible(600 * KiB)
    f = new_file(store, d, b"f")
    await store.write(f, 0, data)
    raw = bytearray(random.Random(8).randbytes(300 * KiB))
    for pos in range(0, len(raw) - 100, 10_000):
        raw[pos:pos + len(MARKER)] = MARKER
    g = new_file(store, d, b"g")
    await store.write(g, 0, bytes(raw))
    await store.sync()
    opener.close(store)
    for path in store.path.rglob("*"):
        if path.is_file():
            content = path.read_bytes()
            assert MARKER not in content, path
            assert data[1000:1064] not in content, path


@trio_test
async def test_deleted_object_keys_do_not_linger_in_the_database(opener):
    store = opener()
    f = new_file(store, leaf(store), b"f")
    await store.write(f, 0, random.Random(6).randbytes(2 * BLOCK_SIZE))
    await store.sync()
    wrapped = [r[0] for r in store.db.execute("SELECT wrapped_key FROM objects")]
    assert len(wrapped) == 2
    await store.truncate(f, 0)
    await store.sync()
    opener.close(store)
    for path in store.path.glob("meta.sqlite*"):
        content = path.read_bytes()
        for key in wrapped:
            assert key not in content and key[12:] not in content, path


@trio_test
async def test_deleted_content_cannot_be_decrypted_even_from_reinstated_copies(opener):
    """Crypto-shredding: an attacker who copied a file's objects and later gets the master key
    and the store cannot decrypt them once the file is gone."""
    store = opener()
    folder = leaf(store)
    keep = new_file(store, folder, b"keep")
    await store.write(keep, 0, random.Random(8).randbytes(BLOCK_SIZE))  # a live object stays
    victim = new_file(store, folder, b"face.jpg")
    await store.write(victim, 0, MARKER + random.Random(9).randbytes(2 * BLOCK_SIZE))
    await store.sync()
    stolen = {oid: store.blocks.sealed(oid, *where) for oid, *where in store.db.execute(
        "SELECT o.id, o.data, o.pack, o.offset, o.stored_size FROM blocks b JOIN objects o ON o.id = b.object "
        "WHERE b.inode=?", (victim,))}
    digests = {oid: store.db.one("SELECT digest FROM objects WHERE id=?", (oid,))[0] for oid in stolen}
    assert len(stolen) == 3
    store.unlink(folder, b"face.jpg", want_dir=False)
    store.destroy_inode(victim)
    await store.sync()
    codec = ContentCodec(opener.key)
    keys = [r[0] for r in store.db.execute("SELECT wrapped_key FROM objects")]
    assert keys  # the live file's
    for oid, sealed in stolen.items():
        for wrapped in keys:  # even knowing the digest the destroyed row had
            with pytest.raises(IntegrityError):
                codec.open(oid, sealed, wrapped, digests[oid])


@trio_test
async def test_shredding_waits_for_a_reader_that_blocks_the_checkpoint_then_happens(opener, tmp_path, caplog):
    store = opener()
    folder = leaf(store)
    await store.write(new_file(store, folder, b"doomed"), 0, b"x" * 1000)
    await store.sync()
    wrapped = store.db.one("SELECT wrapped_key FROM objects")[0]
    reader = sqlite3.connect(tmp_path / "store" / "meta.sqlite")
    reader.execute("BEGIN")
    reader.execute("SELECT COUNT(*) FROM inodes").fetchone()  # holds a read snapshot
    store.destroy_inode(store.unlink(folder, b"doomed", want_dir=False).id)
    await store.commit(shred=True)
    wal = tmp_path / "store" / "meta.sqlite-wal"
    assert wrapped in wal.read_bytes()  # the reader's snapshot still needs it
    assert "could not be checkpointed" in caplog.text
    assert store.db.dirty  # the committer will try again
    reader.close()
    await store.commit()
    assert not store.db.dirty
    assert wrapped not in wal.read_bytes() and wrapped not in (tmp_path / "store" / "meta.sqlite").read_bytes()


@trio_test
async def test_corrupted_object_raises_block_read_error(opener):
    store = opener(cache_limit=0)
    d = leaf(store)
    f = new_file(store, d, b"f")
    g = new_file(store, d, b"g")
    data = random.Random(7).randbytes(3 * BLOCK_SIZE)
    other = random.Random(17).randbytes(BLOCK_SIZE)
    await store.write(f, 0, data)
    await store.write(g, 0, other)
    await store.sync()
    middle = store.db.one("SELECT object FROM blocks WHERE inode=? AND blockno=1", (f,))[0]
    blob = bytearray(sealed_of(store, middle))
    blob[len(blob) // 2] ^= 0x01
    put_sealed(store, middle, bytes(blob))

    with pytest.raises(BlockReadError) as e:
        await store.read(f, 0, 3 * BLOCK_SIZE)
    assert e.value.inode == f and e.value.blockno == 1
    with pytest.raises(BlockReadError):
        await store.read(f, BLOCK_SIZE + 5, 10)
    # everything else is still served
    assert await store.read(f, 0, BLOCK_SIZE) == data[:BLOCK_SIZE]
    assert await store.read(f, 2 * BLOCK_SIZE, BLOCK_SIZE) == data[2 * BLOCK_SIZE:]
    assert await store.read(g, 0, BLOCK_SIZE) == other

    # a truncated pack and a missing one fail the same way
    path, offset, size = stored_at(store, store.db.one("SELECT object FROM blocks WHERE inode=? AND blockno=0", (g,))[0])
    os.truncate(path, offset + size - 1)  # g's block was stored last
    with pytest.raises(BlockReadError):
        await store.read(g, 0, 10)
    path.unlink()
    with pytest.raises(BlockReadError):
        await store.read(f, 0, 10)


@trio_test
async def test_swapped_objects_raise_block_read_error(opener):
    store = opener(cache_limit=0)
    f = new_file(store, leaf(store), b"f")
    await store.write(f, 0, random.Random(1).randbytes(2 * BLOCK_SIZE))
    await store.sync()
    a = store.db.one("SELECT object FROM blocks WHERE inode=? AND blockno=0", (f,))[0]
    b = store.db.one("SELECT object FROM blocks WHERE inode=? AND blockno=1", (f,))[0]
    blob_a, blob_b = sealed_of(store, a), sealed_of(store, b)
    assert len(blob_a) == len(blob_b)
    put_sealed(store, a, blob_b)
    put_sealed(store, b, blob_a)
    for off in (0, BLOCK_SIZE):
        with pytest.raises(BlockReadError):
            await store.read(f, off, 10)


# ---- opening, locking, keys -------------------------------------------------------------

def test_second_store_on_same_path_is_locked(opener):
    store = opener()
    with pytest.raises(StoreLockedError) as e:
        opener()
    assert isinstance(e.value, StoreOpenError)
    assert "in use" in str(e.value)
    # the first one is unharmed
    d = store.make(ROOT_INODE, b"area", DIR, UID, GID)
    assert store.lookup(ROOT_INODE, b"area") == d.id
    opener.close(store)
    store = opener()
    assert store.lookup(ROOT_INODE, b"area") == d.id


def test_wrong_key_is_refused(opener):
    store = opener()
    store.make(ROOT_INODE, b"area", DIR, UID, GID)
    opener.close(store)
    with pytest.raises(WrongKeyError) as e:
        opener(key=os.urandom(MASTER_KEY_BYTES))
    assert isinstance(e.value, StoreOpenError)
    # the refused attempt released the lock and changed nothing
    store = opener()
    assert store.lookup(ROOT_INODE, b"area") is not None


@trio_test
async def test_reopen_keeps_everything(opener, clock):
    store = opener()
    d = leaf(store)
    t_make = clock.tick()
    f = new_file(store, d, b"file.bin")
    data = random.Random(11).randbytes(BLOCK_SIZE * 2 + 99) + compressible(BLOCK_SIZE * 3)
    await store.write(f, 0, data)
    sub = store.make(d, b"sub", DIR, UID, GID)
    link = store.make(sub.id, b"ln", LINK, UID, GID, target=b"../file.bin")
    store.link(f, sub.id, b"hard")
    store.set_xattr(f, b"user.ttl", b"300")
    await store.sync()
    before = {ino: store.inode(ino) for ino in (ROOT_INODE, d, f, sub.id, link.id)}
    listing = store.children(d)
    opener.close(store)

    clock.tick()
    store = opener(cache_limit=0)
    for ino, node in before.items():
        assert store.inode(ino) == node
    assert store.inode(f).atime_ns == t_make
    assert store.children(d) == listing
    assert store.lookup(sub.id, b"hard") == f and store.inode(f).nlink == 2
    assert store.inode(link.id).target == b"../file.bin"
    assert store.get_xattr(f, b"user.ttl") == b"300"
    assert await store.read(f, 0, len(data) + 1) == data
    assert store.inode(store.lookup(ROOT_INODE, b"processing")).kind == Kind.BRANCH
    assert store.inode(d).kind == Kind.LEAF


@trio_test
async def test_unlinked_inodes_are_purged_at_reopen(opener):
    store = opener()
    d = leaf(store)
    gone = new_file(store, d, b"gone")
    kept = new_file(store, d, b"kept")
    store.link(kept, d, b"kept2")
    await store.write(gone, 0, random.Random(2).randbytes(2 * BLOCK_SIZE))
    await store.write(kept, 0, b"kept content")
    store.set_xattr(gone, b"user.x", b"1")
    await store.sync()
    gone_objects = {r[0] for r in store.db.execute("SELECT object FROM blocks WHERE inode=?", (gone,))}
    assert len(gone_objects) == 2
    # names gone, but the inode was still "open" when the daemon stopped
    store.unlink(d, b"gone", want_dir=False)
    store.unlink(d, b"kept", want_dir=False)
    empty_dir = store.make(d, b"emptydir", DIR, UID, GID)
    store.unlink(d, b"emptydir", want_dir=True)
    await store.sync()
    assert store.inode(gone).nlink == 0
    packs = pack_files(store)
    assert {stored_at(store, o)[0] for o in gone_objects} <= {store.packs.path(p) for p in packs}
    opener.close(store)

    store = opener()
    for ino in (gone, empty_dir.id):
        with pytest.raises(StoreError):
            store.inode(ino)
    assert store.inode(kept).nlink == 1
    assert await store.read(kept, 0, 100) == b"kept content"
    assert not (gone_objects & object_ids(store))
    assert pack_files(store) == set()  # kept's content is inline: the pack went with gone's objects
    assert store.db.one("SELECT COUNT(*) FROM xattrs WHERE inode=?", (gone,))[0] == 0
    assert store.db.one("SELECT COUNT(*) FROM blocks WHERE inode=?", (gone,))[0] == 0


# ---- accounting -------------------------------------------------------------------------

def _stored(store: Store, *inos: int) -> int:
    marks = ",".join("?" * len(inos))
    row = store.db.one(f"SELECT COALESCE(SUM(stored_size), 0) FROM objects WHERE id IN "
                       f"(SELECT object FROM blocks WHERE inode IN ({marks}))", inos)
    return row[0]


@trio_test
async def test_usage_per_area(store):
    frames = leaf(store, "processing/face_recognition/frames")
    models = leaf(store, "cache/models")
    cache = store.lookup(ROOT_INODE, b"cache")
    leaf(store, "sessions/user_sessions")
    a = new_file(store, frames, b"a.txt")
    await store.write(a, 0, compressible(300 * KiB))
    b = new_file(store, models, b"b.onnx")
    await store.write(b, 0, random.Random(1).randbytes(200 * KiB))
    e = new_file(store, cache, b"empty")
    sub = store.make(frames, b"batch", DIR, UID, GID)
    s = new_file(store, sub.id, b"s.bin")
    await store.write(s, 10 * BLOCK_SIZE, b"x")  # sparse: one small object
    await store.sync()

    u = store.usage()
    areas = u["areas"]
    assert {"processing", "cache"} <= set(areas)
    zero = {"files": 0, "logical_bytes": 0, "stored_bytes": 0}
    assert areas.get("sessions", zero) == zero  # an area without files: absent or all zeros
    assert set(areas) <= {"processing", "cache", "sessions"}
    p = areas["processing"]
    assert p["files"] == 2 and p["logical_bytes"] == 300 * KiB + 10 * BLOCK_SIZE + 1
    assert p["stored_bytes"] == _stored(store, a, s)
    assert p["stored_bytes"] < 300 * KiB // 2
    c = areas["cache"]
    assert c["files"] == 2 and c["logical_bytes"] == 200 * KiB
    assert c["stored_bytes"] == _stored(store, b, e) > 200 * KiB
    total = u["total"]
    assert total["files"] == 4
    assert total["logical_bytes"] == p["logical_bytes"] + c["logical_bytes"]
    assert total["stored_bytes"] == p["stored_bytes"] + c["stored_bytes"] == store.stored_bytes()
    assert total["objects"] == objects_rows(store)

    # the same content in two areas counts in each, once in the total
    shared = random.Random(2).randbytes(BLOCK_SIZE)
    x = new_file(store, frames, b"x")
    y = new_file(store, models, b"y")
    await store.write(x, 0, shared)
    await store.write(y, 0, shared)
    await store.sync()
    u2 = store.usage()
    one = _stored(store, x)
    assert u2["areas"]["processing"]["stored_bytes"] == p["stored_bytes"] + one
    assert u2["areas"]["cache"]["stored_bytes"] == c["stored_bytes"] + one
    assert u2["total"]["stored_bytes"] == total["stored_bytes"] + one
    assert u2["total"]["objects"] == total["objects"] + 1

    # two files of one area sharing an object count it once in that area
    z = new_file(store, models, b"z")
    await store.write(z, 0, shared)
    await store.sync()
    assert store.usage()["areas"]["cache"]["stored_bytes"] == u2["areas"]["cache"]["stored_bytes"]


def _counters(store: Store) -> dict:
    """The counters the triggers keep."""
    return {
        "areas": {a: b for a, b in store.db.execute("SELECT area, stored_bytes FROM area_usage") if b},
        "inodes": dict(store.db.execute("SELECT id, stored_bytes FROM inodes WHERE stored_bytes != 0")),
        "total": store.stored_bytes(),
        "objects": store.usage()["total"]["objects"],
    }


def _recomputed(store: Store) -> dict:
    """The same figures computed from the block map from scratch."""
    q = store.db.execute
    return {
        "areas": {a: b for a, b in q(
            "SELECT area, SUM(stored_size) FROM (SELECT DISTINCT i.area AS area, o.id, o.stored_size FROM blocks b "
            "JOIN inodes i ON i.id = b.inode JOIN objects o ON o.id = b.object) GROUP BY area") if b},
        "inodes": dict(q("SELECT b.inode, SUM(o.stored_size) FROM blocks b JOIN objects o ON o.id = b.object "
                         "GROUP BY b.inode")),
        "total": q("SELECT COALESCE(SUM(stored_size), 0) FROM objects").fetchone()[0],
        "objects": q("SELECT COUNT(*) FROM objects").fetchone()[0],
    }


@pytest.mark.parametrize("seed", range(6))
@trio_test
async def test_counters_match_the_block_map_whatever_happens(opener, seed):
    """Writes (with repeated content, so dedup happens within and across areas), overwrites,
    truncates, hard links, renames across areas, deletions, expiry and a reopen: after every
    step the trigger-kept counters equal a recomputation from the block map."""
    rng = random.Random(seed)
    store = opener(cache_limit=0)  # nothing cached: a small write into a stored block is a patch
    folders = [leaf(store, "processing/common/uploads"), leaf(store, "cache/data"), leaf(store, "cleanup/manual")]
    pool = [rng.randbytes(BLOCK_SIZE) for _ in range(4)] + [compressible(BLOCK_SIZE, i) for i in range(2)]
    files: list[tuple[int, bytes]] = []
    for step in range(60):
        op = rng.choice(["write", "write", "patch", "truncate", "link", "rename", "unlink", "expire", "flush"])
        if op == "write" or not files:
            folder = rng.choice(folders)
            name = b"f%d" % step
            files.append((folder, name))
            ino = new_file(store, folder, name)
            for blockno in rng.sample(range(4), rng.randint(1, 3)):
                await store.write(ino, blockno * BLOCK_SIZE + rng.choice([0, 100]), rng.choice(pool)[:rng.randint(1, BLOCK_SIZE)])
            continue
        folder, name = files.pop(rng.randrange(len(files)))
        ino = store.lookup(folder, name)
        if op == "truncate":
            await store.truncate(ino, rng.randint(0, 3 * BLOCK_SIZE))
            files.append((folder, name))
        elif op == "patch":  # small writes into stored blocks: patches, some shared
            await store.blocks.flush_all()
            for _ in range(rng.randint(1, 3)):
                await store.write(ino, rng.randrange(3 * BLOCK_SIZE), rng.choice(pool)[:rng.randint(1, 4 * KiB)])
            files.append((folder, name))
        elif op == "link":
            target = rng.choice([f for f in folders if store.inode(f).area == store.inode(ino).area])
            store.link(ino, target, b"l%d" % step)
            files += [(folder, name), (target, b"l%d" % step)]
        elif op == "rename":
            target = rng.choice(folders)
            store.rename(folder, name, target, b"r%d" % step)
            files.append((target, b"r%d" % step))
        elif op == "unlink":
            if store.unlink(folder, name, want_dir=False).nlink == 0:
                store.destroy_inode(ino)
        elif op == "expire":
            store.expire(ino)
            store.destroy_inode(ino)
            files = [(f, n) for f, n in files if store.lookup(f, n) is not None]
        else:
            files.append((folder, name))
            await store.blocks.flush_all()
        assert _counters(store) == _recomputed(store), f"step {step}: {op}"
    await store.sync()
    before = _counters(store)
    assert before == _recomputed(store)
    store.close()
    assert _counters(opener()) == before


@trio_test
async def test_a_version_2_store_is_migrated_with_its_counters(opener):
    store = opener()
    folder = leaf(store, "cache/data")
    for i in range(3):
        await store.write(new_file(store, folder, b"f%d" % i), 0, random.Random(i % 2).randbytes(BLOCK_SIZE + 10))
    await store.sync()
    expected = _recomputed(store)
    # take the store back to schema version 2, as an older tempfs left it
    db = store.db
    for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type='trigger'").fetchall():
        db.execute(f"DROP TRIGGER {name}")
    for table in ("area_objects", "area_usage", "totals"):
        db.execute(f"DROP TABLE {table}")
    db.execute("DROP INDEX inodes_lru")
    db.execute("ALTER TABLE inodes DROP COLUMN used_ns")
    db.execute("ALTER TABLE inodes DROP COLUMN stored_bytes")
    _as_version_3(store)
    db.set_meta("schema_version", 2)
    store.close()

    migrated = opener()
    assert migrated.db.get_meta("schema_version") == SCHEMA_VERSION
    assert _counters(migrated) == expected
    assert migrated.least_recently_used("cache", 10) != []
    assert sorted(name for _, name, _ in migrated.children(folder)) == [b"f0", b"f1", b"f2"]


@trio_test
async def test_a_version_6_store_gets_layered_block_maps_and_takes_patches(opener):
    store = opener(cache_limit=0)
    folder = leaf(store, "cache/data")
    files = {new_file(store, folder, b"f%d" % i): bytearray(random.Random(i).randbytes(2 * BLOCK_SIZE + 10))
             for i in range(3)}
    for ino, data in files.items():
        await store.write(ino, 0, bytes(data))
    await store.sync()
    expected = _recomputed(store)
    # take the block map back to schema version 6: one entry per block, no layer
    db = store.db
    for trigger in ("block_added", "block_removed", "block_remapped", "inode_changed_area"):
        db.execute(f"DROP TRIGGER {trigger}")
    db.execute("CREATE TABLE blocks_6 (inode INTEGER NOT NULL, blockno INTEGER NOT NULL, object INTEGER NOT NULL, "
               "tag BLOB, PRIMARY KEY (inode, blockno)) WITHOUT ROWID")
    db.execute("INSERT INTO blocks_6 SELECT inode, blockno, object, tag FROM blocks")
    db.execute("DROP TABLE blocks")
    db.execute("ALTER TABLE blocks_6 RENAME TO blocks")
    db.execute("CREATE INDEX blocks_object ON blocks(object)")
    db._run_script(_BLOCK_TRIGGERS)  # noqa: SLF001 (the same in version 6)
    db.set_meta("schema_version", 6)
    store.close()

    store = opener(cache_limit=0)
    assert store.db.get_meta("schema_version") == SCHEMA_VERSION
    assert _counters(store) == expected
    for ino, data in files.items():
        assert await store.read(ino, 0, 3 * BLOCK_SIZE) == data
        await store.write(ino, 5, b"patch")
        data[5:10] = b"patch"
    await store.sync()
    for ino, data in files.items():
        assert layers(store, ino, 0) == [0, 1]
        assert await store.read(ino, 0, 3 * BLOCK_SIZE) == data
    assert _counters(store) == _recomputed(store)
    assert (await check_store(store, repair=False)).clean


def _as_version_3(store):
    """Puts names, symlink targets and xattrs back in plaintext, and block map entries and
    digests unauthenticated, as tempfs kept them before schema version 4."""
    db, names, codec = store.db, store.names, store.blocks.codec
    db.execute("ALTER TABLE blocks DROP COLUMN tag")
    for object_id, digest, wrapped in db.execute("SELECT id, digest, wrapped_key FROM objects").fetchall():
        key = codec._unwrap_key(object_id, digest, wrapped)  # noqa: SLF001 (an old format, on purpose)
        db.execute("UPDATE objects SET wrapped_key=? WHERE id=?", (codec._wrap_key(object_id, b"", key), object_id))
    for entry_id, parent, name in db.execute("SELECT id, parent, name FROM entries").fetchall():
        db.execute("UPDATE entries SET name=? WHERE id=?", (names.plain_name(parent, name), entry_id))
    for ino, target in db.execute("SELECT id, target FROM inodes WHERE target IS NOT NULL").fetchall():
        db.execute("UPDATE inodes SET target=? WHERE id=?", (names.plain_target(ino, target), ino))
    for ino, name, value in db.execute("SELECT inode, name, value FROM xattrs").fetchall():
        db.execute("UPDATE xattrs SET name=?, value=? WHERE inode=? AND name=?",
                   (names.plain_xattr_name(ino, name), names.plain_xattr_value(ino, name, value), ino, name))
    db.commit()


def _store_bytes(path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file())


@trio_test
async def test_a_version_3_store_gets_its_names_targets_and_xattrs_encrypted(opener, tmp_path):
    store = opener()
    folder = leaf(store, "sessions/user_sessions")
    f = new_file(store, folder, b"user_session_MARKER42.json")
    store.set_xattr(f, b"user.owner", b"MARKER43 person")
    store.make(folder, b"link", stat.S_IFLNK | 0o777, UID, GID, target=b"/MARKER44/target")
    await store.write(f, 0, b"{}")
    await store.sync()
    _as_version_3(store)
    store.db.set_meta("schema_version", 3)
    store.close()
    assert b"MARKER42" in _store_bytes(tmp_path / "store")  # the old, plaintext store

    migrated = opener()
    assert migrated.db.get_meta("schema_version") == SCHEMA_VERSION
    assert migrated.lookup(folder, b"user_session_MARKER42.json") == f
    assert migrated.get_xattr(f, b"user.owner") == b"MARKER43 person"
    assert migrated.inode(migrated.lookup(folder, b"link")).target == b"/MARKER44/target"
    migrated.blocks._clean.clear()  # noqa: SLF001 (read from the object, with its key re-wrapped)
    assert await migrated.read(f, 0, 10) == b"{}"
    migrated.close()
    on_disk = _store_bytes(tmp_path / "store")
    for marker in (b"MARKER42", b"MARKER43", b"MARKER44"):
        assert marker not in on_disk


def test_names_targets_and_xattrs_are_not_stored_in_plaintext(store, tmp_path):
    folder = leaf(store, "sessions/user_sessions")
    f = new_file(store, folder, b"sess_MARKER51")
    store.set_xattr(f, b"user.MARKER52", b"MARKER53")
    store.make(folder, b"MARKER54-link", stat.S_IFLNK | 0o777, UID, GID, target=b"MARKER55")
    sub = store.make(folder, b"MARKER56-dir", stat.S_IFDIR | 0o755, UID, GID).id
    store.rename(folder, b"sess_MARKER51", sub, b"moved_MARKER57")
    store.commit_now()
    assert [n for _, n, _ in store.children(sub)] == [b"moved_MARKER57"]
    assert store.xattr_names(f) == [b"user.MARKER52"]
    rows = store.db.execute("SELECT name FROM entries UNION ALL SELECT target FROM inodes WHERE target IS NOT NULL "
                            "UNION ALL SELECT name FROM xattrs UNION ALL SELECT value FROM xattrs").fetchall()
    assert len(rows) >= 8
    for (blob,) in rows:
        assert b"MARKER" not in bytes(blob)


def test_a_name_moved_to_another_folder_in_the_database_fails_authentication(store):
    a = leaf(store, "cache/data")
    b = leaf(store, "cache/images")
    f = new_file(store, a, b"frame.jpg")
    store.db.execute("UPDATE entries SET parent=? WHERE inode=?", (b, f))
    with pytest.raises(DamagedMetadata):
        store.children(b)
    assert store.lookup(b, b"frame.jpg") is None
    assert "<damaged name>" in store.path_of(f)


def test_a_symlink_target_or_xattr_swapped_between_inodes_fails_authentication(store):
    folder = leaf(store, "cache/data")
    one = store.make(folder, b"one", stat.S_IFLNK | 0o777, UID, GID, target=b"/a").id
    two = store.make(folder, b"two", stat.S_IFLNK | 0o777, UID, GID, target=b"/b").id
    store.db.execute("UPDATE inodes SET target=(SELECT target FROM inodes WHERE id=?) WHERE id=?", (one, two))
    with pytest.raises(DamagedMetadata):
        store.inode(two)
    store.set_xattr(one, b"user.k", b"v1")
    store.set_xattr(one, b"user.j", b"v2")
    k, j = store.names.xattr_name(one, b"user.k"), store.names.xattr_name(one, b"user.j")
    store.db.execute("UPDATE xattrs SET value=(SELECT value FROM xattrs WHERE name=?) WHERE name=?", (j, k))
    with pytest.raises(DamagedMetadata):
        store.get_xattr(one, b"user.k")


def test_ensure_folder(store):
    ino = store.ensure_folder("processing/face_recognition/frames", Kind.LEAF, 0o750, UID, GID)
    assert store.ensure_folder("processing/face_recognition/frames", Kind.LEAF, 0o750, UID, GID) == ino
    node = store.inode(ino)
    assert node.kind == Kind.LEAF and node.area == "processing" and node.is_dir
    assert stat.S_IMODE(node.mode) == 0o750
    assert store.path_of(ino) == "/processing/face_recognition/frames"
    p = store.lookup(ROOT_INODE, b"processing")
    assert store.inode(p).area == "processing"
    f = new_file(store, p, b"file")
    with pytest.raises(StoreOpenError):
        store.ensure_folder("processing/file", Kind.LEAF, 0o755, UID, GID)
    assert store.lookup(p, b"file") == f
    assert store.inode_count() == 5  # root, processing, face_recognition, frames, file


# ---- back-pressure ----------------------------------------------------------------------

async def _write_under_pressure(store: Store, f: int, data: bytes, chunk: int) -> int:
    """Writes `data` with the flusher running; returns the peak memory dirty blocks held."""
    peak = 0
    async with trio.open_nursery() as nursery:
        await nursery.start(store.blocks.run_flusher)
        for off in range(0, len(data), chunk):
            await store.write(f, off, data[off:off + chunk])
            peak = max(peak, store.blocks.held_bytes)
        nursery.cancel_scope.cancel()
    return peak


@pytest.mark.timeout(30)
@pytest.mark.parametrize("chunk", [256 * KiB, 5 * MiB])
@trio_test
async def test_dirty_limit_back_pressure_with_flusher(opener, chunk, monkeypatch):
    """A 5 MiB write against a 4-block dirty budget completes, never holds more than the budget,
    and reads back intact. The flusher's periodic wake-up is pushed out to an hour, so the
    write completes only if a writer waiting for room wakes the flusher itself (a lost
    wake-up hangs here until the timeout)."""
    monkeypatch.setattr("tempfs.store.blocks.FLUSH_AGE", 7200.0)
    store = opener(dirty_limit=4 * BLOCK_SIZE, cache_limit=0)
    assert store.blocks.dirty_limit == 4 * BLOCK_SIZE
    f = new_file(store, leaf(store), b"big")
    data = random.Random(12).randbytes(5 * MiB)
    peak = await _write_under_pressure(store, f, data, chunk)
    assert peak <= 4 * BLOCK_SIZE
    assert store.inode(f).size == len(data)
    await store.sync()
    assert not store.blocks.dirty and store.blocks.dirty_bytes == store.blocks.held_bytes == 0
    assert await store.read(f, 0, len(data) + 1) == data
    assert objects_rows(store) == len(data) // BLOCK_SIZE


@pytest.mark.timeout(30)
@trio_test
async def test_a_write_waiting_for_room_leaves_the_stored_block_as_it_was(opener, monkeypatch):
    """A whole-block write over a stored block, with the dirty budget too full for it by less
    than a block's overhead: while it waits for room, a reader still reads what is stored,
    and if it is cancelled there (a daemon ending) the block keeps its stored content. (A dirty
    block made for it before it had room held nothing yet: it read as zeros, and was stored
    as a hole.)"""
    monkeypatch.setattr("tempfs.store.blocks.FLUSH_AGE", 7200.0)
    store = opener(dirty_limit=8 * BLOCK_SIZE, cache_limit=0)
    folder = leaf(store)
    f, filler = new_file(store, folder, b"stored"), new_file(store, folder, b"filler")
    rng = random.Random(41)
    old, new = rng.randbytes(2 * BLOCK_SIZE), rng.randbytes(BLOCK_SIZE)
    await store.write(f, 0, old)
    await store.sync()
    # 7 dirty blocks holding all but half an overhead of 7 whole blocks: room for a new block,
    # not for a new block and its overhead
    await store.write(filler, 0, rng.randbytes(7 * BLOCK_SIZE - 7 * DIRTY_OVERHEAD - DIRTY_OVERHEAD // 2))
    assert store.blocks.held_bytes == 7 * BLOCK_SIZE - DIRTY_OVERHEAD // 2
    async with trio.open_nursery() as nursery:
        nursery.start_soon(store.write, f, BLOCK_SIZE, new)  # no flusher: it waits for ever
        await trio.testing.wait_all_tasks_blocked()
        assert await store.read(f, 0, 2 * BLOCK_SIZE + 1) == old
        nursery.cancel_scope.cancel()
    await store.sync()
    assert await store.read(f, 0, 2 * BLOCK_SIZE + 1) == old
    await store.write(f, BLOCK_SIZE, new)  # with room, as ever
    await store.sync()
    assert await store.read(f, 0, 2 * BLOCK_SIZE + 1) == old[:BLOCK_SIZE] + new


@pytest.mark.timeout(30)
@trio_test
async def test_small_files_count_at_what_they_hold_and_a_block_that_grows_waits_for_room(opener, monkeypatch):
    """90 new files of 4 KiB fit a dirty budget of 8 blocks (each holds about 5 KiB) and do not
    wake the flusher (FLUSH_AGE is an hour); the areas count each as a whole block. Then each
    grown to a whole block: past the budget, the writers wait for the flusher."""
    monkeypatch.setattr("tempfs.store.blocks.FLUSH_AGE", 7200.0)
    store = opener(dirty_limit=8 * BLOCK_SIZE, cache_limit=0)
    folder = leaf(store)
    rng = random.Random(23)
    files = {new_file(store, folder, b"f%d" % i): rng.randbytes(4096) for i in range(90)}
    async with trio.open_nursery() as nursery:
        await nursery.start(store.blocks.run_flusher)
        for ino, data in files.items():
            await store.write(ino, 0, data)
        await trio.sleep(0.05)  # the flusher's turn, were it woken
        assert len(store.blocks.dirty) == 90 and objects_rows(store) == 0
        assert store.blocks.held_bytes < 90 * 6 * KiB <= store.blocks.dirty_limit
        assert store.blocks.dirty_bytes == 90 * BLOCK_SIZE
        for ino in files:
            more = rng.randbytes(BLOCK_SIZE - 4096)
            await store.write(ino, 4096, more)
            files[ino] += more
            assert store.blocks.held_bytes <= store.blocks.dirty_limit
        nursery.cancel_scope.cancel()
    await store.sync()
    for ino, data in files.items():
        assert await store.read(ino, 0, BLOCK_SIZE + 1) == data


@pytest.mark.timeout(30)
@trio_test
async def test_small_writes_into_stored_blocks_count_at_what_they_hold_not_whole_blocks(opener, monkeypatch):
    """64 writes of 4 KiB into a stored file, each in a block of its own, fit a dirty budget of
    8 blocks: each holds about 5 KiB, and the flusher is not woken for them (FLUSH_AGE is
    an hour, so nothing else would store them). The areas still count each as a whole
    block, the most it may store. Past the budget a writer waits for the flusher."""
    monkeypatch.setattr("tempfs.store.blocks.FLUSH_AGE", 7200.0)
    blocks_in_file = 64
    store = opener(dirty_limit=8 * BLOCK_SIZE, cache_limit=0)
    f = new_file(store, leaf(store), b"frames.raw")
    data = bytearray(random.Random(21).randbytes(blocks_in_file * BLOCK_SIZE))
    rng = random.Random(22)
    async with trio.open_nursery() as nursery:
        await nursery.start(store.blocks.run_flusher)
        await store.write(f, 0, bytes(data))  # 8 blocks at a time: the writer wakes the flusher
        await store.sync()
        for b in range(blocks_in_file):
            at, piece = b * BLOCK_SIZE + rng.randrange(BLOCK_SIZE - 4096), rng.randbytes(4096)
            await store.write(f, at, piece)
            data[at:at + 4096] = piece
        await trio.sleep(0.05)  # the flusher's turn, were it woken
        assert len(store.blocks.dirty) == blocks_in_file and store.blocks.patches_stored == 0
        assert store.blocks.held_bytes < blocks_in_file * 6 * KiB <= store.blocks.dirty_limit // 2
        assert store.blocks.dirty_bytes == blocks_in_file * BLOCK_SIZE
        for b in range(blocks_in_file):  # each block rewritten whole: past the budget, writers wait
            piece = rng.randbytes(BLOCK_SIZE)
            await store.write(f, b * BLOCK_SIZE, piece)
            data[b * BLOCK_SIZE:(b + 1) * BLOCK_SIZE] = piece
            assert store.blocks.held_bytes <= store.blocks.dirty_limit
        nursery.cancel_scope.cancel()
    await store.sync()
    assert store.blocks.held_bytes == 0
    assert await store.read(f, 0, len(data)) == data


@pytest.mark.timeout(30)
@trio_test
async def test_under_pressure_the_flusher_stores_the_overlays_holding_most_and_keeps_the_others(opener, monkeypatch):
    """Overlays on a stored file: 8 blocks with 4 writes each, then 90 with one each, past half
    of a dirty budget of 8 blocks. Woken by that pressure (no block is old enough), the flusher
    stores the 8 largest overlays and only as many small ones as bring what is held down to
    PRESSURE_LEFT of half the budget: the others stay in memory to take more writes."""
    monkeypatch.setattr("tempfs.store.blocks.FLUSH_AGE", 7200.0)
    monkeypatch.setattr("tempfs.store.blocks.OVERLAY_AGE", 7200.0)
    heavy, light = range(8), range(8, 98)
    store = opener(dirty_limit=8 * BLOCK_SIZE, cache_limit=0)
    f = new_file(store, leaf(store), b"frames.raw")
    data = bytearray(random.Random(31).randbytes((len(heavy) + len(light)) * BLOCK_SIZE))
    rng = random.Random(32)
    async with trio.open_nursery() as nursery:
        await nursery.start(store.blocks.run_flusher)
        await store.write(f, 0, bytes(data))
        await store.sync()
        for b in [*heavy] * 4 + [*light]:
            at = b * BLOCK_SIZE + rng.randrange(BLOCK_SIZE // 8192) * 8192  # never adjacent: merged only if equal
            piece = rng.randbytes(4096)
            await store.write(f, at, piece)
            data[at:at + 4096] = piece
        await trio.sleep(0.05)  # the flusher's turn
        dirty = {blockno for _, blockno in store.blocks.dirty}
        assert not dirty & set(heavy)
        assert len(dirty) >= len(light) * 2 // 3
        assert store.blocks.held_bytes <= store.blocks.dirty_limit // 2 * PRESSURE_LEFT
        nursery.cancel_scope.cancel()
    await store.sync()
    assert await store.read(f, 0, len(data)) == data


@pytest.mark.timeout(30)
@trio_test
async def test_an_overlay_waits_longer_than_a_whole_block_before_it_is_stored(opener, monkeypatch):
    """With no pressure, a new file's block is stored once FLUSH_AGE old; a change to part of a
    stored block waits for OVERLAY_AGE, so that more changes land in the same patch."""
    monkeypatch.setattr("tempfs.store.blocks.FLUSH_AGE", 0.05)
    monkeypatch.setattr("tempfs.store.blocks.OVERLAY_AGE", 7200.0)
    store = opener()
    folder = leaf(store)
    stored, new = new_file(store, folder, b"stored"), new_file(store, folder, b"new")
    await store.write(stored, 0, random.Random(33).randbytes(BLOCK_SIZE))
    await store.sync()
    async with trio.open_nursery() as nursery:
        await nursery.start(store.blocks.run_flusher)
        await store.write(stored, 4096, b"x" * 4096)
        await store.write(new, 0, b"y" * 4096)
        with trio.fail_after(10):
            while (new, 0) in store.blocks.dirty:
                await trio.sleep(0.01)
        await trio.sleep(0.1)  # a few more of the flusher's rounds
        assert set(store.blocks.dirty) == {(stored, 0)}
        monkeypatch.setattr("tempfs.store.blocks.OVERLAY_AGE", 0.05)
        with trio.fail_after(10):
            while store.blocks.dirty:
                await trio.sleep(0.01)
        assert store.blocks.patches_stored == 1
        nursery.cancel_scope.cancel()
    assert await store.read(stored, 4096, 4096) == b"x" * 4096


# ---- bugs found -------------------------------------------------------------------------

def _gate_first_object_read(store: Store):
    """Holds the next object read (in its worker thread) until the test releases it, so the
    test can interleave another operation with a read in flight, as concurrent FUSE requests do.
    Returns (entered, release) threading events."""
    import threading
    entered, release = threading.Event(), threading.Event()
    real_read = store.objects.read

    def gated_read(object_id):
        store.objects.read = real_read
        entered.set()
        release.wait(10)
        return real_read(object_id)

    store.objects.read = gated_read
    return entered, release


def test_unreadable_metadata_is_a_store_open_error(opener):
    opener.path.mkdir()
    (opener.path / "meta.sqlite").write_bytes(random.Random(1).randbytes(8192))
    with pytest.raises(StoreOpenError):
        opener()


@trio_test
async def test_unreadable_metadata_releases_the_lock(opener):
    opener.path.mkdir()
    (opener.path / "meta.sqlite").write_bytes(random.Random(1).randbytes(8192))
    with pytest.raises(Exception):
        opener()
    (opener.path / "meta.sqlite").unlink()
    opener()  # not StoreLockedError


def test_interrupted_creation_is_not_a_wrong_key(opener):
    from tempfs.store.db import Database
    opener.path.mkdir()
    db = Database(opener.path / "meta.sqlite")
    db.create_schema()
    db.conn.close()  # the process died before the creation committed
    try:
        store = opener()
    except StoreOpenError as e:
        assert not isinstance(e, WrongKeyError), str(e)
    else:
        assert store.inode(ROOT_INODE).is_dir


def test_a_failed_pack_sync_keeps_the_packs_pending(tmp_path, monkeypatch):
    from tempfs.store.packs import PackFiles
    packs = PackFiles(tmp_path / "packs")
    where = [packs.append(b"sealed %d" % i, stream) for i, stream in enumerate(["a", "b", "a"])]
    packs.settle(p for p, _ in where)
    assert len({p for p, _ in where}) == 2 and [o for _, o in where] == [0, 0, 8]
    real_fsync, calls = os.fsync, []

    def failing_fsync(fd):
        calls.append(fd)
        raise OSError(errno.EIO, "I/O error")
    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError):
        packs.sync()
    assert len(calls) == 1 and packs._unsynced == {p for p, _ in where}  # noqa: SLF001 (tried again next time)
    monkeypatch.setattr(os, "fsync", real_fsync)
    packs.sync()
    assert not packs._unsynced  # noqa: SLF001
    assert packs.read(where[2][0], 8, 8) == b"sealed 2"
    with pytest.raises(OSError):
        packs.read(where[2][0], 8, 9)  # past its end


def test_a_pack_that_cannot_be_started_fails_the_append_and_the_next_starts_afresh(tmp_path, monkeypatch):
    from tempfs.store import packs as packs_module
    monkeypatch.setattr(packs_module, "PACK_MAX", 16)
    packs = packs_module.PackFiles(tmp_path / "packs")
    first, _ = packs.append(b"x" * 10, "a")
    real_open = os.open

    def disk_full(path, flags, *args):
        if flags & os.O_EXCL:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_open(path, flags, *args)
    monkeypatch.setattr(os, "open", disk_full)
    with pytest.raises(OSError):
        packs.append(b"y" * 10, "a")  # the pack is full and no new one can be made
    monkeypatch.setattr(os, "open", real_open)
    second, offset = packs.append(b"y" * 10, "a")
    assert second != first and offset == 0
    packs.settle([first, second])
    monkeypatch.setattr(os, "open", disk_full)
    with pytest.raises(OSError):
        packs.append_many([b"z" * 4, b"z" * 10], "a")  # the first fits in `second`, the next needs a new pack
    monkeypatch.setattr(os, "open", real_open)
    assert not packs.busy(second)  # the batch gave back what it had reserved there
    packs.close()
    assert packs.read(first, 0, 10) == b"x" * 10 and packs.read(second, 0, 10) == b"y" * 10
    assert not packs.busy(first) and not packs.busy(second)


def test_a_durable_commit_leaves_the_fsync_of_its_log_to_the_work_it_returns(tmp_path, monkeypatch):
    db = Database(tmp_path / "m.sqlite")
    synced = []
    monkeypatch.setattr(Database, "_fsync", staticmethod(synced.append))
    db.conn.execute("CREATE TABLE t (v BLOB)")
    after = db.commit_deferred(durable=True)  # on the daemon's request thread...
    assert synced == []
    after()  # ...and this in a worker, before the fsync(2) that asked for it is answered
    assert synced == [tmp_path / "m.sqlite-wal"]
    db.commit(durable=True)
    assert len(synced) == 2
    db.close()


@pytest.mark.parametrize("flushed", [1, SYNC_ROUNDS])
@trio_test
async def test_a_durable_commit_covers_the_pack_bytes_of_rows_added_while_it_waited_for_their_fsync(
        opener, monkeypatch, flushed):
    """The flusher runs while a durable commit waits for the packs' fsync: the rows it adds meanwhile join
    that commit, so their bytes must be synced by it too, or a power cut leaves rows pointing at nothing.
    `flushed`: how many of the commit's waits see a block stored (at SYNC_ROUNDS, every one: the last
    sync, which does not wait, takes the rest)."""
    from tempfs.store import packs as packs_module
    store = opener()
    folder = leaf(store)
    files = [new_file(store, folder, b"f%d" % i) for i in range(flushed + 1)]
    synced: dict[str, int] = {}  # pack file -> its size at its last fsync
    real_fsync = os.fsync

    def recorded_fsync(fd: int) -> None:
        real_fsync(fd)
        synced[os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))] = os.fstat(fd).st_size
    monkeypatch.setattr(packs_module.os, "fsync", recorded_fsync)
    real_sync, waiting = store.packs.sync, files[1:]
    token = trio.lowlevel.current_trio_token()

    def sync_while_the_flusher_runs() -> None:
        real_sync()
        if waiting and threading.current_thread() is not threading.main_thread():  # a wait, not the last sync
            trio.from_thread.run(store.blocks.flush_inode, waiting.pop(0), trio_token=token)
    monkeypatch.setattr(store.packs, "sync", sync_while_the_flusher_runs)
    for ino in files:
        await store.write(ino, 0, os.urandom(BLOCK_SIZE))
    await store.blocks.flush_inode(files[0])
    await store.commit(durable=True)
    assert not waiting
    rows = list(store.db.execute("SELECT pack, offset + stored_size FROM objects WHERE pack IS NOT NULL"))
    assert len(rows) == flushed + 1
    for pack, end in rows:
        assert synced.get(store.packs.path(pack).name, 0) >= end


@trio_test
async def test_new_objects_take_ids_in_order_from_a_random_start_and_one_taken_already_is_passed(opener):
    """In order, a flush's rows share the pages of the objects table; a random start per daemon keeps
    the ids a crashed one may have sealed into packs untaken. An id found taken is not an error."""
    store = opener()
    folder = leaf(store)
    first, second = new_file(store, folder, b"first"), new_file(store, folder, b"second")
    blocks = [os.urandom(BLOCK_SIZE) for _ in range(4)]
    await store.write(first, 0, b"".join(blocks[:3]))
    await store.sync()
    ids = sorted(object_ids(store))
    assert len(ids) == 3 and ids == list(range(ids[0], ids[0] + 3))
    reopened = opener(opener.tmp_path / "other")
    await reopened.write(new_file(reopened, leaf(reopened), b"f"), 0, blocks[0])
    await reopened.sync()
    assert abs(next(iter(object_ids(reopened))) - ids[0]) > 1 << 20  # another start
    store.blocks._next_id = ids[0]  # noqa: SLF001 (as if another start met these ids)
    await store.write(second, 0, blocks[3])
    await store.sync()
    assert object_ids(store) == {*ids, ids[0] + 3}  # the three taken were passed
    assert await store.read(second, 0, BLOCK_SIZE) == blocks[3]
    assert await store.read(first, 0, 3 * BLOCK_SIZE) == b"".join(blocks[:3])
    assert (await check_store(store, repair=False)).clean
