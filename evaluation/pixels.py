"""Pixel tools for reading generated scenes: colour names in CIELAB, and the small image
operations (mean filter, dilation, connected components) done in NumPy alone, without SciPy."""

from __future__ import annotations

import itertools

import numpy as np
from PIL import Image

from sdrt.evaluation.scenes import COLOURS

ImageLike = np.ndarray | Image.Image
COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)


# --- colour -------------------------------------------------------------------------------------


def srgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """CIELAB (D65) of sRGB values in 0..255, any leading shape."""
    c = np.asarray(rgb, dtype=np.float64) / 255.0
    linear = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    to_xyz = np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722],
                       [0.0193, 0.1192, 0.9505]])
    xyz = linear @ to_xyz.T / np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > 216 / 24389, np.cbrt(xyz), (24389 / 27 * xyz + 16) / 116)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]),
                     200 * (f[..., 1] - f[..., 2])], axis=-1)


_PALETTE_LAB = srgb_to_lab(np.array([COLOURS[n] for n in COLOUR_NAMES]))


def nearest_colours(rgb: np.ndarray, exclude: str | None = None) -> np.ndarray:
    """Index into the named colours of the nearest (CIELAB ΔE) name for each RGB value."""
    distances = np.linalg.norm(srgb_to_lab(rgb)[..., None, :] - _PALETTE_LAB, axis=-1)
    if exclude is not None:
        distances[..., COLOUR_NAMES.index(exclude)] = np.inf
    return np.argmin(distances, axis=-1)


def nearest_colour(rgb: np.ndarray, exclude: str | None = None) -> str:
    """The named colour nearest to one RGB value."""
    return COLOUR_NAMES[int(nearest_colours(np.asarray(rgb), exclude))]


# --- image helpers ------------------------------------------------------------------------------


def as_array(image: ImageLike) -> np.ndarray:
    """An (H, W, 3) float64 RGB array from a PIL image or an array (grey or RGBA accepted)."""
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    array = np.asarray(image, dtype=np.float64)
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=-1)
    return array[..., :3]


def _shifts(array: np.ndarray, radius: int, fill: float) -> list[np.ndarray]:
    """All (2r+1)² shifted copies of a 2-D or 3-D array, padded with `fill`."""
    h, w = array.shape[:2]
    pad = [(radius, radius), (radius, radius)] + [(0, 0)] * (array.ndim - 2)
    padded = np.pad(array, pad, constant_values=fill)
    span = range(2 * radius + 1)
    return [padded[dy:dy + h, dx:dx + w] for dy, dx in itertools.product(span, span)]


def box_blur(image: np.ndarray, radius: int = 1) -> np.ndarray:
    """Mean over a (2r+1)² window, edges replicated."""
    pad = [(radius, radius), (radius, radius)] + [(0, 0)] * (image.ndim - 2)
    padded = np.pad(image, pad, mode="edge")
    h, w = image.shape[:2]
    span = range(2 * radius + 1)
    total = sum(padded[dy:dy + h, dx:dx + w] for dy, dx in itertools.product(span, span))
    return total / (2 * radius + 1) ** 2


def dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """Binary dilation by a (2r+1)² square."""
    return np.logical_or.reduce(_shifts(mask, radius, False))


def connected_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """8-connected labels (0 = not in mask, 1..n) and n."""
    h, w = mask.shape
    big = h * w
    labels = np.where(mask, np.arange(big).reshape(h, w), big)
    while True:
        # Each pixel takes the smallest label in its neighbourhood, then follows that label's own
        # label (pointer jumping), so the loop needs ~log(diameter) rounds, not the diameter.
        smallest = np.minimum.reduce(_shifts(labels, 1, big))
        smallest = np.where(mask, smallest, big)
        flat = np.append(smallest.ravel(), big)
        jumped = np.where(mask, np.minimum(smallest, flat[smallest]), big)
        if np.array_equal(jumped, labels):
            break
        labels = jumped
    roots, relabelled = np.unique(labels, return_inverse=True)
    relabelled = relabelled.reshape(h, w) + 1
    count = len(roots) - (1 if roots[-1] == big else 0)
    relabelled[~mask] = 0
    return relabelled, count
