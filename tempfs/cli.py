"""The `tempfs` command: mount, umount, status, ls, erase, fsck, passwd.

Every failure of `tempfs mount` prints one line saying what is wrong and what to do, exits with
a code of its own (see `Exit`), and leaves the store as it was. `tempfs fsck` checks an unmounted
store and says by its exit code whether it was clean, repaired, or is left damaged.
"""
from __future__ import annotations

import argparse
import contextlib
import enum
import errno
import functools
import json
import logging
import os
import secrets
import sqlite3
import stat
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Optional, Sequence

from . import ephemeral
from .clock import iso_utc
from .codec import MASTER_KEY_BYTES
from .config import Config, ConfigError, default_config, default_config_text, load_config
from .keys import KeyFileError, check_key_location, create_key_file, read_key_file
from .keyslot import (ENV_NEW_PASSPHRASE, ENV_PASSPHRASE, SLOT_NAME, SOURCES, KeySlotError, Passphrase,
                      create_slot, find_new_passphrase, find_passphrase, open_slot, replace_slot)
from .mounts import FSTYPE, find_mount, fusermount_unmount, is_stale

if TYPE_CHECKING:
    from .store import Store
    from .store.check import CheckReport

log = logging.getLogger("tempfs")

STATUS_XATTR = "user.tempfs.status"
FOLDERS_XATTR = "user.tempfs.folders"
PID_XATTR = "user.tempfs.pid"
READY_TIMEOUT = 60.0
STOP_TIMEOUT = 120.0


class Exit(enum.IntEnum):
    OK = 0
    FAILED = 1          # unexpected error; the log has the details
    USAGE = 2
    CONFIG = 3          # config file malformed or impossible
    KEY = 4             # key missing, wrong, or too widely readable
    LOCKED = 5          # the store is in use by another daemon
    MOUNTPOINT = 6      # mountpoint missing, not a folder, not empty, or already mounted
    NO_FUSE = 7         # /dev/fuse, fusermount3 or libfuse missing
    NOT_MOUNTED = 8     # umount/status: nothing mounted there
    REPAIRED = 9        # fsck: problems were found and all were repaired
    DAMAGED = 10        # fsck: problems are left in the store (damage, or found with --no-repair)


class Failure(Exception):
    def __init__(self, code: Exit, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Paths:
    mountpoint: Path
    store: Path
    config: Path
    key: Path
    log: Path

    @property
    def events(self) -> Path:
        """The events file (JSON lines) beside the daemon's log."""
        return self.log.with_name(self.log.stem + "-events.jsonl")


def _root() -> Path:
    return Path(os.environ.get("TEMPFS_ROOT") or os.getcwd())


def resolve_paths(args: argparse.Namespace) -> Paths:
    root = _root()
    store = Path(args.store or root / "data" / ".tempfs-store").absolute()
    return Paths(
        mountpoint=Path(args.mountpoint or root / "data" / "temp").absolute(),
        store=store,
        config=Path(args.config or root / "config" / "tempfs.toml").absolute(),
        key=Path(args.key_file or root / "config" / "tempfs.key").absolute(),
        log=Path(args.log_file or store.parent / "tempfs.log").absolute(),
    )


# ---- mount ---------------------------------------------------------------------------------
def _check_fuse() -> None:
    if not os.path.exists("/dev/fuse"):
        raise Failure(Exit.NO_FUSE, "/dev/fuse is missing: load the fuse module (modprobe fuse) or run where FUSE is available")
    if not any(os.access(os.path.join(d, "fusermount3"), os.X_OK) for d in os.environ.get("PATH", "").split(":")):
        raise Failure(Exit.NO_FUSE, "fusermount3 not found: install fuse3 (apt-get install fuse3)")
    try:
        import pyfuse3  # noqa: F401
    except ImportError as e:
        raise Failure(Exit.NO_FUSE, f"pyfuse3 cannot load libfuse3 ({e}): install libfuse3 (apt-get install fuse3 libfuse3-dev)")


def _load_or_write_config(path: Path) -> Config:
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(default_config_text())
        log.info("wrote a default config to %s", path)
    try:
        return load_config(path)
    except ConfigError as e:
        raise Failure(Exit.CONFIG, str(e)) from None


def _inside(path: Path, folder: Path) -> bool:
    path, folder = path.resolve(), folder.resolve()
    return path == folder or folder in path.parents


def _check_mountpoint(paths: Paths, allow_nonempty: bool) -> None:
    mp = paths.mountpoint
    if is_stale(mp):
        log.warning("%s: stale mount of a dead daemon; cleaning it up", mp)
        fusermount_unmount(mp, lazy=True)
    entry = find_mount(mp)
    if entry is not None:
        what = "tempfs is already mounted" if entry.fstype == FSTYPE else f"{entry.fstype} is mounted"
        raise Failure(Exit.MOUNTPOINT, f"{mp}: {what} there (unmount it first: tempfs umount {mp})")
    if not mp.exists():
        raise Failure(Exit.MOUNTPOINT, f"{mp}: mountpoint does not exist (mkdir -p {mp})")
    if not mp.is_dir():
        raise Failure(Exit.MOUNTPOINT, f"{mp}: mountpoint is not a folder")
    if not allow_nonempty and any(mp.iterdir()):
        raise Failure(Exit.MOUNTPOINT, f"{mp}: mountpoint is not empty; its files would be hidden "
                                       "(move them away, or pass --allow-nonempty)")
    if _inside(paths.store, mp):
        raise Failure(Exit.MOUNTPOINT, f"{paths.store}: the store must not live inside the mountpoint {mp}")


# ---- the master key: a key file, a passphrase (key slot), or ephemeral ---------------------
@dataclass(frozen=True)
class MasterKey:
    """A store's master key and how it is held: `kind` is "file", "passphrase" or "ephemeral";
    `description` is what status and messages show (never the key). `key` is None only in the
    parent of a background ephemeral mount: the daemon makes that key itself."""
    key: Optional[bytes] = field(repr=False)
    kind: str
    description: str


@contextlib.contextmanager
def _key_failures() -> Iterator[None]:
    """Key problems as one-line failures with their exit codes."""
    try:
        yield
    except (KeyFileError, KeySlotError) as e:
        raise Failure(Exit.KEY, str(e)) from None
    except ephemeral.StoreBusyError as e:
        raise Failure(Exit.LOCKED, str(e)) from None
    except ephemeral.EphemeralError as e:
        raise Failure(Exit.USAGE, str(e)) from None


def _option_path(args: argparse.Namespace, name: str) -> Optional[Path]:
    value = getattr(args, name, None)
    return Path(value).absolute() if value else None


def _find_passphrase(paths: Paths, args: argparse.Namespace) -> Optional[Passphrase]:
    file = _option_path(args, "passphrase_file")
    if file is not None:
        check_key_location(file, paths.mountpoint, paths.store, what="passphrase file")
    return find_passphrase(file)


def _master_key(paths: Paths, args: argparse.Namespace, daemon: bool) -> MasterKey:
    """The key a mount uses. `daemon`: this process serves the mount (an ephemeral key is made here)."""
    with _key_failures():
        if getattr(args, "ephemeral", False):
            return _ephemeral_key(paths, args, daemon)
        passphrase = _find_passphrase(paths, args)
        ephemeral.clear_leftovers(paths.store)  # before anything decides whether the store is new
        if (paths.store / SLOT_NAME).exists():
            return _key_from_slot(paths, args, passphrase)
        if passphrase is not None:
            return _new_passphrase_store(paths, args, passphrase)
        return MasterKey(_read_or_create_key(paths), "file", str(paths.key))


def _existing_key(paths: Paths, args: argparse.Namespace) -> MasterKey:
    """The key of an existing store, for fsck: from its key slot or its key file, never made anew."""
    with _key_failures():
        if ephemeral.is_ephemeral(paths.store):
            raise KeyFileError(f"{paths.store}: an ephemeral store left by a daemon that did not unmount; its "
                               "key is gone with it, so nothing in it can be read (the next mount removes it)")
        passphrase = _find_passphrase(paths, args)
        if (paths.store / SLOT_NAME).exists():
            return _key_from_slot(paths, args, passphrase)
        if passphrase is not None:
            raise _given_a_passphrase(paths, passphrase)
        check_key_location(paths.key, paths.mountpoint, paths.store)
        return MasterKey(read_key_file(paths.key), "file", str(paths.key))


def _key_from_slot(paths: Paths, args: argparse.Namespace, passphrase: Optional[Passphrase]) -> MasterKey:
    slot = paths.store / SLOT_NAME
    if getattr(args, "key_file", None):
        raise Failure(Exit.USAGE, f"--key-file: {paths.store} is protected by a passphrase ({slot}), not a key "
                                  "file; drop --key-file (a lost passphrase is reset with the key file by "
                                  "tempfs passwd --key-file FILE)")
    if passphrase is None:
        raise KeySlotError(f"{paths.store} is protected by a passphrase: give it with {SOURCES} "
                           "(never on the command line)")
    return MasterKey(open_slot(slot, passphrase), "passphrase", f"passphrase ({slot})")


def _new_passphrase_store(paths: Paths, args: argparse.Namespace, passphrase: Passphrase) -> MasterKey:
    """A new store protected by a passphrase: a fresh random master key, wrapped in its key slot."""
    if (paths.store / "meta.sqlite").exists():
        raise _given_a_passphrase(paths, passphrase)
    if getattr(args, "key_file", None):
        raise Failure(Exit.USAGE, f"--key-file and a passphrase (from {passphrase.source}) exclude each other: "
                                  "a new store is protected by one or the other")
    slot = paths.store / SLOT_NAME
    key = secrets.token_bytes(MASTER_KEY_BYTES)
    try:
        create_slot(slot, key, passphrase)
    except FileExistsError:  # another mount of this new store made it first: that slot is the store's
        return _key_from_slot(paths, args, passphrase)
    log.info("protected the new store %s with a passphrase (from %s); its key slot is %s",
             paths.store, passphrase.source, slot)
    return MasterKey(key, "passphrase", f"passphrase ({slot})")


def _given_a_passphrase(paths: Paths, passphrase: Passphrase) -> KeySlotError:
    return KeySlotError(f"{paths.store} is encrypted with a key file, not a passphrase (one was given by "
                        f"{passphrase.source}); use its key file, or add a passphrase to it first: "
                        f"tempfs passwd --store {paths.store}")


def _ephemeral_key(paths: Paths, args: argparse.Namespace, daemon: bool) -> MasterKey:
    if getattr(args, "key_file", None) or getattr(args, "passphrase_file", None):
        raise Failure(Exit.USAGE, "--ephemeral makes a key of its own that lives only in the daemon's memory; "
                                  "drop --key-file and --passphrase-file")
    ephemeral.clear_leftovers(paths.store)
    ephemeral.check_usable(paths.store)
    if not daemon:
        return MasterKey(None, "ephemeral", ephemeral.KEY_DESCRIPTION)
    ephemeral.forbid_core_dumps()
    return MasterKey(ephemeral.start(paths.store), "ephemeral", ephemeral.KEY_DESCRIPTION)


def _read_or_create_key(paths: Paths) -> bytes:
    check_key_location(paths.key, paths.mountpoint, paths.store)
    if paths.key.exists():
        return read_key_file(paths.key)
    if (paths.store / "meta.sqlite").exists():
        raise KeyFileError(f"{paths.key}: key file not found, and the store {paths.store} already holds data "
                           "encrypted with a key (restore the key file, or point --key-file at it)")
    log.info("created a new key in %s (mode 0600); keep it safe, without it the store is unreadable", paths.key)
    return create_key_file(paths.key)


def _forget_passphrases() -> None:
    """The daemon drops passphrases from its environment once the key is unwrapped, so that the
    programs it runs (alert commands) do not inherit them."""
    for name in (ENV_PASSPHRASE, ENV_NEW_PASSPHRASE):
        os.environ.pop(name, None)


def preflight(args: argparse.Namespace, daemon: bool = True) -> tuple[Paths, Config, MasterKey]:
    """Everything that can be checked without opening the store."""
    paths = resolve_paths(args)
    _check_fuse()
    config = _load_or_write_config(paths.config)
    _check_mountpoint(paths, args.allow_nonempty)
    return paths, config, _master_key(paths, args, daemon)


def _setup_logging(foreground: bool, log_file: Optional[Path], verbose: bool, level: int = logging.INFO) -> None:
    handlers: list[logging.Handler] = []
    if foreground:
        handlers.append(logging.StreamHandler(sys.stderr))
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        _create_private(log_file)
        if not (foreground and _is_stderr(log_file)):  # a background daemon's stderr is its log already
            handlers.append(logging.FileHandler(log_file))
    logging.basicConfig(level=logging.DEBUG if verbose else level, handlers=handlers, force=True,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _is_stderr(path: Path) -> bool:
    try:
        a, b = os.fstat(2), os.stat(path)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _create_private(log_file: Path) -> None:
    """A new log is for the owner only: it names paths, which may carry personal identifiers."""
    os.close(os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600))


def cmd_mount(args: argparse.Namespace) -> int:
    metrics_addr = _metrics_address(getattr(args, "metrics_addr", None))  # a bad value: before anything else
    if not args.foreground:
        return _mount_in_background(args)
    _setup_logging(True, Path(args.log_file) if args.log_file else None, args.verbose)
    paths, config, master = preflight(args)
    _forget_passphrases()
    from .clock import daemon_clock
    from .daemon import serve
    try:
        metrics = _listen_for_metrics(*metrics_addr) if metrics_addr else None  # before the store and the mount
        store = _open_store(paths, master.key, config.dirty_limit, config.cache_limit, clock=daemon_clock())
        serve(store, config, paths.mountpoint, events_path=paths.events, metrics=metrics,
              key_path=master.description)
    finally:
        if master.kind == "ephemeral":  # its key dies with this process: so does its content
            ephemeral.remove_after_unmount(paths.store)
    return Exit.OK


def _metrics_address(text: Optional[str]) -> Optional[tuple[str, int]]:
    """--metrics-addr HOST:PORT, checked; a bad value is a usage error."""
    if text is None:
        return None
    try:
        from .metrics import AddressError, parse_address
    except ImportError as e:
        raise Failure(Exit.FAILED, f"--metrics-addr needs prometheus_client ({e}): "
                                   "install it (.venv/bin/pip install 'prometheus_client>=0.17')") from None
    try:
        return parse_address(text)
    except AddressError as e:
        raise Failure(Exit.USAGE, f"--metrics-addr {e}") from None


def _listen_for_metrics(host: str, port: int):
    """Binds the metrics endpoint before anything is mounted: an address that cannot be listened on
    (port in use, address not on this machine, a port below 1024 without root) fails the mount
    cleanly, with the store untouched, rather than leaving a mount that nobody monitors."""
    from .metrics import MetricsServer
    try:
        return MetricsServer(host, port)
    except OSError as e:
        where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        raise Failure(Exit.USAGE, f"--metrics-addr {where}: cannot listen there ({e.strerror or e}); "
                                  "choose another address or port, or stop what listens there") from None


def _open_store(paths: Paths, key: bytes, dirty_limit: int, cache_limit: int, **options) -> "Store":
    from .codec import ContentCodec
    from .store import Store, StoreLockedError, StoreOpenError, WrongKeyError
    try:
        return Store(paths.store, ContentCodec(key), dirty_limit=dirty_limit, cache_limit=cache_limit, **options)
    except StoreLockedError as e:
        raise Failure(Exit.LOCKED, str(e)) from None
    except WrongKeyError as e:
        raise Failure(Exit.KEY, str(e)) from None
    except StoreOpenError as e:
        raise Failure(Exit.FAILED, str(e)) from None


def _mount_in_background(args: argparse.Namespace) -> int:
    _setup_logging(True, None, args.verbose, level=logging.WARNING)  # the daemon logs the details
    paths, _config, master = preflight(args, daemon=False)
    child_args = [sys.executable, "-m", "tempfs", "mount", str(paths.mountpoint), "--foreground",
                  "--store", str(paths.store), "--config", str(paths.config), "--log-file", str(paths.log),
                  *_key_args(args, paths, master)]
    if args.allow_nonempty:
        child_args.append("--allow-nonempty")
    if args.verbose:
        child_args.append("--verbose")
    if getattr(args, "metrics_addr", None):
        child_args += ["--metrics-addr", args.metrics_addr]
    paths.log.parent.mkdir(parents=True, exist_ok=True)
    start = paths.log.stat().st_size if paths.log.exists() else 0
    # the daemon's stderr is its log: messages, and its one-line reason if it fails to start
    _create_private(paths.log)
    with open(os.devnull, "rb") as devnull, open(paths.log, "ab") as log_file:
        child = subprocess.Popen(child_args, stdin=devnull, stdout=subprocess.DEVNULL, stderr=log_file,
                                 start_new_session=True)
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        code = child.poll()
        if code is not None:
            print(_last_line(paths.log, start) or f"the daemon exited with code {code}", file=sys.stderr)
            return code or Exit.FAILED
        entry = find_mount(paths.mountpoint)
        if entry is not None and entry.fstype == FSTYPE:
            print(f"tempfs mounted at {paths.mountpoint} (daemon pid {child.pid})\n"
                  f"  store:  {paths.store}\n  key:    {master.description}\n  config: {paths.config}\n"
                  f"  log:    {paths.log}\n  unmount: tempfs umount {paths.mountpoint}")
            if getattr(args, "metrics_addr", None):
                print(f"  metrics: http://{args.metrics_addr}/metrics")
            return Exit.OK
        time.sleep(0.05)
    child.terminate()
    raise Failure(Exit.FAILED, f"the daemon did not mount within {READY_TIMEOUT:.0f} s; see {paths.log}")


def _key_args(args: argparse.Namespace, paths: Paths, master: MasterKey) -> list[str]:
    """How the daemon finds the key: the key file, the passphrase file (a passphrase from the
    environment or a systemd credential is inherited), or --ephemeral. Never a secret itself."""
    if master.kind == "ephemeral":
        return ["--ephemeral"]
    if master.kind == "passphrase":
        file = _option_path(args, "passphrase_file")
        return ["--passphrase-file", str(file)] if file else []
    return ["--key-file", str(paths.key)]


def _last_line(log_path: Path, start: int) -> str:
    try:
        with open(log_path, "rb") as f:
            f.seek(start)
            lines = f.read().decode(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return lines[-1] if lines else ""


# ---- umount and status ---------------------------------------------------------------------
def _require_mount(mountpoint: Path) -> None:
    entry = find_mount(mountpoint)
    if entry is None or entry.fstype != FSTYPE:
        raise Failure(Exit.NOT_MOUNTED, f"{mountpoint}: tempfs is not mounted there")


def cmd_umount(args: argparse.Namespace) -> int:
    mp = Path(args.mountpoint or _root() / "data" / "temp").absolute()
    _require_mount(mp)
    if is_stale(mp):
        fusermount_unmount(mp, lazy=True)
        print(f"{mp}: the daemon was gone; stale mount removed")
        return Exit.OK
    pid = int(os.getxattr(mp, PID_XATTR))
    result = fusermount_unmount(mp)
    if result.returncode != 0:
        raise Failure(Exit.FAILED, f"{mp}: cannot unmount: {result.stderr.strip()} (close the files open there)")
    deadline = time.monotonic() + STOP_TIMEOUT
    while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
        time.sleep(0.05)
    if os.path.exists(f"/proc/{pid}"):
        raise Failure(Exit.FAILED, f"{mp}: unmounted, but the daemon (pid {pid}) is still flushing after "
                                   f"{STOP_TIMEOUT:.0f} s")
    print(f"{mp}: unmounted; all data flushed")
    return Exit.OK


def cmd_status(args: argparse.Namespace) -> int:
    mp = Path(args.mountpoint or _root() / "data" / "temp").absolute()
    status = _daemon_status(mp)
    if args.folders:
        status["folders"] = _root_xattr(mp, FOLDERS_XATTR)
    if args.json:
        print(json.dumps(status, indent=2, sort_keys=True))
    elif sys.stdout.isatty():
        render_status(_console(), mp, status)
    else:
        sys.stdout.write(format_status(mp, status))
    return Exit.OK


def _daemon_status(mp: Path) -> dict:
    """The running daemon's status of the tempfs mounted at `mp`; NOT_MOUNTED if there is none."""
    entry = find_mount(mp)
    if entry is None:
        around = _enclosing_mount(Path(os.path.realpath(mp)))
        if around is not None and around.fstype == FSTYPE:
            raise Failure(Exit.NOT_MOUNTED, f"{mp}: not a mountpoint; it is inside the tempfs mount at "
                                            f"{around.mountpoint} (tempfs status {around.mountpoint})")
        raise Failure(Exit.NOT_MOUNTED, f"{mp}: nothing is mounted there, so there is no status to show "
                                        f"(mount it: tempfs mount {mp})")
    if entry.fstype != FSTYPE:
        raise Failure(Exit.NOT_MOUNTED, f"{mp}: {entry.fstype} is mounted there, not tempfs")
    return _root_xattr(mp, STATUS_XATTR)


def _root_xattr(mp: Path, name: str):
    try:
        return json.loads(os.getxattr(mp, name))
    except OSError as e:
        raise Failure(Exit.NOT_MOUNTED, f"{mp}: the tempfs daemon does not answer ({e.strerror})") from None


# ---- erase ---------------------------------------------------------------------------------
def cmd_erase(args: argparse.Namespace) -> int:
    from .erase import erase
    mp = Path(args.mountpoint or _root() / "data" / "temp").absolute()
    schema = _daemon_status(mp).get("schema_folders") or []
    if args.area and args.area not in schema:
        raise Failure(Exit.USAGE, f"{args.area}: not an area of the tempfs at {mp}")
    report = erase(mp, args.pattern, schema, area=args.area, dry_run=args.dry_run)
    if args.report:
        fd = os.open(args.report, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with open(fd, "w") as f:
            json.dump(report.to_dict(), f, indent=2)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(format_erasure(report, args.dry_run))
    return Exit.FAILED if report.failed else Exit.OK


def format_erasure(report, dry_run: bool) -> str:
    d = report.to_dict()
    verb = "would erase" if dry_run else "erased"
    lines = [f"tempfs erase {report.pattern!r} at {report.mountpoint} on {report.host}, "
             f"{report.started} .. {report.finished}:",
             f"  {verb} {d['entries']} entries, {_size(d['logical_bytes'])} ({_size(d['stored_bytes'])} stored)"]
    lines += [f"  - {e.path} ({e.kind}, {e.entries} entries, {e.logical_bytes} bytes)" for e in report.erased]
    lines += [f"  still open when erased (content goes at its last close): {p}" for p in report.open_when_erased]
    lines += [f"  FAILED: {line}" for line in report.failed]
    return "\n".join(lines)


def _console(file=None, width: Optional[int] = None):
    """A rich Console: styled on a terminal; plain text (no ANSI codes, no wrapping of long rows)
    when stdout is a pipe or a file."""
    from rich.console import Console
    if file is None and sys.stdout.isatty():
        return Console(highlight=False)
    return Console(file=file, width=width or PLAIN_WIDTH, highlight=False, color_system=None, emoji=False,
                   soft_wrap=False)


PLAIN_WIDTH = 200  # output to a pipe: rows stay on one line for grep and awk


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


def _or_dash(value, show=str) -> str:
    return "-" if value is None else show(value)


def _span(seconds: float) -> str:
    """3d 4h, 2h 5m, 7m 12s, 42s."""
    seconds = int(max(0, seconds))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes}m"
    if minutes:
        return f"{minutes}m {secs}s"
    return f"{secs}s"


def _parse_iso(text: Optional[str]) -> Optional[float]:
    if not text:
        return None
    try:
        from datetime import datetime
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except (TypeError, ValueError):
        return None


def _ago(iso: Optional[str], now: float) -> str:
    when = _parse_iso(iso)
    if when is None:
        return "-"
    return "just now" if when >= now else f"{_span(now - when)} ago"


def _until(iso: Optional[str], now: float) -> str:
    when = _parse_iso(iso)
    if when is None:
        return "-"
    return "due now" if when <= now else f"in {_span(when - now)}"


def _percent(value: Optional[float], digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f} %"


def _pair(a, b) -> str:
    return f"{_or_dash(a)} / {_or_dash(b)}"


def render_status(console, mountpoint: Path, status: dict) -> None:
    """`tempfs status` for people: the areas' space and life, then the daemon's facts. Every key
    may be missing (an older daemon): it shows as "-"."""
    from rich import box
    from rich.table import Table
    from rich.text import Text

    now = time.time()
    areas = status.get("areas") or {}
    daemon = status.get("daemon") or {}
    console.print(Text(f"tempfs at {mountpoint}", style="bold"), soft_wrap=True)

    space = Table(title="space", title_justify="left", box=box.SIMPLE_HEAD, show_edge=False)
    space.add_column("area")
    for name in ("files", "logical", "stored", "savings", "by dedup", "by lz4", "limit", "used"):
        space.add_column(name, justify="right")
    for area, u in sorted(areas.items()):
        _add_row(space, area + "/", _or_dash(u.get("files")), _or_dash(u.get("logical_bytes"), _size),
                 _or_dash(u.get("stored_bytes"), _size), _savings(u), *_saved_by(u),
                 _or_dash(u.get("limit_bytes"), _size),
                 _percent(u.get("percent_used") if "percent_used" in u else _used(u)))
    total = status.get("total") or {}
    space.add_section()
    _add_row(space, "total", _or_dash(total.get("files")), _or_dash(total.get("logical_bytes"), _size),
             _or_dash(total.get("stored_bytes"), _size), _savings(total), *_saved_by(total), "", "")
    console.print(space)
    if status.get("folders"):
        console.print()
        console.print(_folders_table(status["folders"]))
    if total.get("pack_bytes") is not None:
        console.print(f"  packs on disk: {_size(total['pack_bytes'])} (the stored bytes not kept in the metadata, "
                      "and deleted ones not compacted yet)", soft_wrap=True, style="dim")
    if daemon.get("dirty_bytes"):
        console.print(f"  ({_size(daemon['dirty_bytes'])} written is still in memory: its stored size, and the "
                      "savings, settle within seconds)", soft_wrap=True, style="dim")

    life = Table(title="life", title_justify="left", box=box.SIMPLE_HEAD, show_edge=False)
    life.add_column("area")
    for name in ("oldest change", "next deadline", "expired 1h / 24h", "evicted 1h / 24h", "evicted", "refused (full)"):
        life.add_column(name, justify="right")
    for area, u in sorted(areas.items()):
        _add_row(life, area + "/", _ago(u.get("oldest"), now), _until(u.get("next_deadline"), now),
                 _pair(u.get("expired_last_hour"), u.get("expired_last_day")),
                 _pair(u.get("evicted_last_hour"), u.get("evicted_last_day")),
                 _or_dash(u.get("evicted")), _or_dash(u.get("refused_full")))
    console.print()
    console.print(life)
    console.print()

    facts = Table(title="daemon", title_justify="left", box=None, show_header=False, padding=(0, 2, 0, 1))
    facts.add_column(style="bold")
    facts.add_column()
    for name, value in _daemon_facts(status, daemon, now):
        _add_row(facts, name, value)
    console.print(facts)

    alerts = daemon.get("alerts")
    if alerts is None:
        console.print("alerts: -")
    elif not alerts:
        console.print("alerts: none")
    else:
        console.print(f"[bold red]alerts: {len(alerts)} active[/bold red]")
        for alert in alerts:
            since = _ago(alert.get("since"), now)
            console.print(f"  - {alert.get('condition', '?')}: {alert.get('message', '')} (since {since})",
                          soft_wrap=True, markup=False)


def _saved_by(u: dict) -> tuple[str, str]:
    """Bytes saved by deduplication and by compression (negative: the seal's overhead)."""
    def show(n):
        return f"-{_size(-n)}" if n < 0 else _size(n)
    return _or_dash(u.get("dedup_saved_bytes"), show), _or_dash(u.get("compression_saved_bytes"), show)


def _folders_table(folders: dict):
    from rich import box
    from rich.table import Table
    table = Table(title="schema folders", title_justify="left", box=box.SIMPLE_HEAD, show_edge=False)
    table.add_column("folder")
    for name in ("files", "logical", "stored", "savings", "oldest change", "next deadline"):
        table.add_column(name, justify="right")
    now = time.time()
    for path, u in sorted(folders.items()):
        _add_row(table, path + "/", _or_dash(u.get("files")), _or_dash(u.get("logical_bytes"), _size),
                 _or_dash(u.get("stored_bytes"), _size), _savings(u), _ago(u.get("oldest"), now),
                 _until(u.get("next_deadline"), now))
    return table


def _add_row(table, *cells) -> None:
    """A row of literal text: a "[" in a path or a name is not rich markup."""
    from rich.text import Text
    table.add_row(*(Text(c) if isinstance(c, str) else c for c in cells))


def _savings(u: dict) -> str:
    logical, stored = u.get("logical_bytes"), u.get("stored_bytes")
    if not logical or stored is None:
        return "-"
    saved = round((1 - stored / logical) * 100)
    return f"{saved} %" if saved >= 0 else "none"  # tiny files: the seal's overhead outweighs them


def _used(u: dict) -> Optional[float]:
    limit, stored = u.get("limit_bytes"), u.get("stored_bytes")
    return None if not limit or stored is None else 100 * stored / limit


def _daemon_facts(status: dict, d: dict, now: float) -> list[tuple[str, str]]:
    def rate(key: str, show) -> str:
        return _or_dash(d.get(key), show)

    mib_s = lambda v: f"{v / 2**20:.2f} MiB/s"  # noqa: E731
    per_s = lambda v: f"{v:.1f}/s"  # noqa: E731
    runs, failures = d.get("cleanup_runs"), d.get("cleanup_failures")
    success = d.get("cleanup_success_rate")
    cleanup = f"{_or_dash(runs)} runs, {_or_dash(failures)} failed"
    if success is not None:
        cleanup += f", {success * 100:.2f} % succeeded"
    refused = _or_dash(d.get("refused"))
    if d.get("refused_last_hour") is not None:
        refused += f" ({d['refused_last_hour']} in the last hour)"
    hit = d.get("cache_hit_rate")
    disk = status.get("disk") or {}
    rows = [
        ("pid / version", f"{_or_dash(d.get('pid'))} / {_or_dash(d.get('version'))}"),
        ("uptime", _or_dash(d.get("uptime_seconds"), _span)),
        ("store", _or_dash(d.get("store"))),
        ("key", _or_dash(d.get("key"))),
        ("memory", f"RSS {_or_dash(d.get('rss_bytes'), _size)}, dirty {_or_dash(d.get('dirty_bytes'), _size)} "
                   "(written, stored within seconds)"),
        ("cache hit rate", "-" if hit is None else f"{hit * 100:.1f} %"),
        ("last minute", f"read {rate('read_bytes_per_second', mib_s)}, write {rate('write_bytes_per_second', mib_s)}, "
                        f"creates {rate('creates_per_second', per_s)}, deletes {rate('deletes_per_second', per_s)}"),
        ("cleanup", cleanup),
        ("expired / evicted", f"{_or_dash(d.get('expired'))} / {_or_dash(d.get('evicted'))}"),
        ("refused (layout)", refused),
        ("integrity errors", _or_dash(d.get("integrity_errors"))),
        ("disk free", f"{_or_dash(disk.get('free_bytes'), _size)} (floor {_or_dash(disk.get('min_free_bytes'), _size)})"),
        ("last check", _last_check(d.get("last_check"), now)),
    ]
    return rows


def _last_check(check: Optional[dict], now: float) -> str:
    if not check:
        return "none since the mount"
    finished = check.get("finished_ns")
    when = f"{_span(now - finished / 1e9)} ago" if finished else "-"
    damaged, repaired = len(check.get("damaged") or ()), len(check.get("repaired") or ())
    result = "clean" if check.get("clean") else f"{repaired} repaired, {damaged} damaged"
    return (f"{when}: {result}; {_or_dash(check.get('objects_checked'))} objects, "
            f"{_or_dash(check.get('bytes_checked'), _size)} in {_or_dash(check.get('seconds'))} s")


def format_status(mountpoint: Path, status: dict, width: Optional[int] = None) -> str:
    """The human status as plain text (no ANSI codes, no trailing blanks)."""
    return _plain(render_status, mountpoint, status, width=width)


def _plain(render, *args, width: Optional[int] = None) -> str:
    import io

    class Buffer(io.StringIO):
        encoding = getattr(sys.stdout, "encoding", None) or "utf-8"  # rich draws ASCII tables if not UTF-8
    out = Buffer()
    render(_console(file=out, width=width), *args)
    return "".join(line.rstrip() + "\n" for line in out.getvalue().splitlines())


# ---- ls ------------------------------------------------------------------------------------
TTL_XATTR = "user.tempfs.ttl"
EXPIRES_XATTR = "user.tempfs.expires"
STORED_XATTR = "user.tempfs.stored_size"
AREA_XATTR = "user.tempfs.area"
ENCRYPTED_XATTR = "user.tempfs.encrypted"


def _enclosing_mount(path: Path):
    """The mount `path` lives on (walking up to its mountpoint), or None."""
    for candidate in (path, *path.parents):
        entry = find_mount(candidate)
        if entry is not None:
            return entry
    return None


def cmd_ls(args: argparse.Namespace) -> int:
    target = Path(os.path.abspath(args.path or _root() / "data" / "temp"))
    where = Path(os.path.realpath(target))
    entry = _enclosing_mount(where)
    if entry is None or entry.fstype != FSTYPE:
        on = f" (it is on {entry.fstype} mounted at {entry.mountpoint})" if entry is not None else ""
        raise Failure(Exit.NOT_MOUNTED, f"{target}: not inside a tempfs mount{on}; "
                                        "give a path in one (e.g. tempfs ls data/temp/cache)")
    try:
        st = os.stat(target)
        if stat.S_ISDIR(st.st_mode):
            names = sorted(os.listdir(target))
            rows = [_ls_entry(target / name, name) for name in names]
            rows = [r for r in rows if r is not None]  # gone (expired) between listdir and lstat
        else:
            row = _ls_entry(target, target.name)
            if row is None:
                raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT))
            rows = [row]
    except FileNotFoundError:
        raise Failure(Exit.USAGE, f"{target}: no such file or folder (it may have expired)") from None
    except OSError as e:
        if e.errno in (errno.ENOTCONN, errno.ECONNABORTED):
            raise Failure(Exit.NOT_MOUNTED, f"{target}: the tempfs daemon does not answer ({e.strerror})") from None
        raise Failure(Exit.FAILED, f"{target}: cannot list it ({e.strerror})") from None
    if args.json:
        print(json.dumps(rows, indent=2))
    elif sys.stdout.isatty():
        render_ls(_console(), target, rows)
    else:
        sys.stdout.write(_plain(render_ls, target, rows))
    return Exit.OK


def _xattr(path: Path, name: str) -> Optional[str]:
    try:
        return os.getxattr(path, name, follow_symlinks=False).decode(errors="replace")
    except OSError:  # not a file or folder, not tempfs's, or an older daemon
        return None


def _ls_entry(path: Path, name: str) -> Optional[dict]:
    """One entry, read with standard calls: lstat and the user.tempfs.* attributes."""
    import grp
    import pwd
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    ttl_text = _xattr(path, TTL_XATTR)
    if ttl_text is None or ttl_text == "never":
        ttl = None
    else:
        try:
            ttl = int(float(ttl_text))
        except ValueError:
            ttl = None
    stored_text = _xattr(path, STORED_XATTR)
    stored = int(stored_text) if stored_text and stored_text.isdigit() else st.st_blocks * 512
    try:
        user = pwd.getpwuid(st.st_uid).pw_name
    except KeyError:
        user = str(st.st_uid)
    try:
        group = grp.getgrgid(st.st_gid).gr_name
    except KeyError:
        group = str(st.st_gid)
    target = None
    if stat.S_ISLNK(st.st_mode):
        try:
            target = _printable(os.readlink(path))
        except OSError:
            pass
    return {
        "name": _printable(name), "path": _printable(str(path)), "type": _kind(st.st_mode), "mode": stat.filemode(st.st_mode),
        "nlink": st.st_nlink, "uid": st.st_uid, "gid": st.st_gid, "user": user, "group": group,
        "size": st.st_size, "stored_bytes": stored, "stored_from": "xattr" if stored_text else "st_blocks",
        "mtime": _iso(st.st_mtime), "ttl_seconds": ttl, "never_expires": ttl_text == "never",
        "expires": _xattr(path, EXPIRES_XATTR), "area": _xattr(path, AREA_XATTR),
        "encrypted": _xattr(path, ENCRYPTED_XATTR), "symlink_target": target,
    }


def _printable(name: str) -> str:
    """A file name as text: bytes that are not UTF-8 show as U+FFFD."""
    return os.fsencode(name).decode(errors="replace")


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "folder"), (stat.S_ISREG, "file"), (stat.S_ISLNK, "symlink"),
                       (stat.S_ISFIFO, "fifo"), (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "char device"),
                       (stat.S_ISBLK, "block device")):
        if test(mode):
            return name
    return "other"


def _iso(seconds: float) -> str:
    return iso_utc(int(seconds * 1e9))


def _life(row: dict) -> str:
    if row["never_expires"]:
        return "never"
    if row["ttl_seconds"] is None:
        return "-"
    return _span(row["ttl_seconds"])


def render_ls(console, target: Path, rows: list[dict]) -> None:
    from rich import box
    from rich.table import Table
    from rich.text import Text

    table = Table(box=box.SIMPLE_HEAD, show_edge=False)
    table.add_column("mode")
    table.add_column("links", justify="right")
    table.add_column("owner")
    table.add_column("group")
    table.add_column("size", justify="right")
    table.add_column("stored", justify="right")
    table.add_column("modified")
    table.add_column("life left", justify="right")
    table.add_column("name")
    for r in rows:
        name = Text(r["name"] + ("/" if r["type"] == "folder" else ""))
        if r["symlink_target"] is not None:
            name.append(f" -> {r['symlink_target']}")
        modified = time.strftime("%Y-%m-%d %H:%M", time.localtime(_parse_iso(r["mtime"]) or 0))
        _add_row(table, r["mode"], str(r["nlink"]), r["user"], r["group"], str(r["size"]), _size(r["stored_bytes"]),
                 modified, _life(r), name)
    if not rows:
        console.print(f"{target}: empty", soft_wrap=True, markup=False)
        return
    console.print(table)


# ---- fsck ----------------------------------------------------------------------------------
def cmd_fsck(args: argparse.Namespace) -> int:
    _setup_logging(True, None, False, level=logging.ERROR)  # the report says the rest
    paths = resolve_paths(args)
    if not (paths.store / "meta.sqlite").exists():
        raise Failure(Exit.USAGE, f"{paths.store}: there is no tempfs store there (pass --store DIR)")
    config = _fsck_config(paths.config)
    store = _open_store(paths, _existing_key(paths, args).key, config.dirty_limit, 0)
    try:
        report = _run_check(store, repair=not args.no_repair, verify_content=not args.quick)
    except sqlite3.DatabaseError as e:
        raise Failure(Exit.FAILED, f"{paths.store / 'meta.sqlite'}: the metadata database is damaged ({e}); "
                                   "keep a copy of the store before trying anything else") from None
    finally:
        store.close()
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(format_report(paths.store, report, verified=not args.quick))
    if report.damaged:
        return Exit.DAMAGED
    return Exit.REPAIRED if report.repaired else Exit.OK


def _fsck_config(path: Path) -> Config:
    """The config if there is one (fsck writes none), else the defaults."""
    if not path.exists():
        return default_config()
    try:
        return load_config(path)
    except ConfigError as e:
        raise Failure(Exit.CONFIG, str(e)) from None


def _run_check(store: "Store", *, repair: bool, verify_content: bool) -> "CheckReport":
    """Runs the check with a progress bar on stderr when it is a terminal."""
    import trio
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from .store.check import check_store
    columns = (TextColumn("checking objects"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True), disable=not sys.stderr.isatty(), transient=True) as bar:
        task = bar.add_task("check", total=None)

        def progress(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)
        return trio.run(functools.partial(check_store, store, repair=repair, verify_content=verify_content,
                                          progress=progress))


def format_report(store_path: Path, report: "CheckReport", verified: bool) -> str:
    how = "content verified" if verified else "presence only (--quick)"
    seconds = (report.finished_ns - report.started_ns) / 1e9
    lines = [f"tempfs fsck {store_path}: {report.objects_checked} objects checked, "
             f"{_size(report.bytes_checked)} read ({how}) in {seconds:.1f} s"]
    for title, items in (("repaired", report.repaired), ("damaged", report.damaged), ("warnings", report.warnings)):
        if items:
            lines.append(f"{title}:")
            lines += [f"  - {item}" for item in items]
    if report.damaged:
        lines.append("result: the store has problems left (see damaged)")
    elif report.repaired:
        lines.append("result: repaired; the store is consistent now")
    else:
        lines.append("result: clean")
    return "\n".join(lines)


# ---- passwd --------------------------------------------------------------------------------
def cmd_passwd(args: argparse.Namespace) -> int:
    """Sets the passphrase of a store: rewrites its key slot alone (the data stays as it is), so
    it works while the store is mounted. The key comes from the slot with the current passphrase,
    or from the key file (--key-file, or a key-file store): that adds a passphrase to a key-file
    store, or resets a forgotten one."""
    _setup_logging(True, None, False, level=logging.WARNING)
    paths = resolve_paths(args)
    slot = paths.store / SLOT_NAME
    with _key_failures():
        if ephemeral.is_ephemeral(paths.store):
            raise Failure(Exit.USAGE, f"{paths.store}: an ephemeral store has no passphrase (its key lives "
                                      "only in its daemon's memory)")
        if not slot.exists() and not (paths.store / "meta.sqlite").exists():
            raise Failure(Exit.USAGE, f"{paths.store}: there is no tempfs store there (pass --store DIR)")
        new = find_new_passphrase(_option_path(args, "new_passphrase_file"))
        if new is None:
            raise Failure(Exit.USAGE, f"give the new passphrase with --new-passphrase-file FILE or the "
                                      f"environment variable {ENV_NEW_PASSPHRASE} (never on the command line)")
        if slot.exists() and not args.key_file:
            replace_slot(slot, _existing_key(paths, args).key, new)
            print(f"{paths.store}: passphrase changed; only {slot} was rewritten, the data is untouched")
            return Exit.OK
        key = _verified_key_file(paths)
        (replace_slot if slot.exists() else create_slot)(slot, key, new)
    print(f"{paths.store}: protected by the passphrase from {new.source} ({slot}); mount it with that "
          f"passphrase, without --key-file. The key file {paths.key} still opens the store: keep it "
          "offline as a backup, or remove it")
    return Exit.OK


def _verified_key_file(paths: Paths) -> bytes:
    """The key file's key, checked against the store's key check value (read without locking or
    changing the store: a daemon may be serving it)."""
    from .codec import ContentCodec
    check_key_location(paths.key, paths.mountpoint, paths.store)
    key = read_key_file(paths.key)
    if _stored_key_check(paths.store / "meta.sqlite") != ContentCodec(key).key_check_value():
        raise KeyFileError(f"{paths.key}: this key does not open the store {paths.store} (wrong key file?)")
    return key


def _stored_key_check(db: Path) -> Optional[bytes]:
    # Without a WAL file no daemon is writing: open it immutable, which creates no -wal/-shm files.
    mode = "ro" if db.with_name(db.name + "-wal").exists() else "ro&immutable=1"
    try:
        with contextlib.closing(sqlite3.connect(f"{db.absolute().as_uri()}?mode={mode}", uri=True)) as conn:
            row = conn.execute("SELECT value FROM meta WHERE key = 'key_check'").fetchone()
    except sqlite3.Error as e:
        raise Failure(Exit.FAILED, f"{db}: cannot read the store's key check value ({e})") from None
    return None if row is None else bytes(row[0])


# ---- the command line ----------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tempfs", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    m = sub.add_parser("mount", help="mount tempfs (default: data/temp of the project root)")
    m.add_argument("mountpoint", nargs="?")
    m.add_argument("--store", help="store folder (default: data/.tempfs-store)")
    m.add_argument("--config", help="config file (default: config/tempfs.toml; written with defaults if missing)")
    m.add_argument("--key-file", help="key file (default: config/tempfs.key; created for a new store)")
    m.add_argument("--passphrase-file", metavar="FILE",
                   help=f"read the passphrase from FILE (mode 0600); else ${ENV_PASSPHRASE} or the systemd "
                        "credential tempfs-passphrase. A new store given a passphrase gets no key file")
    m.add_argument("--ephemeral", action="store_true",
                   help="a fresh key kept only in the daemon's memory: the store's content is removed at "
                        "unmount, and is unreadable (and removed by the next mount) after a crash")
    m.add_argument("--log-file", help="daemon log (default: tempfs.log beside the store)")
    m.add_argument("--foreground", action="store_true", help="serve in the foreground, logging to stderr")
    m.add_argument("--allow-nonempty", action="store_true", help="mount over a folder that holds files")
    m.add_argument("--verbose", action="store_true", help="debug logging")
    m.add_argument("--metrics-addr", metavar="HOST:PORT",
                   help="serve Prometheus metrics at http://HOST:PORT/metrics (e.g. 127.0.0.1:9100)")
    m.set_defaults(func=cmd_mount)
    u = sub.add_parser("umount", help="flush everything and unmount")
    u.add_argument("mountpoint", nargs="?")
    u.set_defaults(func=cmd_umount)
    s = sub.add_parser("status", help="usage per area, from the running daemon")
    s.add_argument("mountpoint", nargs="?")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.add_argument("--folders", action="store_true",
                   help="also usage per schema folder (walks the tree: slower on big trees)")
    s.set_defaults(func=cmd_status)
    ls = sub.add_parser("ls", help="list a folder of a mount with each entry's remaining life and stored size")
    ls.add_argument("path", nargs="?", help="a folder or file inside a tempfs mount (default: data/temp)")
    ls.add_argument("--json", action="store_true", help="machine-readable output: a list of objects")
    ls.set_defaults(func=cmd_ls)
    e = sub.add_parser("erase", help="remove every entry whose name matches, shredded, with a report (GDPR erasure)")
    e.add_argument("pattern", help="a shell pattern for whole names, or a plain string any name containing it matches")
    e.add_argument("mountpoint", nargs="?")
    e.add_argument("--area", help="only below this area")
    e.add_argument("--dry-run", action="store_true", help="report what would go, remove nothing")
    e.add_argument("--json", action="store_true", help="the report as JSON")
    e.add_argument("--report", help="also write the report as JSON to this file (mode 0600), as evidence")
    e.set_defaults(func=cmd_erase)
    f = sub.add_parser("fsck", help="check (and repair) an unmounted store")
    f.add_argument("--store", help="store folder (default: data/.tempfs-store)")
    f.add_argument("--key-file", help="key file (default: config/tempfs.key)")
    f.add_argument("--passphrase-file", metavar="FILE", help="passphrase of a passphrase-protected store "
                   f"(else ${ENV_PASSPHRASE} or the systemd credential tempfs-passphrase)")
    f.add_argument("--config", help="config file (default: config/tempfs.toml, or the defaults if missing)")
    f.add_argument("--no-repair", action="store_true", help="report problems, change nothing")
    f.add_argument("--quick", action="store_true", help="check that every object's bytes are there, not their content")
    f.add_argument("--json", action="store_true", help="machine-readable report")
    f.set_defaults(func=cmd_fsck, mountpoint=None, log_file=None)
    p = sub.add_parser("passwd", help="set or change a store's passphrase (rewrites its key slot only)")
    p.add_argument("--store", help="store folder (default: data/.tempfs-store)")
    p.add_argument("--passphrase-file", metavar="FILE",
                   help=f"the current passphrase (else ${ENV_PASSPHRASE} or the systemd credential tempfs-passphrase)")
    p.add_argument("--new-passphrase-file", metavar="FILE",
                   help=f"the new passphrase (else ${ENV_NEW_PASSPHRASE})")
    p.add_argument("--key-file", help="take the key from this key file instead of the current passphrase: adds a "
                                      "passphrase to a key-file store (default: config/tempfs.key), or resets a lost one")
    p.set_defaults(func=cmd_passwd, mountpoint=None, log_file=None, config=None)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except Failure as e:
        print(f"tempfs {args.command}: {e}", file=sys.stderr)
        return int(e.code)
    except KeyboardInterrupt:
        return 130
