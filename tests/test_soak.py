"""A short run of scripts/soak.py (the documented soak runs for minutes): mixed load with every
byte read back checked, expiry and eviction at work, status asked meanwhile; no error, and the
daemon's memory within its bounds."""
from __future__ import annotations

import pytest

from conftest import run_script, tail


@pytest.mark.timeout(150)
def test_soak_script_short_run(tmp_path):
    r, figures = run_script("soak.py", "--seconds", "20", "--workers", "2", "--seed", "3",
                            "--workdir", str(tmp_path / "soak"), tmp_path=tmp_path)
    assert r.returncode == 0, f"exit {r.returncode}\n{tail(r.stdout, 40)}\n{tail(r.stderr, 40)}"
    assert figures["errors"] == "0", r.stdout
    assert int(figures["ops"]) >= 200 and int(figures["ops_read_verify"]) > 0, r.stdout
    assert int(figures["ops_status"]) >= 2, r.stdout
    assert float(figures["rss_max"]) < 512, r.stdout
