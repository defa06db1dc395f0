"""Prompt adherence of generated "simple scenes" images, read from their pixels (no learned model).

`analyse` reads an image in four steps:

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
   the centroid in a 3×3 grid, size = fitted extent against `shapes.SIZE_THRESHOLD`.

`score` compares that with the attributes `shapes.parse_caption` reads from the caption (two
shapes: the better of both assignments); `evaluate` averages over many images.

Usage:
    python -m sdrt.evaluation.adherence [--model DIR] [--n 200] [--seed 0] [--steps N]
        [--guidance G] [--split held-out|seen] [--out results.json] [--save-images DIR]
(no --model: sdrt's embedded model; no --steps/--guidance: the model family's defaults)
    python -m sdrt.evaluation.adherence --ground-truth [--degrade] [--n 2000]
(--ground-truth renders the captions' true images instead of generating, to check the
evaluator; --degrade blurs, casts, adds noise and JPEG-compresses them first.)
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from sdrt.evaluation.scenes import (
    COLOURS,
    GRID_TO_POSITION,
    SIZE_THRESHOLD,
    Scene,
    coverage,
    held_out_captions,
    parse_caption,
    render,
    seen_captions,
)

ATTRIBUTES: tuple[str, ...] = ("background", "colour", "kind", "position", "size", "count")

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

ImageLike = np.ndarray | Image.Image


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


_NAMES = tuple(COLOURS)
_PALETTE_LAB = srgb_to_lab(np.array([COLOURS[n] for n in _NAMES]))


def nearest_colours(rgb: np.ndarray, exclude: str | None = None) -> np.ndarray:
    """Index into the named colours of the nearest (CIELAB ΔE) name for each RGB value."""
    distances = np.linalg.norm(srgb_to_lab(rgb)[..., None, :] - _PALETTE_LAB, axis=-1)
    if exclude is not None:
        distances[..., _NAMES.index(exclude)] = np.inf
    return np.argmin(distances, axis=-1)


def nearest_colour(rgb: np.ndarray, exclude: str | None = None) -> str:
    """The named colour nearest to one RGB value."""
    return _NAMES[int(nearest_colours(np.asarray(rgb), exclude))]


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


# --- analysis -----------------------------------------------------------------------------------


def _background(image: np.ndarray) -> tuple[str, np.ndarray]:
    """The dominant named colour of the border ring, and the median RGB of its pixels there."""
    h, w = image.shape[:2]
    ring = max(1, min(h, w) // 32)
    border = np.ones((h, w), dtype=bool)
    border[ring:h - ring, ring:w - ring] = False
    pixels = image[border]
    names = nearest_colours(pixels)
    dominant = int(np.bincount(names, minlength=len(_NAMES)).argmax())
    return _NAMES[dominant], np.median(pixels[names == dominant], axis=0)


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


# --- scoring ------------------------------------------------------------------------------------

_SHAPE_ATTRIBUTES = ("colour", "kind", "position", "size")


def _match(expected: Scene, found: Sequence[DetectedShape]) -> dict[str, bool]:
    """Per-attribute agreement of the caption's shapes with the largest found shapes, paired
    in whichever order agrees on more attributes; all False if too few shapes were found."""
    wanted = expected.shapes
    if len(found) < len(wanted):
        return dict.fromkeys(_SHAPE_ATTRIBUTES, False)
    best: dict[str, bool] = {}
    best_hits = -1
    for order in itertools.permutations(found[:len(wanted)]):
        pairs = list(zip(wanted, order, strict=True))
        agree = {a: [getattr(s, a) in (None, getattr(d, a)) for s, d in pairs]
                 for a in _SHAPE_ATTRIBUTES}
        hits = sum(sum(v) for v in agree.values())
        if hits > best_hits:
            best, best_hits = {a: all(v) for a, v in agree.items()}, hits
    return best


def score_analysis(analysis: Analysis, expected: Scene) -> dict[str, bool]:
    """Per-attribute correctness of an analysis against the scene a caption names (attributes
    the caption leaves unsaid count as correct)."""
    result = {"background": expected.background in (None, analysis.background)}
    result.update(_match(expected, analysis.shapes))
    result["count"] = len(analysis.shapes) == len(expected.shapes)
    result["all"] = all(result[a] for a in ATTRIBUTES)
    return result


def score(image: ImageLike, caption: str) -> dict[str, bool]:
    """Which of the caption's attributes the image shows: background, colour, kind, position,
    size, count (of shapes), and all of them."""
    return score_analysis(analyse(image), parse_caption(caption))


def accuracies(scores: Sequence[dict[str, bool]]) -> dict[str, float]:
    """Mean of each attribute (and 'all') over per-image scores, plus 'n'."""
    means = {key: float(np.mean([s[key] for s in scores])) if scores else 0.0
             for key in (*ATTRIBUTES, "all")}
    return {**means, "n": len(scores)}


def evaluate(images: Sequence[ImageLike], captions: Sequence[str]) -> dict[str, float]:
    """Accuracy per attribute (and 'all') over image/caption pairs, plus 'n'."""
    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    return accuracies([score(image, text) for image, text in zip(images, captions, strict=True)])


# --- degradation (to check the evaluator on soft, generated-looking images) ---------------------


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


# --- CLI ----------------------------------------------------------------------------------------


def evaluation_captions(split: str, n: int, seed: int) -> list[str]:
    """The captions a run scores: held-out combinations, or seen ones (one or two shapes)."""
    if split == "held-out":
        return held_out_captions(n, seed)
    if split == "seen":
        return seen_captions(n, seed)
    raise ValueError(f"unknown split '{split}'; choose held-out or seen")


def _ground_truth_images(captions: Sequence[str], seed: int, size: int,
                         degraded: bool) -> list[np.ndarray]:
    """The true rendering of each caption's scene (optionally degraded), jittered per index."""
    images = []
    for i, text in enumerate(captions):
        rng = np.random.default_rng([seed, i, 2])
        image = render(parse_caption(text), size, rng)
        images.append(degrade(image, rng) if degraded else image)
    return images


def _generated_images(captions: Sequence[str], args: argparse.Namespace) -> list[Image.Image]:
    """One image per caption from the runtime, with seeds seed, seed+1, ..."""
    from sdrt.runtime.model.folder import EMBEDDED_MODEL  # heavy: only when a model is evaluated
    from sdrt.runtime.pipeline import Pipeline

    pipe = Pipeline.load(args.model or EMBEDDED_MODEL)
    options = {"steps": args.steps, "guidance_scale": args.guidance, "sampler": args.sampler}
    images = []
    for i, text in enumerate(captions):
        images.append(pipe.generate(text, seed=args.seed + i, width=args.size, height=args.size,
                                    **options)[0])
        print(f"\r{i + 1}/{len(captions)}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    return images


def _parser() -> argparse.ArgumentParser:
    """The command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", help="model folder to generate with (default: sdrt's "
                        "embedded model)")
    source.add_argument("--ground-truth", action="store_true",
                        help="score the true renderings instead (checks the evaluator)")
    parser.add_argument("--degrade", action="store_true",
                        help="with --ground-truth: blur, colour-cast, add noise, JPEG them")
    parser.add_argument("--split", choices=("held-out", "seen"), default="held-out",
                        help="held-out attribute combinations (default) or seen ones")
    parser.add_argument("--n", type=int, default=200, help="captions to evaluate")
    parser.add_argument("--seed", type=int, default=0,
                        help="picks the captions; generation seeds are seed, seed+1, ...")
    parser.add_argument("--steps", type=int, help="sampler steps (default: the model's)")
    parser.add_argument("--guidance", type=float, help="guidance scale (default: the model's)")
    parser.add_argument("--sampler", help="sampler name (default: the model's)")
    parser.add_argument("--size", type=int, default=64, help="image width and height")
    parser.add_argument("--out", type=Path, help="write accuracies and per-image results here")
    parser.add_argument("--save-images", type=Path, help="write the scored images here")
    return parser


def _save_images(images: Sequence[ImageLike], folder: Path) -> None:
    """Write images as 0000.png, 0001.png, ..."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        pil = image if isinstance(image, Image.Image) else Image.fromarray(image)
        pil.save(folder / f"{i:04d}.png")


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    """Score the images of one split's captions; print and optionally save the accuracies."""
    args = _parser().parse_args(argv)
    captions = evaluation_captions(args.split, args.n, args.seed)
    if args.ground_truth:
        images: list[ImageLike] = list(_ground_truth_images(captions, args.seed, args.size,
                                                            args.degrade))
    else:
        images = list(_generated_images(captions, args))
    analyses = [analyse(image) for image in images]
    scores = [score_analysis(a, parse_caption(c)) for a, c in zip(analyses, captions, strict=True)]
    summary = accuracies(scores)
    print(json.dumps(summary, indent=2))
    if args.save_images:
        _save_images(images, args.save_images)
    if args.out:
        config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
        samples = [{"caption": c, "score": s, "detected": asdict(a)}
                   for c, s, a in zip(captions, scores, analyses, strict=True)]
        args.out.write_text(json.dumps({"config": config, "accuracy": summary,
                                        "samples": samples}, indent=1))
    return summary


if __name__ == "__main__":
    main()
