"""A tiny autoencoder (TAESD architecture) in place of a model's VAE: export against diffusers'
AutoencoderTiny, the pipeline's latent conversion, `--vae` metadata and errors, and the embedded
model's distilled tiny VAE within its fidelity gate and the size budget."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from sdrt.cli.main import main
from sdrt.runtime.components import VaeDecoder, VaeEncoder
from sdrt.runtime.errors import ModelError
from sdrt.runtime.metadata import parse_parameters
from sdrt.runtime.model.manifest import sha256_file
from sdrt.runtime.pipeline import Pipeline
from sdrt.runtime.session import open_session
from sdrt.runtime.vae.tiny import TinyVaeManifest
from tests.conftest import ROOT, _build, _export

# ONNX Runtime against torch on the same float32 convolutions: the export check's VAE tolerance
# (optimum's 3e-4), as the outputs are pixel-scale sums over many conv taps.
EXPORT_ATOL = 3e-4
# One uint8 step: sdrt and diffusers round [-1, 1] to 8 bits the same way, but a float32 value
# that lands on a rounding boundary may go either way.
PIXEL_ATOL = 1
EMBEDDED_TINY_VAE = ROOT / "models" / "embedded" / "tiny_vae"
GATE_CAPTIONS = 40  # a fast subset of the recorded 200-caption gate


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def taesd_dir(tmp_path_factory):
    """models/configs/tiny_taesd (2 blocks: scale factor 2, as tiny_sd's VAE), seed 0."""
    return _build("tiny_taesd", tmp_path_factory)


@pytest.fixture(scope="module")
def taesd_onnx(taesd_dir, tmp_path_factory):
    return _export(taesd_dir, tmp_path_factory)


def _torch_model(folder: Path):
    from diffusers import AutoencoderTiny

    return AutoencoderTiny.from_pretrained(folder).eval()


@pytest.mark.parametrize("hw", [(8, 8), (9, 13)])
def test_export_equals_diffusers_autoencoder_tiny(taesd_dir, taesd_onnx, hw):
    import torch

    model = _torch_model(taesd_dir)
    latents = np.random.default_rng(0).standard_normal((2, 4, *hw), dtype=np.float32)
    pixels = np.random.default_rng(1).uniform(-1, 1, (2, 3, 2 * hw[0], 2 * hw[1]))
    pixels = pixels.astype(np.float32)
    with torch.no_grad():
        want_images = model.decode(torch.from_numpy(latents)).sample.numpy()
        want_latents = model.encode(torch.from_numpy(pixels)).latents.numpy()
    decoder = VaeDecoder(open_session(taesd_onnx / "vae_decoder" / "model.onnx", "ort"))
    encoder = VaeEncoder(open_session(taesd_onnx / "vae_encoder" / "model.onnx", "ort"))
    np.testing.assert_allclose(decoder(latents), want_images, atol=EXPORT_ATOL, rtol=0)
    mean, std = encoder.posterior(pixels)
    np.testing.assert_allclose(mean, want_latents, atol=EXPORT_ATOL, rtol=0)
    assert not std.any()  # a latent, not a Gaussian


def test_manifest_marks_a_tiny_autoencoder(taesd_dir, taesd_onnx):
    manifest = TinyVaeManifest.load(taesd_onnx)
    assert (manifest.scaling_factor, manifest.shift_factor) == (1.0, 0.0)
    assert (manifest.latent_channels, manifest.vae_scale_factor) == (4, 2)
    weights = taesd_dir / "diffusion_pytorch_model.safetensors"
    assert manifest.autov2_hash == sha256_file(weights)[:10]
    assert manifest.name == taesd_dir.name


def test_pipeline_decodes_the_unet_latents_with_the_tiny_decoder(tiny_onnx_dir, taesd_dir,
                                                                  taesd_onnx):
    """TAESD reads the latents as the UNet leaves them: no division by the model's
    scaling_factor (0.18215 here), which would blow them up 5.5×."""
    import torch

    pipe = Pipeline.load(tiny_onnx_dir, vae=taesd_onnx)
    seen = []
    image = pipe.generate("a cat", steps=2, seed=3, callback=lambda i, n, x: seen.append(x))[0]
    with torch.no_grad():
        decoded = _torch_model(taesd_dir).decode(torch.from_numpy(seen[-1])).sample[0].numpy()
    want = np.round(np.clip(decoded / 2 + 0.5, 0, 1).transpose(1, 2, 0) * 255)
    assert np.abs(np.asarray(image, dtype=np.int16) - want).max() <= PIXEL_ATOL
    assert pipe._vae_latents(encoder=True) == (1.0, 0.0)  # its encoder writes UNet latents


def test_cli_vae_writes_a1111_vae_keys(tiny_onnx_dir, taesd_dir, taesd_onnx, tmp_path):
    out = tmp_path / "x.png"
    result = run("generate", "a cat", "--model", tiny_onnx_dir, "--steps", "1", "--seed", "1",
                 "--vae", taesd_onnx, "-o", out)
    assert result.exit_code == 0, result.output
    text = Image.open(out).info["parameters"]
    params = parse_parameters(text)
    weights = taesd_dir / "diffusion_pytorch_model.safetensors"
    assert params["VAE hash"] == sha256_file(weights)[:10]
    assert params["VAE"] == taesd_dir.name
    # A1111's order: Model hash, Model, VAE hash, VAE
    assert re.search(r"Model: [^,]+, VAE hash: [0-9a-f]{10}, VAE: ", text), text
    assert str(tmp_path) not in text


def test_img2img_with_the_tiny_encoder(tiny_onnx_dir, taesd_onnx, tmp_path):
    picture = tmp_path / "in.png"
    Image.new("RGB", (64, 64), (200, 30, 30)).save(picture)
    out = tmp_path / "out.png"
    result = run("img2img", picture, "a cat", "--model", tiny_onnx_dir, "--steps", "2",
                 "--strength", "0.5", "--vae", taesd_onnx, "-o", out)
    assert result.exit_code == 0, result.output
    assert "VAE hash: " in Image.open(out).info["parameters"]


def _one_line_error(result, fragment):
    assert result.exit_code != 0
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and fragment in errors[0], result.output


def test_mismatched_latent_channels_is_a_one_line_error(tiny_onnx_dir, tmp_path_factory,
                                                       tmp_path):
    from diffusers import AutoencoderTiny

    config = json.loads((ROOT / "models/configs/tiny_taesd/config.json").read_text())
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    folder = tmp_path_factory.mktemp("taesd16") / "taesd16"
    AutoencoderTiny(**{**config, "latent_channels": 16}).save_pretrained(folder)
    exported = _export(folder, tmp_path_factory)
    result = run("generate", "x", "--model", tiny_onnx_dir, "--steps", "1", "--vae", exported,
                 "-o", tmp_path / "x.png")
    _one_line_error(result, "reads 16 latent channels, the model's UNet makes 4")
    assert not (tmp_path / "x.png").exists()


def test_a_model_folder_is_no_tiny_vae(tiny_onnx_dir, tmp_path):
    result = run("generate", "x", "--model", tiny_onnx_dir, "--steps", "1",
                 "--vae", tiny_onnx_dir, "-o", tmp_path / "x.png")
    _one_line_error(result, "is not a tiny autoencoder folder")
    with pytest.raises(ModelError, match="does not exist"):
        Pipeline.load(tiny_onnx_dir, vae=tmp_path / "missing")


def test_export_refuses_pipeline_options_for_a_tiny_vae(taesd_dir, tmp_path):
    result = run("export", taesd_dir, tmp_path / "out", "--default-steps", "4")
    _one_line_error(result, "not to a tiny autoencoder")


def test_hub_patterns_fetch_a_top_level_autoencoder():
    from sdrt.export.sources import _HUB_CONFIGS, TOP, _needed, _weight_patterns

    assert "config.json" in _HUB_CONFIGS
    assert "diffusion_pytorch_model.safetensors" in _weight_patterns([TOP], pickle=False)
    assert _needed(ROOT / "models" / "configs" / "tiny_taesd") == [TOP]


# --- the embedded model's distilled tiny VAE ------------------------------------------------


def test_embedded_tiny_vae_gate_is_recorded():
    manifest = TinyVaeManifest.load(EMBEDDED_TINY_VAE / "onnx")
    (gate,) = [g for g in manifest.extra.get("gates", []) if g["backend"] == "ort"]
    assert gate["captions"]["n"] >= 200
    assert gate["figures"]["image_psnr_db"] >= gate["thresholds"]["min_image_psnr_db"]


def test_embedded_tiny_vae_keeps_the_image_psnr_floor():
    """The gate's PSNR half, re-run on fewer captions: a broken decoder or latent conversion
    (dividing by the model's scaling_factor: 2.6× larger latents) falls far below it."""
    from sdrt.quantize.tiny_vae_gate import MIN_TINY_VAE_PSNR_DB, run_gate

    result = run_gate(ROOT / "models" / "embedded" / "onnx", EMBEDDED_TINY_VAE / "onnx",
                      n=GATE_CAPTIONS)
    assert result["figures"]["image_psnr_db"] >= MIN_TINY_VAE_PSNR_DB, result


@pytest.mark.xfail(strict=True, reason="not met: the distilled decoder loses 3.5 adherence "
                   "points against the full VAE (0.850 vs 0.885 on 200 captions), limit 3")
def test_embedded_tiny_vae_passes_its_gate():
    manifest = TinyVaeManifest.load(EMBEDDED_TINY_VAE / "onnx")
    assert all(g["passed"] for g in manifest.extra["gates"])


def test_bench_times_the_tiny_decoder(tiny_onnx_dir, taesd_onnx, monkeypatch):
    from sdrt.benchmarks import bench
    opts = bench.BenchOptions(str(tiny_onnx_dir), runs=1, vae=str(taesd_onnx))
    assert opts.argv()[-2:] == ["--vae", str(taesd_onnx)]  # passed on to the worker process
    loaded, load = [], Pipeline.load
    monkeypatch.setattr(bench.Pipeline, "load",
                        lambda *args, **kwargs: loaded.append(load(*args, **kwargs)) or loaded[0])
    assert bench.run_scenario("vae_decode", opts)["scenario"] == "vae_decode"
    assert loaded[0].vae_decoder is loaded[0].tiny_vae.decoder
