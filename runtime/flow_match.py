"""Rectified-flow sampling for SD 3 (Esser et al., 2024, "Scaling Rectified Flow Transformers").

The forward process is the straight line x_sigma = (1 - sigma) · x0 + sigma · eps with sigma in
[0, 1] (sigma 1 is pure noise, so there is no VE form x0 + sigma · eps to share with the other
samplers); the transformer predicts the velocity v = eps - x0 (§2-3, rectified flow), and sampling
integrates dx/dsigma = v from sigma 1 down to 0. Timesteps are shifted towards noise by
sigma' = shift · sigma / (1 + (shift - 1) · sigma) (§5.3.2, resolution-dependent shifting; SD 3
ships shift 3). The tables repeat diffusers' `FlowMatchEulerDiscreteScheduler` arithmetic,
including its float32 roundings, so trajectories agree to float32 precision.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sdrt.runtime.errors import InputError, ModelError
from sdrt.runtime.schedules import SchedulerConfig

FLOW_MATCH_SCHEDULERS = frozenset({"FlowMatchEulerDiscreteScheduler"})


def is_flow_matching(config: SchedulerConfig) -> bool:
    """Whether a scheduler config is a rectified-flow one (sigma in [0, 1], velocity output)."""
    return config.class_name in FLOW_MATCH_SCHEDULERS


@dataclass(frozen=True)
class FlowSchedule:
    """One run: step i calls the model at `timesteps[i]` (= sigma · T) on x at `sigmas[i]` and
    lands on `sigmas[i + 1]`; the last sigma is 0 (the clean sample)."""

    timesteps: tuple[float, ...]
    sigmas: tuple[float, ...]

    def __len__(self) -> int:
        return len(self.timesteps)

    def initial(self, noise: np.ndarray, init_latents: np.ndarray | None) -> np.ndarray:
        """Starting x: the noise itself (sigma 1 is pure noise, no scaling)."""
        if init_latents is not None:
            raise InputError("flow-matching sampling here runs text-to-image only (no image input)")
        return np.asarray(noise, dtype=np.float32)

    def latents(self, x: np.ndarray, i: int) -> np.ndarray:
        """x as diffusers carries its latents: the same array (no VP rescaling)."""
        return x


def shift_sigmas(sigmas: np.ndarray, shift: float) -> np.ndarray:
    """Esser et al. 2024 §5.3.2's timestep shift, in the input's dtype."""
    sigmas = np.asarray(sigmas)
    shift = sigmas.dtype.type(shift)
    return shift * sigmas / (sigmas.dtype.type(1) + (shift - sigmas.dtype.type(1)) * sigmas)


def flow_match_schedule(config: SchedulerConfig, steps: int, start: int = 0) -> FlowSchedule:
    """FlowMatchEulerDiscreteScheduler.set_timesteps(steps) with a static shift.

    Its end points are the shifted float32 training table's first and last sigma, spaced
    linearly in float64, shifted (again) in float64, then rounded to float32; t = sigma · T in
    float32.
    """
    _check(config)
    if start:
        raise InputError("flow-matching sampling here runs text-to-image only (start_step 0)")
    n_train = config.num_train_timesteps
    train = np.linspace(1, n_train, n_train, dtype=np.float32)[::-1] / np.float32(n_train)
    train = shift_sigmas(train, config.shift)  # float32, as the scheduler's __init__ builds it
    sigma_max, sigma_min = float(train[0]), float(train[-1])
    timesteps = np.linspace(sigma_max * n_train, sigma_min * n_train, steps)  # float64
    sigmas = shift_sigmas(timesteps / n_train, config.shift).astype(np.float32)
    timesteps = sigmas * np.float32(n_train)  # float32
    return FlowSchedule(tuple(float(t) for t in timesteps),
                        (*(float(s) for s in sigmas), 0.0))


def _check(config: SchedulerConfig) -> None:
    if not is_flow_matching(config):
        raise ModelError(f"flow-matching samplers need a {', '.join(FLOW_MATCH_SCHEDULERS)} "
                         f"config, got {config.class_name!r}")
    if config.use_karras_sigmas:
        raise ModelError("scheduler config: use_karras_sigmas=true is not supported for "
                         "flow matching (SD 3 ships linear sigmas)")


class FlowDenoiser:
    """A velocity-predicting model (v = eps - x0) as (denoised x0, v) at noise level sigma."""

    def __init__(self, model) -> None:
        self.model = model

    def __call__(self, x: np.ndarray, sigma: float, t: float) -> tuple[np.ndarray, np.ndarray]:
        """x0 = x - sigma · v, since x = (1 - sigma) · x0 + sigma · eps."""
        velocity = np.asarray(self.model(x, float(t)), dtype=np.float32)  # (B, C, h, w)
        return x - np.float32(sigma) * velocity, velocity


def sample_flow_euler(denoise: FlowDenoiser, x: np.ndarray, sched: FlowSchedule, *,
                      noise=None, callback) -> np.ndarray:
    """Euler's method on dx/dsigma = v (Esser et al. 2024, §2: the flow's ODE), each step
    x + (sigma_next - sigma) · v in float32, as FlowMatchEulerDiscreteScheduler.step does."""
    for i in range(len(sched)):
        denoised, velocity = denoise(x, sched.sigmas[i], sched.timesteps[i])
        step = np.float32(sched.sigmas[i + 1]) - np.float32(sched.sigmas[i])
        x = x + step * velocity
        x = callback(i, x, denoised)
        if x is None:
            return denoised
    return x
