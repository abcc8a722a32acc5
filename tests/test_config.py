"""Unit tests for tempfs.config: defaults, units, inheritance, and every refusal's message."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import pytest

from tempfs.config import (
    MiB,
    Config,
    ConfigError,
    Policy,
    default_config,
    default_config_text,
    load_config,
    parse_duration,
    parse_size,
)

H = 3600.0

SEED_LEAVES = [
    "processing/face_recognition/frames", "processing/face_recognition/features",
    "processing/face_recognition/results", "processing/defect_detection/frames",
    "processing/defect_detection/detections", "processing/defect_detection/results",
    "processing/common/uploads", "processing/common/downloads", "processing/common/conversions",
    "cache/models", "cache/images", "cache/videos", "cache/data",
    "sessions/user_sessions", "sessions/system_sessions", "sessions/api_sessions",
    "cleanup/scheduled", "cleanup/failed", "cleanup/manual",
]
SEED_POLICIES = {
    "processing": Policy(24 * H, 2000 * MiB, True, "refuse"),
    "cache": Policy(12 * H, 5000 * MiB, True, "evict"),
    "sessions": Policy(8 * H, 500 * MiB, True, "refuse"),
    "cleanup": Policy(1 * H, 100 * MiB, True, "evict"),
}


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "tempfs.toml"
    path.write_text(text, encoding="utf-8")
    return path


def refusal(tmp_path: Path, text: str) -> str:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: ")
    return message


# ---------------------------------------------------------------- defaults


def test_default_tree_is_the_seed_tree_with_every_prefix() -> None:
    config = default_config()
    expected = set(SEED_LEAVES)
    for leaf in SEED_LEAVES:
        parts = leaf.split("/")
        expected.update("/".join(parts[:i]) for i in range(1, len(parts)))
    assert set(config.folders) == expected
    assert len(config.folders) == len(expected) == 4 + 3 + 19
    assert config.areas == ("processing", "cache", "sessions", "cleanup")
    for index, folder in enumerate(config.folders):
        assert not folder.startswith("/") and not folder.endswith("/")
        if "/" in folder:
            assert config.folders.index(folder.rsplit("/", 1)[0]) < index


def test_default_policies_and_memory_are_the_seed_numbers() -> None:
    config = default_config()
    assert dict(config.policies) == SEED_POLICIES
    assert config.dirty_limit == 128 * MiB
    assert config.cache_limit == 64 * MiB
    assert config.source == "<defaults>"


def test_default_text_loads_to_default_config(tmp_path: Path) -> None:
    path = write(tmp_path, default_config_text())
    config = load_config(path)
    assert config == default_config()
    assert config.source == str(path)
    assert dataclasses.replace(config, source="<defaults>") == default_config()


def test_default_text_explains_every_key() -> None:
    comments = [line for line in default_config_text().splitlines() if line.startswith("#")]
    for key in ("folders", "max_age", "max_size", "auto_cleanup", "on_full", "dirty_limit", "cache_limit"):
        assert any(f"{key}" in line and f"{key} =" not in line for line in comments), key


@pytest.mark.parametrize("text", ["", "# nothing\n", "[memory]\n", "[policy]\n"])
def test_missing_keys_take_defaults(tmp_path: Path, text: str) -> None:
    assert load_config(write(tmp_path, text)) == default_config()


def test_partial_policy_keeps_other_seed_values(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, '[policy.cache]\nmax_size = "1GB"\n[memory]\ndirty_limit = "32MiB"\n'))
    assert config.policies["cache"] == Policy(12 * H, 1024 * MiB, True, "evict")
    assert config.policies["sessions"] == SEED_POLICIES["sessions"]
    assert (config.dirty_limit, config.cache_limit) == (32 * MiB, 64 * MiB)


def test_config_is_frozen() -> None:
    config = default_config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.dirty_limit = 1  # type: ignore[misc]
    with pytest.raises(TypeError):
        config.policies["cache"] = SEED_POLICIES["cleanup"]  # type: ignore[index]
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.policies["cache"].max_age = 1  # type: ignore[misc]
    assert hash(config) == hash(default_config())


@pytest.mark.parametrize("text, seconds", [("", 50e-6), ('spin = "200us"', 200e-6), ('spin = "0"', 0.0),
                                           ("spin = 0", 0.0), ('spin = "10ms"', 0.01)])
def test_the_request_spin_is_a_short_duration_or_0(tmp_path: Path, text: str, seconds: float) -> None:
    assert load_config(write(tmp_path, f"[requests]\n{text}\n")).request_spin == pytest.approx(seconds)


# ---------------------------------------------------------------- units


@pytest.mark.parametrize("text, seconds", [
    ("90s", 90), ("30m", 1800), ("24h", 86400), ("7d", 604800), ("1.5h", 5400),
    ("12H", 43200), (" 2 h ", 7200), ("45", 45), (45, 45), (0.5, 0.5), (".5m", 30),
    ("250ms", 0.25), ("50us", 50e-6),
])
def test_parse_duration(text: str | int | float, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", [
    "", "h", "5 parsecs", "1.2.3h", "-1h", "0h", 0, -5, True, float("inf"), float("nan"), "1w", None, [1],
])
def test_parse_duration_refuses(text: object) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(text)  # type: ignore[arg-type]


@pytest.mark.parametrize("text, size", [
    ("500MB", 500 * MiB), ("5GB", 5 * 2**30), ("100MiB", 100 * MiB), ("64KiB", 64 * 1024),
    ("1TB", 2**40), ("1tib", 2**40), ("2000mb", 2000 * MiB), ("64k", 65536), ("1.5GB", 1536 * MiB),
    ("4096", 4096), ("10B", 10), (4096, 4096),
])
def test_parse_size(text: str | int, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", [
    "", "MB", "5 parsecs", "5PB", "-1MB", "0MB", "0.1B", 0, -1, True, 1.5, None,
])
def test_parse_size_refuses(text: object) -> None:
    with pytest.raises(ValueError, match="size"):
        parse_size(text)  # type: ignore[arg-type]


# ---------------------------------------------------------------- policy_for and inheritance


def test_policy_for_override_and_paths_below_leaves(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, '[policy."cache/models"]\nmax_age = "48h"\n'))
    models = Policy(48 * H, 5000 * MiB, True, "evict")
    assert config.policies["cache/models"] == models
    assert config.policy_for("cache/models") == models
    assert config.policy_for("cache/models/a/b.bin") == models
    assert config.policy_for("/cache/models/x/") == models
    assert config.policy_for("cache/images/x.jpg") == SEED_POLICIES["cache"]
    assert config.policy_for("cache") == SEED_POLICIES["cache"]
    assert config.policy_for("processing/face_recognition/frames/f_001.png") == SEED_POLICIES["processing"]
    assert set(config.policies) == {"processing", "cache", "sessions", "cleanup", "cache/models"}
    for outside in ("", "/", "elsewhere/file", "cachex/models"):
        with pytest.raises(KeyError):
            config.policy_for(outside)


def test_deeper_policy_inherits_from_nearest_configured_ancestor(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, """
[policy."processing/face_recognition/frames"]
on_full = "evict"

[policy."processing/face_recognition"]
max_age = "2h"
max_size = "10MB"

[policy.processing]
auto_cleanup = false
"""))
    assert config.policies["processing"] == Policy(24 * H, 2000 * MiB, False, "refuse")
    assert config.policies["processing/face_recognition"] == Policy(2 * H, 10 * MiB, False, "refuse")
    assert config.policy_for("processing/face_recognition/frames/x") == Policy(2 * H, 10 * MiB, False, "evict")
    assert config.policy_for("processing/face_recognition/results/x") == config.policies["processing/face_recognition"]


def test_custom_tree_replaces_the_seed_tree(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, """
[tree]
folders = ["work/in/", "work/out", "cache/models", "work/in", "scratch"]

[policy.work]
max_age = "30m"
"""))
    assert config.folders == ("work", "work/in", "work/out", "cache", "cache/models", "scratch")
    assert config.areas == ("work", "cache", "scratch")
    assert config.policies["work"] == Policy(1800, 1000 * MiB, True, "refuse")
    assert config.policies["cache"] == SEED_POLICIES["cache"]  # a seed area keeps the seed's values
    assert config.policies["scratch"] == Policy(24 * H, 1000 * MiB, True, "refuse")


def test_dotted_and_inline_policy_forms(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, '[policy]\ncache = { max_age = "1h" }\nsessions.on_full = "evict"\n'))
    assert config.policies["cache"].max_age == H
    assert config.policies["sessions"].on_full == "evict"


def test_bare_numbers_are_seconds_and_bytes_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="tempfs.config"):
        config = load_config(write(tmp_path, "[policy.cache]\nmax_age = 24\nmax_size = 5000\n"))
    assert config.policies["cache"].max_age == 24
    assert config.policies["cache"].max_size == 5000
    assert "seconds" in caplog.text and "bytes" in caplog.text


# ---------------------------------------------------------------- refusals


@pytest.mark.parametrize("text, expected", [
    # sizes, durations, types, choices
    ('[policy.cache]\nmax_age = "1h"\n\nmax_size = "5 parsecs"\n',
     "line 4: policy.cache.max_size: '5 parsecs' is not a size (use e.g. 500MB, 5GB)"),
    ("[policy.processing]\nmax_age = true\n", "line 2: policy.processing.max_age: true is not a duration"),
    ('[policy.processing]\nmax_age = "0h"\n', "line 2: policy.processing.max_age: '0h' is not a positive duration"),
    ('[policy.sessions]\nauto_cleanup = "yes"\n', "line 2: policy.sessions.auto_cleanup: 'yes' is not true or false"),
    ('[policy.cleanup]\n\non_full = "delete"\n', 'line 3: policy.cleanup.on_full: \'delete\' is not a choice (use "evict" or "refuse")'),
    ('[policy."cache/models"]\nmax_size = [1]\n', 'line 2: policy."cache/models".max_size: [1] is not a size'),
    ('[memory]\ndirty_limit = "256MB"\ncache_limit = "lots"\n', "line 3: memory.cache_limit: 'lots' is not a size"),
    ('[policy]\ncache = { max_age = "soon" }\n', "line 2: policy.cache.max_age: 'soon' is not a duration"),
    ('[requests]\nspin = "20ms"\n', "line 2: requests.spin: '20ms' is longer than 10ms, which would keep a core busy"),
    ('[requests]\nspin = "fast"\n', "line 2: requests.spin: 'fast' is not a duration"),
    ('[requests]\nspinning = "50us"\n', "line 2: requests.spinning: unknown key in [requests] (did you mean spin?"),
    # unknown names
    ('[policy.cache]\nmax_sise = "1GB"\n', "line 2: policy.cache.max_sise: unknown policy key (did you mean max_size?"),
    ('[memory]\n\ndirty = "1GB"\n', "line 3: memory.dirty: unknown key in [memory]"),
    ('[tree]\nfolders = ["a"]\nfolder = ["b"]\n', "line 3: tree.folder: unknown key in [tree]"),
    ('# typo\n[polcy.cache]\nmax_age = "1h"\n', "line 2: polcy: unknown table (did you mean policy?"),
    ('[policy.cahce]\nmax_age = "1h"\n', "line 1: policy.cahce: 'cahce' is not a schema folder of the tree (did you mean 'cache'?"),
    ('\n[policy."cache/model"]\nmax_age = "1h"\n', 'line 2: policy."cache/model": \'cache/model\' is not a schema folder'),
    ('[policy."cache/models/x"]\nmax_age = "1h"\n', "is not a schema folder"),
    ('[policy.cache.models]\nmax_age = "1h"\n', 'line 1: policy.cache.models: is a table inside a policy (for a deeper folder write [policy."cache/models"])'),
    ('[policy.cache]\nmax_age = "1h"\n[policy."cache/"]\nmax_size = "1GB"\n', "line 3: policy.\"cache/\": configures 'cache' twice"),
    ("policy = 5\n", "line 1: policy: 5 is not a table"),
    ("[policy]\ncache = 5\n", "line 2: policy.cache: 5 is not a table"),
    # impossible trees
    ("[tree]\nfolders = \"cache\"\n", "line 2: tree.folders: 'cache' is not a list"),
    ("[tree]\n# none\nfolders = []\n", "line 3: tree.folders: is empty"),
    ("[tree]\n", "line 1: tree.folders: missing"),
    ('[tree]\nfolders = [\n  "a",\n  5,\n]\n', "line 2: tree.folders: 5 is not a folder path"),
    ('[tree]\nfolders = [\n  "a",\n  "",\n]\n', "line 4: tree.folders: '' is empty"),
    ('[tree]\nfolders = [\n  "a",\n  "/abs/path",\n]\n', "line 4: tree.folders: '/abs/path' is absolute"),
    ('[tree]\nfolders = [\n  "a",\n  "a/../b",\n]\n', "line 4: tree.folders: 'a/../b' has a \"..\" component"),
    ('[tree]\nfolders = [\n  "a",\n  "./b",\n]\n', "line 4: tree.folders: './b' has a \".\" component"),
    ('[tree]\nfolders = [\n  "a",\n  "a//b",\n]\n', "line 4: tree.folders: 'a//b' has an empty component"),
    ("[tree]\nfolders = [\n  'a',\n  'a\\b',\n]\n", "line 4: tree.folders: 'a\\\\b' contains a backslash"),
    ('[tree]\nfolders = [\n  "a",\n  "a\\u0000b",\n]\n', "line 4: tree.folders: 'a\\x00b' contains a NUL character"),
    ('[tree]\nfolders = ["a", "a/' + "é" * 128 + '"]\n', "line 2: tree.folders: 'a/" + "é" * 128 + "' has a component longer than 255 bytes"),
    # a policy must name a folder of the tree that is actually configured
    ('[tree]\nfolders = ["work"]\n[policy.cache]\nmax_age = "1h"\n', "line 3: policy.cache: 'cache' is not a schema folder"),
])
def test_refusals_name_file_line_and_key(tmp_path: Path, text: str, expected: str) -> None:
    assert expected in refusal(tmp_path, text)


def test_component_of_255_bytes_is_accepted(tmp_path: Path) -> None:
    name = "é" * 127 + "x"  # 255 bytes
    config = load_config(write(tmp_path, f'[tree]\nfolders = ["a/{name}"]\n'))
    assert config.folders == ("a", f"a/{name}")


def test_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    message = refusal(tmp_path, '[policy.cache]\nmax_age = "1h"\nmax_size = 5GB\n')
    assert "line 3" in message and "invalid TOML" in message


def test_syntax_error_duplicate_table(tmp_path: Path) -> None:
    message = refusal(tmp_path, "[memory]\n[memory]\n")
    assert "line 2" in message


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"{path}: not found"


def test_unreadable_and_not_utf8(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path)  # a directory
    path = tmp_path / "latin1.toml"
    path.write_bytes(b"# ok\n# caf\xe9\n")
    with pytest.raises(ConfigError, match=r"line 2: not UTF-8"):
        load_config(path)


def test_config_built_directly_is_frozen_too() -> None:
    policies = {"a": Policy(1.0, 1, True, "evict")}
    config = Config(("a",), policies, 1, 1, "test")
    policies["b"] = Policy(1.0, 1, True, "evict")
    assert set(config.policies) == {"a"}
