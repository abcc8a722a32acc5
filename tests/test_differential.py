"""Differential, model-based testing (issue 6): the same random sequence of operations on a tempfs
mount and on a plain folder of the machine's own filesystem, every result compared.

Two hypothesis state machines open, create, read, write (at random offsets, past the end, into
holes, across tempfs's 128 KiB blocks, around the end of the file), truncate, copy_file_range,
rename (plain, RENAME_NOREPLACE, RENAME_EXCHANGE), link, unlink, make and remove folders,
symlinks and FIFOs, chmod, chown, set times and xattrs (by path and by descriptor), fsync, read
and write through mmap, and unmount and mount tempfs again in the middle.  DataMachine works on
four file names and their content; TreeMachine does everything over a tree of twelve names.
Each operation runs on both sides and its outcome, ("ok", value) or ("err", errno name), must be
the same; after every step both trees are compared whole: names, types, modes, sizes, link
counts, owners, which names share an inode, file contents, symlink targets, xattrs, and whether
the step changed each entry's mtime and ctime.

One mount serves a whole test function; each example works in a fresh folder below
cache/data/ on the mount and a fresh folder of the test's tmp_path on the real filesystem.

Differences that are deliberate are not compared: see DELIBERATE below (and late_mtime).

The CI run is bounded (TEMPFS_DIFF_EXAMPLES examples of TEMPFS_DIFF_STEPS steps per machine;
defaults 25 and 40). The long run is documented in README.md; it prints how many operations
it checked.  test_times_change_as_on_linux keeps the reproducers of what the machines found.
"""
from __future__ import annotations

import collections
import contextlib
import ctypes
import errno
import mmap
import os
import random
import shutil
import stat
import sys
import time
import warnings
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, settings, strategies as st
from hypothesis.stateful import (RuleBasedStateMachine, initialize, invariant, precondition, rule,
                                 run_state_machine_as_test)

EXAMPLES = int(os.environ.get("TEMPFS_DIFF_EXAMPLES") or 25)
STEPS = int(os.environ.get("TEMPFS_DIFF_STEPS") or 40)
LONG_RUN = EXAMPLES > 25 or STEPS > 40
# about 0.05 s a step on 2 cores, plus a remount now and then: generous for a long run
TIMEOUT = 120 if not LONG_RUN else int(60 + EXAMPLES * STEPS * 0.25)

# Shrinking a failure costs minutes here (every step is real I/O, some are remounts): off unless
# asked for; a failure then shows the whole sequence of its example (at most STEPS steps).
PHASES = [p for p in Phase if p != Phase.shrink or os.environ.get("TEMPFS_DIFF_SHRINK")]

BLOCK = 128 * 1024  # tempfs's block size: offsets are steered across its boundaries
AREA_FOLDER = "cache/data"

# What tempfs does differently on purpose, and so is never compared:
DELIBERATE = {
    "st_blocks": "tempfs reports the stored size (compressed, deduplicated) in st_blocks",
    "atime": "tempfs does not update atime on reads (like noatime); ext4 is relatime",
    "mtime/ctime values": "each side's own clock: what is compared is an mtime right after "
                          "utime sets it, and whether each step changed each entry's mtime and ctime",
    "folder st_size": "a folder's size is 0 in tempfs, a multiple of 4096 on ext4; so is where "
                      "SEEK_END puts a folder's position (ext4: its hash order's end, 2**63 - 1): "
                      "not exercised",
    "user.tempfs.*": "tempfs's read-only virtual xattrs (area, expires, stored_size, ...)",
    "st_ino/st_dev/st_blksize": "numbering and block size are each filesystem's own; "
                                "which names share an inode is compared instead",
    "SEEK_DATA/SEEK_HOLE": "tempfs has no lseek: FUSE reports the whole file as data (allowed "
                           "by POSIX), ext4 reports its holes; not exercised",
    "file size limit": "ext4 refuses files past 16 TiB (EFBIG), tempfs takes up to 2**63 - 1; "
                       "positions stay within a few blocks",
    "setxattr to the same value": "ext4 leaves ctime alone (its own optimisation), tempfs "
                                  "changes it, as tmpfs does: not compared for that step",
    "FIFO times": "the kernel changes a FIFO's times on each read and write, and FUSE does not "
                  "pass that on (tempfs never sees FIFO data): not compared",
    "device nodes": "the mount is nodev (their opening is refused); only FIFOs are made",
    "non-user xattr namespaces": "tempfs refuses them (ENOTSUP, documented); root may set "
                                 "trusted.* on ext4; only user.* names are used",
}

LINK_TARGETS = ["a", "b", "c", "a/b", "../a", "../b/a", "x", ".", "..", "a/a/a", "self"]
XATTR_NAMES = ["user.a", "user.b", "user.long." + "n" * 40]
MODES = st.one_of(st.sampled_from([0o644, 0o600, 0o755, 0o700, 0o000, 0o777, 0o4755, 0o2755,
                                   0o1777, 0o2775]), st.integers(0, 0o7777))

OFFSETS = st.one_of(
    st.integers(0, 4096),
    st.builds(lambda k, d: max(0, k * BLOCK + d), st.integers(1, 4), st.integers(-100, 100)),
    st.integers(0, 5 * BLOCK))
LENGTHS = st.one_of(st.integers(0, 600), st.sampled_from([BLOCK, BLOCK - 1, BLOCK + 1, 4096]),
                    st.integers(0, 2 * BLOCK + 300))
# A position: absolute, around the current end of the file, or a fraction (percent) of its size.
WHERE = st.one_of(st.tuples(st.just("at"), OFFSETS), st.tuples(st.just("end"), st.integers(-300, 300)),
                  st.tuples(st.just("frac"), st.integers(0, 100)))
PATH_INDEX = st.integers(0, 11)  # into the machine's PATHS
DATA_KINDS = ["random", "zeros", "byte", "text"]

MARK_NS = 1_000_000_000 * 10**9 + 123_456_789  # an mtime no clock gives now: see mark_times

RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
AT_FDCWD = -100
_libc = ctypes.CDLL(None, use_errno=True)
_libc.renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]


def renameat2(src, dst, flags: int) -> None:
    if _libc.renameat2(AT_FDCWD, os.fsencode(src), AT_FDCWD, os.fsencode(dst), flags) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), os.fspath(src))


def _data(kind: str, seed: int, n: int) -> bytes:
    if kind == "zeros":  # a whole zero block is a hole in tempfs: it must read back the same
        return bytes(n)
    if kind == "byte":
        return bytes([seed & 0xFF or 1]) * n
    if kind == "text":
        line = b"line %d of something compressible\n" % seed
        return (line * (n // len(line) + 1))[:n]
    return random.Random(seed).randbytes(n)


def _position(where: tuple, size: int) -> int:
    how, n = where
    if how == "end":
        return max(0, size + n)
    if how == "frac":
        return size * n // 100
    return n


def _errname(code) -> str:
    return errno.errorcode.get(code, str(code))


def outcome(fn):
    """("ok", value) or ("err", errno name): what an operation did, comparable across sides."""
    try:
        return ("ok", fn())
    except OSError as e:
        return ("err", _errname(e.errno))
    except ValueError as e:  # Python's own refusals (an empty mmap): the same on both sides
        return ("err", f"ValueError: {e}")


def stat_facts(st_result) -> tuple:
    """What is compared of a stat result (see DELIBERATE for what is not).  Times are each
    side's own clock; whether mtime still holds the value mark_times put there is compared:
    an operation that changes it on one side must change it on the other."""
    is_dir = stat.S_ISDIR(st_result.st_mode)
    return (stat.S_IFMT(st_result.st_mode), oct(stat.S_IMODE(st_result.st_mode)),
            None if is_dir else st_result.st_size, st_result.st_nlink, st_result.st_uid, st_result.st_gid,
            "marked mtime" if st_result.st_mtime_ns == MARK_NS else "mtime")


def visible_xattrs(names) -> list[str]:
    return sorted(n for n in names if not n.startswith("user.tempfs."))  # deliberate: virtual ones


class Side:
    """One filesystem under test: the example's folder `top`, and `root`, three levels below it,
    where every path of an example is relative to.  Symlinks to ".." let paths climb out of
    `root` (a chain of them can climb a level per link); the levels between keep that climb
    inside the example's own folder, which is compared whole."""

    def __init__(self, name: str, top: Path) -> None:
        self.name = name
        self.top = top
        self.root = Path(top, "p", "q", "r")

    def p(self, rel: str) -> str:
        return os.path.join(self.root, rel)


class Figures:
    def __init__(self) -> None:
        self.ops = collections.Counter()   # operations checked, per kind
        self.tree_checks = 0
        self.entries_checked = 0
        self.remounts = 0
        self.examples = 0
        self.seconds = 0.0

    def summary(self) -> str:
        return (f"differential: {sum(self.ops.values())} operations checked on both sides "
                f"({self.examples} examples, {self.tree_checks} whole-tree comparisons of "
                f"{self.entries_checked} entries, {self.remounts} remounts) in {self.seconds:.1f} s; "
                + ", ".join(f"{k} {v}" for k, v in sorted(self.ops.items())))


FIGURES = Figures()


class Differential(RuleBasedStateMachine):
    """What every machine shares: the two sides, comparing, opening and closing, remounting, and
    the whole-tree comparison after every step.  Set by the test before running: mount (a conftest
    Mount), real_base (a folder on a normal filesystem), rename_flags (the renameat2 flags the
    real filesystem supports)."""
    PATHS: list[str] = []
    mount = None
    real_base: Path = None
    rename_flags: tuple[int, ...] = (0,)
    xattrs = True  # False where the real filesystem takes no user.* xattrs: not compared
    counter = 0

    def __init__(self) -> None:
        super().__init__()
        Differential.counter += 1
        name = f"{type(self).__name__}{Differential.counter}"
        FIGURES.examples += 1
        self.sides = [Side("tempfs", self.mount.path(AREA_FOLDER, "diff", name)),
                      Side("real", self.real_base / name)]
        for side in self.sides:
            os.makedirs(side.root)
        self.handles: list[dict] = []  # {"fds": [tempfs fd, real fd], "desc": str}
        self.log: list[str] = []
        self.times: list[dict] | None = None  # each side's (inode, mtime, ctime, FIFO) per path, last step
        # Inodes written through a mapping and not msynced: the kernel writes their pages back
        # to tempfs whenever it likes, and tempfs's mtime is the time of that writeback (FUSE
        # does not say when the page was dirtied); ext4's is when the page was first written.
        # Their time changes are not compared from then on (per side: its inode numbers).
        self.late_mtime: list[set[int]] = [set(), set()]
        # Inodes whose time changes are not compared for this step only: see same_xattr_value.
        self.step_skip: list[set[int]] = [set(), set()]

    # ---- comparing ---------------------------------------------------------------------------
    def both(self, kind: str, desc: str, fn):
        """Runs fn(side, index) on each side; the outcomes must be equal."""
        results = [outcome(lambda: fn(side, i)) for i, side in enumerate(self.sides)]
        self.log.append(f"{desc} -> {_short(results[1])}")
        FIGURES.ops[kind] += 1
        assert results[0] == results[1], (
            f"{desc}: tempfs {_short(results[0])} but the real filesystem {_short(results[1])}\n"
            f"operations of this example so far:\n  " + "\n  ".join(self.log[-30:]))
        return results

    def path(self, k: int) -> str:
        return self.PATHS[k % len(self.PATHS)]

    def same_xattr_value(self, k: int, where, name: str, value: bytes, follow: bool) -> None:
        """ext4 leaves ctime alone when an xattr is set to the value it has (an optimisation of
        its own: tmpfs, for one, changes it); tempfs changes it. Not compared for that step."""
        with contextlib.suppress(OSError):
            if os.getxattr(where, name, follow_symlinks=follow) == value:
                self.step_skip[k].add(os.stat(where, follow_symlinks=follow).st_ino)

    def handle(self, i: int) -> dict:
        return self.handles[i % len(self.handles)]

    def size_of(self, h: dict | None = None, path: str | None = None) -> int:
        """The current size on the real side, for positions relative to the end."""
        try:
            if h is not None:
                return os.fstat(h["fds"][1]).st_size
            return os.stat(self.sides[1].p(path)).st_size
        except OSError:
            return 0

    # ---- opening and closing -----------------------------------------------------------------
    @precondition(lambda self: len(self.handles) < 6)
    @rule(k=PATH_INDEX, access=st.sampled_from([os.O_RDONLY, os.O_WRONLY, os.O_RDWR]),
          creat=st.sampled_from([True, True, True, False]), excl=st.booleans(), trunc=st.booleans(),
          append=st.booleans(), mode=MODES)
    def open_file(self, k, access, creat, excl, trunc, append, mode):
        path = self.path(k)
        flags = access | (os.O_CREAT if creat else 0) | (os.O_EXCL if excl else 0) | \
            (os.O_TRUNC if trunc else 0) | (os.O_APPEND if append else 0)
        desc = f"open({path!r}, {_flag_names(flags)}, {oct(mode)})"
        flags |= os.O_NONBLOCK  # a FIFO must not block the test (nothing else minds it)
        fds = []

        def op(side, i):
            fds.append(os.open(side.p(path), flags, mode))
            return "fd"
        try:
            self.both("open", desc, op)
        finally:
            if len(fds) == 2:
                self.handles.append({"fds": fds, "desc": f"#{Differential.counter}.{len(self.log)} {desc}"})
            else:
                for fd in fds:
                    os.close(fd)

    @precondition(lambda self: self.handles)
    @rule(i=st.integers(0, 7))
    def close_file(self, i):
        h = self.handle(i)
        self.handles.remove(h)
        self.both("close", f"close({h['desc']})", lambda side, k: os.close(h["fds"][k]))

    @rule(k=st.integers(0, 12), follow=st.booleans())
    def mark_times(self, k, follow):
        """Sets atime and mtime to MARK_NS: from then on, whether an operation updates mtime
        (on this entry, or on its folder) is compared, without comparing two clocks."""
        path = self.path(k) if k < 12 else "."
        self.both("utime", f"utime({path!r}, mark, follow_symlinks={follow})",
                  lambda side, i: os.utime(side.p(path), ns=(MARK_NS, MARK_NS), follow_symlinks=follow))

    def mark_all(self) -> None:
        for k in range(min(12, len(self.PATHS))):
            self.mark_times(k, False)
        self.mark_times(12, False)

    # ---- the mount ---------------------------------------------------------------------------
    @rule(dice=st.integers(0, 99))
    def remount(self, dice):
        """Now and then (a remount costs a second): close every file on both sides, unmount
        tempfs (everything is flushed to the store) and mount it again; the tree compared next
        must not change."""
        if dice % 16 != 5:  # hypothesis favours 0 and the ends: not those
            return
        for h in self.handles:
            for fd in h["fds"]:
                os.close(fd)
        self.handles.clear()
        self.log.append("(every file closed) remount")
        self.mount.remount()
        FIGURES.remounts += 1

    # ---- the whole tree ----------------------------------------------------------------------
    @invariant()
    def trees_are_equal(self):
        trees = [_tree(side.top, self.xattrs) for side in self.sides]
        FIGURES.tree_checks += 1
        FIGURES.entries_checked += len(trees[1][0])
        if trees[0][:2] != trees[1][:2]:
            raise AssertionError(
                f"the trees differ after: {self.log[-1] if self.log else '(start)'}\n"
                + _tree_diff(trees[0], trees[1])
                + "\noperations of this example so far:\n  " + "\n  ".join(self.log[-30:]))
        # Whether the last step changed each entry's mtime and ctime: the same on both sides.
        if self.times is not None:
            changes = [_time_changes(self.times[k], trees[k][2], self.late_mtime[k] | self.step_skip[k])
                       for k in (0, 1)]
            # (an inode number freed and given to a new file is one side's business: "skip" on
            # either side means that path is not compared)
            differ = {p: (changes[0].get(p), changes[1].get(p)) for p in set(changes[0]) | set(changes[1])
                      if changes[0].get(p) != changes[1].get(p) and "skip" not in (changes[0].get(p),
                                                                                     changes[1].get(p))}
            assert not differ, (
                f"(mtime changed, ctime changed) differ after: {self.log[-1]}\n  "
                + "\n  ".join(f"{p}: tempfs {a}, real {b}" for p, (a, b) in sorted(differ.items()))
                + "\noperations of this example so far:\n  " + "\n  ".join(self.log[-30:]))
        self.times = [tree[2] for tree in trees]
        self.step_skip = [set(), set()]

    def teardown(self):
        for h in self.handles:
            for fd in h["fds"]:
                with contextlib.suppress(OSError):
                    os.close(fd)
        for side in self.sides:
            shutil.rmtree(side.top, ignore_errors=True)
        for side in self.sides:  # removing one example's folder touched nothing else
            assert os.path.isdir(side.top.parent), \
                f"{side.name}: {side.top.parent} is gone after:\n  " + "\n  ".join(self.log)


class ContentRules(Differential):
    """Reading and writing through open files: at offsets and sizes around tempfs's blocks and
    around the current end of the file, into holes, through mmap; truncating; fsync."""

    @precondition(lambda self: self.handles)
    @rule(i=st.integers(0, 7), where=WHERE, length=LENGTHS, kind=st.sampled_from(DATA_KINDS),
          seed=st.integers(0, 2**32), positional=st.booleans())
    def write(self, i, where, length, kind, seed, positional):
        h = self.handle(i)
        data = _data(kind, seed, length)
        if positional:
            offset = _position(where, self.size_of(h))
            self.both("pwrite", f"pwrite({h['desc']}, {kind} {length} bytes, at {offset})",
                      lambda side, k: os.pwrite(h["fds"][k], data, offset))
        else:
            self.both("write", f"write({h['desc']}, {kind} {length} bytes)",
                      lambda side, k: os.write(h["fds"][k], data))

    @precondition(lambda self: self.handles)
    @rule(i=st.integers(0, 7), where=WHERE, length=LENGTHS, positional=st.booleans())
    def read(self, i, where, length, positional):
        h = self.handle(i)
        if positional:
            offset = _position(where, self.size_of(h))
            self.both("pread", f"pread({h['desc']}, {length}, at {offset})",
                      lambda side, k: os.pread(h["fds"][k], length, offset))
        else:
            self.both("read", f"read({h['desc']}, {length})", lambda side, k: os.read(h["fds"][k], length))

    @precondition(lambda self: self.handles)
    @rule(i=st.integers(0, 7), where=WHERE, delta=st.integers(-5000, 5000),
          whence=st.sampled_from([os.SEEK_SET, os.SEEK_CUR, os.SEEK_END]))
    def seek(self, i, where, delta, whence):
        # SEEK_DATA/SEEK_HOLE are not exercised: see DELIBERATE
        h = self.handle(i)
        if whence == os.SEEK_END and stat.S_ISDIR(os.fstat(h["fds"][1]).st_mode):
            return  # a folder's end: its size, which differs (see DELIBERATE); ext4 answers 2**63 - 1
        offset = _position(where, self.size_of(h)) if whence == os.SEEK_SET else delta
        self.both("lseek", f"lseek({h['desc']}, {offset}, {whence})",
                  lambda side, k: os.lseek(h["fds"][k], offset, whence))

    @precondition(lambda self: self.handles)
    @rule(i=st.integers(0, 7), where=WHERE)
    def ftruncate(self, i, where):
        h = self.handle(i)
        size = _position(where, self.size_of(h))
        self.both("ftruncate", f"ftruncate({h['desc']}, {size})", lambda side, k: os.ftruncate(h["fds"][k], size))

    @rule(k=PATH_INDEX, where=WHERE)
    def truncate(self, k, where):
        path = self.path(k)
        size = _position(where, self.size_of(path=path))
        self.both("truncate", f"truncate({path!r}, {size})", lambda side, i: os.truncate(side.p(path), size))

    @precondition(lambda self: self.handles)
    @rule(i=st.integers(0, 7), datasync=st.booleans())
    def fsync(self, i, datasync):
        h = self.handle(i)
        call = os.fdatasync if datasync else os.fsync
        self.both("fsync", f"{call.__name__}({h['desc']})", lambda side, k: call(h["fds"][k]))

    @precondition(lambda self: self.handles)
    @rule(i=st.integers(0, 7))
    def fstat(self, i):
        h = self.handle(i)
        self.both("fstat", f"fstat({h['desc']})", lambda side, k: stat_facts(os.fstat(h["fds"][k])))

    @precondition(lambda self: self.handles)
    @rule(i=st.integers(0, 7), where=WHERE, length=LENGTHS, kind=st.sampled_from(DATA_KINDS),
          seed=st.integers(0, 2**32), sync=st.booleans())
    def mmap_write(self, i, where, length, kind, seed, sync):
        """Writes through a shared mapping of the whole file (a mapping cannot grow a file)."""
        h = self.handle(i)
        data = _data(kind, seed, length)
        size = self.size_of(h)
        at = _position(where, size) % size if size else 0

        def op(side, k):
            with mmap.mmap(h["fds"][k], 0) as m:
                n = min(length, len(m) - at)
                m[at:at + n] = data[:n]
                if sync:
                    m.flush()
                else:
                    self.late_mtime[k].add(os.fstat(h["fds"][k]).st_ino)
                return n
        self.both("mmap_write", f"mmap_write({h['desc']}, {kind} {length} bytes at {at}, msync={sync})", op)

    @precondition(lambda self: self.handles)
    @rule(i=st.integers(0, 7), where=WHERE, length=LENGTHS)
    def mmap_read(self, i, where, length):
        h = self.handle(i)
        size = self.size_of(h)
        at = _position(where, size) % size if size else 0

        def op(side, k):
            with mmap.mmap(h["fds"][k], 0, prot=mmap.PROT_READ) as m:
                return m[at:at + length]
        self.both("mmap_read", f"mmap_read({h['desc']}, {length} bytes at {at})", op)


    @precondition(lambda self: self.handles)
    @rule(i=st.integers(0, 7), j=st.integers(0, 7), src=WHERE, dst=WHERE, length=LENGTHS)
    def copy_file_range(self, i, j, src, dst, length):
        """Copies between two open files (or within one), as cp does: tempfs has no
        copy_file_range of its own, so the kernel reads and writes for it."""
        a, b = self.handle(i), self.handle(j)
        at, to = _position(src, self.size_of(a)), _position(dst, self.size_of(b))
        self.both("copy_file_range", f"copy_file_range({a['desc']} at {at}, {b['desc']} at {to}, {length})",
                  lambda side, k: os.copy_file_range(a["fds"][k], b["fds"][k], length, at, to))

    @precondition(lambda self: self.handles)
    @rule(i=st.integers(0, 7), mode=MODES)
    def fchmod(self, i, mode):
        """Through the descriptor: also reaches files that have no name any more."""
        h = self.handle(i)
        self.both("fchmod", f"fchmod({h['desc']}, {oct(mode)})", lambda side, k: os.fchmod(h["fds"][k], mode))

    @precondition(lambda self: self.handles and self.xattrs)
    @rule(i=st.integers(0, 7), name=st.sampled_from(XATTR_NAMES), value=st.binary(max_size=64),
          remove=st.booleans())
    def fxattr(self, i, name, value, remove):
        """Sets or removes an xattr through the descriptor, then lists them."""
        h = self.handle(i)

        def op(side, k):
            if remove:
                os.removexattr(h["fds"][k], name)
            else:
                self.same_xattr_value(k, h["fds"][k], name, value, True)
                os.setxattr(h["fds"][k], name, value)
            return visible_xattrs(os.listxattr(h["fds"][k]))
        self.both("fxattr", f"{'fremovexattr' if remove else 'fsetxattr'}({h['desc']}, {name}, {value!r})", op)


class LinkRules(Differential):
    """Names of files: rename (plain, RENAME_NOREPLACE, RENAME_EXCHANGE), link, unlink."""

    @rule(a=PATH_INDEX, b=PATH_INDEX, flags=st.sampled_from([0, 0, RENAME_NOREPLACE, RENAME_EXCHANGE]))
    def rename(self, a, b, flags):
        src, dst = self.path(a), self.path(b)
        if flags not in self.rename_flags:  # the real filesystem cannot: nothing to compare with
            flags = 0
        if flags:
            name = "RENAME_NOREPLACE" if flags == RENAME_NOREPLACE else "RENAME_EXCHANGE"
            self.both("renameat2", f"renameat2({src!r}, {dst!r}, {name})",
                      lambda side, k: renameat2(side.p(src), side.p(dst), flags))
        else:
            self.both("rename", f"rename({src!r}, {dst!r})", lambda side, k: os.rename(side.p(src), side.p(dst)))

    @rule(a=PATH_INDEX, b=PATH_INDEX, follow=st.booleans())
    def link(self, a, b, follow):
        src, dst = self.path(a), self.path(b)
        self.both("link", f"link({src!r}, {dst!r}, follow_symlinks={follow})",
                  lambda side, k: os.link(side.p(src), side.p(dst), follow_symlinks=follow))

    @rule(k=PATH_INDEX)
    def unlink(self, k):
        path = self.path(k)
        self.both("unlink", f"unlink({path!r})", lambda side, i: os.unlink(side.p(path)))


class TreeRules(Differential):
    """Folders, symlinks, attributes and xattrs."""

    @rule(k=PATH_INDEX, mode=MODES)
    def mkdir(self, k, mode):
        path = self.path(k)
        self.both("mkdir", f"mkdir({path!r}, {oct(mode)})", lambda side, i: os.mkdir(side.p(path), mode))

    @rule(k=PATH_INDEX)
    def rmdir(self, k):
        path = self.path(k)
        self.both("rmdir", f"rmdir({path!r})", lambda side, i: os.rmdir(side.p(path)))

    @rule(to=st.sampled_from(LINK_TARGETS), k=PATH_INDEX)
    def symlink(self, to, k):
        path = self.path(k)
        target = os.path.basename(path) if to == "self" else to  # "self": a loop (ELOOP)
        self.both("symlink", f"symlink({target!r}, {path!r})", lambda side, i: os.symlink(target, side.p(path)))

    @rule(k=PATH_INDEX, mode=MODES)
    def mkfifo(self, k, mode):
        path = self.path(k)
        self.both("mkfifo", f"mkfifo({path!r}, {oct(mode)})", lambda side, i: os.mkfifo(side.p(path), mode))

    @rule(k=PATH_INDEX)
    def readlink(self, k):
        path = self.path(k)
        self.both("readlink", f"readlink({path!r})", lambda side, i: os.readlink(side.p(path)))

    @rule(k=PATH_INDEX, follow=st.booleans())
    def stat_path(self, k, follow):
        path = self.path(k)
        self.both("stat", f"{'stat' if follow else 'lstat'}({path!r})",
                  lambda side, i: stat_facts(os.stat(side.p(path), follow_symlinks=follow)))

    @rule(k=st.integers(0, 12))
    def listdir(self, k):
        path = self.path(k) if k < 12 else "."
        self.both("listdir", f"listdir({path!r})", lambda side, i: sorted(os.listdir(side.p(path))))

    @rule(k=PATH_INDEX, mode=MODES)
    def chmod(self, k, mode):
        path = self.path(k)
        self.both("chmod", f"chmod({path!r}, {oct(mode)})", lambda side, i: os.chmod(side.p(path), mode))

    @rule(k=PATH_INDEX, uid=st.sampled_from([-1, 0, 1000, 65534]),
          gid=st.sampled_from([-1, 0, 1000, 65534]), follow=st.booleans())
    def chown(self, k, uid, gid, follow):
        path = self.path(k)
        self.both("chown", f"chown({path!r}, {uid}, {gid}, follow_symlinks={follow})",
                  lambda side, i: os.chown(side.p(path), uid, gid, follow_symlinks=follow))

    @rule(k=PATH_INDEX, atime=st.integers(0, 2**33 * 10**9), mtime=st.integers(0, 2**33 * 10**9),
          follow=st.booleans(), now=st.booleans())
    def utime(self, k, atime, mtime, follow, now):
        path = self.path(k)
        if now:  # each side's clock: only the outcome compares
            self.both("utime", f"utime({path!r}, now, follow_symlinks={follow})",
                      lambda side, i: os.utime(side.p(path), follow_symlinks=follow))
            return

        def op(side, i):
            os.utime(side.p(path), ns=(atime, mtime), follow_symlinks=follow)
            st_result = os.stat(side.p(path), follow_symlinks=follow)
            return st_result.st_atime_ns, st_result.st_mtime_ns
        self.both("utime", f"utime({path!r}, ns=({atime}, {mtime}), follow_symlinks={follow})", op)

    @precondition(lambda self: self.xattrs)
    @rule(k=PATH_INDEX, name=st.sampled_from(XATTR_NAMES), value=st.binary(max_size=64),
          flags=st.sampled_from([0, os.XATTR_CREATE, os.XATTR_REPLACE]), follow=st.booleans())
    def setxattr(self, k, name, value, flags, follow):
        path = self.path(k)
        def op(side, i):
            self.same_xattr_value(i, side.p(path), name, value, follow)
            os.setxattr(side.p(path), name, value, flags, follow_symlinks=follow)
        self.both("setxattr", f"setxattr({path!r}, {name}, {value!r}, {flags}, follow_symlinks={follow})", op)

    @precondition(lambda self: self.xattrs)
    @rule(k=PATH_INDEX, name=st.sampled_from(XATTR_NAMES), follow=st.booleans())
    def getxattr(self, k, name, follow):
        path = self.path(k)
        self.both("getxattr", f"getxattr({path!r}, {name}, follow_symlinks={follow})",
                  lambda side, i: os.getxattr(side.p(path), name, follow_symlinks=follow))

    @precondition(lambda self: self.xattrs)
    @rule(k=PATH_INDEX, name=st.sampled_from(XATTR_NAMES), follow=st.booleans())
    def removexattr(self, k, name, follow):
        path = self.path(k)
        self.both("removexattr", f"removexattr({path!r}, {name}, follow_symlinks={follow})",
                  lambda side, i: os.removexattr(side.p(path), name, follow_symlinks=follow))

    @precondition(lambda self: self.xattrs)
    @rule(k=PATH_INDEX, follow=st.booleans())
    def listxattr(self, k, follow):
        path = self.path(k)
        self.both("listxattr", f"listxattr({path!r}, follow_symlinks={follow})",
                  lambda side, i: visible_xattrs(os.listxattr(side.p(path), follow_symlinks=follow)))


class DataMachine(ContentRules, LinkRules):
    """Content first: four file names (two in a folder), hard links and renames between them,
    files open while renamed over or unlinked."""
    PATHS = ["f", "g", "d/h", "d/f"]

    @initialize(seed=st.integers(0, 2**32), at=OFFSETS)
    def start_files(self, seed, at):
        """f: two blocks and a bit, open read-write; g: open O_APPEND; d/h: a hole, then data."""
        os.mkdir(self.sides[0].p("d"))
        os.mkdir(self.sides[1].p("d"))
        self.open_file(0, os.O_RDWR, True, True, False, False, 0o644)
        self.write(0, ("at", 0), 2 * BLOCK + 1000, "random", seed, True)
        self.open_file(1, os.O_RDWR, True, True, False, True, 0o600)
        self.write(1, ("at", 0), 300, "text", seed, False)
        self.open_file(2, os.O_WRONLY, True, True, False, False, 0o640)
        self.write(2, ("at", at), 5000, "byte", seed, True)
        self.close_file(2)
        self.mark_all()


class TreeMachine(ContentRules, LinkRules, TreeRules):
    """Everything: a tree of up to three levels over twelve names, with folders, symlinks
    (dangling, looping, climbing with ".."), FIFOs, modes, owners, times and xattrs."""
    PATHS = ["a", "b", "c", "d", "e", "a/a", "a/b", "a/c", "d/a", "d/b", "a/a/a", "a/a/b"]

    @initialize(seed=st.integers(0, 2**32), at=OFFSETS)
    def start_tree(self, seed, at):
        """Folders a, a/a and d; files b (two blocks and a bit, left open), c (a hole, then
        data) and a/b; a symlink d/a -> ../b."""
        for k in (0, 5, 3):  # a, a/a, d
            self.mkdir(k, 0o755)
        self.open_file(1, os.O_RDWR, True, False, False, False, 0o644)
        self.write(0, ("at", 0), 2 * BLOCK + 1000, "random", seed, True)
        self.open_file(2, os.O_WRONLY, True, True, False, False, 0o600)
        self.write(1, ("at", at), 5000, "text", seed, True)
        self.close_file(1)
        self.open_file(6, os.O_WRONLY, True, True, False, False, 0o640)
        self.write(1, ("at", 0), 100, "byte", seed, False)
        self.close_file(1)
        self.symlink("../b", 8)
        self.mark_all()


def _tree(root, compare_xattrs: bool = True) -> tuple[dict, list, dict]:
    """Every entry below root: {relative path: facts}, the groups of names sharing an inode, and
    {relative path: (inode, mtime, ctime, is a FIFO)}."""
    entries: dict[str, tuple] = {}
    inodes: dict[int, list[str]] = collections.defaultdict(list)
    times: dict[str, tuple[int, int, int]] = {}

    def walk(rel: str) -> None:
        folder = os.path.join(root, rel)
        for name in sorted(os.listdir(folder)):
            path = os.path.join(rel, name) if rel else name
            full = os.path.join(root, path)
            st_result = os.lstat(full)
            facts = stat_facts(st_result)
            mode = st_result.st_mode
            if stat.S_ISREG(mode):
                with open(full, "rb") as f:
                    extra = f.read()
            elif stat.S_ISLNK(mode):
                extra = os.readlink(full)
            else:
                extra = None
            names_values = None
            if compare_xattrs and not stat.S_ISLNK(mode):
                names_values = {n: os.getxattr(full, n, follow_symlinks=False)
                                for n in visible_xattrs(os.listxattr(full, follow_symlinks=False))}
            entries[path] = (facts, extra, names_values)
            times[path] = (st_result.st_ino, st_result.st_mtime_ns, st_result.st_ctime_ns, stat.S_ISFIFO(mode))
            inodes[st_result.st_ino].append(path)
            if stat.S_ISDIR(mode):
                walk(path)
    walk("")
    groups = sorted(sorted(names) for names in inodes.values() if len(names) > 1)
    return entries, groups, times


def _time_changes(before: dict, after: dict, skip: set[int]) -> dict[str, object]:
    """{path: (mtime changed, ctime changed)} for the paths there before and after: "new" where
    the path names another inode now, "skip" for the inodes in `skip` and for FIFOs (data
    through a FIFO never reaches the filesystem: the kernel changes its times itself, and FUSE
    does not pass that on)."""
    changes: dict[str, object] = {}
    for path, old in before.items():
        if path not in after:
            continue
        ino, mtime, ctime, fifo = after[path]
        if ino != old[0]:
            changes[path] = "new"
        elif ino in skip or fifo:
            changes[path] = "skip"
        else:
            changes[path] = (mtime != old[1], ctime != old[2])
    return changes


def _tree_diff(a, b) -> str:
    lines = []
    ea, eb = a[0], b[0]
    for path in sorted(set(ea) | set(eb)):
        if path not in ea:
            lines.append(f"  {path}: missing on tempfs; real {_short(eb[path])}")
        elif path not in eb:
            lines.append(f"  {path}: only on tempfs: {_short(ea[path])}")
        elif ea[path] != eb[path]:
            fa, fb = ea[path], eb[path]
            for what, x, y in (("stat (type, mode, size, nlink, uid, gid, mtime marked?)", fa[0], fb[0]),
                               ("content/target", fa[1], fb[1]), ("xattrs", fa[2], fb[2])):
                if x != y:
                    where = f" ({_describe_content(x, y)})" if isinstance(x, bytes) and isinstance(y, bytes) else ""
                    lines.append(f"  {path}: {what}: tempfs {_short(x)}, real {_short(y)}{where}")
    if a[1] != b[1]:
        lines.append(f"  hard link groups: tempfs {a[1]}, real {b[1]}")
    return "\n".join(lines)


def _short(value) -> str:
    if isinstance(value, bytes) and len(value) > 64:
        return f"<{len(value)} bytes {value[:16].hex()}...>"
    if isinstance(value, tuple):
        return "(" + ", ".join(_short(v) for v in value) + ")"
    return repr(value)


def _describe_content(a: bytes, b: bytes) -> str:
    if len(a) != len(b):
        return f"sizes {len(a)} and {len(b)}"
    first = next(i for i in range(len(a)) if a[i] != b[i])
    return f"first difference at {first} (block {first // BLOCK}, +{first % BLOCK})"


def _flag_names(flags: int) -> str:
    names = [{os.O_RDONLY: "O_RDONLY", os.O_WRONLY: "O_WRONLY", os.O_RDWR: "O_RDWR"}[flags & 3]]
    names += [n for n in ("O_CREAT", "O_EXCL", "O_TRUNC", "O_APPEND") if flags & getattr(os, n)]
    return "|".join(names)


def _supported_rename_flags(folder: Path) -> tuple[int, ...]:
    """The renameat2 flags the real filesystem supports (EINVAL: it does not)."""
    supported = [0]
    for flags in (RENAME_NOREPLACE, RENAME_EXCHANGE):
        a, b = folder / "probe-a", folder / "probe-b"
        a.write_bytes(b"a")
        b.write_bytes(b"b")
        try:
            renameat2(a, b, flags)
        except OSError as e:
            if e.errno not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                supported.append(flags)  # EEXIST for NOREPLACE: supported
        else:
            supported.append(flags)
        for p in (a, b):
            p.unlink(missing_ok=True)
    return tuple(supported)


def _user_xattrs_work(folder: Path) -> bool:
    probe = folder / "xattr-probe"
    probe.write_bytes(b"")
    try:
        os.setxattr(probe, "user.probe", b"1")
        return True
    except OSError:
        return False
    finally:
        probe.unlink()


@pytest.fixture(scope="module", autouse=True)
def _report_figures(request):
    """Prints how many operations were checked (for the long run's figure), even under capture."""
    yield
    if FIGURES.examples:
        capture = request.config.pluginmanager.get_plugin("capturemanager")
        with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
            print("\n" + FIGURES.summary(), file=sys.stderr, flush=True)


def _run(machine: type[Differential], mount, tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    Differential.xattrs = _user_xattrs_work(real)
    if not Differential.xattrs:  # tmpfs without user xattrs, say: nothing to compare them with
        warnings.warn(f"the filesystem under {tmp_path} does not take user.* xattrs: xattrs not compared")
    os.mkdir(mount.path(AREA_FOLDER, "diff"))
    Differential.mount = mount
    Differential.real_base = real
    Differential.rename_flags = _supported_rename_flags(tmp_path)
    examples, ops = FIGURES.examples, sum(FIGURES.ops.values())
    started = time.monotonic()
    try:
        run_state_machine_as_test(machine, settings=settings(
            max_examples=EXAMPLES, stateful_step_count=STEPS, deadline=None, database=None,
            suppress_health_check=list(HealthCheck), print_blob=True, phases=PHASES))
    finally:
        FIGURES.seconds += time.monotonic() - started
    assert FIGURES.examples - examples >= min(EXAMPLES, 5)
    assert sum(FIGURES.ops.values()) - ops >= FIGURES.examples - examples


@pytest.mark.timeout(TIMEOUT)
def test_file_content_matches_the_real_filesystem(mounted, tmp_path):
    """Reads, writes, truncates, mmap, fsync, hard links and renames of open files, remounts."""
    _run(DataMachine, mounted, tmp_path)


@pytest.mark.timeout(TIMEOUT)
def test_tree_matches_the_real_filesystem(mounted, tmp_path):
    """Everything, over a tree of folders, files and symlinks."""
    _run(TreeMachine, mounted, tmp_path)


# ---------------------------------------------------------------- found by the machines above

def _fd_do(path, flags, fn):
    fd = os.open(path, flags)
    try:
        fn(fd)
    finally:
        os.close(fd)


# (name, setup(path), operation(path)): each case starts from a fresh file `f` in a fresh folder
TIME_CASES = [
    # open(O_TRUNC) truncates, so it changes mtime and ctime, even of an empty file (found by
    # DataMachine: tempfs skipped the truncation of an empty file, and with it the times)
    ("open O_TRUNC, empty file", lambda p: None, lambda p: os.close(os.open(p, os.O_WRONLY | os.O_TRUNC))),
    ("open O_RDONLY|O_TRUNC, empty file", lambda p: None, lambda p: os.close(os.open(p, os.O_RDONLY | os.O_TRUNC))),
    ("open O_TRUNC, 10 bytes", lambda p: Path(p).write_bytes(b"0123456789"),
     lambda p: os.close(os.open(p, os.O_WRONLY | os.O_TRUNC))),
    ("open without O_TRUNC", lambda p: None, lambda p: os.close(os.open(p, os.O_WRONLY))),
    # chown always changes ctime, even to the owner it has (found by TreeMachine: tempfs left
    # ctime alone when nothing changed, but FUSE never passes the ctime update on to it)
    ("chown to the same owner", lambda p: None, lambda p: os.chown(p, os.stat(p).st_uid, os.stat(p).st_gid)),
    ("chown to the same group", lambda p: None, lambda p: os.chown(p, -1, os.stat(p).st_gid)),
    ("chown to another group", lambda p: None, lambda p: os.chown(p, -1, 65534)),
    ("chmod to the same mode", lambda p: None, lambda p: os.chmod(p, stat.S_IMODE(os.stat(p).st_mode))),
    ("truncate to the same size", lambda p: None, lambda p: os.truncate(p, 0)),
    ("ftruncate to the same size", lambda p: None, lambda p: _fd_do(p, os.O_WRONLY, lambda fd: os.ftruncate(fd, 0))),
    ("write of 0 bytes", lambda p: None, lambda p: _fd_do(p, os.O_WRONLY, lambda fd: os.write(fd, b""))),
    ("setxattr", lambda p: None, lambda p: os.setxattr(p, "user.x", b"1")),
    ("utime, atime only", lambda p: None, lambda p: os.utime(p, ns=(MARK_NS, os.stat(p).st_mtime_ns))),
    ("link", lambda p: None, lambda p: os.link(p, p + ".2")),
    ("rename", lambda p: None, lambda p: os.rename(p, p + ".moved")),
    ("read", lambda p: Path(p).write_bytes(b"x"), lambda p: Path(p).read_bytes()),
]


def test_times_change_as_on_linux(mounted, tmp_path):
    """Which operations change a file's (and its folder's) mtime and ctime: as on the real
    filesystem (reproducers of what the machines found, and their neighbours)."""
    bases = [mounted.path(AREA_FOLDER), tmp_path]
    if not _user_xattrs_work(tmp_path):
        pytest.skip(f"the filesystem under {tmp_path} does not take user.* xattrs")
    problems = []
    for n, (name, setup, operation) in enumerate(TIME_CASES):
        changed = []
        for base in bases:
            folder = Path(base, f"case{n}")
            folder.mkdir()
            f = str(folder / "f")
            Path(f).write_bytes(b"")
            setup(f)
            before = [os.stat(f), os.stat(folder)]
            time.sleep(0.02)  # past the coarsest timestamp granularity
            operation(f)
            f = f if os.path.exists(f) else f + ".moved"
            after = [os.stat(f), os.stat(folder)]
            changed.append([(a.st_mtime_ns != b.st_mtime_ns, a.st_ctime_ns != b.st_ctime_ns)
                            for b, a in zip(before, after)])
        if changed[0] != changed[1]:
            problems.append(f"{name}: (mtime changed, ctime changed) of the file and its folder: "
                            f"tempfs {changed[0]}, real {changed[1]}")
    assert not problems, "\n".join(problems)
