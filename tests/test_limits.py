"""Size limits per area and the free-space floor (tempfs/space.py), on real mounts.

An area that evicts (cache/ and cleanup/ by default) loses its least recently used closed files
to stay within its max_size; one that refuses (processing/, sessions/) answers ENOSPC and
deletes nothing. Sizes are stored bytes: compressed, deduplicated and sealed, which `du` shows,
while `ls -l` shows logical sizes and `df` the sum of the limits. Below `[space] min_free` on the
disk under the store, closed files go from evicting areas in the order cleanup/, cache/, ...

Test data from os.urandom is incompressible: a block of it is stored as one object of
BLOCK_SIZE + SEAL_OVERHEAD bytes. Files are written block by block and fsynced (`put`), so what
status reports is stored, not pending in the daemon's memory.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import subprocess
from pathlib import Path

import pytest

from conftest import wait_until
from tempfs.codec import SEAL_OVERHEAD
from tempfs.store.store import BLOCK_SIZE as BLOCK

MiB = 1024 * 1024
FILE = 4 * BLOCK                           # the size of most test files: four whole blocks
FILE_STORED = 4 * (BLOCK + SEAL_OVERHEAD)  # what such a file of random bytes is stored as
UPLOADS = "processing/common/uploads"
NO_SPACE = "No space left on device"


# ------------------------------------------------------------------ helpers

def config(min_free: str = "0", **policies: dict) -> str:
    """Config text: the floor (off unless asked for, so the test machine's disk cannot matter)
    and a [policy.AREA] table per keyword, e.g. cache={"max_size": "2MB"}."""
    lines = ["[space]", f'min_free = "{min_free}"']
    for area, keys in policies.items():
        lines.append(f"[policy.{area}]")
        lines += [f"{key} = {json.dumps(value)}" for key, value in keys.items()]  # JSON scalars are TOML
    return "\n".join(lines) + "\n"


def usage(m, area: str) -> dict:
    return m.status()["areas"][area]


def sh(*args, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run([os.fspath(a) for a in args], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "LC_ALL": "C"})
    if check and r.returncode != 0:
        raise AssertionError(f"{args} exited {r.returncode}: {r.stderr}")
    return r


def write_blocks(fd: int, data: bytes) -> None:
    """Writes as cp does: one write(2) per block, so that each is one FUSE request."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view[:BLOCK]):]


def put(path, data: bytes) -> None:
    """Writes a file and fsyncs it: when this returns, its data is stored and counted."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        write_blocks(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_path(path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_until_full(path, most: int = 8 * MiB) -> bytes:
    """Writes random blocks into a new file until a write fails with ENOSPC; returns what the
    file holds then (the refused write added nothing)."""
    written = b""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        while len(written) < most:
            chunk = os.urandom(BLOCK)
            try:
                write_blocks(fd, chunk)
            except OSError as e:
                assert e.errno == errno.ENOSPC, f"expected ENOSPC, got {e}"
                return written
            written += chunk
    finally:
        os.close(fd)
    raise AssertionError(f"{path}: {len(written)} bytes written and never ENOSPC")


def assert_enospc(write) -> None:
    with pytest.raises(OSError) as failure:
        write()
    assert failure.value.errno == errno.ENOSPC, failure.value


def compressible(size: int) -> bytes:
    """Text that lz4 shrinks a hundredfold, different in every block (so that dedup is not what
    shrinks it)."""
    blocks = -(-size // BLOCK)
    return b"".join((b"%08d the same line over and over again\n" % i * (BLOCK // 40 + 1))[:BLOCK]
                    for i in range(blocks))[:size]


def sha(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def checksums(folder) -> dict[str, str]:
    return {name: sha(Path(folder, name)) for name in os.listdir(folder)}


def du(path) -> int:
    """Bytes `du` shows (st_blocks * 512, what the file takes in the store)."""
    return int(sh("du", "-s", "-B1", path).stdout.split()[0])


def ls_size(path) -> int:
    return int(sh("ls", "-l", path).stdout.split()[4])


def df(path) -> tuple[int, int]:
    """(size, used) in bytes, as `df` shows them."""
    size, used = sh("df", "-B1", "--output=size,used", path).stdout.splitlines()[1].split()
    return int(size), int(used)


def assert_least_recently_used_went(folder, lru: list[str]) -> list[str]:
    """The files left in `folder` are the most recently used of `lru` (least recently used
    first): what went went in LRU order. Returns what is left, in LRU order."""
    present = set(os.listdir(folder))
    assert present <= set(lru), f"unexpected files in {folder}: {present - set(lru)}"
    left = [name for name in lru if name in present]
    assert left == lru[len(lru) - len(left):], f"left {left}, but least recently used first: {lru}"
    return left


def use(path) -> bytes:
    """Opens and reads a file: a use that makes it the most recently used."""
    return Path(path).read_bytes()


# ------------------------------------------------------------------ area limits

def test_evict_area_keeps_within_its_limit_by_dropping_least_recently_used(make_mount):
    m = make_mount(config(cache={"max_size": "2MB"}))
    folder = m.path("cache/data")
    content: dict[str, bytes] = {}
    lru: list[str] = []  # the model: least recently used first
    for i in range(8):
        name = f"f{i}"
        content[name] = os.urandom(FILE)
        put(folder / name, content[name])
        lru = assert_least_recently_used_went(folder, lru + [name])
        assert name in lru
        cache = usage(m, "cache")
        assert cache["stored_bytes"] <= cache["limit_bytes"] == 2 * MiB
        assert cache["evicted"] == i + 1 - len(lru)
        if cache["evicted"]:  # no more went than needed: another file would not fit
            assert cache["limit_bytes"] - cache["stored_bytes"] < FILE_STORED
        # use the least recently used file: the next eviction must pass it by, and take the next
        refreshed = lru.pop(0)
        assert use(folder / refreshed) == content[refreshed]
        lru.append(refreshed)
    assert usage(m, "cache")["evicted"] >= 4
    for name in lru:
        assert (folder / name).read_bytes() == content[name]
    assert "least recently used files to keep cache/ within its limit" in m.log_text()


def test_an_open_file_is_never_evicted(make_mount):
    m = make_mount(config(cache={"max_size": "2MB"}))
    folder = m.path("cache/data")
    held_data = os.urandom(FILE)
    put(folder / "held", held_data)
    with open(folder / "held", "rb") as held:
        for name in ("b", "c", "d"):  # d takes the area past its limit: the oldest, held, is open
            put(folder / name, os.urandom(FILE))
        assert sorted(os.listdir(folder)) == ["c", "d", "held"]
        # nothing closed is left to evict once c and d are gone: the write fails instead
        big = write_until_full(folder / "big")
        assert sorted(os.listdir(folder)) == ["big", "held"]
        assert held.read() == held_data
    limit = 2 * MiB
    assert limit - 2 * BLOCK < len(big) + len(held_data) <= limit  # the room left was used
    assert (folder / "big").read_bytes() == big
    assert (folder / "held").read_bytes() == held_data
    cache = usage(m, "cache")
    assert (cache["evicted"], cache["refused_full"]) == (3, 1)
    assert cache["stored_bytes"] <= cache["limit_bytes"]


def test_refuse_area_answers_enospc_and_deletes_nothing(make_mount):
    m = make_mount(config(processing={"max_size": "1MB"}))  # processing/ refuses by default
    uploads = m.path(UPLOADS)
    for name in ("a", "b"):
        put(uploads / name, os.urandom(300_000))
    before = checksums(uploads)
    r = sh("dd", "if=/dev/urandom", f"of={uploads}/big", "bs=128K", "count=16", check=False)
    assert r.returncode != 0 and NO_SPACE in r.stderr, r.stderr
    assert_enospc(lambda: put(uploads / "more", os.urandom(FILE)))
    after = checksums(uploads)
    assert sorted(after) == ["a", "b", "big", "more"]
    assert {name: after[name] for name in before} == before
    processing = usage(m, "processing")
    assert processing["stored_bytes"] <= processing["limit_bytes"] == MiB
    assert (processing["refused_full"], processing["evicted"]) == (2, 0)
    assert "write_refused: ENOSPC: processing/ is full" in m.log_text()
    # room again once a file is deleted
    os.remove(uploads / "big")
    data = os.urandom(300_000)
    put(uploads / "after", data)
    assert (uploads / "after").read_bytes() == data
    assert checksums(uploads)["a"] == before["a"]


def test_compressible_data_counts_at_its_compressed_size(make_mount, tmp_path):
    m = make_mount(config(processing={"max_size": "1MB"}))
    src = tmp_path / "run.log"
    src.write_bytes(compressible(5 * MiB))
    dst = m.path(UPLOADS, "run.log")
    sh("cp", src, dst)  # 5 MiB into a 1 MiB area: admitted as its pending data gets stored
    fsync_path(dst)
    assert sha(dst) == sha(src)
    assert ls_size(dst) == os.stat(dst).st_size == 5 * MiB
    assert du(dst) < 5 * MiB // 20
    processing = usage(m, "processing")
    assert processing["stored_bytes"] < processing["limit_bytes"] // 10
    assert (processing["refused_full"], processing["logical_bytes"]) == (0, 5 * MiB)


def test_deduplicated_content_costs_an_area_once_and_each_sharing_area(make_mount):
    m = make_mount(config())
    data = os.urandom(2 * FILE)
    put(m.path("cache/data/a"), data)
    one_copy = usage(m, "cache")["stored_bytes"]
    assert one_copy == 2 * FILE_STORED
    put(m.path("cache/models/b"), data)
    assert usage(m, "cache")["stored_bytes"] == one_copy
    put(m.path(UPLOADS, "c"), data)  # the same objects, now referenced by a second area
    status = m.status()
    assert status["areas"]["cache"]["stored_bytes"] == one_copy
    assert status["areas"]["processing"]["stored_bytes"] == one_copy
    assert (status["total"]["stored_bytes"], status["total"]["logical_bytes"]) == (one_copy, 3 * len(data))
    os.remove(m.path("cache/data/a"))  # b still references every object
    assert usage(m, "cache")["stored_bytes"] == one_copy
    os.remove(m.path("cache/models/b"))
    assert wait_until(lambda: usage(m, "cache")["stored_bytes"] == 0, timeout=10)
    status = m.status()
    assert status["areas"]["processing"]["stored_bytes"] == status["total"]["stored_bytes"] == one_copy
    assert m.path(UPLOADS, "c").read_bytes() == data


def test_du_shows_stored_bytes_ls_logical_bytes_df_the_limits(make_mount):
    limits = {"processing": 8 * MiB, "cache": 4 * MiB, "sessions": 2 * MiB, "cleanup": 2 * MiB}
    m = make_mount(config(**{area: {"max_size": f"{size // MiB}MB"} for area, size in limits.items()}))
    random_file, text_file = m.path("cache/data/random.bin"), m.path(UPLOADS, "text.log")
    put(random_file, os.urandom(3 * BLOCK + 1000))
    put(text_file, compressible(16 * BLOCK))
    status = m.status()
    for path, logical in ((random_file, 3 * BLOCK + 1000), (text_file, 16 * BLOCK)):
        assert ls_size(path) == os.stat(path).st_size == logical
    assert 3 * BLOCK + 1000 < du(random_file) < 3 * BLOCK + 1000 + 4 * (SEAL_OVERHEAD + 512)
    assert du(text_file) < 16 * BLOCK // 20
    for area in ("cache", "processing"):  # one file each: within the rounding to 512 bytes
        assert 0 <= du(m.path(area)) - status["areas"][area]["stored_bytes"] < 512
    size, used = df(m.mnt)
    assert size == sum(limits.values())
    assert 0 <= used - status["total"]["stored_bytes"] < BLOCK


def test_evict_area_without_auto_cleanup_refuses_instead(make_mount):
    m = make_mount(config(cache={"max_size": "2MB", "auto_cleanup": False}))  # on_full stays "evict"
    folder = m.path("cache/data")
    for i in range(3):
        put(folder / f"f{i}", os.urandom(FILE))
    before = checksums(folder)
    r = sh("dd", "if=/dev/urandom", f"of={folder}/more", "bs=128K", "count=4", check=False)
    assert r.returncode != 0 and NO_SPACE in r.stderr, r.stderr
    after = checksums(folder)
    assert sorted(after) == ["f0", "f1", "f2", "more"]
    assert {name: after[name] for name in before} == before
    cache = usage(m, "cache")
    assert (cache["evicted"], cache["refused_full"]) == (0, 1)
    assert cache["stored_bytes"] <= cache["limit_bytes"]


def test_usage_and_lru_order_survive_a_remount(make_mount):
    m = make_mount(config(cache={"max_size": "2MB"}))
    folder = m.path("cache/data")
    content = {name: os.urandom(FILE) for name in ("a", "b", "c")}
    for name, data in content.items():
        put(folder / name, data)
    assert use(folder / "a") == content["a"]  # least recently used first: b, c, a
    before = m.status()
    m.remount()
    after = m.status()
    for key in ("files", "logical_bytes", "stored_bytes"):
        assert after["areas"]["cache"][key] == before["areas"]["cache"][key], key
    assert after["total"] == before["total"]
    put(folder / "d", os.urandom(FILE))
    assert sorted(os.listdir(folder)) == ["a", "c", "d"]
    assert usage(m, "cache")["evicted"] == after["areas"]["cache"]["evicted"] + 1
    for name in ("a", "c"):
        assert (folder / name).read_bytes() == content[name]


# ------------------------------------------------------------------ the free-space floor

FLOOR = 24 * MiB
SMALL_DISK = "64m"


def free_bytes(path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def mount_tmpfs(where: Path, size: str) -> None:
    where.mkdir()
    r = sh("mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", where, check=False)
    if r.returncode != 0:
        denied = any(s in r.stderr.lower() for s in ("permission denied", "not permitted", "superuser"))
        if denied or os.geteuid() != 0:
            pytest.skip(f"mounting a tmpfs needs privilege (root or CAP_SYS_ADMIN): {r.stderr.strip()}")
        raise AssertionError(f"mount -t tmpfs failed: {r.stderr}")


@pytest.fixture
def on_small_disk(make_mount, tmp_path):
    """A mount whose store is on a 64 MiB tmpfs, with a 24 MiB floor; yields (mount, disk).
    The mount is stopped before the tmpfs goes."""
    disk = tmp_path / "disk"
    mount_tmpfs(disk, SMALL_DISK)
    m = make_mount(config(min_free="24MB"), start=False)
    m.store = disk / "store"  # tempfs creates it
    try:
        m.start()
        yield m, disk
    finally:
        m.stop()
        if sh("umount", disk, check=False).returncode != 0:
            sh("umount", "-l", disk)


def below_floor_by(disk: Path, deficit: int) -> None:
    """Fills the disk from outside tempfs until it has `deficit` bytes less than the floor free."""
    grow = free_bytes(disk) - FLOOR + deficit
    assert grow > 0
    sh("dd", "if=/dev/zero", f"of={disk / 'filler'}", "bs=64K", f"count={-(-grow // (64 * 1024))}",
       "oflag=append", "conv=notrunc,fsync")


def floor_holds(disk: Path) -> bool:
    return wait_until(lambda: free_bytes(disk) >= FLOOR, timeout=10)


def test_free_space_floor_evicts_cleanup_then_cache_never_processing(on_small_disk):
    m, disk = on_small_disk
    folders = {"cleanup": m.path("cleanup/manual"), "cache": m.path("cache/data"), "processing": m.path(UPLOADS)}
    lru, content = {}, {}
    for area, folder in folders.items():
        for i in range(4):
            content[folder / f"{area}{i}"] = os.urandom(MiB)
            put(folder / f"{area}{i}", content[folder / f"{area}{i}"])
        assert use(folder / f"{area}0")  # now the most recently used of its area
        lru[area] = [f"{area}{i}" for i in (1, 2, 3, 0)]
    assert free_bytes(disk) > FLOOR + 16 * MiB

    # a little below the floor: some cleanup/ files go, least recently used first
    below_floor_by(disk, 3 * MiB // 2)
    assert floor_holds(disk)
    assert 0 < len(assert_least_recently_used_went(folders["cleanup"], lru["cleanup"])) < 4
    assert sorted(os.listdir(folders["cache"])) == sorted(lru["cache"])

    # further below: cleanup/ empties, then cache/ files go
    below_floor_by(disk, usage(m, "cleanup")["stored_bytes"] + 3 * MiB // 2)
    assert floor_holds(disk)
    assert os.listdir(folders["cleanup"]) == []
    assert 0 < len(assert_least_recently_used_went(folders["cache"], lru["cache"])) < 4

    # further below than all that may go: processing/ (refuse) keeps every file, writes fail
    below_floor_by(disk, usage(m, "cache")["stored_bytes"] + 2 * MiB)
    assert wait_until(lambda: os.listdir(folders["cache"]) == [], timeout=10)
    assert wait_until(lambda: "nothing more may be evicted" in m.log_text(), timeout=10)
    assert_enospc(lambda: put(folders["processing"] / "new", os.urandom(MiB)))
    assert free_bytes(disk) < FLOOR
    for i in range(4):
        path = folders["processing"] / f"processing{i}"
        assert path.read_bytes() == content[path]
    status = m.status()
    assert {area: status["areas"][area]["evicted"] for area in folders} == {"cleanup": 4, "cache": 4, "processing": 0}
    assert status["areas"]["processing"]["refused_full"] == 1
    assert status["disk"]["min_free_bytes"] == FLOOR

    # room again once the disk has room
    (disk / "filler").unlink()
    data = os.urandom(MiB)
    put(folders["processing"] / "new", data)
    assert (folders["processing"] / "new").read_bytes() == data
    assert sorted(os.listdir(folders["processing"])) == ["new"] + [f"processing{i}" for i in range(4)]


# ------------------------------------------------------------------ edges: big writes, overwrites, mv, du

def test_one_large_write_of_compressible_data_fits_a_small_area(make_mount):
    m = make_mount(config(processing={"max_size": "1MB"}))
    path = m.path(UPLOADS, "run.log")
    data = compressible(5 * MiB)
    path.write_bytes(data)  # one write(2) of 5 MiB: the kernel sends it as 1 MiB requests
    assert path.read_bytes() == data


def test_overwriting_in_place_in_a_nearly_full_area(make_mount):
    m = make_mount(config(processing={"max_size": "1MB"}))
    path = m.path(UPLOADS, "state.db")
    data = bytearray(os.urandom(7 * BLOCK))  # less than a block of room is left
    put(path, data)
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, b"new", 100)
        os.fsync(fd)
    finally:
        os.close(fd)
    data[100:103] = b"new"
    assert path.read_bytes() == data
    processing = usage(m, "processing")
    assert processing["stored_bytes"] <= processing["limit_bytes"]


def test_moving_a_file_into_a_full_area_keeps_it_within_its_limit(make_mount):
    m = make_mount(config(processing={"max_size": "1MB"}))
    src, dst = m.path("cache/data/big"), m.path(UPLOADS, "big")
    data = os.urandom(2 * FILE)
    put(src, data)
    sh("mv", src, dst, check=False)  # may fail: it does not fit
    processing = usage(m, "processing")
    assert processing["stored_bytes"] <= processing["limit_bytes"]
    assert any(p.exists() and p.read_bytes() == data for p in (src, dst))


def test_du_catches_up_once_written_data_is_stored(make_mount):
    m = make_mount(config())
    path = m.path(UPLOADS, "text.log")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    write_blocks(fd, compressible(8 * BLOCK))
    os.close(fd)
    du(path)  # as `cp x y && du y` would: while pending in memory, data counts at its raw size
    assert wait_until(lambda: m.status()["daemon"]["dirty_bytes"] == 0, timeout=10)
    assert usage(m, "processing")["stored_bytes"] < 8 * BLOCK // 20
    # the kernel keeps attributes at most a second while a file has data pending
    assert wait_until(lambda: du(path) < 8 * BLOCK // 20, timeout=5)


def test_space_of_a_removed_file_is_freed_at_once_but_not_while_open(make_mount):
    m = make_mount(config())
    gone, held = m.path(UPLOADS, "gone"), m.path(UPLOADS, "held")
    put(gone, os.urandom(FILE))
    put(held, data := os.urandom(FILE))
    os.stat(gone)  # the kernel holds both inodes: they are freed before it forgets them
    with open(held, "rb") as f:
        sh("rm", gone, held)
        assert usage(m, "processing")["stored_bytes"] == FILE_STORED  # only the open one is left
        assert f.read() == data
    assert wait_until(lambda: usage(m, "processing")["stored_bytes"] == 0, timeout=5)
