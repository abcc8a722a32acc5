"""Pack files (tempfs.store.packs): appends land where they say, across pack boundaries and short
writes, a failed append leaves nothing to settle, and a sync returns only once what was
appended before it is durable."""
from __future__ import annotations

import errno
import os
import threading

import pytest

from tempfs.store import packs as packs_module
from tempfs.store.packs import PackFiles


def items(n: int, size: int) -> list[bytes]:
    return [bytes([i + 1]) * (size + i) for i in range(n)]


def test_a_batch_of_appends_reads_back_item_by_item_across_a_pack_boundary(tmp_path, monkeypatch):
    monkeypatch.setattr(packs_module, "PACK_MAX", 1000)
    packs = PackFiles(tmp_path / "packs")
    first = packs.append(b"x" * 300, "cache")
    batch = items(6, 300)  # 300 to 305 bytes: two fit after the first append, three in the next pack
    places = packs.append_many(batch, "cache")
    assert places[:2] == [(first[0], 300), (first[0], 600)]
    second, third = places[2][0], places[5][0]
    assert places[2:] == [(second, 0), (second, 302), (second, 605), (third, 0)]
    assert len({first[0], second, third}) == 3
    for (pack, offset), data in zip(places, batch):
        assert packs.read(pack, offset, len(data)) == data
    packs.settle([first[0]] + [pack for pack, _ in places])
    assert not packs.busy(first[0]) and not packs.busy(second)  # retired and settled
    packs.close()


def test_short_writes_are_resumed(tmp_path, monkeypatch):
    real = os.pwritev
    monkeypatch.setattr(os, "pwritev", lambda fd, buffers, offset: real(fd, [bytes(buffers[0])[:7]], offset))
    packs = PackFiles(tmp_path / "packs")
    batch = items(3, 20)
    places = packs.append_many(batch, None)
    for (pack, offset), data in zip(places, batch):
        assert packs.read(pack, offset, len(data)) == data
    packs.close()


def test_a_failed_append_leaves_no_append_to_settle(tmp_path, monkeypatch):
    packs = PackFiles(tmp_path / "packs")
    pack, _ = packs.append(b"ok", "cache")
    packs.settle([pack])

    def full(fd, buffers, offset):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "pwritev", full)
    with pytest.raises(OSError):
        packs.append_many(items(2, 10), "cache")
    assert packs.release(pack)  # no append of the failed batch waits to be settled
    packs.close()


def test_a_pack_that_fills_up_has_its_writeback_started_and_the_kernel_takes_the_call(tmp_path, monkeypatch):
    monkeypatch.setattr(packs_module, "PACK_MAX", 1000)
    real = packs_module._sync_file_range
    assert real is not None  # Linux's C library has it
    started: list[tuple[str, int]] = []

    def recorded(fd, offset, nbytes, flags):
        result = real(fd, offset, nbytes, flags)
        started.append((os.path.basename(os.readlink(f"/proc/self/fd/{fd}")), result))
        return result
    monkeypatch.setattr(packs_module, "_sync_file_range", recorded)
    packs = PackFiles(tmp_path / "packs")
    first, _ = packs.append(b"x" * 900, "cache")
    assert started == []  # not full yet
    second, _ = packs.append(b"y" * 900, "cache")  # does not fit: the first is full
    assert started == [(f"{first:016x}", 0)]
    packs.settle([first, second])
    packs.close()
    assert started == [(f"{first:016x}", 0)]  # a pack ended without filling up is left to the kernel


def test_a_sync_returns_only_after_the_one_fsyncing_the_packs_it_needs(tmp_path, monkeypatch):
    packs = PackFiles(tmp_path / "packs")
    pack, _ = packs.append(b"x" * 100, "cache")
    fsyncing, finish = threading.Event(), threading.Event()
    real_fsync = os.fsync

    def slow_fsync(fd: int) -> None:
        fsyncing.set()
        finish.wait(10)
        real_fsync(fd)
    monkeypatch.setattr(packs_module.os, "fsync", slow_fsync)
    first = threading.Thread(target=packs.sync)  # two fsync(2) requests, in two worker threads
    first.start()
    assert fsyncing.wait(10)
    second = threading.Thread(target=packs.sync)  # finds nothing pending: the first took the pack
    second.start()
    second.join(0.5)
    assert second.is_alive()  # its caller's data is not durable yet
    assert not packs.synced()  # nor is it for a caller who asks without waiting
    finish.set()
    first.join(10)
    second.join(10)
    assert not first.is_alive() and not second.is_alive()
    assert packs.synced()
    packs.settle([pack])
    packs.close()
