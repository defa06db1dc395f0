"""Trajectory parity: every NumPy sampler against the diffusers scheduler driven the diffusers way.

Both sides get the same deterministic fake model (one NumPy function, wrapped for torch), the
same starting noise and, for Euler a and LCM, the same torch generator stream; the latents after
every model call must agree.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from sdrt.runtime.samplers import (
    KeepOutside,
    num_model_calls,
    sample,
    start_step_for_strength,
)
from sdrt.runtime.schedules import SchedulerConfig

torch = pytest.importorskip("torch")
schedulers = pytest.importorskip("diffusers.schedulers")

pytestmark = pytest.mark.parity

# Max abs difference per step, times max(1, max|latent|): both sides round every op to float32
# (~6e-8 relative) and torch's float32 sqrt is not correctly rounded (~1 ulp); over ≤ 26 steps
# that accumulates to ~1e-6, so 1e-5 passes with margin while any formula slip (≥ 1e-3) fails.
TRAJECTORY_RTOL = 1e-5
SHAPE = (2, 4, 8, 8)
SD15 = {  # runwayml/stable-diffusion-v1-5 scheduler_config.json
    "_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "set_alpha_to_one": False,
    "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None, "clip_sample": False,
}
# How each canonical sampler is built with diffusers (A1111's semantics for the DPM++ ones).
DIFFUSERS = {
    "ddim": ("DDIMScheduler", {}),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {
        "algorithm_type": "dpmsolver++", "solver_order": 2, "final_sigmas_type": "zero",
        "lower_order_final": True, "use_karras_sigmas": False}),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler", {
        "algorithm_type": "dpmsolver++", "solver_order": 2, "final_sigmas_type": "zero",
        "lower_order_final": True, "use_karras_sigmas": True}),
    "lcm": ("LCMScheduler", {}),
}
SAMPLER_NAMES = list(DIFFUSERS)
STEP_NOISE = ("euler_a", "lcm")  # samplers that draw fresh noise from the generator each step
SEED = 1234


def fake_model(x_in: np.ndarray, t: float) -> np.ndarray:
    """A smooth, bounded stand-in for a UNet output (eps or v) that depends on x_in and t."""
    phase = np.float32(t / 250.0)
    return (0.9 * x_in + 0.2 * np.sin(2.0 * x_in + phase)
            + 0.05 * np.cos(phase)).astype(np.float32)


def _torch_model(x_in, t):
    return torch.from_numpy(fake_model(x_in.numpy(), float(t)))


def _noise() -> np.ndarray:
    return np.random.default_rng(SEED).standard_normal(SHAPE).astype(np.float32)


def _diffusers_scheduler(name: str, config: dict):
    class_name, overrides = DIFFUSERS[name]
    return getattr(schedulers, class_name).from_config(config, **overrides)


def _diffusers_run(name: str, config: dict, steps: int, noise: np.ndarray,
                   strength: float | None = None, init: np.ndarray | None = None
                   ) -> list[np.ndarray]:
    """The diffusers loop (txt2img, or img2img at `strength`); latents after every step."""
    scheduler = _diffusers_scheduler(name, config)
    scheduler.set_timesteps(steps)
    if init is None:
        timesteps = scheduler.timesteps
        latents = torch.from_numpy(noise) * scheduler.init_noise_sigma
    else:  # StableDiffusionImg2ImgPipeline's own step selection and add_noise
        from diffusers import StableDiffusionImg2ImgPipeline

        holder = SimpleNamespace(scheduler=scheduler)
        timesteps, _ = StableDiffusionImg2ImgPipeline.get_timesteps(holder, steps, strength, "cpu")
        latents = scheduler.add_noise(torch.from_numpy(init), torch.from_numpy(noise),
                                      timesteps[:1])
    generator = torch.Generator().manual_seed(SEED)
    extra = {"generator": generator} if name in STEP_NOISE else {}
    trajectory = []
    for t in timesteps:
        out = _torch_model(scheduler.scale_model_input(latents, t), t)
        latents = scheduler.step(out, t, latents, **extra).prev_sample
        trajectory.append(latents.numpy().copy())
    return trajectory


def _ours(name: str, config: dict, steps: int, noise: np.ndarray, start_step: int = 0,
          init: np.ndarray | None = None) -> tuple[list[np.ndarray], np.ndarray]:
    generator = torch.Generator().manual_seed(SEED)
    trajectory: list[np.ndarray] = []

    def record(i: int, n: int, latents: np.ndarray) -> None:
        assert (i, n) == (len(trajectory), num_model_calls(name, steps, start_step))
        trajectory.append(latents.copy())

    final = sample(fake_model, noise, config=SchedulerConfig.from_dict(config), sampler=name,
                   steps=steps, callback=record, start_step=start_step, init_latents=init,
                   step_noise=lambda shape: torch.randn(shape, generator=generator).numpy())
    return trajectory, final


def _assert_same(name: str, config: dict, steps: int, strength: float | None = None,
                 init: np.ndarray | None = None) -> None:
    noise = _noise()
    expected = _diffusers_run(name, config, steps, noise, strength, init)
    start = 0 if init is None else start_step_for_strength(steps, strength)
    got, final = _ours(name, config, steps, noise, start, init)
    assert len(got) == len(expected)
    for i, (a, b) in enumerate(zip(got, expected, strict=True)):
        scale = max(1.0, float(np.abs(b).max()))
        err = float(np.abs(a - b).max())
        assert err <= TRAJECTORY_RTOL * scale, f"step {i}: max |diff| {err:.3g} (scale {scale:.3g})"
    assert final.dtype == np.float32
    np.testing.assert_array_equal(final, got[-1])


@pytest.mark.parametrize("steps", [1, 2, 5, 7, 20, 25])  # 7: T // n ≠ T / n
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("name", SAMPLER_NAMES)
def test_trajectory_matches_diffusers(name, prediction, spacing, steps):
    config = {**SD15, "prediction_type": prediction, "timestep_spacing": spacing}
    _assert_same(name, config, steps)


@pytest.mark.parametrize("name", SAMPLER_NAMES)
def test_missing_spacing_uses_each_scheduler_class_default(name):
    # SD 1.5's file has no timestep_spacing: from_config gives DDIM/PNDM "leading" and
    # Euler/DPM "linspace"; sdrt must pick the same per sampler.
    _assert_same(name, SD15, 20)


@pytest.mark.parametrize("name", SAMPLER_NAMES)
@pytest.mark.parametrize("overrides", [
    {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02, "steps_offset": 0},
    {"beta_schedule": "squaredcos_cap_v2", "timestep_spacing": "trailing"},
    {"beta_schedule": "scaled_linear", "set_alpha_to_one": True, "timestep_spacing": "leading",
     "prediction_type": "v_prediction"},
])
def test_other_beta_schedules_and_final_alpha(name, overrides):
    if name == "dpmpp_2m_karras" and overrides["beta_schedule"] == "squaredcos_cap_v2":
        pytest.skip("diffusers bug: its Karras timesteps repeat 998 three times here and its "
                    "step index starts at the second copy, then runs past the table")
    _assert_same(name, {**SD15, **overrides}, 7)


@pytest.mark.parametrize("name", SAMPLER_NAMES)
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("strength", [0.3, 0.75, 1.0])
def test_image_to_image_matches_diffusers(name, spacing, strength):
    init = np.random.default_rng(7).standard_normal(SHAPE).astype(np.float32) * 0.8
    _assert_same(name, {**SD15, "timestep_spacing": spacing}, 20, strength, init)


def _diffusers_inpaint_run(name: str, config: dict, steps: int, noise: np.ndarray,
                           strength: float, init: np.ndarray, mask: np.ndarray
                           ) -> list[np.ndarray]:
    """StableDiffusionInpaintPipeline's loop for a 4-channel UNet: start (pure noise at strength
    1, else add_noise), then after every step the original re-noised to the next timestep (clean
    after the last) outside the mask."""
    from diffusers import StableDiffusionInpaintPipeline

    scheduler = _diffusers_scheduler(name, config)
    scheduler.set_timesteps(steps)
    holder = SimpleNamespace(scheduler=scheduler)
    timesteps, _ = StableDiffusionInpaintPipeline.get_timesteps(holder, steps, strength, "cpu")
    original, eps, keep = (torch.from_numpy(a) for a in (init, noise, mask))
    latents = (eps * scheduler.init_noise_sigma if strength == 1.0
               else scheduler.add_noise(original, eps, timesteps[:1]))
    generator = torch.Generator().manual_seed(SEED)
    extra = {"generator": generator} if name in STEP_NOISE else {}
    trajectory = []
    for i, t in enumerate(timesteps):
        out = _torch_model(scheduler.scale_model_input(latents, t), t)
        latents = scheduler.step(out, t, latents, **extra).prev_sample
        proper = original
        if i < len(timesteps) - 1:
            proper = scheduler.add_noise(original, eps, torch.tensor([timesteps[i + 1]]))
        latents = (1 - keep) * proper + keep * latents
        trajectory.append(latents.numpy().copy())
    return trajectory


@pytest.mark.parametrize("name", SAMPLER_NAMES)
@pytest.mark.parametrize("strength", [0.6, 1.0])
def test_inpainting_blend_matches_diffusers(name, strength):
    rng = np.random.default_rng(8)
    init = rng.standard_normal(SHAPE).astype(np.float32) * 0.8
    mask = (rng.random((SHAPE[0], 1, *SHAPE[2:])) < 0.4).astype(np.float32)
    noise, config, steps = _noise(), {**SD15, "timestep_spacing": "leading"}, 10
    expected = _diffusers_inpaint_run(name, config, steps, noise, strength, init, mask)
    generator = torch.Generator().manual_seed(SEED)
    got: list[np.ndarray] = []
    final = sample(fake_model, noise, config=SchedulerConfig.from_dict(config), sampler=name,
                   steps=steps, start_step=start_step_for_strength(steps, strength),
                   init_latents=None if strength == 1.0 else init,
                   keep=KeepOutside(mask, init, noise),
                   callback=lambda i, n, latents: got.append(latents.copy()),
                   step_noise=lambda shape: torch.randn(shape, generator=generator).numpy())
    assert len(got) == len(expected)
    for i, (a, b) in enumerate(zip(got, expected, strict=True)):
        scale = max(1.0, float(np.abs(b).max()))
        assert float(np.abs(a - b).max()) <= TRAJECTORY_RTOL * scale, f"step {i}"
    np.testing.assert_array_equal(final, got[-1])
    np.testing.assert_allclose(final * (1 - mask), init * (1 - mask), atol=1e-6)


@pytest.mark.parametrize("overrides", [
    {}, {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02},
    {"beta_schedule": "squaredcos_cap_v2"},
])
def test_training_tables_are_diffusers_float32_tables(overrides):
    from sdrt.runtime.schedules import alphas_cumprod, betas, sigma_table

    config = {**SD15, **overrides}
    reference = schedulers.EulerDiscreteScheduler.from_config(config)
    ours = SchedulerConfig.from_dict(config)
    np.testing.assert_array_equal(betas(ours), reference.betas.numpy())
    np.testing.assert_array_equal(alphas_cumprod(ours), reference.alphas_cumprod.numpy())
    # torch's vectorised float32 sqrt is not correctly rounded: allow 2 ulp.
    np.testing.assert_array_max_ulp(sigma_table(ours), reference.sigmas[:-1].numpy()[::-1], 2)


# ---- schedule types (A1111's "Schedule type") against diffusers' sigma options ----------------

# (sampler, schedule) → the diffusers scheduler that runs that pair. Euler's diffusers range is
# the spaced sigmas' own, the model's (as A1111's) only with "linspace" spacing: tested there.
LADDER_DIFFUSERS = {
    ("euler", "karras"): ("EulerDiscreteScheduler", {"use_karras_sigmas": True}),
    ("euler", "exponential"): ("EulerDiscreteScheduler", {"use_exponential_sigmas": True}),
    ("dpmpp_2m", "karras"): DIFFUSERS["dpmpp_2m_karras"],
}


@pytest.mark.parametrize("steps", [1, 4, 20])
@pytest.mark.parametrize("overrides", [
    {}, {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02},
    {"beta_schedule": "squaredcos_cap_v2"},
])
def test_karras_ladder_is_diffusers_convert_to_karras(overrides, steps):
    from sdrt.runtime.schedules import karras_ladder, sigma_table

    config = {**SD15, **overrides}
    reference = schedulers.DPMSolverMultistepScheduler.from_config(config,
                                                                  use_karras_sigmas=True)
    table = sigma_table(SchedulerConfig.from_dict(config))
    expected = reference._convert_to_karras(in_sigmas=np.flip(table).astype(np.float64),
                                            num_inference_steps=steps)
    ours = karras_ladder(SchedulerConfig.from_dict(config), steps)
    np.testing.assert_array_equal(ours, expected)
    reference.set_timesteps(steps)
    np.testing.assert_allclose(ours, reference.sigmas.numpy()[:-1], rtol=1e-6)  # float32 table


@pytest.mark.parametrize("steps", [2, 7, 20])
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("pair", list(LADDER_DIFFUSERS))
def test_sampler_on_a_schedule_matches_diffusers_sigma_option(pair, prediction, steps):
    sampler, schedule = pair
    class_name, overrides = LADDER_DIFFUSERS[pair]
    config = {**SD15, "prediction_type": prediction, "timestep_spacing": "linspace"}
    reference = getattr(schedulers, class_name).from_config(config, **overrides)
    reference.set_timesteps(steps)
    noise = _noise()
    latents, expected = torch.from_numpy(noise) * reference.init_noise_sigma, []
    for t in reference.timesteps:
        out = _torch_model(reference.scale_model_input(latents, t), t)
        latents = reference.step(out, t, latents).prev_sample
        expected.append(latents.numpy().copy())
    got: list[np.ndarray] = []
    sample(fake_model, noise, config=SchedulerConfig.from_dict(config), sampler=sampler,
           schedule=schedule, steps=steps, callback=lambda i, n, x: got.append(x.copy()))
    assert len(got) == len(expected)
    for i, (a, b) in enumerate(zip(got, expected, strict=True)):
        scale = max(1.0, float(np.abs(b).max()))
        assert float(np.abs(a - b).max()) <= TRAJECTORY_RTOL * scale, f"step {i}"
