"""Unit tests of tempfs.store.patch: overlays against a model block, and malformed patches; and
of the whole dirty block (blocks.DirtyBlock) against the same model."""
from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tempfs.codec import IntegrityError
from tempfs.store.blocks import DirtyBlock
from tempfs.store.patch import Overlay, apply

BLOCK = 64

writes = st.tuples(st.integers(0, BLOCK - 1), st.binary(min_size=1, max_size=BLOCK))
steps = st.lists(st.one_of(writes, st.integers(0, BLOCK)), max_size=30)  # an int: a cut


def replay(base: bytes, steps: list, write, cut, check=lambda model: None) -> bytearray:
    """Runs `steps` through write(start, piece) and cut(keep) and on a model block (a
    bytearray) that starts as `base`; returns the model. `check` runs after each step."""
    model = bytearray(base)
    for step in steps:
        if isinstance(step, int):
            cut(step)
            del model[step:]
        else:
            start, piece = step
            piece = piece[:BLOCK - start]
            write(start, piece)
            model.extend(bytes(max(0, start - len(model))))
            model[start:start + len(piece)] = piece
        check(model)
    return model


@settings(max_examples=400, deadline=None)
@given(base=st.binary(max_size=BLOCK), steps=steps)
def test_an_overlay_over_a_block_reads_as_the_writes_and_cuts_made_on_the_block(base, steps):
    overlay = Overlay(BLOCK)
    model = replay(base, steps, overlay.write, overlay.truncate)
    # a block may come out shorter than the model, by zeros: what it lacks reads as zeros
    # anyway (a block never reaches past its file's end, and a file grown reads zeros)
    block = overlay.over(base)
    assert len(block) <= len(model) and block + bytes(len(model) - len(block)) == model
    # stored as a patch and applied after another patch, it reads the same
    assert apply(base, [Overlay(BLOCK).encode(), overlay.encode()], BLOCK) == block
    spans = overlay.spans()
    assert all(s < e for s, e in spans) and all(a[1] < b[0] for a, b in zip(spans, spans[1:]))
    assert overlay.encoded_size() == len(overlay.encode())


@settings(max_examples=400, deadline=None)
@given(base=st.binary(max_size=BLOCK), steps=steps)
def test_a_dirty_block_reads_as_the_writes_and_cuts_made_on_it(base, steps):
    block = DirtyBlock(bytearray(base))

    def check(model: bytearray) -> None:
        assert block.data == model

    replay(base, steps, lambda start, piece: block.put(start, memoryview(piece)), block.cut, check)


def test_writes_that_touch_merge_into_one_extent():
    overlay = Overlay(BLOCK)
    overlay.write(10, b"x" * 5)
    overlay.write(20, b"y" * 5)
    overlay.write(15, b"z" * 5)  # adjoins both
    assert overlay.spans() == [(10, 25)]
    overlay.write(0, b"w" * 10)
    assert overlay.spans() == [(0, 25)] and overlay.covers() is None
    overlay.write(25, b"v" * (BLOCK - 25))
    assert overlay.covers() == b"w" * 10 + b"x" * 5 + b"z" * 5 + b"y" * 5 + b"v" * (BLOCK - 25)


def _patch(cut: int, *extents: tuple[int, bytes]) -> bytes:
    return struct.pack("<I", cut) + b"".join(struct.pack("<II", s, len(d)) + d for s, d in extents)


@pytest.mark.parametrize("bad", [
    b"\x00\x00",                                        # shorter than its header
    _patch(BLOCK + 1),                                  # cuts past the block
    _patch(0xFFFFFFFF, (BLOCK - 2, b"abc")),            # an extent past the block
    _patch(0xFFFFFFFF, (10, b"ab"), (5, b"cd")),        # extents out of order
    _patch(0xFFFFFFFF, (10, b"ab"), (11, b"cd")),       # overlapping
    _patch(0xFFFFFFFF, (10, b"")),                      # empty
    _patch(0xFFFFFFFF, (10, b"ab")) + b"\x01",          # bytes left over
    _patch(0xFFFFFFFF, (10, b"ab"))[:-1],               # an extent cut short
], ids=["short", "cut", "past", "order", "overlap", "empty", "trailing", "truncated"])
def test_a_malformed_patch_is_an_integrity_error(bad):
    with pytest.raises(IntegrityError):
        apply(b"base", [bad], BLOCK)


def test_a_patch_cuts_before_it_lays_its_extents():
    assert apply(b"0123456789", [_patch(4, (6, b"ab"))], BLOCK) == b"0123\x00\x00ab"
