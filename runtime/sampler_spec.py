"""What a sampler is to the registry (`samplers.SAMPLERS`): its loop, its tables and its names.

A sampler's loop has one signature, `run(denoise, x, schedule, *, noise, callback) -> x`, works
on x = x0 + sigma * eps and calls `x = callback(i, x, denoised)` after each model call i (the
schedule's tables are laid out per model call), going on from the x it gets back and returning
`denoised` at once when it gets None. Kept apart from samplers.py so that the modules holding
loops (k_samplers, unipc, sde_samplers) and the registry import it without a cycle.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from sdrt.runtime.schedules import Schedule, SchedulerConfig

NoiseFn = Callable[[tuple[int, ...]], np.ndarray]  # shape -> standard normal draw
StepFn = Callable[[int, np.ndarray, np.ndarray], np.ndarray | None]  # (i, x, denoised) -> x
SamplerFn = Callable[..., np.ndarray]  # run(denoise, x, schedule, *, noise, callback) -> x


@dataclass(frozen=True)
class SamplerSpec:
    """A sampler: its loop, the diffusers-compatible tables it runs on, and its names."""

    run: SamplerFn
    # Its own tables ("automatic"), (config, steps, first model call); None where `automatic`
    # names the ladder A1111 runs it on.
    schedule: Callable[[SchedulerConfig, int, int], Schedule] | None
    display: str  # A1111's name, written into the PNG metadata
    diffusers_class: str | None  # None where diffusers has no such scheduler
    # Its tables on another schedule's sigma ladder, (config, sigmas, start); None where the
    # sampler keeps its own timesteps (diffusers' DDIM, PNDM and LCM offer no other sigmas,
    # A1111 runs DDIM and PLMS on their own; SD 3's flow sigmas are not a VE ladder).
    ladder: Callable[[SchedulerConfig, np.ndarray, int], Schedule] | None = None
    flow: bool = False  # rectified flow (SD 3): velocity output, sigma in [0, 1]
    # Two model calls per step but the last (the step to sigma 0 is Euler's): 2·steps − 1 in
    # all, as k-diffusion's Heun / DPM2 / DPM++ 2S a / DPM++ SDE make them.
    second_order: bool = False
    # The `SCHEDULES` key A1111's "Automatic" stands for with this sampler (its sampler table's
    # `scheduler` option, e.g. "karras" for DPM2); None: the sampler's own `schedule`.
    automatic: str | None = None
    # A1111's discard_next_to_last_sigma: the ladder is made for steps + 1 sigmas and its last
    # non-zero one dropped, on whichever schedule.
    discard_penultimate: bool = False
