"""Unit tests of tempfs.codec: pure functions over bytes, no mount, no disk."""
from __future__ import annotations

import os
import random

import pytest

from tempfs.codec import DIGESTS, MASTER_KEY_BYTES, MAX_PLAIN_BYTES, ContentCodec, IntegrityError

BLOCK = 128 * 1024
MARKER = b"TEMPFS-PLAINTEXT-MARKER-7f3a9c"


@pytest.fixture
def codec() -> ContentCodec:
    return ContentCodec(os.urandom(MASTER_KEY_BYTES))


def _compressible(n: int) -> bytes:
    line = MARKER + b" frame 0001 face at (12, 34) confidence 0.98\n"
    return (line * (n // len(line) + 1))[:n]


def _incompressible(n: int) -> bytes:
    return os.urandom(n)


def _incompressible_with_marker(n: int) -> bytes:
    data = bytearray(os.urandom(n))
    for pos in range(0, n - len(MARKER), max(n // 8, len(MARKER))):
        data[pos:pos + len(MARKER)] = MARKER
    return bytes(data)


SAMPLES = {
    "empty": lambda: b"",
    "one-byte": lambda: b"x",
    "compressible-small": lambda: _compressible(1000),
    "compressible-block": lambda: _compressible(BLOCK),
    "incompressible-small": lambda: _incompressible(1000),
    "incompressible-block": lambda: _incompressible(BLOCK),
    "incompressible-marker-block": lambda: _incompressible_with_marker(BLOCK),
    "zeros-block": lambda: bytes(BLOCK),
    "odd-size": lambda: _compressible(BLOCK - 1),
}


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_round_trip(codec, name):
    plain = SAMPLES[name]()
    sealed, wrapped = codec.seal(42, plain)
    assert isinstance(sealed, bytes) and isinstance(wrapped, bytes)
    assert codec.open(42, sealed, wrapped) == plain


def test_round_trip_large_object_id(codec):
    oid = 2**63 - 1
    plain = _compressible(5000)
    sealed, wrapped = codec.seal(oid, plain)
    assert codec.open(oid, sealed, wrapped) == plain


def test_round_trip_with_another_codec_instance_of_same_key():
    key = os.urandom(MASTER_KEY_BYTES)
    plain = _compressible(BLOCK)
    sealed, wrapped = ContentCodec(key).seal(7, plain)
    assert ContentCodec(key).open(7, sealed, wrapped) == plain


def test_compressible_seals_smaller(codec):
    plain = _compressible(BLOCK)
    sealed, _ = codec.seal(1, plain)
    assert len(sealed) < len(plain) // 4


def test_incompressible_overhead_is_small(codec):
    plain = _incompressible(BLOCK)
    sealed, _ = codec.seal(1, plain)
    # kept raw: only header + nonce + tag are added
    assert len(plain) < len(sealed) <= len(plain) + 64


@pytest.mark.parametrize("name", ["compressible-small", "compressible-block", "incompressible-marker-block",
                                  "incompressible-small", "incompressible-block"])
def test_sealed_holds_no_plaintext(codec, name):
    plain = SAMPLES[name]()
    sealed, wrapped = codec.seal(3, plain)
    assert MARKER not in sealed and MARKER not in wrapped
    # no 32-byte window of the plaintext appears in the object
    for pos in range(0, len(plain) - 32, max(1, len(plain) // 64)):
        assert plain[pos:pos + 32] not in sealed


def test_each_seal_differs(codec):
    plain = _compressible(BLOCK)
    seals = [codec.seal(5, plain) for _ in range(4)]
    objects = {s for s, _ in seals}
    keys = {w for _, w in seals}
    assert len(objects) == 4 and len(keys) == 4
    # and every one still opens with its own wrapped key
    for sealed, wrapped in seals:
        assert codec.open(5, sealed, wrapped) == plain


def test_object_keys_are_per_object(codec):
    """A wrapped key of one seal does not open another seal of the same plaintext and id
    (fresh object key each time, not one derived from content)."""
    plain = _compressible(5000)
    sealed1, wrapped1 = codec.seal(5, plain)
    sealed2, wrapped2 = codec.seal(5, plain)
    with pytest.raises(IntegrityError):
        codec.open(5, sealed1, wrapped2)
    with pytest.raises(IntegrityError):
        codec.open(5, sealed2, wrapped1)


@pytest.mark.parametrize("name", ["empty", "compressible-small", "incompressible-small"])
def test_any_flipped_byte_is_detected(codec, name):
    plain = SAMPLES[name]()
    sealed, wrapped = codec.seal(9, plain)
    for pos in range(len(sealed)):
        for mask in (0x01, 0x80):
            bad = bytearray(sealed)
            bad[pos] ^= mask
            with pytest.raises(IntegrityError):
                codec.open(9, bytes(bad), wrapped)


def test_flipped_byte_in_block_sized_object_is_detected(codec):
    plain = _compressible(BLOCK)
    sealed, wrapped = codec.seal(9, plain)
    rng = random.Random(1)
    positions = set(range(0, 40)) | {len(sealed) - 1 - i for i in range(20)}
    positions |= {rng.randrange(len(sealed)) for _ in range(50)}
    for pos in sorted(positions):
        bad = bytearray(sealed)
        bad[pos] ^= 0x04
        with pytest.raises(IntegrityError):
            codec.open(9, bytes(bad), wrapped)


def test_flipped_byte_in_wrapped_key_is_detected(codec):
    sealed, wrapped = codec.seal(9, _compressible(1000))
    for pos in range(len(wrapped)):
        bad = bytearray(wrapped)
        bad[pos] ^= 0x10
        with pytest.raises(IntegrityError):
            codec.open(9, sealed, bytes(bad))


@pytest.mark.parametrize("name", ["empty", "compressible-block", "incompressible-block"])
def test_truncated_object_is_detected(codec, name):
    plain = SAMPLES[name]()
    sealed, wrapped = codec.seal(11, plain)
    lengths = set(range(0, min(len(sealed), 48))) | {len(sealed) - 1, len(sealed) - 16, len(sealed) // 2}
    for n in sorted(lengths):
        if n >= len(sealed):
            continue
        with pytest.raises(IntegrityError):
            codec.open(11, sealed[:n], wrapped)


def test_appended_bytes_are_detected(codec):
    sealed, wrapped = codec.seal(11, _compressible(1000))
    with pytest.raises(IntegrityError):
        codec.open(11, sealed + b"\0", wrapped)


def test_object_opened_under_another_id(codec):
    plain = _compressible(1000)
    sealed, wrapped = codec.seal(100, plain)
    for other in (101, 0, 2**63 - 1, 100 + 2**32):
        with pytest.raises(IntegrityError):
            codec.open(other, sealed, wrapped)


def test_swapped_objects_are_detected(codec):
    """Object B's file put where object A is expected (with A's key or B's key)."""
    sealed_a, wrapped_a = codec.seal(1, _compressible(1000))
    sealed_b, wrapped_b = codec.seal(2, b"other content " * 50)
    with pytest.raises(IntegrityError):
        codec.open(1, sealed_b, wrapped_a)
    with pytest.raises(IntegrityError):
        codec.open(1, sealed_b, wrapped_b)
    with pytest.raises(IntegrityError):
        codec.open(1, sealed_a, wrapped_b)


def test_wrapped_key_from_another_object(codec):
    plain = _compressible(1000)
    sealed, _ = codec.seal(20, plain)
    _, other_wrapped = codec.seal(21, plain)
    with pytest.raises(IntegrityError):
        codec.open(20, sealed, other_wrapped)


@pytest.mark.parametrize("wrapped", [b"", b"\0" * 5, b"\0" * 12, b"\0" * 60, os.urandom(60)])
def test_garbage_wrapped_key(codec, wrapped):
    sealed, _ = codec.seal(20, _compressible(1000))
    with pytest.raises(IntegrityError):
        codec.open(20, sealed, wrapped)


def test_another_master_key_cannot_open():
    a = ContentCodec(os.urandom(MASTER_KEY_BYTES))
    b = ContentCodec(os.urandom(MASTER_KEY_BYTES))
    for plain in (_compressible(BLOCK), _incompressible(1000), b""):
        sealed, wrapped = a.seal(77, plain)
        with pytest.raises(IntegrityError):
            b.open(77, sealed, wrapped)


def test_garbage_object_is_integrity_error(codec):
    _, wrapped = codec.seal(1, b"abc")
    for junk in (b"", b"TFO1", os.urandom(100), b"TFO1" + bytes(200)):
        with pytest.raises(IntegrityError):
            codec.open(1, junk, wrapped)


def test_key_check_value():
    k1, k2 = os.urandom(MASTER_KEY_BYTES), os.urandom(MASTER_KEY_BYTES)
    assert ContentCodec(k1).key_check_value() == ContentCodec(k1).key_check_value()
    assert ContentCodec(k1).key_check_value() != ContentCodec(k2).key_check_value()
    # it is not the key itself
    assert k1 not in ContentCodec(k1).key_check_value()


@pytest.mark.parametrize("algorithm", DIGESTS)
def test_digest_is_keyed_and_deterministic(algorithm):
    k1, k2 = os.urandom(MASTER_KEY_BYTES), os.urandom(MASTER_KEY_BYTES)
    c1, c1b, c2 = (ContentCodec(k, digest=algorithm) for k in (k1, k1, k2))
    data = _compressible(BLOCK)
    assert c1.digest(data) == c1b.digest(data)
    assert c1.digest(data) != c2.digest(data)
    assert c1.digest(data) != c1.digest(data[:-1] + b"?")
    assert len(c1.digest(data)) == 32
    import hashlib
    assert c1.digest(data) != hashlib.blake2b(data, digest_size=32).digest()
    assert c1.digest(data) != hashlib.sha256(data).digest()
    assert c1.digest(data) != ContentCodec(k1, digest=next(a for a in DIGESTS if a != algorithm)).digest(data)


def test_an_unknown_digest_is_refused():
    with pytest.raises(ValueError):
        ContentCodec(os.urandom(MASTER_KEY_BYTES), digest="md5")


@pytest.mark.parametrize("n", [0, 1, 31, 33, 64])
def test_master_key_must_be_32_bytes(n):
    with pytest.raises(ValueError):
        ContentCodec(bytes(n))


def test_too_large_block_is_refused(codec):
    with pytest.raises(ValueError):
        codec.seal(1, bytes(MAX_PLAIN_BYTES + 1))
