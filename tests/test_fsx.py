"""The fsx-style exerciser (scripts/fsx.py, issue 6) against a real mount: a random
read/write/truncate/mmap workload on one big file, every read checked against an in-memory model.

The CI runs are bounded (a few thousand operations); the documented long run (README, Testing)
does at least 100,000.  The seed is random unless TEMPFS_FSX_SEED is set, and every failure
names it: `scripts/fsx.py --seed N` replays the same operations.
"""
from __future__ import annotations

import importlib.util
import os
import random
import subprocess
import sys

import pytest

from conftest import REPO_ROOT

FSX = REPO_ROOT / "scripts" / "fsx.py"
MiB = 1024 * 1024


def _load_fsx():
    spec = importlib.util.spec_from_file_location("fsx", FSX)
    module = importlib.util.module_from_spec(spec)
    sys.modules["fsx"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


fsx = _load_fsx()


def _seed() -> int:
    return int(os.environ.get("TEMPFS_FSX_SEED") or random.randrange(2**32))


def run_fsx(*args, timeout=100) -> tuple[int, dict[str, float], str]:
    """Runs the script; returns (exit code, {figure: value}, everything it printed)."""
    r = subprocess.run([sys.executable, str(FSX), *map(str, args)], capture_output=True, text=True,
                       timeout=timeout)
    figures = {}
    for line in r.stdout.splitlines():
        parts = line.split()
        if len(parts) == 3:
            try:
                figures[parts[0]] = float(parts[1])
            except ValueError:
                pass
    return r.returncode, figures, r.stdout + r.stderr


@pytest.mark.timeout(110)
def test_fsx_script_on_a_mount(mounted):
    """3,000 operations on a file of up to 2 MiB: no read differs from the model."""
    seed = _seed()
    target = mounted.path("cache/data/fsx.bin")
    rc, figures, output = run_fsx("--ops", 3000, "--seed", seed, "--max-size", 2 * MiB, target)
    assert rc == 0, f"fsx failed (seed {seed}):\n{output[-6000:]}"
    assert figures["ops"] == 3000 and figures["mismatches"] == 0, output
    # every kind of operation ran, and reads checked a good amount of data
    for op in fsx.OP_WEIGHTS:
        assert figures[f"op_{op}"] > 0, (op, output)
    assert figures["checked_read"] > 10, output
    assert not target.exists()  # removed at the end of a clean run


@pytest.mark.timeout(110)
def test_fsx_model_survives_a_remount(mounted):
    """Half the run, unmount (everything flushed to the store) and mount again: the file reads
    back identical to the model, and the second half goes on from there."""
    seed = _seed()
    ex = fsx.Exerciser(mounted.path("cache/data/fsx-remount.bin"), seed, max_size=2 * MiB)
    try:
        ex.start()
        ex.run(1000)
        ex.op_write()  # end on a write that may still be in memory only
        ex.close()
        size = len(ex.model)
        mounted.remount()
        ex.reopen()
        assert os.fstat(ex.fd).st_size == size
        ex.verify_file()
        ex.run(1000)
        ex.reopen()
        ex.verify_file()
    except fsx.Mismatch as e:
        pytest.fail(f"seed {seed}: {e}\n{ex.dump()}")
    finally:
        ex.close()
    assert ex.figures.ops == 2000 and ex.figures.mismatches == 0


def test_fsx_reports_a_mismatch(tmp_path):
    """The checker can fail: a byte changed behind the model's back is found, the run exits 1
    and shows where, and what the last operations were."""
    rc, figures, output = run_fsx("--ops", 400, "--seed", 7, "--max-size", MiB, "--inject-fault", 200,
                                  tmp_path / "f.bin", timeout=60)
    assert rc == 1, output
    assert figures["mismatches"] == 1, output
    assert figures["ops"] < 400, output  # it stops at the first mismatch
    assert "MISMATCH" in output and "first wrong byte at 0x" in output, output
    assert "FAULT" in output and "last operations" in output, output
