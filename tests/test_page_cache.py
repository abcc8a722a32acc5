"""A small read leaves the rest of its block in the kernel's page cache (tempfs.page_cache), and
that cache never holds content older than the file's.

The mount tests look at what the kernel holds with fincore(1). Each read is made with
POSIX_FADV_RANDOM, so the kernel asks the daemon for exactly the pages read, no more.
"""
from __future__ import annotations

import errno
import os
import random
import subprocess
import threading
from types import SimpleNamespace

import pyfuse3
import pytest
import trio

from conftest import wait_until
from tempfs.codec import ContentCodec
from tempfs.config import default_config
from tempfs.daemon import area_rules, prepare_tree
from tempfs.fs import TempFS
from tempfs.monitor import Monitor
from tempfs.page_cache import PageCacheFiller
from tempfs.store import Store
from tempfs.store.store import BLOCK_SIZE

PAGE = 4096
UPLOADS = "processing/common/uploads"


def resident(path) -> int:
    """Bytes of `path` in the kernel's page cache."""
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", os.fspath(path)],
                         capture_output=True, text=True, check=True).stdout
    return int(out)


def uncached_file(path, data: bytes) -> None:
    path.write_bytes(data)
    with open(path, "rb") as f:
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    assert resident(path) == 0


def read_one_page(path, offset: int) -> bytes:
    with open(path, "rb") as f:
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_RANDOM)  # no readahead: this page only
        return os.pread(f.fileno(), PAGE, offset)


def test_a_random_read_leaves_its_whole_block_in_the_page_cache(mounted):
    data = os.urandom(8 * BLOCK_SIZE + 1000)
    path = mounted.path(UPLOADS, "model.bin")
    uncached_file(path, data)
    offset = 2 * BLOCK_SIZE + 5 * PAGE
    assert read_one_page(path, offset) == data[offset:offset + PAGE]
    wait_until(lambda: resident(path) == BLOCK_SIZE, timeout=10)
    assert resident(path) == BLOCK_SIZE  # that block, whole, and nothing else
    daemon = mounted.status()["daemon"]
    assert (daemon["page_cache_filled_bytes"], daemon["page_cache_dropped_bytes"]) == (BLOCK_SIZE - PAGE, 0)
    # the last block is short: its pages stop at the end of the file
    assert read_one_page(path, 8 * BLOCK_SIZE) == data[8 * BLOCK_SIZE:8 * BLOCK_SIZE + PAGE]
    wait_until(lambda: resident(path) == BLOCK_SIZE + PAGE, timeout=10)
    with open(path, "rb") as f:
        assert f.read() == data  # what the kernel was given is the content
    assert os.stat(path).st_size == len(data)


def test_a_file_open_for_writing_gets_no_pages_it_did_not_ask_for(mounted):
    held, other = mounted.path(UPLOADS, "held.bin"), mounted.path(UPLOADS, "other.bin")
    data = os.urandom(2 * BLOCK_SIZE)
    uncached_file(held, data)
    uncached_file(other, data)
    with open(held, "r+b"):  # a writer could change any page the kernel would be given
        assert read_one_page(held, PAGE) == data[PAGE:2 * PAGE]
        assert read_one_page(other, PAGE) == data[PAGE:2 * PAGE]
        # offers are stored in order: once `other` has its block, `held` would have had its own
        wait_until(lambda: resident(other) == BLOCK_SIZE, timeout=10)
        assert resident(held) == PAGE


@pytest.mark.timeout(300)
def test_the_page_cache_never_answers_with_content_older_than_the_file(mounted):
    """Small reads (each filling the page cache) interleaved with writes through other handles,
    truncates by path and cache drops: every read must match the model. A store of the filler
    landing after the change that followed its read would show here as old bytes."""
    rng = random.Random(7)
    path = mounted.path(UPLOADS, "changing.bin")
    model = bytearray(os.urandom(6 * BLOCK_SIZE))
    path.write_bytes(model)
    reader = os.open(path, os.O_RDONLY)  # kept open across the changes: the kernel keeps its pages
    os.posix_fadvise(reader, 0, 0, os.POSIX_FADV_RANDOM)
    try:
        for step in range(600):
            action = rng.random()
            if action < 0.5:
                offset = rng.randrange(0, max(len(model), 1) + PAGE, PAGE)
                got = os.pread(reader, PAGE, offset)
                assert got == bytes(model[offset:offset + PAGE]), f"step {step}: read at {offset}"
            elif action < 0.8:
                offset, piece = rng.randrange(0, 7 * BLOCK_SIZE), os.urandom(rng.choice([1, 100, PAGE, 3 * PAGE]))
                fd = os.open(path, os.O_WRONLY)
                try:
                    os.pwrite(fd, piece, offset)
                finally:
                    os.close(fd)
                if offset > len(model):
                    model.extend(bytes(offset - len(model)))
                model[offset:offset + len(piece)] = piece
            elif action < 0.95:
                size = rng.randrange(0, 7 * BLOCK_SIZE)
                os.truncate(path, size)
                del model[size:]
                model.extend(bytes(size - len(model)))
            else:
                os.posix_fadvise(reader, 0, 0, os.POSIX_FADV_DONTNEED)
        with open(path, "rb") as f:
            assert f.read() == model
    finally:
        os.close(reader)


# ---- the front end's rule, in process: a read that a change overtook offers nothing -------

class Offers:
    """Stands in for the filler: records what the front end offers."""

    def __init__(self) -> None:
        self.made: list[tuple[int, int, int]] = []

    def offer(self, ino: int, offset: int, data) -> None:
        if data:
            self.made.append((ino, offset, len(data)))

    async def quiesce(self, ino: int) -> None:
        pass


class Context:
    uid, gid, pid, umask = os.getuid(), os.getgid(), os.getpid(), 0o022


@pytest.mark.parametrize("change", [None, "write", "open for writing", "truncate"])
def test_a_read_overtaken_by_a_change_offers_nothing(tmp_path, change):
    store = Store(tmp_path / "store", ContentCodec(os.urandom(32)), dirty_limit=8 << 20, cache_limit=8 << 20)
    config = default_config()
    prepare_tree(store, config)
    ops = TempFS(store, area_rules(config), 0, Monitor())
    ops.page_cache = offers = Offers()
    folder = store.lookup(store.lookup(pyfuse3.ROOT_INODE, b"cache"), b"data")
    ctx = Context()

    async def main() -> None:
        info, entry = await ops.create(folder, b"f", 0o644, os.O_WRONLY | os.O_CREAT, ctx)
        await ops.write(info.fh, 0, os.urandom(2 * BLOCK_SIZE))
        await ops.release(info.fh)
        reader = await ops.open(entry.st_ino, os.O_RDONLY, ctx)
        loaded, go_on = trio.Event(), trio.Event()
        real_read = store.read

        async def held_read(*args):
            data = await real_read(*args)
            loaded.set()
            await go_on.wait()  # the block is loaded; the reply is not sent yet
            return data
        store.read = held_read
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ops.read, reader.fh, PAGE, PAGE)
            await loaded.wait()
            store.read = real_read
            if change == "write":
                writer = await ops.open(entry.st_ino, os.O_WRONLY, ctx)
                await ops.write(writer.fh, 2 * PAGE, b"new")
                await ops.release(writer.fh)
            elif change == "open for writing":
                await ops.release((await ops.open(entry.st_ino, os.O_RDWR, ctx)).fh)
            elif change == "truncate":
                fields = SimpleNamespace(update_mode=False, update_uid=False, update_gid=False,
                                         update_atime=False, update_mtime=False, update_size=True)
                attrs = pyfuse3.EntryAttributes()
                attrs.st_size = BLOCK_SIZE
                await ops.setattr(entry.st_ino, attrs, fields, None, ctx)
            go_on.set()
        await ops.release(reader.fh)
        if change is None:  # the rest of the block: before the page read, and after it
            assert offers.made == [(entry.st_ino, 0, PAGE), (entry.st_ino, 2 * PAGE, BLOCK_SIZE - 2 * PAGE)]
        else:
            assert offers.made == []

    try:
        trio.run(main)
    finally:
        store.close()


# ---- the filler alone, with a stand-in for the kernel ---------------------------------------

class FakeKernel:
    def __init__(self, refuse: int = 0) -> None:
        self.refuse = refuse
        self.calls: list[tuple[int, int, int]] = []

    def store(self, ino: int, offset: int, data) -> None:
        self.calls.append((ino, offset, len(data)))
        if self.refuse:
            raise OSError(self.refuse, os.strerror(self.refuse))


def run_with_filler(test, kernel: FakeKernel, **kwargs) -> None:
    async def main():
        filler = PageCacheFiller(kernel.store, **kwargs)
        async with trio.open_nursery() as nursery:
            await nursery.start(filler.run)
            await test(filler)
            nursery.cancel_scope.cancel()
    trio.run(main)


def test_quiesce_returns_once_what_was_offered_is_in_the_kernel():
    kernel = FakeKernel()
    release = threading.Event()
    stored = kernel.store

    def slow_store(ino, offset, data):
        release.wait(10)
        stored(ino, offset, data)
    kernel.store = slow_store

    async def test(filler: PageCacheFiller):
        filler.offer(7, 0, memoryview(b"x" * 100))
        filler.offer(8, 0, memoryview(b"y" * 100))
        with trio.move_on_after(0.2):
            await filler.quiesce(7)
            raise AssertionError("quiesce returned while the store was still on its way")
        release.set()
        with trio.fail_after(10):
            await filler.quiesce(7)
        assert (7, 0, 100) in kernel.calls
        await filler.quiesce(9)  # nothing offered: at once
    run_with_filler(test, kernel)


def test_offers_past_the_bound_or_to_a_stopped_filler_are_dropped():
    kernel = FakeKernel()

    async def test(filler: PageCacheFiller):
        filler.offer(1, 0, memoryview(b"a" * 60))
        filler.offer(1, 60, memoryview(b"b" * 60))  # 120 > 100 pending: dropped
        filler.offer(1, 0, memoryview(b""))         # nothing to store
        with trio.fail_after(10):
            await filler.quiesce(1)
        assert kernel.calls == [(1, 0, 60)]
        assert (filler.stored_bytes, filler.dropped_bytes) == (60, 60)
        filler.offer(1, 60, memoryview(b"b" * 60))  # what was stored no longer counts against the bound
        with trio.fail_after(10):
            await filler.quiesce(1)
        assert kernel.calls == [(1, 0, 60), (1, 60, 60)]
    run_with_filler(test, kernel, max_pending=100)

    stopped = PageCacheFiller(kernel.store)
    stopped.offer(1, 0, memoryview(b"c" * 10))
    assert stopped.dropped_bytes == 10
    trio.run(stopped.quiesce, 1)  # nothing waits for a store that will not come


@pytest.mark.parametrize("refusal", [errno.ENOENT, errno.EINVAL])
def test_what_the_kernel_refuses_is_dropped_and_the_filler_goes_on(refusal):
    kernel = FakeKernel(refuse=refusal)

    async def test(filler: PageCacheFiller):
        filler.offer(3, 0, memoryview(b"z" * 10))
        with trio.fail_after(10):
            await filler.quiesce(3)
        kernel.refuse = 0
        filler.offer(3, 10, memoryview(b"z" * 10))
        with trio.fail_after(10):
            await filler.quiesce(3)
        assert filler.stored_bytes == 10
    run_with_filler(test, kernel)


def test_a_kernel_without_notify_store_is_asked_once():
    kernel = FakeKernel(refuse=errno.ENOSYS)

    async def test(filler: PageCacheFiller):
        filler.offer(4, 0, memoryview(b"w" * 10))
        with trio.fail_after(10):
            await filler.quiesce(4)
        filler.offer(4, 10, memoryview(b"w" * 10))
        assert kernel.calls == [(4, 0, 10)] and filler.dropped_bytes == 10
    run_with_filler(test, kernel)
