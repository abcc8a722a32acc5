"""Patches: what was written over part of a stored block, stored apart from it, so that a small
write into a large stored block does not load and store the whole block again.

A block is stored as a base (layer 0; none reads as empty) and the patches written over it since
(layers 1, 2, ...), applied in order. A patch first cuts the block to `cut` bytes (a truncation
that came while it was being written) and then lays its extents over what is left; between
the block's end and an extent past it the block reads as zeros, as a file grown by a write does.

Guarantees: `apply` rejects (IntegrityError) any patch `Overlay.encode` cannot produce (an
extent out of order, empty or past the block, bytes left over), so a damaged or hostile patch
never writes outside its block, even though patches come from authenticated objects.
"""
from __future__ import annotations

import bisect
import struct
from typing import Iterable, Optional

from ..codec import IntegrityError

_CUT = struct.Struct("<I")
_EXTENT = struct.Struct("<II")  # start, length
EXTENT_BYTES = _EXTENT.size  # what an extent adds to a patch besides its bytes
_NO_CUT = 0xFFFFFFFF


class Overlay:
    """Bytes written over a stored block, not yet stored: extents of written bytes, merged,
    and the shortest length the block was cut to meanwhile."""

    __slots__ = ("block_size", "extents", "cut")

    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self.extents: list[tuple[int, bytearray]] = []  # (start, bytes): sorted, apart, never adjacent
        self.cut: Optional[int] = None

    def write(self, start: int, piece: bytes | memoryview) -> None:
        end = start + len(piece)
        extents = self.extents
        # the extents this write touches or adjoins are merged with it
        i = bisect.bisect_left(extents, start, key=_start)
        if i > 0 and _end(extents[i - 1]) >= start:
            i -= 1
        j = i
        while j < len(extents) and extents[j][0] <= end:
            j += 1
        if i == j:
            extents.insert(i, (start, bytearray(piece)))
            return
        first_start, first = extents[i]
        merged = first[:start - first_start] if first_start < start else bytearray()
        merged += piece
        last_start, last = extents[j - 1]
        merged += last[end - last_start:]  # empty unless the last one reaches past this write
        extents[i:j] = [(min(start, first_start), merged)]

    def truncate(self, keep: int) -> None:
        """The block was cut to `keep` bytes: what was written past it goes."""
        self.cut = keep if self.cut is None else min(self.cut, keep)
        self.extents = [(start, data[:keep - start]) for start, data in self.extents if start < keep]

    def covers(self) -> Optional[bytearray]:
        """The whole block, if every byte of it was written (what is stored no longer shows)."""
        if len(self.extents) == 1 and self.extents[0][0] == 0 and len(self.extents[0][1]) == self.block_size:
            return self.extents[0][1]
        return None

    def spans(self) -> list[tuple[int, int]]:
        """The [start, end) of each extent written."""
        return [(start, start + len(data)) for start, data in self.extents]

    def encoded_size(self) -> int:
        return _CUT.size + sum(_EXTENT.size + len(data) for _, data in self.extents)

    def encode(self) -> bytes:
        parts = [_CUT.pack(_NO_CUT if self.cut is None else self.cut)]
        for start, data in self.extents:
            parts += (_EXTENT.pack(start, len(data)), data)
        return b"".join(parts)

    def over(self, block: bytes) -> bytes:
        """The block as it reads with this overlay applied."""
        return apply(block, [self.encode()], self.block_size)


def _start(extent: tuple[int, bytearray]) -> int:
    return extent[0]


def _end(extent: tuple[int, bytearray]) -> int:
    return extent[0] + len(extent[1])


def apply(base: bytes, patches: Iterable[bytes], block_size: int) -> bytes:
    """`base` with `patches` applied in order; raises IntegrityError for a malformed patch."""
    block = bytearray(base)
    for patch in patches:
        view = memoryview(patch)
        if len(view) < _CUT.size:
            raise IntegrityError("a patch is shorter than its header")
        (cut,) = _CUT.unpack_from(view)
        if cut != _NO_CUT:
            if cut > block_size:
                raise IntegrityError("a patch cuts past its block")
            del block[cut:]
        pos, done = _CUT.size, 0
        while pos < len(view):
            if pos + _EXTENT.size > len(view):
                raise IntegrityError("a patch ends inside an extent header")
            start, length = _EXTENT.unpack_from(view, pos)
            pos += _EXTENT.size
            if length == 0 or start < done or start + length > block_size or pos + length > len(view):
                raise IntegrityError("a patch has an extent out of order or out of bounds")
            if len(block) < start:
                block.extend(bytes(start - len(block)))
            block[start:start + length] = view[pos:pos + length]
            pos, done = pos + length, start + length
    return bytes(block)
