"""sdrt against diffusers, optimum (ONNX Runtime), optimum-intel and OpenVINO GenAI on the same
weights in one run: `python -m sdrt.benchmarks.peers` (compare.py; README.md beside it).

The `run_*.py` scripts here run inside each peer's own venv and import no sdrt.
"""
