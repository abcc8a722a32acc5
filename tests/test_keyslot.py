"""Unit tests of tempfs.keyslot (the passphrase key slot) and tempfs.ephemeral (wiping rules).

Most slots here use a cheap scrypt cost (n=2**10) so that the tests stay fast; one test runs
the default cost and checks what it costs."""
from __future__ import annotations

import base64
import fcntl
import json
import os
import stat
import time

import pytest

from tempfs import ephemeral
from tempfs.keyslot import (DEFAULT_KDF, ENV_NEW_PASSPHRASE, ENV_PASSPHRASE, KdfParams, KeySlotError, Passphrase,
                            WrongPassphraseError, create_slot, find_new_passphrase, find_passphrase, open_slot,
                            read_passphrase_file, replace_slot)

CHEAP = KdfParams(n=2 ** 10, r=8, p=1)
KEY = bytes(range(32))
SECRET = b"correct horse battery staple"


def pw(secret: bytes = SECRET) -> Passphrase:
    return Passphrase(secret, "a test")


@pytest.fixture
def slot(tmp_path):
    path = tmp_path / "store" / "keyslot.json"
    create_slot(path, KEY, pw(), CHEAP)
    return path


def _edit(path, **changes):
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


# ---- the slot ----------------------------------------------------------------------------

def test_roundtrip_and_file_mode(slot):
    assert open_slot(slot, pw()) == KEY
    assert stat.S_IMODE(slot.stat().st_mode) == 0o600
    assert sorted(os.listdir(slot.parent)) == ["keyslot.json"]  # no temp file left


def test_slot_holds_no_secret_in_clear(slot):
    text = slot.read_bytes()
    for secret in (KEY, SECRET):
        for form in (secret, secret.hex().encode(), base64.b64encode(secret)):
            assert form not in text


def test_wrong_passphrase_is_refused_without_showing_it(slot):
    with pytest.raises(WrongPassphraseError) as info:
        open_slot(slot, pw(b"Tr0ub4dor&3"))
    message = str(info.value)
    assert "wrong passphrase" in message and str(slot.parent) in message and "a test" in message
    assert "Tr0ub4dor" not in message and SECRET.decode() not in message


@pytest.mark.parametrize("field, value", [
    ("n", 2 ** 11), ("r", 4), ("p", 2), ("salt", base64.b64encode(b"s" * 16).decode()),
    ("nonce", base64.b64encode(b"n" * 12).decode()),
])
def test_tampered_header_fails_as_a_wrong_passphrase(slot, field, value):
    """Every header field is bound to the sealed key (associated data, or the KDF's input)."""
    _edit(slot, **{field: value})
    with pytest.raises(WrongPassphraseError):
        open_slot(slot, pw())


def test_flipped_bit_in_the_wrapped_key_fails(slot):
    data = json.loads(slot.read_text())
    raw = bytearray(base64.b64decode(data["wrapped_key"]))
    raw[5] ^= 1
    _edit(slot, wrapped_key=base64.b64encode(bytes(raw)).decode())
    with pytest.raises(WrongPassphraseError):
        open_slot(slot, pw())


@pytest.mark.parametrize("change", [
    {"version": 2}, {"kdf": "argon2id"}, {"cipher": "aes-128-gcm"}, {"format": "gocryptfs"},
    {"extra": 1}, {"n": "65536"}, {"salt": "***"}, {"nonce": base64.b64encode(b"short").decode()},
])
def test_malformed_or_unknown_slot_is_refused(slot, change):
    _edit(slot, **change)
    with pytest.raises(KeySlotError) as info:
        open_slot(slot, pw())
    assert not isinstance(info.value, WrongPassphraseError)
    assert "key slot" in str(info.value) or "out of bounds" in str(info.value)


@pytest.mark.parametrize("text", ["", "not json", "[]", "{}", "x" * 5000])
def test_garbage_slot_is_refused(slot, text):
    slot.write_text(text)
    with pytest.raises(KeySlotError):
        open_slot(slot, pw())


@pytest.mark.parametrize("n, r, p", [(2 ** 30, 8, 1), (2 ** 16, 64, 1), (3000, 8, 1), (2 ** 18, 16, 1), (2 ** 16, 8, 99)])
def test_costly_parameters_are_refused_before_deriving(slot, n, r, p):
    """A forged slot cannot make the daemon allocate gigabytes: bounds are checked first."""
    _edit(slot, n=n, r=r, p=p)
    started = time.monotonic()
    with pytest.raises(KeySlotError) as info:
        open_slot(slot, pw())
    assert "out of bounds" in str(info.value)
    assert time.monotonic() - started < 1


def test_create_never_replaces_a_slot(slot):
    before = slot.read_bytes()
    with pytest.raises(FileExistsError):
        create_slot(slot, bytes(32), pw(b"other"), CHEAP)
    assert slot.read_bytes() == before
    assert sorted(os.listdir(slot.parent)) == ["keyslot.json"]


def test_replace_changes_passphrase_and_salt(slot):
    old_salt = json.loads(slot.read_text())["salt"]
    replace_slot(slot, KEY, pw(b"new one"), CHEAP)
    assert json.loads(slot.read_text())["salt"] != old_salt
    assert open_slot(slot, pw(b"new one")) == KEY
    with pytest.raises(WrongPassphraseError):
        open_slot(slot, pw())
    assert stat.S_IMODE(slot.stat().st_mode) == 0o600
    assert sorted(os.listdir(slot.parent)) == ["keyslot.json"]


def test_default_cost(tmp_path):
    """scrypt n=2**16, r=8: 64 MiB, a fraction of a second; the memory is given back."""
    assert DEFAULT_KDF.memory == 64 * 1024 * 1024
    path = tmp_path / "keyslot.json"
    create_slot(path, KEY, pw())
    rss_before = _rss()
    started = time.monotonic()
    assert open_slot(path, pw()) == KEY
    assert time.monotonic() - started < 3  # ~0.3 s here; generous for a loaded machine
    assert _rss() - rss_before < 16 * 1024 * 1024  # the 64 MiB went back to the system


def _rss() -> int:
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith("VmRSS:")).split()[1]) * 1024


# ---- where the passphrase comes from -----------------------------------------------------

def _secret_file(path, content: bytes, mode=0o600):
    path.write_bytes(content)
    os.chmod(path, mode)
    return path


def test_sources_in_order(tmp_path):
    creds = tmp_path / "creds"
    creds.mkdir()
    _secret_file(creds / "tempfs-passphrase", b"from credential\n", 0o400)
    file = _secret_file(tmp_path / "pp", b"from file\n")
    env = {ENV_PASSPHRASE: "from env", "CREDENTIALS_DIRECTORY": str(creds)}
    assert find_passphrase(file, env).secret == b"from file"
    found = find_passphrase(None, env)
    assert (found.secret, found.source) == (b"from env", f"${ENV_PASSPHRASE}")
    found = find_passphrase(None, {"CREDENTIALS_DIRECTORY": str(creds)})
    assert found.secret == b"from credential" and "systemd credential" in found.source
    assert find_passphrase(None, {"CREDENTIALS_DIRECTORY": str(tmp_path / "none")}) is None
    assert find_passphrase(None, {}) is None


def test_new_passphrase_sources(tmp_path):
    file = _secret_file(tmp_path / "new", b"new from file")
    assert find_new_passphrase(file, {ENV_NEW_PASSPHRASE: "env"}).secret == b"new from file"
    assert find_new_passphrase(None, {ENV_NEW_PASSPHRASE: "env"}).secret == b"env"
    assert find_new_passphrase(None, {ENV_PASSPHRASE: "old"}) is None


@pytest.mark.parametrize("content, secret", [
    (b"pw\n", b"pw"), (b"pw\r\n", b"pw"), (b"pw", b"pw"), (b"two words \n\n", b"two words "),
    (b"\xc3\xa9t\xc3\xa9\n", "été".encode()),
])
def test_trailing_newline_is_stripped(tmp_path, content, secret):
    assert read_passphrase_file(_secret_file(tmp_path / "pp", content), "--passphrase-file").secret == secret


@pytest.mark.parametrize("content", [b"", b"\n", b"\r\n\n"])
def test_empty_passphrase_is_refused(tmp_path, content):
    with pytest.raises(KeySlotError, match="empty"):
        read_passphrase_file(_secret_file(tmp_path / "pp", content), "--passphrase-file")
    with pytest.raises(KeySlotError, match="empty"):
        find_passphrase(None, {ENV_PASSPHRASE: content.decode()})


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o660])
def test_passphrase_file_readable_by_others_is_refused(tmp_path, mode):
    path = _secret_file(tmp_path / "pp", b"sekrit-value\n", mode)
    with pytest.raises(KeySlotError) as info:
        read_passphrase_file(path, "--passphrase-file")
    assert "chmod 600" in str(info.value) and "sekrit" not in str(info.value)


def test_passphrase_file_missing_or_not_a_file(tmp_path):
    with pytest.raises(KeySlotError, match="not found"):
        read_passphrase_file(tmp_path / "none", "--passphrase-file")
    (tmp_path / "dir").mkdir(mode=0o700)
    with pytest.raises(KeySlotError, match="regular file"):
        read_passphrase_file(tmp_path / "dir", "--passphrase-file")


def test_passphrase_repr_hides_the_secret():
    assert SECRET.decode() not in repr(pw()) and "a test" in repr(pw())


# ---- ephemeral wiping rules ------------------------------------------------------------------

def _leftover(store):
    """What a SIGKILLed ephemeral daemon leaves: the marker, a database, objects."""
    ephemeral.start(store)
    (store / "meta.sqlite").write_bytes(b"x" * 100)
    (store / "objects" / "00" / "01").mkdir(parents=True)
    (store / "objects" / "00" / "01" / "0001").write_bytes(b"sealed")
    return store


def test_leftovers_are_cleared(tmp_path):
    store = _leftover(tmp_path / "store")
    assert ephemeral.clear_leftovers(store)
    assert os.listdir(store) in ([], ["lock"])
    assert not ephemeral.clear_leftovers(store)


def test_a_locked_store_is_never_wiped(tmp_path):
    store = _leftover(tmp_path / "store")
    fd = os.open(store / "lock", os.O_RDWR | os.O_CREAT, 0o600)
    before = sorted(p.relative_to(store) for p in store.rglob("*"))
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a running daemon holds it
        with pytest.raises(ephemeral.StoreBusyError):
            ephemeral.clear_leftovers(store)
        ephemeral.remove_after_unmount(store)
        assert sorted(p.relative_to(store) for p in store.rglob("*")) == before
    finally:
        os.close(fd)
    ephemeral.remove_after_unmount(store)
    assert os.listdir(store) == []


def test_an_unmarked_store_is_never_wiped(tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    (store / "meta.sqlite").write_bytes(b"persistent")
    assert not ephemeral.clear_leftovers(store)
    assert (store / "meta.sqlite").read_bytes() == b"persistent"


@pytest.mark.parametrize("names, words", [
    (["meta.sqlite"], "persistent tempfs store"), (["keyslot.json"], "persistent tempfs store"),
    (["holiday.jpg"], "holiday.jpg"),
])
def test_ephemeral_mount_refuses_a_folder_with_content(tmp_path, names, words):
    store = tmp_path / "store"
    store.mkdir()
    for name in names:
        (store / name).write_text("mine")
    with pytest.raises(ephemeral.EphemeralError, match=words):
        ephemeral.check_usable(store)
    assert sorted(os.listdir(store)) == names


def test_ephemeral_mount_takes_missing_or_empty_folder(tmp_path):
    ephemeral.check_usable(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "lock").touch()
    ephemeral.check_usable(tmp_path / "empty")
