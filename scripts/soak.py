#!/usr/bin/env python3
"""Soak test: mixed load on a fresh tempfs for a given time; counts operations and errors, and
watches the daemon's memory.

    .venv/bin/python scripts/soak.py --minutes 10 [--workers 4] [--seed N] [--workdir DIR]

It mounts a new store in a temporary folder (`python -m tempfs mount --foreground`) with a
config that makes every mechanism work during the run: cleanup/ entries live 20 s (expiry),
cache/ holds 24 MB and evicts (eviction), processing/ refuses past its default limit. Each worker
process, in folders of its own, loops over: small files (0-64 KB) and big files (1-4 MiB),
fsync now and then, reads that check every byte against what it wrote (whole, or page by page
in random order), overwrites in the middle, small writes scattered over a file (patches),
truncates, renames, deletes, folders made and
removed, listings and stats, files in cleanup/ that must be gone within a few seconds of their
deadline (and not before), files in cache/ that may be evicted (and read back exactly if not).
The main process asks `tempfs status
--json` every 10 s and samples the daemon's RSS every 2 s. At the end it unmounts and runs
`tempfs fsck --no-repair`.

Prints figures as `name value unit` lines: operations done (in all and per kind), errors
(must be 0: failed calls, wrong content, entries outliving their deadline, lines the daemon
logged at ERROR, an unclean unmount, fsck problems), and the daemon's RSS at start (mounted,
idle), middle and end. Exits 1 on any error, or if RSS passes --max-rss-mb, or if it grew by
more than max(32 MiB, 20 %) from the middle of the run to its end (growth without bound); 2 if
the harness could not run.
"""
from __future__ import annotations

import argparse
import collections
import errno
import hashlib
import json
import multiprocessing
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from harness import die_with_parent, script_env, start_daemon, tear_down, unmount

MiB = 1024 * 1024
PAGE = 4096
EXPIRY = 20.0          # cleanup/'s max_age in this config
EXPIRY_SLACK = 4.0     # the reaper's nap, plus this machine being busy
CONFIG = f"""\
# soak: expiry, eviction and refusal all at work within minutes
[memory]
dirty_limit = "64MB"
cache_limit = "32MB"

[space]
min_free = "64MB"

[policy.cleanup]
max_age = "{int(EXPIRY)}s"

[policy.cache]
max_size = "24MB"
on_full = "evict"
"""
MAX_OWN_FILES = 30     # per worker in processing/: old ones are removed beyond it
STATUS_EVERY = 10.0
RSS_EVERY = 2.0


def _rss(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


# ------------------------------------------------------------------ a worker

class Worker:
    def __init__(self, mnt: Path, me: int, seed: int, deadline: float) -> None:
        self.me, self.deadline = me, deadline
        self.rng = random.Random(f"{seed}:{me}")
        self.own = mnt / "processing/common/uploads" / f"soak-w{me}"
        self.cached = mnt / "cache/data" / f"soak-w{me}"
        self.expiring = mnt / "cleanup/scheduled" / f"soak-w{me}"
        for d in (self.own, self.cached, self.expiring):
            d.mkdir(parents=True, exist_ok=True)
        self.files: dict[str, bytes] = {}          # processing/: name -> sha256 of its content
        self.cache_files: dict[str, bytes] = {}    # cache/: may be evicted
        self.timed: dict[str, float] = {}          # cleanup/: name -> when it was written
        self.scattered: dict[str, bytearray] = {}  # processing/: name -> content, for scatter()
        self.ops: collections.Counter[str] = collections.Counter()
        self.errors: list[str] = []
        self.n = 0

    def error(self, message: str) -> None:
        self.errors.append(f"worker {self.me}: {message}")

    def data(self, size: int) -> bytes:
        if self.rng.random() < 0.5:
            return self.rng.randbytes(size)
        line = self.rng.randbytes(20).hex().encode() + b"\n"
        return (line * (size // len(line) + 1))[:size]

    def name(self, prefix: str) -> str:
        self.n += 1
        return f"{prefix}{self.n}"

    @staticmethod
    def put(path: Path, data: bytes, sync: bool) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            if sync:
                os.fsync(fd)
        finally:
            os.close(fd)

    # -- operations
    def write_small(self) -> None:
        name = self.name("s")
        data = self.data(self.rng.choice([0, 1, 100, 4096, self.rng.randrange(1, 65536)]))
        self.put(self.own / name, data, self.rng.random() < 0.3)
        self.files[name] = hashlib.sha256(data).digest()

    def write_big(self) -> None:
        name = self.name("b")
        data = self.data(self.rng.randrange(MiB, 4 * MiB))
        self.put(self.own / name, data, self.rng.random() < 0.5)
        self.files[name] = hashlib.sha256(data).digest()

    def read_verify(self) -> None:
        if not self.files:
            return
        name = self.rng.choice(list(self.files))
        if hashlib.sha256((self.own / name).read_bytes()).digest() != self.files[name]:
            self.error(f"{name}: content differs from what was written")

    def read_pieces(self) -> None:
        """Reads a file page by page in random order, uncached, as random readers do: each
        block's first page loads the block, and the kernel is handed the rest of it."""
        if not self.files:
            return
        name = self.rng.choice(list(self.files))
        fd = os.open(self.own / name, os.O_RDONLY)
        try:
            size = os.fstat(fd).st_size
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
            pages = list(range(0, size, PAGE))
            self.rng.shuffle(pages)
            content = bytearray(size)
            for at in pages:
                content[at:at + PAGE] = os.pread(fd, PAGE, at)
        finally:
            os.close(fd)
        if hashlib.sha256(content).digest() != self.files[name]:
            self.error(f"{name}: content read in pieces differs from what was written")

    def overwrite(self) -> None:
        if not self.files:
            return
        name = self.rng.choice(list(self.files))
        path = self.own / name
        with open(path, "r+b") as f:
            content = bytearray(f.read())
            at = self.rng.randrange(0, len(content) + 1)
            patch = self.data(self.rng.randrange(1, 300_000))
            f.seek(at)
            f.write(patch)
            if self.rng.random() < 0.3:
                f.flush()
                os.fsync(f.fileno())
        content[at:at + len(patch)] = patch
        self.files[name] = hashlib.sha256(content).digest()

    def scatter(self) -> None:
        """Small writes at random places of a file whose whole content the worker keeps (few such
        files): stored as patches over blocks the daemon does not hold; now and then a cut, or a
        check of every byte."""
        if len(self.scattered) < 2 or self.rng.random() < 0.05:
            if len(self.scattered) >= 3:
                os.unlink(self.own / self.scattered.popitem()[0])
            name = self.name("p")
            content = bytearray(self.data(self.rng.randrange(200_000, 1_000_000)))
            self.put(self.own / name, bytes(content), self.rng.random() < 0.5)
            self.scattered[name] = content
            return
        name = self.rng.choice(list(self.scattered))
        content, path = self.scattered[name], self.own / name
        roll = self.rng.random()
        if roll < 0.1:
            size = self.rng.randrange(0, len(content) + 100_000)
            os.truncate(path, size)
            del content[size:]
            content.extend(bytes(size - len(content)))
        elif roll < 0.25:
            if path.read_bytes() != content:
                self.error(f"{name}: content after scattered writes differs from what was written")
        else:
            fd = os.open(path, os.O_WRONLY)
            try:
                for _ in range(self.rng.randint(1, 8)):
                    at, piece = self.rng.randrange(len(content) + 4096), self.data(self.rng.randrange(1, 6000))
                    os.pwrite(fd, piece, at)
                    content.extend(bytes(max(0, at - len(content))))
                    content[at:at + len(piece)] = piece
                if self.rng.random() < 0.2:
                    os.fsync(fd)
            finally:
                os.close(fd)

    def truncate(self) -> None:
        if not self.files:
            return
        name = self.rng.choice(list(self.files))
        path = self.own / name
        content = path.read_bytes()
        size = self.rng.randrange(0, len(content) + 200_000)
        os.truncate(path, size)
        content = content[:size] + bytes(max(0, size - len(content)))
        self.files[name] = hashlib.sha256(content).digest()

    def rename(self) -> None:
        if not self.files:
            return
        old = self.rng.choice(list(self.files))
        new = self.name("m")
        os.rename(self.own / old, self.own / new)
        self.files[new] = self.files.pop(old)

    def delete(self) -> None:
        if not self.files:
            return
        name = self.rng.choice(list(self.files))
        os.unlink(self.own / name)
        del self.files[name]

    def folders(self) -> None:
        top = self.own / self.name("dir")
        (top / "a" / "b").mkdir(parents=True)
        (top / "a" / "b" / "f").write_bytes(b"x" * self.rng.randrange(0, 5000))
        os.symlink("b/f", top / "a" / "link")
        shutil.rmtree(top)

    def listing(self) -> None:
        names = set(os.listdir(self.own)) - {n for n in os.listdir(self.own) if n.startswith("dir")}
        known = set(self.files) | set(self.scattered)
        if names != known:
            self.error(f"listing differs: extra {sorted(names - known)[:5]}, missing {sorted(known - names)[:5]}")

    def stat(self) -> None:
        if self.files:
            os.stat(self.own / self.rng.choice(list(self.files)))
        os.statvfs(self.own)

    def write_cached(self) -> None:
        name = self.name("c")
        data = self.data(self.rng.randrange(100_000, 3 * MiB))
        self.put(self.cached / name, data, False)
        self.cache_files[name] = hashlib.sha256(data).digest()

    def read_cached(self) -> None:
        if not self.cache_files:
            return
        name = self.rng.choice(list(self.cache_files))
        try:
            data = (self.cached / name).read_bytes()
        except FileNotFoundError:
            self.ops["evicted_seen"] += 1
            del self.cache_files[name]
            return
        if hashlib.sha256(data).digest() != self.cache_files[name]:
            self.error(f"cache/{name}: content differs from what was written")

    def write_expiring(self) -> None:
        name = self.name("e")
        self.expiring.mkdir(exist_ok=True)  # an empty folder past its deadline expires too
        (self.expiring / name).write_bytes(b"e" * self.rng.randrange(0, 4000))
        self.timed[name] = time.time()

    def check_expiry(self) -> None:
        now = time.time()
        try:
            present = set(os.listdir(self.expiring))
        except FileNotFoundError:
            present = set()
        for name, written in list(self.timed.items()):
            age = now - written
            if name in present and age > EXPIRY + EXPIRY_SLACK:
                self.error(f"cleanup/{name}: still there {age:.1f} s after it was written (max_age {EXPIRY:.0f} s)")
                del self.timed[name]
            elif name not in present and age < EXPIRY - 1.0:
                self.error(f"cleanup/{name}: gone after {age:.1f} s, before its deadline")
                del self.timed[name]
            elif name not in present:
                self.ops["expired_seen"] += 1
                del self.timed[name]

    def keep_bounded(self) -> None:
        while len(self.files) > MAX_OWN_FILES:
            name = next(iter(self.files))
            os.unlink(self.own / name)
            del self.files[name]

    def run(self) -> None:
        kinds = {"write_small": 30, "write_big": 6, "read_verify": 30, "read_pieces": 6, "overwrite": 8, "scatter": 8, "truncate": 3,
                 "rename": 8, "delete": 8, "folders": 3, "listing": 4, "stat": 6, "write_cached": 4,
                 "read_cached": 6, "write_expiring": 3, "check_expiry": 2}
        names, weights = list(kinds), list(kinds.values())
        while time.monotonic() < self.deadline:
            kind = self.rng.choices(names, weights)[0]
            try:
                getattr(self, kind)()
                self.keep_bounded()
            except OSError as e:
                self.error(f"{kind}: {e}")
            self.ops[kind] += 1
        self.check_expiry()


def _work(mnt: str, me: int, seed: int, deadline: float, results) -> None:
    die_with_parent(signal.SIGKILL)
    w = Worker(Path(mnt), me, seed, deadline)
    try:
        w.run()
    except Exception as e:  # a bug of the harness, or something it did not expect
        w.error(f"stopped: {type(e).__name__}: {e}")
    results.put((w.me, dict(w.ops), w.errors))


# ------------------------------------------------------------------ the harness

class Soak:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.work = Path(args.workdir).resolve()
        self.mnt, self.store = self.work / "mnt", self.work / "store"
        self.config, self.key = self.work / "tempfs.toml", self.work / "keys" / "tempfs.key"
        self.log = self.work / "daemon.log"
        self.mnt.mkdir(parents=True, exist_ok=True)
        self.key.parent.mkdir(mode=0o700, exist_ok=True)
        self.config.write_text(CONFIG)
        self.daemon: subprocess.Popen | None = None
        self.errors: list[str] = []
        self.rss: list[tuple[float, int]] = []
        self.status_calls = 0
        self.last_status: dict = {}

    def tempfs(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "tempfs", *args], capture_output=True, text=True,
                              env=script_env(), timeout=timeout, stdin=subprocess.DEVNULL)

    def mount(self) -> None:
        self.daemon = start_daemon(["--store", str(self.store), "--config", str(self.config),
                                    "--key-file", str(self.key)], self.mnt, self.log, timeout=60)

    def unmount(self) -> None:
        problem, code = unmount(self.mnt, self.daemon, timeout=180)
        if problem:
            self.errors.append(problem)
        if code != 0:
            self.errors.append(f"the daemon exited {code} at unmount")
        self.daemon = None

    def status(self) -> None:
        r = self.tempfs("status", str(self.mnt), "--json", timeout=60)
        self.status_calls += 1
        if r.returncode != 0:
            self.errors.append(f"status exited {r.returncode}: {r.stderr.strip()}")
            return
        self.last_status = json.loads(r.stdout)

    def sample(self) -> None:
        rss = _rss(self.daemon.pid)
        if rss is not None:
            self.rss.append((time.monotonic(), rss))

    def run(self) -> dict:
        args = self.args
        self.mount()
        time.sleep(1.0)
        self.sample()
        started = time.monotonic()
        deadline = started + args.seconds
        ctx = multiprocessing.get_context("fork")
        results = ctx.Queue()
        procs = [ctx.Process(target=_work, args=(str(self.mnt), i, args.seed, deadline, results))
                 for i in range(args.workers)]
        for p in procs:
            p.start()
        next_status = started + STATUS_EVERY
        reports = []
        while len(reports) < len(procs):
            try:
                reports.append(results.get(timeout=RSS_EVERY))
            except Exception:
                pass
            now = time.monotonic()
            if self.daemon.poll() is not None:
                self.errors.append(f"the daemon died (exit {self.daemon.returncode})")
                break
            self.sample()
            if now >= next_status and now < deadline:
                self.status()
                next_status = now + STATUS_EVERY
            if now > deadline + 300:
                self.errors.append("workers did not finish within 5 minutes of the end")
                break
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
        self.status()
        self.sample()
        elapsed = time.monotonic() - started
        ops = collections.Counter()
        for _me, counts, errors in reports:
            ops.update(counts)
            self.errors += errors
        self.unmount()
        r = self.tempfs("fsck", "--store", str(self.store), "--key-file", str(self.key), "--config",
                        str(self.config), "--no-repair", timeout=1800)
        if r.returncode != 0:
            self.errors.append(f"fsck --no-repair exited {r.returncode}: {r.stdout.strip()[-2000:]}")
        for line in self.log.read_text(errors="replace").splitlines():
            if " ERROR " in line or "Traceback" in line:
                self.errors.append(f"daemon log: {line}")
        return {"elapsed": elapsed, "ops": ops}

    def cleanup(self) -> None:
        tear_down(self.mnt, self.daemon, timeout=60)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--seconds", type=float, help="the duration in seconds instead (short CI runs)")
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--workdir", help="where the mount, store, key and log go (default: a new temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the workdir (kept anyway on failure)")
    p.add_argument("--max-rss-mb", type=float, default=512.0, help="the daemon's RSS may never pass this")
    args = p.parse_args(argv)
    args.seconds = args.seconds if args.seconds is not None else args.minutes * 60
    if args.seed is None:
        args.seed = random.randrange(1 << 30)
    made = args.workdir is None
    if made:
        args.workdir = tempfile.mkdtemp(prefix="tempfs-soak-")
    soak = Soak(args)
    print(f"soak: {args.seconds:.0f} s, {args.workers} workers, seed {args.seed}, workdir {soak.work}",
          file=sys.stderr, flush=True)
    code = 0
    try:
        result = soak.run()
    except Exception as e:
        import traceback
        traceback.print_exc()
        print(f"soak: harness failure: {e}", file=sys.stderr)
        soak.cleanup()
        return 2
    finally:
        soak.cleanup()
    ops = result["ops"]
    seen = {k: ops.pop(k, 0) for k in ("evicted_seen", "expired_seen")}
    total = sum(ops.values()) + soak.status_calls
    rss = [r for _t, r in soak.rss]
    start, end, top = rss[0], rss[-1], max(rss)
    t0, t1 = soak.rss[0][0], soak.rss[-1][0]
    middle = min(soak.rss, key=lambda s: abs(s[0] - (t0 + t1) / 2))[1]
    daemon = soak.last_status.get("daemon", {})
    if top > args.max_rss_mb * MiB:
        soak.errors.append(f"the daemon's RSS reached {top / MiB:.0f} MiB, past {args.max_rss_mb:.0f} MiB")
    if end - middle > max(32 * MiB, 0.2 * middle):
        soak.errors.append(f"the daemon's RSS grew from {middle / MiB:.0f} MiB (middle) to {end / MiB:.0f} MiB (end)")
    figures = [("duration", f"{result['elapsed']:.0f}", "s"), ("workers", args.workers, "count"),
               ("ops", total, "count"), ("ops_per_second", f"{total / result['elapsed']:.1f}", "1/s")]
    figures += [(f"ops_{k}", v, "count") for k, v in sorted(ops.items())]
    figures += [("ops_status", soak.status_calls, "count"),
                ("expired_seen", seen["expired_seen"], "count"), ("evicted_seen", seen["evicted_seen"], "count"),
                ("expired_by_daemon", daemon.get("expired"), "count"), ("evicted_by_daemon", daemon.get("evicted"), "count"),
                ("patches_stored", daemon.get("patches_stored"), "count"),
                ("errors", len(soak.errors), "count"),
                ("rss_start", f"{start / MiB:.1f}", "MiB"), ("rss_middle", f"{middle / MiB:.1f}", "MiB"),
                ("rss_end", f"{end / MiB:.1f}", "MiB"), ("rss_max", f"{top / MiB:.1f}", "MiB"),
                ("seed", args.seed, "value")]
    for line in soak.errors[:100]:
        print(f"ERROR: {line}", file=sys.stderr)
    for name, value, unit in figures:
        print(f"{name} {value} {unit}")
    if soak.errors:
        code = 1
        print(f"soak: workdir kept: {soak.work}", file=sys.stderr)
    elif made and not args.keep:
        shutil.rmtree(soak.work, ignore_errors=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
