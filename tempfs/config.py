"""The tempfs config file (TOML) -> validated, frozen settings.

What this module guarantees:

* ``load_config`` returns a ``Config`` only when every value in the file is usable: the tree is a
  set of clean relative folder paths, every policy names a schema folder, every duration and size
  is positive, ``on_full`` is "evict" or "refuse". Unknown tables and keys are refused, so a typo
  fails loudly instead of silently taking a default.
* Anything else raises ``ConfigError`` whose message is one line,
  ``"FILE: line N: KEY: what is wrong (what to do)"`` ("line N: " is left out when the key cannot
  be found in the text).
* A key left out takes its default; the defaults are the seed specification's tree and its
  ``TEMP_CLEANUP_POLICIES``. ``default_config_text()`` loads to exactly ``default_config()``.
* ``Config`` and ``Policy`` are immutable: ``folders`` is a tuple holding every schema folder
  (all prefixes included, parents before children) and ``policies`` a read-only mapping holding a
  fully resolved ``Policy`` for every area and for each deeper folder that has its own table.

Only the standard library is used (``tomllib``).
"""

from __future__ import annotations

import difflib
import grp
import json
import logging
import math
import pwd
import re
import tomllib
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping

log = logging.getLogger(__name__)

MiB = 1024 * 1024

DEFAULTS_SOURCE = "<defaults>"
ON_FULL_CHOICES = ("evict", "refuse")
MAX_COMPONENT_BYTES = 255

# The seed's tree (temp-folder-README), leaves in the seed's order.
SEED_LEAVES: tuple[str, ...] = (
    "processing/face_recognition/frames",
    "processing/face_recognition/features",
    "processing/face_recognition/results",
    "processing/defect_detection/frames",
    "processing/defect_detection/detections",
    "processing/defect_detection/results",
    "processing/common/uploads",
    "processing/common/downloads",
    "processing/common/conversions",
    "cache/models",
    "cache/images",
    "cache/videos",
    "cache/data",
    "sessions/user_sessions",
    "sessions/system_sessions",
    "sessions/api_sessions",
    "cleanup/scheduled",
    "cleanup/failed",
    "cleanup/manual",
)

_HOUR = 3600.0
_DEFAULT_DIRTY_LIMIT = 128 * MiB
_DEFAULT_CACHE_LIMIT = 64 * MiB
_DEFAULT_MIN_FREE = 256 * MiB
_DEFAULT_CHECK_INTERVAL = 7 * 24 * _HOUR  # the seed's weekly whole-tree cleanup
# After answering a request the daemon polls for the next one this long before it sleeps: waking
# a sleeping thread costs about as much as a small request (stat 1.3-1.7x, create 1.1x; BENCHMARKS.md)
DEFAULT_REQUEST_SPIN = 50e-6
MAX_REQUEST_SPIN = 10e-3


class ConfigError(Exception):
    """A config that cannot be used. str(e) is one line naming the file, the key and the line number, e.g.
    "config/tempfs.toml: line 12: policy.cache.max_size: '5 parsecs' is not a size (use e.g. 500MB, 5GB)" """


@dataclass(frozen=True)
class Policy:
    """How one schema folder's entries expire and how big it may grow."""

    max_age: float  # seconds
    max_size: int  # bytes
    auto_cleanup: bool
    on_full: str  # "evict" or "refuse"


# The seed's TEMP_CLEANUP_POLICIES; on_full is tempfs's addition.
SEED_POLICIES: Mapping[str, Policy] = MappingProxyType({
    "processing": Policy(24 * _HOUR, 2000 * MiB, True, "refuse"),
    "cache": Policy(12 * _HOUR, 5000 * MiB, True, "evict"),
    "sessions": Policy(8 * _HOUR, 500 * MiB, True, "refuse"),
    "cleanup": Policy(1 * _HOUR, 100 * MiB, True, "evict"),
})
# For an area outside the seed's four that has no [policy.AREA] table.
OTHER_AREA_POLICY = Policy(24 * _HOUR, 1000 * MiB, True, "refuse")

_SEED_PURPOSE = {
    "processing": "data being processed and temporary results (the seed: 24 h at most, 100 MB - 2 GB)",
    "cache": "cache data kept for speed (the seed: 12 h, 500 MB - 5 GB)",
    "sessions": "user and system session data (the seed: 8 h at most, 50 MB - 500 MB)",
    "cleanup": "files waiting for cleanup (the seed: 1 h, 10 MB - 100 MB)",
}


@dataclass(frozen=True)
class Alerts:
    """When the daemon raises an alert, and who hears of it."""

    capacity_percent: int = 80           # an area this full of its max_size
    refusals_per_minute: int = 5         # refused operations from one process within a minute
    command: str | None = None           # run for each alert, fields in TEMPFS_ALERT_* variables
    command_timeout: float = 10.0        # seconds before the command is killed


@dataclass(frozen=True)
class Access:
    """Who may reach one schema folder; None keeps tempfs's default (the mounting user, 1777)."""

    owner: int | None = None  # uid
    group: int | None = None  # gid
    mode: int | None = None   # permission bits, e.g. 0o750


@dataclass(frozen=True)
class Config:
    """Validated settings. Equality ignores ``source``."""

    folders: tuple[str, ...]
    policies: Mapping[str, Policy] = field(hash=False)
    dirty_limit: int = _DEFAULT_DIRTY_LIMIT
    cache_limit: int = _DEFAULT_CACHE_LIMIT
    source: str = field(default=DEFAULTS_SOURCE, compare=False)
    min_free: int = _DEFAULT_MIN_FREE            # bytes kept free on the store's disk; 0: no floor
    check_interval: float = _DEFAULT_CHECK_INTERVAL  # seconds between whole-store checks
    alerts: "Alerts" = field(default_factory=lambda: Alerts())
    access: Mapping[str, Access] = field(default_factory=dict, hash=False)  # schema folder -> Access
    request_spin: float = DEFAULT_REQUEST_SPIN  # seconds the daemon looks for the next request before sleeping

    def __post_init__(self) -> None:
        object.__setattr__(self, "folders", tuple(self.folders))
        object.__setattr__(self, "policies", MappingProxyType(dict(self.policies)))

    @property
    def areas(self) -> tuple[str, ...]:
        """The top-level schema folders, in tree order."""
        return tuple(f for f in self.folders if "/" not in f)

    def policy_for(self, path: str) -> Policy:
        """The policy of the deepest configured folder that is ``path`` or an ancestor of it.

        ``path`` is relative to the mount root (leading/trailing "/" ignored) and may lie below a
        schema folder. KeyError when it is not inside any area (e.g. the root).
        """
        return self.policies[self.policy_key(path)]

    def policy_key(self, path: str) -> str:
        """The deepest configured folder that is ``path`` or an ancestor of it (see policy_for)."""
        key = path.strip("/")
        while key:
            if key in self.policies:
                return key
            cut = key.rfind("/")
            key = key[:cut] if cut > 0 else ""
        raise KeyError(f"{path!r} is not inside an area of the tree")


# ---------------------------------------------------------------- durations and sizes

_NUMBER_UNIT = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)\s*", re.IGNORECASE)
_DURATION_UNITS = {"": 1, "us": Fraction(1, 10**6), "ms": Fraction(1, 1000), "s": 1, "m": 60, "h": 3600, "d": 86400}
_SIZE_UNITS = {
    "": 1, "b": 1,
    "k": 2**10, "kb": 2**10, "kib": 2**10,
    "m": 2**20, "mb": 2**20, "mib": 2**20,
    "g": 2**30, "gb": 2**30, "gib": 2**30,
    "t": 2**40, "tb": 2**40, "tib": 2**40,
}
_DURATION_HINT = "use e.g. 90s, 30m, 24h, 7d"
_SIZE_HINT = "use e.g. 500MB, 5GB"


def _show(value: Any) -> str:
    """A value as the message shows it: strings quoted, booleans as TOML writes them."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value)


def _split_number_unit(text: str, units: Mapping[str, int | Fraction]) -> tuple[Fraction, int | Fraction] | None:
    match = _NUMBER_UNIT.fullmatch(text)
    if match is None or match.group(2).lower() not in units:
        return None
    return Fraction(match.group(1)), units[match.group(2).lower()]


def parse_duration(text: str | int | float) -> float:
    """Seconds from "90s", "30m", "24h", "7d", "1.5h" or a plain number of seconds; must be > 0."""
    if isinstance(text, bool) or not isinstance(text, (str, int, float)):
        raise ValueError(f"{_show(text)} is not a duration ({_DURATION_HINT})")
    if isinstance(text, str):
        parsed = _split_number_unit(text, _DURATION_UNITS)
        if parsed is None:
            raise ValueError(f"{_show(text)} is not a duration ({_DURATION_HINT})")
        seconds = float(parsed[0] * parsed[1])
    else:
        seconds = float(text)
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"{_show(text)} is not a positive duration ({_DURATION_HINT})")
    return seconds


def parse_size(text: str | int) -> int:
    """Bytes from "500MB", "5GB", "100MiB", "64KiB", "1TB" or a plain int of bytes; must be > 0.

    Units are binary and case-insensitive: KB = KiB = 1024, MB = MiB = 2**20, GB, TB likewise.
    """
    if isinstance(text, bool) or not isinstance(text, (str, int)):
        raise ValueError(f"{_show(text)} is not a size ({_SIZE_HINT})")
    if isinstance(text, str):
        parsed = _split_number_unit(text, _SIZE_UNITS)
        if parsed is None:
            raise ValueError(f"{_show(text)} is not a size ({_SIZE_HINT})")
        size = int(parsed[0] * parsed[1])
    else:
        size = text
    if size <= 0:
        raise ValueError(f"{_show(text)} is not a positive size ({_SIZE_HINT})")
    return size


def _format_duration(seconds: float) -> str:
    if seconds > 86400 and seconds % 86400 == 0:  # a week reads better as 7d than 168h
        return f"{int(seconds // 86400)}d"
    for unit, factor in (("h", 3600), ("m", 60)):  # hours, as the seed writes them
        if seconds % factor == 0:
            return f"{int(seconds // factor)}{unit}"
    return f"{seconds:g}s"


def _format_size(size: int) -> str:
    for unit, factor in (("TB", 2**40), ("GB", 2**30), ("MB", 2**20), ("KB", 2**10)):
        if size % factor == 0:
            return f"{size // factor}{unit}"
    return str(size)


# ---------------------------------------------------------------- defaults


def _with_prefixes(leaves: tuple[str, ...]) -> tuple[str, ...]:
    """Every folder of ``leaves`` and all their prefixes, parents before children, no duplicates."""
    seen: dict[str, None] = {}
    for leaf in leaves:
        parts = leaf.split("/")
        for depth in range(1, len(parts) + 1):
            seen.setdefault("/".join(parts[:depth]), None)
    return tuple(seen)


def _area_default(area: str) -> Policy:
    return SEED_POLICIES.get(area, OTHER_AREA_POLICY)


def default_config() -> Config:
    """The seed's tree and policies, no file needed."""
    folders = _with_prefixes(SEED_LEAVES)
    policies = {f: _area_default(f) for f in folders if "/" not in f}
    return Config(folders, policies, _DEFAULT_DIRTY_LIMIT, _DEFAULT_CACHE_LIMIT, DEFAULTS_SOURCE)


def default_config_text() -> str:
    """A commented TOML file that loads to exactly ``default_config()``."""
    folder_lines = "\n".join(f'    "{leaf}",' for leaf in SEED_LEAVES)
    policy_tables = "\n\n".join(_policy_table_text(a, p) for a, p in SEED_POLICIES.items())
    return _DEFAULT_TEXT_TEMPLATE.format(
        folders=folder_lines,
        policies=policy_tables,
        other=_policy_summary(OTHER_AREA_POLICY),
        dirty=_format_size(_DEFAULT_DIRTY_LIMIT),
        cache=_format_size(_DEFAULT_CACHE_LIMIT),
        min_free=_format_size(_DEFAULT_MIN_FREE),
        check=_format_duration(_DEFAULT_CHECK_INTERVAL),
        spin=f"{DEFAULT_REQUEST_SPIN * 1e6:g}us",
    )


def _policy_table_text(area: str, policy: Policy) -> str:
    return (
        f"# {area}/: {_SEED_PURPOSE.get(area, '')}\n"
        f"[policy.{area}]\n"
        f'max_age = "{_format_duration(policy.max_age)}"\n'
        f'max_size = "{_format_size(policy.max_size)}"\n'
        f"auto_cleanup = {_show(policy.auto_cleanup)}\n"
        f'on_full = "{policy.on_full}"'
    )


def _policy_summary(policy: Policy) -> str:
    return (f'max_age = "{_format_duration(policy.max_age)}", max_size = "{_format_size(policy.max_size)}", '
            f'auto_cleanup = {_show(policy.auto_cleanup)}, on_full = "{policy.on_full}"')


_DEFAULT_TEXT_TEMPLATE = """\
# tempfs configuration (TOML).
#
# Written by tempfs on first mount with its built-in defaults, which are the temp folder's
# specification. Edit it and remount to apply. Every key is optional: a key you remove takes
# its default. Unknown tables and keys are refused, so a typo fails loudly at mount time.
#
# Durations are a number and a unit: "90s", "30m", "24h", "7d", "1.5h" (a bare number is seconds).
# Sizes are a number and a unit: "64KB", "500MB", "5GB", "1TB". Units are binary:
# 1KB = 1KiB = 1024 bytes, 1MB = 1MiB = 1048576 bytes (a bare integer is bytes).

[tree]
# folders: every schema folder, by its path below the mount root ("cache/models", not "/cache/models").
# Each prefix of a path is a schema folder too: "cache/models" also declares "cache".
# Schema folders always exist and cannot be removed, renamed or re-moded through the mount;
# the mount root itself accepts nothing.
# A folder with declared children (processing/, processing/face_recognition/) accepts files
# but no new folders; a leaf (frames/, models/, ...) accepts any subtree.
# Listing folders here replaces the whole default tree; remove [tree] to get the default back.
folders = [
{folders}
]

# One [policy.AREA] table per area (top-level folder). Keys:
#   max_age       how long an entry lives after its last change inside tempfs
#   max_size      the most bytes the area may hold
#   auto_cleanup  true: tempfs removes entries past max_age by itself
#   on_full       what happens to a write that would take the area past max_size:
#                   "refuse": the write fails with ENOSPC (no space left on device)
#                   "evict":  the least recently used closed files are removed to make room
# An area without a table, or a key left out, takes these defaults; an area of your own
# that is not one of these four gets:
#   {other}

{policies}

# A deeper schema folder may have its own table; the keys it leaves out come from its nearest
# configured ancestor. The folder name must be quoted because it contains "/". For example:
# [policy."cache/models"]
# max_age = "48h"

[memory]
# dirty_limit: written file data the daemon may hold before it is compressed, encrypted
# and stored; writers wait while this much is pending.
dirty_limit = "{dirty}"
# cache_limit: recently read file data (plaintext blocks) kept in memory for fast reads.
cache_limit = "{cache}"

[space]
# min_free: free space kept on the disk that holds the store. Below it, tempfs evicts the least
# recently used closed files in the order cleanup/, cache/, other areas, sessions/, processing/,
# from areas whose on_full is "evict" only; when nothing may go, writes fail with ENOSPC.
# 0 turns the floor off.
min_free = "{min_free}"

[check]
# interval: how often the daemon checks the whole store (every object present and authentic,
# reference counts and usage counters right, no orphan objects) and repairs what it safely can.
interval = "{check}"

[requests]
# spin: after answering a request, how long the daemon keeps looking for the next one before it
# sleeps (waking it costs about as much as a small request). It never spins while a request is
# being handled or a worker thread works, and stops after 8 spins in a row that found nothing
# (a program that pauses between its requests costs up to one spin per pause). 0: sleep at once.
spin = "{spin}"

[alerts]
# An alert is logged at WARNING, written to the events file and handed to `command`, once per
# condition until it clears: an area past capacity_percent of its max_size, a failed cleanup or
# check, an integrity error, the disk under its floor, repeated refusals from one process.
capacity_percent = 80
refusals_per_minute = 5
# command: a shell command run for each alert, with TEMPFS_ALERT_CONDITION, TEMPFS_ALERT_MESSAGE,
# TEMPFS_ALERT_SINCE and the alert's other fields in the environment; killed after command_timeout.
# command = "logger -t tempfs-alert \"$TEMPFS_ALERT_MESSAGE\""
command_timeout = "10s"
"""


# ---------------------------------------------------------------- finding a key's line in the text

_ONE_KEY = r"""(?:[A-Za-z0-9_-]+|"(?:[^"\\]|\\.)*"|'[^']*')"""
_KEY_PART = re.compile(r"""\s*(?:([A-Za-z0-9_-]+)|"((?:[^"\\]|\\.)*)"|'([^']*)')\s*""")
_HEADER = re.compile(r"\s*\[\[?(.*?)\]\]?\s*(?:#.*)?")
_KEY_LINE = re.compile(rf"\s*({_ONE_KEY}(?:\s*\.\s*{_ONE_KEY})*)\s*=")


def _parse_dotted(text: str) -> tuple[str, ...] | None:
    """The parts of a TOML dotted key, or None when ``text`` is not one."""
    parts: list[str] = []
    for piece in _split_dots(text):
        match = _KEY_PART.fullmatch(piece)
        if match is None:
            return None
        bare, basic, literal = match.groups()
        if basic is not None:
            try:
                basic = json.loads(f'"{basic}"')
            except ValueError:
                pass
        parts.append(bare if bare is not None else basic if basic is not None else literal)
    return tuple(parts)


def _split_dots(text: str) -> list[str]:
    """Split a dotted key on the dots outside quotes."""
    pieces, current, quote = [], [], ""
    for char in text:
        if quote:
            quote = "" if char == quote and (quote == "'" or not current or current[-1] != "\\") else quote
        elif char in "\"'":
            quote = char
        elif char == ".":
            pieces.append("".join(current))
            current = []
            continue
        current.append(char)
    pieces.append("".join(current))
    return pieces


class _Locator:
    """Finds the line (1-based) where a dotted key or a string value appears in the raw TOML text."""

    def __init__(self, text: str) -> None:
        self.lines = text.splitlines()
        self.keys: dict[tuple[str, ...], int] = {}
        section: tuple[str, ...] = ()
        for number, line in enumerate(self.lines, start=1):
            header = _HEADER.fullmatch(line)
            if header is not None:
                parsed = _parse_dotted(header.group(1))
                if parsed is not None:
                    section = parsed
                    self.add(section, number)
                    continue
            key = _KEY_LINE.match(line)
            if key is not None:
                parsed = _parse_dotted(key.group(1))
                if parsed is not None:
                    self.add(section + parsed, number)

    def add(self, key: tuple[str, ...], number: int) -> None:
        """Remember the first line where ``key`` and each of its prefixes appear."""
        for length in range(1, len(key) + 1):
            self.keys.setdefault(key[:length], number)

    def line_of(self, key: tuple[str, ...]) -> int | None:
        """The line of ``key``, else of its longest prefix that appears in the text."""
        for length in range(len(key), 0, -1):
            found = self.keys.get(key[:length])
            if found is not None:
                return found
        return None

    def line_of_value(self, key: tuple[str, ...], value: str) -> int | None:
        """The first line at or after ``key``'s line that holds ``value`` as a TOML string."""
        start = self.keys.get(key)
        if start is None:
            return None
        candidates = [json.dumps(value, ensure_ascii=False), f"'{value}'"]
        for number in range(start, len(self.lines) + 1):
            line = self.lines[number - 1]
            if number > start and _HEADER.fullmatch(line):
                break
            if any(c in line for c in candidates):
                return number
        return None


# ---------------------------------------------------------------- loading


def _key_text(key: tuple[str, ...]) -> str:
    return ".".join(p if re.fullmatch(r"[A-Za-z0-9_-]+", p) else json.dumps(p) for p in key)


class _Loader:
    """Turns one parsed TOML document into a Config, raising ConfigError on the first problem."""

    TABLES = ("tree", "policy", "memory", "space", "check", "alerts", "access", "requests")
    TREE_KEYS = ("folders",)
    POLICY_KEYS = ("max_age", "max_size", "auto_cleanup", "on_full")
    MEMORY_KEYS = ("dirty_limit", "cache_limit")

    def __init__(self, source: str, text: str) -> None:
        self.source = source
        self.locator = _Locator(text)

    def error(self, key: tuple[str, ...], message: str, line: int | None = None) -> ConfigError:
        line = line if line is not None else self.locator.line_of(key)
        where = f"line {line}: " if line is not None else ""
        return ConfigError(f"{self.source}: {where}{_key_text(key)}: {message}")

    def check_keys(self, key: tuple[str, ...], table: Any, allowed: tuple[str, ...], what: str) -> None:
        if not isinstance(table, dict):
            raise self.error(key, f"{_show(table)} is not a table (write it as [{_key_text(key)}])")
        for name in table:
            if name not in allowed:
                close = difflib.get_close_matches(name, allowed, n=1)
                hint = f"did you mean {close[0]}? " if close else ""
                raise self.error(key + (name,), f"unknown {what} ({hint}known: {', '.join(allowed)})")

    def load(self, doc: dict[str, Any]) -> Config:
        self.check_keys((), doc, self.TABLES, "table")
        folders = self.load_tree(doc["tree"]) if "tree" in doc else _with_prefixes(SEED_LEAVES)
        policies = self.load_policies(doc.get("policy", {}), folders)
        dirty, cache = self.load_memory(doc.get("memory", {}))
        space = self.load_table(("space",), doc.get("space", {}), {"min_free": (_parse_floor, _DEFAULT_MIN_FREE)})
        check = self.load_table(("check",), doc.get("check", {}), {"interval": (parse_duration, _DEFAULT_CHECK_INTERVAL)})
        alerts = self.load_table(("alerts",), doc.get("alerts", {}), _ALERT_KEYS)
        access = self.load_access(doc.get("access", {}), folders)
        requests = self.load_table(("requests",), doc.get("requests", {}), {"spin": (_parse_spin, DEFAULT_REQUEST_SPIN)})
        return Config(folders, policies, dirty, cache, self.source, min_free=space["min_free"],
                      check_interval=check["interval"], alerts=Alerts(**alerts), access=MappingProxyType(access),
                      request_spin=requests["spin"])

    def load_access(self, table: Any, folders: tuple[str, ...]) -> dict[str, Access]:
        if not isinstance(table, dict):
            raise self.error(("access",), f'{_show(table)} is not a table (write [access."FOLDER"] tables)')
        access = {}
        for name, keys in table.items():
            folder = name.rstrip("/")
            if folder not in folders:
                raise self.error(("access", name), self.unknown_folder(name, folders))
            access[folder] = Access(**self.load_table(("access", name), keys, _ACCESS_KEYS))
        return access

    def load_table(self, key: tuple[str, ...], table: Any, keys: Mapping[str, tuple[Any, Any]]) -> dict[str, Any]:
        """A table of plain keys: each parsed by its parser, or its default."""
        self.check_keys(key, table, tuple(keys), f"key in [{_key_text(key)}]")
        values = {}
        for name, (parse, default) in keys.items():
            if name not in table:
                values[name] = default
                continue
            try:
                values[name] = parse(table[name])
            except ValueError as exc:
                raise self.error(key + (name,), str(exc)) from None
            if parse in (parse_size, parse_duration, _parse_floor, _parse_spin) and values[name]:  # "0" needs no unit
                _warn_bare_number(self.source, key + (name,), table[name])
        return values

    # -- [tree]

    def load_tree(self, tree: Any) -> tuple[str, ...]:
        self.check_keys(("tree",), tree, self.TREE_KEYS, "key in [tree]")
        key = ("tree", "folders")
        if "folders" not in tree:
            raise self.error(key, "missing (list the schema folders, or remove [tree] for the default tree)")
        folders = tree["folders"]
        if not isinstance(folders, list):
            raise self.error(key, f'{_show(folders)} is not a list (write folders = ["cache/models", ...])')
        if not folders:
            raise self.error(key, "is empty (list a folder, or remove [tree] for the default tree)")
        clean = [self.clean_folder(key, item) for item in folders]
        if len(set(clean)) != len(clean):
            log.debug("%s: duplicate folders in tree.folders ignored", self.source)
        return _with_prefixes(tuple(clean))

    def clean_folder(self, key: tuple[str, ...], item: Any) -> str:
        if not isinstance(item, str):
            raise self.error(key, f'{_show(item)} is not a folder path (write a string, e.g. "cache/models")')
        problem = _folder_problem(item)
        if problem is not None:
            raise self.error(key, f"{_show(item)} {problem}", self.locator.line_of_value(key, item))
        return item.rstrip("/")

    # -- [policy.*]

    def load_policies(self, table: Any, folders: tuple[str, ...]) -> dict[str, Policy]:
        if not isinstance(table, dict):
            raise self.error(("policy",), f"{_show(table)} is not a table (write [policy.AREA] tables)")
        known = set(folders)
        configured: dict[str, dict[str, Any]] = {}
        for name, keys in table.items():
            folder = name.rstrip("/")
            if folder not in known:
                raise self.error(("policy", name), self.unknown_folder(name, folders))
            if folder in configured:
                raise self.error(("policy", name), f"configures {folder!r} twice (merge the two tables)")
            configured[folder] = self.load_policy_keys(("policy", name), keys)
        policies: dict[str, Policy] = {}
        for folder in folders:  # parents before children: an ancestor is always resolved first
            if "/" not in folder:
                policies[folder] = _merge(_area_default(folder), configured.get(folder, {}))
            elif folder in configured:
                parent = _nearest(policies, folder)
                policies[folder] = _merge(parent, configured[folder])
        return policies

    def unknown_folder(self, name: str, folders: tuple[str, ...]) -> str:
        close = difflib.get_close_matches(name.strip("/"), folders, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        areas = ", ".join(f for f in folders if "/" not in f)
        return f"{name!r} is not a schema folder of the tree ({hint}areas: {areas})"

    def load_policy_keys(self, key: tuple[str, ...], table: Any) -> dict[str, Any]:
        if isinstance(table, dict):
            for name, value in table.items():
                if isinstance(value, dict):
                    hint = f'for a deeper folder write [policy."{key[-1]}/{name}"]'
                    raise self.error(key + (name,), f"is a table inside a policy ({hint})")
        self.check_keys(key, table, self.POLICY_KEYS, "policy key")
        values: dict[str, Any] = {}
        for name, raw in table.items():
            try:
                values[name] = _POLICY_PARSERS[name](raw)
            except ValueError as exc:
                raise self.error(key + (name,), str(exc)) from None
            _warn_bare_number(self.source, key + (name,), raw)
        return values

    # -- [memory]

    def load_memory(self, table: Any) -> tuple[int, int]:
        self.check_keys(("memory",), table, self.MEMORY_KEYS, "key in [memory]")
        values = {"dirty_limit": _DEFAULT_DIRTY_LIMIT, "cache_limit": _DEFAULT_CACHE_LIMIT}
        for name, raw in table.items():
            try:
                values[name] = parse_size(raw)
            except ValueError as exc:
                raise self.error(("memory", name), str(exc)) from None
            _warn_bare_number(self.source, ("memory", name), raw)
        return values["dirty_limit"], values["cache_limit"]


def _folder_problem(path: str) -> str | None:
    """Why ``path`` cannot be a schema folder, or None when it can (a trailing "/" is fine)."""
    hint = '(write a path below the mount root, e.g. "cache/models")'
    if "\0" in path:
        return f"contains a NUL character {hint}"
    if "\\" in path:
        return 'contains a backslash (separate folders with "/")'
    if path.startswith("/"):
        return f"is absolute {hint}"
    path = path.rstrip("/")
    if not path:
        return "is empty (remove it)"
    for part in path.split("/"):
        if part == "":
            return 'has an empty component (write "a/b", not "a//b")'
        if part in (".", ".."):
            return f'has a "{part}" component {hint}'
        if len(part.encode("utf-8")) > MAX_COMPONENT_BYTES:
            return f"has a component longer than {MAX_COMPONENT_BYTES} bytes (shorten it)"
    return None


def _parse_percent(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 100:
        raise ValueError(f"{_show(value)} is not a percentage (write a whole number from 1 to 100)")
    return value


def _parse_count(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{_show(value)} is not a count (write a whole number, at least 1)")
    return value


def _parse_command(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{_show(value)} is not a command (write a shell command line as a string)")
    return value


_ALERT_KEYS = {
    "capacity_percent": (_parse_percent, Alerts.capacity_percent),
    "refusals_per_minute": (_parse_count, Alerts.refusals_per_minute),
    "command": (_parse_command, Alerts.command),
    "command_timeout": (parse_duration, Alerts.command_timeout),
}


def _parse_user(value: Any) -> int:
    return _parse_id(value, pwd.getpwnam, "user")


def _parse_group(value: Any) -> int:
    return _parse_id(value, grp.getgrnam, "group")


def _parse_id(value: Any, lookup: Any, what: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**32:
        return value
    if isinstance(value, str) and value:
        try:
            entry = lookup(value)
        except KeyError:
            raise ValueError(f"{_show(value)}: no such {what} on this machine") from None
        return entry[2]
    raise ValueError(f"{_show(value)} is not a {what} (write a name or a numeric id)")


def _parse_mode(value: Any) -> int:
    try:
        mode = int(value, 8) if isinstance(value, str) else value
    except ValueError:
        mode = None
    if isinstance(mode, bool) or not isinstance(mode, int) or not 0 <= mode <= 0o7777:
        raise ValueError(f'{_show(value)} is not a mode (write octal digits as a string, e.g. "0750")')
    return mode


_ACCESS_KEYS = {"owner": (_parse_user, None), "group": (_parse_group, None), "mode": (_parse_mode, None)}


def _parse_spin(value: Any) -> float:
    """A duration up to MAX_REQUEST_SPIN, or 0 for none."""
    if value == 0 or value == "0":
        return 0.0
    seconds = parse_duration(value)
    if seconds > MAX_REQUEST_SPIN:
        raise ValueError(f"{_show(value)} is longer than {MAX_REQUEST_SPIN * 1e3:g}ms, which would keep a core busy "
                         "for nothing between requests (use e.g. 50us, or 0 to sleep at once)")
    return seconds


def _parse_floor(value: Any) -> int:
    """A size, or 0 for no floor."""
    if value == 0 or value == "0":
        return 0
    return parse_size(value)


def _parse_auto_cleanup(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{_show(value)} is not true or false (write true or false, without quotes)")
    return value


def _parse_on_full(value: Any) -> str:
    if not isinstance(value, str) or value not in ON_FULL_CHOICES:
        raise ValueError(f'{_show(value)} is not a choice (use "evict" or "refuse")')
    return value


_POLICY_PARSERS = {
    "max_age": parse_duration,
    "max_size": parse_size,
    "auto_cleanup": _parse_auto_cleanup,
    "on_full": _parse_on_full,
}


def _warn_bare_number(source: str, key: tuple[str, ...], raw: Any) -> None:
    """A bare number is seconds or bytes: say so when that is probably not what was meant."""
    if isinstance(raw, bool) or not isinstance(raw, (int, float)):
        return
    if key[-1] == "max_age" and raw < 60:
        log.warning('%s: %s = %s means %s seconds (write e.g. "%sh" for hours)',
                    source, _key_text(key), raw, raw, raw)
    elif key[-1] != "max_age" and raw < MiB:
        log.warning("%s: %s = %s means %s bytes (write e.g. \"%sMB\")", source, _key_text(key), raw, raw, raw)


def _merge(base: Policy, values: Mapping[str, Any]) -> Policy:
    fields = {"max_age": base.max_age, "max_size": base.max_size,
              "auto_cleanup": base.auto_cleanup, "on_full": base.on_full}
    fields.update(values)
    return Policy(**fields)


def _nearest(policies: Mapping[str, Policy], folder: str) -> Policy:
    """The policy of the nearest configured proper ancestor of ``folder`` (its area at least)."""
    key = folder
    while "/" in key:
        key = key.rsplit("/", 1)[0]
        if key in policies:
            return policies[key]
    raise KeyError(folder)  # unreachable: every area has a policy


def load_config(path: Path) -> Config:
    """Read and validate the config file at ``path``; missing keys take defaults.

    Raises ConfigError (one line, naming the file, the line and the key) when the file is
    missing, unreadable, not TOML, or holds a value tempfs cannot use.
    """
    source = str(path)
    text = _read_text(Path(path), source)
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: {_syntax_message(str(exc))}") from None
    config = _Loader(source, text).load(doc)
    log.info("loaded %s: %d schema folders, areas %s", source, len(config.folders), ", ".join(config.areas))
    return config


def _read_text(path: Path, source: str) -> str:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{source}: not found") from None
    except OSError as exc:
        raise ConfigError(f"{source}: cannot read: {exc.strerror or exc}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ConfigError(f"{source}: line {line}: not UTF-8 text (save the file as UTF-8)") from None


def _syntax_message(message: str) -> str:
    """tomllib's "Invalid value (at line 3, column 9)" -> "line 3: invalid TOML: Invalid value (column 9)"."""
    match = re.fullmatch(r"(.*) \(at line (\d+), column (\d+)\)", message)
    if match is None:
        return f"invalid TOML: {message}"
    return f"line {match.group(2)}: invalid TOML: {match.group(1)} (column {match.group(3)})"
