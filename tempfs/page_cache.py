"""Hands the kernel's page cache the rest of a block that a read decrypted but did not ask for.

A block is loaded whole (128 KiB: read, decrypted, checked) even when the kernel asks for 4 KiB
of it, as it does for every random read. Storing the rest in the page cache (FUSE's
NOTIFY_STORE) answers the block's next reads in the kernel, without a trip to the daemon.

Guarantees:
- The kernel overwrites the pages it is given, even newer ones, so the caller offers content only
  while no handle may write the file, and before a file may change (an open for writing, a
  truncate) it waits with `quiesce` until what was offered for that file is in the kernel.
- The kernel is called from a worker thread, never from the trio thread: a store waits on the
  lock of any page that a read in flight holds, and only the trio thread answers that read.
- Best effort: what the kernel refuses (it has forgotten the inode) is dropped, and so is an
  offer while more than `max_pending` bytes wait or while the filler is not running; a kernel
  without NOTIFY_STORE (ENOSYS) is asked once, and nothing is offered after that.
"""
from __future__ import annotations

import errno
import logging
from collections import Counter
from typing import Callable

import pyfuse3
import trio

from . import workers

log = logging.getLogger(__name__)

MAX_PENDING = 32 * 1024 * 1024  # bytes offered and not yet stored; more is dropped
BATCH = 64                      # offers stored in one trip to the worker thread

StorePages = Callable[[int, int, memoryview], None]


class PageCacheFiller:
    def __init__(self, store_pages: StorePages = pyfuse3.notify_store, max_pending: int = MAX_PENDING) -> None:
        self._store_pages = store_pages
        self.max_pending = max_pending
        self._send, self._receive = trio.open_memory_channel(float("inf"))
        self._pending: Counter[int] = Counter()  # inode -> offers not yet through the kernel
        self._pending_bytes = 0
        self._drained: dict[int, trio.Event] = {}
        self._running = False
        self._unsupported = False  # the kernel answered ENOSYS
        self.stored_bytes = 0
        self.dropped_bytes = 0

    def offer(self, ino: int, offset: int, data: memoryview) -> None:
        """Queues `data` for the kernel's cache of `ino` at `offset` (trio thread)."""
        if not data:
            return
        if not self._running or self._unsupported or self._pending_bytes + len(data) > self.max_pending:
            self.dropped_bytes += len(data)
            return
        self._pending[ino] += 1
        self._pending_bytes += len(data)
        self._send.send_nowait((ino, offset, data))

    async def quiesce(self, ino: int) -> None:
        """Returns once nothing offered for `ino` is still on its way to the kernel."""
        while self._pending[ino]:
            await self._drained.setdefault(ino, trio.Event()).wait()

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        self._running = True
        task_status.started()
        try:
            async for first in self._receive:
                batch = [first]
                while len(batch) < BATCH:
                    try:
                        batch.append(self._receive.receive_nowait())
                    except trio.WouldBlock:
                        break
                try:
                    self.stored_bytes += await workers.run_sync(self._store_all, batch)
                finally:
                    for ino, _, data in batch:
                        self._landed(ino, len(data))
        finally:
            self._running = False
            while True:  # what is left is dropped: nobody may wait for it
                try:
                    ino, _, data = self._receive.receive_nowait()
                except trio.WouldBlock:
                    break
                self.dropped_bytes += len(data)
                self._landed(ino, len(data))

    def _landed(self, ino: int, size: int) -> None:
        self._pending_bytes -= size
        self._pending[ino] -= 1
        if self._pending[ino] <= 0:
            del self._pending[ino]
            event = self._drained.pop(ino, None)
            if event is not None:
                event.set()

    def _store_all(self, batch: list[tuple[int, int, memoryview]]) -> int:
        stored = 0
        for ino, offset, data in batch:
            if self._unsupported:
                continue
            try:
                self._store_pages(ino, offset, data)
            except OSError as e:
                if e.errno == errno.ENOSYS:
                    self._unsupported = True
                    log.info("the kernel cannot be handed pages (%s): small reads load their block each time", e)
                elif e.errno != errno.ENOENT:  # ENOENT: the kernel has forgotten the inode
                    log.debug("page cache of inode %d not filled: %s", ino, e)
                continue
            stored += len(data)
        return stored
