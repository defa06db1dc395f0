"""Inpainting and outpainting quality on sdrt's embedded shapes model, read from the pixels.

Three measurements, each on fixed seeds:

1. Adherence of an inpainted region: a rendered scene has one shape; a square mask (half the
   image side) covers it; the prompt is the caption of the same scene with another shape (a
   held-out colour/kind/background combination) at that place. `adherence.score` reads the
   result: the shape colour (target ≥ 0.8), kind, position, background.
2. Preservation outside the mask (with paste-back off, i.e. what the model itself does): over
   the pixels the feathered mask leaves at 0, the mean |output − input| against the VAE round
   trip's (decode(encode(input)) with the posterior mean) mean |round trip − input| there.
3. Outpainting seams: a rendered 64×64 scene extended by `--border` pixels on every side; the
   mean |difference| across the picture's border (the seam) against the output's mean
   |difference| between neighbouring pixels (target: seam ≤ 1.5 × mean).

Usage:
    python -m sdrt.benchmarks.inpaint_quality [--model DIR] [--cases 100] [--outpaint-cases 10]
        [--border 64] [--seed 0] [--backend ort] [--out results.json] [--save-images DIR]
(no --model: sdrt's embedded model)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from sdrt.evaluation.adherence import accuracies, score
from sdrt.evaluation.scenes import (
    COLOURS,
    GRID_CENTRES,
    KINDS,
    POSITIONS,
    Scene,
    Shape,
    caption,
    held_out_scenes,
    parse_caption,
    render,
    seen_captions,
)
from sdrt.runtime import images

MASK_FRACTION = 0.5  # mask side as a fraction of the image side: a large shape is 0.30
SEAM_RATIO_TARGET = 1.5  # the bound on the seam's mean gradient over the image's
COLOUR_TARGET = 0.8  # the bound on the inpainted shape's colour accuracy
IMAGE_SIZE = 64  # the embedded model's native size


@dataclass(frozen=True)
class InpaintCase:
    """A picture with one shape, the mask over it, and the caption of what should replace it."""

    picture: Image.Image
    mask: Image.Image
    prompt: str
    seed: int


def inpaint_cases(n: int, seed: int = 0, size: int = IMAGE_SIZE) -> list[InpaintCase]:
    """`n` cases: held-out target scenes; the picture has another colour and kind there."""
    rng = np.random.default_rng([seed, 6])
    cases = []
    for i, target in enumerate(held_out_scenes(n, seed)):
        (shape,) = target.shapes
        others = [c for c in COLOURS if c not in (target.background, shape.colour)]
        before = Shape(str(rng.choice([k for k in KINDS if k != shape.kind])),
                       str(rng.choice(others)), shape.position, shape.size)
        picture = render(Scene(target.background, (before,)), size, rng)
        cases.append(InpaintCase(Image.fromarray(picture), square_mask(shape.position, size),
                                 caption(target, rng), seed + i))
    return cases


def square_mask(position: str, size: int) -> Image.Image:
    """White square of MASK_FRACTION × size centred on a named position's grid centre."""
    column, row = POSITIONS[position]
    half = MASK_FRACTION * size / 2
    cx, cy = GRID_CENTRES[column] * size, GRID_CENTRES[row] * size
    box = [int(round(v)) for v in (max(cx - half, 0), max(cy - half, 0),
                                   min(cx + half, size), min(cy + half, size))]
    drawn = Image.new("L", (size, size), 0)
    drawn.paste(255, box)
    return drawn


def inpaint_adherence(pipe, cases: Sequence[InpaintCase], **options) -> dict[str, float]:
    """Accuracy per attribute of the inpainted pictures against their prompts."""
    scores = []
    for case in cases:
        (out,) = pipe.inpaint(case.picture, case.mask, case.prompt, seed=case.seed, **options)
        scores.append(score(out, case.prompt))
    return accuracies(scores)


def round_trip(pipe, picture: Image.Image) -> np.ndarray:
    """decode(encode(picture)) with the posterior mean, (H, W, 3) uint8, as the pipeline
    decodes."""
    mean, _ = pipe.vae_encoder().posterior(images.to_model(picture))  # (1, C, h, w)
    decoded = pipe.vae_decoder(mean)  # (1, 3, H, W) in [-1, 1]
    return np.round(np.clip(decoded[0] / 2 + 0.5, 0, 1).transpose(1, 2, 0) * 255).astype(np.uint8)


def outside_errors(pipe, cases: Sequence[InpaintCase], mask_blur: float = 4,
                   **options) -> dict[str, float]:
    """Mean |output − input| outside the feathered mask (paste-back off) and the VAE round
    trip's over the same pixels, averaged over cases; plus the worst case's ratio."""
    outs, trips, ratios = [], [], []
    for case in cases:
        (out,) = pipe.inpaint(case.picture, case.mask, case.prompt, seed=case.seed,
                              mask_blur=mask_blur, paste_back=False, **options)
        outside = np.asarray(images.blur(case.mask, mask_blur)) == 0
        source = np.asarray(case.picture, dtype=np.float64)[outside]
        out_err = float(np.abs(np.asarray(out, dtype=np.float64)[outside] - source).mean())
        trip_err = float(np.abs(round_trip(pipe, case.picture)[outside] - source).mean())
        outs.append(out_err)
        trips.append(trip_err)
        ratios.append(out_err / max(trip_err, 1e-9))
    return {"output_mean_abs": float(np.mean(outs)), "round_trip_mean_abs": float(np.mean(trips)),
            "worst_ratio": float(np.max(ratios)), "n": len(cases)}


def seam_gradients(image: Image.Image, box: tuple[int, int, int, int]) -> tuple[float, float]:
    """(mean |difference| across the borders of `box` that lie inside the image, mean
    |difference| between neighbouring pixels of the whole image)."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float64)
    height, width = pixels.shape[:2]
    left, top, right, bottom = box
    seams = []
    if left > 0:
        seams.append(np.abs(pixels[top:bottom, left] - pixels[top:bottom, left - 1]))
    if right < width:
        seams.append(np.abs(pixels[top:bottom, right] - pixels[top:bottom, right - 1]))
    if top > 0:
        seams.append(np.abs(pixels[top, left:right] - pixels[top - 1, left:right]))
    if bottom < height:
        seams.append(np.abs(pixels[bottom, left:right] - pixels[bottom - 1, left:right]))
    dx = np.abs(np.diff(pixels, axis=1))
    dy = np.abs(np.diff(pixels, axis=0))
    mean = float((dx.sum() + dy.sum()) / (dx.size + dy.size))
    return float(np.concatenate([s.ravel() for s in seams]).mean()), mean


def outpaint_prompt(text: str) -> str:
    """The background part of a caption ("a red circle … on a blue background" → "a blue
    background"): what an outpainted border should continue."""
    return "a " + text[text.rindex(" on ") + 4:] if " on " in text else text


def outpaint_seams(pipe, n: int, border: int, seed: int = 0, size: int = IMAGE_SIZE,
                   save: Path | None = None, **options) -> dict[str, float]:
    """Seam and image mean gradients of `n` rendered scenes outpainted by `border` pixels."""
    rng = np.random.default_rng([seed, 7])
    ratios, seams, means = [], [], []
    for i, text in enumerate(seen_captions(n, seed, two_shapes_prob=0.0)):
        picture = Image.fromarray(render(_placed(parse_caption(text)), size, rng))
        (out,) = pipe.outpaint(picture, outpaint_prompt(text), left=border, right=border,
                               top=border, bottom=border, seed=seed + i, **options)
        seam, mean = seam_gradients(out, (border, border, border + size, border + size))
        seams.append(seam)
        means.append(mean)
        ratios.append(seam / mean)
        if save is not None:
            save.mkdir(parents=True, exist_ok=True)
            out.save(save / f"outpaint-{i:03d}.png")
    return {"seam_mean_gradient": float(np.mean(seams)),
            "image_mean_gradient": float(np.mean(means)), "worst_ratio": float(np.max(ratios)),
            "mean_ratio": float(np.mean(ratios)), "n": n}


def _placed(scene: Scene) -> Scene:
    """A parsed caption's scene with a size for every shape (captions may leave it unsaid)."""
    shapes = tuple(Shape(s.kind, s.colour, s.position or "centre", s.size or "large")
                   for s in scene.shapes)
    return Scene(scene.background, shapes)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model folder (default: sdrt's embedded model)")
    parser.add_argument("--backend", default="ort")
    parser.add_argument("--cases", type=int, default=100, help="inpainting cases")
    parser.add_argument("--outpaint-cases", type=int, default=10)
    parser.add_argument("--border", type=int, default=64, help="outpainted pixels per side")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="write the figures here as JSON")
    parser.add_argument("--save-images", type=Path, help="write the outpainted images here")
    return parser


def main(argv: Sequence[str] | None = None) -> dict:
    """Run the three measurements and print them as JSON."""
    from sdrt.runtime.model.folder import EMBEDDED_MODEL
    from sdrt.runtime.pipeline import Pipeline

    args = _parser().parse_args(argv)
    pipe = Pipeline.load(args.model or EMBEDDED_MODEL, backend=args.backend)
    cases = inpaint_cases(args.cases, args.seed)
    started = time.perf_counter()
    report = {"config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "adherence": inpaint_adherence(pipe, cases),
              "outside_mask": outside_errors(pipe, cases),
              "outpaint": outpaint_seams(pipe, args.outpaint_cases, args.border, args.seed,
                                         save=args.save_images)}
    report["seconds"] = round(time.perf_counter() - started, 1)
    report["targets"] = {"colour": COLOUR_TARGET, "seam_ratio": SEAM_RATIO_TARGET}
    print(json.dumps(report, indent=2))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
