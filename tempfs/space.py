"""Room for writes: each area's size limit and the free-space floor on the store's disk.

Guarantees:
- Writes never take an area's stored bytes past its max_size. A write is admitted only when the
  area's stored bytes, its data still held in memory and what admitted writes have reserved,
  plus the most this write can add, fit. Data not yet stored counts at its raw size (plus the
  seal's overhead); when that does not fit, the area's pending data is stored first so that its
  real, compressed and deduplicated size counts.
- When a write does not fit, an area whose policy allows eviction loses its least recently used
  closed files (never an open one) until it fits; any other area answers ENOSPC and nothing is
  deleted.
- When the disk under the store has less than `min_free` free, files are evicted from areas
  that allow it, in the seed's priority order (cleanup, cache, other areas, sessions,
  processing), until the floor holds; a write that cannot be given room fails with ENOSPC.
  A refused write changes nothing, so nothing already written is damaged.
"""
from __future__ import annotations

import errno
import logging
import math
import os
import time
from collections import Counter
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import AsyncIterator, Callable, Optional

import trio

from .codec import SEAL_OVERHEAD
from .monitor import Monitor
from .store import Store, StoreError


PRIORITY_FIRST = ("cleanup", "cache")        # the seed's order: what is cheapest to lose goes first
PRIORITY_LAST = ("sessions", "processing")   # work in progress goes last
PROBE_INTERVAL = 1.0   # seconds a free-space reading is trusted (admitted writes are subtracted)
WATCH_INTERVAL = 2.0   # how often the floor is checked when nobody writes
COMPLAIN_INTERVAL = 60.0
LRU_BATCH = 64


@dataclass(frozen=True)
class AreaRule:
    max_size: Optional[int]
    evict: bool  # may tempfs delete closed files of this area to make room?


class Space:
    def __init__(self, store: Store, rules: dict[str, AreaRule], min_free: int, monitor: Monitor, *,
                 evict: Callable[[int], None], is_open: Callable[[int], bool], alert_percent: int = 80) -> None:
        """`evict(ino)` removes a closed file as an expiry would; `is_open(ino)` says if it may."""
        self.store = store
        self.monitor = monitor
        self.alert_percent = alert_percent
        self.rules = rules
        self.min_free = min_free
        self._evict_file = evict
        self._is_open = is_open
        self._reserved: Counter[str] = Counter()
        self._probed_free = 0
        self._probed_at = -math.inf
        self._pending_at_probe = 0
        self._admitted_since_probe = 0
        self._complained: dict[str, float] = {}

    def order(self) -> list[str]:
        """The areas in the order the floor frees them."""
        others = [a for a in self.rules if a not in PRIORITY_FIRST + PRIORITY_LAST]
        return [a for a in (*PRIORITY_FIRST, *others, *PRIORITY_LAST) if a in self.rules]

    def limit(self, area: str) -> Optional[int]:
        rule = self.rules.get(area)
        return None if rule is None else rule.max_size

    # ---- admission -----------------------------------------------------------------------
    def write_need(self, area: str, ino: int, offset: int, length: int, credit: bool = True) -> int:
        """The most stored bytes a write can add to `area`: a whole object for each block it
        dirties anew, less (with `credit`, which costs a query: worth it near a limit) the
        objects those blocks stop using that nothing else there uses. A block written in part
        may keep them and take a patch instead, of at most `patch_max` bytes."""
        if length <= 0:
            return 0
        blocks = self.store.blocks
        first, last = offset // blocks.block_size, (offset + length - 1) // blocks.block_size
        fresh = [b for b in range(first, last + 1) if (ino, b) not in blocks.dirty]
        if not fresh or not credit:
            return len(fresh) * (blocks.block_size + SEAL_OVERHEAD)
        size, end = self.store.inode(ino).size, offset + length
        freed = self.store.sole_objects(area, ino, fresh[0], fresh[-1])
        need = 0
        for b in fresh:
            start = max(offset, b * blocks.block_size)
            replaced = blocks.block_size + SEAL_OVERHEAD - freed.get(b, 0)
            if blocks.replaces(b, start - b * blocks.block_size, min(end, (b + 1) * blocks.block_size) - start, size):
                need += replaced
            else:
                need += max(replaced, blocks.patch_max + SEAL_OVERHEAD)
        return need

    def roomy(self, area: str, need: int) -> bool:
        """Whether `need` bytes fit at once, with nothing to store, evict or refuse first."""
        limit = self.limit(area)
        fits_area = limit is None or self._load(area) + need <= limit
        return fits_area and (not self.min_free or self.free_bytes() - need >= self.min_free)

    @asynccontextmanager
    async def room(self, area: str, need: int) -> AsyncIterator[None]:
        """Holds room for `need` more stored bytes in `area` while a change runs; raises
        StoreError(ENOSPC) when none can be made."""
        if need > 0:
            await self._fit_area(area, need)
            await self._fit_disk(area, need)
        need = max(need, 0)
        self._reserved[area] += need
        self._admitted_since_probe += need
        try:
            yield
        finally:
            self._reserved[area] -= need

    def _load(self, area: str) -> int:
        """What the area holds or is about to: stored, pending in memory, reserved."""
        blocks = self.store.blocks
        pending = blocks.dirty_by_tag[area] // blocks.block_size * (blocks.block_size + SEAL_OVERHEAD)
        return self.store.area_stored(area) + pending + self._reserved[area]

    async def _fit_area(self, area: str, need: int) -> None:
        limit = self.limit(area)
        if limit is None or self._load(area) + need <= limit:
            return
        if self.store.reclaiming:
            self.store.reclaim()  # deleted files count until the reclaimer frees what they held
            if self._load(area) + need <= limit:
                return
        if need <= limit:
            await self.store.blocks.flush_tagged(area)  # pending data now counts at its stored size
        evicted = 0
        while self._load(area) + need > limit:
            if need > limit or not self.rules[area].evict or not self._evict_one(area):
                self._refuse(area, f"{area}/ is full: {self._load(area)} of {limit} bytes used, "
                                   f"a write needs up to {need} more")
            evicted += 1
        if evicted:
            self.monitor.event("evicted", f"evicted {evicted} least recently used files to keep {area}/ "
                               f"within its limit", area=area, count=evicted, limit_bytes=limit)

    def _evict_one(self, area: str) -> bool:
        skip = 0
        while batch := self.store.least_recently_used(area, LRU_BATCH, skip):
            for ino in batch:
                if not self._is_open(ino):
                    self._evict_file(ino)
                    self.monitor.count("evicted")
                    self.monitor.count(f"evicted:{area}")
                    return True
            skip += len(batch)
        return False

    def _refuse(self, area: str, reason: str) -> None:
        self.monitor.count("refused_full")
        self.monitor.count(f"refused_full:{area}")
        now = time.monotonic()
        if now - self._complained.get(area, -math.inf) >= COMPLAIN_INTERVAL:
            self._complained[area] = now
            self.monitor.event("write_refused", f"ENOSPC: {reason}", logging.WARNING, area=area)
        raise StoreError(errno.ENOSPC, reason)

    # ---- the floor -----------------------------------------------------------------------
    def free_bytes(self) -> int:
        """Free bytes on the store's disk, less what is admitted but not yet there."""
        if time.monotonic() - self._probed_at > PROBE_INTERVAL:
            self._probe()
        return self._probed_free - self._pending_at_probe - self._admitted_since_probe

    def _probe(self) -> None:
        self._probed_free = _available(self.store.path)
        self._probed_at = time.monotonic()
        self._pending_at_probe = self.store.blocks.dirty_bytes
        self._admitted_since_probe = 0

    async def _fit_disk(self, area: str, need: int) -> None:
        if not self.min_free or self.free_bytes() - need >= self.min_free:
            return
        self._probe()
        if self.free_bytes() - need < self.min_free:
            await self.free_disk(self.min_free + need - self.free_bytes())
        if self.free_bytes() - need < self.min_free:
            self._refuse(area, f"the disk under the store has {max(self.free_bytes(), 0)} bytes free, "
                               f"its floor is {self.min_free} and nothing more may be evicted")

    async def free_disk(self, wanted: int) -> int:
        """Gives the disk back the dead objects' bytes in packs; then, if that was not `wanted`
        bytes, evicts closed files, area by area in priority order, until `wanted` stored bytes
        are freed or nothing more may go; returns the bytes freed."""
        free = self.free_bytes()
        if await self.store.reclaim_disk():
            self._probe()
            wanted -= self.free_bytes() - free
            if wanted <= 0:
                return 0
        freed = 0
        for area in self.order():
            evicted = 0
            while freed < wanted and self.rules[area].evict:
                before = self.store.stored_bytes()
                if not self._evict_one(area):
                    break
                evicted += 1
                freed += before - self.store.stored_bytes()
            if evicted:
                self.monitor.event("evicted", f"evicted {evicted} files: the disk under the store is below "
                                   "its floor", area=area, count=evicted, min_free_bytes=self.min_free)
        if freed:
            await self.store.commit()  # emptied packs go once the commit lands
            await self.store.reclaim_disk()  # and the dead objects in the others
            self._probe()
        return freed

    async def run_watch(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Keeps the floor when the disk fills from elsewhere, with nobody writing here, and
        raises the capacity alerts."""
        task_status.started()
        complained = -math.inf
        while True:
            await trio.sleep(WATCH_INTERVAL)
            try:
                self._watch_capacity()
                if self.min_free:
                    await self._keep_floor()
            except Exception as e:  # the store's disk or database failing: say so, keep watching
                if time.monotonic() - complained >= COMPLAIN_INTERVAL:
                    complained = time.monotonic()
                    logging.getLogger(__name__).error("cannot watch the disk under the store (%s); retrying", e)

    async def _keep_floor(self) -> None:
        self._probe()
        deficit = self.min_free - self.free_bytes()
        if deficit > 0:
            await self.free_disk(deficit)
        if self.free_bytes() < self.min_free:
            self.monitor.alert("disk_floor", f"the disk under the store has {max(self.free_bytes(), 0)} bytes "
                               f"free, below its {self.min_free}-byte floor, and nothing more may be evicted: "
                               "writes fail with ENOSPC", free_bytes=self.free_bytes(), min_free_bytes=self.min_free)
        else:
            self.monitor.clear("disk_floor")

    def _watch_capacity(self) -> None:
        for area in self.rules:
            limit = self.limit(area)
            if not limit:
                continue
            used = self.store.area_stored(area)
            if used * 100 >= limit * self.alert_percent:
                self.monitor.alert(f"capacity:{area}", f"{area}/ holds {used * 100 // limit} % of its limit",
                                   area=area, used_bytes=used, limit_bytes=limit)
            else:
                self.monitor.clear(f"capacity:{area}")


def _available(path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize
