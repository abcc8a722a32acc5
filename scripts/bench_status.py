#!/usr/bin/env python3
"""Benchmark: what `tempfs status` costs the daemon on a big tree.

Builds a real store (SQLite metadata, no mount) of N files in folders of 100 below four leaf
schema folders, then times the per-area usage (every `status` and every metrics scrape) and the
per-schema-folder walk (`status --folders` only). The FUSE loop waits for each.

    .venv/bin/python scripts/bench_status.py [--entries 200000]

Prints one line per figure: `name value unit`.
"""
from __future__ import annotations

import argparse
import os
import random
import shutil
import stat
import tempfile
import time
from pathlib import Path

from tempfs.codec import ContentCodec
from tempfs.layout import Kind
from tempfs.store import Store


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=200_000)
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="tempfs-bench-status-"))
    try:
        store = Store(base / "store", ContentCodec(os.urandom(32)), dirty_limit=1 << 26, cache_limit=1 << 26)
        store.ensure_folder("cache", Kind.BRANCH, 0o1777, 0, 0)
        leaves = [store.ensure_folder(f"cache/l{i}", Kind.LEAF, 0o1777, 0, 0) for i in range(4)]
        rng = random.Random(1)
        for i in range(args.entries // 100):
            folder = store.make(rng.choice(leaves), b"d%d" % i, stat.S_IFDIR | 0o755, 0, 0).id
            for j in range(99):
                store.make(folder, b"f%d" % j, stat.S_IFREG | 0o644, 0, 0)
        store.commit_now()
        print(f"entries {store.inode_count()} inodes")
        for name, call in (("area_usage_seconds", store.usage), ("folder_usage_seconds", store.folder_usage)):
            started = time.perf_counter()
            call()
            print(f"{name} {time.perf_counter() - started:.3f} s")
        store.close()
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
