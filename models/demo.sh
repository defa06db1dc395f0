#!/usr/bin/env bash
# The main job on a fresh clone: install sdrt's runtime in .venv (numpy + ONNX Runtime, no torch)
# and draw the prompt with the embedded model (models/embedded/: 64×64 shapes, trained here).
# Generation needs no network; only the first pip install does.
set -euo pipefail
cd "$(dirname "$0")/.."
prompt="${1:-a red circle on a blue background}"
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q -e .
.venv/bin/sdrt generate "$prompt" --seed 1 -o outputs
