#!/usr/bin/env python3
"""Benchmark: a fixed set of workloads, in any folder or against tempfs's peers.

    bench.py run DIR [--size 1G] [--workloads LIST] [--pid PID] [--backing DIR | --tempfs MNT]
        runs the set inside DIR (created if missing; for tempfs, a folder below a leaf schema
        folder such as MNT/cache/data/bench, since the root refuses files) and prints one line
        per figure: `name value unit`.
    bench.py compare [--repeat 2] [--size 1G] [--fs plain,bindfs,gocryptfs,tempfs] [--profile DIR]
        sets up, in one run, a plain folder, a bindfs mount, a gocryptfs mount and a fresh tempfs
        mount (all under --base, on the same disk), runs the set on each in turn, repeats it, and
        prints a table with tempfs's ratio to each peer (ratios are taken within each repeat).
        Every mount and daemon it started is torn down at the end, whatever happens. `pymem`
        (scripts/memfs.py) adds the ceiling of a pyfuse3 filesystem that does no work.

Needs root (drop_caches, mounts), fuse3; bindfs, gocryptfs and fio from Debian
(`apt-get install -y bindfs gocryptfs fio`). Random 4 KiB I/O uses fio when it is installed
(psync, iodepth 1), a Python pread/pwrite loop otherwise; sequential I/O, small files, the vision
mix and tar run from Python (or tar itself), so the tool's own overhead is included for every
filesystem alike. "Cold" means after `sync; echo 3 > /proc/sys/vm/drop_caches`; tempfs keeps
no written block in its own block cache, so its cold reads come from the store's object files.
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import hashlib
import io
import json
import mmap
import os
import random
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

REPO = Path(__file__).resolve().parent.parent
KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
SMALL_FILES = 5000
TAR_FILES = 10_000
BESIDE_FILES = 2000
WORKLOADS = ("seq", "rand", "compressible", "small", "tar", "vision", "fsync")
FS_KINDS = ("plain", "bindfs", "gocryptfs", "tempfs")
# on request only: scripts/memfs.py, a pyfuse3 filesystem in dicts, doing no work: how fast any
# filesystem served by pyfuse3's request loop can be here (the ceiling tempfs works under)
EXTRA_KINDS = ("pymem",)
POOL = 64 * MiB  # content is cut from a pool and stamped every 4 KiB, so no two 4 KiB pieces are equal


# ---------------------------------------------------------------- figures

@dataclass
class Figure:
    name: str
    value: float
    unit: str


class Figures:
    """Collects figures and prints each as it comes: `name value unit` (with an optional prefix)."""

    def __init__(self, prefix: str = "", out=sys.stdout) -> None:
        self.prefix, self.out = prefix, out
        self.items: dict[str, Figure] = {}

    def add(self, name: str, value: float, unit: str) -> None:
        self.items[name] = Figure(name, value, unit)
        if self.out is not None:
            shown = f"{value:.0f}" if abs(value) >= 100 else f"{value:.3g}"
            print(f"{self.prefix}{name} {shown} {unit}", file=self.out, flush=True)


# ---------------------------------------------------------------- the system

def drop_caches() -> bool:
    """Writes back and drops the page, dentry and inode caches (root only)."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def cpu_seconds(pid: Optional[int]) -> float:
    """utime + stime of a process (all its threads)."""
    if pid is None:
        return 0.0
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError):
        return 0.0


def peak_rss(pid: Optional[int]) -> Optional[int]:
    """VmHWM of a process, in bytes."""
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def apparent_bytes(path: Path) -> int:
    """The sizes of every file below `path` (what a store holds, not rounded to disk blocks)."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_size
    return total


def tempfs_status(mnt: Path) -> dict:
    return json.loads(os.getxattr(mnt, "user.tempfs.status"))


def tempfs_stored(mnt: Path, timeout: float = 60.0) -> int:
    """tempfs's stored bytes (each object once) once nothing is left in memory to store, nor
    deleted files to reclaim."""
    deadline = time.monotonic() + timeout
    while True:
        status = tempfs_status(mnt)
        daemon = status["daemon"]
        if (daemon["dirty_bytes"] == 0 and not daemon.get("reclaiming_files")) or time.monotonic() > deadline:
            return status["total"]["stored_bytes"]
        time.sleep(0.2)


# ---------------------------------------------------------------- content

class Content:
    """Deterministic content, made once per process and shared by every filesystem."""

    def __init__(self, seed: int = 7) -> None:
        self.rng = random.Random(seed)
        self._random_pool: Optional[bytes] = None
        self._text_pool: Optional[bytes] = None
        self._cache: dict = {}

    def random_pool(self) -> bytes:
        if self._random_pool is None:
            self._random_pool = self.rng.randbytes(POOL)
        return self._random_pool

    def text_pool(self) -> bytes:
        """Log lines: highly compressible (lz4 shrinks them several times), as logs and CSVs are."""
        if self._text_pool is None:
            rng = random.Random(11)
            lines, size, t = [], 0, 1_760_000_000.0
            cams = [f"cam{i:02d}" for i in range(8)]
            while size < POOL:
                t += rng.random() * 0.05
                line = (f"{t:.3f} INFO detector frame={int(t * 30)} camera={rng.choice(cams)} "
                        f"faces={rng.randrange(4)} defects=0 status=ok latency_ms={rng.randrange(20, 40)}\n").encode()
                lines.append(line)
                size += len(line)
            self._text_pool = b"".join(lines)[:POOL]
        return self._text_pool

    @staticmethod
    def stamped(pool: bytes, index: int, size: int) -> bytes:
        """`size` bytes of `pool` stamped every 4 KiB with (index, offset): unique, as compressible as the pool."""
        start = (index * size) % (len(pool) - size + 1)
        block = bytearray(pool[start:start + size])
        for off in range(0, size, 4096):
            block[off:off + 8] = struct.pack("<II", index, off)
        return bytes(block)

    def blocks(self, kind: str, total: int, block: int = MiB) -> list[bytes]:
        key = (kind, total, block)
        if key not in self._cache:
            pool = self.random_pool() if kind == "random" else self.text_pool()
            self._cache[key] = [self.stamped(pool, i, block) for i in range(-(-total // block))]
        return self._cache[key]

    def small_files(self) -> list[bytes]:
        if "small" not in self._cache:
            self._cache["small"] = [self.stamped(self.random_pool(), i, 4096) for i in range(SMALL_FILES)]
        return self._cache["small"]

    def tarball(self, where: Path) -> Path:
        """A tar of a tree of TAR_FILES small files (100 folders; text and binary, 100 B to 8 KiB)."""
        path = where / "tree.tar"
        if path.exists():
            return path
        rng = random.Random(3)
        words = [w.encode() for w in "the frame camera face model score box left right top bottom ok "
                 "detect defect image width height json value session user id time".split()]
        pool = self.random_pool()
        with tarfile.open(path, "w") as tar:
            for d in range(TAR_FILES // 100):
                info = tarfile.TarInfo(f"tree/d{d:03d}")
                info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, 1_700_000_000
                tar.addfile(info)
                for f in range(100):
                    size = rng.randrange(100, 8192)
                    if f % 3:
                        data = b" ".join(rng.choice(words) for _ in range(size // 4))[:size]
                    else:
                        data = self.stamped(pool, d * 100 + f, size)
                    info = tarfile.TarInfo(f"tree/d{d:03d}/f{f:03d}.{'bin' if f % 3 == 0 else 'txt'}")
                    info.size, info.mode, info.mtime = len(data), 0o644, 1_700_000_000
                    tar.addfile(info, io.BytesIO(data))
        return path

    def vision_mix(self, model_size: int) -> list[tuple[str, bytes]]:
        """A vision system's temp files: JPEG-like frames (incompressible, 100-500 KB; one in ten
        copied to a second folder, as a frame handed from one pipeline to the next), float32
        feature arrays (ReLU outputs: half zeros), JSON session files (some identical), and one
        large model file (float32 weights), read back with mmap."""
        key = ("vision", model_size)
        if key in self._cache:
            return self._cache[key]
        rng = random.Random(5)
        pool = self.random_pool()
        files: list[tuple[str, bytes]] = []
        jfif = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"
        for i in range(400):
            size = rng.randrange(100_000, 500_000)
            frame = jfif + self.stamped(pool, 10_000 + i, size - len(jfif) - 2) + b"\xff\xd9"
            files.append((f"face_recognition/frames/frame_{i:05d}.jpg", frame))
            if i % 10 == 0:
                files.append((f"defect_detection/frames/frame_{i:05d}.jpg", frame))
        for i in range(400):
            rows = rng.choice((1, 4, 16, 64))
            values = [max(0.0, rng.gauss(0.0, 1.0)) for _ in range(rows * 512)]
            header = f"{{'descr': '<f4', 'fortran_order': False, 'shape': ({rows}, 512), }}".encode()
            header += b" " * (117 - len(header)) + b"\n"
            files.append((f"face_recognition/features/emb_{i:05d}.npy",
                          b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header +
                          struct.pack(f"<{len(values)}f", *values)))
        for i in range(1000):
            user = rng.randrange(50)
            session = {"session_id": f"s-{user:04d}-{i // 20:04d}", "user": f"user{user}",
                       "created": "2026-11-26T13:02:11Z", "camera": f"cam{user % 8:02d}",
                       "detections": [{"box": [rng.randrange(640), rng.randrange(480), 64, 64],
                                       "label": "face", "score": round(rng.random(), 3)}
                                      for _ in range(rng.randrange(1, 12))],
                       "state": "active"}
            text = json.dumps(session, indent=2).encode()
            if i % 5 == 4:  # an unchanged session file saved again under another name
                text = files[-1][1] if files[-1][0].endswith(".json") else text
            files.append((f"sessions/sess_{i:05d}.json", text))
        model = bytearray(pool * (-(-model_size // len(pool))))[:model_size]
        # plausible float32 weights: sign and exponent byte from a small set, mantissas random
        table = bytes((0x3C, 0x3D, 0xBC, 0xBD)[b & 3] for b in range(256))
        model[3::4] = bytes(model[3::4]).translate(table)
        for off in range(0, model_size, 4096):
            model[off:off + 8] = struct.pack("<II", 0xABCD, off)
        files.append(("models/detector.bin", bytes(model)))
        self._cache[key] = files
        return files


def lz4_separately(files: list[tuple[str, bytes]]) -> int:
    """What `lz4 -1` would store for each file compressed on its own."""
    import lz4.frame
    return sum(len(lz4.frame.compress(data, compression_level=1)) for _, data in files)


# ---------------------------------------------------------------- workloads

@dataclass
class Target:
    """What a run can ask of the filesystem it runs on."""
    pid: Optional[int] = None                     # the daemon, for CPU and peak RSS
    stored: Optional[Callable[[], int]] = None    # bytes the filesystem stores, as on disk
    profile: Optional[Callable[[str], contextlib.AbstractContextManager]] = None
    others: tuple[int, ...] = ()                  # other daemons of the run, left to finish their work too
    drained: Optional[Callable[[], object]] = None  # returns once nothing written is held in memory


def _fio(args: list[str]) -> dict:
    out = subprocess.run(["fio", "--output-format=json", *args], capture_output=True, text=True, check=True).stdout
    return json.loads(out[out.index("{"):])["jobs"][0]


def _fsync_path(path: Path) -> float:
    t0 = time.perf_counter()
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return time.perf_counter() - t0


def _write_file(path: Path, blocks: list[bytes], fsync: bool) -> float:
    """Writes the blocks; returns how long the final fsync took (0 without)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for b in blocks:
            view = memoryview(b)
            while view:
                view = view[os.write(fd, view):]
        t0 = time.perf_counter()
        if fsync:
            os.fsync(fd)
        return time.perf_counter() - t0 if fsync else 0.0
    finally:
        os.close(fd)


def _read_file(path: Path, chunk: int = MiB) -> int:
    buf = bytearray(chunk)
    total = 0
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            total += n
    return total


class Runner:
    def __init__(self, root: Path, figures: Figures, content: Content, size: int, rand_seconds: float,
                 target: Target, scratch: Path, use_fio: bool) -> None:
        self.root, self.fig, self.content, self.size = root, figures, content, size
        self.rand_seconds, self.target, self.scratch = rand_seconds, target, scratch
        self.use_fio = use_fio and shutil.which("fio") is not None
        self.written = 0
        self.cpu_total = 0.0
        self.phase_cpu: dict[str, float] = {}

    @contextlib.contextmanager
    def phase(self, name: str, written: int = 0):
        """Times nothing itself; counts the daemon's CPU and the bytes written, and profiles."""
        cpu0 = cpu_seconds(self.target.pid)
        cm = self.target.profile(name) if self.target.profile else contextlib.nullcontext()
        with cm:
            yield
        used = cpu_seconds(self.target.pid) - cpu0
        self.phase_cpu[name] = used
        self.cpu_total += used
        self.written += written

    def cold(self) -> None:
        self.settle()
        if not drop_caches():
            print("# warning: cannot drop caches (not root?): reads are not cold", file=sys.stderr)

    def settle(self, timeout: float = 30.0) -> None:
        """Waits until the daemons have finished the previous workload's leftovers (storing data,
        deleting object files), this one's and those of the filesystems run before it: each
        uses under 5% of a core for half a second, and tempfs holds nothing written in memory
        (its flusher stores by age too, idle meanwhile)."""
        os.sync()
        if self.target.drained is not None:
            self.target.drained()
        pids = [p for p in (self.target.pid, *self.target.others) if p is not None]
        deadline = time.monotonic() + timeout
        while pids and time.monotonic() < deadline:
            before = [cpu_seconds(p) for p in pids]
            time.sleep(0.5)
            if all(cpu_seconds(p) - b < 0.025 for p, b in zip(pids, before)):
                return

    # phase -> operations it does: the daemon's CPU per operation is reported for these (it is
    # less disturbed than a rate by other load on the machine)
    PER_OP = {"create": SMALL_FILES, "stat": SMALL_FILES, "unlink": SMALL_FILES, "tar_x": TAR_FILES,
              "rm_tree": TAR_FILES}

    def run(self, workloads: tuple[str, ...]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        for name in workloads:
            self.settle()
            getattr(self, f"w_{name}")()
        pid = self.target.pid
        if pid is not None:
            for phase, ops in self.PER_OP.items():
                if phase in self.phase_cpu:
                    self.fig.add(f"daemon_cpu_{phase}", self.phase_cpu[phase] / ops * 1e6, "us/op")
            rss = peak_rss(pid)
            if rss is not None:
                self.fig.add("daemon_peak_rss", rss / MiB, "MiB")
            if self.written:
                self.fig.add("daemon_cpu_all", self.cpu_total / (self.written / GiB), "s/GiB")

    # -- sequential, incompressible; then cold read; random 4 KiB on the same file
    def w_seq(self) -> None:
        blocks = self.content.blocks("random", self.size)
        path = self.root / "seq.bin"
        cpu0 = cpu_seconds(self.target.pid)
        with self.phase("seq_write", self.size):
            t0 = time.perf_counter()
            fsync_seconds = _write_file(path, blocks, fsync=True)
            elapsed = time.perf_counter() - t0
        self.fig.add("seq_write", self.size / MiB / elapsed, "MiB/s")
        self.fig.add("seq_write_fsync", fsync_seconds, "s")
        if self.target.pid is not None:
            self.fig.add("daemon_cpu_seq_write", (cpu_seconds(self.target.pid) - cpu0) / (self.size / GiB), "s/GiB")
        self.cold()
        with self.phase("seq_read"):
            t0 = time.perf_counter()
            n = _read_file(path)
            elapsed = time.perf_counter() - t0
        assert n == self.size, f"read {n} bytes of {self.size}"
        self.fig.add("seq_read_cold", n / MiB / elapsed, "MiB/s")

    def w_rand(self) -> None:
        path = self.root / "seq.bin"
        if not path.exists() or path.stat().st_size != self.size:
            _write_file(path, self.content.blocks("random", self.size), fsync=True)
        self.cold()
        with self.phase("rand_read"):
            iops = self._rand(path, write=False)
        self.fig.add("rand_read_4k", iops, "IOPS")
        with self.phase("rand_write", 0):
            iops, ops = self._rand(path, write=True)
        self.written += ops * 4096
        self.fig.add("rand_write_4k", iops, "IOPS")
        path.unlink()

    def _rand(self, path: Path, write: bool):
        """Random 4 KiB I/O for rand_seconds at queue depth 1; writes end with an fsync, which counts."""
        if self.use_fio:
            job = _fio([f"--name=rand{'write' if write else 'read'}", f"--filename={path}",
                        f"--rw={'randwrite' if write else 'randread'}", "--bs=4k", "--ioengine=psync",
                        "--iodepth=1", "--time_based", f"--runtime={self.rand_seconds:g}", "--invalidate=1",
                        "--norandommap", "--randrepeat=0", "--fallocate=none", "--refill_buffers"])
            if not write:
                return job["read"]["iops"]
            ops, runtime = job["write"]["total_ios"], job["write"]["runtime"] / 1000
            return ops / (runtime + _fsync_path(path)), ops
        rng = random.Random(1)
        nblocks = self.size // 4096
        pool = self.content.random_pool()
        fd = os.open(path, os.O_RDWR)
        ops = 0
        try:
            t0 = time.perf_counter()
            end = t0 + self.rand_seconds
            while True:
                for _ in range(64):
                    off = rng.randrange(nblocks) * 4096
                    if write:
                        os.pwrite(fd, pool[off % (POOL - 4096):][:4096], off)
                    else:
                        os.pread(fd, 4096, off)
                ops += 64
                if time.perf_counter() >= end:
                    break
            if write:
                os.fsync(fd)
            elapsed = time.perf_counter() - t0
        finally:
            os.close(fd)
        return (ops / elapsed, ops) if write else ops / elapsed

    # -- sequential, highly compressible
    def w_compressible(self) -> None:
        blocks = self.content.blocks("text", self.size)
        path = self.root / "log.txt"
        before = self.target.stored() if self.target.stored else None
        with self.phase("compressible_write", self.size):
            t0 = time.perf_counter()
            _write_file(path, blocks, fsync=True)
            elapsed = time.perf_counter() - t0
        self.fig.add("seq_write_compressible", self.size / MiB / elapsed, "MiB/s")
        if before is not None:
            self.fig.add("compressible_stored", (self.target.stored() - before) / self.size, "x logical")
        path.unlink()

    # -- small files
    def w_small(self) -> None:
        folder = self.root / "small"
        folder.mkdir()
        names = [os.fsencode(folder / f"f{i:05d}") for i in range(SMALL_FILES)]
        data = self.content.small_files()
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
        with self.phase("create", SMALL_FILES * 4096):
            t0 = time.perf_counter()
            for name, d in zip(names, data):
                fd = os.open(name, flags, 0o644)
                os.write(fd, d)
                os.close(fd)
            elapsed = time.perf_counter() - t0
        self.fig.add("create_4k", SMALL_FILES / elapsed, "files/s")
        if self.target.drained is not None:  # tempfs: with the storing its flusher did after the last close
            self.target.drained()
            self.fig.add("create_4k_stored", SMALL_FILES / (time.perf_counter() - t0), "files/s")
        self.cold()
        with self.phase("stat"):
            t0 = time.perf_counter()
            for name in names:
                os.lstat(name)
            elapsed = time.perf_counter() - t0
        self.fig.add("stat_cold", SMALL_FILES / elapsed, "ops/s")
        with self.phase("unlink"):
            t0 = time.perf_counter()
            for name in names:
                os.unlink(name)
            elapsed = time.perf_counter() - t0
        self.fig.add("unlink", SMALL_FILES / elapsed, "files/s")
        if self.target.drained is not None:  # tempfs: with the freeing its reclaimer did after the last unlink
            self.target.drained()
            self.fig.add("unlink_reclaimed", SMALL_FILES / (time.perf_counter() - t0), "files/s")
        folder.rmdir()

    # -- small files created while another program fsyncs beside them (a database, a journal)
    def w_fsync(self) -> None:
        """A filesystem that stalls every request while it waits for the disk shows it here."""
        folder = self.root / "beside"
        folder.mkdir()
        stop, synced = threading.Event(), [0]
        data = self.content.small_files()

        def journal() -> None:
            fd = os.open(folder / "journal", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            try:
                while not stop.is_set():
                    os.write(fd, data[synced[0] % len(data)])
                    os.fsync(fd)
                    synced[0] += 1
            finally:
                os.close(fd)
        names = [os.fsencode(folder / f"f{i:05d}") for i in range(BESIDE_FILES)]
        syncer = threading.Thread(target=journal)
        syncer.start()
        try:
            with self.phase("create_beside_fsync", BESIDE_FILES * 4096):
                time.sleep(0.5)  # the journal's writes under way
                t0, synced0 = time.perf_counter(), synced[0]
                for name, d in zip(names, data):
                    fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                    os.write(fd, d)
                    os.close(fd)
                elapsed, fsyncs = time.perf_counter() - t0, synced[0] - synced0
        finally:
            stop.set()
            syncer.join()
        self.fig.add("create_beside_fsync", BESIDE_FILES / elapsed, "files/s")
        self.fig.add("fsync_beside_create", fsyncs / elapsed, "fsyncs/s")
        shutil.rmtree(folder)

    # -- tar x of a tree of small files
    def w_tar(self) -> None:
        tarball = self.content.tarball(self.scratch)
        dest = self.root / "tarx"
        dest.mkdir()
        with open(tarball, "rb") as f:  # in the page cache, as a just-downloaded archive is
            while f.read(MiB):
                pass
        with self.phase("tar_x", tarball.stat().st_size):
            t0 = time.perf_counter()
            subprocess.run(["tar", "-xf", str(tarball), "-C", str(dest)], check=True)
            elapsed = time.perf_counter() - t0
        self.fig.add("tar_x", TAR_FILES / elapsed, "files/s")
        with self.phase("rm_tree"):
            t0 = time.perf_counter()
            shutil.rmtree(dest)
            elapsed = time.perf_counter() - t0
        self.fig.add("rm_tree", TAR_FILES / elapsed, "files/s")

    # -- the vision temp mix
    def w_vision(self) -> None:
        model_size = min(128 * MiB, self.size // 4)
        files = self.content.vision_mix(model_size)
        total = sum(len(d) for _, d in files)
        folder = self.root / "vision"
        for sub in {os.path.dirname(p) for p, _ in files}:
            (folder / sub).mkdir(parents=True, exist_ok=True)
        before = self.target.stored() if self.target.stored else None
        with self.phase("vision_write", total):
            t0 = time.perf_counter()
            for rel, data in files:
                _write_file(folder / rel, [data], fsync=False)
            elapsed = time.perf_counter() - t0
        self.fig.add("vision_write", total / MiB / elapsed, "MiB/s")
        self.fig.add("vision_write_files", len(files) / elapsed, "files/s")
        if before is not None:
            self.fig.add("vision_stored", (self.target.stored() - before) / MiB, "MiB")
        self.cold()
        with self.phase("vision_read"):
            t0 = time.perf_counter()
            got = 0
            for rel, _data in files:
                path = folder / rel
                if rel.startswith("models/"):
                    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as mm:
                        hashlib.blake2b(mm).digest()  # every page faulted in through the mapping
                        got += len(mm)
                else:
                    got += len(path.read_bytes())
            elapsed = time.perf_counter() - t0
        assert got == total, f"read {got} of {total} bytes"
        self.fig.add("vision_read_cold", total / MiB / elapsed, "MiB/s")
        shutil.rmtree(folder)


def vision_reference(content: Content, size: int, figures: Figures) -> None:
    files = content.vision_mix(min(128 * MiB, size // 4))
    figures.add("vision_logical", sum(len(d) for _, d in files) / MiB, "MiB")
    figures.add("vision_lz4_separately", lz4_separately(files) / MiB, "MiB")


# ---------------------------------------------------------------- mounts (compare)

_libc = ctypes.CDLL(None, use_errno=True)


def _die_with_parent() -> None:  # preexec_fn: a daemon we started gets SIGTERM if we die
    _libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG


def _fuse_mounted(path: Path) -> bool:
    path = os.path.abspath(path)
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields = left.split()
            if len(fields) > 4 and fields[4].replace("\\040", " ") == path and right.startswith("fuse"):
                return True
    return False


@dataclass
class FS:
    kind: str                        # plain, bindfs, gocryptfs, tempfs or pymem
    root: Path                       # where the workloads run
    mountpoint: Optional[Path] = None
    proc: Optional[subprocess.Popen] = None
    stored: Optional[Callable[[], int]] = None
    log: Optional[Path] = None
    results: list[dict[str, Figure]] = field(default_factory=list)
    label: str = ""                  # how the table names it (tempfs@TREE for another source tree)

    @property
    def pid(self) -> Optional[int]:
        return self.proc.pid if self.proc else None


def _start(fs: FS, cmd: list[str], env=None, cwd=None, timeout: float = 30.0) -> None:
    with open(fs.log, "ab") as log:
        fs.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                                   cwd=cwd, start_new_session=True, preexec_fn=_die_with_parent)
    deadline = time.monotonic() + timeout
    while not _fuse_mounted(fs.mountpoint):
        if fs.proc.poll() is not None:
            raise RuntimeError(f"{fs.kind} exited {fs.proc.returncode} before mounting:\n"
                               + fs.log.read_text(errors="replace")[-3000:])
        if time.monotonic() > deadline:
            raise RuntimeError(f"{fs.kind} not mounted after {timeout} s")
        time.sleep(0.05)
    os.statvfs(fs.mountpoint)


def setup(spec: str, base: Path, python: str, tempfs_repo: Path) -> FS:
    """`spec` is a kind, or tempfs@DIR[@CONFIG]: the tempfs of another source tree (to compare
    two), optionally with a config file of its own."""
    kind, _, tree = spec.partition("@")
    tree, _, config = tree.partition("@")
    if tree:
        tempfs_repo = Path(tree).resolve()
    here = base / spec.replace("/", "_").replace("@", "_")
    here.mkdir()
    if kind == "plain":
        fs = FS(kind, here / "bench", label=kind)
        fs.stored = lambda: apparent_bytes(here)
        return fs
    mnt = here / "mnt"
    mnt.mkdir()
    fs = FS(kind, mnt / "bench", mountpoint=mnt, log=here / "daemon.log")
    if kind == "bindfs":
        src = here / "src"
        src.mkdir()
        _start(fs, ["bindfs", "-f", str(src), str(mnt)])
        fs.stored = lambda: apparent_bytes(src)
    elif kind == "gocryptfs":
        cipher, passfile = here / "cipher", here / "passfile"
        cipher.mkdir()
        passfile.write_text("bench-password\n")
        subprocess.run(["gocryptfs", "-init", "-q", "-passfile", str(passfile), str(cipher)],
                       check=True, capture_output=True)
        _start(fs, ["gocryptfs", "-fg", "-q", "-passfile", str(passfile), str(cipher), str(mnt)])
        fs.stored = lambda: apparent_bytes(cipher)
    elif kind == "pymem":
        _start(fs, [python, str(REPO / "scripts" / "memfs.py"), str(mnt)])
    elif kind == "tempfs":
        keys = here / "keys"
        keys.mkdir(mode=0o700)
        (here / "tempfs.toml").write_text(Path(config).read_text() if config else "")
        env = dict(os.environ, PYTHONPATH=str(tempfs_repo), PYTHONUNBUFFERED="1")
        _start(fs, [python, "-m", "tempfs", "mount", str(mnt), "--store", str(here / "store"),
                    "--config", str(here / "tempfs.toml"), "--key-file", str(keys / "tempfs.key"),
                    "--foreground"], env=env, cwd=here, timeout=60)
        fs.root = mnt / "cache" / "data" / "bench"  # the root and branch folders refuse files
        fs.stored = lambda: tempfs_stored(mnt)
    else:
        raise ValueError(kind)
    fs.label = kind if not tree else f"{kind}@{Path(tree).name}" + (f"@{Path(config).stem}" if config else "")
    return fs


def teardown(fs: FS) -> None:
    """Unmounts (lazily if busy) and makes sure the daemon we started is gone; never raises."""
    try:
        if fs.mountpoint is not None and _fuse_mounted(fs.mountpoint):
            r = subprocess.run(["fusermount3", "-u", str(fs.mountpoint)], capture_output=True, text=True)
            if r.returncode != 0:
                print(f"# {fs.kind}: {r.stderr.strip()}; detaching lazily", file=sys.stderr)
                subprocess.run(["fusermount3", "-uz", str(fs.mountpoint)], capture_output=True)
        if fs.proc is not None:
            for sig in (None, signal.SIGTERM, signal.SIGKILL):
                if sig is not None and fs.proc.poll() is None:
                    fs.proc.send_signal(sig)
                try:
                    fs.proc.wait(timeout=120 if sig is None else 10)
                    break
                except subprocess.TimeoutExpired:
                    continue
    except Exception as e:  # keep tearing the others down
        print(f"# teardown of {fs.kind} failed: {e}", file=sys.stderr)


class Profiler:
    """py-spy record of the tempfs daemon during each workload phase: raw (collapsed) stacks."""

    def __init__(self, pid: int, outdir: Path, rate: int) -> None:
        self.pid, self.outdir, self.rate = pid, outdir, rate
        self.outdir.mkdir(parents=True, exist_ok=True)
        self.n = 0

    @contextlib.contextmanager
    def __call__(self, phase: str):
        self.n += 1
        out = self.outdir / f"{self.n:02d}-{phase}.txt"
        pyspy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        proc = subprocess.Popen([pyspy, "record", "--pid", str(self.pid), "--rate", str(self.rate),
                                 "--format", "raw", "--threads", "--output", str(out)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        time.sleep(0.5)  # let it attach
        try:
            yield
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


# leaf frames py-spy counts as active although the thread only waits
IDLE_LEAVES = {"WorkerThread._work", "EpollIOManager.get_events"}


def summarize_profile(path: Path, top: int = 25, seconds: Optional[float] = None, rate: int = 0) -> str:
    """Self and inclusive share of each function in a py-spy raw (collapsed, --threads) profile:
    over all threads, then over the main (trio) thread alone, which serves every FUSE request."""
    samples: list[tuple[str, list[str], int]] = []
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        thread = "?"
        if frames[0].startswith("thread ("):
            head = frames.pop(0)
            thread = head.split(")")[0] + (") main" if head.endswith(": MainThread") else ") worker")
            if frames and frames[0] == "MainThread":
                frames.pop(0)
        if frames and frames[-1].split(" (")[0] in IDLE_LEAVES:
            continue  # waiting: a worker thread with no job, the trio loop in epoll
        names = []
        for f in frames:
            func, _, where = f.rpartition(" (")
            names.append(f"{func} ({where.split(':')[0]})" if func else f)
        samples.append((thread, names, int(count)))
    total = sum(n for _, _, n in samples)
    if not total:
        return f"{path.name}: no samples\n"
    out = [f"{path.name}: {total} samples (waiting excluded)"]
    by_thread: dict[str, int] = {}
    for thread, _, n in samples:
        key = "main (trio) thread" if thread.endswith(" main") else "worker threads"
        by_thread[key] = by_thread.get(key, 0) + n
    for key, n in sorted(by_thread.items(), key=lambda x: -x[1]):
        busy = f", busy {100 * n / (seconds * rate):.0f}% of the time" if seconds and rate else ""
        out.append(f"  {key}: {100 * n / total:.1f}% of samples{busy}")
    for title, keep in (("all threads", lambda t: True), ("main (trio) thread only", lambda t: t.endswith(" main"))):
        own: dict[str, int] = {}
        incl: dict[str, int] = {}
        sub = 0
        for thread, names, n in samples:
            if not keep(thread):
                continue
            sub += n
            if names:
                own[names[-1]] = own.get(names[-1], 0) + n
            for name in set(names):
                incl[name] = incl.get(name, 0) + n
        if not sub:
            continue
        out.append(f"  == {title}: {sub} samples; self% / incl% of these ==")
        out.append("  self%  incl%  function (file)   [by self]")
        for name, n in sorted(own.items(), key=lambda x: -x[1])[:top]:
            out.append(f"  {100 * n / sub:5.1f}  {100 * incl[name] / sub:5.1f}  {name}")
        out.append("  self%  incl%  function (file)   [by inclusive]")
        for name, n in sorted(incl.items(), key=lambda x: -x[1])[:top]:
            out.append(f"  {100 * own.get(name, 0) / sub:5.1f}  {100 * n / sub:5.1f}  {name}")
    return "\n".join(out) + "\n"


def _running_order(fss: list, rep: int) -> list:
    """The order of repeat `rep`: every other repeat runs them in reverse, and each pair of
    repeats starts with the next filesystem, so that none always runs first and no two always
    run in the same order. A filesystem run right after another inherits what that one leaves
    (dirty pages, a busy disk): in a run of gocryptfs, pymem and two tempfs trees, rotated
    only, the first tree read 0.83-0.92x the second on random and sequential writes, where a
    run of the two alone, each first in turn, read 1.01-1.02x (2026-11-29)."""
    start = rep // 2 % len(fss)
    turned = fss[start:] + fss[:start]
    return turned[::-1] if rep % 2 else turned


# ---------------------------------------------------------------- the table

# figure -> (higher is better, target ratio to gocryptfs or None)
TARGETS = {
    "seq_write": (True, 1.0), "seq_write_fsync": (False, None), "seq_read_cold": (True, 1.0), "rand_read_4k": (True, 1.0),
    "rand_write_4k": (True, 1.0), "seq_write_compressible": (True, 2.0), "create_4k": (True, 1.0),
    "create_4k_stored": (True, None),
    "stat_cold": (True, 1.0), "unlink": (True, 1.0), "unlink_reclaimed": (True, None), "tar_x": (True, 1.0), "rm_tree": (True, None),
    "create_beside_fsync": (True, None), "fsync_beside_create": (True, None),
    "vision_write": (True, None), "vision_write_files": (True, None), "vision_read_cold": (True, None),
    "vision_stored": (False, None), "compressible_stored": (False, None), "daemon_peak_rss": (False, None),
    "daemon_cpu_seq_write": (False, None), "daemon_cpu_all": (False, None),
    "daemon_cpu_create": (False, None), "daemon_cpu_stat": (False, None), "daemon_cpu_unlink": (False, None),
    "daemon_cpu_tar_x": (False, None), "daemon_cpu_rm_tree": (False, None),
}


def _fmt(v: Optional[float]) -> str:
    if v is None:
        return "-"
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}"


def print_table(fss: list[FS], extra: Figures, title: str) -> None:
    from rich.console import Console
    from rich.table import Table
    table = Table(title=title)
    table.add_column("figure")
    table.add_column("unit")
    for fs in fss:
        table.add_column(fs.label, justify="right")
    tempfs = next((fs for fs in fss if fs.kind == "tempfs"), None)  # the first tempfs is the subject
    peers = [fs for fs in fss if fs is not tempfs]
    if tempfs:
        for peer in peers:
            table.add_column(f"{tempfs.label}/{peer.label}", justify="right")
        table.add_column("target", justify="right")
    names = [n for n in TARGETS if any(n in r for fs in fss for r in fs.results)]
    for name in names:
        unit = next(r[name].unit for fs in fss for r in fs.results if name in r)
        row = [name, unit]
        for fs in fss:
            vals = [r[name].value for r in fs.results if name in r]
            row.append(_fmt(statistics.mean(vals)) if vals else "-")
        if tempfs:
            for peer in peers:
                ratios = [t[name].value / p[name].value for t, p in zip(tempfs.results, peer.results)
                          if name in t and name in p and p[name].value]
                if ratios:
                    cell = f"{statistics.mean(ratios):.2f}"
                    if len(ratios) > 1:
                        cell += f" ({min(ratios):.2f}-{max(ratios):.2f})"
                    row.append(cell)
                else:
                    row.append("-")
            higher, target = TARGETS[name]
            row.append("-" if target is None else f">= {target:g}x gocryptfs")
        table.add_row(*row)
    Console(width=200).print(table)
    if extra.items:
        print("tempfs only / reference:")
        for f in extra.items.values():
            print(f"  {f.name} {_fmt(f.value)} {f.unit}")


# ---------------------------------------------------------------- commands

def parse_size(text: str) -> int:
    units = {"K": KiB, "M": MiB, "G": GiB}
    text = text.strip().upper().rstrip("IB").rstrip("B")
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def _workloads(text: str) -> tuple[str, ...]:
    names = tuple(w.strip() for w in text.split(",") if w.strip())
    unknown = set(names) - set(WORKLOADS)
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown workloads {sorted(unknown)}; known: {','.join(WORKLOADS)}")
    return names


def cmd_run(args) -> int:
    root = Path(args.dir).resolve()
    stored = drained = None
    if args.tempfs:
        stored = drained = lambda: tempfs_stored(Path(args.tempfs))
    elif args.backing:
        stored = lambda: apparent_bytes(Path(args.backing))
    with tempfile.TemporaryDirectory(prefix="tempfs-bench-scratch-") as scratch:
        runner = Runner(root, Figures(), Content(), args.size, args.rand_seconds,
                        Target(pid=args.pid, stored=stored, drained=drained), Path(scratch), not args.no_fio)
        runner.run(args.workloads)
    return 0


def cmd_compare(args) -> int:
    base = Path(tempfile.mkdtemp(prefix="tempfs-bench-", dir=args.base))
    content = Content()
    fss: list[FS] = []
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")

    def on_term(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, on_term)
    extra = Figures(prefix="reference ")
    try:
        for kind in args.fs:
            fss.append(setup(kind, base, args.python, Path(args.tempfs_repo).resolve()))
            print(f"# {fss[-1].label}: {fss[-1].root}" + (f" (pid {fss[-1].pid})" if fss[-1].pid else ""), flush=True)
        for rep in range(args.repeat):
            for fs in _running_order(fss, rep):
                profile = None
                if args.profile and fs.kind == "tempfs":
                    profile = Profiler(fs.pid, Path(args.profile) / f"{fs.label}-{rep + 1}", args.profile_rate)
                figures = Figures(prefix=f"{fs.label}#{rep + 1} ")
                runner = Runner(fs.root, figures, content, args.size, args.rand_seconds,
                                Target(pid=fs.pid, stored=fs.stored, profile=profile,
                                       drained=fs.stored if fs.kind == "tempfs" else None,
                                       others=tuple(o.pid for o in fss if o is not fs and o.pid)),
                                base, not args.no_fio)
                runner.run(args.workloads)
                shutil.rmtree(fs.root, ignore_errors=True)
                fs.results.append(figures.items)
        if "vision" in args.workloads:
            vision_reference(content, args.size, extra)
        if args.expiry and any(fs.kind == "tempfs" for fs in fss):
            out = subprocess.run([args.python, str(REPO / "scripts" / "bench_expiry.py")], capture_output=True,
                                 text=True, env=dict(os.environ, PYTHONPATH=str(Path(args.tempfs_repo).resolve())))
            for line in out.stdout.splitlines():
                parts = line.split(maxsplit=2)
                if len(parts) == 3 and parts[0].startswith(("reap", "idle")):
                    with contextlib.suppress(ValueError):
                        extra.add("expiry_" + parts[0], float(parts[1]), parts[2])
    finally:
        for fs in reversed(fss):
            teardown(fs)
        if args.keep:
            print(f"# kept {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)
    title = (f"tempfs benchmark, {started}, {os.uname().nodename}, {os.cpu_count()} cores, "
             f"size {args.size // MiB} MiB, {args.repeat} repeat(s)")
    print_table(fss, extra, title)
    if args.profile:
        for path in sorted(Path(args.profile).rglob("*.txt")):
            if not path.name.endswith("summary.txt"):
                summary = summarize_profile(path)
                path.with_name(path.stem + ".summary.txt").write_text(summary)
        print(f"# profiles (py-spy raw + summaries) in {args.profile}")
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"started": started, "size": args.size, "repeat": args.repeat,
             "results": {fs.label: [{k: [f.value, f.unit] for k, f in r.items()} for r in fs.results] for fs in fss},
             "reference": {k: [f.value, f.unit] for k, f in extra.items.items()}}, indent=1))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--size", type=parse_size, default=GiB, help="sequential file size (default 1G)")
    common.add_argument("--workloads", type=_workloads, default=WORKLOADS,
                        help=f"comma-separated subset of {','.join(WORKLOADS)}")
    common.add_argument("--rand-seconds", type=float, default=15.0, help="duration of each random 4 KiB test")
    common.add_argument("--no-fio", action="store_true", help="random I/O from Python even if fio is installed")
    r = sub.add_parser("run", parents=[common], help="run the set inside DIR")
    r.add_argument("dir")
    r.add_argument("--pid", type=int, help="the filesystem daemon: its CPU and peak RSS are reported")
    r.add_argument("--backing", help="folder whose files hold what the filesystem stores (for stored bytes)")
    r.add_argument("--tempfs", help="tempfs mountpoint: stored bytes from its status")
    c = sub.add_parser("compare", parents=[common], help="plain, bindfs, gocryptfs and tempfs, side by side")
    c.add_argument("--repeat", type=int, default=2)
    c.add_argument("--fs", type=lambda s: [x for x in s.split(",") if x], default=list(FS_KINDS),
                   help="comma-separated subset of " + ",".join(FS_KINDS + EXTRA_KINDS) + "; tempfs@DIR mounts the tempfs "
                   "of source tree DIR (several may be compared; the first tempfs is the subject of the ratios)")
    c.add_argument("--base", default="/var/tmp", help="where the folders and mounts are made (same disk for all)")
    c.add_argument("--python", default=sys.executable, help="the Python that runs tempfs")
    c.add_argument("--tempfs-repo", default=str(REPO), help="the source tree of the tempfs to mount")
    c.add_argument("--no-expiry", dest="expiry", action="store_false", help="skip scripts/bench_expiry.py")
    c.add_argument("--profile", help="py-spy record the tempfs daemon during each phase into this folder")
    c.add_argument("--profile-rate", type=int, default=250)
    c.add_argument("--keep", action="store_true", help="keep the folders (mounts are always torn down)")
    c.add_argument("--json", help="also write every figure to this file")
    args = parser.parse_args()
    if args.command == "compare":
        bad = {spec.partition("@")[0] for spec in args.fs} - set(FS_KINDS + EXTRA_KINDS)
        if bad:
            parser.error(f"unknown filesystems {sorted(bad)}")
    return cmd_run(args) if args.command == "run" else cmd_compare(args)


if __name__ == "__main__":
    sys.exit(main())
