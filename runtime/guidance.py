"""What a raw UNet output means: eps- or v-prediction as a denoiser, and how guidance reaches
the UNet: classifier-free guidance, or the guidance-scale embedding an LCM UNet takes as input.

The only module that knows prediction types; samplers see a `Denoiser` on x = x0 + sigma * eps.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from sdrt.runtime.errors import ModelError

ModelFn = Callable[[np.ndarray, float], np.ndarray]  # (x_in (B, C, h, w) float32, t) -> output


def cfg_combine(uncond: np.ndarray, cond: np.ndarray, scale: float) -> np.ndarray:
    """Classifier-free guidance (Ho & Salimans 2022): uncond + scale · (cond - uncond)."""
    return uncond + float(scale) * (cond - uncond)


def guidance_embedding(scale: float, dim: int) -> np.ndarray:
    """An LCM UNet's `timestep_cond`, the guidance scale as an input (Luo et al. 2023) in VDM's
    sinusoidal embedding (Kingma et al. 2021): 1000 · (scale − 1) on dim/2 log-spaced
    frequencies, sines then cosines, (dim,) float32 (a zero appended for odd dim), computed in
    float32 as diffusers does."""
    half = dim // 2
    step = np.log(np.float32(10000.0)) / np.float32(half - 1)
    angles = np.float32((scale - 1.0) * 1000.0) * np.exp(np.arange(half, dtype=np.float32) * -step)
    return np.concatenate([np.sin(angles), np.cos(angles), np.zeros(dim % 2, np.float32)])


class Denoiser:
    """A raw eps- or v-prediction model as k-diffusion's D(x; sigma) (Karras et al. 2022).

    The model sees x / sqrt(sigma² + 1) (the VP latents) and the training timestep t. v is
    Salimans & Ho 2022's velocity: with c = 1 / sqrt(sigma² + 1), x0 = c²·x - sigma·c·v and
    eps = sigma·c²·x + c·v.
    """

    def __init__(self, model: ModelFn, prediction_type: str) -> None:
        if prediction_type not in ("epsilon", "v_prediction"):
            raise ModelError(f"prediction_type {prediction_type!r} is not supported")
        self.model = model
        self.v_prediction = prediction_type == "v_prediction"

    def output(self, x: np.ndarray, sigma: float, t: float) -> np.ndarray:
        """Raw model output (eps or v) at x, noise level sigma, training timestep t."""
        out = self.model(x * (1.0 / math.hypot(1.0, sigma)), float(t))  # (B, C, h, w)
        return np.asarray(out, dtype=np.float32)

    def split(self, out: np.ndarray, x: np.ndarray, sigma: float) -> tuple[np.ndarray, np.ndarray]:
        """(denoised x0, eps) that a raw output `out` predicts for x at noise level sigma."""
        if not self.v_prediction:
            return x - sigma * out, out
        c = 1.0 / math.hypot(1.0, sigma)
        return x * (c * c) - out * (sigma * c), x * (sigma * c * c) + out * c

    def __call__(self, x: np.ndarray, sigma: float, t: float) -> tuple[np.ndarray, np.ndarray]:
        """(denoised x0, eps) for x at noise level sigma, model called at timestep t."""
        return self.split(self.output(x, sigma, t), x, sigma)
