"""The master key file: 32 random bytes as 64 hex digits, mode 0600, outside the mount and the store.

Guarantees: a key file that group or others can read is refused (it is no longer a secret);
a key file is never created over an existing one; the key itself never reaches a log or a message.
"""
from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path

from .codec import MASTER_KEY_BYTES


class KeyFileError(Exception):
    """The key file cannot be used; the message says why and what to do."""


def create_key_file(path: Path) -> bytes:
    """Writes a fresh random key with mode 0600 and returns it."""
    key = secrets.token_bytes(MASTER_KEY_BYTES)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key.hex() + "\n")
        f.flush()
        os.fsync(f.fileno())
    return key


def read_key_file(path: Path) -> bytes:
    try:
        st = path.stat()
    except FileNotFoundError:
        raise KeyFileError(f"{path}: key file not found") from None
    if not stat.S_ISREG(st.st_mode):
        raise KeyFileError(f"{path}: key file is not a regular file")
    if st.st_mode & 0o077:
        raise KeyFileError(
            f"{path}: key file is readable by group or others (mode {stat.S_IMODE(st.st_mode):04o}); "
            f"run: chmod 600 {path}"
        )
    text = path.read_text(errors="replace").strip()
    try:
        key = bytes.fromhex(text)
    except ValueError:
        key = b""
    if len(key) != MASTER_KEY_BYTES:
        raise KeyFileError(f"{path}: not a tempfs key (expected {MASTER_KEY_BYTES * 2} hex digits)")
    return key


def check_key_location(key_path: Path, *forbidden: Path, what: str = "key") -> None:
    """Refuses a key file (or passphrase file: `what`) that lies inside the mount or the store."""
    key_dir = key_path.resolve().parent
    for place in forbidden:
        place = place.resolve()
        if key_dir == place or place in key_dir.parents:
            raise KeyFileError(f"{key_path}: the {what} must not live inside {place}; keep it under config/")
