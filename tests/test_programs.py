"""Unmodified programs work in a mounted tempfs (issue 2, items 4-8, and the store's contents).

Everything here runs real programs (cp, tar, dd, sqlite3, ...) through subprocess,
or plain Python file calls, against a real mount made by the `mounted` fixture.
"""
from __future__ import annotations

import errno
import hashlib
import mmap
import os
import shutil
import socket
import stat
import subprocess
import threading
import time
from pathlib import Path

import pytest

from conftest import AREAS, BRANCH_DIRS, LEAF_DIRS, SCHEMA_DIRS, mount_fstype

MiB = 1024 * 1024
UPLOADS = "processing/common/uploads"


def sh(*args, cwd=None, check=True, input=None, timeout=120) -> subprocess.CompletedProcess:
    """Run a program; text output; fail with its output on a non-zero exit."""
    r = subprocess.run([os.fspath(a) for a in args], cwd=cwd, capture_output=True, text=True,
                       input=input, timeout=timeout, env={**os.environ, "LC_ALL": "C"})
    if check and r.returncode != 0:
        raise AssertionError(f"{args} exited {r.returncode}\nstdout: {r.stdout[-2000:]}\n"
                             f"stderr: {r.stderr[-2000:]}")
    return r


def sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(MiB), b""):
            h.update(chunk)
    return h.hexdigest()


def write_fsync(path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()  # Python buffers up to st_blksize
        os.fsync(f.fileno())


def assert_errno(exc_info, code):
    assert exc_info.value.errno == code, \
        f"expected {errno.errorcode[code]}, got {errno.errorcode.get(exc_info.value.errno)}: {exc_info.value}"


# ------------------------------------------------------------------ the tree


def test_root_shows_exactly_the_four_areas_and_the_seed_tree(mounted):
    assert mount_fstype(mounted.mnt) == "fuse.tempfs"
    assert sorted(os.listdir(mounted.mnt)) == AREAS
    assert sorted(sh("ls", mounted.mnt).stdout.split()) == AREAS
    for rel, _leaf in SCHEMA_DIRS:
        st = os.lstat(mounted.path(rel))
        assert stat.S_ISDIR(st.st_mode), rel
        assert stat.S_IMODE(st.st_mode) == 0o1777, f"{rel}: mode {oct(st.st_mode)}"
        assert st.st_uid == os.getuid(), rel
    # no undeclared folder anywhere in the schema part of the tree
    for rel, leaf in SCHEMA_DIRS:
        if not leaf:
            children = sorted(os.listdir(mounted.path(rel)))
            declared = sorted(p.split("/")[-1] for p, _ in SCHEMA_DIRS
                              if p.rsplit("/", 1)[0] == rel and p != rel)
            assert children == declared, rel
        else:
            assert os.listdir(mounted.path(rel)) == [], rel


# ------------------------------------------------------------------ big and many


@pytest.mark.timeout(180)
def test_cp_and_cmp_of_a_50mb_file(mounted, tmp_path):
    src = tmp_path / "big.bin"
    src.write_bytes(os.urandom(50 * MiB))
    dst = mounted.path(UPLOADS, "big.bin")
    sh("cp", src, dst)
    sh("cmp", src, dst)
    assert os.stat(dst).st_size == 50 * MiB
    back = tmp_path / "back.bin"
    sh("cp", dst, back)
    sh("cmp", src, back)
    # and a copy inside the mount, into another area
    dst2 = mounted.path("cache/data/big-copy.bin")
    sh("cp", dst, dst2)
    sh("cmp", src, dst2)


def test_the_daemon_lets_the_kernel_read_ahead_512k_and_reads_stay_whole(mounted, tmp_path):
    from tempfs.daemon import READ_AHEAD_KIB
    from tempfs.mounts import BDI_FOLDER, find_mount
    setting = BDI_FOLDER / find_mount(mounted.mnt).device / "read_ahead_kb"
    if not os.access(setting, os.W_OK):  # not root, or a read-only /sys (a container)
        pytest.skip("this process may not set a mount's readahead, so neither may the daemon")
    deadline = time.monotonic() + 10
    while setting.read_text().strip() != str(READ_AHEAD_KIB) and time.monotonic() < deadline:
        time.sleep(0.1)  # set once the mount answers
    assert setting.read_text().strip() == str(READ_AHEAD_KIB)
    src = tmp_path / "frames.bin"
    src.write_bytes(os.urandom(3 * MiB + 12345))  # larger requests, a short last block
    sh("cp", src, mounted.path(UPLOADS, "frames.bin"))
    with open(mounted.path(UPLOADS, "frames.bin"), "rb") as f:  # the next reads come from the daemon
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    sh("cmp", src, mounted.path(UPLOADS, "frames.bin"))


@pytest.mark.timeout(180)
def test_tar_create_and_extract_1000_small_files(mounted, tmp_path):
    src = tmp_path / "src"
    for d in range(20):
        sub = src / f"dir{d:02d}" / "inner"
        sub.mkdir(parents=True)
        for i in range(50):
            (sub / f"file{i:03d}.txt").write_bytes(f"{d}/{i}\n".encode() * (i + 1) + os.urandom(i * 7))
    work = mounted.path("processing/common/conversions")
    tarball = work / "tree.tar"
    sh("tar", "-C", src, "-cf", tarball, ".")
    out = work / "extracted"
    out.mkdir()
    sh("tar", "-C", out, "-xf", tarball)
    sh("diff", "-r", src, out)
    # and tar reading the tree from inside the mount
    tarball2 = tmp_path / "again.tar"
    sh("tar", "-C", out, "-cf", tarball2, ".")
    out2 = tmp_path / "out2"
    out2.mkdir()
    sh("tar", "-C", out2, "-xf", tarball2)
    sh("diff", "-r", src, out2)
    assert sum(len(files) for _, _, files in os.walk(out)) == 1000


@pytest.mark.timeout(180)
def test_10000_files_in_one_folder(mounted):
    folder = mounted.path("processing/face_recognition/frames/many")
    folder.mkdir()
    names = {f"frame_{i:05d}.jpg" for i in range(10_000)}
    for n in names:
        fd = os.open(folder / n, os.O_CREAT | os.O_WRONLY, 0o644)
        os.close(fd)
    assert set(os.listdir(folder)) == names
    assert len(os.listdir(folder)) == 10_000  # no duplicates
    r = subprocess.run(f"ls '{folder}' | wc -l", shell=True, capture_output=True, text=True, check=True)
    assert int(r.stdout.strip()) == 10_000
    assert len(list(os.scandir(folder))) == 10_000


# ------------------------------------------------------------------ writing in place


def test_dd_seek_and_conv_notrunc(mounted, tmp_path):
    f = mounted.path(UPLOADS, "dd.bin")
    base = bytes(range(256)) * 4096  # 1 MiB
    f.write_bytes(base)
    patch = tmp_path / "patch.bin"
    patch.write_bytes(b"\xAB" * 4096 * 3)
    # overwrite 3 blocks of 4 KiB at block 10, keep the rest
    sh("dd", f"if={patch}", f"of={f}", "bs=4096", "seek=10", "conv=notrunc", "status=none")
    expected = bytearray(base)
    expected[40960:40960 + 12288] = b"\xAB" * 12288
    assert f.read_bytes() == bytes(expected)
    # a write crossing a 128 KiB boundary, at an odd offset
    patch.write_bytes(b"\xCD" * 1000)
    sh("dd", f"if={patch}", f"of={f}", "bs=1", "seek=131000", "conv=notrunc", "status=none")
    expected[131000:132000] = b"\xCD" * 1000
    assert f.read_bytes() == bytes(expected)
    # seek past the end: a hole of zeros, then the data
    sh("dd", f"if={patch}", f"of={f}", "bs=1000", "seek=3000", "conv=notrunc", "status=none")
    expected.extend(b"\0" * (3_000_000 - len(expected)))
    expected.extend(b"\xCD" * 1000)
    data = f.read_bytes()
    assert len(data) == 3_001_000
    assert data == bytes(expected)
    # without notrunc dd truncates at the end of what it wrote
    sh("dd", f"if={patch}", f"of={f}", "bs=1000", "seek=1", "status=none")
    assert f.read_bytes() == bytes(expected[:1000]) + b"\xCD" * 1000


def test_truncate_up_and_down_holes_read_as_zeros(mounted):
    f = mounted.path(UPLOADS, "sparse.bin")
    f.write_bytes(b"A" * 300_000)  # spans three 128 KiB blocks
    sh("truncate", "-s", "10M", f)
    assert os.stat(f).st_size == 10 * MiB
    data = f.read_bytes()
    assert data[:300_000] == b"A" * 300_000
    assert data[300_000:] == b"\0" * (10 * MiB - 300_000)
    sh("truncate", "-s", "50", f)
    assert f.read_bytes() == b"A" * 50
    # growing again must not bring back the old bytes
    sh("truncate", "-s", "300000", f)
    assert f.read_bytes() == b"A" * 50 + b"\0" * (300_000 - 50)
    sh("truncate", "-s", "0", f)
    assert f.read_bytes() == b""
    # a sparse file written only at its end
    g = mounted.path(UPLOADS, "tail.bin")
    with open(g, "wb") as fh:
        fh.seek(5 * MiB)
        fh.write(b"end")
    assert g.read_bytes() == b"\0" * (5 * MiB) + b"end"
    # reading a hole in the middle of a file
    with open(g, "rb") as fh:
        fh.seek(2 * MiB + 17)
        assert fh.read(100_000) == b"\0" * 100_000
    # offsets beyond 4 GiB (a sparse file: nothing but the last block is stored)
    far = mounted.path(UPLOADS, "far.bin")
    with open(far, "wb") as fh:
        fh.seek(5 * 1024 * MiB + 3)
        fh.write(b"far away")
    assert os.stat(far).st_size == 5 * 1024 * MiB + 11
    with open(far, "rb") as fh:
        fh.seek(5 * 1024 * MiB - 5)
        assert fh.read(100) == b"\0" * 8 + b"far away"
        fh.seek(4 * 1024 * MiB + 1)
        assert fh.read(10) == b"\0" * 10
    sh("truncate", "-s", "1K", far)
    assert far.read_bytes() == b"\0" * 1024


def test_overwrite_with_o_trunc(mounted):
    """`>` in a shell, open(..., "w") in Python: O_TRUNC empties an existing file."""
    f = mounted.path("processing/common/downloads/overwrite.txt")
    sh("sh", "-c", f"printf 1234567890 > '{f}'; printf ab > '{f}'")
    assert f.read_bytes() == b"ab"
    f.write_bytes(b"x" * 300_000)
    with open(f, "wb") as fh:
        fh.write(b"short")
    assert f.read_bytes() == b"short"
    fd = os.open(f, os.O_WRONLY | os.O_TRUNC)
    os.close(fd)
    assert os.stat(f).st_size == 0 and f.read_bytes() == b""
    mounted.remount()
    assert f.read_bytes() == b""


def test_posix_semantics_and_errors(mounted):
    d = mounted.path("processing/common/downloads")
    f = d / "f.txt"
    f.write_bytes(b"1234567890")
    # O_EXCL
    with pytest.raises(OSError) as ei:
        os.open(f, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    assert_errno(ei, errno.EEXIST)
    # ftruncate through an open descriptor, then write past the end
    with open(f, "r+b") as fh:
        fh.truncate(1)
        fh.seek(5)
        fh.write(b"z")
    assert f.read_bytes() == b"1\0\0\0\0z"
    # directories
    (d / "dir" / "sub").mkdir(parents=True)
    (d / "empty").mkdir()
    with pytest.raises(OSError) as ei:
        os.rmdir(d / "dir")
    assert_errno(ei, errno.ENOTEMPTY)
    with pytest.raises(OSError) as ei:
        os.unlink(d / "dir")
    assert ei.value.errno in (errno.EISDIR, errno.EPERM)
    with pytest.raises(OSError) as ei:
        open(d / "dir", "wb")
    assert_errno(ei, errno.EISDIR)
    with pytest.raises(OSError) as ei:
        os.rename(f, d / "dir")
    assert_errno(ei, errno.EISDIR)
    with pytest.raises(OSError) as ei:
        os.rename(d / "empty", d / "dir")
    assert ei.value.errno in (errno.ENOTEMPTY, errno.EEXIST)
    with pytest.raises(OSError) as ei:
        os.rename(d / "dir", d / "dir" / "sub" / "inside")
    assert_errno(ei, errno.EINVAL)
    with pytest.raises(OSError) as ei:
        os.mkdir(d / "dir")
    assert_errno(ei, errno.EEXIST)
    with pytest.raises(OSError) as ei:
        os.stat(d / "nope")
    assert_errno(ei, errno.ENOENT)
    with pytest.raises(OSError) as ei:
        os.listdir(f)
    assert_errno(ei, errno.ENOTDIR)
    os.rename(d / "empty", d / "dir" / "sub" / "moved")  # a folder into a deeper one
    assert (d / "dir" / "sub" / "moved").is_dir()
    (d / "empty2").mkdir()
    os.rename(d / "empty2", d / "dir" / "sub" / "moved")  # over an empty folder
    assert not (d / "empty2").exists()
    # an unlinked file stays usable through its open descriptor
    g = d / "g.bin"
    fh = open(g, "w+b")
    try:
        fh.write(b"still here")
        fh.flush()
        os.unlink(g)
        assert not g.exists()
        fh.write(b" and growing")
        fh.flush()
        fh.seek(0)
        assert fh.read() == b"still here and growing"
        assert os.fstat(fh.fileno()).st_nlink == 0
    finally:
        fh.close()
    assert "g.bin" not in os.listdir(d)


def test_python_tempfile(mounted):
    import tempfile
    leaf = mounted.path("processing/common/conversions")
    with tempfile.NamedTemporaryFile(dir=leaf, suffix=".tmp") as t:
        t.write(b"x" * 10_000)
        t.flush()
        assert os.path.getsize(t.name) == 10_000
    assert not os.path.exists(t.name)
    fd, name = tempfile.mkstemp(dir=leaf)
    os.write(fd, b"mkstemp")
    os.close(fd)
    assert stat.S_IMODE(os.stat(name).st_mode) == 0o600
    os.unlink(name)
    with tempfile.TemporaryDirectory(dir=leaf) as td:
        for i in range(20):
            Path(td, f"f{i}").write_text(str(i))
        Path(td, "sub").mkdir()
        Path(td, "sub", "x").write_text("x")
    assert not os.path.exists(td)
    with tempfile.SpooledTemporaryFile(max_size=10, dir=leaf) as sp:
        sp.write(b"spilled to disk beyond ten bytes")
        sp.seek(0)
        assert sp.read() == b"spilled to disk beyond ten bytes"
    assert os.listdir(leaf) == []


def test_cp_a_preserves_tree_modes_times_links_xattrs(mounted, tmp_path):
    src = tmp_path / "tree"
    (src / "a" / "b").mkdir(parents=True)
    (src / "a" / "b" / "file.txt").write_text("content")
    (src / "exec.sh").write_text("#!/bin/sh\n")
    os.chmod(src / "exec.sh", 0o755)
    os.symlink("a/b/file.txt", src / "link")
    os.link(src / "exec.sh", src / "exec-hardlink.sh")
    os.setxattr(src / "a" / "b" / "file.txt", "user.tag", b"kept")
    os.utime(src / "a" / "b" / "file.txt", ns=(1_000_000_000, 1_600_000_000_123_456_789))
    dst = mounted.path("cache/data/tree")
    sh("cp", "-a", src, dst)
    sh("diff", "-r", "--no-dereference", src, dst)
    for rel in ("a/b/file.txt", "exec.sh", "a", "link"):
        s1, s2 = os.lstat(src / rel), os.lstat(dst / rel)
        assert (s1.st_mode, s1.st_uid, s1.st_gid) == (s2.st_mode, s2.st_uid, s2.st_gid), rel
        if not stat.S_ISDIR(s1.st_mode):
            assert s1.st_mtime_ns == s2.st_mtime_ns, rel
    assert os.getxattr(dst / "a" / "b" / "file.txt", "user.tag") == b"kept"
    assert os.readlink(dst / "link") == "a/b/file.txt"
    assert os.stat(dst / "exec.sh").st_ino == os.stat(dst / "exec-hardlink.sh").st_ino
    # and back out again
    back = tmp_path / "back"
    sh("cp", "-a", dst, back)
    sh("diff", "-r", "--no-dereference", src, back)


@pytest.mark.timeout(180)
def test_parallel_writers_and_readers(mounted, tmp_path):
    sources = []
    for i in range(6):
        p = tmp_path / f"src{i}.bin"
        p.write_bytes(os.urandom(6 * MiB + i * 4097))
        sources.append(p)
    leaf = mounted.path("processing/defect_detection/frames")
    procs = [subprocess.Popen(["cp", p, leaf / p.name]) for p in sources]
    procs += [subprocess.Popen(["dd", f"if={p}", f"of={leaf / ('dd-' + p.name)}", "bs=64k",
                                "status=none"]) for p in sources[:3]]
    assert [p.wait(timeout=120) for p in procs] == [0] * len(procs)
    readers = [subprocess.Popen(["cmp", p, leaf / p.name]) for p in sources for _ in range(2)]
    readers += [subprocess.Popen(["cmp", p, leaf / ("dd-" + p.name)]) for p in sources[:3]]
    assert [p.wait(timeout=120) for p in readers] == [0] * len(readers)


def test_mv_over_an_existing_file(mounted):
    d = mounted.path("processing/common/downloads")
    a, b = d / "a.txt", d / "b.txt"
    a.write_bytes(b"new content\n")
    b.write_bytes(b"old content that is longer\n")
    ino_a = os.stat(a).st_ino
    with open(b, "rb") as held:  # an open reader of the replaced file keeps its data
        sh("mv", a, b)
        assert held.read() == b"old content that is longer\n"
    assert not a.exists()
    assert b.read_bytes() == b"new content\n"
    assert os.stat(b).st_ino == ino_a
    assert sorted(os.listdir(d)) == ["b.txt"]
    # across folders (rename between two leaves)
    sh("mv", b, mounted.path("cache/images/b.txt"))
    assert mounted.path("cache/images/b.txt").read_bytes() == b"new content\n"
    # a directory rename inside a leaf
    (d / "x" / "y").mkdir(parents=True)
    (d / "x" / "y" / "f").write_text("f")
    sh("mv", d / "x", d / "z")
    assert (d / "z" / "y" / "f").read_text() == "f"


def test_append_with_shell_and_o_append(mounted):
    f = mounted.path("sessions/user_sessions/log.txt")
    sh("sh", "-c", f"echo one >> '{f}'; echo two >> '{f}'")
    assert f.read_bytes() == b"one\ntwo\n"
    fd = os.open(f, os.O_WRONLY | os.O_APPEND)
    try:
        os.lseek(fd, 0, os.SEEK_SET)  # O_APPEND ignores the position
        os.write(fd, b"three\n")
        os.write(fd, b"four\n")
    finally:
        os.close(fd)
    assert f.read_bytes() == b"one\ntwo\nthree\nfour\n"
    # two appenders interleaving whole lines
    fd1 = os.open(f, os.O_WRONLY | os.O_APPEND)
    fd2 = os.open(f, os.O_WRONLY | os.O_APPEND)
    try:
        for i in range(100):
            os.write(fd1 if i % 2 else fd2, f"line {i}\n".encode())
    finally:
        os.close(fd1)
        os.close(fd2)
    lines = f.read_text().splitlines()
    assert lines[:4] == ["one", "two", "three", "four"]
    assert lines[4:] == [f"line {i}" for i in range(100)]


# ------------------------------------------------------------------ sqlite and mmap


@pytest.mark.timeout(180)
@pytest.mark.parametrize("journal", ["delete", "wal"])
def test_sqlite3_database(mounted, journal):
    db = mounted.path(f"processing/common/conversions/test-{journal}.db")
    rows = 5000
    script = [f"PRAGMA journal_mode={journal};",
              "CREATE TABLE t (id INTEGER PRIMARY KEY, name TEXT, payload BLOB);",
              "CREATE INDEX t_name ON t(name);"]
    # a few hundred small transactions, then a big one
    for i in range(300):
        script.append(f"INSERT INTO t (name, payload) VALUES ('row {i}', randomblob({i % 500}));")
    script.append("BEGIN;")
    script.append(f"WITH RECURSIVE c(x) AS (SELECT 300 UNION ALL SELECT x+1 FROM c WHERE x < {rows - 1}) "
                  "INSERT INTO t (name, payload) SELECT 'row ' || x, randomblob(x % 1000) FROM c;")
    script.append("COMMIT;")
    script.append("UPDATE t SET name = name || ' updated' WHERE id % 7 = 0;")
    script.append("DELETE FROM t WHERE id % 11 = 0;")
    sh("sqlite3", db, input="\n".join(script) + "\n")
    r = sh("sqlite3", db, "PRAGMA integrity_check; SELECT count(*) FROM t;")
    expected_count = rows - len([i for i in range(1, rows + 1) if i % 11 == 0])
    assert r.stdout.split() == ["ok", str(expected_count)]
    mounted.remount()
    r = sh("sqlite3", db, "PRAGMA integrity_check; SELECT count(*) FROM t; "
                          "SELECT count(*) FROM t WHERE name LIKE '% updated';")
    assert r.stdout.split() == ["ok", str(expected_count),
                                str(len([i for i in range(1, rows + 1) if i % 7 == 0 and i % 11]))]


def test_python_mmap_write_and_read_back(mounted):
    f = mounted.path("cache/data/mapped.bin")
    size = 3 * MiB + 123
    with open(f, "wb") as fh:
        fh.truncate(size)
    pattern = {}
    with open(f, "r+b") as fh:
        with mmap.mmap(fh.fileno(), size) as mm:
            for off in (0, 4095, 131071, 131072, 2 * MiB + 5, size - 10):
                chunk = hashlib.sha256(str(off).encode()).digest()[:10]
                mm[off:off + len(chunk)] = chunk
                pattern[off] = chunk
            mm.flush()
    expected = bytearray(size)
    for off, chunk in pattern.items():
        expected[off:off + len(chunk)] = chunk
    assert f.read_bytes() == bytes(expected)
    with open(f, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        assert mm[:] == bytes(expected)
    mounted.remount()
    assert f.read_bytes() == bytes(expected)
    with open(f, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        assert mm[:] == bytes(expected)


# ------------------------------------------------------------------ links, modes, xattrs


def test_symlinks_and_readlink(mounted):
    d = mounted.path("cache/models")
    (d / "target.txt").write_text("hello")
    sh("ln", "-s", "target.txt", d / "link")
    assert sh("readlink", d / "link").stdout == "target.txt\n"
    assert os.readlink(d / "link") == "target.txt"
    assert stat.S_ISLNK(os.lstat(d / "link").st_mode)
    assert (d / "link").read_text() == "hello"
    sh("ln", "-s", "/nonexistent/dangling", d / "dangling")
    assert os.readlink(d / "dangling") == "/nonexistent/dangling"
    assert not (d / "dangling").exists()
    long_target = "x/" * 1000 + "end"
    os.symlink(long_target, d / "long")
    assert os.readlink(d / "long") == long_target
    (d / "sub").mkdir()
    os.symlink("sub", d / "dirlink")
    (d / "dirlink" / "in.txt").write_text("via link")
    assert (d / "sub" / "in.txt").read_text() == "via link"


def test_hard_links_and_link_counts(mounted):
    d = mounted.path("processing/defect_detection/detections")
    a = d / "a.bin"
    a.write_bytes(b"shared")
    nlink = lambda p: int(sh("stat", "-c", "%h", p).stdout)
    assert nlink(a) == 1
    sh("ln", a, d / "b.bin")
    assert nlink(a) == 2 and nlink(d / "b.bin") == 2
    other = mounted.path("processing/defect_detection/results/c.bin")
    sh("ln", a, other)  # into another leaf
    assert nlink(a) == 3 and nlink(other) == 3
    assert os.stat(a).st_ino == os.stat(other).st_ino == os.stat(d / "b.bin").st_ino
    with open(other, "ab") as fh:
        fh.write(b" and more")
    assert a.read_bytes() == b"shared and more"
    os.unlink(d / "b.bin")
    assert nlink(a) == 2
    os.unlink(a)
    assert nlink(other) == 1
    assert other.read_bytes() == b"shared and more"
    # directories: . and .. counts
    sub = d / "sub"
    sub.mkdir()
    (sub / "s1").mkdir()
    (sub / "s2").mkdir()
    assert os.stat(sub).st_nlink == 4


def test_chmod_chown_touch_visible_in_stat(mounted):
    f = mounted.path("sessions/system_sessions/owned.txt")
    f.write_text("x")
    sh("chmod", "640", f)
    sh("chown", "1234:5678", f)
    sh("touch", "-m", "-d", "2001-02-03 04:05:06.123456789 UTC", f)
    out = sh("stat", "-c", "%a %u %g %Y", f).stdout.split()
    assert out == ["640", "1234", "5678", str(981173106)]
    st = os.stat(f)
    assert st.st_mtime_ns == 981173106_123456789
    sh("touch", "-a", "-d", "1999-12-31 23:59:59 UTC", f)
    assert os.stat(f).st_atime_ns == 946684799_000000000
    sh("chmod", "u+s,g+s,o+t", f)
    assert stat.S_IMODE(os.stat(f).st_mode) == 0o7640
    # a directory below a leaf
    d = mounted.path("sessions/system_sessions/dir")
    d.mkdir()
    sh("chmod", "700", d)
    sh("chown", "42:43", d)
    st = os.stat(d)
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o700, 42, 43)
    # ctime moves on chmod
    before = os.stat(f).st_ctime_ns
    time.sleep(0.01)
    os.chmod(f, 0o600)
    assert os.stat(f).st_ctime_ns > before


def test_setgid_folder_passes_its_group_on(mounted):
    """Ordinary Unix semantics for shared folders: in a set-group-ID folder, new entries
    take the folder's group, and new folders are set-group-ID too."""
    d = mounted.path("processing/common/uploads/shared")
    d.mkdir()
    os.chown(d, 0, 4242)
    os.chmod(d, 0o2775)
    (d / "f").write_text("x")
    (d / "sub").mkdir()
    assert os.stat(d / "f").st_gid == 4242
    st = os.stat(d / "sub")
    assert st.st_gid == 4242
    assert st.st_mode & stat.S_ISGID


def test_extended_attributes(mounted):
    f = mounted.path("cache/videos/clip.mp4")
    f.write_bytes(b"\0" * 100)
    sh("setfattr", "-n", "user.origin", "-v", "camera-7", f)
    r = sh("getfattr", "--only-values", "-n", "user.origin", f)
    assert r.stdout == "camera-7"
    assert os.getxattr(f, "user.origin") == b"camera-7"
    os.setxattr(f, "user.binary", bytes(range(256)))
    assert os.getxattr(f, "user.binary") == bytes(range(256))
    assert {"user.origin", "user.binary"} <= set(os.listxattr(f))
    # a missing attribute is ENODATA, never "Operation not supported"
    r = sh("getfattr", "-n", "user.missing", f, check=False)
    assert r.returncode != 0
    assert "No such attribute" in r.stderr, r.stderr
    with pytest.raises(OSError) as ei:
        os.getxattr(f, "user.missing")
    assert_errno(ei, errno.ENODATA)
    with pytest.raises(OSError) as ei:
        os.removexattr(f, "user.missing")
    assert_errno(ei, errno.ENODATA)
    # create/replace flags
    with pytest.raises(OSError) as ei:
        os.setxattr(f, "user.origin", b"x", os.XATTR_CREATE)
    assert_errno(ei, errno.EEXIST)
    with pytest.raises(OSError) as ei:
        os.setxattr(f, "user.nothere", b"x", os.XATTR_REPLACE)
    assert_errno(ei, errno.ENODATA)
    sh("setfattr", "-x", "user.origin", f)
    assert "user.origin" not in os.listxattr(f)
    # xattrs still work after a miss (the kernel did not switch them off)
    sh("setfattr", "-n", "user.again", "-v", "yes", f)
    assert os.getxattr(f, "user.again") == b"yes"
    # on a folder below a leaf
    d = mounted.path("cache/videos/dir")
    d.mkdir()
    os.setxattr(d, "user.k", b"v")
    assert sh("getfattr", "--only-values", "-n", "user.k", d).stdout == "v"


def test_fsync(mounted):
    f = mounted.path(UPLOADS, "synced.bin")
    data = os.urandom(400_000)
    fd = os.open(f, os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
        os.fdatasync(fd)
    finally:
        os.close(fd)
    assert f.read_bytes() == data
    dfd = os.open(f.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)  # fsync of a directory must work too
    finally:
        os.close(dfd)
    sh("sync", f)


def test_df_and_statfs(mounted):
    r = sh("df", mounted.mnt)
    assert str(mounted.mnt) in r.stdout
    sh("df", "-i", mounted.mnt)
    vfs = os.statvfs(mounted.mnt)
    assert vfs.f_namemax == 255
    assert vfs.f_bsize > 0 and vfs.f_blocks > 0


def test_rm_r_of_a_deep_tree(mounted):
    top = mounted.path("processing/face_recognition/features/deep")
    p = top
    for i in range(50):
        p = p / f"level{i}"
    p.mkdir(parents=True)
    q = top
    for i in range(50):
        q = q / f"level{i}"
        (q / "file.txt").write_text(str(i))
        os.symlink("file.txt", q / "link")
    assert (p / "file.txt").read_text() == "49"
    sh("rm", "-r", top)
    assert not top.exists()
    assert os.listdir(mounted.path("processing/face_recognition/features")) == []


def test_names_spaces_utf8_and_length_limit(mounted):
    d = mounted.path("cache/images")
    names = ["with space.txt", "  leading and trailing  ", "한글 파일.txt", "ünïcödé ✓ 🎞.jpg",
             "a" * 255, ("é" * 127) + "x"]  # the last one is 255 bytes of UTF-8
    for n in names:
        assert len(n.encode()) <= 255
        (d / n).write_text(n)
    assert set(os.listdir(d)) == set(names)
    for n in names:
        assert (d / n).read_text() == n
    assert sh("ls", "-1", d).stdout.count("\n") == len(names)
    for too_long in ["b" * 256, "é" * 128]:
        with pytest.raises(OSError) as ei:
            open(d / too_long, "w")
        assert_errno(ei, errno.ENAMETOOLONG)
        with pytest.raises(OSError) as ei:
            os.mkdir(d / too_long)
        assert_errno(ei, errno.ENAMETOOLONG)
        with pytest.raises(OSError) as ei:
            os.rename(d / "with space.txt", d / too_long)
        assert_errno(ei, errno.ENAMETOOLONG)
    assert set(os.listdir(d)) == set(names)
    os.mkdir(d / ("c" * 255))
    os.symlink("with space.txt", d / ("c" * 255) / ("l" * 255))
    assert os.readlink(d / ("c" * 255) / ("l" * 255)) == "with space.txt"


# ------------------------------------------------------------------ every file type


def _bind_unix_socket(path: Path) -> socket.socket:
    # bind by a relative name: the absolute path may exceed sun_path's 108 bytes
    old = os.getcwd()
    os.chdir(path.parent)
    try:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(path.name)
        s.listen(1)
        return s
    finally:
        os.chdir(old)


def test_every_file_type_below_a_leaf(mounted):
    d = mounted.path("sessions/api_sessions/types")
    d.mkdir()
    (d / "regular").write_bytes(b"r")
    os.mkdir(d / "folder")
    sh("ln", "-s", "regular", d / "symlink")
    sh("ln", d / "regular", d / "hardlink")
    sh("mkfifo", d / "fifo")
    sh("mknod", d / "chardev", "c", "1", "3")
    sh("mknod", d / "blockdev", "b", "7", "0")
    server = _bind_unix_socket(d / "sock")
    try:
        st = {n: os.lstat(d / n) for n in os.listdir(d)}
        assert stat.S_ISREG(st["regular"].st_mode)
        assert stat.S_ISDIR(st["folder"].st_mode)
        assert stat.S_ISLNK(st["symlink"].st_mode)
        assert st["hardlink"].st_ino == st["regular"].st_ino and st["regular"].st_nlink == 2
        assert stat.S_ISFIFO(st["fifo"].st_mode)
        assert stat.S_ISCHR(st["chardev"].st_mode)
        assert (os.major(st["chardev"].st_rdev), os.minor(st["chardev"].st_rdev)) == (1, 3)
        assert stat.S_ISBLK(st["blockdev"].st_mode)
        assert (os.major(st["blockdev"].st_rdev), os.minor(st["blockdev"].st_rdev)) == (7, 0)
        assert stat.S_ISSOCK(st["sock"].st_mode)
        # the socket and the fifo actually work
        old = os.getcwd()
        os.chdir(d)
        try:
            c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            c.settimeout(5)
            c.connect("sock")
        finally:
            os.chdir(old)
        conn, _ = server.accept()
        c.sendall(b"ping")
        assert conn.recv(4) == b"ping"
        conn.close()
        c.close()
        got = []
        reader = threading.Thread(target=lambda: got.append(open(d / "fifo", "rb").read()))
        reader.start()
        with open(d / "fifo", "wb") as w:
            w.write(b"through the fifo")
        reader.join(10)
        assert got == [b"through the fifo"]
        # (device nodes cannot be opened: FUSE mounts are nodev, so open() gives EACCES)
    finally:
        server.close()
    mounted.remount()
    st2 = {n: os.lstat(d / n) for n in os.listdir(d)}
    for n in ("fifo", "chardev", "blockdev", "sock", "symlink", "folder", "regular"):
        assert stat.S_IFMT(st2[n].st_mode) == stat.S_IFMT(st[n].st_mode), n
        assert st2[n].st_rdev == st[n].st_rdev, n
    for n in ("sock", "fifo", "chardev", "blockdev", "symlink", "hardlink", "regular", "folder"):
        sh("rm", "-rf", d / n)
    assert os.listdir(d) == []


def test_other_users_reach_the_mount_under_unix_permissions(make_mount, tmp_path_factory):
    # pytest's tmp is 0700 for root; put this mount where another user can walk to it
    import tempfile
    base = Path(tempfile.mkdtemp(prefix="tempfs-allow-other-", dir="/tmp"))
    os.chmod(base, 0o755)
    m = None
    try:
        m = make_mount(base=base / "m")
        os.chmod(base / "m", 0o755)
        nobody = ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups"]
        f = m.path(UPLOADS, "by-nobody.txt")
        sh(*nobody, "sh", "-c", f"echo hi > '{f}'")
        st = os.stat(f)
        assert (st.st_uid, st.st_gid) == (65534, 65534)
        assert f.read_text() == "hi\n"
        secret = m.path(UPLOADS, "root-only.txt")
        secret.write_text("secret")
        os.chmod(secret, 0o600)
        r = sh(*nobody, "cat", secret, check=False)
        assert r.returncode != 0 and "Permission denied" in r.stderr, r.stderr
        # sticky 1777 folder: nobody cannot delete root's file
        r = sh(*nobody, "rm", "-f", secret, check=False)
        assert r.returncode != 0 and secret.exists()
        # and nobody cannot create at the root either
        r = sh(*nobody, "touch", m.path("nobody-root.txt"), check=False)
        assert r.returncode != 0
    finally:
        if m is not None:
            m.stop()
        shutil.rmtree(base, ignore_errors=True)


# ------------------------------------------------------------------ layout refusals


def _refused(cmd, cwd=None) -> tuple[int, str]:
    """Run a program expected to be refused with EPERM; returns (pid, stderr)."""
    p = subprocess.Popen([os.fspath(a) for a in cmd], cwd=cwd, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env={**os.environ, "LC_ALL": "C"})
    out, err = p.communicate(timeout=30)
    assert p.returncode != 0, f"{cmd} succeeded but should be refused"
    assert "Operation not permitted" in err, f"{cmd}: {err}"
    return p.pid, err


def test_layout_refusals_at_the_root(mounted):
    root = mounted.mnt
    ok_file = mounted.path(UPLOADS, "ok.txt")
    ok_file.write_text("ok")
    cases = [
        ("touch", root / "refused_touch_marker.txt"),
        ("mkdir", root / "refused_mkdir_marker"),
        ("ln", "-s", "processing", root / "refused_symlink_marker"),
        ("ln", ok_file, root / "refused_hardlink_marker"),
        ("mkfifo", root / "refused_fifo_marker"),
        ("mknod", root / "refused_mknod_marker", "c", "1", "3"),
        ("mv", ok_file, root / "refused_mv_marker.txt"),
    ]
    pids = {}
    for cmd in cases:
        pid, _ = _refused(cmd)
        pids[os.path.basename(os.fspath(cmd[-1] if cmd[0] != "mknod" else cmd[1]))] = (pid, cmd[0])
    with pytest.raises(OSError) as ei:
        open(root / "python_open_marker.txt", "w")
    assert_errno(ei, errno.EPERM)
    with pytest.raises(OSError) as ei:
        os.rename(ok_file, root / "python_rename_marker.txt")
    assert_errno(ei, errno.EPERM)
    assert sorted(os.listdir(root)) == AREAS
    assert ok_file.read_text() == "ok"
    # the daemon log names the path and the requesting pid or command
    for name, (pid, prog) in pids.items():
        text = mounted.wait_log(lambda t: name in t)
        lines = [line for line in text.splitlines() if name in line]
        assert lines, f"no log line names {name}:\n{text[-3000:]}"
        assert any(str(pid) in line and prog in line for line in lines), \
            f"log line for {name} does not name pid {pid} and command {prog}: {lines}"


def test_layout_refusals_in_the_schema(mounted):
    # folders with declared children accept files but no new folders
    for rel in BRANCH_DIRS:
        f = mounted.path(rel, "a_file.txt")
        f.write_text("allowed")
        assert f.read_text() == "allowed"
        _refused(("mkdir", mounted.path(rel, "undeclared_dir_marker")))
        os.unlink(f)
    # leaf folders accept any subtree
    for rel in LEAF_DIRS:
        (mounted.path(rel, "a", "b", "c")).mkdir(parents=True)
        (mounted.path(rel, "a", "b", "c", "f")).write_text("x")
        sh("rm", "-r", mounted.path(rel, "a"))
    # schema folders cannot be removed, renamed, chmod'ed or chown'ed
    for rel in ["processing", "cache/models", "processing/face_recognition", "sessions/api_sessions"]:
        p = mounted.path(rel)
        _refused(("rmdir", p))
        _refused(("mv", p, p.parent / (p.name + "_renamed")))
        _refused(("chmod", "700", p))
        _refused(("chown", "1:1", p))
        with pytest.raises(OSError) as ei:
            os.rmdir(p)
        assert_errno(ei, errno.EPERM)
        st = os.stat(p)
        assert stat.S_IMODE(st.st_mode) == 0o1777 and st.st_uid == os.getuid()
    # a folder built below a leaf cannot be moved into a folder with declared children
    built = mounted.path("processing/common/uploads/built")
    built.mkdir()
    with pytest.raises(OSError) as ei:
        os.rename(built, mounted.path("processing/common/built"))
    assert_errno(ei, errno.EPERM)
    with pytest.raises(OSError) as ei:
        os.rename(built, mounted.mnt / "built")
    assert_errno(ei, errno.EPERM)
    assert built.is_dir()
    # files (and other non-folders) are fine in a folder with declared children
    os.symlink("common", mounted.path("processing/link_ok"))
    os.mkfifo(mounted.path("processing/fifo_ok"))
    os.unlink(mounted.path("processing/link_ok"))
    os.unlink(mounted.path("processing/fifo_ok"))
    # the root itself cannot be re-moded either
    _refused(("chmod", "700", mounted.mnt))
    # rm -r of an area removes nothing of the schema
    sh("rm", "-rf", mounted.path("cache"), check=False)
    for rel, _ in SCHEMA_DIRS:
        assert mounted.path(rel).is_dir(), rel
    # a schema folder cannot be replaced by renaming something over it
    src = mounted.path("cache/models/empty_dir")
    src.mkdir()
    with pytest.raises(OSError) as ei:
        os.rename(src, mounted.path("cache/images"))
    assert_errno(ei, errno.EPERM)
    assert mounted.path("cache/images").is_dir() and src.is_dir()
    text = mounted.wait_log(lambda t: "undeclared_dir_marker" in t)
    assert "undeclared_dir_marker" in text


# ------------------------------------------------------------------ persistence


def _xattrs(p) -> dict:
    """Every extended attribute listxattr names, read with getxattr: a name that is
    listed must be readable (tools such as getfattr -d, tar --xattrs, rsync -X rely on it)."""
    values = {}
    for k in sorted(os.listxattr(p, follow_symlinks=False)):
        try:
            values[k] = os.getxattr(p, k, follow_symlinks=False)
        except OSError as e:
            kind = stat.filemode(os.lstat(p).st_mode)[0]
            raise AssertionError(f"listxattr names {k!r} on {p} (type {kind!r}) but getxattr "
                                 f"fails: {e.strerror}") from None
    return values


def _snapshot(root: Path) -> dict:
    snap = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            entry = {
                "mode": st.st_mode, "uid": st.st_uid, "gid": st.st_gid, "nlink": st.st_nlink,
                "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns, "rdev": st.st_rdev,
                "size": st.st_size if not stat.S_ISDIR(st.st_mode) else None,
                # the stored size changes once written data is stored: not a change by the remount
                "xattrs": {k: v for k, v in _xattrs(p).items() if k != "user.tempfs.stored_size"},
            }
            if stat.S_ISLNK(st.st_mode):
                entry["target"] = os.readlink(p)
            elif stat.S_ISREG(st.st_mode):
                entry["sha256"] = sha256_file(p)
            snap[os.path.relpath(p, root)] = entry
    return snap


def test_remount_keeps_everything(mounted):
    base = mounted.path("processing/common/uploads/keep")
    base.mkdir()
    (base / "dir" / "sub").mkdir(parents=True)
    (base / "dir" / "sub" / "small.txt").write_text("small")
    (base / "big.bin").write_bytes(os.urandom(700_000))
    (base / "empty").write_bytes(b"")
    with open(base / "sparse", "wb") as fh:
        fh.seek(1_000_000)
        fh.write(b"x")
    os.symlink("dir/sub/small.txt", base / "link")
    os.link(base / "big.bin", base / "dir" / "big-hardlink.bin")
    os.mkfifo(base / "fifo")
    os.mknod(base / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    os.chmod(base / "dir" / "sub" / "small.txt", 0o604)
    os.chmod(base / "dir", 0o750)
    os.chown(base / "big.bin", 1001, 2002)
    os.chown(base / "link", 3003, 4004, follow_symlinks=False)
    os.setxattr(base / "big.bin", "user.a", b"1")
    os.setxattr(base / "dir", "user.dir", b"folder attr")
    os.utime(base / "empty", ns=(1_000_000_123, 1_234_567_890_987_654_321))
    os.utime(base / "dir" / "sub", ns=(5, 1_111_111_111_000_000_001))
    os.utime(base / "link", ns=(7, 1_500_000_000_000_000_042), follow_symlinks=False)
    before = _snapshot(mounted.mnt)
    assert len(before) > len(SCHEMA_DIRS)
    mounted.remount()
    after = _snapshot(mounted.mnt)
    assert after.keys() == before.keys()
    diffs = {k: (before[k], after[k]) for k in before if before[k] != after[k]}
    assert not diffs, f"changed by remount: {diffs}"
    assert os.stat(base / "big.bin").st_ino == os.stat(base / "dir" / "big-hardlink.bin").st_ino


# ------------------------------------------------------------------ what the store holds


@pytest.mark.timeout(180)
def test_store_holds_no_plaintext(mounted):
    markers = [b"TEMPFS-PLAINTEXT-MARKER-compressible-3f9a1c",
               b"TEMPFS-PLAINTEXT-MARKER-random-b72e05",
               b"TEMPFS-PLAINTEXT-MARKER-small-5d11"]
    d = mounted.path("sessions/user_sessions")
    write_fsync(d / "compressible.txt", markers[0] * 60_000)  # ~2.6 MB, compresses well
    padded = bytearray()
    for _ in range(300):
        padded += os.urandom(4000) + markers[1]
    write_fsync(d / "random.bin", bytes(padded))
    write_fsync(d / "small.json", b'{"token": "' + markers[2] + b'"}')
    # overwrite in place, then read back, so dirty blocks go through every path
    with open(d / "random.bin", "r+b") as fh:
        fh.seek(100_000)
        fh.write(markers[1] * 10)
        fh.flush()
        os.fsync(fh.fileno())
    assert (d / "small.json").read_bytes().count(markers[2]) == 1
    assert mounted.stop(), "unmount was not clean"
    files = [p for p in mounted.store.rglob("*") if p.is_file()]
    assert any(p.name == "meta.sqlite" for p in files)
    assert any("packs" in p.parts for p in files)
    checked = 0
    for p in files:
        data = p.read_bytes()
        checked += len(data)
        for m in markers:
            # also look for pieces of the marker: lz4 alone would leave literals visible
            for needle in (m, m[:20], m[-16:]):
                assert needle not in data, f"plaintext {needle!r} found in {p}"
    assert checked > 0


@pytest.mark.timeout(180)
def test_dedup_same_20mb_in_five_files(mounted, tmp_path):
    src = tmp_path / "20mb.bin"
    src.write_bytes(os.urandom(20 * MiB))
    targets = [mounted.path(rel, "same.bin") for rel in
               ("processing/common/uploads", "processing/common/downloads",
                "processing/face_recognition/frames", "processing/defect_detection/frames",
                "processing/common/conversions")]
    for t in targets:
        sh("cp", src, t)
        fd = os.open(t, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
    for t in targets:
        assert sha256_file(t) == sha256_file(src)
    status = mounted.status()
    proc = status["areas"]["processing"]
    assert proc["files"] == 5
    assert proc["logical_bytes"] == 5 * 20 * MiB
    total = status["total"]
    assert total["logical_bytes"] >= 5 * 20 * MiB
    assert 19 * MiB <= total["stored_bytes"] <= 26 * MiB, total
    assert mounted.stop()
    assert sum(p.stat().st_size for p in (mounted.store / "packs").iterdir()) == total["pack_bytes"]
    du = int(sh("du", "-sb", mounted.store / "packs").stdout.split()[0])
    assert du < 30 * MiB, f"packs take {du} bytes"
    assert du >= 19 * MiB, f"packs take only {du} bytes for 20 MB of random data?"


def test_compressible_data_is_stored_smaller(mounted):
    text = b"".join(b"frame %08d: status=ok confidence=0.99 box=(10,20,30,40)\n" % i
                    for i in range(200_000))  # ~11 MB of log-like text
    write_fsync(mounted.path("cache/data/log.txt"), text)
    noise = os.urandom(2 * MiB)
    write_fsync(mounted.path("cleanup/manual/noise.bin"), noise)
    status = mounted.status()
    cache = status["areas"]["cache"]
    assert cache["files"] == 1
    assert cache["logical_bytes"] == len(text)
    assert 0 < cache["stored_bytes"] < len(text) // 2, cache
    cleanup = status["areas"]["cleanup"]
    assert cleanup["logical_bytes"] == len(noise)
    # incompressible data is stored raw: at most a small per-object overhead
    assert len(noise) <= cleanup["stored_bytes"] <= len(noise) * 1.05, cleanup
    for key in ("files", "logical_bytes", "stored_bytes"):
        assert status["total"][key] >= max(area[key] for area in status["areas"].values())

