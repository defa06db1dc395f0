#!/usr/bin/env bash
# The main job on a fresh clone: install sdrt in .venv, build and export a tiny SD 1.x model
# (until the embedded model ships), then generate an image from the prompt given.
set -euo pipefail
cd "$(dirname "$0")/.."
prompt="${1:-a red circle on a blue background}"
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -e ".[export]"
model=models/generated/tiny-sd
if [ ! -d "$model-onnx" ]; then
    .venv/bin/python models/build_random_sd.py tiny_sd "$model"
    .venv/bin/sdrt export "$model" "$model-onnx"
fi
.venv/bin/sdrt generate "$prompt" --model "$model-onnx" --seed 1 -o outputs
