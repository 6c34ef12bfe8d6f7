#!/usr/bin/env bash
# The test command: installs everything the tests need on a fresh Debian machine
# (apt packages, binfmt_misc, a virtual environment with this package), then runs
# pytest in parallel. Extra arguments go to pytest (e.g. ./test.sh -m slow).
set -euo pipefail
cd "$(dirname "$0")"

scripts/install-deps.sh test

if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[test]'

set +e
.venv/bin/python -m pytest -n "${KIOSK_TEST_WORKERS:-auto}" -p no:cacheprovider --durations=15 "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
    echo "test.sh: no tests were collected: that is a failure" >&2
    exit 1
fi
exit "$rc"
