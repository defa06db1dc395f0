"""Resizing latents as `torch.nn.functional.interpolate(x, size=(h, w), mode=…, antialias=…)`
does (align_corners False, no scale_factor), in NumPy: the hires fix's latent upscalers.

Each axis is resized by an (out, in) weight matrix built from PyTorch's documented sampling:

- nearest: source index floor(dst · in/out); nearest-exact: floor((dst + 0.5) · in/out)
  (Pillow's and scikit-image's nearest), both clamped to the last pixel, the scale a float32.
- bilinear: source coordinate (dst + 0.5) · in/out − 0.5 clamped at 0, two taps.
- bicubic: the same coordinate unclamped, Keys' cubic convolution with a = −0.75 over four taps
  whose indices clamp to the border.
- antialias (bilinear, bicubic only, as in PyTorch): Pillow's resampling, a triangle or a
  cubic with a = −0.5 whose support widens by in/out when shrinking, weights normalised to 1.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from sdrt.runtime.errors import InputError

MODES = ("bilinear", "bicubic", "nearest", "nearest-exact")
ANTIALIASED = ("bilinear", "bicubic")  # torch refuses antialias for the others
BICUBIC_A = -0.75  # PyTorch's (and OpenCV's) cubic convolution coefficient
BICUBIC_AA_A = -0.5  # Pillow's, which antialiased bicubic follows


def upscale(latents: np.ndarray, size: tuple[int, int], mode: str = "bilinear",
            antialias: bool = False) -> np.ndarray:
    """(B, C, h, w) latents resized to `size` (height, width) as torch's interpolate."""
    if mode not in MODES:
        raise InputError(f"unknown latent upscale mode {mode!r}; choose one of: "
                         f"{', '.join(MODES)}")
    if antialias and mode not in ANTIALIASED:
        raise InputError(f"antialias applies to {' and '.join(ANTIALIASED)} only, not {mode}")
    height, width = size
    if min(height, width) < 1 or latents.ndim != 4:
        raise InputError(f"expected (B, C, h, w) latents and a positive size, got "
                         f"{latents.shape} → {size}")
    rows = _weights(latents.shape[2], height, mode, antialias)  # (height, h)
    cols = _weights(latents.shape[3], width, mode, antialias)  # (width, w)
    out = np.einsum("oh,bchw,pw->bcop", rows, latents.astype(np.float64), cols, optimize=True)
    return out.astype(np.float32)  # (B, C, height, width)


def _weights(size_in: int, size_out: int, mode: str, antialias: bool) -> np.ndarray:
    """The (out, in) matrix resizing one axis."""
    scale = size_in / size_out
    if mode.startswith("nearest"):
        return _nearest(size_in, size_out, mode == "nearest-exact")
    if antialias:
        width = 1.0 if mode == "bilinear" else 2.0
        return _antialiased(size_in, size_out, scale, width,
                            _triangle if mode == "bilinear" else _cubic(BICUBIC_AA_A))
    matrix = np.zeros((size_out, size_in))
    dst = np.arange(size_out)
    if mode == "bilinear":
        src = np.maximum((dst + 0.5) * scale - 0.5, 0.0)
        low = np.floor(src).astype(int)
        frac = src - low
        high = np.minimum(low + 1, size_in - 1)
        np.add.at(matrix, (dst, low), 1.0 - frac)
        np.add.at(matrix, (dst, high), frac)
        return matrix
    src = (dst + 0.5) * scale - 0.5  # bicubic: not clamped, the taps are
    low = np.floor(src).astype(int)
    frac = src - low
    kernel = _cubic(BICUBIC_A)
    for tap in range(-1, 3):
        np.add.at(matrix, (dst, np.clip(low + tap, 0, size_in - 1)), kernel(frac - tap))
    return matrix


def _nearest(size_in: int, size_out: int, exact: bool) -> np.ndarray:
    """torch computes the scale and the product in float32: mirrored so indices agree."""
    scale = np.float32(size_in) / np.float32(size_out)
    dst = np.arange(size_out, dtype=np.float32) + np.float32(0.5 if exact else 0.0)
    src = np.minimum(np.floor(dst * scale).astype(int), size_in - 1)
    matrix = np.zeros((size_out, size_in))
    matrix[np.arange(size_out), src] = 1.0
    return matrix


def _antialiased(size_in: int, size_out: int, scale: float, width: float,
                 kernel: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """Pillow's resampling weights: the kernel stretched by the shrink factor, normalised."""
    support = width * max(scale, 1.0)
    inverse = 1.0 / scale if scale >= 1.0 else 1.0
    matrix = np.zeros((size_out, size_in))
    for i in range(size_out):
        center = scale * (i + 0.5)
        first = max(math.trunc(center - support + 0.5), 0)  # C's cast truncates toward 0
        last = min(math.trunc(center + support + 0.5), size_in)
        taps = np.arange(first, last)
        weights = kernel((taps - center + 0.5) * inverse)
        total = weights.sum()
        matrix[i, first:last] = weights / total if total != 0 else weights
    return matrix


def _triangle(x: np.ndarray) -> np.ndarray:
    return np.maximum(1.0 - np.abs(x), 0.0)


def _cubic(a: float) -> Callable[[np.ndarray], np.ndarray]:
    """Keys' cubic convolution kernel with coefficient `a`."""
    def kernel(x: np.ndarray) -> np.ndarray:
        x = np.abs(x)
        near = ((a + 2) * x - (a + 3)) * x * x + 1
        far = ((x - 5) * x + 8) * x * a - 4 * a
        return np.where(x < 1, near, np.where(x < 2, far, 0.0))
    return kernel
