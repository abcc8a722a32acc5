#!/usr/bin/env python3
"""A pyfuse3 filesystem that keeps everything in dicts and does no other work: the ceiling of
any filesystem served by pyfuse3's request loop on this machine (bench.py's `pymem` peer).

    memfs.py MOUNTPOINT      (in the foreground; unmount with fusermount3 -u)

It answers like tempfs where that changes which requests the kernel sends: the same attribute
and entry timeouts, `flush` refused once with ENOSYS, `getxattr` answered (no attribute), and
the kernel's page cache kept across opens; it waits for requests as tempfs does (tempfs's
request_wait, with its default spin). Nothing is encrypted, stored or counted.
"""
from __future__ import annotations

import errno
import os
import stat
import sys
import time

import pyfuse3
import trio

from tempfs.config import DEFAULT_REQUEST_SPIN
from tempfs.request_wait import RequestWait, installed

TIMEOUT = 300.0  # tempfs's KERNEL_CACHE_SECONDS


class Node:
    __slots__ = ("ino", "mode", "uid", "gid", "nlink", "times", "data", "children", "target")

    def __init__(self, ino: int, mode: int, uid: int, gid: int) -> None:
        self.ino, self.mode, self.uid, self.gid = ino, mode, uid, gid
        self.nlink = 2 if stat.S_ISDIR(mode) else 1
        self.times = [time.time_ns()] * 3  # atime, mtime, ctime
        self.data = bytearray()
        self.children: dict[bytes, int] = {}
        self.target = b""


class MemFS(pyfuse3.Operations):
    supports_dot_lookup = False

    def __init__(self) -> None:
        super().__init__()
        self.nodes: dict[int, Node] = {}
        self.next_ino = pyfuse3.ROOT_INODE
        self._new(stat.S_IFDIR | 0o755, 0, 0)

    def _new(self, mode: int, uid: int, gid: int) -> Node:
        node = Node(self.next_ino, mode, uid, gid)
        self.nodes[node.ino] = node
        self.next_ino += 1
        return node

    def _node(self, ino: int) -> Node:
        try:
            return self.nodes[ino]
        except KeyError:
            raise pyfuse3.FUSEError(errno.ENOENT) from None

    def _attrs(self, node: Node) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino, a.st_mode, a.st_nlink, a.st_uid, a.st_gid = node.ino, node.mode, node.nlink, node.uid, node.gid
        a.st_size = len(node.target) if stat.S_ISLNK(node.mode) else len(node.data)
        a.st_blksize, a.st_blocks = 4096, (a.st_size + 511) // 512
        a.st_atime_ns, a.st_mtime_ns, a.st_ctime_ns = node.times
        a.entry_timeout = a.attr_timeout = TIMEOUT
        return a

    def _add(self, parent: int, name: bytes, mode: int, ctx) -> Node:
        folder = self._node(parent)
        if name in folder.children:
            raise pyfuse3.FUSEError(errno.EEXIST)
        node = self._new(mode, ctx.uid, ctx.gid)
        folder.children[name] = node.ino
        folder.nlink += stat.S_ISDIR(mode)
        folder.times[1] = folder.times[2] = time.time_ns()
        return node

    def _remove(self, parent: int, name: bytes) -> None:
        folder = self._node(parent)
        ino = folder.children.pop(name, None)
        if ino is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        node = self.nodes[ino]
        node.nlink = 0 if stat.S_ISDIR(node.mode) else node.nlink - 1
        folder.nlink -= stat.S_ISDIR(node.mode)
        if node.nlink == 0:
            del self.nodes[ino]  # tempfs keeps it until forgotten; the difference is not measured

    async def lookup(self, parent_inode, name, ctx=None):
        ino = self._node(parent_inode).children.get(name)
        if ino is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attrs(self.nodes[ino])

    async def getattr(self, inode, ctx=None):
        return self._attrs(self._node(inode))

    async def setattr(self, inode, attr, fields, fh, ctx):
        node = self._node(inode)
        if fields.update_size:
            del node.data[attr.st_size:]
            node.data.extend(bytes(attr.st_size - len(node.data)))
        if fields.update_mode:
            node.mode = stat.S_IFMT(node.mode) | stat.S_IMODE(attr.st_mode)
        if fields.update_uid:
            node.uid = attr.st_uid
        if fields.update_gid:
            node.gid = attr.st_gid
        if fields.update_atime:
            node.times[0] = attr.st_atime_ns
        if fields.update_mtime:
            node.times[1] = attr.st_mtime_ns
        return self._attrs(node)

    async def getxattr(self, inode, name, ctx):
        raise pyfuse3.FUSEError(pyfuse3.ENOATTR)

    async def mkdir(self, parent_inode, name, mode, ctx):
        return self._attrs(self._add(parent_inode, name, stat.S_IFDIR | stat.S_IMODE(mode), ctx))

    async def symlink(self, parent_inode, name, target, ctx):
        node = self._add(parent_inode, name, stat.S_IFLNK | 0o777, ctx)
        node.target = target
        return self._attrs(node)

    async def readlink(self, inode, ctx):
        return self._node(inode).target

    async def create(self, parent_inode, name, mode, flags, ctx):
        node = self._add(parent_inode, name, stat.S_IFREG | stat.S_IMODE(mode), ctx)
        return pyfuse3.FileInfo(fh=node.ino), self._attrs(node)

    async def open(self, inode, flags, ctx):
        node = self._node(inode)
        if flags & os.O_TRUNC:
            node.data.clear()
        return pyfuse3.FileInfo(fh=inode, keep_cache=True)

    async def read(self, fh, off, size):
        return bytes(self._node(fh).data[off:off + size])

    async def write(self, fh, off, buf):
        data = self._node(fh).data
        if off > len(data):
            data.extend(bytes(off - len(data)))
        data[off:off + len(buf)] = buf
        return len(buf)

    async def flush(self, fh):
        raise pyfuse3.FUSEError(errno.ENOSYS)

    async def fsync(self, fh, datasync):
        pass

    async def release(self, fh):
        pass

    async def unlink(self, parent_inode, name, ctx):
        self._remove(parent_inode, name)

    async def rmdir(self, parent_inode, name, ctx):
        if self._node(self._node(parent_inode).children.get(name, 0)).children:
            raise pyfuse3.FUSEError(errno.ENOTEMPTY)
        self._remove(parent_inode, name)

    async def opendir(self, inode, ctx):
        return inode

    async def readdir(self, fh, start_id, token):
        entries = list(self._node(fh).children.items())
        for offset, (name, ino) in enumerate(entries[start_id:], start_id + 1):
            if ino in self.nodes and not pyfuse3.readdir_reply(token, name, self._attrs(self.nodes[ino]), offset):
                break

    async def releasedir(self, fh):
        pass

    async def statfs(self, ctx):
        st = pyfuse3.StatvfsData()
        st.f_bsize = st.f_frsize = 4096
        st.f_blocks = st.f_bfree = st.f_bavail = 1 << 30
        st.f_files = st.f_ffree = st.f_favail = 1 << 24
        st.f_namemax = 255
        return st


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    pyfuse3.init(MemFS(), sys.argv[1], {"fsname=memfs", "default_permissions"})
    try:
        with installed(RequestWait(DEFAULT_REQUEST_SPIN)):  # no handler of its own ever waits
            trio.run(pyfuse3.main)
    finally:
        pyfuse3.close(unmount=True)


if __name__ == "__main__":
    main()
