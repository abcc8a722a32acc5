"""Ephemeral stores (`tempfs mount --ephemeral`): a fresh random master key that lives only in
the daemon's memory, so nothing written to the store can outlive the daemon.

Guarantees:
- The key is made in the daemon process and never leaves its memory: it is never written,
  and never in a command line or an environment.
- The store folder is marked (STORE/ephemeral, durable before the database exists), so what a
  dead ephemeral daemon left behind (unreadable: its key died with it) is removed by the next
  mount of that store, ephemeral or not; after a clean unmount the daemon removes it itself.
- A store is wiped only while its lock (STORE/lock, the flock every daemon holds while it runs)
  is held by the wiper: a store in use is never touched. The marker is removed after the rest,
  so a wipe cut short is finished by the next mount.
- An ephemeral mount takes only an empty (or missing) folder, or one marked ephemeral: a
  persistent store or anything else found there is refused, never wiped.
"""
from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import resource
import secrets
import shutil
from pathlib import Path
from typing import Iterator

from .codec import MASTER_KEY_BYTES
from .keyslot import fsync_folder

log = logging.getLogger(__name__)

MARKER = "ephemeral"
LOCK = "lock"           # the file tempfs.store locks; the same flock, so the two exclude each other
KEY_DESCRIPTION = "ephemeral (memory only)"


class EphemeralError(Exception):
    """An ephemeral mount cannot use this store folder; the message says why."""


class StoreBusyError(EphemeralError):
    """A running daemon holds the store: it must not be wiped."""


def is_ephemeral(store: Path) -> bool:
    return (store / MARKER).exists()


def clear_leftovers(store: Path) -> bool:
    """Removes what a dead ephemeral daemon left in `store` (True if it did); StoreBusyError if
    a daemon still runs on it. Does nothing to a store that is not marked ephemeral."""
    if not is_ephemeral(store):
        return False
    with _locked(store):
        if not is_ephemeral(store):  # another mount cleared it meanwhile
            return False
        _remove_content(store, lock_too=False)
    log.warning("%s: removed the content of an ephemeral store whose daemon ended without unmounting "
                "(its key is gone, so it was unreadable)", store)
    return True


def check_usable(store: Path) -> None:
    """An ephemeral mount needs the store folder missing, empty, or marked ephemeral and cleared."""
    if not store.exists():
        return
    if not store.is_dir():
        raise EphemeralError(f"--ephemeral: {store} is not a folder")
    found = sorted(name for name in os.listdir(store) if name not in (LOCK, MARKER))
    if found:
        what = ("a persistent tempfs store" if {"meta.sqlite", "keyslot.json"} & set(found)
                else f"files ({', '.join(found[:3])}{', ...' if len(found) > 3 else ''})")
        raise EphemeralError(f"--ephemeral: {store} holds {what}, which an ephemeral mount would remove; "
                             "give the ephemeral mount a --store folder of its own")


def start(store: Path) -> bytes:
    """The daemon's side, before the store is opened: marks the folder and makes the key."""
    store.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(store / MARKER, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        os.write(fd, b"tempfs: this store's key lived only in its daemon's memory; "
                     b"the next mount removes everything here\n")
        os.fsync(fd)
    finally:
        os.close(fd)
    fsync_folder(store)
    return secrets.token_bytes(MASTER_KEY_BYTES)


def forbid_core_dumps() -> None:
    """For the daemon of an ephemeral store: a core dump would carry its key to the disk."""
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def remove_after_unmount(store: Path) -> None:
    """The daemon's side, once its store is closed: removes everything in the folder, the lock
    file last (while still held, so that no other daemon can have opened the store meanwhile)."""
    if not store.is_dir():
        return
    try:
        with _locked(store):
            _remove_content(store, lock_too=True)
    except StoreBusyError:
        log.warning("%s: another daemon holds the store; its ephemeral content is left to it", store)
        return
    log.info("%s: ephemeral store removed", store)


@contextlib.contextmanager
def _locked(store: Path) -> Iterator[None]:
    fd = os.open(store / LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StoreBusyError(f"{store}: the store is in use by another tempfs daemon "
                                 "(unmount it first: tempfs umount MOUNTPOINT)") from None
        yield
    finally:
        os.close(fd)


def _remove_content(store: Path, *, lock_too: bool) -> None:
    for entry in os.scandir(store):
        if entry.name in (LOCK, MARKER):
            continue
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path)
        else:
            os.unlink(entry.path)
    fsync_folder(store)  # the content is gone for good before the marker that says to remove it
    (store / MARKER).unlink(missing_ok=True)
    if lock_too:
        (store / LOCK).unlink(missing_ok=True)
    fsync_folder(store)
