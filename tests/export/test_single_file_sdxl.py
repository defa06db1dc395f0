"""SDXL single-file checkpoints (Stability's `sgm` key layout, as A1111 and civitai share them).

The must-show: the tiny SDXL model written in that layout (tests/ldm_checkpoint.py) exports to
the same graphs as its diffusers folder, recorded as family sdxl; a file that lacks a text
encoder or holds tensors of no model is refused with one line.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from sdrt.runtime.model.manifest import Manifest, sha256_file
from tests.cli.test_cli import run
from tests.export.ldm_checkpoint import SDXL_OPEN_CLIP_PREFIX, write_ldm_checkpoint
from tests.export.test_sources import _assert_same_graph, assert_refused_in_one_line

SDXL_COMPONENTS = ("text_encoder", "text_encoder_2", "unet", "vae_encoder", "vae_decoder")
SDXL_WEIGHTS = ("unet/diffusion_pytorch_model.safetensors",
                "vae/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors",
                "text_encoder_2/model.safetensors")
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json")


@pytest.fixture(autouse=True)
def _need_export_stack() -> None:
    for name in ("torch", "diffusers", "transformers", "onnx", "safetensors"):
        pytest.importorskip(name)


@pytest.fixture(scope="module")
def sdxl_file(tiny_sdxl_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny_sdxl_dir as an SDXL single file (sgm keys, denoiser sigmas, EMA decay)."""
    folder = tmp_path_factory.mktemp("sgm")
    return write_ldm_checkpoint(tiny_sdxl_dir, folder / "tiny-sdxl.safetensors")


@pytest.fixture(scope="module")
def sdxl_state(sdxl_file: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(sdxl_file))


@pytest.fixture(scope="module")
def sdxl_single_file_onnx(sdxl_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`sdrt export tiny-sdxl.safetensors OUT`, graphs checked against torch as for any source."""
    out = tmp_path_factory.mktemp("sdxl_single_file_onnx") / "from-single-file"
    result = run("export", sdxl_file, out)
    assert result.exit_code == 0, result.output
    return out


def _assert_same_weights(folder: Path, reference: Path) -> None:
    from safetensors.torch import load_file

    for rel in SDXL_WEIGHTS:
        got, want = load_file(str(folder / rel)), load_file(str(reference / rel))
        assert got.keys() == want.keys(), rel
        for key, value in want.items():
            assert got[key].equal(value), f"{rel}: {key}"


# ---------------------------------------------------------------- the tiny SDXL file


@pytest.mark.parity
@pytest.mark.parametrize("component", SDXL_COMPONENTS)
def test_sdxl_single_file_exports_the_same_graphs(sdxl_single_file_onnx, tiny_sdxl_onnx_dir,
                                                  component) -> None:
    _assert_same_graph(sdxl_single_file_onnx / component / "model.onnx",
                       tiny_sdxl_onnx_dir / component / "model.onnx")


def test_sdxl_single_file_manifest(sdxl_single_file_onnx, tiny_sdxl_onnx_dir, sdxl_file) -> None:
    got, want = Manifest.load(sdxl_single_file_onnx), Manifest.load(tiny_sdxl_onnx_dir)
    assert got.source == {"file": "tiny-sdxl.safetensors", "sha256": sha256_file(sdxl_file),
                          "config": "tiny_sdxl", "config_sha256": got.source["config_sha256"]}
    assert got.family == want.family == "sdxl"
    assert (got.prediction_type, got.scaling_factor, got.sample_size) == (
        want.prediction_type, want.scaling_factor, want.sample_size)
    for folder in ("tokenizer", "tokenizer_2"):  # tokenizer_2 pads with '!'
        for name in TOKENIZER_FILES:
            assert ((sdxl_single_file_onnx / folder / name).read_bytes()
                    == (tiny_sdxl_onnx_dir / folder / name).read_bytes()), (folder, name)
    assert not list(sdxl_single_file_onnx.parent.glob(".sdrt-convert-*"))


def test_sdxl_converted_folder_loads_in_diffusers_with_every_weight(sdxl_file, tiny_sdxl_dir,
                                                                    caplog) -> None:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from sdrt.export.sources import resolve_source

    with caplog.at_level(logging.WARNING, logger="sdrt.export"), \
            resolve_source(str(sdxl_file)) as (folder, origin):
        _assert_same_weights(folder, tiny_sdxl_dir)
        for cls, name in ((UNet2DConditionModel, "unet"), (AutoencoderKL, "vae"),
                          (CLIPTextModel, "text_encoder"),
                          (CLIPTextModelWithProjection, "text_encoder_2")):
            _, info = cls.from_pretrained(folder / name, output_loading_info=True)
            assert not any(info.values()), (name, info)  # nothing missing, unexpected, resized
        pad = json.loads((folder / "tokenizer_2" / "tokenizer_config.json").read_text())
        assert pad["pad_token"] == "!"
    assert origin["config"] == "tiny_sdxl"
    # tiny_sdxl_turbo has the same shapes: the base is chosen, and the warning says how not to.
    (record,) = [r for r in caplog.records if "fits several shipped configs" in r.getMessage()]
    assert "using tiny_sdxl, the base model" in record.getMessage()
    assert "--config tiny_sdxl_turbo" in record.getMessage()
    assert "tiny_sdxl_lcm" not in record.getMessage()  # LCM's guidance input is not in the file


def test_sdxl_single_file_with_the_turbo_config(sdxl_file) -> None:
    from sdrt.export.source import read_source
    from sdrt.export.sources import resolve_source

    with resolve_source(str(sdxl_file), config="tiny_sdxl_turbo") as (folder, origin):
        assert read_source(folder).family == "sdxl-turbo"
    assert origin["config"] == "tiny_sdxl_turbo"


@pytest.mark.parametrize(("config", "fragment"), [
    ("tiny_sd", "it is an SDXL checkpoint and tiny_sd is not"),
    ("tiny_sdxl_lcm", "unet/ weights do not match its config: 1 missing "
                      "(e.g. 'time_embedding.cond_proj.weight')"),
])
def test_sdxl_single_file_with_a_config_it_does_not_fit(sdxl_file, config, fragment,
                                                        tmp_path) -> None:
    from tests.cli.test_cli import assert_one_line_error

    result = run("export", sdxl_file, tmp_path / "out", "--config", config)
    assert_one_line_error(result, f"does not fit --config {config}", fragment)


def _drop_prefix(prefix: str):
    return lambda state: [state.pop(key) for key in list(state) if key.startswith(prefix)]


def _drop(key: str):
    return lambda state: state.pop(key)


def _add(key: str, *shape: int):
    def change(state: dict) -> None:
        import torch

        state[key] = torch.zeros(shape)
    return change


BAD_SDXL = {  # change to the tiny SDXL file → what the one-line error must say
    "no-text-encoder-2": (_drop_prefix(SDXL_OPEN_CLIP_PREFIX),
                          "without its OpenCLIP ViT-bigG ('conditioner.embedders.1.model.*') "
                          "text encoder"),
    "no-text-encoder": (_drop_prefix("conditioner.embedders.0."),
                        "without its CLIP ViT-L ('conditioner.embedders.0.transformer.*') "
                        "text encoder"),
    "text-encoder-2-weight-missing": (
        _drop(f"{SDXL_OPEN_CLIP_PREFIX}transformer.resblocks.4.mlp.c_fc.bias"),
        "closest (fewest keys off), tiny_sdxl: text_encoder_2/ weights do not match its "
        "config: 1 missing (e.g. 'text_model.encoder.layers.4.mlp.fc1.bias')"),
    "unknown-tensor": (_add("conditioner.embedders.2.model.weight", 3),
                       "1 tensor(s) outside the UNet, VAE and text encoder(s) "
                       "(e.g. 'conditioner.embedders.2.model.weight')"),
    # diffusers renames every key under the tower's `transformer.`, and skips others.
    "renamed-text-tensor": (_add(f"{SDXL_OPEN_CLIP_PREFIX}transformer.resblocks.0.ls_1", 32),
                            "text_encoder_2/ weights do not match its config: 1 unexpected "
                            "(e.g. 'text_model.encoder.layers.0.ls_1')"),
    "skipped-text-tensor": (_add(f"{SDXL_OPEN_CLIP_PREFIX}attn_mask", 77, 77),
                            "text_encoder_2/ weights do not match its config: 1 unexpected "
                            f"(e.g. '{SDXL_OPEN_CLIP_PREFIX}attn_mask')"),
    "refiner": (_add("conditioner.embedders.0.model.text_projection", 32, 32), "SDXL refiner"),
}


@pytest.mark.parametrize("case", sorted(BAD_SDXL))
def test_bad_sdxl_single_file_is_refused(sdxl_state, tmp_path, case) -> None:
    assert_refused_in_one_line(sdxl_state, case, *BAD_SDXL[case], tmp_path)


# ---------------------------------------------------------------- full size, shapes only


def test_full_size_sdxl_shapes_choose_the_base_config(caplog) -> None:
    """SDXL base 1.0's layout at full size, as shapes only (meta tensors: no weights in memory)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from sdrt.export.single_file import SHIPPED_CONFIGS, Checkpoint, choose_config
    from tests.export.ldm_checkpoint import ldm_state

    folder = SHIPPED_CONFIGS / "sdxl"
    with torch.device("meta"):
        models = {name: cls.from_config(cls.load_config(folder / name))
                  for name, cls in (("unet", UNet2DConditionModel), ("vae", AutoencoderKL))}
        for name, cls in (("text_encoder", CLIPTextModel),
                          ("text_encoder_2", CLIPTextModelWithProjection)):
            config = CLIPTextConfig.from_json_file(folder / name / "config.json")
            models[name] = cls(config)
        state = ldm_state({name: model.state_dict() for name, model in models.items()},
                          {name: json.loads((folder / name / "config.json").read_text())
                           for name in models})
    assert state[f"{SDXL_OPEN_CLIP_PREFIX}text_projection"].shape == (1280, 1280)
    shapes = {key: tuple(value.shape) for key, value in state.items()}
    checkpoint = Checkpoint("sd_xl_base_1.0.safetensors", shapes, lambda keys: pytest.fail("read"))
    with caplog.at_level(logging.WARNING, logger="sdrt.export"):
        assert choose_config(checkpoint) == "sdxl"
    assert "fits several shipped configs alike (sdxl, sdxl_turbo); using sdxl" in caplog.text
    assert choose_config(checkpoint, config="sdxl_turbo") == "sdxl_turbo"
