#!/usr/bin/env bash
# Runs the test suite from a fresh clone: makes .venv if missing, installs sdrt with its export,
# openvino, serve, ray and dev extras (torch's CPU build first, so the export extra does not pull
# CUDA), then pytest. Arguments go to pytest. "No tests collected" is a failure.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -e ".[export,openvino,serve,ray,dev]"
set +e
.venv/bin/python -m pytest "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
    echo "tests/run.sh: no tests collected" >&2
    exit 1
fi
exit "$rc"
