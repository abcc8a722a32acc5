"""The temp tree's rules: what may be created, removed or changed where. Pure decisions, no I/O.

Every folder is of one kind:
- ROOT: the mount's root; it accepts nothing at all.
- BRANCH: a schema folder with declared children (processing/, cache/, ...); it accepts files
  but no undeclared folders.
- LEAF: a schema folder without declared children (frames/, models/, ...); it accepts anything.
- FREE: a folder a program made below a leaf; it accepts anything.
Schema folders (ROOT, BRANCH, LEAF) cannot be removed, renamed, re-moded or re-owned.
"""
from __future__ import annotations

import enum
from typing import Iterable, Optional


class Kind(enum.IntEnum):
    FREE = 0
    ROOT = 1
    BRANCH = 2
    LEAF = 3


def is_schema(kind: int) -> bool:
    return kind != Kind.FREE


def create_refusal(parent_kind: int, is_dir: bool) -> Optional[str]:
    """Why a new entry may not be made in a folder of `parent_kind`, or None if it may."""
    if parent_kind == Kind.ROOT:
        return "nothing may be created at the temp root; use an area such as processing/ or cache/"
    if parent_kind == Kind.BRANCH and is_dir:
        return "undeclared folder in a schema folder; folders may be made only below a leaf such as frames/"
    return None


def schema_refusal(kind: int, action: str) -> Optional[str]:
    """Why `action` (remove, rename, chmod, chown) may not touch an entry of `kind`."""
    if is_schema(kind):
        return f"schema folders cannot be {action}"
    return None


def schema_kinds(folders: Iterable[str]) -> dict[str, Kind]:
    """Each schema folder path -> BRANCH or LEAF, given every schema folder (prefixes included)."""
    folders = list(folders)
    parents = {f.rsplit("/", 1)[0] for f in folders if "/" in f}
    return {f: (Kind.BRANCH if f in parents else Kind.LEAF) for f in folders}
