"""Folders written by other tools load unmodified: optimum ONNX, optimum-intel IR, legacy ONNX.

The fixtures under tests/fixtures/foreign/ were made from one tiny random SD 1.x folder (`source/`)
by optimum-cli's ONNX and OpenVINO exports and by a writer of diffusers' legacy ONNX layout; see
the README there. Images must equal diffusers' on the source weights, as in test_pipeline_parity.
"""

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from sdrt.cli.main import main
from sdrt.runtime.components import VaeEncoder
from sdrt.runtime.errors import ModelError
from sdrt.runtime.model.folder import graph_file
from sdrt.runtime.pipeline import Pipeline
from sdrt.runtime.session import open_session
from tests.conftest import (
    MAX_PIXEL_DIFF,
    NEGATIVE,
    PROMPT,
    ROOT,
    as_array,
    load_reference,
    reference_images,
)

FOREIGN = ROOT / "tests" / "fixtures" / "foreign"
# layout → the backends that read it (ONNX Runtime cannot read OpenVINO IR).
LAYOUTS = {
    "optimum_onnx": ("ort", "openvino"),
    "optimum_openvino": ("openvino",),
    "diffusers_legacy_onnx": ("ort", "openvino"),
}
CASES = [pytest.param(layout, backend, id=f"{layout}-{backend}",
                      marks=[pytest.mark.openvino] if backend == "openvino" else [])
         for layout, backends in LAYOUTS.items() for backend in backends]
# The legacy layout has no configs, so sdrt assumes SD 1.x's 8x VAE; the source's VAE has 4 blocks.
SIZE = 64
# The VAE encoder's mean against diffusers': float32 graph vs eager (optimum checks VAEs at 3e-4).
VAE_ATOL = 3e-4


def _load(layout: str, backend: str, folder: Path | None = None) -> Pipeline:
    if backend == "openvino":
        pytest.importorskip("openvino")
    return Pipeline.load(folder or FOREIGN / layout, backend=backend)


def _generate(pipe: Pipeline, sampler: str, seed: int = 7) -> np.ndarray:
    images = pipe.generate(PROMPT, negative_prompt=NEGATIVE, steps=4, guidance_scale=6.0,
                           width=SIZE, height=SIZE, seed=seed, num_images=2, sampler=sampler)
    return as_array(images)


@pytest.fixture(scope="module")
def reference():
    pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    return load_reference(FOREIGN / "source")


@pytest.mark.parity
@pytest.mark.parametrize("sampler", ["ddim", "euler_a"])
@pytest.mark.parametrize(("layout", "backend"), CASES)
def test_images_equal_diffusers_on_the_source(reference, layout, backend, sampler):
    expected = reference_images(reference, sampler, steps=4, guidance=6.0, width=SIZE,
                                height=SIZE, seed=7, num_images=2)
    got = _generate(_load(layout, backend), sampler)
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() <= MAX_PIXEL_DIFF[backend]


def test_legacy_layout_assumes_sd1_with_a_warning(caplog):
    pipe = _load("diffusers_legacy_onnx", "ort")
    assert "legacy ONNX layout" in caplog.text
    assert (pipe.facts.family.name, pipe.facts.vae_scale_factor, pipe.facts.scaling_factor) \
        == ("sd1", 8, 0.18215)
    assert pipe.unet.session.inputs["timestep"].shape == (None,)  # [batch], not rank 0
    text_encoder = graph_file(FOREIGN / "diffusers_legacy_onnx", "text_encoder", "ort")
    assert open_session(text_encoder, "ort").inputs["input_ids"].dtype is np.int32


@pytest.mark.parity
@pytest.mark.parametrize(("layout", "backend"), CASES)
def test_vae_encoder_gives_the_latent_mean(reference, layout, backend):
    import torch

    if backend == "openvino":
        pytest.importorskip("openvino")
    encoder = VaeEncoder(open_session(graph_file(FOREIGN / layout, "vae_encoder", backend),
                                      backend))
    pixels = np.random.default_rng(0).uniform(-1, 1, (1, 3, SIZE, SIZE)).astype(np.float32)
    got = encoder(pixels)  # (1, 4, 8, 8)
    with torch.no_grad():
        mean = reference.vae.encode(torch.from_numpy(pixels)).latent_dist.mean.numpy()
    if layout == "diffusers_legacy_onnx":  # sampled in the graph: mean + std × noise
        assert got.shape == mean.shape and np.isfinite(got).all()
    else:
        np.testing.assert_allclose(got, mean, atol=VAE_ATOL)


def test_ort_on_an_ir_only_folder_says_so_in_one_line():
    with pytest.raises(ModelError, match="only OpenVINO IR .* use the openvino backend") as info:
        Pipeline.load(FOREIGN / "optimum_openvino", backend="ort")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(("key", "entry", "fragment"), [
    ("_class_name", "FluxPipeline", "_class_name 'FluxPipeline' is not a supported pipeline"),
    ("unet", ["diffusers", "UNet2DModel"], "unet is ['diffusers', 'UNet2DModel']"),
    ("scheduler", ["diffusers", "os.system"], "expected a scheduler class"),
])
def test_model_index_classes_outside_the_allow_list_are_refused(tmp_path, key, entry, fragment):
    folder = shutil.copytree(FOREIGN / "optimum_onnx", tmp_path / "model")
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, key: entry}))
    with pytest.raises(ModelError, match=re.escape(fragment)):
        Pipeline.load(folder)


def test_cli_generates_from_a_foreign_folder(tmp_path):
    out = tmp_path / "x.png"
    result = CliRunner().invoke(main, ["generate", "x", "--model", str(FOREIGN / "optimum_onnx"),
                                       "--steps", "2", "--seed", "1", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert out.is_file()


def _fake_hub_cache(folder: Path, root: Path) -> Path:
    """`folder` as a hub cache snapshot: every file a relative symlink into `blobs/`."""
    blobs, snapshot = root / "blobs", root / "snapshots" / "0123abcd"
    blobs.mkdir(parents=True)
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            data = path.read_bytes()
            blob = blobs / hashlib.sha256(data).hexdigest()
            blob.write_bytes(data)
            link = snapshot / path.relative_to(folder)
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(os.path.relpath(blob, link.parent))
    return snapshot


@pytest.mark.parametrize(("layout", "backend"), [
    pytest.param("diffusers_legacy_onnx", "openvino", marks=pytest.mark.openvino),
    pytest.param("optimum_openvino", "openvino", marks=pytest.mark.openvino),
    ("diffusers_legacy_onnx", "ort"),
])
def test_a_symlinked_hub_cache_snapshot_loads(layout, backend, tmp_path):
    # OpenVINO refuses ONNX external data (the legacy UNet's weights.pb) that resolves outside
    # the model's folder, as every file of a snapshot does; IR is read as it is.
    snapshot = _fake_hub_cache(FOREIGN / layout, tmp_path / f"models--org--{layout}")
    assert (snapshot / "unet").resolve() == snapshot / "unet"  # a real folder of symlinks
    assert all(p.is_symlink() for p in (snapshot / "unet").iterdir())
    expected = _generate(_load(layout, backend), "euler")
    assert np.array_equal(_generate(_load(layout, backend, snapshot), "euler"), expected)
