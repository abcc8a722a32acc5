#!/usr/bin/env python3
"""What one SQLite statement of the trio thread costs while worker threads seal blocks.

    bench_gil.py [--size 4096] [--threads 2] [--statements 5000]  (each kind of load: 1 s at most)

Python's sqlite3 gives the GIL up for every statement and must take it back afterwards. Alone,
that is free; while other threads want the GIL too, each statement hands it to one of them and
waits (a futex wake-up each way) until that thread gives it up again: at its next call into C
code that releases it (lz4, AES-GCM, BLAKE3, a read), or after Python's switch interval (5 ms)
if it runs Python code. This is why tempfs seals a batch of small objects on the trio thread
instead of sending it to a worker (store/blocks.py, SEAL_HERE_BYTES), and why a statement less
per request pays more in the daemon than in process.

Prints one `name value unit` line per figure: the mean cost of a one-row UPDATE while
--threads threads run each kind of work on --size-byte blocks in a loop (idle: none).
"""
from __future__ import annotations

import argparse
import os
import sqlite3
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Optional

import blake3
import lz4.block
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tempfs.codec import ContentCodec  # noqa: E402


def _statement_cost(conn: sqlite3.Connection, n: int, seconds: float = 1.0) -> float:
    """The mean time of up to `n` one-row UPDATEs, run for at most about `seconds`."""
    t0 = time.perf_counter()
    done = 0
    while done < n and (done == 0 or time.perf_counter() - t0 < seconds):
        conn.execute("UPDATE t SET a=? WHERE id=?", (done, done % 2000))
        done += 1
    return (time.perf_counter() - t0) / done


def _with_load(work: Optional[Callable[[], object]], threads: int, measure: Callable[[], float]) -> float:
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            work()

    workers = [threading.Thread(target=loop) for _ in range(threads if work else 0)]
    for w in workers:
        w.start()
    try:
        time.sleep(0.05)
        return measure()
    finally:
        stop.set()
        for w in workers:
            w.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=4096, help="bytes per block the threads work on")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--statements", type=int, default=5000)
    args = parser.parse_args()
    data, key, nonce = os.urandom(args.size), os.urandom(32), os.urandom(12)
    aead, codec = AESGCM(key), ContentCodec(os.urandom(32))
    works: dict[str, Optional[Callable[[], object]]] = {
        "idle": None,
        "lz4": lambda: lz4.block.compress(data),
        "blake3": lambda: blake3.blake3(data, key=key).digest(),
        "aes_gcm": lambda: aead.encrypt(nonce, data, None),
        "seal": lambda: codec.seal(1, data, b"d" * 32),  # all of the above, as tempfs does
        "python": lambda: sum(range(200)),  # pure Python: gives the GIL up only when asked
    }
    with tempfile.TemporaryDirectory() as where:
        conn = sqlite3.connect(Path(where) / "t.db", isolation_level="DEFERRED")
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, a INTEGER)")
        conn.executemany("INSERT INTO t VALUES (?, 0)", [(i,) for i in range(2000)])
        conn.commit()
        for name, work in works.items():
            cost = _with_load(work, args.threads, lambda: _statement_cost(conn, args.statements))
            print(f"statement_with_{name} {cost * 1e6:.1f} us", flush=True)
        conn.close()


if __name__ == "__main__":
    main()
