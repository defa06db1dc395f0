"""`sdrt export` of a ControlNet: diffusers folder, A1111 single file, hub id; the control folder.

The must-show: the exported `controlnet` graph gives diffusers' ControlNetModel residuals (scale
1, no guess mode) in ONNX Runtime, from a diffusers folder and from the same net written in
A1111's `cldm` key layout (tests/export/controlnet_checkpoint.py); the manifest says what the
runtime's fit check reads.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from sdrt.runtime.control.manifest import (
    CONTROL_FORMAT,
    ControlManifest,
    control_hash,
    is_control_export,
)
from sdrt.runtime.control.residuals import residual_names
from sdrt.runtime.errors import ModelError
from sdrt.runtime.model.manifest import MANIFEST_NAME, sha256_file
from tests.cli.test_cli import assert_one_line_error, run
from tests.export.controlnet_checkpoint import (
    A1111_COND_CHANNELS,
    tiny_controlnet,
    write_a1111_controlnet,
)
from tests.export.test_sources import COMMIT, _fake_hub_cache

pytest.importorskip("diffusers")

# Max |ORT − torch| on the tiny nets is ~5e-6 (residuals up to ~3); 2e-5 leaves room for other
# CPUs' kernels while a wrong graph (errors of order 0.1) fails by far.
ATOL = 2e-5
# The tiny SD UNet (2 blocks of 2 layers, widths 32 and 64): the residuals' channels, downs then
# mid, and their levels (the latent halved k times).
CHANNELS = (32, 32, 32, 32, 64, 64, 64)
LEVELS = (0, 0, 0, 1, 1, 1, 1)
HUB_REPO = "tiny-org/tiny-controlnet"


@pytest.fixture(scope="module")
def tiny_cn(tiny_sd_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny SD 1.x ControlNet folder with A1111's 4-stage conditioning embedding (8× pixels)."""
    return tiny_controlnet(tiny_sd_dir / "unet", tmp_path_factory.mktemp("cn") / "tiny-cn",
                           cond_channels=A1111_COND_CHANNELS)


@pytest.fixture(scope="module")
def a1111_file(tiny_cn: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny_cn in A1111's `cldm` layout, as the ControlNet extension's model files are."""
    return write_a1111_controlnet(tiny_cn, tmp_path_factory.mktemp("a1111") /
                                  "control_tiny_canny.safetensors")


@pytest.fixture(scope="module")
def cn_export(a1111_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`sdrt export control_tiny_canny.safetensors OUT`: converted, exported, checked."""
    out = tmp_path_factory.mktemp("cn-onnx") / "tiny-cn"
    result = run("export", a1111_file, out)
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty Hugging Face cache, offline (as tests/export/test_sources.py's offline_cache)."""
    from huggingface_hub import constants

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # read at import: patch them too
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def _feeds(batch: int, h: int, w: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"sample": rng.standard_normal((batch, 4, h, w), dtype=np.float32),
            "timestep": np.array(421.0, np.float32),
            "encoder_hidden_states": rng.standard_normal((batch, 77, 32), dtype=np.float32),
            "controlnet_cond": rng.uniform(0, 1, (batch, 3, 8 * h, 8 * w)).astype(np.float32)}


def _diffusers_residuals(folder: Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    import torch
    from diffusers import ControlNetModel

    net = ControlNetModel.from_pretrained(folder).eval()
    args = {k: torch.from_numpy(v) for k, v in feeds.items()}
    with torch.no_grad():
        downs, mid = net(**args, conditioning_scale=1.0, guess_mode=False, return_dict=False)
    return [t.numpy() for t in (*downs, mid)]


def _ort(path: Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)


# ---------------------------------------------------------------- A1111 single file


def test_a1111_file_layout(a1111_file: Path) -> None:
    from safetensors import safe_open

    with safe_open(str(a1111_file), framework="pt") as handle:
        keys = list(handle.keys())
    assert all(key.startswith("control_model.") for key in keys)
    assert "control_model.input_hint_block.14.weight" in keys  # A1111's layout, not diffusers'
    assert not any("controlnet_" in key for key in keys)


def test_control_folder_layout_and_manifest(cn_export: Path, a1111_file: Path) -> None:
    assert is_control_export(cn_export)
    manifest = ControlManifest.load(cn_export)
    manifest.verify_files(cn_export)
    assert json.loads((cn_export / MANIFEST_NAME).read_text())["format"] == CONTROL_FORMAT
    assert (manifest.name, manifest.architecture, manifest.cross_attention_dim) == (
        "control_tiny_canny", "sd1", 32)
    assert (manifest.conditioning_channels, manifest.global_pool_conditions) == (3, False)
    assert manifest.residual_channels == CHANNELS
    assert manifest.source["file"] == a1111_file.name
    assert manifest.source["weights_sha256"] == sha256_file(a1111_file)
    assert manifest.hash == control_hash(a1111_file)
    assert manifest.title == f"control_tiny_canny [{manifest.hash}]"
    assert manifest.variants == []
    spec = manifest.components["controlnet"]
    assert list(spec.inputs) == ["sample", "timestep", "encoder_hidden_states", "controlnet_cond"]
    assert {k: v.shape for k, v in spec.outputs.items()} == {
        name: (None, c, None, None) for name, c in zip(residual_names(6), CHANNELS, strict=True)}
    assert spec.extra["validation"]["max_abs_diff"] <= ATOL
    config = json.loads((cn_export / "controlnet" / "config.json").read_text())
    assert config["_class_name"] == "ControlNetModel" and "_name_or_path" not in config


@pytest.mark.parametrize("size", [(2, 8, 8), (1, 5, 7)], ids=["b2-8x8", "b1-5x7"])
def test_graph_matches_diffusers(cn_export: Path, tiny_cn: Path, size) -> None:
    """The A1111 file's graph against diffusers' ControlNetModel of the folder it was written
    from: the conversion and the export together."""
    feeds = _feeds(*size)
    want = _diffusers_residuals(tiny_cn, feeds)
    got = _ort(cn_export / "controlnet" / "model.onnx", feeds)
    for level, ref, out in zip(LEVELS, want, got, strict=True):
        assert out.shape == ref.shape == (size[0], ref.shape[1], -(-size[1] // 2**level),
                                          -(-size[2] // 2**level))
        assert np.abs(ref).max() > 0.01  # the zero convs were given weights: not a vacuous test
        np.testing.assert_allclose(out, ref, rtol=0, atol=ATOL)


def test_yaml_beside_the_file_asks_for_global_pooling(a1111_file: Path, tmp_path: Path) -> None:
    """The extension's shuffle model ships `global_average_pooling: True` in its YAML."""
    from sdrt.export.sources import resolve_source

    shuffle = tmp_path / "control_tiny_shuffle.safetensors"
    shutil.copyfile(a1111_file, shuffle)
    shuffle.with_suffix(".yaml").write_text(
        "model:\n  params:\n    control_stage_config:\n      params:\n"
        "        global_average_pooling: True\n")
    for path, pooled in ((a1111_file, False), (shuffle, True)):
        with resolve_source(str(path), scratch=tmp_path / "scratch") as (folder, origin):
            config = json.loads((folder / "config.json").read_text())
        assert config.get("global_pool_conditions", False) is pooled
        assert origin["hash"] == control_hash(path)


# ---------------------------------------------------------------- diffusers folder, hub id


def test_sdxl_folder_exports_with_the_added_conditions(tiny_sdxl_dir: Path,
                                                       tmp_path: Path) -> None:
    from sdrt.export.onnx_export import export_pipeline

    cn = tiny_controlnet(tiny_sdxl_dir / "unet", tmp_path / "xl-cn")
    manifest = ControlManifest.load(export_pipeline(cn, tmp_path / "xl-cn-onnx"))
    weights = cn / "diffusion_pytorch_model.safetensors"
    assert (manifest.name, manifest.architecture, manifest.cross_attention_dim) == (
        "xl-cn", "sdxl", 64)
    assert manifest.source == {"path": str(cn), "weights_sha256": sha256_file(weights)}
    assert manifest.hash == control_hash(weights)
    assert list(manifest.components["controlnet"].inputs)[-2:] == ["text_embeds", "time_ids"]
    assert manifest.components["controlnet"].extra["validation"]["max_abs_diff"] <= ATOL


def test_hub_id_resolves_offline_from_the_cache(tiny_cn: Path, hub_cache: Path,
                                                tmp_path: Path) -> None:
    from sdrt.export.sources import resolve_source

    repo = tmp_path / "repo"
    shutil.copytree(tiny_cn, repo)
    _fake_hub_cache(hub_cache, repo, HUB_REPO)
    with resolve_source(HUB_REPO) as (folder, origin):
        files = sorted(p.name for p in folder.iterdir())
    assert files == ["config.json", "diffusion_pytorch_model.safetensors"]
    assert origin == {"hub_id": HUB_REPO, "revision": COMMIT}


# ---------------------------------------------------------------- bad input


def test_pipeline_options_are_refused_for_a_controlnet(tiny_cn: Path, tmp_path: Path) -> None:
    lora = tmp_path / "x.safetensors"
    lora.write_bytes(b"")
    for extra in (["--lora", str(lora)], ["--attention", "sliced"], ["--family", "sd1"],
                  ["--default-steps", "4"]):
        result = run("export", tiny_cn, tmp_path / "out", *extra)
        assert_one_line_error(result, "not to a ControlNet")
    assert not (tmp_path / "out").exists()


def test_broken_sources_are_one_line_errors(tiny_cn: Path, a1111_file: Path,
                                            tmp_path: Path) -> None:
    no_weights = tmp_path / "no-weights"
    shutil.copytree(tiny_cn, no_weights)
    (no_weights / "diffusion_pytorch_model.safetensors").unlink()
    assert_one_line_error(run("export", no_weights, tmp_path / "a"), "no diffusion_pytorch_model")
    garbled = tmp_path / "garbled.safetensors"
    garbled.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    assert_one_line_error(run("export", garbled, tmp_path / "b"), "not a readable .safetensors")
    from safetensors.torch import load_file, save_file

    state = load_file(str(a1111_file))
    state.pop("control_model.zero_convs.3.0.weight")
    partial = tmp_path / "partial.safetensors"
    save_file(state, str(partial))
    assert_one_line_error(run("export", partial, tmp_path / "c"), "ControlNet")
    assert_one_line_error(run("export", a1111_file, tmp_path / "d", "--config", "sd15"),
                          "is a ControlNet")


def test_manifest_reader_refuses_a_bad_control_folder(cn_export: Path, tmp_path: Path) -> None:
    folder = tmp_path / "copy"
    shutil.copytree(cn_export, folder)
    (folder / "controlnet" / "model.onnx").write_bytes(b"truncated")
    with pytest.raises(ModelError, match="truncated or replaced"):
        ControlManifest.load(folder)
    data = json.loads((folder / MANIFEST_NAME).read_text())
    data["architecture"] = "sd9"
    (folder / MANIFEST_NAME).write_text(json.dumps(data))
    with pytest.raises(ModelError, match="'architecture' must be one of"):
        ControlManifest.load(folder, check_files=False)
    (folder / MANIFEST_NAME).write_text(json.dumps({**data, "format": "sdrt-manifest"}))
    assert not is_control_export(folder)
    with pytest.raises(ModelError, match="is not a ControlNet folder"):
        ControlManifest.load(folder)
