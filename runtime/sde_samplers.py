"""Stochastic samplers under A1111's names: DPM2 a, DPM++ 2S a, DPM++ SDE, DPM++ 2M SDE and
DPM++ 3M SDE, as k-diffusion defines them (eta = 1, s_noise = 1), in `SDE_SAMPLERS`.

Each has the shared signature `run(denoise, x, schedule, *, noise, callback) -> x` on
x = x0 + sigma * eps and calls the callback after every model call. `noise(shape)` draws a
standard normal from the request's generators; where diffusers has the sampler, the draws come
at the same points of the run as diffusers makes them, so equal generators give diffusers'
images. DPM++ SDE draws k-diffusion's two increments per step as ordinary per-step normals:
k-diffusion and diffusers' DPMSolverSDEScheduler take them from a torchsde Brownian tree, which
cannot be drawn without torch, so there equal seeds give equal images, not diffusers' images.
A1111 draws the SDE samplers' noise from such a tree too; its images are not reproduced.

The three two-call samplers run on `two_call_tables`, laid out per model call as diffusers'
KDPM2AncestralDiscreteScheduler and DPMSolverSDEScheduler lay theirs out.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from functools import partial
from types import MappingProxyType

import numpy as np

from sdrt.runtime.errors import InputError
from sdrt.runtime.guidance import Denoiser
from sdrt.runtime.sampler_spec import NoiseFn, SamplerFn, SamplerSpec, StepFn
from sdrt.runtime.schedules import (
    Schedule,
    SchedulerConfig,
    dpm_ladder_schedule,
    sigma_table,
    sigma_to_t,
)

# (x, denoised, eps, sigma, midpoint sigma, sigma_next) -> x: one half of a two-call step
Update = Callable[[np.ndarray, np.ndarray, np.ndarray, float, float, float], np.ndarray]
Ladder = Callable[[SchedulerConfig, np.ndarray, int], Schedule]  # (config, sigmas, start)


def _ancestral(sigma: float, sigma_next: float) -> tuple[float, float]:
    """(sigma_down, sigma_up) of an ancestral step from sigma to sigma_next (Ho et al. 2020, as
    k-diffusion's get_ancestral_step with eta 1): x lands at sigma_down, then noise of std
    sigma_up brings it to sigma_next."""
    sigma_up = sigma_next * math.sqrt(max(sigma**2 - sigma_next**2, 0.0)) / sigma
    return sigma_next**2 / sigma, sigma_up  # sigma_down = sqrt(sigma_next² - sigma_up²)


def _toward(x: np.ndarray, denoised: np.ndarray, ratio: float) -> np.ndarray:
    """DPM-Solver++'s first-order step (Lu et al. 2022) from sigma to ratio·sigma, written on
    x = x0 + sigma·eps: x·ratio + denoised·(1 − ratio)."""
    return x * ratio + denoised * (1.0 - ratio)


def _draw(noise: NoiseFn, x: np.ndarray) -> np.ndarray:
    return np.asarray(noise(x.shape), dtype=np.float32)  # (B, C, h, w)


def _need_noise(noise: NoiseFn | None, name: str) -> NoiseFn:
    if noise is None:
        raise InputError(f"sampler '{name}' draws noise every step; pass step_noise")
    return noise


def _two_calls(denoise: Denoiser, x: np.ndarray, sched: Schedule, callback: StepFn,
               first: Update, second: Update) -> np.ndarray:
    """Drive a two-call step over `two_call_tables`: call 2k at the step's sigma, `first` to its
    midpoint, call 2k + 1 there and `second` from the step's start to the next sigma (with
    denoised, eps of call 2k + 1); the last step, to sigma 0, is one Euler call."""
    for j in range(0, len(sched), 2):
        sigma = sched.sigmas[j]
        denoised, eps = denoise(x, sigma, sched.timesteps[j])
        if j + 1 == len(sched):
            landed = callback(j, x + (sched.sigmas[j + 1] - sigma) * eps, denoised)
            return denoised if landed is None else landed
        mid, sigma_next = sched.sigmas[j + 1], sched.sigmas[j + 2]
        x_mid = callback(j, first(x, denoised, eps, sigma, mid, sigma_next), denoised)
        if x_mid is None:
            return denoised
        denoised_mid, eps_mid = denoise(x_mid, mid, sched.timesteps[j + 1])
        x = callback(j + 1, second(x, denoised_mid, eps_mid, sigma, mid, sigma_next),
                     denoised_mid)
        if x is None:
            return denoised_mid
    return x


def sample_dpm2_ancestral(denoise: Denoiser, x: np.ndarray, sched: Schedule, *,
                          noise: NoiseFn | None, callback: StepFn) -> np.ndarray:
    """DPM2 a (k-diffusion's sample_dpm_2_ancestral): DPM-Solver-2's midpoint step (Lu et al.
    2022) to sigma_down, Euler-style on dx/dsigma, then noise of std sigma_up, drawn after the
    second call of every step but the last, as diffusers' KDPM2AncestralDiscreteScheduler."""
    draw = partial(_draw, _need_noise(noise, "dpm2_a"))

    def first(x, denoised, eps, sigma, mid, sigma_next):
        return x + (mid - sigma) * eps

    def second(x, denoised_mid, eps_mid, sigma, mid, sigma_next):
        sigma_down, sigma_up = _ancestral(sigma, sigma_next)
        x = x + (sigma_down - sigma) * eps_mid
        return x + draw(x) * sigma_up

    return _two_calls(denoise, x, sched, callback, first, second)


def sample_dpmpp_2s_ancestral(denoise: Denoiser, x: np.ndarray, sched: Schedule, *,
                              noise: NoiseFn | None, callback: StepFn) -> np.ndarray:
    """DPM++ 2S a (k-diffusion's sample_dpmpp_2s_ancestral): DPM-Solver++(2S) (Lu et al. 2022,
    alg. 1, r = 1/2) to sigma_down, then noise of std sigma_up, one draw after each step's
    second call (none on the last step, to sigma 0). diffusers has no such scheduler."""
    draw = partial(_draw, _need_noise(noise, "dpmpp_2s_a"))

    def first(x, denoised, eps, sigma, mid, sigma_next):
        return _toward(x, denoised, mid / sigma)

    def second(x, denoised_mid, eps_mid, sigma, mid, sigma_next):
        sigma_down, sigma_up = _ancestral(sigma, sigma_next)
        x = _toward(x, denoised_mid, sigma_down / sigma)
        return x + draw(x) * sigma_up

    return _two_calls(denoise, x, sched, callback, first, second)


def sample_dpmpp_sde(denoise: Denoiser, x: np.ndarray, sched: Schedule, *,
                     noise: NoiseFn | None, callback: StepFn) -> np.ndarray:
    """DPM++ SDE (k-diffusion's sample_dpmpp_sde, r = 1/2): an ancestral DPM-Solver++ step to
    the log-midpoint, the model there, then an ancestral step over the whole interval with the
    midpoint's estimate. Its two noise increments per step are ordinary normal draws here, not
    a Brownian tree's (see the module docstring): reproducible per seed, not diffusers' image."""
    draw = partial(_draw, _need_noise(noise, "dpmpp_sde"))

    def ancestral(x, denoised, sigma, sigma_to):
        sigma_down, sigma_up = _ancestral(sigma, sigma_to)
        x = _toward(x, denoised, sigma_down / sigma)
        return x + draw(x) * sigma_up

    def first(x, denoised, eps, sigma, mid, sigma_next):
        return ancestral(x, denoised, sigma, mid)

    def second(x, denoised_mid, eps_mid, sigma, mid, sigma_next):
        return ancestral(x, denoised_mid, sigma, sigma_next)

    return _two_calls(denoise, x, sched, callback, first, second)


def sample_dpmpp_2m_sde(denoise: Denoiser, x: np.ndarray, sched: Schedule, *,
                        noise: NoiseFn | None, callback: StepFn) -> np.ndarray:
    """DPM-Solver++(2M) SDE (the SDE form of Lu et al. 2022's multistep solver; k-diffusion's
    sample_dpmpp_2m_sde, midpoint form): the data-prediction SDE solved exactly in its linear
    part, second order from the second step; noise drawn every step, the last too, as
    diffusers' DPMSolverMultistepScheduler with algorithm_type="sde-dpmsolver++" draws it.
    The step to sigma 0 returns the estimate."""
    noise = _need_noise(noise, "dpmpp_2m_sde")
    previous, h_last = None, None
    for i in range(len(sched)):
        sigma, sigma_next = sched.sigmas[i], sched.sigmas[i + 1]
        denoised, _ = denoise(x, sigma, sched.timesteps[i])
        fresh, h = _draw(noise, x), None
        if sigma_next == 0:
            x = denoised
        else:
            h = math.log(sigma / sigma_next)  # step in log-SNR / 2
            gain = -math.expm1(-2 * h)  # 1 − (sigma_next / sigma)²
            x = _toward(x, denoised, 1.0 - gain)
            if previous is not None and h_last:  # h_last / h = r; 0: a repeated sigma
                x = x + (denoised - previous) * (0.5 * gain * h / h_last)
            x = x + fresh * (sigma_next * math.sqrt(gain))
        previous, h_last = denoised, h
        x = callback(i, x, denoised)
        if x is None:
            return denoised
    return x


def sample_dpmpp_3m_sde(denoise: Denoiser, x: np.ndarray, sched: Schedule, *,
                        noise: NoiseFn | None, callback: StepFn) -> np.ndarray:
    """DPM-Solver++(3M) SDE as k-diffusion's sample_dpmpp_3m_sde: third order from the third
    step (the second is second order in phi_2 form), noise drawn every step as DPM++ 2M SDE.
    diffusers' third-order "sde-dpmsolver++" update weights the second difference with the
    opposite sign of its 1/2 term, so only its first two steps agree; k-diffusion is followed."""
    noise = _need_noise(noise, "dpmpp_3m_sde")
    history: list[tuple[np.ndarray, float]] = []  # (denoised, h) of earlier steps, newest first
    for i in range(len(sched)):
        sigma, sigma_next = sched.sigmas[i], sched.sigmas[i + 1]
        denoised, _ = denoise(x, sigma, sched.timesteps[i])
        fresh = _draw(noise, x)
        if sigma_next == 0:
            x = denoised
        elif sigma_next < sigma:  # a repeated sigma (a degenerate ladder) leaves x as it is
            h = math.log(sigma / sigma_next)
            gain = -math.expm1(-2 * h)
            phi_2 = 1.0 - gain / (2 * h)  # k-diffusion's phi_2 at h_eta = 2h
            x = _toward(x, denoised, 1.0 - gain)
            if len(history) == 2:
                (d1, h1), (d2, h2) = history
                r0, r1 = h1 / h, h2 / h
                d1_0, d1_1 = (denoised - d1) / r0, (d1 - d2) / r1
                d2_term = (d1_0 - d1_1) / (r0 + r1)
                x = x + (d1_0 + d2_term * r0) * phi_2 - d2_term * (phi_2 / (2 * h) - 0.5)
            elif history:
                (d1, h1), = history
                x = x + (denoised - d1) * (phi_2 * h / h1)
            x = x + fresh * (sigma_next * math.sqrt(gain))
            history = [(denoised, h), *history][:2]
        x = callback(i, x, denoised)
        if x is None:
            return denoised
    return x


# ---- tables -----------------------------------------------------------------------------------


def _ancestral_midpoint(sigma: float, sigma_next: float) -> float:
    """DPM2 a's and DPM++ 2S a's second call: the log-midpoint of sigma and sigma_down."""
    return math.sqrt(sigma * _ancestral(sigma, sigma_next)[0])


def _log_midpoint(sigma: float, sigma_next: float) -> float:
    """DPM++ SDE's second call: the log-midpoint of sigma and sigma_next."""
    return math.sqrt(sigma * sigma_next)


def two_call_tables(config: SchedulerConfig, sigmas: np.ndarray, start: int = 0, *,
                    midpoint: Callable[[float, float], float] = _log_midpoint,
                    round_steps: bool = False) -> Schedule:
    """Per-model-call tables of a sampler that calls the model twice a step, on a descending
    sigma ladder (n,) then 0: call 2k at sigmas[k], call 2k + 1 at midpoint(sigmas[k],
    sigmas[k + 1]), one call on the last step; 2n − 1 calls. Each call's training timestep is
    interpolated in log sigma (rounded for the steps' own with `round_steps`, as diffusers'
    KDPM2 schedulers do on Karras sigmas); `noised[j]` is the sigma diffusers' add_noise reads
    at call j. `start` is the first model call (diffusers' t_start · order), even. x starts at
    noise · sigmas[0], as k-diffusion starts."""
    if start % 2:
        raise InputError(f"a two-call sampler starts at an even model call, got {start}")
    ladder = np.asarray(sigmas, dtype=np.float64)  # (n,)
    main = ladder.astype(np.float32)
    mids = np.array([midpoint(float(a), float(b)) for a, b in zip(main[:-1], main[1:],
                                                                 strict=True)], np.float32)
    table = sigma_table(config)
    main_ts = sigma_to_t(ladder, table)
    levels = np.zeros(2 * len(main), dtype=np.float32)  # (2n,) x's sigma at each call, then 0
    levels[0::2], levels[1:-1:2] = main, mids
    timesteps = np.zeros(2 * len(main) - 1)  # (2n - 1,)
    timesteps[0::2] = np.round(main_ts) if round_steps else main_ts
    timesteps[1::2] = sigma_to_t(mids, table)
    noised = main[(np.arange(len(timesteps)) + 1) // 2]  # diffusers' sigmas[step index]
    return Schedule(tuple(float(t) for t in timesteps[start:]),
                    tuple(float(s) for s in levels[start:]),
                    tuple(float(s) for s in levels[start + 1:]),
                    tuple(float(s) for s in noised[start:]), float(main[0]), False)


def _spec(run: SamplerFn, display: str, diffusers_class: str | None, ladder: Ladder,
          automatic: str, *, second_order: bool, discard: bool = False) -> SamplerSpec:
    # no tables of its own: `make_schedule` puts it on the `automatic` ladder A1111 gives it
    return SamplerSpec(run, None, display, diffusers_class, ladder, second_order=second_order,
                       automatic=automatic, discard_penultimate=discard)


_ANCESTRAL_TABLES = partial(two_call_tables, midpoint=_ancestral_midpoint)
# A1111 1.10's sampler table: each name's "Automatic" schedule and discard_next_to_last_sigma.
SDE_SAMPLERS: Mapping[str, SamplerSpec] = MappingProxyType({
    "dpm2_a": _spec(sample_dpm2_ancestral, "DPM2 a", "KDPM2AncestralDiscreteScheduler",
                    partial(_ANCESTRAL_TABLES, round_steps=True), "karras", second_order=True,
                    discard=True),
    "dpmpp_2s_a": _spec(sample_dpmpp_2s_ancestral, "DPM++ 2S a", None, _ANCESTRAL_TABLES,
                        "karras", second_order=True),
    "dpmpp_sde": _spec(sample_dpmpp_sde, "DPM++ SDE", "DPMSolverSDEScheduler", two_call_tables,
                       "karras", second_order=True),
    "dpmpp_2m_sde": _spec(sample_dpmpp_2m_sde, "DPM++ 2M SDE", "DPMSolverMultistepScheduler",
                          dpm_ladder_schedule, "exponential", second_order=False),
    "dpmpp_3m_sde": _spec(sample_dpmpp_3m_sde, "DPM++ 3M SDE", "DPMSolverMultistepScheduler",
                          dpm_ladder_schedule, "exponential", second_order=False, discard=True),
})
