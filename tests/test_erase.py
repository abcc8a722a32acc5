"""`tempfs erase`: the right to erasure, on a real mount."""
import json
import os
import subprocess
import sys

from conftest import tempfs_env, wait_until

SESSION = "sess123"


def erase(m, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tempfs", "erase", *map(str, args)], capture_output=True,
                          text=True, timeout=60, env=tempfs_env(), cwd=m.base)


def populate(m) -> dict[str, bytes]:
    files = {
        f"sessions/user_sessions/user_session_{SESSION}_a.json": b'{"user": "kim"}' * 100,
        f"sessions/api_sessions/{SESSION}/token": os.urandom(5000),
        f"sessions/api_sessions/{SESSION}/deep/state.bin": os.urandom(300_000),
        f"cache/images/face_{SESSION}.jpg": os.urandom(200_000),
        "processing/face_recognition/frames/frame_other.jpg": os.urandom(100_000),
        "sessions/user_sessions/user_session_sess999_a.json": b"{}",
    }
    for rel, data in files.items():
        path = m.path(rel)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return files


def store_bytes(m) -> bytes:
    return b"".join(p.read_bytes() for p in (m.base / "store").glob("meta.sqlite*"))


def test_erase_removes_every_match_durably_and_reports_it(mounted):
    files = populate(mounted)
    os.sync()
    r = erase(mounted, SESSION, mounted.mnt, "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    erased = {e["path"]: e for e in report["erased"]}
    assert set(erased) == {f"sessions/user_sessions/user_session_{SESSION}_a.json",
                           f"sessions/api_sessions/{SESSION}", f"cache/images/face_{SESSION}.jpg"}
    assert erased[f"sessions/api_sessions/{SESSION}"]["entries"] == 4  # itself, token, deep/, state.bin
    assert report["entries"] == 6
    matched = [data for rel, data in files.items() if SESSION in rel]
    assert report["logical_bytes"] == sum(map(len, matched))
    assert report["stored_bytes"] > 0 and report["failed"] == [] and report["pattern"] == SESSION
    assert report["started"] <= report["finished"]
    for rel, data in files.items():
        assert mounted.path(rel).exists() == (SESSION not in rel)
    # the content is shredded: its objects are gone from the metadata (with their keys: what is
    # left of them in packs cannot be decrypted, test_store), and so are the names
    status = mounted.status()
    assert status["areas"]["cache"]["stored_bytes"] == 0
    assert f"user_session_{SESSION}".encode() not in store_bytes(mounted)
    assert b"user_session_sess999" not in store_bytes(mounted)  # names are stored encrypted


def test_erase_in_one_area_and_dry_run(mounted):
    populate(mounted)
    dry = erase(mounted, SESSION, mounted.mnt, "--dry-run", "--json")
    assert dry.returncode == 0 and json.loads(dry.stdout)["entries"] == 6
    assert mounted.path(f"cache/images/face_{SESSION}.jpg").exists()
    r = erase(mounted, "face_*.jpg", mounted.mnt, "--area", "cache")
    assert r.returncode == 0, r.stderr
    assert f"cache/images/face_{SESSION}.jpg" in r.stdout and "1 entries" in r.stdout
    assert not mounted.path(f"cache/images/face_{SESSION}.jpg").exists()
    assert mounted.path(f"sessions/user_sessions/user_session_{SESSION}_a.json").exists()


def test_schema_folders_are_never_erased(mounted):
    r = erase(mounted, "sessions", mounted.mnt, "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["entries"] == 0
    assert mounted.path("sessions/user_sessions").is_dir()


def test_erase_refuses_a_folder_that_is_not_a_mount(tmp_path, mounted):
    r = subprocess.run([sys.executable, "-m", "tempfs", "erase", SESSION, str(tmp_path)], capture_output=True,
                       text=True, timeout=60, env=tempfs_env())
    assert r.returncode == 8 and "nothing is mounted" in r.stderr


def test_a_file_open_during_erasure_is_listed_and_goes_at_its_close(mounted):
    populate(mounted)
    path = mounted.path(f"cache/images/face_{SESSION}.jpg")
    with open(path, "rb") as held:
        r = erase(mounted, SESSION, mounted.mnt, "--json")
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["open_when_erased"] == [f"cache/images/face_{SESSION}.jpg"]
        assert not path.exists()
        assert len(held.read()) == 200_000  # the program that had it open still reads it
    # (the kernel sends the release after close returns)
    assert wait_until(lambda: mounted.status()["areas"]["cache"]["stored_bytes"] == 0, timeout=5)
