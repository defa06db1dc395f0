"""The stochastic samplers (runtime/sde_samplers.py) under A1111's meaning of their names.

DPM2 a and DPM++ 2M SDE are checked against diffusers' schedulers driven the diffusers way with
the same torch generator stream (trajectories with a fake model, then images on the tiny ONNX
model); DPM++ 2S a, DPM++ SDE and DPM++ 3M SDE against torch transcriptions of k-diffusion's
loops written here, drawing the same per-step noise (diffusers has no 2S a, draws DPM++ SDE's
noise from a torchsde Brownian tree, and its third-order SDE update differs from k-diffusion's).
"""

from __future__ import annotations

import copy
import functools
import math
from types import SimpleNamespace

import numpy as np
import pytest

from sdrt.runtime.errors import InputError
from sdrt.runtime.pipeline import Pipeline
from sdrt.runtime.samplers import (
    SAMPLERS,
    num_model_calls,
    resolve_pair,
    sample,
    start_step_for_strength,
)
from sdrt.runtime.schedules import SchedulerConfig
from sdrt.runtime.sde_samplers import SDE_SAMPLERS, two_call_tables
from tests.conftest import (
    MAX_PIXEL_DIFF,
    PROMPT,
    as_array,
    count_unet_calls,
    load_reference,
)

torch = pytest.importorskip("torch")
schedulers = pytest.importorskip("diffusers.schedulers")

# diffusers' schedulers call NumPy in ways NumPy 2 deprecates, thousands of times a run
pytestmark = [pytest.mark.parity, pytest.mark.filterwarnings("ignore::DeprecationWarning")]

# As tests/runtime/test_sampler_parity.py: float32 on both sides, ~1e-6 after a few steps; a
# formula slip is ≥ 1e-3.
TRAJECTORY_RTOL = 1e-5
SHAPE = (2, 4, 8, 8)
SEED = 1234
# SD 1.5's scheduler with "linspace" spacing: diffusers' K-schedulers start at sigma_max then,
# as k-diffusion (A1111) does, rather than at sqrt(sigma_max² + 1).
SD15 = {"_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
        "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "set_alpha_to_one": False,
        "steps_offset": 1, "clip_sample": False, "timestep_spacing": "linspace"}
SDE_2M = {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}


def fake_model(x_in: np.ndarray, t: float) -> np.ndarray:
    """A smooth, bounded stand-in for a UNet output that depends on x_in and t."""
    phase = np.float32(t / 250.0)
    return (0.9 * x_in + 0.2 * np.sin(2.0 * x_in + phase)
            + 0.05 * np.cos(phase)).astype(np.float32)


def _noise() -> np.ndarray:
    return np.random.default_rng(SEED).standard_normal(SHAPE).astype(np.float32)


def _model_sigmas(scheduler) -> np.ndarray:
    """The model's training sigmas, descending, float64 (A1111's sigma_max … sigma_min)."""
    alphas = scheduler.alphas_cumprod.numpy().astype(np.float64)
    return np.sqrt((1 - alphas) / alphas)[::-1].copy()


def a1111_ladder(scheduler, method: str, discard: bool) -> None:
    """Make diffusers' `_convert_to_karras` / `_convert_to_exponential` build A1111's ladder:
    over the model's whole sigma range (diffusers takes it from its spaced timesteps, which is
    the model's only with linspace spacing and ≥ 2 steps), made for steps + 1 with the
    next-to-last sigma dropped where A1111 discards it."""
    convert, full = getattr(scheduler, method), _model_sigmas(scheduler)

    def ladder(in_sigmas, num_inference_steps):
        made = convert(in_sigmas=full, num_inference_steps=num_inference_steps + discard)
        return made[:num_inference_steps]

    setattr(scheduler, method, ladder)


def rounded_timesteps(scheduler) -> None:
    """Call DPMSolverMultistepScheduler's model at the nearest training timestep of each
    exponential sigma, as it does for Karras sigmas (it truncates exponential ones); sdrt
    rounds on every ladder."""
    set_timesteps = scheduler.set_timesteps

    def rounded(steps, device=None):
        set_timesteps(steps)
        log_sigmas = np.log(_model_sigmas(scheduler)[::-1])
        ts = [scheduler._sigma_to_t(np.float64(s), log_sigmas) for s in scheduler.sigmas[:-1]]
        scheduler.timesteps = torch.from_numpy(np.round(np.array(ts))).to(torch.int64)

    scheduler.set_timesteps = rounded


# name → (diffusers class, its options, patches): diffusers configured to A1111's meaning.
DIFFUSERS = {
    "dpm2_a": ("KDPM2AncestralDiscreteScheduler", {"use_karras_sigmas": True},
               [lambda s: a1111_ladder(s, "_convert_to_karras", discard=True)]),
    "dpmpp_2m_sde": ("DPMSolverMultistepScheduler", {**SDE_2M, "use_exponential_sigmas": True},
                     [rounded_timesteps]),
    "dpmpp_2m_sde karras": ("DPMSolverMultistepScheduler", {**SDE_2M, "use_karras_sigmas": True},
                            []),
}


@functools.cache
def _built(key: str, config: tuple):
    """One scheduler per configuration: KDPM2AncestralDiscreteScheduler's constructor lays out
    all 1000 training steps, ~2 s on CPU; copies of it are instant."""
    class_name, options, _ = DIFFUSERS[key]
    return getattr(schedulers, class_name).from_config(dict(config), **options)


def diffusers_scheduler(key: str, config: dict):
    """diffusers' scheduler for `key` on `config` (the prediction type set on a copy)."""
    shared = tuple(sorted((k, v) for k, v in config.items() if k != "prediction_type"))
    scheduler = copy.deepcopy(_built(key, shared))
    scheduler.register_to_config(prediction_type=config.get("prediction_type", "epsilon"))
    for patch in DIFFUSERS[key][2]:
        patch(scheduler)
    return scheduler


def _diffusers_run(key: str, config: dict, steps: int, noise: np.ndarray,
                   strength: float | None = None, init: np.ndarray | None = None):
    """diffusers' loop (txt2img, or img2img at `strength`); latents after every step() call."""
    scheduler = diffusers_scheduler(key, config)
    scheduler.set_timesteps(steps)
    timesteps, latents = scheduler.timesteps, torch.from_numpy(noise) * scheduler.init_noise_sigma
    if init is not None:  # StableDiffusionImg2ImgPipeline's own step selection and add_noise
        from diffusers import StableDiffusionImg2ImgPipeline

        holder = SimpleNamespace(scheduler=scheduler)
        timesteps, _ = StableDiffusionImg2ImgPipeline.get_timesteps(holder, steps, strength, "cpu")
        latents = scheduler.add_noise(torch.from_numpy(init), torch.from_numpy(noise),
                                      timesteps[:1])
    generator = torch.Generator().manual_seed(SEED)
    trajectory = []
    for t in timesteps:
        out = torch.from_numpy(fake_model(scheduler.scale_model_input(latents, t).numpy(),
                                          float(t)))
        latents = scheduler.step(out, t, latents, generator=generator).prev_sample
        trajectory.append(latents.numpy().copy())
    return trajectory


def _ours(name: str, config: dict, steps: int, noise: np.ndarray, schedule: str | None = None,
          start_step: int = 0, init: np.ndarray | None = None):
    generator = torch.Generator().manual_seed(SEED)
    trajectory: list[np.ndarray] = []
    final = sample(fake_model, noise, config=SchedulerConfig.from_dict(config), sampler=name,
                   schedule=schedule, steps=steps, start_step=start_step, init_latents=init,
                   callback=lambda i, n, latents: trajectory.append(latents.copy()),
                   step_noise=lambda shape: torch.randn(shape, generator=generator).numpy())
    return trajectory, final


def _assert_close(got: list[np.ndarray], expected: list[np.ndarray]) -> None:
    assert len(got) == len(expected)
    for i, (a, b) in enumerate(zip(got, expected, strict=True)):
        scale = max(1.0, float(np.abs(b).max()))
        err = float(np.abs(a - b).max())
        assert err <= TRAJECTORY_RTOL * scale, f"call {i}: max |diff| {err:.3g}"


@pytest.mark.parametrize("steps", [1, 2, 7])
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("key", list(DIFFUSERS))
def test_trajectory_matches_diffusers(key, prediction, steps):
    name, _, schedule = key.partition(" ")
    config = {**SD15, "prediction_type": prediction}
    noise = _noise()
    got, final = _ours(name, config, steps, noise, schedule or None)
    _assert_close(got, _diffusers_run(key, config, steps, noise))
    assert len(got) == num_model_calls(name, steps)
    np.testing.assert_array_equal(final, got[-1])


@pytest.mark.parametrize("strength", [0.5, 1.0])
@pytest.mark.parametrize("key", ["dpm2_a", "dpmpp_2m_sde"])
def test_image_to_image_matches_diffusers(key, strength):
    init = np.random.default_rng(7).standard_normal(SHAPE).astype(np.float32) * 0.8
    steps, noise = 8, _noise()
    expected = _diffusers_run(key, SD15, steps, noise, strength, init)
    got, _ = _ours(key, SD15, steps, noise, start_step=start_step_for_strength(steps, strength),
                   init=init)
    _assert_close(got, expected)


# ---- k-diffusion's loops, transcribed in torch (eta = 1, s_noise = 1) -------------------------


def _k_denoiser(table: np.ndarray, round_t: bool):
    """D(x; sigma) of an eps model on x = x0 + sigma·eps, the model called at the training
    timestep of sigma (log-linear between table entries; rounded where sdrt's tables round)."""
    log_table = np.log(table)  # ascending

    def denoise(x, sigma):
        t = float(np.interp(math.log(float(sigma)), log_table, np.arange(len(table))))
        t = round(t) if round_t else t
        eps = torch.from_numpy(fake_model((x / math.hypot(1.0, float(sigma))).numpy(), t))
        return x - sigma * eps

    return denoise


def _ancestral(sigma, sigma_next):
    up = (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5
    return (sigma_next**2 - up**2) ** 0.5, up


def k_dpmpp_2s_ancestral(model, x, sigmas, randn):
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        down, up = _ancestral(sigmas[i], sigmas[i + 1])
        if down == 0:
            x = x + (x - denoised) / sigmas[i] * (down - sigmas[i])
        else:
            t, t_next = -sigmas[i].log(), -down.log()
            h = t_next - t
            s = t + h / 2
            x_2 = (s.neg().exp() / t.neg().exp()) * x - (-h / 2).expm1() * denoised
            denoised_2 = model(x_2, s.neg().exp())
            x = (t_next.neg().exp() / t.neg().exp()) * x - (-h).expm1() * denoised_2
        if sigmas[i + 1] > 0:
            x = x + randn() * up
    return x


def k_dpmpp_sde(model, x, sigmas, randn):
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        if sigmas[i + 1] == 0:
            x = x + (x - denoised) / sigmas[i] * (sigmas[i + 1] - sigmas[i])
            continue
        t, t_next = -sigmas[i].log(), -sigmas[i + 1].log()
        s = t + (t_next - t) / 2
        down, up = _ancestral(t.neg().exp(), s.neg().exp())
        s_ = -down.log()
        x_2 = (s_.neg().exp() / t.neg().exp()) * x - (t - s_).expm1() * denoised
        x_2 = x_2 + randn() * up
        denoised_2 = model(x_2, s.neg().exp())
        down, up = _ancestral(t.neg().exp(), t_next.neg().exp())
        t_next_ = -down.log()
        x = (t_next_.neg().exp() / t.neg().exp()) * x - (t - t_next_).expm1() * denoised_2
        x = x + randn() * up
    return x


def k_dpmpp_3m_sde(model, x, sigmas, randn):
    denoised_1 = denoised_2 = h_1 = h_2 = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        fresh = randn()  # sdrt draws on the last step too, as diffusers' SDE solvers do
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            h = -sigmas[i + 1].log() + sigmas[i].log()
            h_eta = 2 * h
            x = torch.exp(-h_eta) * x + (-h_eta).expm1().neg() * denoised
            phi_2 = h_eta.neg().expm1() / h_eta + 1
            if h_2 is not None:
                r0, r1 = h_1 / h, h_2 / h
                d1_0, d1_1 = (denoised - denoised_1) / r0, (denoised_1 - denoised_2) / r1
                d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                x = x + phi_2 * d1 - (phi_2 / h_eta - 0.5) * d2
            elif h_1 is not None:
                x = x + phi_2 * (denoised - denoised_1) / (h_1 / h)
            x = x + fresh * sigmas[i + 1] * (-2 * h).expm1().neg().sqrt()
            denoised_1, denoised_2, h_1, h_2 = denoised, denoised_1, h, h_1
    return x


# name → (loop, A1111's Automatic ladder, discard, DPM-Solver tables): on those sdrt calls the
# model at the nearest training timestep and starts from noise · sqrt(sigma_max² + 1), as
# diffusers' DPMSolverMultistepScheduler does (k-diffusion: the exact timestep, noise · sigma_max).
K_LOOPS = {
    "dpmpp_2s_a": (k_dpmpp_2s_ancestral, "karras", False, False),
    "dpmpp_sde": (k_dpmpp_sde, "karras", False, False),
    "dpmpp_3m_sde": (k_dpmpp_3m_sde, "exponential", True, True),
}


def _a1111_sigmas(table: np.ndarray, ladder: str, steps: int, discard: bool):
    """A1111's sigmas for "Automatic": k-diffusion's Karras (rho 7) or exponential ladder
    between the model's sigma_min and sigma_max, next-to-last dropped where it discards."""
    n = steps + discard
    if ladder == "karras":
        ramp = np.linspace(0, 1, n)
        lo, hi = table[0] ** (1 / 7), table[-1] ** (1 / 7)
        sigmas = (hi + ramp * (lo - hi)) ** 7
    else:
        sigmas = np.exp(np.linspace(math.log(table[-1]), math.log(table[0]), n))
    return torch.from_numpy(np.append(sigmas[:steps], 0.0))


@pytest.mark.parametrize("steps", [1, 2, 3, 8])
@pytest.mark.parametrize("name", list(K_LOOPS))
def test_matches_k_diffusion_loop(name, steps):
    loop, ladder, discard, dpm_tables = K_LOOPS[name]
    reference = schedulers.EulerDiscreteScheduler.from_config(SD15)
    table = _model_sigmas(reference)[::-1].copy()  # ascending
    noise = _noise()
    sigmas = _a1111_sigmas(table, ladder, steps, discard)
    start = math.hypot(1.0, sigmas[0]) if dpm_tables else sigmas[0]
    generator = torch.Generator().manual_seed(SEED)
    expected = loop(_k_denoiser(table, dpm_tables), torch.from_numpy(noise).double() * start,
                    sigmas, lambda: torch.randn(SHAPE, generator=generator).double())
    got, final = _ours(name, SD15, steps, noise)
    assert len(got) == num_model_calls(name, steps)
    scale = max(1.0, float(expected.abs().max()))
    assert float(np.abs(final - expected.numpy()).max()) <= TRAJECTORY_RTOL * scale


def test_3m_sde_agrees_with_diffusers_on_its_first_two_steps_only():
    # diffusers' order-3 "sde-dpmsolver++" update (solver_type "heun" for k-diffusion's phi_2
    # form on step 2) weights the second difference D2 by (1 − e^{−2h} − 2h)/(2h)² − 1/2, an
    # O(1) factor; k-diffusion's −phi_3 is that plus 1 (O(h), as a third-order term must be).
    config, steps, noise = SD15, 6, _noise()
    scheduler = schedulers.DPMSolverMultistepScheduler.from_config(
        config, algorithm_type="sde-dpmsolver++", solver_order=3, solver_type="heun",
        lower_order_final=False, use_karras_sigmas=True)
    a1111_ladder(scheduler, "_convert_to_karras", discard=True)
    scheduler.set_timesteps(steps)
    generator = torch.Generator().manual_seed(SEED)
    latents, expected = torch.from_numpy(noise) * scheduler.init_noise_sigma, []
    for t in scheduler.timesteps:
        out = torch.from_numpy(fake_model(scheduler.scale_model_input(latents, t).numpy(),
                                          float(t)))
        latents = scheduler.step(out, t, latents, generator=generator).prev_sample
        expected.append(latents.numpy().copy())
    got, _ = _ours("dpmpp_3m_sde", config, steps, noise, "karras")
    _assert_close(got[:2], expected[:2])
    assert float(np.abs(got[2] - expected[2]).max()) > 1e-2


# ---- registry, tables, noise ----------------------------------------------------------------


def test_registered_under_a1111_names_with_a1111_defaults():
    expected = {"dpm2_a": ("DPM2 a", "karras", True), "dpmpp_2s_a": ("DPM++ 2S a", "karras", False),
                "dpmpp_sde": ("DPM++ SDE", "karras", False),
                "dpmpp_2m_sde": ("DPM++ 2M SDE", "exponential", False),
                "dpmpp_3m_sde": ("DPM++ 3M SDE", "exponential", True)}
    for name, (display, automatic, discard) in expected.items():
        spec = SAMPLERS[name]
        assert spec is SDE_SAMPLERS[name]
        assert (spec.display, spec.automatic, spec.discard_penultimate) == (display, automatic,
                                                                              discard)
        assert resolve_pair(display) == (name, "automatic")
        assert resolve_pair(display, "Karras") == (name, "karras")
    assert [num_model_calls(name, 10) for name in expected] == [19, 19, 19, 10, 10]
    assert resolve_pair("DPMSolverMultistepScheduler")[0] == "dpmpp_2m"


def test_two_call_tables_layout():
    config = SchedulerConfig.from_dict(SD15)
    sigmas = np.array([10.0, 4.0, 1.0])
    sched = two_call_tables(config, sigmas)
    assert sched.sigmas == pytest.approx([10, 2 * 10**0.5, 4, 2, 1, 0], rel=1e-6)
    assert sched.noised == pytest.approx([10, 4, 4, 1, 1])
    assert len(sched.timesteps) == 5 and sched.timesteps[0] > sched.timesteps[1] > 0
    assert sched.init_sigma == pytest.approx(10) and not sched.vp_latents
    assert two_call_tables(config, sigmas, 2).sigmas == sched.sigmas[2:]
    with pytest.raises(InputError, match="even model call"):
        two_call_tables(config, sigmas, 1)


@pytest.mark.parametrize("name", list(SDE_SAMPLERS))
def test_needs_step_noise(name):
    with pytest.raises(InputError, match="draws noise"):
        sample(fake_model, _noise(), config=SchedulerConfig.from_dict(SD15), sampler=name,
               steps=2)


# ---- the tiny ONNX model: seeds, model calls, images equal to diffusers' ---------------------


@pytest.fixture(scope="module")
def tiny_pipe(tiny_onnx_dir):
    return Pipeline.load(tiny_onnx_dir)


@pytest.mark.parametrize("name", list(SDE_SAMPLERS))
def test_equal_seeds_give_equal_images(tiny_pipe, name, monkeypatch):
    calls = count_unet_calls(tiny_pipe, monkeypatch)
    options = dict(steps=2, guidance_scale=1.0, sampler=name)  # one UNet batch a call
    pair = as_array(tiny_pipe.generate(PROMPT, seed=5, num_images=2, **options))  # seeds 5, 6
    assert len(calls) == num_model_calls(name, 2)
    np.testing.assert_array_equal(pair[:1], as_array(tiny_pipe.generate(PROMPT, seed=5,
                                                                        **options)))
    assert np.abs(pair[0] - pair[1]).max() > 0


@pytest.fixture(scope="module")
def reference(tiny_sd_dir):
    return load_reference(tiny_sd_dir)


@pytest.mark.parametrize("name", ["dpm2_a", "dpmpp_2m_sde"])
def test_images_equal_diffusers(tiny_pipe, reference, name):
    config = {**reference.folder_scheduler_config, "timestep_spacing": "linspace"}
    reference.scheduler = diffusers_scheduler(name, config)
    generators = [torch.Generator().manual_seed(7 + i) for i in range(2)]
    out = reference(PROMPT, num_inference_steps=3, guidance_scale=1.0, width=64, height=64,
                    generator=generators, num_images_per_prompt=2, output_type="np")
    expected = np.round(out.images * 255).astype(np.int16)
    got = as_array(tiny_pipe.generate(PROMPT, steps=3, guidance_scale=1.0, seed=7, num_images=2,
                                      sampler=name))
    assert np.abs(got - expected).max() <= MAX_PIXEL_DIFF["ort"]
