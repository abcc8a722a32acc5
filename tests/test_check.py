"""The whole-store check: `check_store` on real stores (real SQLite, real object files, real
codec), and `tempfs fsck` through the command line.

Stores are built with the Store API, damaged offline (files removed or altered, SQLite edited
directly), then checked. The online case runs the check in the same trio loop as writers, the
flusher and the committer, as the daemon does.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import stat
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from conftest import run_tempfs, store_sql
from tempfs.codec import MASTER_KEY_BYTES, ContentCodec
from tempfs.layout import Kind
from tempfs.names import MetadataCipher
from tempfs.store import BlockReadError, Store, check
from tempfs.store.check import CheckReport, check_store
from tempfs.store.objects import ObjectFiles
from tempfs.store.packs import PackFiles
from tempfs.store.store import BLOCK_SIZE

UID, GID = os.getuid(), os.getgid()
FILE = stat.S_IFREG | 0o644
DIR = stat.S_IFDIR | 0o755
LEAF = "processing/face_recognition/frames"
MiB = 1024 * 1024

OK, LOCKED, REPAIRED, DAMAGED = 0, 5, 9, 10


# ---- building stores ----------------------------------------------------------------------

def run(async_fn, *args, **kwargs):
    async def main():
        with trio.fail_after(60):
            return await async_fn(*args, **kwargs)
    return trio.run(main)


def open_store(path: Path, key: bytes, **limits) -> Store:
    return Store(path, ContentCodec(key), dirty_limit=limits.get("dirty_limit", 64 * MiB),
                 cache_limit=limits.get("cache_limit", 0))


def leaf(store: Store, path: str = LEAF) -> int:
    parts = path.split("/")
    for i in range(1, len(parts)):
        store.ensure_folder("/".join(parts[:i]), Kind.BRANCH, 0o755, UID, GID)
    return store.ensure_folder(path, Kind.LEAF, 0o755, UID, GID)


@dataclass
class Built:
    """A closed store holding a few files, and what they hold."""
    root: Path          # TEMPFS_ROOT: data/.tempfs-store and config/tempfs.key below it
    path: Path
    key: bytes
    key_file: Path
    inodes: dict[str, int]
    data: dict[str, bytes]

    def open(self, **limits) -> Store:
        return open_store(self.path, self.key, **limits)

    def sql(self, statement: str, args=()) -> list[tuple]:
        """Runs SQL on the closed store's database, as an outside edit."""
        return store_sql(self.path, statement, args)

    def object_of(self, name: str, blockno: int) -> int:
        return self.sql("SELECT object FROM blocks WHERE inode=? AND blockno=?", (self.inodes[name], blockno))[0][0]

    def stored_name(self, parent: int, name: bytes) -> bytes:
        """A name as tempfs stores it in folder `parent` (encrypted)."""
        return MetadataCipher(ContentCodec(self.key).metadata_key).name(parent, name)

    def object_path(self, object_id: int) -> Path:
        """The file an object would have of its own (stores before schema 6)."""
        (levels,), = self.sql("SELECT value FROM meta WHERE key='object_levels'")
        return ObjectFiles(self.path / "objects", levels).path(object_id)

    def stored_at(self, object_id: int) -> tuple[Path, int, int]:
        """The pack holding an object, and its offset and size there."""
        (pack, offset, size), = self.sql("SELECT pack, offset, stored_size FROM objects WHERE id=?", (object_id,))
        return self.path / "packs" / f"{pack:016x}", offset, size

    def sealed(self, object_id: int) -> bytes:
        path, offset, size = self.stored_at(object_id)
        return path.read_bytes()[offset:offset + size]

    def put_sealed(self, object_id: int, sealed: bytes) -> None:
        path, offset, _size = self.stored_at(object_id)
        with open(path, "r+b") as f:
            f.seek(offset)
            f.write(sealed)

    def fsck(self, *args: str):
        return run_tempfs("fsck", *args, cwd=self.root, env={"TEMPFS_ROOT": str(self.root)})


@pytest.fixture
def built(tmp_path) -> Built:
    root = tmp_path / "project"
    key = os.urandom(MASTER_KEY_BYTES)
    key_file = root / "config" / "tempfs.key"
    key_file.parent.mkdir(parents=True)
    key_file.write_text(key.hex() + "\n")
    key_file.chmod(0o600)
    b = Built(root, root / "data" / ".tempfs-store", key, key_file, {}, {})
    store = b.open()
    try:
        run(_fill, store, b)
    finally:
        store.close()
    return b


async def _fill(store: Store, b: Built) -> None:
    rng = random.Random(5)
    folder = leaf(store)
    sub = store.make(folder, b"sub", DIR, UID, GID).id
    b.data["f"] = rng.randbytes(3 * BLOCK_SIZE + 100)
    b.data["g"] = b.data["f"][:BLOCK_SIZE] + rng.randbytes(5000)   # shares its first block with f
    b.data["sub/h"] = b"frame features 0.125 0.250\n" * 4000        # compressible
    for name, data in b.data.items():
        parent, leafname = (sub, name[4:]) if name.startswith("sub/") else (folder, name)
        b.inodes[name] = store.make(parent, leafname.encode(), FILE, UID, GID).id
        await store.write(b.inodes[name], 0, data)
    store.link(b.inodes["sub/h"], folder, b"h-link")
    b.inodes["folder"], b.inodes["sub"] = folder, sub
    await store.sync()


def counters(store_or_built) -> dict:
    """Every accounting counter, as stored."""
    q = store_or_built.sql if isinstance(store_or_built, Built) else (
        lambda s, a=(): store_or_built.db.execute(s, a).fetchall())
    return {"inodes": q("SELECT id, stored_bytes FROM inodes ORDER BY id"),
            "area_objects": q("SELECT area, object, refs FROM area_objects ORDER BY area, object"),
            "area_usage": [r for r in q("SELECT area, stored_bytes FROM area_usage ORDER BY area") if r[1]],
            "totals": q("SELECT name, value FROM totals ORDER BY name")}


def snapshot(folder: Path) -> dict:
    """Every file below a folder: mode, size and content hash."""
    return {str(p.relative_to(folder)): (p.stat().st_mode, p.stat().st_size, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(folder.rglob("*")) if p.is_file()}


def check_offline(b: Built, **options) -> CheckReport:
    store = b.open()
    try:
        return run(check_store, store, **options)
    finally:
        store.close()


def text(result) -> str:
    return result.stdout + result.stderr


# ---- a clean store ------------------------------------------------------------------------

def test_clean_store_is_clean(built):
    progress = []
    store = built.open()
    try:
        report = run(check_store, store, progress=lambda done, total: progress.append((done, total)))
        n, size = store.db.one("SELECT COUNT(*), SUM(stored_size) FROM objects")
    finally:
        store.close()
    assert report.clean and report.repaired == [] and report.damaged == [] and report.warnings == []
    assert report.objects_checked == n == 6  # f: 4 blocks, g: 1 more (its first is f's), h: 1
    assert report.bytes_checked == size
    assert report.finished_ns >= report.started_ns > 0
    assert progress and progress[-1] == (n, n)
    assert [d for d, _ in progress] == sorted(d for d, _ in progress)
    assert report.to_dict()["clean"] is True

    result = built.fsck()  # every path from TEMPFS_ROOT's defaults
    assert result.returncode == OK, text(result)
    assert "6 objects checked" in result.stdout and "result: clean" in result.stdout
    quick = built.fsck("--quick", "--json")
    assert quick.returncode == OK, text(quick)
    doc = json.loads(quick.stdout)
    assert doc["clean"] and doc["objects_checked"] == 6 and doc["bytes_checked"] == 0


def test_a_store_left_by_a_mount_is_clean(make_mount):
    m = make_mount()
    (m.path(LEAF) / "a.bin").write_bytes(os.urandom(300_000))
    (m.path("cache/models") / "model.bin").write_bytes(b"weights " * 50_000)
    os.mkdir(m.path(LEAF) / "deep")
    os.link(m.path(LEAF) / "a.bin", m.path(LEAF) / "deep" / "b.bin")
    os.unlink(m.path(LEAF) / "a.bin")
    assert m.stop()
    result = run_tempfs("fsck", "--store", m.store, "--key-file", m.key_file, "--config", m.config, cwd=m.base)
    assert result.returncode == OK, text(result)
    assert "result: clean" in result.stdout


# ---- damage that cannot be repaired -------------------------------------------------------

def test_a_missing_pack_is_damage_naming_the_files(built):
    object_id = built.object_of("f", 2)
    built.stored_at(object_id)[0].unlink()
    result = built.fsck()
    assert result.returncode == DAMAGED, text(result)
    damaged = result.stdout.split("damaged:")[1]
    assert f"/{LEAF}/f (block 2)" in damaged and f"{object_id:016x}" in damaged and "missing" in damaged
    # nothing was turned into zeros or forgotten: the block still maps to its object
    assert built.object_of("f", 2) == object_id
    assert built.sql("SELECT refcount FROM objects WHERE id=?", (object_id,)) == [(1,)]
    # --quick sees it too (the pack is not there), and a second run still reports it
    assert built.fsck("--quick").returncode == DAMAGED
    again = built.fsck("--json")
    assert again.returncode == DAMAGED
    assert any(f"/{LEAF}/f (block 2)" in line for line in json.loads(again.stdout)["damaged"])


def test_a_name_moved_to_another_folder_outside_tempfs_is_damage(built):
    built.sql("UPDATE entries SET parent=? WHERE inode=?", (built.inodes["sub"], built.inodes["g"]))
    result = built.fsck("--quick")
    assert result.returncode == DAMAGED, text(result)
    damaged = result.stdout.split("damaged:")[1]
    assert f"inode {built.inodes['g']}" in damaged and "fails authentication" in damaged
    assert built.sql("SELECT parent FROM entries WHERE inode=?", (built.inodes["g"],)) == [(built.inodes["sub"],)]


def test_corrupted_object_is_damage_naming_every_file_using_it(built):
    shared = built.object_of("f", 0)
    assert built.object_of("g", 0) == shared  # deduplicated
    blob = bytearray(built.sealed(shared))
    blob[len(blob) // 2] ^= 0x04
    built.put_sealed(shared, bytes(blob))
    report = check_offline(built)
    assert len(report.damaged) == 1 and report.repaired == []
    line = report.damaged[0]
    assert f"/{LEAF}/f (block 0)" in line and f"/{LEAF}/g (block 0)" in line and "corrupt" in line
    assert built.sealed(shared) == bytes(blob)  # left as it is
    # the quick check reads no content: same size, so it cannot tell
    assert check_offline(built, verify_content=False).clean


def test_a_corrupted_inline_object_is_damage_naming_its_file(built):
    """A small object lives in its row (objects.data): the check authenticates it there."""
    tail = built.object_of("g", 1)  # g's 5000-byte tail: kept inline
    (blob,), = built.sql("SELECT data FROM objects WHERE id=?", (tail,))
    assert blob is not None and built.sql("SELECT pack FROM objects WHERE id=?", (tail,)) == [(None,)]
    altered = blob[:-1] + bytes([blob[-1] ^ 0x01])
    built.sql("UPDATE objects SET data=? WHERE id=?", (altered, tail))
    report = check_offline(built)
    assert len(report.damaged) == 1 and report.repaired == []
    assert f"/{LEAF}/g (block 1)" in report.damaged[0] and "corrupt" in report.damaged[0]
    assert built.sql("SELECT data FROM objects WHERE id=?", (tail,)) == [(altered,)]  # left as it is


def test_block_of_a_missing_object_is_damage_and_stays(built):
    object_id = built.object_of("g", 1)
    built.sql("DELETE FROM objects WHERE id=?", (object_id,))
    result = built.fsck()
    assert result.returncode == DAMAGED, text(result)
    assert f"/{LEAF}/g (block 1): lost, object {object_id:016x} is missing from the object table" in result.stdout
    assert built.object_of("g", 1) == object_id
    assert built.fsck().returncode == DAMAGED


# ---- repairs ------------------------------------------------------------------------------

def test_orphan_packs_and_object_files_are_removed(built):
    orphan_id = 0x1234_5678_9ABC_DEF0
    sealed, _wrapped = ContentCodec(built.key).seal(orphan_id, b"written, never committed" * 100)
    orphan = built.object_path(orphan_id)
    orphan.parent.mkdir(parents=True, exist_ok=True)
    orphan.write_bytes(sealed)
    stray = built.path / "objects" / "notes.txt"
    stray.write_text("not an object")
    live = set((built.path / "packs").iterdir())
    orphan_pack = built.path / "packs" / "0000000000abcdef"  # appended to, never committed
    orphan_pack.write_bytes(sealed * 2)
    result = built.fsck()
    assert result.returncode == REPAIRED, text(result)
    assert f"1 object files ({len(sealed)} bytes) belonged to no object" in result.stdout
    assert f"1 packs ({2 * len(sealed)} bytes) held no live object" in result.stdout
    assert not orphan.exists() and set((built.path / "packs").iterdir()) == live
    assert "notes.txt: not an object file" in result.stdout and stray.exists()  # reported only
    second = built.fsck()
    assert second.returncode == OK, text(second)
    assert "result: clean" in second.stdout


def test_wrong_refcount_and_counters_are_repaired(built):
    right = counters(built)
    shared = built.object_of("f", 0)
    other = built.object_of("f", 3)
    built.sql("UPDATE objects SET refcount=7 WHERE id=?", (shared,))
    built.sql("UPDATE objects SET refcount=0 WHERE id=?", (other,))
    built.sql("UPDATE area_usage SET stored_bytes = stored_bytes + 4096")
    built.sql("UPDATE inodes SET stored_bytes = 1 WHERE id=?", (built.inodes["g"],))
    built.sql("UPDATE totals SET value = value + 3 WHERE name='objects'")
    result = built.fsck()
    assert result.returncode == REPAIRED, text(result)
    out = result.stdout
    assert f"object {shared:016x} has refcount 7 but 2 blocks use it: corrected" in out
    assert f"object {other:016x} has refcount 0 but 1 block uses it: corrected" in out
    assert "accounting counters differ" in out
    for name in ("inodes.stored_bytes of 1 inodes", "totals.objects", "area_usage of processing"):
        assert name in out
    assert counters(built) == right
    assert built.sql("SELECT refcount FROM objects WHERE id IN (?, ?) ORDER BY id=?", (shared, other, other)) \
        == [(2,), (1,)]
    assert built.fsck().returncode == OK


def test_unreferenced_object_is_dropped(built):
    object_id = built.object_of("f", 3)
    built.sql("DELETE FROM blocks WHERE inode=? AND blockno=3", (built.inodes["f"],))  # triggers keep counters
    report = check_offline(built)
    assert any(f"object {object_id:016x}" in line and "used by no block" in line and "dropped" in line
               for line in report.repaired), report.repaired
    assert report.damaged == []
    assert built.sql("SELECT COUNT(*) FROM objects WHERE id=?", (object_id,)) == [(0,)]
    assert check_offline(built).clean


def test_stored_size_is_repaired(built):
    object_id = built.object_of("sub/h", 0)
    built.sql("UPDATE objects SET stored_size = stored_size + 10 WHERE id=?", (object_id,))
    report = check_offline(built)
    assert report.damaged == []
    joined = "\n".join(report.repaired)
    assert "recorded size corrected" in joined
    assert "accounting counters" not in joined  # they counted the size on disk all along
    assert check_offline(built).clean


def test_an_edited_digest_is_damage_and_never_lets_a_write_deduplicate_onto_wrong_content(built):
    object_id = built.object_of("sub/h", 0)
    other = b"content that is not in the store yet " * 1000
    built.sql("UPDATE objects SET digest=? WHERE id=?", (ContentCodec(built.key).digest(other), object_id))
    store = built.open()
    try:  # a write of `other` finds the edited digest and maps onto sub/h's object ...
        victim = store.make(built.inodes["folder"], b"victim", FILE, UID, GID).id
        run(store.write, victim, 0, other)
        run(store.sync)
        assert store.db.one("SELECT object FROM blocks WHERE inode=?", (victim,))[0] == object_id
        with pytest.raises(BlockReadError):  # ... but reading it fails instead of showing sub/h's content
            run(store.read, victim, 0, len(other))
    finally:
        store.close()
    report = check_offline(built)
    assert any(f"{object_id:016x}" in line and "/victim" in line for line in report.damaged), report.damaged


def test_a_block_pointed_at_another_files_object_is_damage_and_never_read(built):
    theirs = built.object_of("sub/h", 0)
    built.sql("UPDATE objects SET refcount=refcount+1 WHERE id=?", (theirs,))
    built.sql("UPDATE blocks SET object=? WHERE inode=? AND blockno=1", (theirs, built.inodes["f"]))
    store = built.open()
    try:
        with pytest.raises(BlockReadError):
            run(store.read, built.inodes["f"], BLOCK_SIZE, 100)
        assert run(store.read, built.inodes["f"], 0, 100) == built.data["f"][:100]  # other blocks read
    finally:
        store.close()
    report = check_offline(built)
    assert any(f"/{LEAF}/f (block 1)" in line and "fails authentication" in line for line in report.damaged), \
        report.damaged


def test_tree_problems_are_repaired(built):
    folder, sub = built.inodes["folder"], built.inodes["sub"]
    built.sql("INSERT INTO entries(parent, name, inode) VALUES (?, ?, 424242)", (folder, built.stored_name(folder, b"ghost")))
    built.sql("UPDATE inodes SET nlink=9 WHERE id=?", (folder,))
    built.sql("UPDATE inodes SET nlink=1 WHERE id=?", (built.inodes["sub/h"],))  # it has two names
    # a folder with a file in it that lost its own name: both are unreachable
    lost = built.sql("INSERT INTO inodes(mode, uid, gid, nlink, atime_ns, mtime_ns, ctime_ns, area) "
                     "VALUES (?, 0, 0, 2, 0, 0, 0, 'processing') RETURNING id", (DIR,))[0][0]
    built.sql("UPDATE entries SET parent=?, name=? WHERE inode=?", (lost, built.stored_name(lost, b"g"), built.inodes["g"]))
    g_objects = {built.object_of("g", 1)}  # its own (its first block is f's)
    result = built.fsck()
    assert result.returncode == REPAIRED, text(result)
    out = result.stdout
    assert f"/{LEAF}/ghost names inode 424242, which does not exist: name removed" in out
    assert f"/{LEAF} has link count 9, expected 3: corrected" in out
    assert f"/{LEAF}/h-link has link count 1, expected 2: corrected" in out \
        or f"/{LEAF}/sub/h has link count 1, expected 2: corrected" in out
    assert "unreachable" in out
    assert built.sql("SELECT COUNT(*) FROM entries WHERE inode=424242") == [(0,)]
    assert built.sql("SELECT nlink FROM inodes WHERE id IN (?, ?) ORDER BY id", (folder, built.inodes["sub/h"])) \
        == [(3,), (2,)]
    assert built.sql("SELECT COUNT(*) FROM inodes WHERE id IN (?, ?)", (lost, built.inodes["g"])) == [(0,)]
    assert built.sql(f"SELECT COUNT(*) FROM objects WHERE id IN ({','.join('?' * len(g_objects))})",
                     tuple(g_objects)) == [(0,)]                          # its content went with it
    assert built.sealed(built.object_of("f", 0))                         # the block it shared did not
    assert built.fsck().returncode == OK
    store = built.open()
    try:
        assert run(store.read, built.inodes["f"], 0, len(built.data["f"])) == built.data["f"]
    finally:
        store.close()


def test_no_repair_changes_nothing(built):
    built.sql("UPDATE objects SET refcount=3 WHERE id=?", (built.object_of("f", 1),))
    built.sql("INSERT INTO entries(parent, name, inode) VALUES (?, ?, 424242)",
              (built.inodes["folder"], built.stored_name(built.inodes["folder"], b"ghost")))
    built.sql("UPDATE area_usage SET stored_bytes = 1")
    orphan = built.object_path(0x0777_0000_0000_0001)
    orphan.parent.mkdir(parents=True, exist_ok=True)
    orphan.write_bytes(b"x" * 100)
    before = snapshot(built.path)
    result = built.fsck("--no-repair")
    assert result.returncode == DAMAGED, text(result)
    assert snapshot(built.path) == before
    assert "repaired:" not in result.stdout
    damaged = result.stdout.splitlines()
    for words in ("has refcount 3", "ghost", "accounting counters differ", "1 object files (100 bytes)"):
        assert any(words in line and line.endswith("(not repaired)") for line in damaged), (words, result.stdout)
    assert built.fsck().returncode == REPAIRED
    assert built.fsck().returncode == OK


# ---- refusals ------------------------------------------------------------------------------

def test_locked_store_is_refused(built):
    store = built.open()  # holds the lock, as a mounted daemon does
    try:
        before = snapshot(built.path)
        result = built.fsck()
        assert result.returncode == LOCKED, text(result)
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and "in use" in lines[0]
        assert snapshot(built.path) == before
    finally:
        store.close()


def test_missing_store_and_key_are_refused(built, tmp_path):
    result = run_tempfs("fsck", "--store", tmp_path / "nothing", "--key-file", built.key_file, cwd=tmp_path)
    assert result.returncode == 2 and "no tempfs store" in result.stderr
    assert not (tmp_path / "nothing").exists()  # not created
    result = built.fsck("--key-file", str(tmp_path / "missing.key"))
    assert result.returncode == 4 and "key file not found" in result.stderr
    wrong = tmp_path / "wrong.key"
    wrong.write_text(os.urandom(MASTER_KEY_BYTES).hex())
    wrong.chmod(0o600)
    result = built.fsck("--key-file", str(wrong))
    assert result.returncode == 4 and "key" in result.stderr


# ---- online: the check runs beside writers, the flusher and the committer -----------------

def test_online_check_beside_writes_reports_nothing_and_removes_nothing_in_flight(tmp_path, monkeypatch):
    key = os.urandom(MASTER_KEY_BYTES)
    store = open_store(tmp_path / "store", key, dirty_limit=8 * BLOCK_SIZE)
    in_flight_listed, moved = [], []
    real_append, real_list, real_differ = PackFiles.append, PackFiles.sizes, check._sums_differ

    def slow_append(self, data, stream):  # appends stay unsettled, on disk, for a while
        where = real_append(self, data, stream)
        time.sleep(0.003)
        return where

    def listing(self):
        packs, strays = real_list(self)
        in_flight_listed.append(sum(1 for p in packs if self.busy(p)))
        return packs, strays

    def sums_differ(*args):  # the totals moved between chunks (the check must confirm, not repair)
        wrong = real_differ(*args)
        moved.append(bool(wrong))
        return wrong

    monkeypatch.setattr(PackFiles, "append", slow_append)
    monkeypatch.setattr(PackFiles, "sizes", listing)
    monkeypatch.setattr(check, "_sums_differ", sums_differ)
    for name, small in (("OBJECTS_PER_RANGE", 4), ("INODES_PER_CHUNK", 3), ("ENTRIES_PER_CHUNK", 3),
                        ("VERIFY_BATCH", 4), ("ORPHAN_GRACE", 0.01)):  # many chunks: the store changes between them
        monkeypatch.setattr(check, name, small)
    try:
        model = run(_online, store, in_flight_listed, moved)
        store.close()
        store = open_store(tmp_path / "store", key)
        for ino, data in model.items():
            assert run(store.read, ino, 0, len(data) + 1) == data
        assert run(check_store, store).clean
    finally:
        store.close()
    assert sum(in_flight_listed) > 0, "no check saw a pack being appended to"
    assert any(moved), "the store never changed between the chunks of a check"


async def _online(store: Store, in_flight_listed: list, moved: list) -> dict[int, bytes]:
    folder = leaf(store)
    model: dict[int, bytes] = {}
    reports: list[CheckReport] = []
    rng = random.Random(7)
    handed: list[int] = []  # stored files for the deleter: objects are dropped all along
    async with trio.open_nursery() as nursery:
        await nursery.start(store.blocks.run_flusher)
        await nursery.start(store.run_committer)
        for i in range(60):
            handed.append(store.make(folder, f"stored-{i}".encode(), FILE, UID, GID).id)
            model[handed[-1]] = rng.randbytes(BLOCK_SIZE // 2)
            await store.write(handed[-1], 0, model[handed[-1]])
        await store.sync()
        async with trio.open_nursery() as writers:
            for seed in range(3):
                writers.start_soon(_writer, store, folder, seed, model, handed)
            writers.start_soon(_deleter, store, folder, model, handed)
            while len(reports) < 4 or not any(in_flight_listed) or not any(moved):
                reports.append(await check_store(store))
                await trio.sleep(0.01)
                if len(reports) > 60:
                    break
            writers.cancel_scope.cancel()
        nursery.cancel_scope.cancel()
    await store.sync()
    for report in reports:
        assert report.damaged == [] and report.repaired == [], report.to_dict()
    assert all(r.objects_checked > 0 for r in reports)
    return model


async def _writer(store: Store, folder: int, seed: int, model: dict[int, bytes], handed: list[int]) -> None:
    """Writes and rewrites files for ever (until cancelled), handing the older ones to the deleter."""
    rng = random.Random(seed)
    mine: list[int] = []
    for i in range(10**6):
        if rng.random() < 0.6 or not mine:
            ino = store.make(folder, f"w{seed}-{i}".encode(), FILE, UID, GID).id
            data = rng.randbytes(rng.randint(1, 3) * BLOCK_SIZE - rng.randint(0, 999))
            await store.write(ino, 0, data)
            model[ino] = data  # once written: a cancelled write leaves a file the model ignores
            mine.append(ino)
        else:
            ino = rng.choice(mine)
            await store.write(ino, 0, model[ino])
        if len(mine) > 4:
            handed.append(mine.pop(0))  # the deleter's from now on
        await trio.sleep(0)


async def _deleter(store: Store, folder: int, model: dict[int, bytes], handed: list[int]) -> None:
    """Truncates and deletes the files handed to it, oldest (most likely stored) first."""
    rng = random.Random(99)
    while True:
        await trio.sleep(0.002)
        if len(handed) < 3:
            continue
        ino = handed[0]
        if rng.random() < 0.3 and len(model[ino]) > 1:
            size = rng.randint(0, len(model[ino]) - 1)
            await store.truncate(ino, size)
            model[ino] = model[ino][:size]
        else:
            handed.pop(0)
            del model[ino]
            name = store.names.plain_name(folder, store.db.one("SELECT name FROM entries WHERE inode=?", (ino,))[0])
            if store.unlink(folder, name, want_dir=False).nlink == 0:
                store.remove_inode(ino)


def test_online_check_drop_during_read_is_not_damage(built, monkeypatch):
    """An object dropped while the check reads it is not reported."""
    store = built.open()
    victim = built.inodes["g"]
    real_verify = check._Checker._verify_batch
    token = []

    def delete_then_verify(self, batch):
        # in the trio thread, as a program would
        trio.from_thread.run_sync(_delete, store, victim, trio_token=token[0])
        return real_verify(self, batch)

    monkeypatch.setattr(check._Checker, "_verify_batch", delete_then_verify)

    async def go():
        token.append(trio.lowlevel.current_trio_token())
        report = await check_store(store)
        assert report.damaged == [] and report.repaired == [], report.to_dict()
        assert report.objects_checked == 5  # g's own object went before it was read
    try:
        run(go)
    finally:
        store.close()
    monkeypatch.undo()
    assert check_offline(built).clean


def _delete(store: Store, ino: int) -> None:
    if store.db.one("SELECT 1 FROM inodes WHERE id=?", (ino,)) is None:
        return
    object_id = store.db.one("SELECT object FROM blocks WHERE inode=? AND blockno=1", (ino,))[0]
    stored, parent = store.db.one("SELECT name, parent FROM entries WHERE inode=?", (ino,))
    store.unlink(parent, store.names.plain_name(parent, stored), want_dir=False)
    store.destroy_inode(ino)
    store.commit_now()
    assert store.db.one("SELECT 1 FROM objects WHERE id=?", (object_id,)) is None
