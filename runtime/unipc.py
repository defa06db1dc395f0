"""UniPC (Zhao et al. 2023), A1111's "UniPC": the multistep predictor UniP and corrector UniC,
variant B(h) = h ("bh1"), order 3, lower orders on the last steps, data (x0) prediction.

It equals diffusers' UniPCMultistepScheduler(solver_order=3, solver_type="bh1",
lower_order_final=True, timestep_spacing="linspace", final_sigmas_type="sigma_min"): timesteps
uniform from T − 1 down to above 0 (n + 1 points, the last dropped), and the run ends at
sigma(t = 0), not 0, as A1111's time-uniform UniPC does. Written on x = x0 + sigma * eps, where
log-SNR is lambda = −log sigma and a first-order step is x·sigma_t/sigma_s + (1 − e^−h)·x0.
"""

from __future__ import annotations

import math

import numpy as np

from sdrt.runtime.guidance import Denoiser
from sdrt.runtime.sampler_spec import NoiseFn, StepFn
from sdrt.runtime.schedules import Schedule, SchedulerConfig, sigma_table, sigma_to_t

UNIPC_ORDER = 3  # A1111's uni_pc_order default


def _tables(ts: np.ndarray, sigmas: np.ndarray, final: float, start: int) -> Schedule:
    sigmas = np.append(sigmas, final).astype(np.float32)
    return Schedule(tuple(float(t) for t in ts[start:]), tuple(float(s) for s in sigmas[start:]),
                    tuple(float(s) for s in sigmas[start + 1:]),
                    tuple(float(s) for s in sigmas[start:-1]),
                    math.hypot(1.0, float(sigmas[start])), True)


def unipc_schedule(config: SchedulerConfig, steps: int, start: int = 0) -> Schedule:
    """UniPC's own tables: integer t = round(linspace(0, T − 1, steps + 1)) descending, the
    last (0) dropped; the run lands on sigma(0)."""
    table = sigma_table(config)
    ts = np.linspace(0, config.num_train_timesteps - 1, steps + 1).round()[::-1][:-1]
    return _tables(ts, table[ts.astype(np.int64)], float(table[0]), start)


def unipc_ladder_schedule(config: SchedulerConfig, sigmas: np.ndarray,
                          start: int = 0) -> Schedule:
    """UniPC's tables on a schedule's sigmas, as diffusers' UniPC with use_karras_sigmas: the
    nearest training timestep for each, and the run lands on sigma(0), as its own does. Karras,
    Exponential and Uniform end there already, so their last step has zero length (as
    diffusers' final_sigmas_type="sigma_min" repeats their last sigma); SGM Uniform's does not."""
    table = sigma_table(config)
    return _tables(np.round(sigma_to_t(sigmas, table)), sigmas, float(table[0]), start)


def _coefficients(h: float, order: int) -> tuple[float, np.ndarray]:
    """(h·phi_1 at −h, b): B(h) = −h and b_k = (k−1)!·h·phi_k(−h) / B(h), k = 1..order (Zhao et
    al. 2023, alg. 2's right-hand side)."""
    hh = -h
    h_phi_1 = math.expm1(hh)
    h_phi_k, factorial, b = h_phi_1 / hh - 1, 1, []
    for k in range(1, order + 1):
        b.append(h_phi_k * factorial / hh)
        factorial *= k + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    return h_phi_1, np.asarray(b)


def _step(x: np.ndarray, sigma_s: float, sigma_t: float, outputs: list[np.ndarray],
          lambdas: list[float], order: int, new: np.ndarray | None) -> np.ndarray:
    """UniP (new None) or UniC (new: the model's x0 at sigma_t) from sigma_s to sigma_t with the
    x0 history `outputs` (newest last, at log-SNRs `lambdas`, the newest at sigma_s)."""
    h = math.log(sigma_s / sigma_t)  # lambda_t − lambda_s
    m0 = outputs[-1]
    if h == 0.0:  # a step of zero length (a ladder's final sigma_min, repeated)
        return x
    ratios = [(lambdas[-(k + 1)] - lambdas[-1]) / h for k in range(1, order)]
    for k, ratio in enumerate(ratios):  # repeated sigmas (rounded t at ≥ T/2 steps) carry
        if ratio == 0.0 or ratio in ratios[:k]:  # no slope: lower the order before them
            order, ratios = k + 1, ratios[:k]
            break
    h_phi_1, b = _coefficients(h, order)
    x = x * np.float32(sigma_t / sigma_s) - np.float32(h_phi_1) * m0
    diffs = [(outputs[-(k + 1)] - m0) / np.float32(r) for k, r in enumerate(ratios, start=1)]
    if new is not None:  # UniC: solve the whole system, the newest difference last
        rhos = [0.5] if order == 1 else np.linalg.solve(
            np.vander([*ratios, 1.0], increasing=True).T, b)
        diffs = [*diffs, new - m0]
    elif order == 2:
        rhos = [0.5]
    else:
        rhos = np.linalg.solve(np.vander(ratios, increasing=True).T, b[:-1]) if diffs else []
    if diffs:
        x = x - np.float32(-h) * sum(np.float32(r) * d for r, d in zip(rhos, diffs, strict=True))
    return x


def sample_unipc(denoise: Denoiser, x: np.ndarray, sched: Schedule, *, noise: NoiseFn | None,
                 callback: StepFn) -> np.ndarray:
    """UniPC-bh1 (Zhao et al. 2023, alg. 2–3): after each model call UniC corrects the x just
    reached with the new x0, then UniP predicts the next; the order warms up to 3 and falls
    back to 1 on the last step (lower_order_final)."""
    outputs: list[np.ndarray] = []  # x0 estimates, newest last
    lambdas: list[float] = []  # their log-SNRs, -log sigma
    previous, order = x, 1
    for i in range(len(sched)):
        sigma = sched.sigmas[i]
        denoised, _ = denoise(x, sigma, sched.timesteps[i])
        if outputs:  # UniC with the order of the step that led here
            x = _step(previous, sched.sigmas[i - 1], sigma, outputs, lambdas, order, denoised)
        outputs, lambdas = [*outputs[-(UNIPC_ORDER - 1):], denoised], \
            [*lambdas[-(UNIPC_ORDER - 1):], -math.log(sigma)]
        order = min(UNIPC_ORDER, len(sched) - i, len(outputs))
        previous = x
        x = _step(x, sigma, sched.sigmas[i + 1], outputs, lambdas, order, None)
        x = callback(i, x, denoised)
        if x is None:
            return denoised
    return x
