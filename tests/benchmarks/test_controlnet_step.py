"""benchmarks/controlnet_step.py's own measures, on the tiny SD export: the multiply-accumulate
count it reads from a graph equals torch's FlopCounterMode on the diffusers model, and the UNet
graph it edits the residual inputs out of gives what the exported one gives fed zero residuals."""

import json
import shutil

import numpy as np
import pytest

from sdrt.benchmarks.controlnet_step import (
    NO_RESIDUALS,
    _unet_feeds,
    graph_macs,
    without_residuals,
)
from sdrt.runtime.control.residuals import residual_channels, residual_levels, residual_shapes
from sdrt.runtime.session import open_session

# The edit only removes `x + 0` Adds: the same kernels on the same values, so equal outputs up to
# the last bit of float32 rounding where a backend fuses differently.
EDIT_ATOL = 1e-6
LATENT = (2, 4, 32, 32)  # the tiny UNet's native latent, with CFG's two rows


@pytest.fixture(scope="module")
def unet_config(tiny_onnx_dir) -> dict:
    return json.loads((tiny_onnx_dir / "unet" / "config.json").read_text())


def test_graph_macs_equal_torch_flop_counter(tiny_sd_dir, tiny_onnx_dir, unet_config):
    torch = pytest.importorskip("torch")
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor
    from torch.utils.flop_counter import FlopCounterMode

    context = (LATENT[0], 77, unet_config["cross_attention_dim"])
    residuals = residual_shapes(residual_levels(unet_config), residual_channels(unet_config),
                                LATENT[0], LATENT[2:])
    counted = graph_macs(tiny_onnx_dir / "unet" / "model.onnx",
                         {"sample": LATENT, "timestep": (), "encoder_hidden_states": context}
                         | residuals)
    unet = UNet2DConditionModel.from_pretrained(tiny_sd_dir / "unet")
    unet.set_attn_processor(AttnProcessor())  # bmm attention: the counter misses CPU SDPA
    with torch.no_grad(), FlopCounterMode(display=False) as flops:
        unet(torch.zeros(LATENT), torch.tensor(999.0), torch.zeros(context))
    assert counted == flops.get_total_flops() // 2  # a multiply-accumulate is two flops


def test_unet_without_residual_inputs_equals_zeros_fed(tiny_onnx_dir, unet_config, tmp_path):
    unet = shutil.copytree(tiny_onnx_dir / "unet", tmp_path / "unet")  # the fixture stays as is
    plain = open_session(without_residuals(unet / "model.onnx", NO_RESIDUALS), "ort")
    exported = open_session(unet / "model.onnx", "ort")
    assert sorted(plain.inputs) == ["encoder_hidden_states", "sample", "timestep"]
    feeds = _unet_feeds(exported, LATENT)
    zeros = {name: np.zeros(shape, np.float32) for name, shape in residual_shapes(
        residual_levels(unet_config), residual_channels(unet_config), LATENT[0],
        LATENT[2:]).items()}
    expected = exported.run(feeds | zeros)["out_sample"]
    np.testing.assert_allclose(plain.run(feeds)["out_sample"], expected, rtol=0, atol=EDIT_ATOL)
    assert np.abs(expected).max() > 0.1  # a real prediction, not an empty graph's
