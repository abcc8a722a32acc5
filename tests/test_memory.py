"""The daemon's memory stays bounded: a writer faster than sealing waits instead of growing it."""
import os

import pytest

MiB = 1024 * 1024


def peak_rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc/PID/status")


@pytest.mark.timeout(300)
def test_writing_2_gib_with_a_256_mib_budget_keeps_rss_under_400_mb(make_mount):
    m = make_mount('[memory]\ndirty_limit = "256MB"\ncache_limit = "64MB"\n')
    pattern = os.urandom(MiB + 4096)
    path = m.path("processing/common/uploads/big.bin")
    # Seven distinct 1 MiB chunks, so the store on disk stays small (dedup) while every block
    # still goes through the dirty budget, hashing and the flusher.
    with open(path, "wb") as f:
        for i in range(2048):
            f.write(pattern[(i % 7) * 512:(i % 7) * 512 + MiB])
        os.fsync(f.fileno())
    assert os.stat(path).st_size == 2048 * MiB
    peak = peak_rss_bytes(m.pid)
    assert peak < 400 * 1000 * 1000, f"daemon peak RSS {peak / MiB:.0f} MiB"
    with open(path, "rb") as f:
        f.seek(2047 * MiB)
        assert f.read(MiB) == pattern[(2047 % 7) * 512:(2047 % 7) * 512 + MiB]
