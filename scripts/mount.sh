#!/usr/bin/env bash
# Mount tempfs at data/temp (run from anywhere; paths are relative to the repo root).
#   scripts/mount.sh [extra tempfs mount options...]   mount (installs what is missing first)
#   scripts/mount.sh --unmount                          flush and unmount
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$(pwd)
MNT=data/temp
STORE=data/.tempfs-store
CONFIG=config/tempfs.toml
KEY=config/tempfs.key

say() { echo "mount.sh: $*"; }
die() { echo "mount.sh: $*" >&2; exit 1; }

is_live_mount() {  # mountinfo, not mountpoint(1): a dead FUSE mount must not count
    local abs
    abs=$(realpath -m "$1")
    awk -v mp="$abs" '{ split($0, p, " - "); split(p[1], f, " "); split(p[2], t, " ");
                        if (f[5] == mp && t[1] == "fuse.tempfs") found = 1 }
                      END { exit !found }' /proc/self/mountinfo \
        && stat -f -- "$1" >/dev/null 2>&1   # statfs always reaches the daemon
}

if [[ ${1:-} == --unmount || ${1:-} == -u ]]; then
    [[ -x .venv/bin/tempfs ]] || die "no .venv/bin/tempfs; nothing was mounted by this script"
    exec .venv/bin/tempfs umount "$MNT"
fi

# 1. system packages, only when missing
missing=()
command -v fusermount3 >/dev/null 2>&1 || missing+=(fuse3)
dpkg -s libfuse3-dev >/dev/null 2>&1 || missing+=(libfuse3-dev)
command -v pkg-config >/dev/null 2>&1 || missing+=(pkg-config)
command -v setfattr >/dev/null 2>&1 || missing+=(attr)
python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || missing+=(python3-venv)
if ((${#missing[@]})); then
    [[ $(id -u) -eq 0 ]] || die "missing packages: ${missing[*]}; run as root or: sudo apt-get install ${missing[*]}"
    say "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update
    apt-get install -y "${missing[@]}" python3-dev build-essential
fi
[[ -e /dev/fuse ]] || die "/dev/fuse is missing: load the fuse module (modprobe fuse) or give the container /dev/fuse"

# 2. the venv with the package (installed again when pyproject.toml changed: new dependencies)
STAMP=.venv/.tempfs-pyproject.sha256
if [[ ! -x .venv/bin/tempfs ]] || ! sha256sum --quiet -c "$STAMP" >/dev/null 2>&1; then
    say "creating or updating .venv and installing tempfs"
    [[ -x .venv/bin/python ]] || python3 -m venv .venv
    .venv/bin/pip install -q -e .
    sha256sum pyproject.toml > "$STAMP"
fi

# 2b. the helper mount(8) runs for `mount -t fuse.tempfs` and /etc/fstab lines; mount(8)
#     looks for it in /sbin only, never in $PATH
HELPER=/sbin/mount.fuse.tempfs
if [[ ! -e $HELPER ]]; then     # missing, or a dangling symlink
    if [[ $(id -u) -eq 0 ]]; then
        ln -sfn "$ROOT/.venv/bin/mount.fuse.tempfs" "$HELPER"
        say "installed $HELPER (for mount -t fuse.tempfs and /etc/fstab)"
    else
        say "for mount -t fuse.tempfs and /etc/fstab, as root: ln -sfn $ROOT/.venv/bin/mount.fuse.tempfs $HELPER"
    fi
elif [[ $(readlink -f "$HELPER") != "$(readlink -f .venv/bin/mount.fuse.tempfs)" ]]; then
    say "note: $HELPER runs $(readlink -f "$HELPER"), not this checkout's helper"
fi

# 3. the mountpoint
mkdir -p "$MNT"
if is_live_mount "$MNT"; then
    say "tempfs is already mounted at $ROOT/$MNT"
    say "unmount with: scripts/mount.sh --unmount   (or .venv/bin/tempfs umount $MNT)"
    exit 0
fi

# 4. mount (in the background; returns once the mount answers)
.venv/bin/tempfs mount "$MNT" "$@"   # on failure: its one-line message, and set -e exits with its code
is_live_mount "$MNT" || die "tempfs mount returned but $MNT is not a live mount"

# tempfs mount itself printed where the store, key, config and log are (the real paths,
# including any --store/--config/--key-file/--log-file passed through).
say "tempfs is mounted at $ROOT/$MNT"
say "unmount with: scripts/mount.sh --unmount   (or .venv/bin/tempfs umount $MNT)"
say "status:       .venv/bin/tempfs status $MNT"
