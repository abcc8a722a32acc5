"""When deleted files are reclaimed: the inodes whose content (and row) wait to be freed, and
when the reclaimer works through them.

Removing a file's last name is quick: the name goes, and its link count. Freeing what it held
(block map rows, objects and their keys, the inode row) is most of the work of a delete, and is
left to the reclaimer (Store.run_reclaimer). It works a slice at a time, as long as no request
came for QUIET seconds, the oldest waiting has waited AGE seconds, or BACKLOG files wait; and
the store frees all of it before room is judged (an area's limit, the disk's floor), before a
sync or a shredding commit, and at close. Until then a deleted file's stored bytes count in
its area.

Guarantees: bookkeeping only (inode numbers, a monotonic clock), no I/O; an inode asked for
both is removed whole; the oldest asked goes first.
"""
from __future__ import annotations

import itertools
import time
from typing import Callable

AGE = 2.0        # seconds a deleted file's content may wait (as long as written data may: FLUSH_AGE)
QUIET = 0.05     # seconds without a request after which the reclaimer starts
BACKLOG = 16384  # files waiting past which it starts at once
SLICE = 64       # files reclaimed between two looks at the requests (a few ms of work)


class ReclaimQueue:
    """Inodes to reclaim, the oldest asked first: each with whether its row goes too (else
    only its content) and when it was first asked."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._waiting: dict[int, tuple[bool, float]] = {}  # insertion order is the order asked

    def __len__(self) -> int:
        return len(self._waiting)

    def __contains__(self, ino: int) -> bool:
        return ino in self._waiting

    def ask(self, ino: int, remove: bool) -> None:
        """Asks for `ino`'s content to be freed, and with `remove` its row too."""
        was = self._waiting.get(ino)
        self._waiting[ino] = (remove, self._clock()) if was is None else (was[0] or remove, was[1])

    def take(self, limit: int) -> list[tuple[int, bool]]:
        """The `limit` oldest asked, as (inode, remove), no longer waiting."""
        taken = list(itertools.islice(self._waiting.items(), limit))
        for ino, _ in taken:
            del self._waiting[ino]
        return [(ino, remove) for ino, (remove, _since) in taken]

    def due(self, quiet: bool) -> bool:
        """Whether the reclaimer should work now; `quiet`: no request came for QUIET seconds."""
        if not self._waiting:
            return False
        oldest = next(iter(self._waiting.values()))[1]
        return quiet or len(self._waiting) >= BACKLOG or self._clock() - oldest >= AGE
