"""Make clean scene renderings look generated (blur, colour cast, noise, JPEG), so the pixel
evaluator can be checked on soft, imperfect images whose true captions are known."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def gaussian_blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of an (H, W) or (H, W, C) array, edges replicated."""
    out = np.asarray(image, dtype=np.float64)
    if sigma <= 0:
        return out.copy()
    radius = max(1, int(np.ceil(3 * sigma)))
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    taps /= taps.sum()
    for axis in (0, 1):
        widths = [(radius, radius) if a == axis else (0, 0) for a in range(out.ndim)]
        windows = np.lib.stride_tricks.sliding_window_view(
            np.pad(out, widths, mode="edge"), len(taps), axis=axis)
        # einsum, not a BLAS product: multithreaded BLAS on small arrays is slower, not faster.
        out = np.einsum("...k,k->...", windows, taps)
    return out


def jpeg(image: np.ndarray, quality: int) -> np.ndarray:
    """Round-trip through JPEG at `quality` (blocking and chroma subsampling)."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
    return np.asarray(Image.open(buffer).convert("RGB"))


def degrade(image: np.ndarray, rng: np.random.Generator, *, max_blur: float = 1.0,
            max_noise: float = 8.0, max_cast: float = 10.0,
            quality: tuple[int, int] = (60, 95)) -> np.ndarray:
    """A randomly blurred, colour-cast, noisy, JPEG-compressed copy of a uint8 RGB image.

    Blur sigma is in pixels of a 64×64 image (scaled with the image), drawn up to `max_blur`;
    noise sigma up to `max_noise` levels; a global cast up to ± `max_cast` levels per channel;
    JPEG quality (4:2:0 chroma) drawn from the `quality` range.
    """
    out = gaussian_blur(image, rng.uniform(0.0, max_blur) * image.shape[0] / 64)
    out = out + rng.uniform(-max_cast, max_cast, size=3)
    out = out + rng.normal(0.0, rng.uniform(0.0, max_noise), size=out.shape)
    out = np.clip(np.rint(out), 0, 255).astype(np.uint8)
    return jpeg(out, int(rng.integers(quality[0], quality[1] + 1)))
