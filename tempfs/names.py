"""Metadata cipher: file names, symlink targets and extended attributes <-> what the store keeps.
Pure functions over bytes, no I/O.

Guarantees:
- A name is encrypted deterministically (AES-256-SIV) with its folder's inode number as
  associated data: the same name in the same folder always gives the same bytes, so a lookup
  is one indexed query, while equal names in different folders look unrelated. Names are padded
  to a multiple of 16 bytes, so the store shows a name's length only to that granularity.
- A name moved by someone editing the store to another folder no longer opens: `plain_name`
  raises IntegrityError instead of showing it there.
- Extended attribute names are encrypted the same way, bound to their inode; symlink targets and
  xattr values are sealed with AES-256-GCM (random nonce) bound to their inode (and, for a
  value, to its attribute's name), so a value swapped between files or attributes fails.
- The keys are derived from the key this cipher is given, independent of the content keys.
"""
from __future__ import annotations

import os
import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, AESSIV
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .codec import IntegrityError

_PAD = 16
_NONCE = 12
# stored forms of recent names (about 260 bytes each): a create asks the same one 3-4 times, and
# a kept entry row (store/db.py KEPT_ROWS) is found by its stored form, so as many are kept
NAMES_REMEMBERED = 1 << 16
_NAME, _XATTR_NAME, _TARGET, _XATTR_VALUE = b"name", b"xattr name", b"symlink target", b"xattr value"


class MetadataCipher:
    """Encrypts and decrypts the metadata of one store."""

    def __init__(self, key: bytes) -> None:
        self._siv = AESSIV(_derive(key, b"deterministic names", 64))
        self._gcm = AESGCM(_derive(key, b"sealed values", 32))
        self._names: dict[tuple[int, bytes], bytes] = {}

    def name(self, folder: int, plain: bytes) -> bytes:
        """The stored form of `plain` as an entry of `folder`: always the same bytes."""
        key = (folder, plain)
        stored = self._names.get(key)
        if stored is None:
            if len(self._names) >= NAMES_REMEMBERED:
                self._names.clear()
            stored = self._names[key] = self._siv.encrypt(_pad(plain), [_NAME, _ino(folder)])
        return stored

    def plain_name(self, folder: int, stored: bytes) -> bytes:
        return _unpad(self._siv_open(stored, [_NAME, _ino(folder)]))

    def xattr_name(self, ino: int, plain: bytes) -> bytes:
        return self._siv.encrypt(_pad(plain), [_XATTR_NAME, _ino(ino)])

    def plain_xattr_name(self, ino: int, stored: bytes) -> bytes:
        return _unpad(self._siv_open(stored, [_XATTR_NAME, _ino(ino)]))

    def target(self, ino: int, plain: bytes) -> bytes:
        return self._seal(plain, _TARGET + _ino(ino))

    def plain_target(self, ino: int, stored: bytes) -> bytes:
        return self._open(stored, _TARGET + _ino(ino))

    def xattr_value(self, ino: int, stored_name: bytes, plain: bytes) -> bytes:
        return self._seal(plain, _XATTR_VALUE + _ino(ino) + stored_name)

    def plain_xattr_value(self, ino: int, stored_name: bytes, stored: bytes) -> bytes:
        return self._open(stored, _XATTR_VALUE + _ino(ino) + stored_name)

    def _siv_open(self, stored: bytes, associated: list[bytes]) -> bytes:
        try:
            return self._siv.decrypt(bytes(stored), associated)
        except (InvalidTag, ValueError):
            raise IntegrityError("name failed authentication") from None

    def _seal(self, plain: bytes, associated: bytes) -> bytes:
        nonce = os.urandom(_NONCE)
        return nonce + self._gcm.encrypt(nonce, plain, associated)

    def _open(self, stored: bytes, associated: bytes) -> bytes:
        try:
            return self._gcm.decrypt(stored[:_NONCE], stored[_NONCE:], associated)
        except (InvalidTag, ValueError):
            raise IntegrityError("value failed authentication") from None


def _derive(key: bytes, purpose: bytes, length: int) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=b"tempfs metadata " + purpose).derive(key)


def _ino(ino: int) -> bytes:
    return struct.pack(">Q", ino)


def _pad(plain: bytes) -> bytes:
    # PKCS#7: always 1..16 bytes of padding, so unpadding is unambiguous
    n = _PAD - len(plain) % _PAD
    return plain + bytes([n]) * n


def _unpad(padded: bytes) -> bytes:
    n = padded[-1] if padded else 0
    if not 1 <= n <= _PAD or padded[-n:] != bytes([n]) * n:
        raise IntegrityError("name padding is malformed")
    return padded[:-n]
