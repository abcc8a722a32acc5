"""What the store shows to someone who reads the disk: no names, targets, xattrs or content in
plaintext; and what tempfs does when someone edits it: EIO and an integrity alert, never wrong
data (issue 5)."""
import errno
import os
import subprocess
from pathlib import Path

import pytest

from conftest import store_sql
from tempfs.names import MetadataCipher

MARKERS = [f"PRIVMARK{i:02d}" for i in range(12)]


def _store_bytes(m) -> bytes:
    """Every byte of every file in the store folder (database, its log, objects, ...)."""
    return b"".join(p.read_bytes() for p in sorted(m.store.rglob("*")) if p.is_file())


def _found(m) -> list[str]:
    data = _store_bytes(m)
    return [marker for marker in MARKERS if marker.encode() in data]


def _write_markers(m) -> None:
    folder = m.path("sessions", "user_sessions", f"user_session_{MARKERS[0]}")
    deep = folder / f"deep_{MARKERS[1]}" / f"deeper_{MARKERS[2]}"
    deep.mkdir(parents=True)
    (deep / f"frame_{MARKERS[3]}.json").write_text(f'{{"person": "{MARKERS[4]}"}}\n' * 500)
    os.symlink(f"/home/{MARKERS[5]}/face.jpg", folder / f"link_{MARKERS[6]}")
    target = folder / "features.bin"
    target.write_bytes(os.urandom(1000))
    subprocess.run(["setfattr", "-n", f"user.{MARKERS[7]}", "-v", MARKERS[8], str(target)], check=True)
    os.link(target, folder / f"hardlink_{MARKERS[9]}")
    (folder / "tmp.part").write_text("x")
    os.rename(folder / "tmp.part", folder / f"renamed_{MARKERS[10]}")
    doomed = folder / f"deleted_{MARKERS[11]}"
    doomed.write_text("gone")
    doomed.unlink()


def test_no_marker_of_names_targets_xattrs_or_content_reaches_the_store(make_mount):
    m = make_mount()
    _write_markers(m)
    fd = os.open(m.mnt, os.O_RDONLY)
    try:
        os.fsync(fd)  # fsync of a folder: every change durable, the metadata's log checkpointed
    finally:
        os.close(fd)
    assert _found(m) == [], "plaintext in the store of a live mount"
    assert m.stop()
    assert _found(m) == [], "plaintext in the store after unmount"
    m.start()  # and everything is still there, readable through the mount
    folder = m.path("sessions", "user_sessions", f"user_session_{MARKERS[0]}")
    assert os.readlink(folder / f"link_{MARKERS[6]}") == f"/home/{MARKERS[5]}/face.jpg"
    got = subprocess.run(["getfattr", "--only-values", "-n", f"user.{MARKERS[7]}", str(folder / "features.bin")],
                         capture_output=True, text=True, check=True).stdout
    assert got == MARKERS[8]
    assert sorted(os.listdir(folder)) == sorted(["deep_" + MARKERS[1], "link_" + MARKERS[6], "features.bin",
                                                 "hardlink_" + MARKERS[9], "renamed_" + MARKERS[10]])


def _sql(m, statement: str, args=()) -> list:
    return store_sql(m.store, statement, args)


def _inode_of(path) -> int:
    return os.stat(path).st_ino  # tempfs gives the kernel its own inode numbers


def _alerts(m) -> list[str]:
    return [a["message"] for a in m.status()["daemon"]["alerts"]]


def test_a_name_moved_to_another_folder_in_the_store_gives_eio_and_an_alert(make_mount):
    m = make_mount()
    a, b = m.path("cache", "data"), m.path("cache", "images")
    (a / "frame.jpg").write_bytes(b"jpeg")
    (b / "other.jpg").write_bytes(b"other")
    ino, b_ino = _inode_of(a / "frame.jpg"), _inode_of(b)
    assert m.stop()
    _sql(m, "UPDATE entries SET parent=? WHERE inode=?", (b_ino, ino))
    m.start()
    with pytest.raises(OSError) as e:
        os.listdir(b)
    assert e.value.errno == errno.EIO
    assert not (a / "frame.jpg").exists()  # gone from where it was, and never shown elsewhere
    assert any("fails its integrity check" in text for text in _alerts(m)), _alerts(m)
    assert os.listdir(a) == []


def test_a_name_forged_without_the_key_is_never_shown(make_mount):
    m = make_mount()
    folder = m.path("cache", "data")
    (folder / "real.bin").write_bytes(b"real")
    ino, folder_ino = _inode_of(folder / "real.bin"), _inode_of(folder)
    assert m.stop()
    wrong = MetadataCipher(os.urandom(32)).name(folder_ino, b"forged.bin")
    _sql(m, "UPDATE entries SET name=? WHERE inode=?", (wrong, ino))
    m.start()
    with pytest.raises(OSError) as e:
        os.listdir(folder)
    assert e.value.errno == errno.EIO
    assert not (folder / "forged.bin").exists()


def test_a_block_pointed_at_another_files_object_gives_eio_never_the_other_content(make_mount):
    m = make_mount()
    secret, victim = m.path("cache", "data", "secret.bin"), m.path("cache", "data", "victim.bin")
    secret.write_bytes(b"S" * 4096 + os.urandom(1000))
    victim.write_bytes(os.urandom(5000))
    s_ino, v_ino = _inode_of(secret), _inode_of(victim)
    assert m.stop()
    (theirs,), = _sql(m, "SELECT object FROM blocks WHERE inode=? AND blockno=0", (s_ino,))
    _sql(m, "UPDATE blocks SET object=? WHERE inode=? AND blockno=0", (theirs, v_ino))
    m.start()
    with pytest.raises(OSError) as e:
        victim.read_bytes()
    assert e.value.errno == errno.EIO
    assert secret.read_bytes()[:4096] == b"S" * 4096
    assert any("victim.bin" in text for text in _alerts(m)), _alerts(m)


def _synced_append(m, path, data: bytes) -> tuple[Path, int, int]:
    """Writes and fsyncs `data` over `path`; returns where its object was appended (pack, start, end)."""
    before = {p: p.stat().st_size for p in (m.store / "packs").rglob("*") if p.is_file()}
    with open(path, "r+b" if path.exists() else "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    (grown,) = [(p, before.get(p, 0), p.stat().st_size) for p in (m.store / "packs").rglob("*")
                if p.is_file() and p.stat().st_size != before.get(p, 0)]
    return grown


def test_an_old_object_replayed_over_the_current_one_gives_eio_never_the_old_content(make_mount):
    m = make_mount()
    path = m.path("sessions", "api_sessions", "token.bin")
    # too large to be kept inline: appended to a pack (inline: test_store)
    old_pack, old_start, old_end = _synced_append(m, path, os.urandom(40_000))
    # the file's next version: a new object appended after it, the old one dead
    pack, start, end = _synced_append(m, path, os.urandom(40_000))
    assert (pack, start) == (old_pack, old_end) and end - start == old_end - old_start
    assert m.stop()
    raw = bytearray(pack.read_bytes())
    raw[start:end] = raw[old_start:old_end]  # an attacker puts the old version back
    pack.write_bytes(bytes(raw))
    m.start()
    with pytest.raises(OSError) as e:
        path.read_bytes()
    assert e.value.errno == errno.EIO
    assert any("token.bin" in text for text in _alerts(m)), _alerts(m)


def test_remembered_names_are_the_ones_a_fresh_cipher_stores_and_stay_bounded():
    from tempfs import names
    key = os.urandom(32)
    cipher, fresh = MetadataCipher(key), MetadataCipher(key)
    for i in range(names.NAMES_REMEMBERED + 10):  # past the bound: forgotten, then made again
        name = f"frame_{i}.jpg".encode()
        assert cipher.name(i % 3 + 1, name) == fresh.name(i % 3 + 1, name)
        assert cipher.name(i % 3 + 1, name) != cipher.name(i % 3 + 2, name)  # still bound to its folder
        assert len(cipher._names) <= names.NAMES_REMEMBERED
    assert cipher.name(1, b"frame_0.jpg") == fresh.name(1, b"frame_0.jpg")  # asked again once forgotten
    assert cipher.plain_name(7, cipher.name(7, b"x.json")) == b"x.json"
