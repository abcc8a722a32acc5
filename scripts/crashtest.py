#!/usr/bin/env python3
"""Crash test: SIGKILL the tempfs daemon at random moments under writers, remount, and check
every promise the filesystem made before the kill.

    .venv/bin/python scripts/crashtest.py --cycles 50 [--seed N] [--workdir DIR] [--keep]

Each cycle:
 1. mounts the store (`python -m tempfs mount ... --foreground`) and starts writer processes
    in a folder of their own (processing/common/uploads/crash/cNNN/KIND):
      seq     appends chunks (4 KiB .. 2 MiB) to big files, fsync every few chunks;
      rand    overwrites random ranges of 4 MiB files in place, fsync every few writes;
      small   many small files (0 .. 200 KB, some shared content: dedup), fsync each, some
              removed, some never synced;
      rename  atomic replace: write a temporary file, fsync it, rename it over a target
              (in the same or another folder), fsync the folder(s);
    each writer journals, to a file outside the mount, what it is about to do (every create,
    write and rename) and every promise once its fsync has returned;
 2. SIGKILLs the daemon at a random moment (0.3 .. 4 s), detaches the dead mount
    (fusermount3 -uz), lets the writers fail and exit;
 3. copies the store as the kill left it and runs `tempfs fsck --quick --no-repair` on the
    copy: the only problem allowed is packs (or object files) no metadata refers to (orphans:
    objects appended, their rows not yet committed; or rows deleted, the pack not yet removed); anything
    else would mean a commit caught half an operation;
 4. mounts again: the daemon must run the quick check (the store was not closed cleanly),
    which removes those orphans;
 5. checks every journal of the cycles kept (the last three):
      - a file whose fsync returned has exactly its fsynced content (seq: the synced prefix;
        rand: the synced state); what was written after the last fsync may be there or not,
        but each 128 KiB block holds what the writer wrote up to some point, never anything
        else (bytes past the last stored write of a block read as zeros);
      - a rename is never half done: the target holds the content of one of the renames into
        it no older than the last one whose folder fsync returned, and exactly the temporary
        files of the later renames are still there, each with its synced content;
      - no name appears that no writer created; files of older cycles are unchanged since
        the last check; folders removed before are still gone;
      - every file in the tree reads without error;
 6. removes the oldest cycle's folder, unmounts cleanly, and runs `tempfs fsck --no-repair`
    (content verified): it must report nothing at all.

Prints figures as `name value unit` lines; exits 1 if any promise was broken (each failure is
described on stderr), 2 if the harness itself could not run.
"""
from __future__ import annotations

import argparse
import errno
import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from harness import die_with_parent, script_env, start_daemon, tear_down, unmount

BLOCK = 128 * 1024
AREA_DIR = "processing/common/uploads/crash"
KINDS = ("seq", "rand", "small", "rename")
KEEP_CYCLES = 3
MOUNT_TIMEOUT = 60.0
WRITER_LIMIT = 120.0          # a writer gives up after this long, whatever happens
RAND_FILE_SIZE = 4 * 1024 * 1024
SEQ_FILE_MAX = 24 * 1024 * 1024
QUICK_CHECK_LINE = "quick store check after an unclean shutdown:"
_ORPHANS = re.compile(r"(\d+) (?:object files|packs) \(\d+ bytes\) (?:belong to no object|hold no live object)")
CONFIG = """\
# crashtest: dirty data is flushed under pressure often, and processing/ has room
[memory]
dirty_limit = "16MB"

[policy.processing]
max_size = "20GB"
"""


# ------------------------------------------------------------------ deterministic content

def content(key: str, n: int) -> bytes:
    """The bytes a writer writes for `key`: random (incompressible) or repetitive
    (compressible, and whole blocks of it deduplicate), chosen by the key."""
    r = random.Random(key)
    if n == 0:
        return b""
    if r.random() < 0.5:
        return r.randbytes(n)
    words = [r.randbytes(r.randrange(3, 9)).hex().encode() for _ in range(40)]
    line = b" ".join(r.choice(words) for _ in range(12)) + b"\n"
    return (line * (n // len(line) + 1))[:n]


SMALL_POOL_SIZES = [0, 1, 100, 4096, 65536, BLOCK, BLOCK + 1, 200_000]


def small_key(seed: int, prefix: str, i: int, r: random.Random) -> tuple[str, int]:
    if r.random() < 0.3:  # shared content: deduplicated with other files, other cycles
        k = r.randrange(len(SMALL_POOL_SIZES))
        return f"{seed}:pool{k}", SMALL_POOL_SIZES[k]
    return f"{prefix}:small:{i}", r.choice([0, r.randrange(1, 4096), r.randrange(1, 40_000), r.randrange(1, 200_000)])


# ------------------------------------------------------------------ writers (child processes)

class Journal:
    def __init__(self, path: Path) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)

    def __call__(self, **record) -> None:
        os.write(self.fd, (json.dumps(record) + "\n").encode())


def _write_all(fd: int, data: bytes, offset: int | None = None) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view) if offset is None else os.pwrite(fd, view, offset)
        if offset is not None:
            offset += n
        view = view[n:]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def writer_seq(d: Path, j: Journal, r: random.Random, prefix: str) -> None:
    k = 0
    while True:
        name = f"seq-{k}.bin"
        j(op="create", name=name)
        fd = os.open(d / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        size, i = 0, 0
        while size < SEQ_FILE_MAX:
            for _ in range(r.randrange(1, 4)):
                n = r.choice([4096, 65536, BLOCK, 300_000, 1 << 20, 2 << 20, r.randrange(1, 3 << 20)])
                j(op="append", name=name, chunk=i, off=size, len=n)
                _write_all(fd, content(f"{prefix}:seq:{name}:{i}", n))
                size, i = size + n, i + 1
            os.fsync(fd)
            j(op="synced", name=name, size=size)
        os.close(fd)
        k += 1


def writer_rand(d: Path, j: Journal, r: random.Random, prefix: str) -> None:
    k = 0
    while True:
        name = f"rand-{k}.bin"
        j(op="create", name=name)
        fd = os.open(d / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        _write_all(fd, content(f"{prefix}:rand:{name}:base", RAND_FILE_SIZE), 0)
        os.fsync(fd)
        j(op="base", name=name, size=RAND_FILE_SIZE)
        for seq in range(400):
            n = r.choice([1, 17, 4096, BLOCK, r.randrange(1, 300_000)])
            off = r.randrange(0, RAND_FILE_SIZE - n + 1)
            if r.random() < 0.3:
                off -= off % 4096
            j(op="write", name=name, seq=seq, off=off, len=n)
            _write_all(fd, content(f"{prefix}:rand:{name}:{seq}", n), off)
            if r.random() < 0.35:
                os.fsync(fd)
                j(op="synced", name=name, seq=seq)
        os.close(fd)
        k += 1


def writer_small(d: Path, j: Journal, r: random.Random, prefix: str, seed: int) -> None:
    synced: list[str] = []
    for i in range(100_000):
        sub = d / f"d{i // 200}"
        if i % 200 == 0:
            j(op="mkdir", name=sub.name)
            sub.mkdir()
        name = f"{sub.name}/s-{i}"
        key, size = small_key(seed, prefix, i, r)
        sync = r.random() < 0.8
        j(op="create", name=name, key=key, size=size, sync=sync)
        fd = os.open(d / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        _write_all(fd, content(key, size))
        if sync:
            os.fsync(fd)
            j(op="file", name=name)
            synced.append(name)
        os.close(fd)
        if synced and r.random() < 0.15:
            victim = synced.pop(r.randrange(len(synced)))
            j(op="unlink", name=victim)
            os.unlink(d / victim)


def writer_rename(d: Path, j: Journal, r: random.Random, prefix: str) -> None:
    folders = ["a", "b"]
    for f in folders:
        j(op="mkdir", name=f)
        (d / f).mkdir()
    _fsync_dir(d)
    for n in range(100_000):
        src_dir, dst_dir = r.choice(folders), r.choice(folders)
        tmp, target = f"{src_dir}/tmp-{n}", f"{dst_dir}/target-{r.randrange(6)}"
        size = r.choice([0, 10, 5000, BLOCK, r.randrange(1, 300_000)])
        key = f"{prefix}:ren:{n}"
        j(op="create", name=tmp, key=key, size=size, sync=True)
        fd = os.open(d / tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        _write_all(fd, content(key, size))
        os.fsync(fd)
        os.close(fd)
        j(op="file", name=tmp)
        j(op="rename", src=tmp, dst=target)
        os.rename(d / tmp, d / target)
        j(op="renamed", src=tmp, dst=target)
        _fsync_dir(d / dst_dir)
        if src_dir != dst_dir:
            _fsync_dir(d / src_dir)
        j(op="rename_synced", src=tmp, dst=target)


def run_writer(kind: str, d: Path, journal: Path, seed: int, prefix: str) -> int:
    die_with_parent(signal.SIGKILL)  # a writer dies with the harness
    j = Journal(journal)
    r = random.Random(f"{prefix}:{kind}")
    deadline = threading.Timer(WRITER_LIMIT, lambda: os._exit(3))
    deadline.daemon = True
    deadline.start()
    try:
        d.parent.mkdir(exist_ok=True)  # never parents=True: not below a detached mountpoint
        d.mkdir(exist_ok=True)
        _fsync_dir(d.parent)
        j(op="start", t=time.time())
        if kind == "seq":
            writer_seq(d, j, r, prefix)
        elif kind == "rand":
            writer_rand(d, j, r, prefix)
        elif kind == "small":
            writer_small(d, j, r, prefix, seed)
        else:
            writer_rename(d, j, r, prefix)
    except OSError as e:
        j(op="error", errno=e.errno, message=str(e), t=time.time())
    return 0


# ------------------------------------------------------------------ the checker

class Checker:
    """Checks one writer's journal against what the mount shows now."""

    def __init__(self, d: Path, journal: Path, failures: list[str], figures: dict) -> None:
        self.d, self.failures, self.figures = d, failures, figures
        self.records = [json.loads(line) for line in journal.read_text().splitlines() if line.strip()]
        self.where = f"{journal.name}"

    def fail(self, message: str) -> None:
        self.failures.append(f"{self.where}: {message}")

    def promise(self) -> None:
        self.figures["promises_checked"] += 1

    def read(self, name: str) -> bytes | None:
        try:
            return (self.d / name).read_bytes()
        except FileNotFoundError:
            return None
        except OSError as e:
            self.fail(f"{name}: cannot be read: {e}")
            return None

    def known_names(self) -> set[str]:
        names = set()
        for rec in self.records:
            if rec["op"] in ("create", "mkdir"):
                names.add(rec["name"])
            if rec["op"] == "rename":
                names.add(rec["dst"])
        return names

    def check_names(self) -> None:
        if not self.d.exists():
            return
        known = self.known_names()
        for path in self.d.rglob("*"):
            rel = path.relative_to(self.d).as_posix()
            if rel not in known:
                self.fail(f"{rel}: a name no writer created")

    def tail_ok(self, name: str, actual: bytes, expected: bytes, start: int) -> bool:
        """Past `start` (what fsync made durable), each block holds the writer's bytes up to
        some point, then zeros (its data not stored when the size was committed)."""
        if len(actual) > len(expected):
            self.fail(f"{name}: {len(actual)} bytes, more than the {len(expected)} ever written")
            return False
        pos = start
        while pos < len(actual):
            end = min(len(actual), (pos // BLOCK + 1) * BLOCK)
            a, e = actual[pos:end], expected[pos:end]
            if a != e:
                i = next(k for k in range(len(a)) if a[k] != e[k])
                if a[i:].count(0) != len(a) - i:
                    self.fail(f"{name}: bytes {pos + i}..{end} are neither what was written nor zeros")
                    return False
                self.figures["tail_blocks_zero"] += 1
            pos = end
        return True

    # -- per writer kind
    def check_seq(self) -> None:
        files: dict[str, dict] = {}
        for rec in self.records:
            if rec["op"] == "create":
                files[rec["name"]] = {"chunks": [], "synced": None}
            elif rec["op"] == "append":
                files[rec["name"]]["chunks"].append(rec)
            elif rec["op"] == "synced":
                files[rec["name"]]["synced"] = rec["size"]
        prefix = self.prefix
        for name, info in files.items():
            actual = self.read(name)
            synced = info["synced"]
            expected = b"".join(content(f"{prefix}:seq:{name}:{c['chunk']}", c["len"]) for c in info["chunks"])
            if synced is not None:
                self.promise()
                if actual is None:
                    self.fail(f"{name}: gone, though {synced} bytes were fsynced")
                    continue
                if len(actual) < synced or actual[:synced] != expected[:synced]:
                    self.fail(f"{name}: the first {synced} bytes (fsynced) differ (size now {len(actual)})")
                    continue
            if actual is not None:
                self.tail_ok(name, actual, expected, synced or 0)

    def check_rand(self) -> None:
        files: dict[str, dict] = {}
        for rec in self.records:
            if rec["op"] == "create":
                files[rec["name"]] = {"base": False, "writes": [], "synced": -1}
            elif rec["op"] == "base":
                files[rec["name"]]["base"] = True
            elif rec["op"] == "write":
                files[rec["name"]]["writes"].append(rec)
            elif rec["op"] == "synced":
                files[rec["name"]]["synced"] = rec["seq"]
        prefix = self.prefix
        for name, info in files.items():
            actual = self.read(name)
            base = content(f"{prefix}:rand:{name}:base", RAND_FILE_SIZE)
            if not info["base"]:
                if actual is not None:
                    self.tail_ok(name, actual, base, 0)
                continue
            self.promise()
            if actual is None or len(actual) != RAND_FILE_SIZE:
                self.fail(f"{name}: {'gone' if actual is None else f'{len(actual)} bytes'}, "
                          f"though {RAND_FILE_SIZE} bytes were fsynced")
                continue
            state = bytearray(base)
            pending = []
            for w in info["writes"]:
                data = content(f"{prefix}:rand:{name}:{w['seq']}", w["len"])
                if w["seq"] <= info["synced"]:
                    state[w["off"]:w["off"] + w["len"]] = data
                else:
                    pending.append((w["off"], data))
            for b in range(RAND_FILE_SIZE // BLOCK):
                lo, hi = b * BLOCK, (b + 1) * BLOCK
                candidate = bytearray(state[lo:hi])
                got = actual[lo:hi]
                ok = got == candidate
                for off, data in pending:
                    if ok:
                        break
                    s, e = max(off, lo), min(off + len(data), hi)
                    if s >= e:
                        continue
                    candidate[s - lo:e - lo] = data[s - off:e - off]
                    ok = got == candidate
                if not ok:
                    self.fail(f"{name}: block {b} is neither its fsynced state nor that state with some of "
                              f"the {len(pending)} later writes applied in order")

    def check_small(self) -> None:
        created, synced, unlinked = {}, set(), set()
        for rec in self.records:
            if rec["op"] == "create":
                created[rec["name"]] = rec
            elif rec["op"] == "file":
                synced.add(rec["name"])
            elif rec["op"] == "unlink":
                unlinked.add(rec["name"])
        for name, rec in created.items():
            actual = self.read(name)
            expected = content(rec["key"], rec["size"])
            if name in synced and name not in unlinked:
                self.promise()
                if actual != expected:
                    self.fail(f"{name}: fsynced with {len(expected)} bytes, now "
                              f"{'gone' if actual is None else f'{len(actual)} bytes, different'}")
            elif name in synced:  # removed after its fsync: gone, or still all there
                if actual is not None and actual != expected:
                    self.fail(f"{name}: removed or intact expected, found {len(actual)} different bytes")
            elif actual is not None:
                self.tail_ok(name, actual, expected, 0)

    def check_rename(self) -> None:
        tmps: dict[str, dict] = {}
        into: dict[str, list[dict]] = {}
        for rec in self.records:
            if rec["op"] == "create":
                tmps[rec["name"]] = {"rec": rec, "synced": False, "renamed": False}
            elif rec["op"] == "file":
                tmps[rec["name"]]["synced"] = True
            elif rec["op"] == "rename":
                into.setdefault(rec["dst"], []).append({"src": rec["src"], "durable": False})
                tmps[rec["src"]]["renamed"] = True
            elif rec["op"] == "rename_synced":
                for r in into[rec["dst"]]:
                    if r["src"] == rec["src"]:
                        r["durable"] = True
        present = {}
        for name in list(tmps) + list(into):
            present[name] = self.read(name)

        def body(tmp: str) -> bytes:
            rec = tmps[tmp]["rec"]
            return content(rec["key"], rec["size"])

        # a temporary file never renamed: fsynced, so it is there with its content
        for tmp, info in tmps.items():
            if info["renamed"]:
                continue
            if info["synced"]:
                self.promise()
                if present[tmp] != body(tmp):
                    self.fail(f"{tmp}: fsynced, now {'gone' if present[tmp] is None else 'different'}")
            elif present[tmp] is not None:
                self.tail_ok(tmp, present[tmp], body(tmp), 0)
        # each target: it holds the content of rename m (m >= the last durable one, m = 0: none),
        # and exactly the sources of the renames after m are still there
        for target, renames in into.items():
            self.promise()
            last_durable = max([i + 1 for i, r in enumerate(renames) if r["durable"]], default=0)
            got = present[target]
            matches = [i + 1 for i, r in enumerate(renames) if got is not None and got == body(r["src"])]
            if got is None:
                matches = [0]
            options = [m for m in matches if m >= last_durable]
            if not options:
                self.fail(f"{target}: holds {'nothing' if got is None else 'content of no rename into it'} "
                          f"after {len(renames)} renames, the last {last_durable} durable")
                continue
            good = False
            for m in options:
                if all((present[r["src"]] is None) == (i < m) for i, r in enumerate(renames)) and \
                        all(present[r["src"]] == body(r["src"]) for r in renames[m:]):
                    good = True
                    break
            if not good:
                state = ", ".join(f"{r['src']}:{'there' if present[r['src']] is not None else 'gone'}"
                                  for r in renames)
                self.fail(f"{target}: half a rename: target holds rename {options}, sources {state}")

    def run(self, kind: str, prefix: str) -> None:
        self.prefix = prefix
        getattr(self, f"check_{kind}")()
        self.check_names()


# ------------------------------------------------------------------ the harness

class Harness:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.seed = args.seed
        self.rng = random.Random(args.seed)
        self.work = Path(args.workdir).resolve()
        self.mnt, self.store = self.work / "mnt", self.work / "store"
        self.config, self.key = self.work / "tempfs.toml", self.work / "keys" / "tempfs.key"
        self.logs, self.journals = self.work / "logs", self.work / "journals"
        for d in (self.mnt, self.logs, self.journals):
            d.mkdir(parents=True, exist_ok=True)
        self.key.parent.mkdir(mode=0o700, exist_ok=True)
        self.config.write_text(CONFIG)
        self.daemon: subprocess.Popen | None = None
        self.writers: list[tuple[str, subprocess.Popen]] = []
        self.failures: list[str] = []
        self.figures = {k: 0 for k in ("cycles", "kills", "promises_checked", "failures", "files_read", "bytes_read",
                                       "orphans_after_kill", "quick_checks_run", "quick_check_repairs", "fsck_clean",
                                       "tail_blocks_zero", "writer_errors_before_kill", "writers_killed",
                                       "daemon_error_lines")}
        self.mounts = 0
        self.kept: list[int] = []            # cycles whose folders are still there
        self.removed: list[int] = []         # cycles whose folders were removed (must stay gone)
        self.seen: dict[str, str] = {}       # path -> sha256 at the last check (older cycles must not change)

    def log(self, message: str) -> None:
        if self.args.verbose:
            print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)

    def fail(self, message: str) -> None:
        self.failures.append(message)

    # -- the daemon
    def mount(self) -> Path:
        self.mounts += 1
        log = self.logs / f"daemon.{self.mounts:03d}.log"
        self.daemon = start_daemon(["--store", str(self.store), "--config", str(self.config),
                                    "--key-file", str(self.key)], self.mnt, log, MOUNT_TIMEOUT, cwd=self.work)
        return log

    def unmount(self) -> None:
        problem, code = unmount(self.mnt, self.daemon, timeout=120)
        self.daemon = None
        if problem:
            raise RuntimeError(problem)
        if code != 0:
            self.fail(f"the daemon exited {code} after a clean unmount")

    def kill_daemon(self, cycle: int) -> None:
        if self.daemon.poll() is not None:
            self.fail(f"cycle {cycle}: the daemon died by itself (exit {self.daemon.returncode}) under the writers")
        else:
            os.kill(self.daemon.pid, signal.SIGKILL)
        self.daemon.wait(timeout=30)
        self.daemon = None
        self.figures["kills"] += 1

    def detach(self) -> None:
        """Detaches the dead mount, once no writer can use the path any more (a writer starting
        late would otherwise make its folders in the mountpoint underneath)."""
        subprocess.run(["fusermount3", "-uz", str(self.mnt)], capture_output=True)

    def fsck(self, store: Path, *extra: str) -> tuple[int, dict]:
        cmd = [sys.executable, "-m", "tempfs", "fsck", "--store", str(store), "--key-file", str(self.key),
               "--config", str(self.config), "--no-repair", "--json", *extra]
        r = subprocess.run(cmd, capture_output=True, text=True, env=script_env(), timeout=600, stdin=subprocess.DEVNULL)
        try:
            return r.returncode, json.loads(r.stdout)
        except json.JSONDecodeError:
            raise RuntimeError(f"fsck exited {r.returncode} without a report: {r.stderr.strip()[-2000:]}")

    # -- the writers
    def start_writers(self, cycle: int) -> None:
        prefix = self.prefix(cycle)
        self.writers = []
        for kind in KINDS:
            d = self.mnt / AREA_DIR / f"c{cycle:03d}" / kind
            journal = self.journals / f"c{cycle:03d}-{kind}.jsonl"
            cmd = [sys.executable, __file__, "--writer", kind, "--dir", str(d), "--journal", str(journal),
                   "--seed", str(self.seed), "--prefix", prefix]
            self.writers.append((kind, subprocess.Popen(cmd, stdin=subprocess.DEVNULL, env=script_env())))

    def stop_writers(self) -> None:
        deadline = time.monotonic() + 30
        for _kind, p in self.writers:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
                self.figures["writers_killed"] += 1
        self.writers = []

    def prefix(self, cycle: int) -> str:
        return f"{self.seed}:c{cycle}"

    # -- one cycle
    def cycle(self, cycle: int) -> None:
        started = time.monotonic()
        log = self.mount()
        if QUICK_CHECK_LINE in log.read_text(errors="replace"):
            self.fail(f"cycle {cycle}: the mount after a clean unmount ran the quick check")
        (self.mnt / AREA_DIR).mkdir(parents=True, exist_ok=True)
        _fsync_dir(self.mnt / AREA_DIR)
        self.start_writers(cycle)
        self.kept.append(cycle)
        run = self.rng.uniform(self.args.min_run, self.args.max_run)
        time.sleep(run)
        kill_time = time.time()
        self.kill_daemon(cycle)
        self.stop_writers()  # on the dead mount every call fails at once (ENOTCONN)
        self.detach()
        for kind in KINDS:
            for line in (self.journals / f"c{cycle:03d}-{kind}.jsonl").read_text().splitlines():
                rec = json.loads(line)
                if rec["op"] == "error" and rec["t"] < kill_time - 0.05:
                    self.figures["writer_errors_before_kill"] += 1
                    self.fail(f"cycle {cycle} {kind}: error before the kill: {rec['message']}")
        self.check_crashed_store(cycle)
        log = self.mount()
        text = log.read_text(errors="replace")
        if QUICK_CHECK_LINE in text:
            self.figures["quick_checks_run"] += 1
            line = next(ln for ln in text.splitlines() if QUICK_CHECK_LINE in ln)
            self.figures["quick_check_repairs"] += int(line.split(" repaired")[0].rsplit(" ", 1)[1])
            if " 0 damaged" not in line:
                self.fail(f"cycle {cycle}: the quick check found damage: {line}")
        else:
            self.fail(f"cycle {cycle}: the mount after the kill did not run the quick check")
        self.verify(cycle)
        if len(self.kept) > KEEP_CYCLES - 1:
            old = self.kept.pop(0)
            if (self.mnt / AREA_DIR / f"c{old:03d}").exists():  # (a kill before any writer made it: none)
                shutil.rmtree(self.mnt / AREA_DIR / f"c{old:03d}")
            _fsync_dir(self.mnt / AREA_DIR)
            self.removed.append(old)
            self.seen = {p: h for p, h in self.seen.items() if not p.startswith(f"c{old:03d}/")}
        self.unmount()
        self.scan_logs()
        code, report = self.fsck(self.store)
        if code == 0 and report["clean"]:
            self.figures["fsck_clean"] += 1
        else:
            self.fail(f"cycle {cycle}: fsck --no-repair after the remount exited {code}: "
                      f"repaired={report['repaired']} damaged={report['damaged']}")
        self.figures["cycles"] += 1
        self.log(f"cycle {cycle}: ran {run:.1f} s before the kill, {time.monotonic() - started:.1f} s in all; "
                 f"{self.figures['promises_checked']} promises checked so far, {len(self.failures)} failures")

    def check_crashed_store(self, cycle: int) -> None:
        """fsck --quick --no-repair of a copy of the store as the kill left it: orphans only."""
        snap = self.work / "snapshot"
        shutil.rmtree(snap, ignore_errors=True)
        shutil.copytree(self.store, snap, symlinks=True)
        try:
            code, report = self.fsck(snap, "--quick")
        finally:
            shutil.rmtree(snap, ignore_errors=True)
        orphans = [m for m in map(_ORPHANS.search, report["damaged"]) if m]
        others = [line for line in report["damaged"] if not _ORPHANS.search(line)]
        for match in orphans:
            self.figures["orphans_after_kill"] += int(match[1])
        if others or report["repaired"]:
            self.fail(f"cycle {cycle}: the store as the kill left it has more than orphans: "
                      f"damaged={others} repaired={report['repaired']}")

    def verify(self, cycle: int) -> None:
        base = self.mnt / AREA_DIR
        for c in self.kept:
            for kind in KINDS:
                journal = self.journals / f"c{c:03d}-{kind}.jsonl"
                Checker(base / f"c{c:03d}" / kind, journal, self.failures, self.figures).run(kind, self.prefix(c))
        for c in self.removed:
            if (base / f"c{c:03d}").exists():
                self.fail(f"c{c:03d}: removed (and its folder fsynced) in an earlier cycle, back again")
        unexpected = {p.name for p in base.iterdir()} - {f"c{c:03d}" for c in self.kept}
        if unexpected:
            self.fail(f"{AREA_DIR}: holds {sorted(unexpected)}, which no writer made")
        # every file reads; files of earlier cycles are exactly as they were
        for path in sorted(base.rglob("*")):
            rel = path.relative_to(base).as_posix()
            if path.is_dir():
                continue
            try:
                data = path.read_bytes()
            except OSError as e:
                self.fail(f"{rel}: unreadable: {e}")
                continue
            self.figures["files_read"] += 1
            self.figures["bytes_read"] += len(data)
            digest = hashlib.sha256(data).hexdigest()
            if not rel.startswith(f"c{cycle:03d}/") and rel in self.seen and self.seen[rel] != digest:
                self.fail(f"{rel}: changed since the last check, though nothing wrote to it")
            self.seen[rel] = digest
        for rel in [p for p in self.seen if not p.startswith(f"c{cycle:03d}/")]:
            if not (base / rel).exists():
                self.fail(f"{rel}: gone since the last check, though nothing removed it")
                del self.seen[rel]

    def scan_logs(self) -> None:
        """Errors in the daemons' logs (not counting the killed ones' last moments)."""
        for log in sorted(self.logs.glob("daemon.*.log")):
            if log.name in getattr(self, "_scanned", set()):
                continue
            self._scanned = getattr(self, "_scanned", set()) | {log.name}
            for line in log.read_text(errors="replace").splitlines():
                if " ERROR " in line or "Traceback" in line:
                    self.figures["daemon_error_lines"] += 1
                    self.fail(f"{log.name}: {line}")

    def cleanup(self) -> None:
        for _kind, p in self.writers:
            if p.poll() is None:
                p.kill()
                p.wait()
        tear_down(self.mnt, self.daemon, timeout=30)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cycles", type=int, default=50)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--workdir", help="where the mount, store, key, logs and journals go (default: a new temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the workdir (kept anyway when something failed)")
    p.add_argument("--min-run", type=float, default=0.3, help="shortest time the writers run before the kill")
    p.add_argument("--max-run", type=float, default=4.0, help="longest time the writers run before the kill")
    p.add_argument("--verbose", "-v", action="store_true", help="one line per cycle on stderr")
    p.add_argument("--writer", choices=KINDS, help=argparse.SUPPRESS)
    p.add_argument("--dir", help=argparse.SUPPRESS)
    p.add_argument("--journal", help=argparse.SUPPRESS)
    p.add_argument("--prefix", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.writer:
        return run_writer(args.writer, Path(args.dir), Path(args.journal), args.seed, args.prefix)
    if args.seed is None:
        args.seed = random.randrange(1 << 30)
    made = args.workdir is None
    if made:
        args.workdir = tempfile.mkdtemp(prefix="tempfs-crashtest-")
    h = Harness(args)
    print(f"crashtest: seed {args.seed}, workdir {h.work}", file=sys.stderr, flush=True)
    started = time.monotonic()
    code = 0
    try:
        for cycle in range(1, args.cycles + 1):
            h.cycle(cycle)
    except Exception as e:  # the harness itself failed (a mount that never came, ...)
        import traceback
        traceback.print_exc()
        print(f"crashtest: harness failure: {e}", file=sys.stderr)
        code = 2
    finally:
        h.cleanup()
    h.figures["failures"] = len(h.failures)
    for line in h.failures[:200]:
        print(f"FAILURE: {line}", file=sys.stderr)
    if len(h.failures) > 200:
        print(f"... and {len(h.failures) - 200} more failures", file=sys.stderr)
    units = {"bytes_read": "bytes", "orphans_after_kill": "files"}
    for name, value in h.figures.items():
        print(f"{name} {value} {units.get(name, 'count')}")
    print(f"seed {args.seed} value")
    print(f"duration {time.monotonic() - started:.1f} s")
    if h.failures:
        code = code or 1
    if made and not args.keep and code == 0:
        shutil.rmtree(h.work, ignore_errors=True)
    elif code:
        print(f"crashtest: workdir kept: {h.work}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
