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
_NO_CUT = 0xFFFFFFFF


class Overlay:
    """Bytes written over a stored block, not yet stored: the extents they cover, merged, and
    the shortest length the block was cut to meanwhile."""

    __slots__ = ("data", "extents", "cut")

    def __init__(self, block_size: int) -> None:
        self.data = bytearray(block_size)  # written bytes at their offsets; zeros elsewhere
        self.extents: list[list[int]] = []   # sorted, disjoint, never adjacent [start, end)
        self.cut: Optional[int] = None

    def write(self, start: int, piece: bytes | memoryview) -> None:
        end = start + len(piece)
        self.data[start:end] = piece
        # the extents this one touches or adjoins are merged with it
        i = bisect.bisect_left(self.extents, [start, start])
        if i > 0 and self.extents[i - 1][1] >= start:
            i -= 1
        j = i
        while j < len(self.extents) and self.extents[j][0] <= end:
            j += 1
        if i < j:
            start, end = min(start, self.extents[i][0]), max(end, self.extents[j - 1][1])
        self.extents[i:j] = [[start, end]]

    def truncate(self, keep: int) -> None:
        """The block was cut to `keep` bytes: what was written past it goes."""
        self.cut = keep if self.cut is None else min(self.cut, keep)
        self.extents = [[s, min(e, keep)] for s, e in self.extents if s < keep]

    def covers(self, length: int) -> bool:
        """Whether bytes 0..length-1 were all written (the stored block no longer matters)."""
        return bool(self.extents) and self.extents[0][0] == 0 and self.extents[0][1] >= length

    def encoded_size(self) -> int:
        return _CUT.size + sum(_EXTENT.size + e - s for s, e in self.extents)

    def encode(self) -> bytes:
        parts = [_CUT.pack(_NO_CUT if self.cut is None else self.cut)]
        for start, end in self.extents:
            parts += (_EXTENT.pack(start, end - start), self.data[start:end])
        return b"".join(parts)

    def over(self, block: bytes) -> bytes:
        """The block as it reads with this overlay applied."""
        return apply(block, [self.encode()], len(self.data))


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
