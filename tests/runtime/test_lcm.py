"""LCM (Luo et al. 2023): family detection and defaults, the `lcm` sampler and its schedule, the
guidance-scale embedding, the UNet's `timestep_cond` export, and parity of sdrt's images with
diffusers' LatentConsistencyModelPipeline (SD 1.x) and StableDiffusionXLPipeline with
LCMScheduler (SDXL) on the same weights and seeds, on ONNX Runtime and OpenVINO."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
from PIL import Image

from sdrt.runtime.control.residuals import residual_names
from sdrt.runtime.errors import InputError, ModelError
from sdrt.runtime.guidance import guidance_embedding
from sdrt.runtime.model.families import check_override, detect_family
from sdrt.runtime.model.manifest import MANIFEST_NAME, Manifest
from sdrt.runtime.pipeline import GenerationRequest, Pipeline
from sdrt.runtime.samplers import default_sampler, display_name, sample
from sdrt.runtime.schedules import SchedulerConfig, lcm_schedule, sigma_table
from tests.cli.test_cli import assert_one_line_error, run
from tests.conftest import (
    MAX_PIXEL_DIFF,
    PARITY_SIZES,
    PROMPT,
    as_array,
    count_unet_calls,
    load_reference,
    reference_images,
)
from tests.runtime.model.test_families import configs_of
from tests.runtime.test_samplers import MU, S, noise, rng_noise

LCM_DREAMSHAPER = SchedulerConfig(  # SimianLuo/LCM_Dreamshaper_v7's scheduler_config.json
    class_name="LCMScheduler", beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    set_alpha_to_one=True, steps_offset=1, timestep_spacing="leading")
# Exact sampling makes the sample statistics depend on the draw only: 16,384 values put ~0.6%
# noise on the std and ~0.004 on the mean (5 standard errors stay under these).
STD_RTOL = 0.03
MEAN_ATOL = 0.02
# diffusers builds the embedding with torch's float32 exp and sin/cos, NumPy with its own: the
# angles (up to 1000 · (scale − 1)) may differ in their last bit, so sines differ by up to ~1 ulp
# of the largest angle; 2 ulps leave margin, a wrong frequency or scale is off by far more.
EMBEDDING_ANGLE_ULPS = 2


# ---------------------------------------------------------------- families (no torch needed)


@pytest.mark.parametrize(("arch", "family"), [("tiny_sd", "lcm-lora"),
                                              ("tiny_sdxl", "lcm-lora-sdxl")])
def test_lcm_scheduler_without_guidance_input_is_lcm_lora(arch, family):
    configs = configs_of(arch)
    configs["scheduler"]["_class_name"] = "LCMScheduler"
    assert detect_family(**configs) == family


def test_sd2_with_an_lcm_scheduler_stays_sd2():
    configs = configs_of("tiny_sd2")
    configs["scheduler"]["_class_name"] = "LCMScheduler"
    assert detect_family(**configs) == "sd2"


def test_family_override_keeps_the_guidance_input():
    assert check_override("sd1", "lcm-lora") == "lcm-lora"
    assert check_override("sdxl", "lcm-lora-sdxl") == "lcm-lora-sdxl"
    with pytest.raises(ModelError, match="its UNet has no LCM's guidance input"):
        check_override("sd1", "lcm")
    with pytest.raises(ModelError, match="its UNet has LCM's guidance input"):
        check_override("lcm-sdxl", "sdxl")
    with pytest.raises(ModelError, match="architecture"):
        check_override("lcm", "lcm-sdxl")


def test_lcm_scheduler_class_picks_the_lcm_sampler():
    assert default_sampler(SchedulerConfig.from_dict({"_class_name": "LCMScheduler"})) == "lcm"
    assert display_name("LCMScheduler") == display_name("lcm") == "LCM"


# ---------------------------------------------------------------- schedule and sampler (NumPy)


def test_lcm_dreamshaper_timesteps():
    # LCM's 4-step run on its 50-step skipping schedule 999, 979, …, 19.
    sched = lcm_schedule(LCM_DREAMSHAPER, 4)
    assert sched.timesteps == (999.0, 759.0, 499.0, 259.0)
    assert sched.sigmas[-1] == 0.0 and sched.init_sigma == math.hypot(1.0, sched.sigmas[0])
    assert lcm_schedule(LCM_DREAMSHAPER, 8, start=5).timesteps == (379.0, 259.0, 139.0)


def test_boundary_scalings_make_the_estimate_x_itself_at_t_0():
    config = SchedulerConfig(original_inference_steps=1000)
    sched = lcm_schedule(config, 1000)
    assert sched.timesteps[-1] == 0.0 and (sched.c_skip[-1], sched.c_out[-1]) == (1.0, 0.0)
    # Song et al. 2023's scalings with sigma_data 0.5 at t · timestep_scaling = 10 · t.
    assert sched.c_skip[-2] == pytest.approx(0.25 / (100 + 0.25))
    assert sched.c_out[-2] == pytest.approx(10 / math.sqrt(100 + 0.25))


def test_more_steps_than_the_original_schedule_is_an_input_error():
    with pytest.raises(InputError, match=r"at most original_inference_steps \(50\)"):
        sample(lambda x, t: x, noise(), config=LCM_DREAMSHAPER, sampler="lcm", steps=51,
               step_noise=rng_noise())


def test_lcm_without_step_noise_is_an_input_error():
    with pytest.raises(InputError, match="step_noise"):
        sample(lambda x, t: x, noise(), config=LCM_DREAMSHAPER, sampler="lcm", steps=2)


def test_lcm_draws_noise_between_steps_only():
    shapes = []

    def draw(shape: tuple[int, ...]) -> np.ndarray:
        shapes.append(shape)
        return np.zeros(shape, dtype=np.float32)

    sample(lambda x, t: x, noise((2, 4, 8, 8)), config=LCM_DREAMSHAPER, sampler="lcm", steps=4,
           step_noise=draw)
    assert shapes == [(2, 4, 8, 8)] * 3


@pytest.mark.parametrize("steps", [1, 2, 4, 8])
def test_exact_consistency_function_samples_the_data_distribution(steps):
    # For N(MU, S²) data the consistency function is the probability-flow ODE's endpoint
    # f(x, sigma) = MU + (x - MU)·S/sqrt(S² + sigma²); a model predicting it makes every LCM step
    # exact, so any step count samples N(MU, S²).
    table = sigma_table(LCM_DREAMSHAPER).astype(np.float64)

    def consistency_model(x_in: np.ndarray, t: float) -> np.ndarray:  # its eps
        sigma = float(table[int(t)])
        x = x_in.astype(np.float64) * math.hypot(1.0, sigma)
        endpoint = MU + (x - MU) * S / math.hypot(S, sigma)
        return ((x - endpoint) / sigma).astype(np.float32)

    out = sample(consistency_model, noise((1, 1, 128, 128)), config=LCM_DREAMSHAPER,
                 sampler="lcm", steps=steps, step_noise=rng_noise())
    assert abs(out.mean() - MU) < MEAN_ATOL
    assert abs(out.std() / S - 1) < STD_RTOL


# ---------------------------------------------------------------- guidance embedding


@pytest.mark.parity
@pytest.mark.parametrize("dim", [32, 33, 256])
@pytest.mark.parametrize("scale", [1.0, 2.0, 8.0, 8.5])
def test_guidance_embedding_is_diffusers(scale, dim):
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    want = diffusers.LatentConsistencyModelPipeline.get_guidance_scale_embedding(
        None, torch.tensor([scale - 1.0]), embedding_dim=dim)[0].numpy()
    got = guidance_embedding(scale, dim)
    assert got.dtype == np.float32 and got.shape == (dim,)
    ulp = float(np.spacing(np.float32(1000.0 * (scale - 1.0))))
    np.testing.assert_allclose(got, want, rtol=0, atol=EMBEDDING_ANGLE_ULPS * ulp + 1e-7)


# ---------------------------------------------------------------- export and defaults


def test_export_adds_timestep_cond_and_records_the_family(tiny_lcm_onnx_dir,
                                                          tiny_lcm_sdxl_onnx_dir):
    manifest = Manifest.load(tiny_lcm_onnx_dir)
    assert manifest.family == "lcm"
    unet = manifest.components["unet"]
    inputs = list(unet.inputs)  # the guidance embedding, then ControlNet's residuals
    assert inputs[:4] == ["sample", "timestep", "encoder_hidden_states", "timestep_cond"]
    assert inputs[4:] == list(residual_names(len(inputs) - 5))
    assert unet.inputs["timestep_cond"].shape == (None, 32)
    assert "validation" in unet.extra
    index = json.loads((tiny_lcm_onnx_dir / "model_index.json").read_text())
    assert index["_class_name"] == "LatentConsistencyModelPipeline"
    sdxl = Manifest.load(tiny_lcm_sdxl_onnx_dir)
    assert sdxl.family == "lcm-sdxl"
    assert list(sdxl.components["unet"].inputs)[3:6] == ["text_embeds", "time_ids",
                                                         "timestep_cond"]


@pytest.mark.parametrize(("folder", "family"), [("tiny_lcm_onnx_dir", "lcm"),
                                                ("tiny_lcm_sdxl_onnx_dir", "lcm-sdxl")])
def test_defaults_are_the_lcm_releases(request, folder, family):
    pipe = Pipeline.load(request.getfixturevalue(folder))
    req = GenerationRequest("x").resolve(pipe.facts, pipe.scheduler)
    assert (pipe.facts.family.name, req.steps, req.guidance_scale, req.sampler, req.width) == (
        family, 4, 8.0, "lcm", 64)
    assert pipe.unet.guidance_dim == 32


def test_folder_without_manifest_detects_lcm(tiny_lcm_onnx_dir, tmp_path):
    folder = shutil.copytree(tiny_lcm_onnx_dir, tmp_path / "optimum-like")
    (folder / MANIFEST_NAME).unlink()
    assert Pipeline.load(folder).facts.family.name == "lcm"


def test_cli_lcm_defaults_and_metadata(tiny_lcm_onnx_dir, tmp_path):
    out = tmp_path / "lcm.png"
    result = run("generate", "a cat", "--model", tiny_lcm_onnx_dir, "--seed", "4", "-o", out)
    assert result.exit_code == 0, result.output
    params = Image.open(out).info["parameters"].split("\n")[-1]
    assert params.startswith("Steps: 4, Sampler: LCM, CFG scale: 8, Seed: 4, Size: 64x64")


def test_cli_lcm_family_on_a_plain_unet_is_refused(tiny_sd_dir, tmp_path):
    result = run("export", tiny_sd_dir, tmp_path / "out", "--family", "lcm")
    assert_one_line_error(result, "has no LCM's guidance input")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- parity with diffusers

parity = pytest.mark.parity


@pytest.fixture(scope="module")
def lcm_reference(tiny_lcm_dir):
    return load_reference(tiny_lcm_dir)


@pytest.fixture(scope="module")
def lcm_sdxl_reference(tiny_lcm_sdxl_dir):
    return load_reference(tiny_lcm_sdxl_dir)


@parity
@pytest.mark.parametrize("size", PARITY_SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_lcm_defaults_equal_diffusers_one_unet_call_per_step(lcm_reference, tiny_lcm_onnx_dir,
                                                            backend, size, monkeypatch):
    width, height = size
    pipe = Pipeline.load(tiny_lcm_onnx_dir, backend)
    calls = count_unet_calls(pipe, monkeypatch)
    images = pipe.generate(PROMPT, width=width, height=height, seed=7, num_images=2)
    assert [shape[0] for shape in calls] == [2] * 4  # the images only: no uncond half
    expected = reference_images(lcm_reference, "lcm", steps=4, guidance=8.0, width=width,
                                height=height, seed=7, num_images=2, negative=None)
    assert np.abs(as_array(images) - expected).max() <= MAX_PIXEL_DIFF[backend]


def test_guidance_scale_reaches_the_unet_as_its_embedding(tiny_lcm_onnx_dir, monkeypatch):
    # On random weights the embedding moves the image by a few levels only, so parity alone
    # would not notice a wrong one: check what the UNet is fed (the graph equals torch for any
    # timestep_cond: the export checks it on random ones).
    pipe = Pipeline.load(tiny_lcm_onnx_dir)
    fed, run = [], pipe.unet.session.run
    monkeypatch.setattr(pipe.unet.session, "run", lambda feeds: fed.append(feeds) or run(feeds))
    pipe.generate(PROMPT, steps=2, guidance_scale=2.5, seed=3, num_images=2)
    assert len(fed) == 2
    for feeds in fed:
        np.testing.assert_array_equal(feeds["timestep_cond"], [guidance_embedding(2.5, 32)] * 2)


@parity
def test_explicit_guidance_equals_diffusers(lcm_reference, tiny_lcm_onnx_dir, backend):
    images = Pipeline.load(tiny_lcm_onnx_dir, backend).generate(
        PROMPT, steps=2, guidance_scale=2.5, seed=3)
    expected = reference_images(lcm_reference, "lcm", steps=2, guidance=2.5, width=64,
                                height=64, seed=3, num_images=1, negative=None)
    assert np.abs(as_array(images) - expected).max() <= MAX_PIXEL_DIFF[backend]


@parity
@pytest.mark.parametrize("size", PARITY_SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_lcm_sdxl_equals_diffusers(lcm_sdxl_reference, tiny_lcm_sdxl_onnx_dir, backend, size):
    width, height = size
    expected = reference_images(lcm_sdxl_reference, "lcm", steps=4, guidance=8.0, width=width,
                                height=height, seed=7, num_images=2, negative=None)
    images = Pipeline.load(tiny_lcm_sdxl_onnx_dir, backend).generate(
        PROMPT, width=width, height=height, seed=7, num_images=2)
    assert np.abs(as_array(images) - expected).max() <= MAX_PIXEL_DIFF[backend]


@parity
def test_lcm_sampler_on_a_plain_unet_without_guidance_equals_diffusers(
        tiny_sd_dir, tiny_onnx_dir, backend, monkeypatch):
    # LCM-LoRA's way (here without the LoRA): StableDiffusionPipeline with LCMScheduler, guidance
    # 1, so one UNet call per step and no guidance input.
    pipe = Pipeline.load(tiny_onnx_dir, backend)
    calls = count_unet_calls(pipe, monkeypatch)
    images = pipe.generate(PROMPT, steps=4, guidance_scale=1.0, seed=5, sampler="lcm",
                           num_images=2)
    assert [shape[0] for shape in calls] == [2] * 4
    expected = reference_images(load_reference(tiny_sd_dir), "lcm", steps=4, guidance=1.0,
                                width=64, height=64, seed=5, num_images=2, negative=None)
    assert np.abs(as_array(images) - expected).max() <= MAX_PIXEL_DIFF[backend]
