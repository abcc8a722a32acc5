"""Content codec: plaintext block <-> stored object. Pure functions over bytes, no I/O.

Guarantees:
- An object holds no plaintext: the block is compressed with lz4 (kept raw when that does not
  shrink it, as with JPEG frames) and then sealed with AES-256-GCM.
- Every object has a key of its own, random, kept only in the metadata wrapped (AES-GCM) by a
  key derived from the master key. Destroying that wrapped key destroys the object's content
  for good, even for someone holding the master key and the sealed object (crypto-shredding).
- An object is bound to its identity: the object id is in the associated data of both the
  content and its wrapped key, and its dedup digest in that of the wrapped key, so a swapped,
  truncated or altered object, or an edited digest (which would let a later write deduplicate
  onto the wrong content), fails to open with `IntegrityError` instead of returning wrong data.
- A block map entry (file, block number -> object) carries a tag only the key can make, so an
  entry edited to point one file's block at another's object is detected.
- Deduplication uses a keyed digest of the plaintext, so equal digests in the metadata reveal
  nothing about content to someone without the master key: keyed BLAKE3 (7x faster than
  BLAKE2b, the slowest step of sealing before), or keyed BLAKE2b in stores created before it.
"""
from __future__ import annotations

import hashlib
import hmac
import os
import struct

import blake3
import lz4.block
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

MASTER_KEY_BYTES = 32
_MAGIC = b"TFO1"
_RAW, _LZ4 = 0, 1
_HEADER = struct.Struct(">4sBQ")  # magic, format, object id
_BLOCK = struct.Struct(">QQQ")  # inode, block number, object id
_LAYER = struct.Struct(">QQQQ")  # the same, and the layer of a patch (store/patch.py)
_NONCE = 12
_TAG = 16
SEAL_OVERHEAD = _HEADER.size + _NONCE + _TAG  # an object is at most this much larger than its block
# lz4.block stores the plaintext size in the frame; a hostile object must not make us allocate more.
MAX_PLAIN_BYTES = 16 * 1024 * 1024
DIGESTS = ("blake3", "blake2b")  # dedup digest algorithms; a new store takes the first


class IntegrityError(Exception):
    """A stored object is not what tempfs wrote: corrupted, truncated, swapped or forged."""


def _subkey(master: bytes, purpose: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"tempfs " + purpose).derive(master)


class ContentCodec:
    """Seals and opens blocks with keys derived from one master key."""

    def __init__(self, master_key: bytes, digest: str = DIGESTS[0]) -> None:
        if len(master_key) != MASTER_KEY_BYTES:
            raise ValueError("the master key must be 32 bytes")
        self._wrap = AESGCM(_subkey(master_key, b"object key wrapping"))
        self._digest_keys = {"blake2b": _subkey(master_key, b"dedup digest"),
                             "blake3": _subkey(master_key, b"dedup digest blake3")}
        self.use_digest(digest)
        self._check = _subkey(master_key, b"key check value")
        self._tag_key = _subkey(master_key, b"block map tag")
        self.metadata_key = _subkey(master_key, b"metadata")  # for names.MetadataCipher

    def key_check_value(self) -> bytes:
        """A value stored with the store, so a wrong key is detected before anything is touched."""
        return hmac.new(self._check, b"tempfs key check", hashlib.sha256).digest()

    def use_digest(self, algorithm: str) -> None:
        """Takes the dedup digest algorithm a store was created with (one of DIGESTS)."""
        if algorithm not in DIGESTS:
            raise ValueError(f"unknown dedup digest {algorithm!r}")
        self.digest_algorithm = algorithm

    def digest(self, plain: bytes) -> bytes:
        """Keyed digest of a block's plaintext: the deduplication key."""
        key = self._digest_keys[self.digest_algorithm]
        if self.digest_algorithm == "blake3":
            return blake3.blake3(plain, key=key).digest()
        return hashlib.blake2b(plain, key=key, digest_size=32).digest()

    def block_tag(self, inode: int, blockno: int, object_id: int, layer: int = 0) -> bytes:
        """Authenticates one block map entry: a block's base (layer 0) or one of its patches,
        in its place in their order."""
        entry = _LAYER.pack(inode, blockno, object_id, layer) if layer else _BLOCK.pack(inode, blockno, object_id)
        return hashlib.blake2b(entry, key=self._tag_key, digest_size=16).digest()

    def seal(self, object_id: int, plain: bytes, digest: bytes = b"") -> tuple[bytes, bytes]:
        """Returns (object bytes to store on disk, wrapped object key for the metadata); `digest`
        is the dedup digest the metadata records for it, bound to the key."""
        if len(plain) > MAX_PLAIN_BYTES:
            raise ValueError("block too large")
        fmt, body = _compress(plain)
        header = _HEADER.pack(_MAGIC, fmt, object_id)
        object_key = AESGCM.generate_key(bit_length=256)
        nonce = os.urandom(_NONCE)
        sealed = header + nonce + AESGCM(object_key).encrypt(nonce, body, header)
        return sealed, self._wrap_key(object_id, digest, object_key)

    def open(self, object_id: int, sealed: bytes, wrapped_key: bytes, digest: bytes = b"") -> bytes:
        """Returns the plaintext block, or raises IntegrityError."""
        if len(sealed) < SEAL_OVERHEAD:
            raise IntegrityError("object too short")
        header = sealed[: _HEADER.size]
        magic, fmt, stored_id = _HEADER.unpack(header)
        if magic != _MAGIC or stored_id != object_id or fmt not in (_RAW, _LZ4):
            raise IntegrityError("object header does not match its identity")
        object_key = self._unwrap_key(object_id, digest, wrapped_key)
        nonce = sealed[_HEADER.size : _HEADER.size + _NONCE]
        try:
            # a view, not a slice: a slice of the sealed bytes would copy the whole block once more
            body = AESGCM(object_key).decrypt(nonce, memoryview(sealed)[_HEADER.size + _NONCE :], header)
        except InvalidTag:
            raise IntegrityError("object failed authentication") from None
        return _decompress(fmt, body)

    def bind_digest(self, object_id: int, digest: bytes, wrapped_key: bytes) -> bytes:
        """Re-wraps a key wrapped before digests were bound (schema version 3 and older)."""
        return self._wrap_key(object_id, digest, self._unwrap_key(object_id, b"", wrapped_key))

    def _wrap_key(self, object_id: int, digest: bytes, object_key: bytes) -> bytes:
        nonce = os.urandom(_NONCE)
        return nonce + self._wrap.encrypt(nonce, object_key, _id_bytes(object_id) + digest)

    def _unwrap_key(self, object_id: int, digest: bytes, wrapped: bytes) -> bytes:
        try:
            return self._wrap.decrypt(wrapped[:_NONCE], wrapped[_NONCE:], _id_bytes(object_id) + digest)
        except (InvalidTag, ValueError):
            raise IntegrityError("object key failed authentication") from None


def _id_bytes(object_id: int) -> bytes:
    return struct.pack(">Q", object_id)


def _compress(plain: bytes) -> tuple[int, bytes]:
    packed = lz4.block.compress(plain, mode="fast", store_size=True)
    if len(packed) < len(plain):
        return _LZ4, packed
    return _RAW, plain


def _decompress(fmt: int, body: bytes) -> bytes:
    if fmt == _RAW:
        return body
    if len(body) < 4 or int.from_bytes(body[:4], "little") > MAX_PLAIN_BYTES:
        raise IntegrityError("object claims an impossible size")
    try:
        return lz4.block.decompress(body)
    except lz4.block.LZ4BlockError:
        raise IntegrityError("object failed to decompress") from None
