"""Unit tests of tempfs.keys: the master key file."""
from __future__ import annotations

import os
import stat

import pytest

from tempfs.codec import MASTER_KEY_BYTES
from tempfs.keys import KeyFileError, check_key_location, create_key_file, read_key_file


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_create_key_file_mode_and_content(tmp_path):
    path = tmp_path / "config" / "tempfs.key"
    key = create_key_file(path)
    assert len(key) == MASTER_KEY_BYTES
    assert _mode(path) == 0o600
    assert path.read_text().strip() == key.hex()
    assert read_key_file(path) == key


def test_create_key_file_mode_under_permissive_umask(tmp_path):
    old = os.umask(0)
    try:
        path = tmp_path / "k.key"
        create_key_file(path)
    finally:
        os.umask(old)
    assert _mode(path) == 0o600


def test_create_key_file_makes_fresh_keys(tmp_path):
    a = create_key_file(tmp_path / "a.key")
    b = create_key_file(tmp_path / "b.key")
    assert a != b


def test_create_key_file_refuses_to_overwrite(tmp_path):
    path = tmp_path / "tempfs.key"
    key = create_key_file(path)
    before = path.read_bytes()
    with pytest.raises((FileExistsError, KeyFileError)):
        create_key_file(path)
    assert path.read_bytes() == before
    assert read_key_file(path) == key


def test_create_key_file_refuses_existing_foreign_file(tmp_path):
    path = tmp_path / "tempfs.key"
    path.write_text("precious\n")
    with pytest.raises((FileExistsError, KeyFileError)):
        create_key_file(path)
    assert path.read_text() == "precious\n"


def test_create_key_file_refuses_dangling_symlink(tmp_path):
    """O_EXCL does not follow a symlink: a planted link cannot redirect the key elsewhere."""
    path = tmp_path / "tempfs.key"
    elsewhere = tmp_path / "elsewhere"
    path.symlink_to(elsewhere)
    with pytest.raises((FileExistsError, KeyFileError)):
        create_key_file(path)
    assert not elsewhere.exists()


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660, 0o606, 0o777, 0o610, 0o601])
def test_read_refuses_group_or_other_access(tmp_path, mode):
    path = tmp_path / "tempfs.key"
    key = create_key_file(path)
    os.chmod(path, mode)
    with pytest.raises(KeyFileError) as info:
        read_key_file(path)
    msg = str(info.value)
    assert "chmod 600" in msg
    assert str(path) in msg
    assert key.hex() not in msg


@pytest.mark.parametrize("mode", [0o600, 0o400])
def test_read_accepts_owner_only(tmp_path, mode):
    path = tmp_path / "tempfs.key"
    key = create_key_file(path)
    os.chmod(path, mode)
    assert read_key_file(path) == key


@pytest.mark.parametrize("text", [
    "",
    "\n",
    "ab" * 31,                 # 31 bytes
    "ab" * 33,                 # 33 bytes
    "ab" * 32 + "a",           # odd number of digits
    "zz" * 32,                 # not hex
    "g" + "0" * 63,            # one non-hex digit
    "passphrase-not-a-key",
])
def test_read_refuses_bad_content(tmp_path, text):
    path = tmp_path / "tempfs.key"
    path.write_text(text)
    os.chmod(path, 0o600)
    with pytest.raises(KeyFileError) as info:
        read_key_file(path)
    assert "64 hex digits" in str(info.value)
    if text.strip():
        assert text.strip() not in str(info.value)


def test_read_refuses_binary_key(tmp_path):
    path = tmp_path / "tempfs.key"
    path.write_bytes(os.urandom(32))
    os.chmod(path, 0o600)
    with pytest.raises(KeyFileError):
        read_key_file(path)


def test_read_accepts_surrounding_whitespace_and_uppercase(tmp_path):
    key = os.urandom(32)
    path = tmp_path / "tempfs.key"
    path.write_text("  " + key.hex().upper() + "\n\n")
    os.chmod(path, 0o600)
    assert read_key_file(path) == key


def test_read_missing_file(tmp_path):
    with pytest.raises(KeyFileError) as info:
        read_key_file(tmp_path / "nope.key")
    assert "not found" in str(info.value)


def test_read_refuses_directory(tmp_path):
    d = tmp_path / "dir.key"
    d.mkdir(mode=0o700)
    with pytest.raises(KeyFileError):
        read_key_file(d)


def test_key_never_in_wrong_mode_message(tmp_path):
    path = tmp_path / "k"
    key = create_key_file(path)
    os.chmod(path, 0o644)
    with pytest.raises(KeyFileError) as info:
        read_key_file(path)
    assert key.hex() not in str(info.value) and key.hex().upper() not in str(info.value)


# ---- check_key_location -----------------------------------------------------------------

@pytest.fixture
def places(tmp_path):
    store = tmp_path / "store"
    mnt = tmp_path / "mnt"
    config = tmp_path / "config"
    for d in (store, mnt, config):
        d.mkdir()
    return store, mnt, config


def test_key_outside_is_accepted(places):
    store, mnt, config = places
    check_key_location(config / "tempfs.key", store, mnt)


@pytest.mark.parametrize("where", ["store", "mnt"])
@pytest.mark.parametrize("sub", ["", "a", "a/b/c"])
def test_key_inside_store_or_mount_is_refused(places, where, sub):
    store, mnt, _ = places
    base = store if where == "store" else mnt
    folder = base / sub if sub else base
    with pytest.raises(KeyFileError) as info:
        check_key_location(folder / "tempfs.key", store, mnt)
    assert "config/" in str(info.value)


def test_key_inside_via_relative_path_is_refused(places, monkeypatch):
    store, mnt, _ = places
    monkeypatch.chdir(store)
    with pytest.raises(KeyFileError):
        check_key_location(store.parent / "config" / ".." / "store" / "tempfs.key", store, mnt)
    from pathlib import Path
    with pytest.raises(KeyFileError):
        check_key_location(Path("tempfs.key"), store, mnt)


def test_key_symlinked_into_store_is_refused(places):
    store, mnt, config = places
    real = store / "tempfs.key"
    real.write_text("x")
    link = config / "tempfs.key"
    link.symlink_to(real)
    with pytest.raises(KeyFileError):
        check_key_location(link, store, mnt)


def test_sibling_with_common_prefix_is_accepted(tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    (tmp_path / "store-keys").mkdir()
    check_key_location(tmp_path / "store-keys" / "tempfs.key", store)


def test_store_inside_key_folder_is_accepted(tmp_path):
    """The store may live below the key's folder (e.g. project/config/key and project/config/store
    is odd but the key is still not inside the store)."""
    (tmp_path / "store").mkdir()
    check_key_location(tmp_path / "tempfs.key", tmp_path / "store")
