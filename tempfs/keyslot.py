"""Passphrase-protected stores: the master key wrapped in a key slot, STORE/keyslot.json.

    {"format": "tempfs-keyslot", "version": 1, "kdf": "scrypt", "n": 65536, "r": 8, "p": 1,
     "salt": "<base64>", "cipher": "aes-256-gcm", "nonce": "<base64>", "wrapped_key": "<base64>"}

Guarantees:
- The slot holds no secret in clear: the master key is sealed with AES-256-GCM under a key
  derived from the passphrase by scrypt (memory-hard: 64 MiB and about 0.3 s per try on this
  project's 2-core machine), with a fresh random salt at every write. It may live in the store.
- Every header field (format, version, KDF, its parameters, salt, cipher) is in the associated
  data: a slot with any field changed fails to open exactly as a wrong passphrase does, so a
  wrong passphrase or a tampered slot is detected before anything of the store is read.
- The KDF parameters of a slot are bounded before they are used, so a forged slot cannot make
  the daemon allocate more than MAX_KDF_MEMORY (the memory is freed once the key is derived).
- A slot is written atomically (temp file, fsync, rename or link, fsync of the folder): a crash
  leaves the old slot or the new one, never a torn one; a new slot never replaces an existing one.
- Passphrases come from a file (refused if group or others can read it), the environment, or a
  systemd credential, never from the command line; they never reach a log or a message.
"""
from __future__ import annotations

import base64
import binascii
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from .codec import MASTER_KEY_BYTES
from .keys import secret_file_problem

SLOT_NAME = "keyslot.json"
ENV_PASSPHRASE = "TEMPFS_PASSPHRASE"
ENV_NEW_PASSPHRASE = "TEMPFS_NEW_PASSPHRASE"
CREDENTIAL = "tempfs-passphrase"        # $CREDENTIALS_DIRECTORY/tempfs-passphrase (systemd LoadCredential=)
SOURCES = (f"--passphrase-file FILE, the environment variable {ENV_PASSPHRASE}, "
           f"or the systemd credential {CREDENTIAL}")

_FORMAT, _VERSION, _KDF, _CIPHER = "tempfs-keyslot", 1, "scrypt", "aes-256-gcm"
_FIELDS = {"format", "version", "kdf", "n", "r", "p", "salt", "cipher", "nonce", "wrapped_key"}
_SALT_BYTES, _NONCE_BYTES = 16, 12
MAX_KDF_MEMORY = 256 * 1024 * 1024      # scrypt uses 128 * n * r bytes
MAX_READ_BYTES = 4096                   # a slot is ~300 bytes, a passphrase far less


class KeySlotError(Exception):
    """The key slot or the passphrase cannot be used; the message says why and what to do."""


class WrongPassphraseError(KeySlotError):
    """The slot does not open with this passphrase (or its header was altered)."""


@dataclass(frozen=True)
class KdfParams:
    """scrypt's cost: n (CPU and memory, a power of two), r (block size), p (parallelism)."""
    n: int = 2 ** 16
    r: int = 8
    p: int = 1

    @property
    def memory(self) -> int:
        return 128 * self.n * self.r

    def check(self) -> None:
        ok = (self.n >= 2 ** 10 and self.n & (self.n - 1) == 0 and 1 <= self.r <= 32 and 1 <= self.p <= 16
              and self.memory <= MAX_KDF_MEMORY)
        if not ok:
            raise KeySlotError(f"scrypt parameters n={self.n} r={self.r} p={self.p} are out of bounds")


DEFAULT_KDF = KdfParams()


@dataclass(frozen=True)
class Passphrase:
    """A passphrase and where it came from (the source is safe to show; the secret is not)."""
    secret: bytes = field(repr=False)
    source: str


# ---- where passphrases come from ----------------------------------------------------------
def find_passphrase(file: Optional[Path], environ: Mapping[str, str] = os.environ) -> Optional[Passphrase]:
    """The passphrase from, in this order: `file`, $TEMPFS_PASSPHRASE, the systemd credential
    $CREDENTIALS_DIRECTORY/tempfs-passphrase; None if none of them is there."""
    if file is not None:
        return read_passphrase_file(file, "--passphrase-file")
    if environ.get(ENV_PASSPHRASE) is not None:
        return _passphrase(os.fsencode(environ[ENV_PASSPHRASE]), f"${ENV_PASSPHRASE}")
    credentials = environ.get("CREDENTIALS_DIRECTORY")
    if credentials and (Path(credentials) / CREDENTIAL).exists():
        # systemd makes credentials readable by the service alone: no mode check here
        path = Path(credentials) / CREDENTIAL
        return _passphrase(_read_bounded(path), f"the systemd credential {CREDENTIAL}")
    return None


def find_new_passphrase(file: Optional[Path], environ: Mapping[str, str] = os.environ) -> Optional[Passphrase]:
    """The new passphrase of `tempfs passwd`: `file`, else $TEMPFS_NEW_PASSPHRASE; else None."""
    if file is not None:
        return read_passphrase_file(file, "--new-passphrase-file")
    if environ.get(ENV_NEW_PASSPHRASE) is not None:
        return _passphrase(os.fsencode(environ[ENV_NEW_PASSPHRASE]), f"${ENV_NEW_PASSPHRASE}")
    return None


def read_passphrase_file(path: Path, option: str) -> Passphrase:
    """A passphrase file: a regular file that neither group nor others can read (as a key file)."""
    problem = secret_file_problem(path)
    if problem is not None:
        raise KeySlotError(f"{option} {path}: {problem}")
    return _passphrase(_read_bounded(path), f"{option} {path}")


def _read_bounded(path: Path) -> bytes:
    with open(path, "rb") as f:
        data = f.read(MAX_READ_BYTES + 1)
    if len(data) > MAX_READ_BYTES:
        raise KeySlotError(f"{path}: longer than {MAX_READ_BYTES} bytes; not a passphrase or key slot")
    return data


def _passphrase(raw: bytes, source: str) -> Passphrase:
    # `echo pw > file` and `printf 'pw\n'` must give the same passphrase as `printf pw`
    secret = raw.rstrip(b"\r\n")
    if not secret:
        raise KeySlotError(f"the passphrase from {source} is empty")
    return Passphrase(secret, source)


# ---- the slot ----------------------------------------------------------------------------
def create_slot(path: Path, master_key: bytes, passphrase: Passphrase, params: KdfParams = DEFAULT_KDF) -> None:
    """Writes a new slot wrapping `master_key`; never replaces an existing slot (FileExistsError)."""
    _write(path, _seal(master_key, passphrase, params), replace=False)


def replace_slot(path: Path, master_key: bytes, passphrase: Passphrase, params: KdfParams = DEFAULT_KDF) -> None:
    """Replaces the slot with one wrapping `master_key` under `passphrase` (a new salt and nonce)."""
    _write(path, _seal(master_key, passphrase, params), replace=True)


def open_slot(path: Path, passphrase: Passphrase) -> bytes:
    """The master key in the slot; WrongPassphraseError if this passphrase does not open it."""
    slot = _load(path)
    try:
        key = AESGCM(_derive(passphrase, slot)).decrypt(slot["nonce"], slot["wrapped_key"], _header(slot))
    except InvalidTag:
        raise WrongPassphraseError(f"wrong passphrase for {path.parent} (from {passphrase.source}), "
                                   f"or its {path.name} was altered; nothing was read or changed") from None
    if len(key) != MASTER_KEY_BYTES:
        raise KeySlotError(f"{path}: the key in it is not a tempfs master key")
    return key


def _seal(master_key: bytes, passphrase: Passphrase, params: KdfParams) -> bytes:
    if len(master_key) != MASTER_KEY_BYTES:
        raise ValueError("the master key must be 32 bytes")
    params.check()
    slot = {"format": _FORMAT, "version": _VERSION, "kdf": _KDF, "n": params.n, "r": params.r, "p": params.p,
            "salt": os.urandom(_SALT_BYTES), "cipher": _CIPHER, "nonce": os.urandom(_NONCE_BYTES)}
    slot["wrapped_key"] = AESGCM(_derive(passphrase, slot)).encrypt(slot["nonce"], master_key, _header(slot))
    text = {k: _b64(v) if isinstance(v, bytes) else v for k, v in slot.items()}
    return (json.dumps(text, indent=1) + "\n").encode()


def _derive(passphrase: Passphrase, slot: dict) -> bytes:
    return Scrypt(salt=slot["salt"], length=32, n=slot["n"], r=slot["r"], p=slot["p"]).derive(passphrase.secret)


def _header(slot: dict) -> bytes:
    """The associated data: every field but the nonce and the sealed key, in a canonical form."""
    fields = {k: _b64(v) if isinstance(v, bytes) else v for k, v in slot.items() if k not in ("nonce", "wrapped_key")}
    return json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()


def _load(path: Path) -> dict:
    """The slot, parsed and checked; KeySlotError if it is not a slot this tempfs can open."""
    try:
        raw = _read_bounded(path)
    except FileNotFoundError:
        raise KeySlotError(f"{path}: key slot not found") from None
    try:
        slot = json.loads(raw)
        if not isinstance(slot, dict) or set(slot) != _FIELDS:
            raise ValueError("unexpected fields")
        if (slot["format"], slot["version"], slot["kdf"], slot["cipher"]) != (_FORMAT, _VERSION, _KDF, _CIPHER):
            raise ValueError("unknown format, version, KDF or cipher")
        if not all(type(slot[k]) is int for k in ("n", "r", "p")):
            raise ValueError("KDF parameters are not integers")
        for name in ("salt", "nonce", "wrapped_key"):
            slot[name] = base64.b64decode(slot[name], validate=True)
        if len(slot["salt"]) < _SALT_BYTES or len(slot["nonce"]) != _NONCE_BYTES:
            raise ValueError("salt or nonce of the wrong size")
    except (ValueError, TypeError, binascii.Error) as e:  # json.JSONDecodeError is a ValueError
        raise KeySlotError(f"{path}: not a tempfs key slot this version can open ({e})") from None
    KdfParams(slot["n"], slot["r"], slot["p"]).check()
    return slot


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _write(path: Path, data: bytes, *, replace: bool) -> None:
    """temp file + fsync, then rename (replace) or link (create: fails if the slot exists),
    then fsync of the folder, so the slot is durable before anyone relies on it."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)  # left by a crashed run of this pid number
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        if replace:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_folder(path.parent)


def fsync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
