"""Dummy sizes come from each model's config limits (sdrt.export.shapes), so any valid config
exports: an SD 3 transformer whose position grid is smaller than the usual checks, a UNet whose
native size is not the usual one."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from sdrt.export.shapes import text_lengths, transformer_sizes, unet_sizes
from sdrt.runtime.model.manifest import Manifest
from tests.conftest import ROOT, _export, _model_builder

SD15_UNET = {"block_out_channels": [320, 640, 1280, 1280], "sample_size": 64}
SD3_MEDIUM = {"patch_size": 2, "sample_size": 128, "pos_embed_max_size": 192}


def _sides(sizes) -> list[tuple[int, int]]:
    return [sizes.trace, *(hw for _, hw in sizes.checks)]


def test_unet_sizes_are_the_usual_ones_on_sd15():
    sizes = unet_sizes(SD15_UNET)
    assert sizes.trace == (17, 19)  # odd: not multiples of the UNet's 8× downsampling
    assert sizes.checks == ((2, (32, 32)), (1, (25, 39)))


@pytest.mark.parametrize("sample_size, square", [(8, 8), (20, 20), (48, 32), (100, 32)])
def test_unet_square_check_is_the_native_side_capped(sample_size, square):
    sizes = unet_sizes({"block_out_channels": [32, 64], "sample_size": sample_size})
    assert sizes.checks[0] == (2, (square, square))
    height, width = sizes.checks[1][1]
    assert height % 2 == width % 2 == 1 and height >= 5 and height != width


@pytest.mark.parametrize("limit", [4, 5, 16, 17, 19, 24, 192, None])
def test_transformer_sizes_stay_within_pos_embed_max_size(limit):
    config = {**SD3_MEDIUM, "pos_embed_max_size": limit}
    sizes = transformer_sizes(config)
    for height, width in _sides(sizes):
        assert height % 2 == width % 2 == 0  # whole patches
        assert limit is None or max(height, width) // 2 <= limit
    short, long = (side // 2 for side in sizes.checks[1][1])
    assert short % 2 == long % 2 == 1 and (short < long or long == 1)


def test_transformer_sizes_are_the_usual_ones_on_sd3_medium():
    sizes = transformer_sizes(SD3_MEDIUM)
    assert sizes.trace == (24, 20)
    assert sizes.checks == ((2, (32, 32)), (1, (26, 38)))  # 16 × 16 and 13 × 19 patches


def test_text_lengths_follow_the_position_table():
    assert text_lengths({"max_position_embeddings": 77}) == (77, 16)
    assert text_lengths({"max_position_embeddings": 8}) == (8, 8)


def _build_with(arch: str, component: str, changes: dict, tmp: Path, monkeypatch) -> Path:
    """models/configs/<arch> with `changes` in <component>/config.json, built at seed 0."""
    configs = tmp / "configs"
    shutil.copytree(ROOT / "models" / "configs" / arch, configs / arch)
    path = configs / arch / component / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    builder = _model_builder()
    monkeypatch.setattr(builder, "CONFIGS", configs)
    return builder.build_random_sd(arch, tmp / arch, seed=0)


def test_sd3_with_a_small_position_grid_exports_and_matches_torch(tmp_path, monkeypatch,
                                                                   tmp_path_factory):
    pytest.importorskip("diffusers")
    # 16 patches a side at most: the usual odd check (13 × 19 patches) would not fit.
    src = _build_with("tiny_sd3", "transformer", {"pos_embed_max_size": 16}, tmp_path,
                      monkeypatch)
    manifest = Manifest.load(_export(src, tmp_path_factory))  # each graph checked against torch
    validation = manifest.components["transformer"].extra["validation"]
    sides = [shape["hidden_states"][2:] for shape in validation["checked_shapes"]]
    assert sides == [[32, 32], [18, 30]]  # 16 × 16 and 9 × 15 patches
    assert all("validation" in spec.extra for spec in manifest.components.values())
    assert manifest.sample_size == 32 and manifest.prediction_type == "flow_prediction"


def test_sd1_with_another_sample_size_is_checked_at_its_native_size(tmp_path, monkeypatch,
                                                                    tmp_path_factory):
    src = _build_with("tiny_sd", "unet", {"sample_size": 20}, tmp_path, monkeypatch)
    manifest = Manifest.load(_export(src, tmp_path_factory))
    assert manifest.sample_size == 20 and manifest.default_size == 40
    for name in ("unet", "vae_decoder"):
        checked = manifest.components[name].extra["validation"]["checked_shapes"]
        latent = "sample" if name == "unet" else "latent_sample"
        assert [shape[latent][2:] for shape in checked] == [[20, 20], [13, 27]]
