"""`tempfs status` for people (rich tables; plain text when piped) and `tempfs ls` (ls -l of a folder
in a mount, plus each entry's remaining life and stored size)."""
from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import pytest

from conftest import AREAS, run_tempfs
from tempfs.cli import format_status

KiB = 1024
UPLOADS = "processing/common/uploads"
ANSI = re.compile(r"\x1b\[")


def write_synced(path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def row(text: str, first: str) -> list[str]:
    """The cells (split on runs of 2+ spaces) of the first line starting with `first`."""
    for line in text.splitlines():
        if line.strip().startswith(first):
            return re.split(r"\s{2,}", line.strip())
    raise AssertionError(f"no line starting with {first!r} in:\n{text}")


# ------------------------------------------------------------------ status

def test_status_text_shows_areas_and_daemon_facts(mounted):
    write_synced(mounted.path("cache/images/a.bin"), os.urandom(300 * KiB))
    write_synced(mounted.path(UPLOADS, "b.txt"), b"0123456789abcdef" * 40_000)
    mounted.path("cache/images/a.bin").read_bytes()
    r = run_tempfs("status", mounted.mnt, cwd=mounted.base)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert not ANSI.search(out), "ANSI codes in piped output"
    assert all(line == line.rstrip() for line in out.splitlines()), "trailing blanks"
    assert f"tempfs at {mounted.mnt}" in out
    for area in AREAS:
        assert area + "/" in out
    cache = row(out, "cache/")   # the space table comes first
    assert cache[:2] == ["cache/", "1"] and cache[2].endswith("KiB"), cache
    assert cache[7] == "4.9 GiB" and cache[8].endswith("%"), cache    # the default 5000MB limit
    processing = row(out, "processing/")
    assert processing[1] == "1" and processing[4].endswith("%") and int(processing[4].split()[0]) > 50, processing
    assert row(out, "total")[1] == "2"
    # the life table: oldest change and next deadline of the default policies (12h, 24h)
    life = [line for line in out.splitlines() if line.strip().startswith("cache/")][1]
    assert "ago" in life and re.search(r"in 1[12]h", life), life
    for fact in ("pid / version", "uptime", "store", "key", "memory", "RSS", "dirty", "cache hit rate",
                 "last minute", "MiB/s", "creates", "deletes", "cleanup", "succeeded", "refused", "integrity errors",
                 "disk free", "last check", "alerts: none"):
        assert fact in out, fact
    assert str(mounted.store) in out
    assert re.search(r"integrity errors\s+0", out)


def test_status_json_is_the_raw_status(mounted):
    mounted.path("sessions/user_sessions/s").write_text("hello")
    r = run_tempfs("status", mounted.mnt, "--json", cwd=mounted.base)
    assert r.returncode == 0, r.stderr
    status = json.loads(r.stdout)
    assert set(status["areas"]) == set(AREAS)
    assert status["areas"]["sessions"]["files"] == 1
    assert status["daemon"]["pid"] == mounted.pid


def test_status_lists_active_alerts(make_mount):
    m = make_mount("[alerts]\nrefusals_per_minute = 3\n")
    for i in range(4):
        with pytest.raises(PermissionError):
            open(m.path(f"root{i}.txt"), "w")
    r = run_tempfs("status", m.mnt, cwd=m.base)
    assert r.returncode == 0, r.stderr
    assert "alerts: 1 active" in r.stdout, r.stdout
    assert re.search(r"- refusals:\d+: repeated refused operations .* \(since (.* ago|just now)\)", r.stdout), r.stdout
    assert re.search(r"refused \(layout\)\s+4 \(4 in the last hour\)", r.stdout), r.stdout


def test_status_where_nothing_is_mounted(tmp_path, mounted):
    empty = tmp_path / "empty"
    empty.mkdir()
    for target, words in ((empty, "nothing is mounted there"), (tmp_path / "missing", "nothing is mounted there"),
                          (mounted.path("cache"), "inside the tempfs mount")):
        for extra in ((), ("--json",)):
            r = run_tempfs("status", target, *extra, cwd=tmp_path)
            assert r.returncode == 8, (target, r.returncode, r.stdout, r.stderr)
            lines = r.stderr.strip().splitlines()
            assert len(lines) == 1 and words in lines[0], r.stderr
            assert r.stdout == ""


def test_format_status_of_an_older_daemon_shows_dashes():
    old = {"areas": {"cache": {"files": 5, "logical_bytes": 100 * 2**20, "stored_bytes": 20 * 2**20,
                               "limit_bytes": 5000 * 2**20, "evicted": 0, "refused_full": 0}},
           "total": {"files": 6, "logical_bytes": 100 * 2**20, "stored_bytes": 20 * 2**20, "objects": 3},
           "disk": {"free_bytes": 2**30, "min_free_bytes": 256 * 2**20},
           "daemon": {"pid": 42, "version": "0.1.0", "uptime_seconds": 3725.0, "store": "/s", "dirty_bytes": 0,
                      "refused": 1, "integrity_errors": 0, "expired": 7}}
    out = format_status(Path("/m"), old)
    cache = row(out, "cache/")
    assert cache == ["cache/", "5", "100.0 MiB", "20.0 MiB", "80 %", "-", "-", "4.9 GiB", "0.4 %"], cache
    life = [line for line in out.splitlines() if line.strip().startswith("cache/")][1]
    assert re.split(r"\s{2,}", life.strip()) == ["cache/", "-", "-", "- / -", "- / -", "0", "0"]
    assert re.search(r"uptime\s+1h 2m", out) and re.search(r"key\s+-", out) and "alerts: -" in out
    assert re.search(r"cache hit rate\s+-", out) and "none since the mount" in out
    full = dict(old, daemon=dict(old["daemon"], cache_hit_rate=0.5, cleanup_runs=99, cleanup_failures=1,
                                 cleanup_success_rate=0.99, read_bytes_per_second=2 * 2**20,
                                 alerts=[{"condition": "capacity:cache", "message": "cache/ holds 85 % of its limit",
                                          "since": "2020-01-01T00:00:00.000Z"}],
                                 last_check={"clean": True, "objects_checked": 12, "bytes_checked": 4096,
                                             "seconds": 0.5, "finished_ns": int((time.time() - 7200) * 1e9)}))
    out = format_status(Path("/m"), full)
    assert re.search(r"cache hit rate\s+50\.0 %", out)
    assert "packs on disk" not in out
    assert "packs on disk: 3.0 MiB" in format_status(Path("/m"), dict(old, total=dict(old["total"], pack_bytes=3 * 2**20)))
    assert "99 runs, 1 failed, 99.00 % succeeded" in out and "read 2.00 MiB/s" in out
    assert "alerts: 1 active" in out and "capacity:cache: cache/ holds 85 % of its limit (since" in out
    assert re.search(r"last check\s+(1h 59m|2h 0m) ago: clean; 12 objects, 4.0 KiB in 0.5 s", out), out


# ------------------------------------------------------------------ ls

def test_ls_shows_life_and_stored_size(mounted):
    images = mounted.path("cache/images")
    write_synced(images / "random.bin", os.urandom(200 * KiB))
    write_synced(images / "zeros.bin", bytes(400 * KiB))       # all-zero blocks are holes: stored 0
    (images / "short.txt").write_text("short-lived")
    os.setxattr(images / "short.txt", "user.tempfs.ttl", b"600")
    (images / "sub").mkdir()
    os.symlink("random.bin", images / "link")
    r = run_tempfs("ls", images, "--json", cwd=mounted.base)
    assert r.returncode == 0, r.stderr
    rows = {e["name"]: e for e in json.loads(r.stdout)}
    assert sorted(rows) == ["link", "random.bin", "short.txt", "sub", "zeros.bin"]
    rnd = rows["random.bin"]
    assert rnd["type"] == "file" and rnd["size"] == 200 * KiB and rnd["mode"] == "-rw-r--r--"
    assert 200 * KiB <= rnd["stored_bytes"] < 210 * KiB          # random data: no compression, plus the seal
    assert 12 * 3600 - 120 <= rnd["ttl_seconds"] <= 12 * 3600     # cache/: max_age 12h
    assert rnd["area"] == "cache" and rnd["expires"].endswith("Z") and not rnd["never_expires"]
    assert rows["zeros.bin"]["size"] == 400 * KiB and rows["zeros.bin"]["stored_bytes"] == 0
    assert 590 <= rows["short.txt"]["ttl_seconds"] <= 600
    assert rows["sub"]["type"] == "folder"
    assert rows["link"]["type"] == "symlink" and rows["link"]["symlink_target"] == "random.bin"
    assert rows["link"]["stored_bytes"] == os.lstat(images / "link").st_blocks * 512  # no xattrs on symlinks

    r = run_tempfs("ls", images, cwd=mounted.base)
    assert r.returncode == 0, r.stderr
    assert not ANSI.search(r.stdout)
    lines = {line.split()[-1]: line for line in r.stdout.splitlines() if line.strip()}
    assert re.search(r"\s(9m \d+s|10m 0s)\s+short\.txt$", lines["short.txt"]), lines["short.txt"]
    assert re.search(r"\s200\.\d KiB\s.*\s1[12]h \d+m\s+random\.bin$", lines["random.bin"]), lines["random.bin"]
    assert re.search(r"\s409600\s+0 B\s", lines["zeros.bin"]), lines["zeros.bin"]
    assert lines["random.bin"].split()[0] == "-rw-r--r--"
    assert "sub/" in lines and "link -> random.bin" in r.stdout


def test_ls_of_the_root_and_of_one_file(mounted):
    r = run_tempfs("ls", mounted.mnt, "--json", cwd=mounted.base)
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert [e["name"] for e in rows] == AREAS
    assert all(e["never_expires"] and e["ttl_seconds"] is None and e["type"] == "folder" for e in rows)
    r = run_tempfs("ls", mounted.mnt, cwd=mounted.base)
    assert all(re.search(rf"never\s+{a}/$", r.stdout, re.M) for a in AREAS), r.stdout
    f = mounted.path(UPLOADS, "one.txt")
    f.write_text("x" * 1000)
    r = run_tempfs("ls", f, "--json", cwd=mounted.base)
    assert r.returncode == 0, r.stderr
    [entry] = json.loads(r.stdout)
    assert entry["name"] == "one.txt" and entry["size"] == 1000 and entry["area"] == "processing"
    assert 24 * 3600 - 120 <= entry["ttl_seconds"] <= 24 * 3600
    # the default PATH is data/temp of the project root (here: nothing mounted there)
    r = run_tempfs("ls", "--json", cwd=mounted.base, env={"TEMPFS_ROOT": str(mounted.base)})
    assert r.returncode == 8 and "not inside a tempfs mount" in r.stderr


def test_ls_outside_a_mount_and_of_a_missing_entry(tmp_path, mounted):
    for target in (tmp_path, tmp_path / "missing" / "deeper"):
        r = run_tempfs("ls", target, cwd=tmp_path)
        assert r.returncode == 8, (target, r.returncode, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1 and "not inside a tempfs mount" in r.stderr
    r = run_tempfs("ls", mounted.path("cache/images/none.bin"), cwd=tmp_path)
    assert r.returncode == 2 and "no such file or folder" in r.stderr, r.stderr


def test_status_folders_shows_usage_per_schema_folder(mounted):
    write_synced(mounted.path("cache/models/net.onnx"), os.urandom(200_000))
    mounted.path("cache/models/v2").mkdir()
    write_synced(mounted.path("cache/models/v2/net.onnx"), b"weights" * 1000)
    write_synced(mounted.path("processing/common/uploads/in.jpg"), os.urandom(50_000))
    r = run_tempfs("status", mounted.mnt, "--folders", "--json", cwd=mounted.base)
    assert r.returncode == 0, r.stderr
    folders = json.loads(r.stdout)["folders"]
    assert folders["cache/models"]["files"] == 2
    assert folders["cache/models"]["logical_bytes"] == 200_000 + 7000
    assert 200_000 < folders["cache/models"]["stored_bytes"] < 200_000 + 7000
    assert folders["processing/common/uploads"] == {**folders["processing/common/uploads"], "files": 1}
    assert folders["cache"]["files"] == 0 and folders["sessions/user_sessions"]["files"] == 0
    assert folders["cache/models"]["oldest"].endswith("Z") and folders["cache"]["oldest"] is None
    assert folders["cache/models"]["next_deadline"] > folders["cache/models"]["oldest"]
    assert "folders" not in json.loads(run_tempfs("status", mounted.mnt, "--json", cwd=mounted.base).stdout)
    text = run_tempfs("status", mounted.mnt, "--folders", cwd=mounted.base).stdout
    assert "schema folders" in text
    assert row(text, "cache/models/")[:2] == ["cache/models/", "2"]


def test_status_separates_dedup_and_compression_savings(mounted):
    data = os.urandom(256 * 1024)
    write_synced(mounted.path("cache/data/a"), data)
    write_synced(mounted.path("cache/data/b"), data)
    write_synced(mounted.path("processing/common/uploads/log.txt"), b"frame 0001 ok\n" * 80_000)
    r = run_tempfs("status", mounted.mnt, "--json", cwd=mounted.base)
    status = json.loads(r.stdout)
    cache, processing = status["areas"]["cache"], status["areas"]["processing"]
    assert cache["dedup_saved_bytes"] == len(data)
    assert -1000 < cache["compression_saved_bytes"] <= 0  # random: only the seal's overhead
    assert processing["dedup_saved_bytes"] >= 0
    assert processing["compression_saved_bytes"] > 0.9 * 14 * 80_000 - processing["dedup_saved_bytes"]
    assert status["total"]["dedup_saved_bytes"] == cache["dedup_saved_bytes"] + processing["dedup_saved_bytes"]
    text = run_tempfs("status", mounted.mnt, cwd=mounted.base).stdout
    assert "by dedup" in text and "by lz4" in text
