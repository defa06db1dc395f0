"""Read a "simple scenes" image from its pixels (no learned model): background and shapes.

`analyse` works in four steps:

1. Background: the most common named colour (nearest in CIELAB) of the border ring; its actual
   RGB is the median of those border pixels, so a colour cast does not matter.
2. Shapes: 8-connected regions of pixels (after a 3×3 mean, against noise) at least
   FOREGROUND_DISTANCE from the background RGB; specks under MIN_AREA_FRACTION are dropped.
3. Per shape, a coverage map: each pixel's mix of shape colour into background colour (linear,
   unclipped, luma-weighted). Its sum (mass) and centroid do not change under blur. The kind is
   the one whose template, with that mass and centroid, blurred by the best of a few Gaussian
   widths, fits the map best (analysis by synthesis: blur is explained, not mistaken for a
   rounder shape). The shape colour is then unmixed by least squares against that template, so
   small blurred shapes with no pure pixel still read true.
4. Names: colour = nearest named colour (excluding the background's), position = the region of
   the centroid in a 3×3 grid, size = fitted extent against `scenes.SIZE_THRESHOLD`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from sdrt.evaluation.pixels import (
    COLOUR_NAMES,
    ImageLike,
    as_array,
    box_blur,
    connected_components,
    dilate,
    nearest_colour,
    nearest_colours,
)
from sdrt.evaluation.scenes import GRID_TO_POSITION, SIZE_THRESHOLD, coverage

FOREGROUND_DISTANCE = 40.0  # RGB distance from the background; named colours are ≥ 87 apart
MIN_AREA_FRACTION = 0.004  # smaller blobs are noise: a small shape covers ≥ 0.013 of the image
CORE_FRACTION = 0.85  # interior pixels: at least this share of the shape's typical contrast
# RGB -> (Y, Cb, Cr) rows (BT.601), and how much each counts when measuring shape coverage.
YCBCR = np.array([[0.299, 0.587, 0.114], [-0.1687, -0.3313, 0.5], [0.5, -0.4187, -0.0813]])
CHROMA_WEIGHTS = (1.0, 0.05, 0.05)
# Area of each kind per squared bounding-box side.
KIND_AREA: dict[str, float] = {"square": 1.0, "circle": np.pi / 4, "triangle": 0.5}
# Gaussian blurs (pixels at 64×64, scaled with the image) the kind templates are tried under.
BLUR_GRID: tuple[float, ...] = (0.0, 0.4, 0.7, 1.0, 1.3, 1.6, 2.0, 2.5)


@dataclass(frozen=True)
class DetectedShape:
    """One shape found in an image, with the measurements its attributes come from."""

    kind: str
    colour: str
    position: str
    size: str
    rgb: tuple[int, int, int]
    centroid: tuple[float, float]  # (x, y) as fractions of width and height
    extent: float  # bounding-box side of the fitted shape, as a fraction of the image side
    area: float  # soft pixel count, as a fraction of the image
    blur: float  # Gaussian sigma (pixels) of the best-fitting template
    fit_error: float  # RMS coverage error of that template over the shape's region


@dataclass(frozen=True)
class Analysis:
    """What an image shows: its background colour and its shapes, largest first."""

    background: str
    background_rgb: tuple[int, int, int]
    shapes: tuple[DetectedShape, ...]


def _background(image: np.ndarray) -> tuple[str, np.ndarray]:
    """The dominant named colour of the border ring, and the median RGB of its pixels there."""
    h, w = image.shape[:2]
    ring = max(1, min(h, w) // 32)
    border = np.ones((h, w), dtype=bool)
    border[ring:h - ring, ring:w - ring] = False
    pixels = image[border]
    names = nearest_colours(pixels)
    dominant = int(np.bincount(names, minlength=len(COLOUR_NAMES)).argmax())
    return COLOUR_NAMES[dominant], np.median(pixels[names == dominant], axis=0)


def _coverage(image: np.ndarray, bg_rgb: np.ndarray, fg_rgb: np.ndarray) -> np.ndarray:
    """Per pixel, the mix of shape colour in background colour (least squares, any real value).

    Luma is weighted above chroma: JPEG and many decoders keep chroma at a lower resolution, so
    where the two colours differ in brightness that difference gives the sharper edges.
    """
    weights = YCBCR.T @ np.diag(CHROMA_WEIGHTS) @ YCBCR
    axis = weights @ (fg_rgb - bg_rgb)
    norm = max(float((fg_rgb - bg_rgb) @ axis), 1e-6)
    return np.einsum("...c,c->...", image - bg_rgb, axis) / norm


def _gaussian_taps(sigmas: Sequence[float], radius: int) -> np.ndarray:
    """(len(sigmas), 2·radius+1) normalised Gaussian taps; sigma 0 is the identity."""
    offsets = np.arange(-radius, radius + 1)
    taps = np.array([np.exp(-0.5 * (offsets / s) ** 2) if s > 0 else (offsets == 0) * 1.0
                     for s in sigmas])
    return taps / taps.sum(axis=1, keepdims=True)


def _blurred_templates(kind: str, cx: float, cy: float, extent: float, rows: slice,
                       cols: slice, sigmas: Sequence[float]) -> np.ndarray:
    """(len(sigmas), rows, cols): the shape's pixel coverage on a window under each blur."""
    radius = int(np.ceil(3 * max(sigmas))) + 1
    window = (rows.stop - rows.start + 2 * radius, cols.stop - cols.start + 2 * radius)
    sharp = coverage(kind, cx, cy, extent, window, (rows.start - radius, cols.start - radius))
    taps = _gaussian_taps(sigmas, radius)
    # All blurs at once, as 'valid' separable convolutions of the padded window (no BLAS:
    # multithreaded BLAS on arrays this small is slower, and erratic on a busy machine).
    down = np.lib.stride_tricks.sliding_window_view(sharp, taps.shape[1], axis=0)
    blurred = np.einsum("imk,sk->sim", down, taps)
    across = np.lib.stride_tricks.sliding_window_view(blurred, taps.shape[1], axis=2)
    return np.einsum("sijk,sk->sij", across, taps)


@dataclass(frozen=True)
class _Fit:
    """The best-fitting blurred template of one shape."""

    kind: str
    extent: float  # pixels
    blur: float  # pixels
    error: float  # RMS coverage error over the region
    template: np.ndarray  # coverage over the whole image (zero outside the region's box)


def _fit_kind(alpha: np.ndarray, region: np.ndarray, cx: float, cy: float, mass: float) -> _Fit:
    """The kind, extent and blur whose template best explains the coverage `alpha`.

    Each kind's template has the measured area centroid and mass, both unchanged by blur, so
    only the blur is searched; the kind that explains the pixels best wins.
    """
    ys, xs = np.nonzero(region)
    rows, cols = slice(int(ys.min()), int(ys.max()) + 1), slice(int(xs.min()), int(xs.max()) + 1)
    target, inside = alpha[rows, cols], region[rows, cols]
    sigmas = [min(alpha.shape) / 64 * s for s in BLUR_GRID]
    best: tuple[float, str, float, float, np.ndarray] | None = None
    for kind, area_per_extent2 in KIND_AREA.items():
        extent = float(np.sqrt(max(mass, 1.0) / area_per_extent2))
        templates = _blurred_templates(kind, cx, cy, extent, rows, cols, sigmas)
        errors = np.sqrt(np.mean((templates - target)[:, inside] ** 2, axis=1))
        i = int(np.argmin(errors))
        if best is None or errors[i] < best[0]:
            best = (float(errors[i]), kind, extent, sigmas[i], templates[i])
    assert best is not None
    error, kind, extent, sigma, window = best
    template = np.zeros_like(alpha)
    template[rows, cols] = np.where(inside, window, 0.0)
    return _Fit(kind, extent, sigma, error, template)


def _unmixed_colour(image: np.ndarray, bg_rgb: np.ndarray, template: np.ndarray) -> np.ndarray:
    """The shape colour that, mixed into the background by `template`, best explains the pixels.

    Unlike the median of the interior, this holds for small blurred shapes with no pure pixel.
    """
    weights = template[..., None]
    offset = (weights * (image - bg_rgb)).sum(axis=(0, 1)) / max(float((template**2).sum()), 1e-6)
    return np.clip(bg_rgb + offset, 0, 255)


def _measure(image: np.ndarray, smooth: np.ndarray, region: np.ndarray, component: np.ndarray,
             distance: np.ndarray, bg_name: str, bg_rgb: np.ndarray) -> DetectedShape | None:
    """Measure one shape: `component` is its thresholded pixels, `region` a margin around it."""
    h, w = image.shape[:2]
    core = component & (distance >= CORE_FRACTION * np.percentile(distance[component], 90))
    rgb = np.median(image[core], axis=0)
    ys, xs = np.mgrid[0:h, 0:w] + 0.5
    fit = None
    # Fit with the interior's colour, then again with the colour the fit unmixes: blur dilutes a
    # small shape's interior, and a diluted colour makes coverage (hence mass) too large.
    for _ in range(2):
        # Coverage is not clipped: noise averages out of sums only while it stays zero-mean.
        alpha = np.where(region, _coverage(image, bg_rgb, rgb), 0.0)
        mass = float(alpha.sum())
        if mass <= 0:
            return None
        # From the 3×3 mean, which moves no centroid and quiets the noise.
        smooth_alpha = np.where(region, _coverage(smooth, bg_rgb, rgb), 0.0)
        cx = float((smooth_alpha * xs).sum() / mass)
        cy = float((smooth_alpha * ys).sum() / mass)
        fit = _fit_kind(alpha, region, cx, cy, mass)
        rgb = _unmixed_colour(np.where(region[..., None], image, bg_rgb), bg_rgb, fit.template)
    assert fit is not None
    column = min(max(int(3 * cx / w), 0), 2)
    row = min(max(int(3 * cy / h), 0), 2)
    extent = fit.extent / min(h, w)
    return DetectedShape(
        kind=fit.kind, colour=nearest_colour(rgb, exclude=bg_name),
        position=GRID_TO_POSITION[(column, row)],
        size="large" if extent >= SIZE_THRESHOLD else "small",
        rgb=tuple(int(round(v)) for v in rgb), centroid=(cx / w, cy / h),
        extent=extent, area=mass / (h * w), blur=fit.blur, fit_error=fit.error)


def analyse(image: ImageLike) -> Analysis:
    """Detect the background colour and every shape in `image`, largest shape first."""
    array = as_array(image)
    h, w = array.shape[:2]
    smooth = box_blur(array)  # 3×3 mean: noise would otherwise speckle the foreground mask
    bg_name, bg_rgb = _background(smooth)
    distance = np.linalg.norm(smooth - bg_rgb, axis=-1)
    labels, count = connected_components(distance > FOREGROUND_DISTANCE)
    areas = np.bincount(labels.ravel(), minlength=count + 1)
    kept = [i for i in range(1, count + 1) if areas[i] >= MIN_AREA_FRACTION * h * w]
    margin = max(3, min(h, w) // 16)  # room for a blurred edge's tail
    margins = {i: dilate(labels == i, margin) for i in kept}
    shapes = []
    for i in kept:
        # A pixel in two shapes' margins belongs to neither (by design, shapes are far apart).
        others = np.zeros((h, w), dtype=bool)
        for j in kept:
            if j != i:
                others |= margins[j]
        region = (margins[i] & ~others) | (labels == i)
        shape = _measure(array, smooth, region, labels == i, distance, bg_name, bg_rgb)
        if shape is not None:
            shapes.append(shape)
    shapes.sort(key=lambda s: -s.area)
    return Analysis(bg_name, tuple(int(round(v)) for v in bg_rgb), tuple(shapes))

