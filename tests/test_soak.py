"""A short run of scripts/soak.py (the documented soak runs for minutes): mixed load with every
byte read back checked, expiry and eviction at work, status asked meanwhile; no error, and the
daemon's memory within its bounds."""
from __future__ import annotations

import re
import subprocess
import sys

import pytest

from conftest import REPO_ROOT, fuse_mounts_under, tail, tempfs_env


@pytest.mark.timeout(150)
def test_soak_script_short_run(tmp_path):
    cmd = [sys.executable, str(REPO_ROOT / "scripts" / "soak.py"), "--seconds", "20", "--workers", "2",
           "--seed", "3", "--workdir", str(tmp_path / "soak")]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=130, env=tempfs_env(),
                           stdin=subprocess.DEVNULL)
    finally:
        leftovers = fuse_mounts_under(tmp_path)
        for mp in leftovers:
            subprocess.run(["fusermount3", "-uz", mp], capture_output=True)
    assert not leftovers, f"soak left mounts behind: {leftovers}"
    assert r.returncode == 0, f"exit {r.returncode}\n{tail(r.stdout, 40)}\n{tail(r.stderr, 40)}"
    figures = dict(re.findall(r"^(\w+) (\S+) \S+$", r.stdout, re.M))
    assert figures["errors"] == "0", r.stdout
    assert int(figures["ops"]) >= 200 and int(figures["ops_read_verify"]) > 0, r.stdout
    assert int(figures["ops_status"]) >= 2, r.stdout
    assert float(figures["rss_max"]) < 512, r.stdout
