"""Residual names, levels and shapes, checked against diffusers' UNet2DConditionModel and
ControlNetModel.from_unet on the tiny SD and SDXL configs; guess-mode scales and the keep rule
against diffusers' StableDiffusionControlNetPipeline formulas."""

import json
from pathlib import Path

import numpy as np
import pytest

from sdrt.runtime.control.residuals import (
    MID_RESIDUAL,
    guess_scales,
    keep,
    level_size,
    residual_channels,
    residual_levels,
    residual_names,
    residual_shapes,
    zero_residuals,
)

CONFIGS = Path(__file__).resolve().parents[3] / "models" / "configs"
LATENT_HW = (13, 10)  # not a multiple of 8: ceil-halving shows at every level


def _config(name: str) -> dict:
    return json.loads((CONFIGS / name / "unet" / "config.json").read_text())


def test_names_are_downs_then_mid():
    assert residual_names(2) == ("down_block_residual_0", "down_block_residual_1", MID_RESIDUAL)


def test_level_size_ceil_halves():
    assert [level_size(13, k) for k in range(4)] == [13, 7, 4, 2]


def test_shapes_need_one_channel_count_per_level():
    with pytest.raises(ValueError):
        residual_shapes((0, 0), (32,), 1, LATENT_HW)


def test_zero_residuals_are_zero_float32():
    zeros = zero_residuals((0, 1, 1), (8, 16, 16), 2, (5, 5))
    assert zeros[MID_RESIDUAL].shape == (2, 16, 3, 3) and zeros[MID_RESIDUAL].dtype == np.float32
    assert not any(z.any() for z in zeros.values())


def _diffusers_residuals(config: dict, hw: tuple[int, int]):
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel.from_config(config).eval()
    controlnet = diffusers.ControlNetModel.from_unet(unet).eval()
    sample = torch.randn(1, 4, *hw)
    context = torch.randn(1, 3, config["cross_attention_dim"])
    kwargs = {}
    if config.get("addition_embed_type") == "text_time":
        time_ids = torch.zeros(1, 6)
        pooled = config["projection_class_embeddings_input_dim"] - 6 * config[
            "addition_time_embed_dim"]
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.zeros(1, pooled), "time_ids": time_ids}
    cond = torch.rand(1, 3, hw[0] * 8, hw[1] * 8)
    with torch.no_grad():
        downs, mid = controlnet(sample, 1.0, context, cond, return_dict=False, **kwargs)
        # The UNet adds them to its skip samples: a shape mismatch would raise here.
        unet(sample, 1.0, context, down_block_additional_residuals=downs,
             mid_block_additional_residual=mid, **kwargs)
    return [tuple(t.shape) for t in (*downs, mid)]


@pytest.mark.parametrize("name", ["tiny_sd", "tiny_sdxl"])
def test_levels_and_channels_match_diffusers(name):
    config = _config(name)
    expected = _diffusers_residuals(config, LATENT_HW)
    levels, channels = residual_levels(config), residual_channels(config)
    shapes = residual_shapes(levels, channels, 1, LATENT_HW)
    assert list(shapes) == list(residual_names(len(expected) - 1))
    assert list(shapes.values()) == expected


@pytest.mark.parametrize("name", ["sd15", "sdxl"])
def test_full_size_configs_count(name):
    # SD 1.5: 12 down residuals + mid; SDXL: 9 + mid (the counts ControlNets for them return).
    levels = residual_levels(_config(name))
    assert len(levels) - 1 == {"sd15": 12, "sdxl": 9}[name]
    assert levels[-1] == max(levels)


def test_guess_scales_match_torch_logspace():
    torch = pytest.importorskip("torch")
    expected = torch.logspace(-1, 0, 13).numpy()
    np.testing.assert_allclose(guess_scales(12), expected, rtol=1e-6)
    assert guess_scales(12)[-1] == 1.0


# Expected values worked by hand from StableDiffusionControlNetPipeline.__call__'s
# controlnet_keep: 1 - float(i / n < start or (i + 1) / n > end).
@pytest.mark.parametrize("n,start,end,expected", [
    (4, 0.0, 1.0, [1, 1, 1, 1]),
    (4, 0.0, 0.5, [1, 1, 0, 0]),
    (5, 0.3, 0.8, [0, 0, 1, 1, 0]),
    (4, 0.5, 0.5, [0, 0, 0, 0]),
    (1, 0.0, 1.0, [1]),
])
def test_keep_rule(n, start, end, expected):
    assert [keep(i, n, start, end) for i in range(n)] == expected
