"""Object files: one sealed block per file under STORE/objects/, as stores wrote them before
schema 6 (since, objects are appended to pack files: packs.py). Read and removed, never written
again. Sharded by id: in 256 folders by the id's first two hex digits (objects/ab/<id>), or, in
stores made before that, in 65,536 (objects/ab/cd/<id>).

Guarantees: reads are bounded in size, since every byte read back is untrusted.
"""
from __future__ import annotations

import os
from pathlib import Path

MAX_OBJECT_BYTES = 17 * 1024 * 1024


class ObjectFiles:
    def __init__(self, root: Path, levels: int = 1) -> None:
        if levels not in (1, 2):
            raise ValueError(f"object folders nest 1 or 2 levels deep, not {levels!r}")
        self.root = root
        self.levels = levels

    def path(self, object_id: int) -> Path:
        return self.root.joinpath(*shards(f"{object_id:016x}", self.levels))

    def read(self, object_id: int) -> bytes:
        with open(self.path(object_id), "rb", buffering=0) as f:
            size = os.fstat(f.fileno()).st_size
            if size > MAX_OBJECT_BYTES:
                raise OSError(f"object {object_id:016x} is larger than any object tempfs writes")
            return f.read(size)

    def remove(self, object_id: int) -> None:
        self.path(object_id).unlink(missing_ok=True)

    def all_ids(self) -> set[int]:
        """Every object id present on disk (for fsck and orphan cleanup)."""
        ids = set()
        for path in self.root.glob("??/" * self.levels + "*"):
            try:
                ids.add(int(path.name, 16))
            except ValueError:
                continue
        return ids


def shards(name: str, levels: int) -> tuple[str, ...]:
    """The folders and file name of object file `name` below the objects folder."""
    return (name[:2], name) if levels == 1 else (name[:2], name[2:4], name)
