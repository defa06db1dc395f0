"""Prompt adherence of generated "simple scenes" images, read from their pixels (no learned model).

`score` compares what `detect.analyse` reads from the pixels (background, and per shape colour,
kind, position and size) with the attributes `scenes.parse_caption` reads from the caption (two
shapes: the better of both assignments); `evaluate` averages over many images. Training, the
quantization gates and the benchmarks all score with it.

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
import itertools
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np
from PIL import Image

from sdrt.evaluation.degrade import degrade
from sdrt.evaluation.detect import Analysis, DetectedShape, analyse
from sdrt.evaluation.pixels import ImageLike
from sdrt.evaluation.scenes import Scene, held_out_captions, parse_caption, render, seen_captions

ATTRIBUTES: tuple[str, ...] = ("background", "colour", "kind", "position", "size", "count")

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
