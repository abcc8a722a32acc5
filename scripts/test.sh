#!/usr/bin/env bash
# Run the test suite: scripts/test.sh [pytest args...]
# Sets up .venv (and, as root, the system packages the tests use) when missing.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

need_pkgs=()
for pair in fusermount3:fuse3 setfattr:attr sqlite3:sqlite3 pkg-config:pkg-config fincore:util-linux-extra; do
    cmd=${pair%%:*} pkg=${pair#*:}
    command -v "$cmd" >/dev/null 2>&1 || need_pkgs+=("$pkg")
done
if ! dpkg -s libfuse3-dev >/dev/null 2>&1 && command -v dpkg >/dev/null 2>&1; then
    need_pkgs+=(libfuse3-dev)
fi
if ((${#need_pkgs[@]})); then
    if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null 2>&1; then
        echo "test.sh: installing ${need_pkgs[*]}" >&2
        apt-get update
        DEBIAN_FRONTEND=noninteractive apt-get install -y "${need_pkgs[@]}"
    else
        echo "test.sh: missing ${need_pkgs[*]}; install them (as root: apt-get install ${need_pkgs[*]})" >&2
        exit 1
    fi
fi

# (installed again when pyproject.toml changed: new dependencies)
STAMP=.venv/.tempfs-test-pyproject.sha256
if ! .venv/bin/python -c 'import tempfs, pyfuse3, pytest, pytest_timeout' >/dev/null 2>&1 ||
   ! sha256sum --quiet -c "$STAMP" >/dev/null 2>&1; then
    [[ -x .venv/bin/python ]] || python3 -m venv .venv
    .venv/bin/pip install -q -e '.[test]'
    sha256sum pyproject.toml > "$STAMP"
fi

set +e
.venv/bin/python -m pytest -q "$@"
rc=$?
set -e
if [[ $rc -eq 5 ]]; then
    echo "test.sh: pytest collected no tests" >&2
fi
exit "$rc"
