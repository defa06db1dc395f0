"""Schedules, samplers and guidance in NumPy alone, on problems whose answer is known exactly.

Gaussian data x0 ~ N(MU, S²) has the exact denoiser D(x; sigma) = MU + S²/(S² + sigma²)·(x - MU),
and the probability-flow ODE maps x at sigma_T to MU + (x - MU)·S/sqrt(S² + sigma_T²) at 0.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from sdrt.runtime.errors import InputError, ModelError
from sdrt.runtime.guidance import Denoiser, cfg_combine
from sdrt.runtime.samplers import (
    SAMPLERS,
    default_sampler,
    display_name,
    make_schedule,
    num_model_calls,
    resolve_pair,
    resolve_sampler,
    sample,
    start_step_for_strength,
)
from sdrt.runtime.schedules import (
    AUTOMATIC,
    SchedulerConfig,
    alphas_cumprod,
    betas,
    dpm_schedule,
    karras_sigmas,
    pndm_schedule,
    sigma_table,
    sigma_to_t,
)
from sdrt.runtime.sde_samplers import SDE_SAMPLERS

MU, S = 0.3, 0.5  # the Gaussian data distribution
SD15 = SchedulerConfig(class_name="PNDMScheduler", beta_start=0.00085, beta_end=0.012,
                       beta_schedule="scaled_linear", steps_offset=1, set_alpha_to_one=False)
# SD 1.5 with DDIM/PNDM's last step landing on sigma 0, so every sampler ends at x0.
SD15_TO_ZERO = SchedulerConfig(**{**SD15.__dict__, "set_alpha_to_one": True})
DETERMINISTIC = ["ddim", "pndm", "euler", "dpmpp_2m", "dpmpp_2m_karras"]
# The samplers of diffusion (VE/VP) schedules; flow matching has its own tests (test_sd3.py).
DIFFUSION_SAMPLERS = [name for name, spec in SAMPLERS.items() if not spec.flow]
SHAPE = (1, 1, 64, 64)  # 4096 independent samples
# Sample std vs S: 4096 samples put ~1% noise on the std; first-order samplers (Euler, DDIM)
# add ~1.6% bias at 200 steps, ancestral Euler ~3.7%.
STD_RTOL = 0.05
ODE_ATOL = 0.04  # |x - exact ODE endpoint| at 200 steps: Euler/DDIM 0.03, the rest ≤ 0.02


def gaussian_model(config: SchedulerConfig):
    """Exact eps or v model for N(MU, S²) data; reads sigma from t as the UNet would."""
    table = sigma_table(config).astype(np.float64)

    def model(x_in: np.ndarray, t: float) -> np.ndarray:
        sigma = float(np.interp(t, np.arange(len(table)), table))
        c = 1.0 / math.hypot(1.0, sigma)
        x = x_in.astype(np.float64) / c
        eps = (x - MU - S**2 / (S**2 + sigma**2) * (x - MU)) / sigma
        out = (eps - sigma * c * c * x) / c if config.prediction_type == "v_prediction" else eps
        return out.astype(np.float32)

    return model


def point_mass_model(target: np.ndarray, name: str, steps: int, schedule: str | None = None):
    """Exact eps model for data that is always `target` (so every denoised estimate is target).

    It reads sigma from t like a UNet; for another schedule's sigmas (Karras, …), whose t is
    rounded or interpolated in log sigma, from the schedule.
    """
    table = sigma_table(SD15)
    sched = make_schedule(SD15, name, steps, schedule=schedule)
    laddered = dict(zip(sched.timesteps, sched.sigmas, strict=False))
    own = resolve_pair(name, schedule)[1] == AUTOMATIC and SAMPLERS[name].automatic is None

    def model(x_in: np.ndarray, t: float) -> np.ndarray:
        sigma = float(np.interp(t, np.arange(len(table)), table)) if own else laddered[t]
        return ((x_in * math.hypot(1.0, sigma) - target) / sigma).astype(np.float32)

    return model


def noise(shape=SHAPE, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def rng_noise(seed=1):
    return np.random.default_rng(seed).standard_normal


# ---- samplers on the Gaussian problem --------------------------------------------------------


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("name", DETERMINISTIC)
def test_deterministic_samplers_solve_the_probability_flow_ode(name, prediction):
    config = SchedulerConfig(**{**SD15_TO_ZERO.__dict__, "prediction_type": prediction})
    start = noise()
    out = sample(gaussian_model(config), start, config=config, sampler=name, steps=200)
    sigma_max = make_schedule(config, name, 200).sigmas[0]
    exact = MU + (start * math.hypot(1.0, sigma_max) - MU) * S / math.hypot(S, sigma_max)
    assert np.abs(out - exact).max() < ODE_ATOL
    assert abs(out.std() / S - 1) < STD_RTOL


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_euler_ancestral_samples_the_data_distribution(spacing):
    config = SchedulerConfig(**{**SD15.__dict__, "timestep_spacing": spacing})
    out = sample(gaussian_model(config), noise((1, 1, 128, 128)), config=config,
                 sampler="euler_a", steps=200, step_noise=rng_noise())
    assert abs(out.mean() - MU) < 0.02
    assert abs(out.std() / S - 1) < STD_RTOL


def test_euler_is_first_order():
    config = SchedulerConfig(**{**SD15.__dict__, "timestep_spacing": "trailing"})
    start = noise()
    sigma_max = SAMPLERS["euler"].schedule(config, 20, 0).sigmas[0]
    exact = MU + (start * sigma_max - MU) * S / math.hypot(S, sigma_max)
    errors = [np.abs(sample(gaussian_model(config), start, config=config, sampler="euler",
                            steps=n) - exact).max() for n in (20, 40)]
    assert 1.5 < errors[0] / errors[1] < 2.5


def test_ddim_is_an_euler_step_in_sigma():
    # Same tables when DDIM's t - T//n rule lands on the next listed timestep and on sigma 0.
    config = SchedulerConfig(**{**SD15_TO_ZERO.__dict__, "timestep_spacing": "leading"})
    runs = [sample(gaussian_model(config), noise(), config=config, sampler=name, steps=25)
            for name in ("ddim", "euler")]
    np.testing.assert_allclose(runs[0], runs[1], atol=1e-5)


# ---- the sample() contract -------------------------------------------------------------------


@pytest.mark.parametrize("name", DIFFUSION_SAMPLERS)
def test_callback_sees_every_model_call_and_can_stop_with_the_denoised_estimate(name):
    target = noise(seed=5) * 0.5
    seen = []

    def stop_at_2(i: int, n: int, latents: np.ndarray) -> bool:
        seen.append((i, n, latents.shape, latents.dtype))
        return i == 2

    out = sample(point_mass_model(target, name, 5), noise(), config=SD15, sampler=name, steps=5,
                 step_noise=rng_noise(), callback=stop_at_2)
    calls = num_model_calls(name, 5)
    assert seen == [(i, calls, SHAPE, np.float32) for i in range(3)]
    np.testing.assert_allclose(out, target, atol=1e-4)


@pytest.mark.parametrize("name", DIFFUSION_SAMPLERS)
def test_callback_returning_none_runs_to_the_end(name):
    count = []
    sample(point_mass_model(noise(seed=5), name, 4), noise(), config=SD15, sampler=name, steps=4,
           step_noise=rng_noise(), callback=lambda i, n, x: count.append(i))
    assert count == list(range(num_model_calls(name, 4)))


@pytest.mark.parametrize("name", DIFFUSION_SAMPLERS)
@pytest.mark.parametrize("start_step", [0, 3, 8])
def test_image_to_image_from_a_point_mass_returns_the_init_latents(name, start_step):
    if name == "pndm" and start_step:
        pytest.skip("diffusers' PNDM restarts its warm-up mid-schedule in img2img and reads "
                    "latents at the wrong level; sdrt copies that (see the parity tests)")
    if name == "unipc":
        pytest.skip("UniPC's run ends at sigma(0), not 0, as A1111's and diffusers' "
                    "(test_schedule_types checks where it ends)")
    init = noise(seed=9) * 0.7
    out = sample(point_mass_model(init, name, 10), noise(), config=SD15_TO_ZERO, sampler=name,
                 steps=10,
                 start_step=start_step, init_latents=init, step_noise=rng_noise())
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, init, atol=1e-4)


def test_euler_a_draws_one_latent_shaped_noise_per_step():
    shapes = []

    def draw(shape: tuple[int, ...]) -> np.ndarray:
        shapes.append(shape)
        return np.zeros(shape, dtype=np.float32)

    sample(gaussian_model(SD15), noise((2, 4, 8, 8)), config=SD15, sampler="Euler a", steps=6,
           step_noise=draw)
    assert shapes == [(2, 4, 8, 8)] * 6


def test_euler_a_without_step_noise_is_an_input_error():
    with pytest.raises(InputError, match="step_noise"):
        sample(gaussian_model(SD15), noise(), config=SD15, sampler="euler_a", steps=3)


@pytest.mark.parametrize("kwargs, message", [
    ({"steps": 0}, "steps must be"),
    ({"steps": 1001}, "steps must be"),
    ({"steps": 2.5}, "steps must be"),
    ({"steps": 5, "start_step": 5, "init_latents": np.zeros(SHAPE)}, "start_step"),
    ({"steps": 5, "start_step": 2}, "init_latents"),
    ({"steps": 5, "start_step": 1, "init_latents": np.zeros((1, 1, 8, 8))}, "shape"),
])
def test_sample_rejects_bad_arguments(kwargs, message):
    with pytest.raises(InputError, match=message):
        sample(gaussian_model(SD15), noise(), config=SD15, sampler="euler", **kwargs)


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("name", DIFFUSION_SAMPLERS)
def test_every_step_count_up_to_the_training_steps_runs(name, spacing):
    # With steps_offset, "leading" at T steps asks for t = T (diffusers indexes past its table).
    # LCM's steps are a subset of its original_inference_steps (50) schedule.
    config = SchedulerConfig(**{**SD15.__dict__, "timestep_spacing": spacing})
    for steps in (49, 50) if name == "lcm" else (999, 1000):
        out = sample(gaussian_model(config), noise((1, 1, 2, 2)), config=config, sampler=name,
                     steps=steps, step_noise=rng_noise())
        assert np.isfinite(out).all()


def test_sample_validates_the_config():
    with pytest.raises(ModelError, match="prediction_type"):
        sample(gaussian_model(SD15), noise(), config=SchedulerConfig(prediction_type="sample"),
               sampler="euler", steps=2)


# ---- names -----------------------------------------------------------------------------------


@pytest.mark.parametrize("alias, canonical", [
    ("Euler a", "euler_a"), ("euler A", "euler_a"), ("DDIM", "ddim"), ("PLMS", "pndm"),
    ("pndm", "pndm"), ("Euler", "euler"), ("DPM++ 2M", "dpmpp_2m"),
    ("dpm++ 2m karras", "dpmpp_2m_karras"), (" dpmpp_2m_karras ", "dpmpp_2m_karras"),
    ("EulerAncestralDiscreteScheduler", "euler_a"), ("PNDMScheduler", "pndm"),
    ("DPMSolverMultistepScheduler", "dpmpp_2m"),
])
def test_resolve_sampler_accepts_aliases(alias, canonical):
    assert resolve_sampler(alias) == canonical


def test_unknown_sampler_lists_the_choices():
    with pytest.raises(InputError) as info:
        resolve_sampler("heun++")
    assert str(info.value) == ("unknown sampler 'heun++'; choose one of: DDIM, PLMS, Euler, "
                               "Euler a, DPM++ 2M, LCM, Flow Euler, UniPC, Heun, LMS, DPM2, "
                               + ", ".join(spec.display for spec in SDE_SAMPLERS.values()))


@pytest.mark.parametrize("data, expected", [
    ({"_class_name": "PNDMScheduler"}, "pndm"),
    ({"_class_name": "DDIMScheduler"}, "ddim"),
    ({"_class_name": "EulerDiscreteScheduler", "use_karras_sigmas": True}, "euler"),
    ({"_class_name": "EulerAncestralDiscreteScheduler"}, "euler_a"),
    ({"_class_name": "DPMSolverMultistepScheduler"}, "dpmpp_2m"),
    ({"_class_name": "DPMSolverMultistepScheduler", "use_karras_sigmas": True},
     "dpmpp_2m_karras"),
    ({"_class_name": "LMSDiscreteScheduler"}, "lms"),
    ({"_class_name": "DEISMultistepScheduler"}, "euler"),
    ({}, "euler"),
])
def test_default_sampler_follows_the_scheduler_class(data, expected):
    assert default_sampler(SchedulerConfig.from_dict(data)) == expected


@pytest.mark.parametrize("name, shown", [
    ("pndm", "PLMS"), ("euler_a", "Euler a"), ("dpmpp_2m_karras", "DPM++ 2M Karras"),
    ("DDIM", "DDIM"), ("euler", "Euler"), ("dpmpp_2m", "DPM++ 2M"),
])
def test_display_name_is_a1111s(name, shown):
    assert display_name(name) == shown


def test_model_calls_count_plms_warmup():
    assert [num_model_calls("pndm", n) for n in (1, 2, 20)] == [1, 3, 21]
    assert num_model_calls("euler_a", 20) == 20
    assert num_model_calls("PLMS", 20, start_step=6) == 15


def test_start_step_for_strength():
    assert [start_step_for_strength(20, s) for s in (1.0, 0.75, 0.3, 0.0)] == [0, 5, 14, 20]


# ---- schedules -------------------------------------------------------------------------------


def test_sd15_tables():
    b, a, table = betas(SD15), alphas_cumprod(SD15), sigma_table(SD15)
    assert b.dtype == a.dtype == table.dtype == np.float32
    assert b[0] == pytest.approx(0.00085) and b[-1] == pytest.approx(0.012)
    assert np.all(np.diff(a) < 0)
    # The well-known SD sigma range (k-diffusion reports 0.0292 and 14.6146).
    assert table[0] == pytest.approx(0.0292, abs=1e-4)
    assert table[-1] == pytest.approx(14.6146, abs=1e-4)


def test_squaredcos_and_trained_betas():
    cosine = betas(SchedulerConfig(beta_schedule="squaredcos_cap_v2", num_train_timesteps=10))
    assert cosine.shape == (10,) and cosine[-1] == pytest.approx(0.999)
    trained = SchedulerConfig(num_train_timesteps=3, trained_betas=(0.1, 0.2, 0.3))
    np.testing.assert_allclose(alphas_cumprod(trained), [0.9, 0.72, 0.504], rtol=1e-6)


def test_sd15_leading_timesteps():
    for name in ("ddim", "euler", "euler_a"):
        sched = SAMPLERS[name].schedule(SchedulerConfig(**{**SD15.__dict__,
                                                           "timestep_spacing": "leading"}), 20, 0)
        assert sched.timesteps == tuple(float(t) for t in range(951, 0, -50))
    plms = pndm_schedule(SD15, 20)
    assert plms.timesteps[:4] == (951.0, 901.0, 901.0, 851.0) and len(plms) == 21
    assert dpm_schedule(SchedulerConfig(**{**SD15.__dict__, "timestep_spacing": "leading"}),
                        20).timesteps[:2] == (941.0, 894.0)


def test_euler_init_noise_sigma_depends_on_spacing():
    def init(spacing):
        config = SchedulerConfig(**{**SD15.__dict__, "timestep_spacing": spacing})
        return SAMPLERS["euler"].schedule(config, 20, 0)

    leading, linspace = init("leading"), init("linspace")
    assert leading.init_sigma == pytest.approx(math.hypot(1.0, leading.sigmas[0]))
    assert linspace.init_sigma == linspace.sigmas[0]


def test_karras_sigmas_and_sigma_to_t():
    table = sigma_table(SD15)
    sigmas = karras_sigmas(float(table[0]), float(table[-1]), 10)
    assert sigmas[0] == pytest.approx(table[-1]) and sigmas[-1] == pytest.approx(table[0])
    assert np.all(np.diff(sigmas) < 0)
    np.testing.assert_allclose(sigma_to_t(table[[0, 17, 500, 999]], table), [0, 17, 500, 999],
                               atol=1e-4)


# ---- config ----------------------------------------------------------------------------------


def test_config_from_file_keeps_known_keys(tmp_path):
    path = tmp_path / "scheduler_config.json"
    path.write_text(json.dumps({"_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0",
                                "beta_start": 0.00085, "skip_prk_steps": True,
                                "trained_betas": None, "prediction_type": "v_prediction"}))
    config = SchedulerConfig.from_file(path)
    assert config.class_name == "PNDMScheduler" and config.beta_start == 0.00085
    assert config.prediction_type == "v_prediction" and config.timestep_spacing is None
    config.validate()


@pytest.mark.parametrize("text", ["{not json", "[1, 2]"])
def test_config_from_unreadable_file_is_a_model_error(tmp_path, text):
    path = tmp_path / "scheduler_config.json"
    path.write_text(text)
    with pytest.raises(ModelError, match="scheduler config"):
        SchedulerConfig.from_file(path)
    with pytest.raises(ModelError, match="cannot read"):
        SchedulerConfig.from_file(tmp_path / "missing.json")


@pytest.mark.parametrize("data, message", [
    ({"beta_schedule": "cosine"}, "beta_schedule 'cosine' is not supported"),
    ({"prediction_type": "sample"}, "prediction_type 'sample' is not supported"),
    ({"timestep_spacing": "even"}, "timestep_spacing 'even'"),
    ({"num_train_timesteps": 0}, "num_train_timesteps"),
    ({"steps_offset": -1}, "steps_offset"),
    ({"beta_start": 0.5, "beta_end": 0.1}, "beta_start"),
    ({"beta_start": "0.1"}, "beta_start"),
    ({"clip_sample": True}, "clip_sample=true is not supported"),
    ({"rescale_betas_zero_snr": True}, "rescale_betas_zero_snr"),
    ({"trained_betas": [0.1, 0.2]}, "trained_betas must hold 1000 values"),
    ({"original_inference_steps": 1001}, "original_inference_steps must be an integer in 1..1000"),
    ({"timestep_scaling": 0}, "timestep_scaling must be a positive number"),
])
def test_validate_rejects_nonsense_in_one_line(data, message):
    with pytest.raises(ModelError, match=message) as info:
        SchedulerConfig.from_dict(data).validate()
    assert "\n" not in str(info.value)


# ---- guidance --------------------------------------------------------------------------------


def test_cfg_combine():
    uncond, cond = np.float32([1.0, 2.0]), np.float32([3.0, 1.0])
    np.testing.assert_array_equal(cfg_combine(uncond, cond, 1.0), cond)
    np.testing.assert_array_equal(cfg_combine(uncond, cond, 7.5), [16.0, -5.5])
    assert cfg_combine(uncond, cond, 7.5).dtype == np.float32


@pytest.mark.parametrize("sigma", [0.03, 1.0, 14.6])
def test_denoiser_reads_eps_and_v_consistently(sigma):
    x0, eps = noise(seed=1).astype(np.float64), noise(seed=2).astype(np.float64)
    x = x0 + sigma * eps
    c = 1 / math.hypot(1, sigma)
    v = c * eps - sigma * c * x0  # Salimans & Ho 2022: v = alpha·eps - sigma_vp·x0
    for prediction, out in (("epsilon", eps), ("v_prediction", v)):
        denoised, got_eps = Denoiser(lambda x_in, t: x_in, prediction).split(
            out.astype(np.float32), x.astype(np.float32), sigma)
        np.testing.assert_allclose(denoised, x0, atol=1e-4 * (1 + sigma))
        np.testing.assert_allclose(got_eps, eps, atol=1e-4)


def test_denoiser_feeds_the_model_vp_latents_and_the_timestep():
    calls = []
    Denoiser(lambda x_in, t: calls.append((x_in, t)) or x_in, "epsilon")(
        np.full(SHAPE, 5.0, dtype=np.float32), 2.0, 981)
    x_in, t = calls[0]
    assert t == 981.0 and isinstance(t, float) and x_in.dtype == np.float32
    np.testing.assert_allclose(x_in, 5.0 / math.sqrt(5.0))
