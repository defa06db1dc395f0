"""A tiny SD whose text encoder's final layer norm has a bias, exported once per run.

The shared tiny SD keeps that bias at zero, so its last hidden state averages to exactly 0 and
A1111's "Original" emphasis (rescale by mean before / mean after) divides rounding noise by
rounding noise there; real SD 1.x encoders have a bias, and so does this copy."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

BIAS_SEED = 5
BIAS_SCALE = 0.3  # a mean of the order of real SD 1.5 hidden states' (≈ -0.1 … 0.1)


@pytest.fixture(scope="session")
def biased_sd_dir(tiny_sd_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from safetensors.numpy import load_file, save_file

    out = tmp_path_factory.mktemp("biased") / "tiny-sd-biased"
    shutil.copytree(tiny_sd_dir, out)
    path = out / "text_encoder" / "model.safetensors"
    weights = load_file(path)
    key = "text_model.final_layer_norm.bias"
    rng = np.random.default_rng(BIAS_SEED)
    weights[key] = (rng.normal(0.0, BIAS_SCALE, weights[key].shape)
                    + BIAS_SCALE).astype(weights[key].dtype)
    save_file(weights, path)
    return out


@pytest.fixture(scope="session")
def biased_onnx_dir(biased_sd_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from sdrt.export.onnx_export import export_pipeline

    out = tmp_path_factory.mktemp("biased-onnx") / "tiny-sd-biased-onnx"
    return export_pipeline(biased_sd_dir, out, check=False)
