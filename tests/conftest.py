"""Session fixtures: the tiny random SD 1.x model (diffusers layout) and its ONNX export.

Built once per test run into a temporary folder, never fetched from the network. Tests that
need them skip, with the reason, when the export stack (torch, diffusers, ...) is missing.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXPORT_STACK = ("torch", "diffusers", "transformers", "onnx", "safetensors")


def _need_export_stack() -> None:
    for name in EXPORT_STACK:
        pytest.importorskip(name, reason=f"{name} is not installed (pip install 'sdrt[export]')")


def _model_builder() -> ModuleType:
    """models/build_random_sd.py, which is a script, not an installed module."""
    path = ROOT / "models" / "build_random_sd.py"
    spec = importlib.util.spec_from_file_location("build_random_sd", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny SD 1.x diffusers folder (epsilon prediction, seed 0): models/configs/tiny_sd."""
    _need_export_stack()
    out = tmp_path_factory.mktemp("tiny_sd") / "tiny-sd"
    return _model_builder().build_random_sd("tiny_sd", out, seed=0)


@pytest.fixture(scope="session")
def tiny_onnx_dir(tiny_sd_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny_sd_dir exported to optimum's ONNX layout with manifest.json (graphs checked)."""
    from sdrt.export.onnx_export import export_pipeline

    return export_pipeline(tiny_sd_dir, tmp_path_factory.mktemp("tiny_onnx") / "tiny-sd-onnx")


@pytest.fixture(scope="session")
def tiny_sd_v_dir(tiny_sd_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny_sd_dir's weights with a v_prediction scheduler config."""
    out = tmp_path_factory.mktemp("tiny_sd_v") / "tiny-sd-v"
    shutil.copytree(tiny_sd_dir, out)
    config_path = out / "scheduler" / "scheduler_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "prediction_type": "v_prediction"}))
    return out


@pytest.fixture(scope="session")
def tiny_onnx_v_dir(tiny_sd_v_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny_sd_v_dir exported (graphs equal tiny_onnx_dir's, so not re-checked)."""
    from sdrt.export.onnx_export import export_pipeline

    out = tmp_path_factory.mktemp("tiny_onnx_v") / "tiny-sd-v-onnx"
    return export_pipeline(tiny_sd_v_dir, out, check=False)
