"""The master key file: 32 random bytes as 64 hex digits, mode 0600, outside the mount and the store.

Guarantees: a key file that group or others can read is refused (it is no longer a secret);
a key file is never created over an existing one; the key itself never reaches a log or a message.
"""
from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path
from typing import Optional

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


def secret_file_problem(path: Path) -> Optional[str]:
    """Why `path` cannot hold a secret (missing, not a regular file, readable by group or
    others), or None: the one rule for key files and passphrase files."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return "not found"
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file"
    if st.st_mode & 0o077:
        return f"readable by group or others (mode {stat.S_IMODE(st.st_mode):04o}); run: chmod 600 {path}"
    return None


def read_key_file(path: Path) -> bytes:
    problem = secret_file_problem(path)
    if problem is not None:
        raise KeyFileError(f"{path}: key file {problem}")
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
