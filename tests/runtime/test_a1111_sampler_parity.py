"""A1111's deterministic samplers (UniPC, Heun, LMS, DPM2; Euler and DPM++ 2M on the new
schedules) against diffusers configured to A1111's meaning of each name, step by step on the
fake model of test_sampler_parity and as images of the tiny model (ORT).

diffusers has no Uniform or SGM Uniform option, no discard_next_to_last_sigma and, for DPM2 and
UniPC, only Karras sigmas rounded to training timesteps; there the reference is the diffusers
scheduler on its use_karras_sigmas path with its Karras conversion replaced by the ladder, so
that everything after the sigmas is diffusers' own.
"""

from __future__ import annotations

import copy
import functools
import json
from types import SimpleNamespace

import numpy as np
import pytest

from sdrt.runtime.samplers import first_call, num_model_calls, sample
from sdrt.runtime.schedule_types import SCHEDULES
from sdrt.runtime.schedules import SchedulerConfig
from tests.runtime.test_sampler_parity import (
    SD15,
    SEED,
    TRAJECTORY_RTOL,
    _noise,
    _torch_model,
    fake_model,
)

torch = pytest.importorskip("torch")
schedulers = pytest.importorskip("diffusers.schedulers")

# diffusers' schedulers call NumPy in ways NumPy 2 deprecates, thousands of times a run
pytestmark = [pytest.mark.parity, pytest.mark.filterwarnings("ignore::DeprecationWarning")]

# A1111's meaning of each name, as diffusers options (its sigmas at t uniform over [0, T − 1]:
# "linspace"); DPM2's Automatic is Karras made for steps + 1 with the next-to-last sigma dropped.
A1111_DIFFUSERS = {
    "unipc": ("UniPCMultistepScheduler", {
        "solver_order": 3, "solver_type": "bh1", "lower_order_final": True,
        "timestep_spacing": "linspace", "final_sigmas_type": "sigma_min"}),
    "heun": ("HeunDiscreteScheduler", {"timestep_spacing": "linspace"}),
    "lms": ("LMSDiscreteScheduler", {"timestep_spacing": "linspace"}),
    "dpm2": ("KDPM2DiscreteScheduler", {"timestep_spacing": "linspace",
                                        "use_karras_sigmas": True}),
    # Euler and DPM++ 2M follow the folder's config, as before (test_sampler_parity)
    "euler": ("EulerDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {
        "algorithm_type": "dpmsolver++", "solver_order": 2, "final_sigmas_type": "zero",
        "lower_order_final": True}),
}
NEW = ["unipc", "heun", "lms", "dpm2"]
SCHEDULE_NAMES = ["automatic", "karras", "exponential", "uniform", "sgm_uniform"]
PAIRS = [(s, k) for s in NEW for k in SCHEDULE_NAMES] + \
    [(s, k) for s in ("euler", "dpmpp_2m") for k in ("uniform", "sgm_uniform")]
DISCARDS = {"dpm2"}  # A1111's discard_next_to_last_sigma


def _model_sigmas(scheduler) -> torch.Tensor:
    """The model's sigma table, ascending in t, float32 as diffusers computes it."""
    return ((1 - scheduler.alphas_cumprod) / scheduler.alphas_cumprod) ** 0.5


@functools.cache
def _prototype(sampler: str, config: str, karras: bool):
    # KDPM2's and Heun's constructors set 1000 timesteps one by one (~1 s): build each once
    class_name, overrides = A1111_DIFFUSERS[sampler]
    return getattr(schedulers, class_name).from_config(
        json.loads(config), **{**overrides, **({"use_karras_sigmas": True} if karras else {})})


def _built(sampler: str, config: str, karras: bool):
    return copy.deepcopy(_prototype(sampler, config, karras))


def reference_scheduler(sampler: str, schedule: str, config: dict, steps: int):
    """The diffusers scheduler that runs (sampler, schedule) as A1111 means it: its own option
    where diffusers has one, else its Karras path on sdrt's ladder (the ladders themselves are
    compared with A1111's definitions in test_schedule_types)."""
    if sampler in DISCARDS and schedule == "automatic":
        schedule = "karras"
    if schedule == "automatic":
        return _built(sampler, json.dumps(config), False)
    scheduler = _built(sampler, json.dumps(config), True)
    if schedule != "karras" or sampler in DISCARDS:
        ladder = SCHEDULES[schedule].ladder
        ours = SchedulerConfig.from_dict(config)
        sigmas = ladder(ours, steps + 1)[:-1] if sampler in DISCARDS else ladder(ours, steps)
        scheduler._convert_to_karras = lambda *args, **kwargs: sigmas.copy()
    if sampler == "unipc":  # its run ends at sigma(0) on every ladder (unipc_ladder_schedule)
        _end_at_sigma_min(scheduler)
    return scheduler


def _end_at_sigma_min(scheduler) -> None:
    """UniPC's final_sigmas_type="sigma_min" as the model's sigma_min: diffusers takes the
    ladder's last sigma, which is that for Karras, Exponential and Uniform (two steps or more)
    but not for SGM Uniform, whose run would end still noisy, nor for one step, which would
    make no move."""
    set_timesteps = scheduler.set_timesteps

    def ending_at_sigma_min(*args, **kwargs):
        set_timesteps(*args, **kwargs)
        scheduler.sigmas[-1] = _model_sigmas(scheduler)[0]

    scheduler.set_timesteps = ending_at_sigma_min


def _diffusers_trajectory(scheduler, steps: int, noise: np.ndarray,
                          strength: float | None = None, init: np.ndarray | None = None
                          ) -> list[np.ndarray]:
    scheduler.set_timesteps(steps)
    if init is None:
        timesteps = scheduler.timesteps
        latents = torch.from_numpy(noise) * scheduler.init_noise_sigma
    else:
        from diffusers import StableDiffusionImg2ImgPipeline

        holder = SimpleNamespace(scheduler=scheduler)
        timesteps, _ = StableDiffusionImg2ImgPipeline.get_timesteps(holder, steps, strength, "cpu")
        latents = scheduler.add_noise(torch.from_numpy(init), torch.from_numpy(noise),
                                      timesteps[:1])
    trajectory = []
    for t in timesteps:
        out = _torch_model(scheduler.scale_model_input(latents, t), t)
        latents = scheduler.step(out, t, latents).prev_sample
        trajectory.append(latents.numpy().copy())
    return trajectory


def _assert_trajectory(sampler: str, schedule: str, config: dict, steps: int,
                       strength: float | None = None, init: np.ndarray | None = None) -> None:
    noise = _noise()
    expected = _diffusers_trajectory(reference_scheduler(sampler, schedule, config, steps),
                                     steps, noise, strength, init)
    start = 0 if init is None else steps - int(steps * strength)
    got: list[np.ndarray] = []

    def record(i: int, n: int, latents: np.ndarray) -> None:
        assert (i, n) == (len(got), num_model_calls(sampler, steps, start))
        got.append(latents.copy())

    final = sample(fake_model, noise, config=SchedulerConfig.from_dict(config), sampler=sampler,
                   schedule=schedule, steps=steps, callback=record, start_step=start,
                   init_latents=init)
    assert len(got) == len(expected)
    for i, (a, b) in enumerate(zip(got, expected, strict=True)):
        scale = max(1.0, float(np.abs(b).max()))
        err = float(np.abs(a - b).max())
        assert err <= TRAJECTORY_RTOL * scale, f"call {i}: max |diff| {err:.3g} (scale {scale:.3g})"
    np.testing.assert_array_equal(final, got[-1])


# 1: Heun/DPM2 only Euler's call, UniPC order 1; 2: a t = n + ½ on Uniform ladders; 9: UniPC's
# order 3 and LMS's order 4 in use
@pytest.mark.parametrize("prediction, steps", [("epsilon", 1), ("epsilon", 2), ("epsilon", 9),
                                               ("v_prediction", 4)])
@pytest.mark.parametrize("sampler, schedule", PAIRS)
def test_trajectory_matches_diffusers_as_a1111_means_it(sampler, schedule, prediction, steps):
    if steps == 1 and schedule == "karras" and sampler in ("heun", "lms"):
        pytest.skip("diffusers' one linspace step is t = 0 alone: its Karras range collapses "
                    "to sigma(0), where A1111's (and sdrt's) is sigma_max")
    # the folder's own spacing ("leading" here) does not change A1111's meaning of the names
    config = {**SD15, "prediction_type": prediction, "timestep_spacing": "leading"}
    _assert_trajectory(sampler, schedule, config, steps)


@pytest.mark.parametrize("sampler", ["heun", "lms", "euler"])
def test_exponential_equals_diffusers_own_option(sampler):
    class_name, base = A1111_DIFFUSERS[sampler]
    scheduler = getattr(schedulers, class_name).from_config(
        {**SD15, "timestep_spacing": "linspace"}, **base, use_exponential_sigmas=True)
    noise, got = _noise(), []
    expected = _diffusers_trajectory(scheduler, 6, noise)
    sample(fake_model, noise, config=SchedulerConfig.from_dict(SD15), sampler=sampler,
           schedule="exponential", steps=6, callback=lambda i, n, x: got.append(x.copy()))
    for a, b in zip(got, expected, strict=True):
        assert float(np.abs(a - b).max()) <= TRAJECTORY_RTOL * max(1.0, float(np.abs(b).max()))


@pytest.mark.parametrize("sampler", ["unipc", "heun", "dpm2"])
@pytest.mark.parametrize("strength", [0.35, 0.8])
def test_image_to_image_matches_diffusers(sampler, strength):
    # diffusers starts second-order schedulers at model call t_start · order, as sdrt does; its
    # LMS keeps the absolute step index as its order there, so LMS is not compared.
    init = np.random.default_rng(7).standard_normal((2, 4, 8, 8)).astype(np.float32) * 0.8
    _assert_trajectory(sampler, "automatic", SD15, 10, strength, init)
    assert first_call(sampler, 3) == (3 if sampler == "unipc" else 6)


# ---- images of the tiny model ------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_pair(tiny_sd_dir, tiny_onnx_dir):
    from sdrt.runtime.pipeline import Pipeline
    from tests.conftest import load_reference

    return load_reference(tiny_sd_dir), Pipeline.load(tiny_onnx_dir, backend="ort")


# Each new sampler's Automatic and each new schedule once run by default; the trajectory tests
# above cover every pair, and `-m slow` runs the whole grid of images (~5 s a pair).
IMAGE_PAIRS = {("unipc", "automatic"), ("heun", "automatic"), ("lms", "automatic"),
               ("dpm2", "automatic"), ("heun", "uniform"), ("dpmpp_2m", "sgm_uniform"),
               ("unipc", "exponential")}


@pytest.mark.parametrize("sampler, schedule", [
    pytest.param(*pair, marks=() if pair in IMAGE_PAIRS else pytest.mark.slow) for pair in PAIRS])
def test_tiny_model_images_equal_diffusers(tiny_pair, sampler, schedule):
    from tests.conftest import MAX_PIXEL_DIFF, NEGATIVE, PROMPT

    reference, pipe = tiny_pair
    steps = 3
    reference.scheduler = reference_scheduler(sampler, schedule,
                                              reference.folder_scheduler_config, steps)
    expected = reference(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=steps,
                         guidance_scale=6.0, width=64, height=64,
                         generator=torch.Generator().manual_seed(SEED), output_type="np").images
    image = pipe.generate(PROMPT, negative_prompt=NEGATIVE, steps=steps, guidance_scale=6.0,
                          width=64, height=64, seed=SEED, sampler=sampler, schedule=schedule)[0]
    got = np.asarray(image, dtype=np.int16)
    assert np.abs(got - np.round(expected[0] * 255).astype(np.int16)).max() \
        <= MAX_PIXEL_DIFF["ort"]
