"""The `tempfs` command: mount, umount, status, fsck.

Every failure of `tempfs mount` prints one line saying what is wrong and what to do, exits with
a code of its own (see `Exit`), and leaves the store as it was. `tempfs fsck` checks an unmounted
store and says by its exit code whether it was clean, repaired, or is left damaged.
"""
from __future__ import annotations

import argparse
import enum
import functools
import json
import logging
import os
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence

from .config import Config, ConfigError, default_config, default_config_text, load_config
from .keys import KeyFileError, check_key_location, create_key_file, read_key_file
from .mounts import FSTYPE, find_mount, fusermount_unmount, is_stale

if TYPE_CHECKING:
    from .store import Store
    from .store.check import CheckReport

log = logging.getLogger("tempfs")

STATUS_XATTR = "user.tempfs.status"
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


def _read_or_create_key(paths: Paths) -> bytes:
    try:
        check_key_location(paths.key, paths.mountpoint, paths.store)
        if paths.key.exists():
            return read_key_file(paths.key)
        if (paths.store / "meta.sqlite").exists():
            raise KeyFileError(f"{paths.key}: key file not found, and the store {paths.store} already holds data "
                               "encrypted with a key (restore the key file, or point --key-file at it)")
        log.info("created a new key in %s (mode 0600); keep it safe, without it the store is unreadable", paths.key)
        return create_key_file(paths.key)
    except KeyFileError as e:
        raise Failure(Exit.KEY, str(e)) from None


def preflight(args: argparse.Namespace) -> tuple[Paths, Config, bytes]:
    """Everything that can be checked without opening the store."""
    paths = resolve_paths(args)
    _check_fuse()
    config = _load_or_write_config(paths.config)
    _check_mountpoint(paths, args.allow_nonempty)
    key = _read_or_create_key(paths)
    return paths, config, key


def _setup_logging(foreground: bool, log_file: Optional[Path], verbose: bool, level: int = logging.INFO) -> None:
    handlers: list[logging.Handler] = []
    if foreground:
        handlers.append(logging.StreamHandler(sys.stderr))
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_file))
    logging.basicConfig(level=logging.DEBUG if verbose else level, handlers=handlers, force=True,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def cmd_mount(args: argparse.Namespace) -> int:
    if not args.foreground:
        return _mount_in_background(args)
    _setup_logging(True, Path(args.log_file) if args.log_file else None, args.verbose)
    paths, config, key = preflight(args)
    from .clock import daemon_clock
    from .daemon import serve
    store = _open_store(paths, key, config.dirty_limit, config.cache_limit, clock=daemon_clock())
    serve(store, config, paths.mountpoint, events_path=paths.events)
    return Exit.OK


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
    paths, _config, _key = preflight(args)
    child_args = [sys.executable, "-m", "tempfs", "mount", str(paths.mountpoint), "--foreground",
                  "--store", str(paths.store), "--config", str(paths.config), "--key-file", str(paths.key)]
    if args.allow_nonempty:
        child_args.append("--allow-nonempty")
    if args.verbose:
        child_args.append("--verbose")
    paths.log.parent.mkdir(parents=True, exist_ok=True)
    start = paths.log.stat().st_size if paths.log.exists() else 0
    # the daemon's stderr is its log: messages, and its one-line reason if it fails to start
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
                  f"  store:  {paths.store}\n  key:    {paths.key}\n  config: {paths.config}\n"
                  f"  log:    {paths.log}\n  unmount: tempfs umount {paths.mountpoint}")
            return Exit.OK
        time.sleep(0.05)
    child.terminate()
    raise Failure(Exit.FAILED, f"the daemon did not mount within {READY_TIMEOUT:.0f} s; see {paths.log}")


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
    _require_mount(mp)
    try:
        status = json.loads(os.getxattr(mp, STATUS_XATTR))
    except OSError as e:
        raise Failure(Exit.NOT_MOUNTED, f"{mp}: the tempfs daemon does not answer ({e.strerror})") from None
    if args.json:
        print(json.dumps(status, indent=2, sort_keys=True))
    else:
        print(format_status(mp, status))
    return Exit.OK


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


def format_status(mountpoint: Path, status: dict) -> str:
    rows = [("area", "files", "logical", "stored")]
    for area, u in sorted(status["areas"].items()):
        rows.append((area + "/", str(u["files"]), _size(u["logical_bytes"]), _size(u["stored_bytes"])))
    t = status["total"]
    rows.append(("total", str(t["files"]), _size(t["logical_bytes"]), _size(t["stored_bytes"])))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = [f"tempfs at {mountpoint}"]
    lines += ["  " + "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
              for r in rows]
    d = status["daemon"]
    lines.append(f"  dirty blocks in memory: {_size(d['dirty_bytes'])} (stored within seconds)")
    lines.append(f"  daemon pid {d['pid']}, version {d['version']}, up {d['uptime_seconds']:.0f} s, "
                 f"store {d['store']}, refused {d['refused']}, integrity errors {d['integrity_errors']}, "
                 f"expired {d.get('expired', 0)}")
    return "\n".join(lines)


# ---- fsck ----------------------------------------------------------------------------------
def cmd_fsck(args: argparse.Namespace) -> int:
    _setup_logging(True, None, False, level=logging.ERROR)  # the report says the rest
    paths = resolve_paths(args)
    if not (paths.store / "meta.sqlite").exists():
        raise Failure(Exit.USAGE, f"{paths.store}: there is no tempfs store there (pass --store DIR)")
    config = _fsck_config(paths.config)
    try:
        key = read_key_file(paths.key)
    except KeyFileError as e:
        raise Failure(Exit.KEY, str(e)) from None
    store = _open_store(paths, key, config.dirty_limit, 0)
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


# ---- the command line ----------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tempfs", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    m = sub.add_parser("mount", help="mount tempfs (default: data/temp of the project root)")
    m.add_argument("mountpoint", nargs="?")
    m.add_argument("--store", help="store folder (default: data/.tempfs-store)")
    m.add_argument("--config", help="config file (default: config/tempfs.toml; written with defaults if missing)")
    m.add_argument("--key-file", help="key file (default: config/tempfs.key; created for a new store)")
    m.add_argument("--log-file", help="daemon log (default: tempfs.log beside the store)")
    m.add_argument("--foreground", action="store_true", help="serve in the foreground, logging to stderr")
    m.add_argument("--allow-nonempty", action="store_true", help="mount over a folder that holds files")
    m.add_argument("--verbose", action="store_true", help="debug logging")
    m.set_defaults(func=cmd_mount)
    u = sub.add_parser("umount", help="flush everything and unmount")
    u.add_argument("mountpoint", nargs="?")
    u.set_defaults(func=cmd_umount)
    s = sub.add_parser("status", help="usage per area, from the running daemon")
    s.add_argument("mountpoint", nargs="?")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(func=cmd_status)
    f = sub.add_parser("fsck", help="check (and repair) an unmounted store")
    f.add_argument("--store", help="store folder (default: data/.tempfs-store)")
    f.add_argument("--key-file", help="key file (default: config/tempfs.key)")
    f.add_argument("--config", help="config file (default: config/tempfs.toml, or the defaults if missing)")
    f.add_argument("--no-repair", action="store_true", help="report problems, change nothing")
    f.add_argument("--quick", action="store_true", help="check that object files exist, not their content")
    f.add_argument("--json", action="store_true", help="machine-readable report")
    f.set_defaults(func=cmd_fsck, mountpoint=None, log_file=None)
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
