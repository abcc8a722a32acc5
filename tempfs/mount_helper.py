"""mount.fuse.tempfs: the helper mount(8) runs for `mount -t fuse.tempfs` and /etc/fstab lines.

    mount -t fuse.tempfs STORE MOUNTPOINT -o config=FILE,key_file=FILE[,log_file=FILE][,allow_nonempty]
    mount -t fuse.tempfs STORE MOUNTPOINT -o config=FILE,passphrase_file=FILE     (a passphrase store)
    mount -t fuse.tempfs STORE MOUNTPOINT -o config=FILE,ephemeral                (key in memory only)
    /srv/vision/data/.tempfs-store  /srv/vision/data/temp  fuse.tempfs  config=...,key_file=...,nofail  0 0

For a type `fuse.X`, mount(8) (libmount) looks for `/sbin/mount.fuse.X` and only then falls
back to `/sbin/mount.fuse3`, which would run a program named `X` (here `tempfs`, whose command
line is another one) through /bin/sh. It searches /sbin only, never $PATH, so this helper is
installed as `/sbin/mount.fuse.tempfs`, a symlink to the console script of the venv. mount(8)
calls it as

    mount.fuse.tempfs STORE MOUNTPOINT [-s] [-f] [-n] [-v] [-o OPTIONS] [-t TYPE]

with OPTIONS holding `rw` (or `ro`), the fstab options libmount does not consume itself (`nofail`,
`_netdev`, `user`, ...), and the filesystem's own. tempfs's own options:

    config=FILE           the config file (written with the defaults if missing)  required
    key_file=FILE         the key file (created, mode 0600, for a new store)      required, unless:
    passphrase_file=FILE  the passphrase (mode 0600) of a passphrase-protected store (a new store
                          given one gets a key slot, no key file)
    ephemeral             a fresh key that lives only in the daemon's memory (tempfs mount --ephemeral)
    log_file=FILE         the daemon log (default: tempfs.log beside the store)
    allow_nonempty        mount over a folder that holds files

Paths must be absolute: mount(8) from /etc/fstab runs with `/` as its working directory. The
generic options of mount(8) and fstab (rw, defaults, auto, noauto, nofail, _netdev, user, ...,
x-systemd.*, comment=...) are accepted and ignored; `ro` is refused, since tempfs has no
read-only mode; anything else is refused with one line and exit code 2 (with `-s`, sloppy, it is
ignored with a warning). STORE may be written `tempfs:STORE`, as mount(8) and df show it: an
fstab line spelled that way is recognised as mounted by `mount -a`, which then skips it.

The mount itself is `tempfs mount` without `--foreground`: the same checks, the daemon started in
the background, and this helper returns once the mount answers. Exit codes are those of
`tempfs mount` (see cli.Exit). Unmount with plain `umount MOUNTPOINT` (or `tempfs umount`): the
daemon flushes everything to the store and exits.
"""
from __future__ import annotations

import contextlib
import io
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from .cli import Exit, Failure

PROG = "mount.fuse.tempfs"
SOURCE_PREFIX = "tempfs:"
TYPES = ("fuse.tempfs", "tempfs")
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

USAGE = (f"usage: {PROG} STORE MOUNTPOINT [-s] [-f] [-n] [-v] "
         "-o config=FILE,{key_file=FILE|passphrase_file=FILE|ephemeral}[,log_file=FILE][,allow_nonempty]")

# Options of mount(8) and fstab that say nothing to tempfs: accepted and ignored.
GENERIC_OPTIONS = frozenset({
    "rw", "defaults", "auto", "noauto", "nofail", "_netdev", "user", "nouser", "users", "owner",
    "group", "exec", "noexec", "suid", "nosuid", "dev", "nodev",
})
GENERIC_PREFIXES = ("x-", "X-", "comment=")
PATH_OPTIONS = {"config": "config", "key_file": "key_file", "passphrase_file": "passphrase_file",
                "log_file": "log_file"}
FLAG_OPTIONS = ("allow_nonempty", "ephemeral")
KNOWN = "config=FILE, key_file=FILE, passphrase_file=FILE, ephemeral, log_file=FILE, allow_nonempty"


class UsageError(Failure):
    def __init__(self, message: str) -> None:
        super().__init__(Exit.USAGE, message)


class HelpRequested(Exception):
    pass


@dataclass
class Request:
    """What mount(8) asked for, parsed."""
    store: Path
    mountpoint: Path
    config: Optional[Path] = None
    key_file: Optional[Path] = None
    passphrase_file: Optional[Path] = None
    log_file: Optional[Path] = None
    allow_nonempty: bool = False
    ephemeral: bool = False
    fake: bool = False          # -f (fake): check the arguments, mount nothing
    sloppy: bool = False        # -s: ignore unknown options
    verbose: bool = False       # -v: say what was done
    ignored: list[str] = field(default_factory=list)   # generic options, ignored
    unknown: list[str] = field(default_factory=list)   # ignored because of -s

    def mount_argv(self) -> list[str]:
        """The command line of `tempfs mount` (in the background) for this request."""
        argv = ["mount", str(self.mountpoint), "--store", str(self.store), "--config", str(self.config)]
        for option, value in (("--key-file", self.key_file), ("--passphrase-file", self.passphrase_file),
                              ("--log-file", self.log_file)):
            if value:
                argv += [option, str(value)]
        for option, value in (("--allow-nonempty", self.allow_nonempty), ("--ephemeral", self.ephemeral)):
            if value:
                argv.append(option)
        return argv


def split_options(text: str) -> list[str]:
    """Splits a mount option string at commas outside double quotes (libmount's quoting:
    `config="/srv/a,b/tempfs.toml"`); the quotes are removed."""
    options, current, quoted = [], [], False
    for ch in text:
        if ch == '"':
            quoted = not quoted
        elif ch == "," and not quoted:
            options.append("".join(current))
            current = []
        else:
            current.append(ch)
    if quoted:
        raise UsageError(f"unbalanced double quote in the options: {text}")
    options.append("".join(current))
    return [o for o in options if o]


def _absolute(what: str, value: str) -> Path:
    if not value:
        raise UsageError(f"{what} needs a value (an absolute path)")
    if not os.path.isabs(value):
        raise UsageError(f"{what}{value}: give an absolute path (mount from /etc/fstab runs in /)")
    return Path(os.path.normpath(value))


def parse_args(argv: Sequence[str]) -> Request:
    """Parses `STORE MOUNTPOINT [-s] [-f] [-n] [-v] [-o OPTIONS]... [-t TYPE]`; raises UsageError."""
    positional: list[str] = []
    option_strings: list[str] = []
    flags = {"sloppy": False, "fake": False, "verbose": False}
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if arg in ("-h", "--help"):
            raise HelpRequested()
        if arg == "--":
            positional.extend(args[i:])
            break
        if not arg.startswith("-") or arg == "-":
            positional.append(arg)
            continue
        if arg.startswith("--"):
            raise UsageError(f"unknown argument {arg} ({USAGE})")
        letters = arg[1:]
        while letters:
            letter, letters = letters[0], letters[1:]
            if letter in "otN":
                value = letters
                letters = ""
                if not value:
                    if i >= len(args):
                        raise UsageError(f"-{letter} needs a value ({USAGE})")
                    value = args[i]
                    i += 1
                if letter == "o":
                    option_strings.append(value)
                elif letter == "t":
                    if value not in TYPES:
                        raise UsageError(f"filesystem type {value}: this helper mounts fuse.tempfs only")
                else:
                    raise UsageError("-N (mount in another namespace) is not supported; "
                                     "run mount inside that namespace instead")
            elif letter == "s":
                flags["sloppy"] = True
            elif letter == "f":
                flags["fake"] = True
            elif letter == "v":
                flags["verbose"] = True
            elif letter in "ni":   # -n: no mtab; -i: no further helper (both: nothing to do)
                pass
            else:
                raise UsageError(f"unknown argument -{letter} ({USAGE})")
    if len(positional) != 2:
        raise UsageError(f"expected STORE and MOUNTPOINT, got {len(positional)} argument(s) ({USAGE})")
    source, target = positional
    if source.startswith(SOURCE_PREFIX):
        source = source[len(SOURCE_PREFIX):]
    request = Request(store=_absolute("STORE ", source),
                      mountpoint=Path(os.path.abspath(target)), **flags)
    for text in option_strings:
        for option in split_options(text):
            _apply_option(request, option)
    example = "e.g. -o config=/srv/vision/config/tempfs.toml,key_file=/srv/vision/config/tempfs.key"
    if request.config is None:
        raise UsageError(f"missing option config=FILE ({example})")
    if request.key_file is None and request.passphrase_file is None and not request.ephemeral:
        raise UsageError(f"missing option key_file=FILE, or passphrase_file=FILE, or ephemeral ({example})")
    return request


def _apply_option(request: Request, option: str) -> None:
    name, eq, value = option.partition("=")
    if name in PATH_OPTIONS:
        if not eq:
            raise UsageError(f"option {name} needs a value: {name}=FILE (an absolute path)")
        setattr(request, PATH_OPTIONS[name], _absolute(f"{name}=", value))
    elif name in FLAG_OPTIONS:
        if eq:
            raise UsageError(f"option {name} takes no value: {option}")
        setattr(request, name, True)
    elif name == "ro" and not eq:
        raise UsageError("option ro: tempfs has no read-only mode (it writes the store and expires "
                         "files by itself); mount it rw, and use permissions to keep writers out")
    elif option in GENERIC_OPTIONS or option.startswith(GENERIC_PREFIXES):
        request.ignored.append(option)
    elif request.sloppy:
        request.unknown.append(option)
    else:
        raise UsageError(f"unknown option {option!r}; tempfs takes {KNOWN} "
                         "(and ignores mount's generic options such as rw, noauto, nofail, _netdev)")


def run(request: Request) -> int:
    from . import cli
    for option in request.unknown:
        print(f"{PROG}: warning: ignoring unknown option {option!r} (sloppy mount, -s)", file=sys.stderr)
    argv = request.mount_argv()
    if request.verbose:
        print(f"{PROG}: tempfs {' '.join(argv)}"
              + (f"  (ignored: {','.join(request.ignored)})" if request.ignored else ""))
    # through the parser of `tempfs mount`, so that every option it has gets its default
    args = cli.build_parser().parse_args(argv)
    if request.fake:
        return Exit.OK
    out = io.StringIO()
    with contextlib.redirect_stdout(out):    # where the store, key and log are: shown with -v only
        code = int(cli.cmd_mount(args))
    if request.verbose:
        sys.stdout.write(out.getvalue())
    return code


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # mount(8) runs helpers without PATH; tempfs needs fusermount3, and the daemon's alert commands
    os.environ.setdefault("PATH", DEFAULT_PATH)
    try:
        return run(parse_args(argv))
    except HelpRequested:
        print(USAGE)
        print(__doc__.split("\n\n", 1)[1].rstrip())
        return int(Exit.OK)
    except Failure as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return int(e.code)
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # one line, as every tempfs failure; mount(8) shows it as is
        print(f"{PROG}: unexpected failure: {type(e).__name__}: {e}", file=sys.stderr)
        return int(Exit.FAILED)


if __name__ == "__main__":
    raise SystemExit(main())
