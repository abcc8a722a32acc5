"""What admins see: per-file attributes, the events file, alerts and the status facts, on real mounts."""
import errno
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from conftest import wait_until

KiB = 1024


def events(m) -> list[dict]:
    path = m.base / "tempfs-events.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def events_of(m, kind: str) -> list[dict]:
    return [e for e in events(m) if e["kind"] == kind]


def getfattr_dump(path) -> dict[str, str]:
    out = subprocess.run(["getfattr", "-d", "-m", "-", "--absolute-names", str(path)],
                         capture_output=True, text=True, check=True).stdout
    pairs = (line.split("=", 1) for line in out.splitlines() if "=" in line)
    return {name: value.strip('"') for name, value in pairs}


def alert_config(tmp_path, extra: str = "", **alerts) -> tuple[str, "os.PathLike"]:
    """Config text with an alert command that appends each alert's environment to a file."""
    record = tmp_path / "alerts.txt"
    command = f'echo "$TEMPFS_ALERT_CONDITION|$TEMPFS_ALERT_MESSAGE" >> {record}'
    keys = "\n".join(f"{k} = {json.dumps(v)}" for k, v in alerts.items())
    return f"[alerts]\ncommand = {json.dumps(command)}\n{keys}\n{extra}", record


def alerts_received(record) -> list[str]:
    return record.read_text().splitlines() if record.exists() else []


def test_getfattr_shows_the_tempfs_facts_and_they_are_read_only(mounted):
    f = mounted.path("cache/models/net.onnx")
    f.write_bytes(os.urandom(300 * KiB))
    os.sync()
    facts = getfattr_dump(f)
    assert facts["user.tempfs.area"] == "cache"
    assert facts["user.tempfs.encrypted"] == "aes-256-gcm"
    assert int(facts["user.tempfs.stored_size"]) >= 300 * KiB  # random data: no compression
    assert facts["user.tempfs.expires"].endswith("Z")
    folder = getfattr_dump(mounted.path("cache/models"))
    assert folder["user.tempfs.area"] == "cache" and "user.tempfs.stored_size" not in folder
    for name in ("user.tempfs.area", "user.tempfs.stored_size", "user.tempfs.encrypted", "user.tempfs.expires"):
        with pytest.raises(OSError) as e:
            os.setxattr(f, name, b"x")
        assert e.value.errno == errno.EPERM, name
        with pytest.raises(OSError) as e:
            os.removexattr(f, name)
        assert e.value.errno == errno.EPERM, name
    assert getfattr_dump(f)["user.tempfs.area"] == "cache"


def test_events_file_records_mounts_refusals_and_expiry(make_mount):
    m = make_mount('[policy.cleanup]\nmax_age = "2s"\n')
    with pytest.raises(OSError):
        open(m.path("at_the_root.txt"), "w")
    refused = wait_until(lambda: events_of(m, "refused"), timeout=5) and events_of(m, "refused")
    assert refused[0]["path"] == "/at_the_root.txt"
    assert refused[0]["pid"] == os.getpid() and refused[0]["uid"] == os.getuid()
    assert refused[0]["command"] and refused[0]["level"] == "WARNING" and refused[0]["time"].endswith("Z")
    m.path("cleanup/manual/short").write_text("x")
    assert wait_until(lambda: events_of(m, "expired"), timeout=10)
    assert events_of(m, "mounted")
    m.stop()
    assert events_of(m, "unmounted")
    assert (m.base / "tempfs-events.jsonl").stat().st_mode & 0o077 == 0


def test_capacity_alert_is_raised_once_and_rearmed_when_it_clears(make_mount, tmp_path):
    text, record = alert_config(tmp_path, '[policy.cache]\nmax_size = "1MB"\n', capacity_percent=50)
    m = make_mount(text)
    first = m.path("cache/data/first")
    first.write_bytes(os.urandom(600 * KiB))
    assert wait_until(lambda: alerts_received(record), timeout=10)
    assert alerts_received(record)[0].startswith("capacity:cache|cache/ holds ")
    m.path("cache/data/more").write_bytes(os.urandom(100 * KiB))
    time.sleep(3)  # the watch runs every 2 s: still above, so no second alert
    assert len(alerts_received(record)) == 1
    assert [a["condition"] for a in m.status()["daemon"]["alerts"]] == ["capacity:cache"]
    first.unlink()
    m.path("cache/data/more").unlink()
    assert wait_until(lambda: events_of(m, "alert_cleared"), timeout=10)
    assert m.status()["daemon"]["alerts"] == []
    m.path("cache/data/again").write_bytes(os.urandom(600 * KiB))
    assert wait_until(lambda: len(alerts_received(record)) == 2, timeout=10)


def test_repeated_refusals_from_one_process_raise_one_alert(make_mount, tmp_path):
    text, record = alert_config(tmp_path, refusals_per_minute=3)
    m = make_mount(text)
    script = "import os\nfor i in range(6):\n    try:\n        open(os.path.join(%r, f'x{i}'), 'w')\n" \
             "    except PermissionError:\n        pass\n" % str(m.mnt)
    proc = subprocess.run(["python3", "-c", script], check=True)
    assert proc.returncode == 0
    assert wait_until(lambda: alerts_received(record), timeout=10)
    time.sleep(1)
    lines = alerts_received(record)
    assert len(lines) == 1 and lines[0].startswith("refusals:") and "python3" in lines[0]
    assert len(events_of(m, "refused")) == 6


@pytest.mark.parametrize("command", ["exit 3", "sleep 30"])
def test_a_failing_alert_command_is_logged_and_harmless(make_mount, command):
    m = make_mount('[alerts]\ncommand = "%s"\ncommand_timeout = "1s"\n'
                   'capacity_percent = 1\n[policy.cache]\nmax_size = "1MB"\n' % command)
    m.path("cache/data/f").write_bytes(os.urandom(100 * KiB))
    text = m.wait_log(lambda t: "alert command" in t, timeout=10)
    assert ("exited 3" if command == "exit 3" else "timed out") in text
    assert m.path("cache/data/f").stat().st_size == 100 * KiB
    assert m.status()["daemon"]["alerts"][0]["condition"] == "capacity:cache"


def test_status_has_the_admin_facts(mounted):
    f = mounted.path("processing/common/uploads/frame.bin")
    f.write_bytes(os.urandom(256 * KiB))
    assert f.read_bytes()
    s = mounted.status()
    area = s["areas"]["processing"]
    assert area["files"] == 1 and area["limit_bytes"] == 2000 * 1024 * 1024
    assert area["oldest"].endswith("Z") and area["next_deadline"] > area["oldest"]
    assert area["expired_last_hour"] == 0 and area["evicted_last_day"] == 0
    d = s["daemon"]
    assert d["write_bytes_per_second"] >= 256 * KiB / 60
    assert d["creates_per_second"] > 0
    assert d["rss_bytes"] > 10 * 1024 * 1024
    assert d["cleanup_runs"] >= 1 and d["cleanup_success_rate"] == 1.0
    assert d["alerts"] == []
    assert d["key"] == str(mounted.key_file)


@pytest.fixture
def walkable_base():
    """A folder other users can walk through (pytest's tmp is 0700 for root)."""
    base = Path(tempfile.mkdtemp(prefix="tempfs-access-", dir="/tmp"))
    os.chmod(base, 0o755)
    yield base
    shutil.rmtree(base, ignore_errors=True)


def test_access_per_schema_folder_is_applied_at_every_mount_and_enforced(walkable_base, make_mount):
    # walkable_base first: it is removed only after make_mount has unmounted
    m = make_mount('[access."sessions"]\nowner = 0\ngroup = 4242\nmode = "0750"\n', base=walkable_base / "m")
    os.chmod(m.base, 0o755)
    sessions = m.path("sessions")
    st = os.stat(sessions)
    assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (0, 4242, 0o750)
    (sessions / "user_sessions" / "sess123.json").write_text("{}")
    as_nobody = ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups"]
    denied = subprocess.run([*as_nobody, "ls", str(sessions / "user_sessions")], capture_output=True, text=True)
    assert denied.returncode != 0 and "Permission denied" in denied.stderr
    member = ["setpriv", "--reuid", "65534", "--regid", "65534", "--groups", "4242"]
    allowed = subprocess.run([*member, "ls", str(sessions / "user_sessions")], capture_output=True, text=True)
    assert allowed.returncode == 0 and "sess123.json" in allowed.stdout, allowed.stderr
    assert subprocess.run([*as_nobody, "ls", str(m.path("cache"))]).returncode == 0  # the default: 1777
    # dropped from the config: the default comes back at the next mount
    m.stop()
    m.config.write_text("")
    m.start()
    st = os.stat(sessions)
    assert (st.st_uid, st.st_mode & 0o7777) == (os.getuid(), 0o1777)
