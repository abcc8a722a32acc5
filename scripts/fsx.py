#!/usr/bin/env python3
"""An fsx-style exerciser: a long random read/write/truncate/mmap workload on one big file,
every read checked against an in-memory model of what the file must hold.

    .venv/bin/python scripts/fsx.py --ops 100000 --seed 1 data/temp/cache/data/fsx.bin

Operations (weights in OP_WEIGHTS): read (pread), write (pwrite; may extend the file and leave a
hole), truncate (ftruncate up or down), mapread and mapwrite (through a shared mmap; a mapwrite
past the end first extends the file with ftruncate, as the original fsx does), fsync, and
close-reopen (the whole file is read back and compared after each reopen).  Offsets are biased
towards 128 KiB block boundaries (tempfs's block size) so that operations cross them, and
written data is random, compressible or zeros (an all-zero block is a hole in tempfs).
After every operation the file's size (fstat) must equal the model's.

Prints one line per figure, `name value unit`.  On the first mismatch it prints what differs and
the last operations (with which operation last wrote each differing page) to stderr and exits 1.
The same machinery is importable (`Exerciser`) for tests that remount in the middle of a run.
"""
from __future__ import annotations

import argparse
import collections
import mmap
import os
import random
import sys
import time
from array import array
from dataclasses import dataclass, field

KiB = 1024
MiB = 1024 * KiB
BLOCK = 128 * KiB  # tempfs's block size: operations are steered across its boundaries
PAGE = mmap.PAGESIZE
HISTORY = 40       # operations shown on a mismatch

OP_WEIGHTS = {
    "read": 22,
    "write": 26,
    "truncate": 8,
    "mapread": 14,
    "mapwrite": 14,
    "fsync": 3,
    "reopen": 2,
}


class Mismatch(AssertionError):
    """What the file holds differs from the model."""


@dataclass
class Figures:
    ops: int = 0
    mismatches: int = 0
    bytes_read: int = 0       # checked against the model
    bytes_written: int = 0
    seconds: float = 0.0
    per_op: collections.Counter = field(default_factory=collections.Counter)


class Exerciser:
    """Drives one file and keeps the model of its content.

    `path` is created (emptied) by `start()`; `close()` and `reopen()` let a caller unmount and
    mount again in between: the model survives, so the reopened file must read back identical.
    """

    def __init__(self, path: str, seed: int, max_size: int = 8 * MiB, max_len: int = 256 * KiB) -> None:
        self.path = os.fspath(path)
        self.seed = seed
        self.rng = random.Random(seed)
        self.max_size = max_size
        self.max_len = max_len
        self.model = bytearray()
        self.fd: int | None = None
        self.figures = Figures()
        self.history: collections.deque[str] = collections.deque(maxlen=HISTORY)
        # the number of the operation that last wrote (or cut) each page of the model: on a
        # mismatch, which operation a wrong byte comes from
        self.page_writer = array("q", [-1] * (max_size // PAGE + 2))

    # ---- the file ---------------------------------------------------------------------------
    def start(self) -> None:
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        self.model = bytearray()
        self._note("create", 0, 0, "O_CREAT|O_TRUNC")

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def reopen(self) -> None:
        self.close()
        self.fd = os.open(self.path, os.O_RDWR)
        self.check_size("reopen")

    def run(self, ops: int) -> Figures:
        """`ops` random operations; raises Mismatch on the first difference."""
        names = list(OP_WEIGHTS)
        weights = list(OP_WEIGHTS.values())
        started = time.perf_counter()
        try:
            for _ in range(ops):
                op = self.rng.choices(names, weights)[0]
                getattr(self, "op_" + op)()
                self.figures.ops += 1
                self.figures.per_op[op] += 1
                self.check_size(op)
        except Mismatch:
            self.figures.mismatches += 1
            raise
        finally:
            self.figures.seconds += time.perf_counter() - started
        return self.figures

    # ---- choosing offsets and lengths --------------------------------------------------------
    def _offset(self, limit: int) -> int:
        """An offset in [0, limit], often a few bytes either side of a block boundary."""
        r = self.rng.random()
        if r < 0.35 and limit >= BLOCK:
            boundary = self.rng.randrange(1, limit // BLOCK + 1) * BLOCK
            return max(0, min(limit, boundary + self.rng.randint(-300, 300)))
        if r < 0.45:
            return min(limit, self.rng.randrange(0, limit + 1) // PAGE * PAGE)  # page aligned
        return self.rng.randint(0, limit)

    def _length(self) -> int:
        r = self.rng.random()
        if r < 0.3:
            return self.rng.randint(1, 512)
        if r < 0.5:
            return self.rng.choice([BLOCK, BLOCK - 1, BLOCK + 1, 2 * BLOCK, PAGE])
        return self.rng.randint(1, self.max_len)

    def _data(self, n: int) -> bytes:
        r = self.rng.random()
        if r < 0.15:
            return bytes(n)  # zeros: a whole zero block is stored as a hole
        if r < 0.45:  # compressible, stamped with the op number as fsx does
            stamp = (b"%08x" % (self.figures.ops & 0xFFFFFFFF))
            return (stamp * (n // len(stamp) + 1))[:n]
        return self.rng.randbytes(n)

    def _mark(self, start: int, end: int) -> None:
        for page in range(start // PAGE, min(len(self.page_writer), (end + PAGE - 1) // PAGE)):
            self.page_writer[page] = self.figures.ops

    def _note(self, op: str, offset: int, length: int, extra: str = "") -> None:
        self.history.append(f"#{self.figures.ops:<7d} {op:<9s} off=0x{offset:08x} len=0x{length:06x} "
                            f"({offset}..{offset + length}) size_before=0x{len(self.model):08x} {extra}".rstrip())

    # ---- operations --------------------------------------------------------------------------
    def op_read(self) -> None:
        size = len(self.model)
        offset = self._offset(size + 4 * KiB)  # sometimes past the end
        length = self._length()
        self._note("read", offset, length)
        got = os.pread(self.fd, length, offset)
        self.compare(offset, got, self.model[offset:offset + length], "read")

    def op_write(self) -> None:
        offset = self._offset(self.max_size - 1)
        length = min(self._length(), self.max_size - offset)
        data = self._data(length)
        self._note("write", offset, length)
        n = os.pwrite(self.fd, data, offset)
        if n != length:
            raise Mismatch(f"pwrite of {length} bytes at {offset} wrote {n}")
        self._apply_write(offset, data)
        self.figures.bytes_written += length

    def _apply_write(self, offset: int, data: bytes) -> None:
        if offset > len(self.model):
            self._mark(len(self.model), offset)  # the hole
            self.model.extend(bytes(offset - len(self.model)))
        self.model[offset:offset + len(data)] = data
        self._mark(offset, offset + len(data))

    def op_truncate(self) -> None:
        size = self._offset(self.max_size)
        self._note("truncate", size, 0, "down" if size < len(self.model) else "up")
        os.ftruncate(self.fd, size)
        self._apply_truncate(size)

    def _apply_truncate(self, size: int) -> None:
        if size < len(self.model):
            del self.model[size:]
            self._mark(size, size + 1)  # the cut page
        else:
            self._mark(len(self.model), size)
            self.model.extend(bytes(size - len(self.model)))

    def op_mapread(self) -> None:
        size = len(self.model)
        if size == 0:
            return self.op_read()
        offset = self.rng.randint(0, size - 1)
        length = min(self._length(), size - offset)
        self._note("mapread", offset, length)
        got = self._map_io(offset, length, None)
        self.compare(offset, got, self.model[offset:offset + length], "mapread")

    def op_mapwrite(self) -> None:
        offset = self._offset(self.max_size - 1)
        length = min(self._length(), self.max_size - offset)
        data = self._data(length)
        extra = ""
        if offset + length > len(self.model):  # a mapping cannot grow the file: extend first
            extra = f"(ftruncate to 0x{offset + length:x} first)"
        self._note("mapwrite", offset, length, extra)
        if offset + length > len(self.model):
            os.ftruncate(self.fd, offset + length)
            self._apply_truncate(offset + length)
        self._map_io(offset, length, data)
        self._apply_write(offset, data)
        self.figures.bytes_written += length

    def _map_io(self, offset: int, length: int, data: bytes | None) -> bytes:
        """Reads (data None) or writes a range through a shared mapping of just that range."""
        base = offset // mmap.ALLOCATIONGRANULARITY * mmap.ALLOCATIONGRANULARITY
        span = offset + length - base
        access = mmap.ACCESS_READ if data is None else mmap.ACCESS_WRITE
        with mmap.mmap(self.fd, span, offset=base, access=access) as m:
            at = offset - base
            if data is None:
                return m[at:at + length]
            m[at:at + length] = data
            if self.rng.random() < 0.5:
                m.flush()  # msync; otherwise the pages are written back later
            return b""

    def op_fsync(self) -> None:
        self._note("fsync", 0, 0)
        if self.rng.random() < 0.5:
            os.fsync(self.fd)
        else:
            os.fdatasync(self.fd)

    def op_reopen(self) -> None:
        self._note("reopen", 0, 0, "close, open, read it all back")
        self.reopen()
        self.verify_file()

    def inject_fault(self) -> None:
        """Changes one byte of the file through another descriptor, not in the model."""
        if not self.model:
            os.pwrite(self.fd, b"!", 0)
            return
        at = self.rng.randrange(len(self.model))
        with open(self.path, "r+b") as f:
            f.seek(at)
            f.write(bytes([self.model[at] ^ 0xFF]))
        self._mark(at, at + 1)
        self._note("FAULT", at, 1, "a byte changed behind the model's back")

    # ---- checking ----------------------------------------------------------------------------
    def check_size(self, op: str) -> None:
        size = os.fstat(self.fd).st_size
        if size != len(self.model):
            raise Mismatch(f"after {op}: the file's size is {size} (0x{size:x}), the model's "
                           f"{len(self.model)} (0x{len(self.model):x})")

    def verify_file(self) -> None:
        """Reads the whole file back (in 1 MiB pieces) and compares it with the model."""
        offset = 0
        while offset < len(self.model) + 1:
            got = os.pread(self.fd, MiB, offset)
            self.compare(offset, got, self.model[offset:offset + MiB], "verify")
            if not got:
                break
            offset += len(got)

    def compare(self, offset: int, got: bytes, want, what: str) -> None:
        self.figures.bytes_read += len(got)
        if got == want:
            return
        if len(got) != len(want):
            raise Mismatch(f"{what} at {offset} (0x{offset:x}): got {len(got)} bytes, the model has "
                           f"{len(want)} (file size in the model: {len(self.model)})")
        first = next(i for i in range(len(got)) if got[i] != want[i])
        last = next(i for i in range(len(got) - 1, -1, -1) if got[i] != want[i])
        bad = offset + first
        lo = max(0, first - 8)
        page = bad // PAGE
        writer = self.page_writer[page] if page < len(self.page_writer) else -1
        raise Mismatch(
            f"{what} at {offset} (0x{offset:x}), {len(got)} bytes: first wrong byte at "
            f"0x{bad:x} (block {bad // BLOCK}, +0x{bad % BLOCK:x}), last at 0x{offset + last:x}; "
            f"{sum(1 for i in range(first, last + 1) if got[i] != want[i])} bytes differ\n"
            f"  got:  {got[lo:first + 24].hex(' ')}\n"
            f"  want: {bytes(want[lo:first + 24]).hex(' ')}\n"
            f"  page 0x{page * PAGE:x} was last written or cut by op #{writer}")

    def dump(self) -> str:
        return "last operations (oldest first):\n" + "\n".join("  " + line for line in self.history)


def print_figures(fig: Figures, out=sys.stdout) -> None:
    rate = fig.ops / fig.seconds if fig.seconds else 0.0
    print(f"ops {fig.ops} count", file=out)
    print(f"seconds {fig.seconds:.1f} s", file=out)
    print(f"ops_per_second {rate:.0f} ops/s", file=out)
    print(f"mismatches {fig.mismatches} count", file=out)
    print(f"checked_read {fig.bytes_read / MiB:.1f} MiB", file=out)
    print(f"written {fig.bytes_written / MiB:.1f} MiB", file=out)
    for op in OP_WEIGHTS:
        print(f"op_{op} {fig.per_op[op]} count", file=out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", help="the file to exercise (created or emptied), e.g. inside a tempfs mount")
    parser.add_argument("--ops", type=int, default=10_000, help="number of operations (default 10000)")
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: random, printed)")
    parser.add_argument("--max-size", type=int, default=16 * MiB, help="largest file size in bytes (default 16 MiB)")
    parser.add_argument("--max-len", type=int, default=256 * KiB, help="longest read/write in bytes (default 256 KiB)")
    parser.add_argument("--keep", action="store_true", help="leave the file in place when done")
    parser.add_argument("--inject-fault", type=int, metavar="N", default=None,
                        help="after operation N, change a byte of the file behind the model's back "
                             "(shows what a mismatch report looks like; the run must fail)")
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**32)
    print(f"seed {seed} -", flush=True)
    ex = Exerciser(args.path, seed, max_size=args.max_size, max_len=args.max_len)
    ok = False
    try:
        ex.start()
        if args.inject_fault is not None and args.inject_fault < args.ops:
            ex.run(args.inject_fault)
            ex.inject_fault()
            ex.run(args.ops - args.inject_fault)
        else:
            ex.run(args.ops)
        ex.verify_file()
        ex.reopen()
        ex.verify_file()
        ok = True
    except (Mismatch, OSError) as e:
        ex.figures.mismatches += isinstance(e, OSError)
        print(f"fsx: MISMATCH at op #{ex.figures.ops} (seed {seed}): {e}", file=sys.stderr)
        print(ex.dump(), file=sys.stderr)
    finally:
        ex.close()
        if ok and not args.keep:
            os.unlink(args.path)
    print_figures(ex.figures)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
