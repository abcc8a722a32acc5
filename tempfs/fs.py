"""The FUSE front end: each kernel request becomes a store call, each refusal a deliberate errno.

This layer knows FUSE (entry and attribute replies, lookup counts, file handles) and enforces the
layout's rules, logging every refusal with its reason and the requesting process. It knows
nothing of SQL, lz4 or ciphers: those live below, in the store.
"""
from __future__ import annotations

import contextlib
import errno
import functools
import json
import logging
import os
import sqlite3
import stat
import time
import collections
from collections import Counter
from typing import Optional, Sequence

import pyfuse3
import trio
from pyfuse3 import FUSEError

from . import __version__, layout
from .clock import iso_utc
from .config import Alerts
from .monitor import Monitor
from .page_cache import PageCacheFiller
from .space import AreaRule, Space
from .store import BlockReadError, DamagedMetadata, Inode, Store, StoreError

log = logging.getLogger(__name__)

NAME_MAX = 255
XATTR_PREFIX = b"user.tempfs."
STATUS_XATTR = XATTR_PREFIX + b"status"
PID_XATTR = XATTR_PREFIX + b"pid"
FOLDERS_XATTR = XATTR_PREFIX + b"folders"
TTL_XATTR = XATTR_PREFIX + b"ttl"
EXPIRES_XATTR = XATTR_PREFIX + b"expires"
AREA_XATTR = XATTR_PREFIX + b"area"
STORED_XATTR = XATTR_PREFIX + b"stored_size"
ENCRYPTED_XATTR = XATTR_PREFIX + b"encrypted"
CONTENT_CIPHER = b"aes-256-gcm"  # what user.tempfs.encrypted says of every file's content
SCHEMA_FOLDER_MODE = 0o1777
KERNEL_CACHE_SECONDS = 300.0  # tempfs is the only writer: the kernel may cache long...
REAPER_NAP = 1.0              # ...but never past a deadline; the reaper looks again this often
PENDING_CACHE_SECONDS = 1.0   # ...nor long while a file's stored size is about to change
REAP_BATCH = 1000


_DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS}
# requests that change the store: refused with EIO once it is lost (removed while mounted)
_CHANGES = {"mkdir", "mknod", "symlink", "link", "unlink", "rmdir", "rename", "setattr", "setxattr",
            "removexattr", "create", "write", "fsync", "fsyncdir"}


def _errors(method):
    """Turns store errors into errnos; an unexpected error is logged and answered with EIO,
    because an exception escaping a handler would stop the whole FUSE loop."""
    @functools.wraps(method)
    async def wrapper(self, *args, **kwargs):
        started = self.last_request = time.perf_counter()
        self.in_flight += 1
        try:
            if self.store_lost and method.__name__ in _CHANGES:
                raise FUSEError(errno.EIO)  # said once in the log, by whoever found it lost
            return await method(self, *args, **kwargs)
        except FUSEError:
            raise
        except StoreError as e:
            raise FUSEError(e.errno) from None
        except BlockReadError as e:
            self._integrity_error(e.inode, "the content", e.reason, block=e.blockno)
            raise FUSEError(errno.EIO) from None
        except DamagedMetadata as e:
            self._integrity_error(e.inode, e.what, str(e))
            raise FUSEError(errno.EIO) from None
        except OSError as e:  # the disk under the store: ENOSPC, EIO, ...
            log.error("%s failed: %s", method.__name__, e)
            # a full or read-only disk means something to the program; the store's own paths
            # (ENOENT, EISDIR, ... of a pack) do not
            raise FUSEError(e.errno if e.errno in _DISK_ERRNOS else errno.EIO) from None
        except sqlite3.OperationalError as e:  # e.g. another process holds the metadata database
            log.error("%s failed: the metadata database: %s", method.__name__, e)
            raise FUSEError(errno.EIO) from None
        except Exception:
            log.exception("%s failed", method.__name__)
            raise FUSEError(errno.EIO) from None
        finally:
            self.in_flight -= 1
            self.monitor.observe(method.__name__, time.perf_counter() - started)
    return wrapper


def _handle(ino: int, writable: bool) -> int:
    """A file handle: the inode, and whether the handle may write (told again at release)."""
    return ino << 1 | writable


def _inode_of(fh: int) -> int:
    return fh >> 1


def _writes(open_flags: int) -> bool:
    return open_flags & os.O_ACCMODE != os.O_RDONLY


def _logged(method):
    """For requests that cannot answer with an errno (forget, release): log, never raise."""
    @functools.wraps(method)
    async def wrapper(self, *args, **kwargs):
        self.in_flight += 1
        try:
            return await method(self, *args, **kwargs)
        except Exception:
            log.exception("%s failed", method.__name__)
        finally:
            self.in_flight -= 1
    return wrapper


class TempFS(pyfuse3.Operations):
    supports_dot_lookup = False
    enable_writeback_cache = False

    def __init__(self, store: Store, rules: dict[str, AreaRule], min_free: int = 0,
                 monitor: Optional[Monitor] = None, alerts: Alerts = Alerts()) -> None:
        super().__init__()
        self.store = store
        self.monitor = monitor or Monitor()
        self.capacity = sum(rule.max_size or 0 for rule in rules.values())
        self.space = Space(store, rules, min_free, self.monitor, evict=self._evict,
                           is_open=lambda ino: self._opens[ino] > 0, alert_percent=alerts.capacity_percent)
        self.refusals_per_minute = alerts.refusals_per_minute
        self._refusals: dict[int, collections.deque[float]] = {}  # pid -> times of its recent refusals
        self.started = time.time()
        self.in_flight = 0  # requests being handled (some awaiting): the request loop does not spin then
        self.last_request = time.perf_counter()  # when the last one came: the reclaimer waits for a pause
        self._lookups: Counter[int] = Counter()
        self._opens: Counter[int] = Counter()
        self._writers: Counter[int] = Counter()   # handles that may write, and truncates under way
        self._changes: Counter[int] = Counter()   # of open files: bumped as a change of content begins
        self.page_cache = PageCacheFiller()
        self._waiting: set[int] = set()  # due, but open or a folder with entries: looked at next pass
        self._reaper_wake = trio.Event()
        self.initialized = trio.Event()  # set as the kernel's INIT is answered (daemon.py waits for it)
        self.last_check: Optional[dict] = None  # the report of the daemon's last whole-store check
        self.store_lost: Optional[str] = None     # why the store cannot be used any more (daemon.py)
        self.key_path: Optional[str] = None       # shown by status; set by whoever knows it

    # ---- replies -------------------------------------------------------------------------
    def _attributes(self, node: Inode) -> pyfuse3.EntryAttributes:
        attrs = pyfuse3.EntryAttributes()
        attrs.st_ino = node.id
        attrs.st_mode = node.mode
        attrs.st_nlink = node.nlink
        attrs.st_uid = node.uid
        attrs.st_gid = node.gid
        attrs.st_rdev = node.rdev
        attrs.st_size = node.size
        attrs.st_blksize = self.store.blocks.block_size
        # du shows what the file takes on disk: compressed, encrypted, plus what is not stored yet
        attrs.st_blocks = (node.stored_bytes + self.store.blocks.dirty_bytes_of(node.id) + 511) // 512
        attrs.st_atime_ns = node.atime_ns
        attrs.st_mtime_ns = node.mtime_ns
        attrs.st_ctime_ns = node.ctime_ns
        attrs.entry_timeout = attrs.attr_timeout = self._cache_seconds(node)
        return attrs

    def _cache_seconds(self, node: Inode) -> float:
        """How long the kernel may keep the entry: never past its deadline."""
        limit = KERNEL_CACHE_SECONDS
        if self.store.blocks.dirty_bytes_of(node.id):
            limit = PENDING_CACHE_SECONDS  # its stored size (du) changes once its data is stored
        if node.expires_ns is None:
            return limit
        return max(0.0, min(limit, (node.expires_ns - self.store.clock()) / 1e9))

    def _hidden(self, node: Inode) -> bool:
        """Past its deadline an entry is gone for programs at once, before the reaper reclaims
        it, unless it is open or a folder that still holds entries."""
        if node.expires_ns is None or node.expires_ns > self.store.clock() or self._opens[node.id] > 0:
            return False
        return not node.is_dir or self.store.is_empty(node.id)

    def _entry(self, node: Inode) -> pyfuse3.EntryAttributes:
        """An attribute reply that the kernel counts as a lookup."""
        self._lookups[node.id] += 1
        return self._attributes(node)

    def _refuse(self, reason: str, ctx: Optional[pyfuse3.RequestContext], path: str) -> FUSEError:
        pid = ctx.pid if ctx is not None else 0
        uid = ctx.uid if ctx is not None else -1
        command = _command(pid)
        self.monitor.count("refused")
        self.monitor.event("refused", reason, logging.WARNING, path=path, pid=pid, uid=uid, command=command)
        recent = self._refusals.setdefault(pid, collections.deque())
        now = time.monotonic()
        recent.append(now)
        while recent[0] < now - 60:
            recent.popleft()
        if len(recent) >= self.refusals_per_minute:
            self.monitor.alert(f"refusals:{pid}", f"repeated refused operations from {command} (pid {pid})",
                               pid=pid, uid=uid, command=command, path=path)
        return FUSEError(errno.EPERM)

    def _rearm_refusal_alerts(self) -> None:
        """A process that stopped being refused for a minute may raise its alert again."""
        quiet = time.monotonic() - 60
        for pid in [pid for pid, recent in self._refusals.items() if recent[-1] < quiet]:
            del self._refusals[pid]
            self.monitor.clear(f"refusals:{pid}")

    def _integrity_error(self, ino: int, what: str, reason: str, **fields) -> None:
        """The store was altered outside tempfs (or damaged): an event, and an alert per inode."""
        path = self.store.path_of(ino)
        self.monitor.count("integrity_errors")
        self.monitor.event("integrity_error", reason, logging.ERROR, path=path, **fields)
        self.monitor.alert(f"integrity:{ino}", f"{what} of {path} fails its integrity check", path=path)

    def _child_path(self, parent: int, name: bytes) -> str:
        base = self.store.path_of(parent).rstrip("/")
        return f"{base}/{name.decode(errors='replace')}"

    def _check_create(self, parent: int, name: bytes, is_dir: bool, ctx) -> Inode:
        """Returns the folder `parent` if the layout lets `name` be made there."""
        if len(name) > NAME_MAX:
            raise FUSEError(errno.ENAMETOOLONG)
        folder = self.store.inode(parent)
        reason = layout.create_refusal(folder.kind, is_dir)
        if reason:
            raise self._refuse(reason, ctx, self._child_path(parent, name))
        return folder

    def _check_schema(self, node: Inode, action: str, ctx, parent: Optional[int] = None,
                      name: bytes = b"") -> None:
        """Refuses `action` on a schema folder; the path (named `name` in `parent`, else any
        path of the node) is looked up only for the refusal's log line, off the common path."""
        reason = layout.schema_refusal(node.kind, action)
        if reason:
            path = self._child_path(parent, name) if parent is not None else self.store.path_of(node.id)
            raise self._refuse(reason, ctx, path)

    def _release_if_unused(self, ino: int, node: Optional[Inode] = None) -> None:
        """Frees what nobody can reach any more: a closed unnamed file's content at once, its
        inode once the kernel has forgotten it too. `node`: the inode as just changed, if known."""
        if self._opens[ino] > 0:
            return
        if self._lookups[ino] > 0:
            if node is None and ino in self.store.unlinked:  # a named inode has nothing to free: no query
                try:
                    node = self.store.inode(ino)
                except StoreError:
                    return
            if node is not None and node.nlink == 0:
                self.store.discard_content(node)
            return
        self._lookups.pop(ino, None)
        self._opens.pop(ino, None)
        # the reclaimer reads the link count again (a later link() may have named it): no query here
        unnamed = node.nlink == 0 if node is not None else ino in self.store.unlinked
        if unnamed:
            self._waiting.discard(ino)
            self.store.remove_inode(ino)

    # ---- names ---------------------------------------------------------------------------
    def _named(self, parent: int, name: bytes) -> Inode:
        """The entry `name` in folder `parent` refers to."""
        if len(name) > NAME_MAX:
            raise FUSEError(errno.ENAMETOOLONG)
        node = self.store.named(parent, name)
        if node is None:
            raise FUSEError(errno.ENOENT)
        return node

    @_errors
    async def lookup(self, parent_inode, name, ctx=None):
        node = self._named(parent_inode, name)
        if self._hidden(node):
            self._reaper_wake.set()
            raise FUSEError(errno.ENOENT)
        return self._entry(node)

    @_errors
    async def getattr(self, inode, ctx=None):
        return self._attributes(self.store.inode(inode))

    @_logged
    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        for ino, count in inode_list:
            self._lookups[ino] -= count
            self._release_if_unused(ino)

    @_errors
    async def mkdir(self, parent_inode, name, mode, ctx):
        return self._entry(self._make(parent_inode, name, stat.S_IFDIR | stat.S_IMODE(mode), ctx))

    @_errors
    async def mknod(self, parent_inode, name, mode, rdev, ctx):
        return self._entry(self._make(parent_inode, name, mode, ctx, rdev=rdev))

    @_errors
    async def symlink(self, parent_inode, name, target, ctx):
        return self._entry(self._make(parent_inode, name, stat.S_IFLNK | 0o777, ctx, target=target))

    def _make(self, parent: int, name: bytes, mode: int, ctx, rdev: int = 0,
              target: Optional[bytes] = None) -> Inode:
        """Creates an entry where the layout allows it, with the owner Linux would give it:
        in a set-group-ID folder, the folder's group (and a new folder keeps the bit)."""
        is_dir = stat.S_ISDIR(mode)
        folder = self._check_create(parent, name, is_dir, ctx)
        self._clear_expired(parent, name)
        if not stat.S_ISLNK(mode):
            mode &= ~ctx.umask
        gid = ctx.gid
        if folder.mode & stat.S_ISGID:
            gid = folder.gid
            if is_dir:
                mode |= stat.S_ISGID
        node = self.store.make(parent, name, mode, ctx.uid, gid, rdev=rdev, target=target)
        self.monitor.count("creates")
        return node

    @_errors
    async def readlink(self, inode, ctx):
        node = self.store.inode(inode)
        if node.target is None:
            raise FUSEError(errno.EINVAL)
        return node.target

    @_errors
    async def link(self, inode, new_parent_inode, new_name, ctx):
        self._check_create(new_parent_inode, new_name, False, ctx)
        self._clear_expired(new_parent_inode, new_name)
        return self._entry(self.store.link(inode, new_parent_inode, new_name))

    @_errors
    async def unlink(self, parent_inode, name, ctx):
        await self._remove(parent_inode, name, ctx, want_dir=False)

    @_errors
    async def rmdir(self, parent_inode, name, ctx):
        await self._remove(parent_inode, name, ctx, want_dir=True)

    async def _remove(self, parent: int, name: bytes, ctx, want_dir: bool) -> None:
        node = self._named(parent, name)
        self._check_schema(node, "removed", ctx, parent, name)
        node = self.store.unlink(parent, name, want_dir=want_dir, discard=self._opens[node.id] == 0)
        self.monitor.count("deletes")
        self._release_if_unused(node.id, node)

    @_errors
    async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx):
        if len(name_new) > NAME_MAX:
            raise FUSEError(errno.ENAMETOOLONG)
        node = self._named(parent_inode_old, name_old)
        self._check_schema(node, "renamed", ctx, parent_inode_old, name_old)
        self._clear_expired(parent_inode_new, name_new)
        target_ino = self.store.lookup(parent_inode_new, name_new)
        if target_ino is not None:
            self._check_schema(self.store.inode(target_ino), "replaced", ctx, parent_inode_new, name_new)
        exchange = bool(flags & pyfuse3.RENAME_EXCHANGE)
        if parent_inode_new != parent_inode_old or exchange:
            self._check_create(parent_inode_new, name_new, node.is_dir, ctx)
            if exchange and target_ino is not None:
                self._check_create(parent_inode_old, name_old, self.store.inode(target_ino).is_dir, ctx)
        async with contextlib.AsyncExitStack() as rooms:
            await rooms.enter_async_context(self._room_to_move(node, self.store.inode(parent_inode_new).area))
            if exchange and target_ino is not None:
                await rooms.enter_async_context(self._room_to_move(self.store.inode(target_ino), node.area))
            replaced = self.store.rename(parent_inode_old, name_old, parent_inode_new, name_new,
                                         noreplace=bool(flags & pyfuse3.RENAME_NOREPLACE), exchange=exchange)
        if replaced is not None:
            self._release_if_unused(replaced.id, replaced)

    def _room_to_move(self, node: Inode, area: Optional[str]):
        """Room in `area` for an entry moving in from another area (its limit holds for mv too)."""
        need = 0 if area == node.area else self.store.subtree_stored(node.id)
        return self.space.room(area, need)

    # ---- attributes ----------------------------------------------------------------------
    @_errors
    async def setattr(self, inode, attr, fields, fh, ctx):
        node = self.store.inode(inode)
        changes: dict[str, int] = {}
        if fields.update_mode:
            self._check_schema(node, "re-moded", ctx)
            changes["mode"] = stat.S_IFMT(node.mode) | stat.S_IMODE(attr.st_mode)
        if fields.update_uid and attr.st_uid != node.uid:
            self._check_schema(node, "re-owned", ctx)
            changes["uid"] = attr.st_uid
        if fields.update_gid and attr.st_gid != node.gid:
            self._check_schema(node, "re-owned", ctx)
            changes["gid"] = attr.st_gid
        if fields.update_atime:
            changes["atime_ns"] = attr.st_atime_ns
        if fields.update_mtime:
            changes["mtime_ns"] = attr.st_mtime_ns
        if fields.update_size:
            if node.is_dir:
                raise FUSEError(errno.EISDIR)
            async with self._changing(inode):
                await self.store.truncate(inode, attr.st_size)
        # Every change of attributes changes ctime, even one to the values they have (chown to
        # the same owner); FUSE does not pass the kernel's ctime update on (only with writeback
        # caching), so it is done here for every request.
        self.store.set_attrs(inode, **changes)
        return self._attributes(self.store.inode(inode))

    @_errors
    async def getxattr(self, inode, name, ctx):
        if inode == pyfuse3.ROOT_INODE and name == STATUS_XATTR:
            return json.dumps(self.status()).encode()
        if inode == pyfuse3.ROOT_INODE and name == FOLDERS_XATTR:  # a walk of the tree: asked for apart
            return json.dumps(self._folders()).encode()
        if inode == pyfuse3.ROOT_INODE and name == PID_XATTR:
            return str(os.getpid()).encode()
        if name in (EXPIRES_XATTR, TTL_XATTR):
            return self._deadline_text(self.store.inode(inode), remaining=(name == TTL_XATTR))
        if name.startswith(XATTR_PREFIX):
            value = self._facts(self.store.inode(inode)).get(name)
        elif name.startswith(b"user."):
            value = self.store.get_xattr(inode, name)
        else:  # only user.* can be set (setxattr); the kernel asks security.capability at every write
            value = None
        if value is None:
            raise FUSEError(pyfuse3.ENOATTR)
        return value

    def _deadline_text(self, node: Inode, remaining: bool) -> bytes:
        if node.expires_ns is None:
            return b"never"
        if remaining:
            return str(max(0, (node.expires_ns - self.store.clock()) // 10**9)).encode()
        return iso_utc(node.expires_ns, millis=True).encode()

    def _set_ttl(self, node: Inode, value: bytes, ctx) -> None:
        self._check_schema(node, "given a ttl (they never expire)", ctx)
        try:
            seconds = float(value.decode().strip())
        except (UnicodeDecodeError, ValueError):
            raise FUSEError(errno.EINVAL) from None
        if not 0 < seconds < 1e12:
            raise FUSEError(errno.EINVAL)
        self.store.set_ttl(node.id, seconds)
        self._reaper_wake.set()

    @_errors
    async def setxattr(self, inode, name, value, ctx):
        if name == TTL_XATTR:
            return self._set_ttl(self.store.inode(inode), value, ctx)
        if name.startswith(XATTR_PREFIX):
            raise self._refuse("tempfs attributes are read-only", ctx, self.store.path_of(inode))
        if not name.startswith(b"user."):
            raise FUSEError(errno.ENOTSUP)
        self.store.set_xattr(inode, name, value)

    @_errors
    async def removexattr(self, inode, name, ctx):
        if name == TTL_XATTR:  # back to the policy's life
            return self.store.set_ttl(inode, None)
        if name.startswith(XATTR_PREFIX):
            raise self._refuse("tempfs attributes are read-only", ctx, self.store.path_of(inode))
        if not self.store.remove_xattr(inode, name):
            raise FUSEError(pyfuse3.ENOATTR)

    def _facts(self, node: Inode) -> dict[bytes, bytes]:
        """The read-only user.tempfs.* attributes of an entry (the kernel allows user.*
        attributes on files and folders only)."""
        if not (node.is_dir or stat.S_ISREG(node.mode)) or node.area is None:
            return {}
        facts = {AREA_XATTR: node.area.encode()}
        if node.expires_ns is not None:
            facts[EXPIRES_XATTR] = self._deadline_text(node, remaining=False)
        if not node.is_dir:
            stored = node.stored_bytes + self.store.blocks.dirty_bytes_of(node.id)
            facts[STORED_XATTR] = str(stored).encode()
            facts[ENCRYPTED_XATTR] = CONTENT_CIPHER
        return facts

    @_errors
    async def listxattr(self, inode, ctx):
        return self.store.xattr_names(inode) + list(self._facts(self.store.inode(inode)))

    # ---- folders -------------------------------------------------------------------------
    @_errors
    async def opendir(self, inode, ctx):
        if not self.store.inode(inode).is_dir:
            raise FUSEError(errno.ENOTDIR)
        return inode

    @_errors
    async def readdir(self, fh, start_id, token):
        after = start_id
        while rows := self.store.children(fh, after):
            for entry_id, name, ino in rows:
                node = self.store.inode(ino)
                after = entry_id
                if self._hidden(node):
                    continue
                if not pyfuse3.readdir_reply(token, name, self._attributes(node), entry_id):
                    return
                self._lookups[ino] += 1

    async def releasedir(self, fh):
        pass

    @_errors
    async def fsyncdir(self, fh, datasync):
        # also checkpoints the metadata, so names and keys removed so far leave no trace in
        # its log (what `tempfs erase` relies on); programs rarely fsync folders, so it is cheap
        await self.store.commit(durable=True, shred=True)

    # ---- files ---------------------------------------------------------------------------
    @_errors
    async def create(self, parent_inode, name, mode, flags, ctx):
        node = self._make(parent_inode, name, stat.S_IFREG | stat.S_IMODE(mode), ctx)
        self._opens[node.id] += 1  # a new file is used now: make() set its LRU time
        writable = _writes(flags)
        self._writers[node.id] += writable
        return pyfuse3.FileInfo(fh=_handle(node.id, writable)), self._entry(node)

    @_errors
    async def open(self, inode, flags, ctx):
        node = self.store.inode(inode)
        if node.is_dir:
            raise FUSEError(errno.EISDIR)
        if node.nlink == 0 and self._opens[inode] == 0:
            # its content went with its last name (deleted, expired, evicted): reached through a
            # name the kernel has not dropped yet, or an O_PATH descriptor, it would read as empty
            raise FUSEError(errno.ENOENT)
        writable = _writes(flags)
        if writable or flags & os.O_TRUNC:
            async with self._changing(inode):
                if flags & os.O_TRUNC:  # libfuse 3 hands O_TRUNC to open, not to setattr
                    await self.store.truncate(inode, 0)  # even of an empty file: mtime and ctime change
                self._writers[inode] += writable  # for as long as the handle lives
        self._opens[inode] += 1
        self.store.touch_used(inode)
        # content changes only through this mount (tempfs is the only writer, and an inode number
        # is never reused), so the kernel's page cache stays valid from one open to the next
        return pyfuse3.FileInfo(fh=_handle(inode, writable), keep_cache=True)

    @contextlib.asynccontextmanager
    async def _changing(self, ino: int):
        """Around the start of a change of content: what reads in flight and the page cache
        filler hold of the file is older, so it must not reach the kernel's cache after it."""
        self._writers[ino] += 1
        self._changes[ino] += 1
        try:
            await self.page_cache.quiesce(ino)
            yield
        finally:
            self._writers[ino] -= 1
            self._forget_unused_handles(ino)

    def _forget_unused_handles(self, ino: int) -> None:
        if self._writers[ino] <= 0:
            self._writers.pop(ino, None)
        if self._opens[ino] <= 0:
            self._changes.pop(ino, None)  # no read is in flight: the count may start again

    @_errors
    async def read(self, fh, off, size):
        ino = _inode_of(fh)
        if size < self.store.blocks.block_size and not self._writers[ino]:
            data = await self._read_filling_page_cache(ino, off, size)
        else:  # the kernel reading ahead in order (whole blocks), or a file that may change
            data = await self.store.read(ino, off, size)
        self.monitor.count("bytes_read", len(data))
        return data

    async def _read_filling_page_cache(self, ino: int, off: int, size: int) -> bytes:
        """A small (random) read: the whole blocks it falls in are loaded anyway, so the kernel
        is offered their other pages, and the next reads of those blocks stay in the kernel."""
        block_size = self.store.blocks.block_size
        start, stop = off // block_size * block_size, -(-(off + size) // block_size) * block_size
        change = self._changes[ino]
        blocks = memoryview(await self.store.read(ino, start, stop - start))
        asked = blocks[off - start:off - start + size]
        if self._changes[ino] == change:  # no change began while they loaded
            self.page_cache.offer(ino, start, blocks[:off - start])
            self.page_cache.offer(ino, off + len(asked), blocks[off - start + len(asked):])
        return bytes(asked)

    @_errors
    async def write(self, fh, off, buf):
        ino = _inode_of(fh)
        area = self.store.inode(ino).area
        need = self.space.write_need(area, ino, off, len(buf), credit=False)
        if self.space.roomy(area, need):
            async with self.space.room(area, need):
                await self.store.write(ino, off, buf)
            self.monitor.count("bytes_written", len(buf))
            return len(buf)
        # near a limit: block by block, so that each piece counts at its stored size
        pieces = _block_pieces(off, len(buf), self.store.blocks.block_size)
        done = 0
        for at, n in pieces:
            try:
                async with self.space.room(area, self.space.write_need(area, ino, at, n)):
                    await self.store.write(ino, at, buf[done:done + n])
            except StoreError as e:
                if done and e.errno == errno.ENOSPC:
                    return done  # a short write: the program's next one gets ENOSPC
                raise
            done += n
            self.monitor.count("bytes_written", n)
        return done

    async def flush(self, fh):
        # close(2) has nothing to wait for here (data is stored by the flusher, or by fsync):
        # ENOSYS tells the kernel so, and it stops sending a request at every close
        raise FUSEError(errno.ENOSYS)

    @_errors
    async def fsync(self, fh, datasync):
        await self.store.fsync(_inode_of(fh))

    @_logged
    async def release(self, fh):
        ino = _inode_of(fh)
        self._opens[ino] -= 1
        self._writers[ino] -= fh & 1
        self._forget_unused_handles(ino)
        if self._opens[ino] <= 0:
            self.store.touch_used(ino)
            if ino in self._waiting:
                self._reaper_wake.set()  # it outlived its deadline while open
        self._release_if_unused(ino)

    # ---- expiry --------------------------------------------------------------------------
    async def run_reaper(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Reclaims entries past their deadline, earliest first, waking when the next one falls
        due (or when a TTL or a close may have made one due)."""
        task_status.started()
        while True:
            now = self.store.clock()
            try:
                await self.reap(now)
            except Exception as e:
                self.monitor.count("cleanup_failures")
                log.exception("cleanup pass failed; retrying")
                self.monitor.alert("cleanup_failed", f"a cleanup pass failed: {e}")
            else:
                self.monitor.count("cleanup_runs")
                self.monitor.clear("cleanup_failed")
            self._rearm_refusal_alerts()
            upcoming = self.store.next_deadline(after=now)
            nap = REAPER_NAP if upcoming is None else min(REAPER_NAP, (upcoming - now) / 1e9)
            with trio.move_on_after(max(nap, 0.0)):
                await self._reaper_wake.wait()
            self._reaper_wake = trio.Event()

    async def reap(self, now: int) -> int:
        """One pass: every entry due at `now` goes, but open files (they go at their last close)
        and folders that still hold entries (they go once empty)."""
        gone: list[tuple[int, bytes]] = []
        self._waiting.clear()  # what waited (closed since, emptied since) is looked at again
        while due := [ino for ino in self.store.due(now, REAP_BATCH + len(self._waiting))
                      if ino not in self._waiting]:
            for ino in due:
                node = self.store.inode(ino)
                if self._opens[ino] > 0 or (node.is_dir and not self.store.is_empty(ino)):
                    self._waiting.add(ino)
                    continue
                gone += self._expire(ino)
                self.monitor.count(f"expired:{node.area}")
        if gone:
            self.monitor.count("expired", len(gone))
            self.monitor.event("expired", f"expired {len(gone)} entries", count=len(gone))
        return len(gone)

    def _expire(self, ino: int) -> list[tuple[int, bytes]]:
        names = self.store.expire(ino)
        for parent, name in names:
            self._waiting.discard(parent)  # a folder waiting for this entry may go now
            # queued to pyfuse3's notify thread: calling the kernel from here could deadlock
            pyfuse3.invalidate_entry_async(parent, name, ignore_enoent=True)
        self._release_if_unused(ino)
        return names

    def _evict(self, ino: int) -> None:
        """Removes a closed file to make room, as an expiry would."""
        log.debug("evicting %s", self.store.path_of(ino))
        self._expire(ino)

    def _clear_expired(self, parent: int, name: bytes) -> None:
        """A name past its deadline that the reaper has not reached yet is free for reuse."""
        node = self.store.named(parent, name)
        if node is not None and self._hidden(node):
            self._expire(node.id)

    # ---- the filesystem ------------------------------------------------------------------
    def init(self) -> None:
        """Called as INIT is handled; the answer is written before any task sees the event."""
        self.initialized.set()

    @_errors
    async def statfs(self, ctx):
        st = pyfuse3.StatvfsData()
        under = os.statvfs(self.store.path)
        block = self.store.blocks.block_size
        used = self.store.stored_bytes()
        free = max(0, min(self.capacity - used, under.f_bavail * under.f_frsize))
        st.f_bsize = st.f_frsize = block
        st.f_blocks = (used + free) // block
        st.f_bfree = st.f_bavail = free // block
        inodes = self.store.inode_count()
        st.f_files = inodes + under.f_favail
        st.f_ffree = st.f_favail = under.f_favail
        st.f_namemax = NAME_MAX
        return st

    def status(self) -> dict:
        """What `tempfs status` shows, read from the running daemon."""
        usage = self.store.usage()
        times = self.store.area_times()
        savings = self.store.savings()
        usage["total"].update(savings["total"])
        for area, info in usage["areas"].items():
            info.update(savings["areas"].get(area, {"dedup_saved_bytes": 0, "compression_saved_bytes": 0}))
            oldest, next_deadline = times.get(area, (None, None))
            limit = self.space.limit(area)
            info.update(limit_bytes=limit, percent_used=round(100 * info["stored_bytes"] / limit, 1) if limit else None,
                        oldest=_iso(oldest), next_deadline=_iso(next_deadline),
                        evicted=self.monitor.totals[f"evicted:{area}"],
                        refused_full=self.monitor.totals[f"refused_full:{area}"],
                        **self._recent(f"expired:{area}", "expired"), **self._recent(f"evicted:{area}", "evicted"))
        free = None if self.store_lost else self.space.free_bytes()  # (lost: its folder is gone)
        usage["disk"] = {"free_bytes": free, "min_free_bytes": self.space.min_free}
        usage["schema_folders"] = self.store.schema_paths()
        usage["daemon"] = self._daemon_facts()
        return usage

    def _folders(self) -> dict:
        folders = self.store.folder_usage()
        for info in folders.values():
            info["oldest"], info["next_deadline"] = _iso(info.pop("oldest_ns")), _iso(info.pop("next_deadline_ns"))
        return folders

    def _recent(self, key: str, label: str) -> dict[str, int]:
        return {f"{label}_last_hour": self.monitor.recent(key, 3600), f"{label}_last_day": self.monitor.recent(key, 86400)}

    def _daemon_facts(self) -> dict:
        totals, blocks = self.monitor.totals, self.store.blocks
        runs = totals["cleanup_runs"] + totals["cleanup_failures"]
        reads = blocks.hits + blocks.misses
        per_second = {f"{label}_per_second": round(self.monitor.recent(key, 60) / 60, 3) for key, label in
                      (("bytes_read", "read_bytes"), ("bytes_written", "write_bytes"),
                       ("creates", "creates"), ("deletes", "deletes"))}
        return {
            "pid": os.getpid(), "version": __version__, "uptime_seconds": round(time.time() - self.started, 1),
            "store": str(self.store.path), "key": self.key_path, "rss_bytes": _rss_bytes(),
            "dirty_bytes": blocks.dirty_bytes, "reclaiming_files": len(self.store.reclaiming),
            "cache_hit_rate": round(blocks.hits / reads, 3) if reads else None,
            "page_cache_filled_bytes": self.page_cache.stored_bytes,
            "page_cache_dropped_bytes": self.page_cache.dropped_bytes, "patches_stored": blocks.patches_stored,
            **per_second,
            "cleanup_runs": totals["cleanup_runs"], "cleanup_failures": totals["cleanup_failures"],
            "cleanup_success_rate": round(totals["cleanup_runs"] / runs, 4) if runs else None,
            "refused": totals["refused"], "refused_last_hour": self.monitor.recent("refused", 3600),
            "integrity_errors": totals["integrity_errors"], "expired": totals["expired"],
            "evicted": totals["evicted"], "alerts": list(self.monitor.active_alerts.values()),
            "last_check": self.last_check,
        }


def _block_pieces(offset: int, length: int, block_size: int) -> list[tuple[int, int]]:
    """(offset, length) pieces of a write that each stay within one block."""
    pieces = []
    end = offset + length
    while offset < end:
        n = min(end, (offset // block_size + 1) * block_size) - offset
        pieces.append((offset, n))
        offset += n
    return pieces


def _iso(ns: Optional[int]) -> Optional[str]:
    return None if ns is None else iso_utc(ns)


def _rss_bytes() -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _command(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return "?"
