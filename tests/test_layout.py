"""Unit tests of tempfs.layout: pure decisions about the temp tree."""
from __future__ import annotations

import pytest

from tempfs.layout import Kind, create_refusal, is_schema, schema_kinds, schema_refusal

SEED_FOLDERS = [
    "processing",
    "processing/face_recognition",
    "processing/face_recognition/frames",
    "processing/face_recognition/features",
    "processing/face_recognition/results",
    "processing/defect_detection",
    "processing/defect_detection/frames",
    "processing/defect_detection/detections",
    "processing/defect_detection/results",
    "processing/common",
    "processing/common/uploads",
    "processing/common/downloads",
    "processing/common/conversions",
    "cache",
    "cache/models",
    "cache/images",
    "cache/videos",
    "cache/data",
    "sessions",
    "sessions/user_sessions",
    "sessions/system_sessions",
    "sessions/api_sessions",
    "cleanup",
    "cleanup/scheduled",
    "cleanup/failed",
    "cleanup/manual",
]

EXPECTED_CREATE = {
    # (kind, is_dir): allowed?
    (Kind.ROOT, False): False,
    (Kind.ROOT, True): False,
    (Kind.BRANCH, False): True,
    (Kind.BRANCH, True): False,
    (Kind.LEAF, False): True,
    (Kind.LEAF, True): True,
    (Kind.FREE, False): True,
    (Kind.FREE, True): True,
}


@pytest.mark.parametrize("kind,is_dir", sorted(EXPECTED_CREATE))
def test_create_refusal(kind, is_dir):
    reason = create_refusal(kind, is_dir)
    if EXPECTED_CREATE[(kind, is_dir)]:
        assert reason is None
    else:
        assert isinstance(reason, str) and reason


@pytest.mark.parametrize("kind,is_dir", sorted(EXPECTED_CREATE))
def test_create_refusal_accepts_plain_ints(kind, is_dir):
    """The store keeps kinds as SQLite integers."""
    assert create_refusal(int(kind), is_dir) == create_refusal(kind, is_dir)


def test_create_refusal_messages():
    assert "root" in create_refusal(Kind.ROOT, False)
    assert "root" in create_refusal(Kind.ROOT, True)
    assert "leaf" in create_refusal(Kind.BRANCH, True)


@pytest.mark.parametrize("kind", list(Kind))
@pytest.mark.parametrize("action", ["removed", "renamed", "re-moded", "re-owned"])
def test_schema_refusal(kind, action):
    reason = schema_refusal(kind, action)
    if kind == Kind.FREE:
        assert reason is None
    else:
        assert action in reason
        assert "schema" in reason


def test_is_schema():
    assert not is_schema(Kind.FREE)
    assert not is_schema(0)
    for k in (Kind.ROOT, Kind.BRANCH, Kind.LEAF):
        assert is_schema(k) and is_schema(int(k))


def test_schema_kinds_of_seed():
    kinds = schema_kinds(SEED_FOLDERS)
    assert set(kinds) == set(SEED_FOLDERS)
    assert kinds["processing"] == Kind.BRANCH
    assert kinds["processing/face_recognition"] == Kind.BRANCH
    assert kinds["processing/face_recognition/frames"] == Kind.LEAF
    assert kinds["cache/models"] == Kind.LEAF
    assert kinds["cache"] == Kind.BRANCH
    assert kinds["processing/common"] == Kind.BRANCH
    assert kinds["processing/common/uploads"] == Kind.LEAF
    for area in ("processing", "cache", "sessions", "cleanup"):
        assert kinds[area] == Kind.BRANCH
    leaves = {f for f, k in kinds.items() if k == Kind.LEAF}
    assert leaves == {f for f in SEED_FOLDERS if not any(g.startswith(f + "/") for g in SEED_FOLDERS)}


def test_schema_kinds_order_and_iterables():
    forward = schema_kinds(SEED_FOLDERS)
    assert schema_kinds(reversed(SEED_FOLDERS)) == forward
    assert schema_kinds(iter(SEED_FOLDERS)) == forward
    assert schema_kinds([]) == {}


def test_schema_kinds_prefix_names_are_not_parents():
    kinds = schema_kinds(["cache", "cache2", "cache2/x", "cachex"])
    assert kinds == {"cache": Kind.LEAF, "cache2": Kind.BRANCH, "cache2/x": Kind.LEAF, "cachex": Kind.LEAF}


def test_schema_kinds_single_area_is_leaf():
    assert schema_kinds(["scratch"]) == {"scratch": Kind.LEAF}
