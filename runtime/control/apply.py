"""A request's ControlNets during one denoising run: the summed residuals the UNet gets at each
model call, as diffusers' StableDiffusion(XL)ControlNet(Img2Img)Pipeline computes them.

For model call i of n (n: the run's calls, after image-to-image's truncation) a unit acts with
scale `scale · keep(i, n, start, end)` and is skipped at 0; several units' residuals are summed.
Modes: "balanced" runs the net on every row of the call (the CFG pair together); "control" is
diffusers' guess_mode: the net sees the prompt's rows only, the negative prompt's rows get zeros,
and residual j is scaled by logspace(-1, 0, n_down + 1)[j]; "prompt" is the A1111 extension's
soft injection: those scales on every row. A ControlNet whose config sets global_pool_conditions
(diffusers: it forces guess mode) runs on the prompt's rows with plain scales and its residuals
averaged over space. The sampler's callback moves `index` on after each model call.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from sdrt.runtime.control.controlnet import ControlNet
from sdrt.runtime.control.image import control_image
from sdrt.runtime.control.residuals import guess_scales, keep
from sdrt.runtime.control.unit import ControlUnit

if TYPE_CHECKING:
    from sdrt.runtime.control.folder import ControlNets


@dataclass(frozen=True)
class PreparedControl:
    """One unit ready to run: its net, control image (1, 3, H, W) in [0, 1] and settings."""

    net: ControlNet
    image: np.ndarray
    scale: float
    start: float
    end: float
    mode: str  # balanced | prompt | control
    pooled: bool  # the ControlNet's global_pool_conditions

    @property
    def prompt_rows_only(self) -> bool:
        """Whether the net sees only the prompt's rows (guess mode)."""
        return self.mode == "control" or self.pooled

    def scales(self) -> np.ndarray | None:
        """Per-residual scales (downs, then mid) before the unit's own; None: all 1."""
        if self.pooled or self.mode == "balanced":
            return None
        return guess_scales(len(self.net.residuals) - 1)


class ControlRun:
    """One denoising run's controls and the model call about to run (one per generation: the
    sampler's callback moves it on, so it is never shared between threads)."""

    def __init__(self, controls: tuple[PreparedControl, ...], calls: int) -> None:
        self.controls = controls
        self.calls = calls
        self.index = 0

    def step_done(self, i: int) -> None:
        """The sampler finished model call i (its callback's index)."""
        self.index = i + 1

    def residuals(self, x: np.ndarray, t: float, context: np.ndarray,
                  added: dict[str, np.ndarray] | None,
                  uncond_rows: int) -> dict[str, np.ndarray] | None:
        """The summed residuals for one UNet call on these rows, the first `uncond_rows` of
        them the negative prompt's; None when no unit acts at this call (the UNet feeds zeros).
        `x` is the UNet's latent input (without an inpainting UNet's extra channels)."""
        total: dict[str, np.ndarray] | None = None
        for control in self.controls:
            scale = control.scale * keep(self.index, self.calls, control.start, control.end)
            if scale == 0:
                continue
            out = _run(control, scale, x, t, context, added or {}, uncond_rows)
            if out is None:
                continue
            if total is None:
                total = out
            else:
                total = {name: total[name] + value for name, value in out.items()}
        return total


def prepare_controls(units: Sequence[ControlUnit], nets: ControlNets, *, width: int,
                     height: int, calls: int) -> ControlRun:
    """Each unit's ControlNet opened (checked against the model) and its control image made at
    width × height (runtime/control/image.py), for a run of `calls` model calls."""
    prepared = []
    for unit in units:
        opened = nets.open(unit.model)
        prepared.append(PreparedControl(
            opened.net, control_image(unit, width, height), float(unit.scale),
            float(unit.start), float(unit.end), unit.mode,
            opened.manifest.global_pool_conditions))
    return ControlRun(tuple(prepared), calls)


def _run(control: PreparedControl, scale: float, x: np.ndarray, t: float, context: np.ndarray,
         added: dict[str, np.ndarray], uncond_rows: int) -> dict[str, np.ndarray] | None:
    """One unit's scaled residuals for all rows of the call (zeros on rows it does not see)."""
    first = uncond_rows if control.prompt_rows_only else 0
    if first == len(x):
        return None  # a call of the negative prompt's rows alone, which guess mode leaves out
    rows = slice(first, len(x))
    image = np.repeat(control.image, len(x) - first, axis=0)  # (rows, 3, H, W)
    out = control.net(x[rows], t, context[rows], image,
                      {name: value[rows] for name, value in added.items()})
    scales = control.scales()
    result = {}
    for j, (name, value) in enumerate(out.items()):  # downs, then mid
        factor = np.float32(scale * (1.0 if scales is None else scales[j]))
        if control.pooled:  # diffusers: the mean over space, broadcast back by the add
            value = np.broadcast_to(value.mean(axis=(2, 3), keepdims=True), value.shape)
        value = value * factor
        if first:
            value = np.concatenate([np.zeros((first, *value.shape[1:]), np.float32), value])
        result[name] = value
    return result


StepCallback = Callable[[int, int, np.ndarray], bool | None]


def counting(control: ControlRun | None, callback: StepCallback | None) -> StepCallback | None:
    """The sampler callback that also moves the ControlNets on to the next model call."""
    if control is None:
        return callback

    def step(i: int, n: int, latents: np.ndarray) -> bool | None:
        control.step_done(i)
        return callback(i, n, latents) if callback is not None else None

    return step
