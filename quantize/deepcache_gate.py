"""Fidelity gate for DeepCache intervals: each interval N against the uncached run of the same
pipeline (same backend and precision, prompts, seeds, steps), by decoded-image PSNR and, on
models trained on sdrt's simple scenes, prompt adherence (quantize/gates.py's machinery).

DeepCache (Ma, Fang, Wang, CVPR 2024, arXiv:2312.00858) reuses a deep feature for N-1 calls out of
N, so, like an int8 UNet, it moves the sampling trajectory: pixels drift while the picture keeps
its content. The PSNR floor only catches broken output; adherence is the quality gate. At a
variant's precision (DeepCache on an int8 UNet, say) adherence is held to the fp32 uncached run,
as the variant's own gate was, so the two drops cannot add up past the limit unseen.
Each interval's record, pass or fail, lands in manifest.json's `extra.deepcache.gates` under
`<precision>-<backend>/<N>`; the runtime reads a passing one as "gated" (runtime/deepcache.py).

Usage: python -m sdrt.quantize.deepcache_gate MODEL_DIR [--intervals 2,3,4,5] [--backend ort]
       [--precision fp32] [--prompts scenes|general] [--adherence N] [--steps N] [--size PX]
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path

from sdrt.quantize import gates, prompts
from sdrt.quantize.stage import GATE_PROMPT_COUNT, SCENES_ADHERENCE_CAPTIONS
from sdrt.runtime.deepcache import gate_key
from sdrt.runtime.errors import InputError, SdrtError
from sdrt.runtime.model.manifest import Manifest
from sdrt.runtime.model.variants import REFERENCE
from sdrt.runtime.pipeline import Pipeline

log = logging.getLogger(__name__)

# Decoded-image PSNR floor against the uncached run, dB, 8-bit pixels: int8's floor (gates.py),
# for the same reason: a moved trajectory, not noise, is what lowers it; below 20 dB is broken.
MIN_IMAGE_PSNR_DB = 20.0
# Largest drop of adherence ("all attributes right") against the uncached run: the variants'
# 3 points (issue 5), so a gated interval costs no more than a gated precision.
MAX_ADHERENCE_DROP = gates.MAX_ADHERENCE_DROP
ADHERENCE_DIGITS = 6  # a share of at most 10⁴ captions is exact to 4 digits; float error is ~1e-17


def gate_settings(prompt_set: str, adherence: int | None, steps: int | None,
                  size: int | None) -> gates.GateSettings:
    """What the gate generates, as `sdrt quantize` would for the same options."""
    count = adherence
    if count is None:
        count = SCENES_ADHERENCE_CAPTIONS if prompt_set == "scenes" else 0
    if count < 0 or (steps is not None and steps < 1) or (size is not None and size < 1):
        raise InputError(f"--adherence must be ≥ 0, --steps and --size ≥ 1; got {count}, "
                         f"{steps}, {size}")
    captions: tuple[str, ...] = ()
    if count:
        from sdrt.evaluation.scenes import held_out_captions

        captions = tuple(held_out_captions(count, 0))  # the adherence benchmark's split
    return gates.GateSettings(prompts=tuple(prompts.gate_prompts(prompt_set, GATE_PROMPT_COUNT)),
                              steps=steps, size=size, adherence_captions=captions)


def failures(figures: dict[str, float]) -> list[str]:
    """Why an interval's figures fail the gate (empty when they pass)."""
    reasons = []
    if figures["image_psnr_db"] < MIN_IMAGE_PSNR_DB:
        reasons.append(f"image PSNR {figures['image_psnr_db']:.1f} dB < {MIN_IMAGE_PSNR_DB:g} "
                       "dB vs uncached")
    if "adherence" in figures:
        against = "fp32" if "adherence_fp32" in figures else "uncached"
        reference = figures[f"adherence_{against}"]
        # rounded: both are shares of the same captions, and 0.885 - 0.855 is 0.030000000000000027
        drop = round(reference - figures["adherence"], ADHERENCE_DIGITS)
        if drop > MAX_ADHERENCE_DROP:
            reasons.append(f"adherence {figures['adherence']:.3f} is {100 * drop:.1f} points "
                           f"below {against} {reference:.3f} "
                           f"(limit {100 * MAX_ADHERENCE_DROP:g})")
    return reasons


def gate_intervals(folder: Path, intervals: list[int], settings: gates.GateSettings, *,
                   backend: str = "ort", precision: str = "fp32") -> dict[str, dict]:
    """Gate each interval; every record (pass or fail) saved in the manifest and returned."""
    if not intervals or any(n < 1 for n in intervals):
        raise InputError(f"--intervals must be integers ≥ 1, got {intervals}")
    pipe = Pipeline.load(folder, backend, precision=precision)
    pipe.deepcache()  # one-line error now if the graphs are missing
    reference = gates.render(pipe, settings)
    base = {}
    if settings.adherence_captions:
        base["adherence_uncached"] = gates.adherence(pipe, settings.adherence_captions,
                                                     settings.steps)
        if precision != REFERENCE:
            base["adherence_fp32"] = gates.adherence(
                Pipeline.load(folder, backend, precision=REFERENCE),
                settings.adherence_captions, settings.steps)
    records = {}
    for interval in intervals:
        try:
            figures = {**gates.compare(reference, gates.render(
                pipe, dataclasses.replace(settings, deepcache=interval))), **base}
        except gates.UnusableOutput as exc:
            records[gate_key(precision, backend, interval)] = {"passed": False,
                                                               "reasons": [str(exc)]}
            continue
        if settings.adherence_captions:
            figures["adherence"] = gates.adherence(pipe, settings.adherence_captions,
                                                   settings.steps, deepcache=interval)
        reasons = failures(figures)
        records[gate_key(precision, backend, interval)] = {
            "passed": not reasons, "reasons": reasons, "figures": figures,
            "thresholds": {"min_image_psnr_db": MIN_IMAGE_PSNR_DB,
                           **({"max_adherence_drop": MAX_ADHERENCE_DROP}
                              if settings.adherence_captions else {})},
            "prompts": list(settings.prompts), "seeds": list(settings.seeds),
            "steps": settings.steps or pipe.facts.family.steps,
            "size": settings.size or pipe.facts.default_size,
            "adherence_captions": len(settings.adherence_captions),
        }
        log.info("DeepCache N=%d: %s", interval, records[gate_key(precision, backend,
                                                                  interval)])
    _record(folder, records)
    return records


def _record(folder: Path, records: dict[str, dict]) -> None:
    manifest = Manifest.load(folder)
    entry = dict(manifest.extra.get("deepcache", {}))
    entry["gates"] = {**entry.get("gates", {}), **records}
    dataclasses.replace(manifest, extra={**manifest.extra, "deepcache": entry}).save(folder)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m sdrt.quantize.deepcache_gate",
                                     description=__doc__.strip().splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--intervals", default="2,3,4,5")
    parser.add_argument("--backend", default="ort")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--prompts", default="scenes", choices=prompts.PROMPT_SETS)
    parser.add_argument("--adherence", type=int)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--size", type=int)
    args = parser.parse_args(argv)
    try:
        intervals = [int(n) for n in args.intervals.split(",") if n.strip()]
    except ValueError:
        sys.exit(f"error: --intervals must be integers separated by commas, got {args.intervals}")
    try:
        settings = gate_settings(args.prompts, args.adherence, args.steps, args.size)
        records = gate_intervals(args.model, intervals, settings, backend=args.backend,
                                 precision=args.precision)
    except SdrtError as error:
        sys.exit(f"error: {error}")
    for key, record in records.items():
        figures = record.get("figures", {})
        shown = ", ".join(f"{k} {v}" for k, v in figures.items())
        print(f"{key}: {'pass' if record['passed'] else 'FAIL'} ({shown})"
              + (f" — {'; '.join(record['reasons'])}" if record["reasons"] else ""))


if __name__ == "__main__":
    main()
