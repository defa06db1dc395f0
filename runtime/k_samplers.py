"""k-diffusion's Heun, LMS and DPM2 samplers (Karras et al. 2022; Crowson's k-diffusion), each
equal to its diffusers scheduler (HeunDiscrete, LMSDiscrete, KDPM2Discrete).

A1111's meaning of these names is the reference: sigmas at training timesteps uniform from
T − 1 to 0 (diffusers' "linspace" spacing, whatever the folder's config says) and a start at
noise · sigma_max. The second-order samplers' tables list every model call: Heun calls at
[s0, s1, s1, s2, s2, …, s(n-1), s(n-1)], DPM2 at [s0, m1, s1, m2, …, m(n-1), s(n-1)] with m the
log-midpoints; even calls start a step, odd ones finish it, and the step to sigma 0 is Euler's.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np

from sdrt.runtime.guidance import Denoiser
from sdrt.runtime.sampler_spec import NoiseFn, StepFn
from sdrt.runtime.schedules import (
    Schedule,
    SchedulerConfig,
    euler_ladder_schedule,
    euler_schedule,
    sigma_table,
    sigma_to_t,
)

LMS_ORDER = 4  # k-diffusion's and diffusers' default order for LMS


def a1111_spacing(config: SchedulerConfig) -> SchedulerConfig:
    """The config with "linspace" spacing: k-diffusion's sigmas at t uniform over [0, T − 1]."""
    return replace(config, timestep_spacing="linspace")


def _calls(timesteps: np.ndarray, sigmas: np.ndarray, init_sigma: float,
           first: int) -> Schedule:
    """Per-call tables from model call `first` on; `sigmas` holds one more entry, the level the
    last call lands on."""
    sigmas = np.asarray(sigmas, dtype=np.float32)
    return Schedule(tuple(float(t) for t in timesteps[first:]),
                    tuple(float(s) for s in sigmas[first:]),
                    tuple(float(s) for s in sigmas[first + 1:]),
                    tuple(float(s) for s in sigmas[first:-1]), init_sigma, False)


def _heun_tables(steps_tables: Schedule, first: int) -> Schedule:
    """Heun's per-call layout of one-call-per-step tables (diffusers' HeunDiscreteScheduler)."""
    ts, sigmas = np.asarray(steps_tables.timesteps), np.asarray(steps_tables.sigmas)
    timesteps = np.concatenate([ts[:1], np.repeat(ts[1:], 2)])
    sigmas = np.concatenate([sigmas[:1], np.repeat(sigmas[1:-1], 2), sigmas[-1:]])
    return _calls(timesteps, sigmas, steps_tables.init_sigma, first)


def heun_schedule(config: SchedulerConfig, steps: int, first: int = 0) -> Schedule:
    """Heun's own tables: Euler's "linspace" sigmas, each but the first called twice."""
    return _heun_tables(euler_schedule(a1111_spacing(config), steps), first)


def heun_ladder_schedule(config: SchedulerConfig, sigmas: np.ndarray,
                         first: int = 0) -> Schedule:
    """Heun's tables on a schedule's sigmas (HeunDiscreteScheduler's use_karras_sigmas)."""
    return _heun_tables(euler_ladder_schedule(a1111_spacing(config), sigmas), first)


def lms_schedule(config: SchedulerConfig, steps: int, start: int = 0) -> Schedule:
    """LMS's own tables: Euler's with "linspace" spacing (LMSDiscreteScheduler's)."""
    return euler_schedule(a1111_spacing(config), steps, start)


def lms_ladder_schedule(config: SchedulerConfig, sigmas: np.ndarray,
                        start: int = 0) -> Schedule:
    """LMS's tables on a schedule's sigmas (LMSDiscreteScheduler's use_karras_sigmas)."""
    return euler_ladder_schedule(a1111_spacing(config), sigmas, start)


def dpm2_ladder_schedule(config: SchedulerConfig, sigmas: np.ndarray,
                         first: int = 0) -> Schedule:
    """DPM2's tables on a schedule's sigmas, as KDPM2DiscreteScheduler lays them out: each step
    called at its sigma (nearest training timestep, as with its Karras sigmas) and at the
    log-midpoint to the next (fractional timestep); the last step, to 0, at its sigma only."""
    table = sigma_table(config)
    ts = np.round(sigma_to_t(sigmas, table))  # (n,) from the ladder before float32, as diffusers
    sigmas = np.asarray(sigmas, dtype=np.float32).astype(np.float64)
    mids = np.sqrt(sigmas[:-1] * sigmas[1:]).astype(np.float32)  # (n - 1,)
    mid_ts = sigma_to_t(mids, table)
    timesteps = np.empty(2 * len(sigmas) - 1)
    timesteps[0::2], timesteps[1::2] = ts, mid_ts
    levels = np.empty(2 * len(sigmas))
    levels[0:-1:2], levels[1:-1:2], levels[-1] = sigmas, mids, 0.0
    return _calls(timesteps, levels, float(np.float32(sigmas[0])), first)


def sample_heun(denoise: Denoiser, x: np.ndarray, sched: Schedule, *, noise: NoiseFn | None,
                callback: StepFn) -> np.ndarray:
    """Heun's method on dx/dsigma = eps (Karras et al. 2022, alg. 1 without churn): an Euler
    step, then the trapezoid of the slopes at both ends; Euler alone for the step to 0."""
    start, slope = x, None
    for i in range(len(sched)):
        sigma = sched.sigmas[i]
        denoised, eps = denoise(x, sigma, sched.timesteps[i])
        if i % 2 == 0:  # Euler's predictor to the next sigma
            start, slope = x, eps
            x = x + (sched.sigmas[i + 1] - sigma) * eps
        else:  # corrector: the mean slope over the whole step, from its start
            x = start + (sigma - sched.sigmas[i - 1]) * ((slope + eps) * 0.5)
        x = callback(i, x, denoised)
        if x is None:
            return denoised
    return x


def sample_dpm2(denoise: Denoiser, x: np.ndarray, sched: Schedule, *, noise: NoiseFn | None,
                callback: StepFn) -> np.ndarray:
    """DPM-Solver-2 in k-diffusion's form (Lu et al. 2022; Karras et al. 2022, alg. 2 with the
    midpoint): Euler to the log-midpoint, then the whole step with the midpoint's slope."""
    start = x
    for i in range(len(sched)):
        sigma = sched.sigmas[i]
        denoised, eps = denoise(x, sigma, sched.timesteps[i])
        if i % 2 == 0:  # to the midpoint (or, on the last step, to 0)
            start = x
            x = x + (sched.sigmas[i + 1] - sigma) * eps
        else:
            x = start + (sched.sigmas[i + 1] - sched.sigmas[i - 1]) * eps
        x = callback(i, x, denoised)
        if x is None:
            return denoised
    return x


def lms_coefficient(sigmas: tuple[float, ...], i: int, order: int, j: int) -> float:
    """∫ over [sigmas[i], sigmas[i+1]] of the Lagrange basis polynomial through
    sigmas[i], …, sigmas[i - order + 1] that is 1 at sigmas[i - j] (exact, where k-diffusion
    and diffusers integrate numerically)."""
    knots = [float(sigmas[i - k]) for k in range(order) if k != j]
    integral = np.polyint(np.atleast_1d(np.poly(knots)))  # ∏ (tau − knot) integrated, high→low
    scale = math.prod(float(sigmas[i - j]) - knot for knot in knots)
    return float(np.polyval(integral, sigmas[i + 1]) - np.polyval(integral, sigmas[i])) / scale


def sample_lms(denoise: Denoiser, x: np.ndarray, sched: Schedule, *, noise: NoiseFn | None,
               callback: StepFn) -> np.ndarray:
    """Linear multistep (k-diffusion's LMS): the slopes of the last ≤ 4 steps, extrapolated by
    their Lagrange polynomial in sigma and integrated over the step."""
    history: list[np.ndarray] = []  # eps, newest last
    for i in range(len(sched)):
        denoised, eps = denoise(x, sched.sigmas[i], sched.timesteps[i])
        history = [*history[-(LMS_ORDER - 1):], eps]
        order = len(history)
        x = x + sum(np.float32(lms_coefficient(sched.sigmas, i, order, j)) * slope
                    for j, slope in enumerate(reversed(history)))
        x = callback(i, x, denoised)
        if x is None:
            return denoised
    return x
