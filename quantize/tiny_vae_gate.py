"""Fidelity gate of a tiny autoencoder (`--vae`, TAESD architecture) against the model's own VAE.

A tiny decoder approximates the full one, so a configuration using it counts as gated only after
this check: the model generates held-out scene captions (caption i with seed i, the model's
defaults) once with its own VAE and once with the tiny one, on the same backend and precision, so
both decode the same latents. Pass: decoded 8-bit images within `MIN_TINY_VAE_PSNR_DB` of the full
VAE's (PSNR over all images) AND prompt adherence (`sdrt.evaluation.adherence`, "all attributes
right") at most `MAX_ADHERENCE_DROP` below the full VAE's, as quantized variants are gated
(quantize/gates.py). With `--record` the figures go into the tiny VAE's manifest.json (`gates`).

Usage: python -m sdrt.quantize.tiny_vae_gate --vae models/embedded/tiny_vae/onnx
       [--model models/embedded/onnx] [--backend ort] [--precision fp32] [--n 200] [--record]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from sdrt.quantize.gates import MAX_ADHERENCE_DROP, psnr
from sdrt.runtime.errors import SdrtError
from sdrt.runtime.model.folder import EMBEDDED_MODEL
from sdrt.runtime.model.manifest import MANIFEST_NAME
from sdrt.runtime.pipeline import Pipeline

# A tiny decoder is a different network, not a rounding of the same one: its pixels differ
# everywhere a little. 25 dB is an RMS error of 14/255, under a fifth of the 87-unit RGB distance
# between the scene colours the captions name, so a colour cannot change while the floor holds;
# what a picture shows is judged by adherence.
MIN_TINY_VAE_PSNR_DB = 25.0


def gate_images(pipe: Pipeline, captions: Sequence[str]) -> np.ndarray:
    """(N, H, W, 3) uint8: caption i generated with seed i at the model's defaults."""
    return np.stack([np.asarray(pipe.generate(text, seed=i)[0])
                     for i, text in enumerate(captions)])


def run_gate(model: Path, vae: Path, *, backend: str = "ort", precision: str = "fp32",
             n: int = 200, caption_seed: int = 0) -> dict[str, Any]:
    """Figures, thresholds and verdict of the tiny VAE `vae` on `model` (a scenes model)."""
    from sdrt.evaluation.adherence import evaluate
    from sdrt.evaluation.scenes import held_out_captions

    captions = held_out_captions(n, caption_seed)
    full = Pipeline.load(model, backend, precision=precision)
    tiny = Pipeline.load(model, backend, precision=precision, vae=vae)
    tiny = replace(tiny, denoiser=full.denoiser, conditioner=full.conditioner)  # one set of graphs
    reference, candidate = gate_images(full, captions), gate_images(tiny, captions)
    figures = {
        "image_psnr_db": round(psnr(reference, candidate, 255.0), 2),
        "worst_image_psnr_db": round(min(psnr(r, c, 255.0)
                                         for r, c in zip(reference, candidate, strict=True)), 2),
        "adherence_full_vae": round(evaluate(list(reference), captions)["all"], 4),
        "adherence": round(evaluate(list(candidate), captions)["all"], 4),
    }
    reasons = []
    if figures["image_psnr_db"] < MIN_TINY_VAE_PSNR_DB:
        reasons.append(f"image PSNR {figures['image_psnr_db']:.1f} dB < "
                       f"{MIN_TINY_VAE_PSNR_DB:g} dB vs the full VAE")
    drop = figures["adherence_full_vae"] - figures["adherence"]
    if drop > MAX_ADHERENCE_DROP:
        reasons.append(f"adherence {figures['adherence']:.3f} is {100 * drop:.1f} points below "
                       f"the full VAE's {figures['adherence_full_vae']:.3f} "
                       f"(limit {100 * MAX_ADHERENCE_DROP:g})")
    return {
        "model": model.name, "backend": backend, "precision": precision,
        "captions": {"split": "held_out", "n": n, "seed": caption_seed}, "seeds": "caption i: i",
        "figures": figures, "passed": not reasons, "reasons": reasons,
        "thresholds": {"min_image_psnr_db": MIN_TINY_VAE_PSNR_DB,
                       "max_adherence_drop": MAX_ADHERENCE_DROP},
    }


def record(vae: Path, result: dict[str, Any]) -> None:
    """Add (or replace, per model, backend and precision) the gate entry in the manifest."""
    path = vae / MANIFEST_NAME
    data = json.loads(path.read_text("utf-8"))
    key = ("model", "backend", "precision")
    kept = [g for g in data.get("gates", []) if [g[k] for k in key] != [result[k] for k in key]]
    data["gates"] = [*kept, result]
    path.write_text(json.dumps(data, indent=2) + "\n", "utf-8")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vae", type=Path, required=True, help="exported tiny VAE folder")
    parser.add_argument("--model", type=Path, default=EMBEDDED_MODEL)
    parser.add_argument("--backend", default="ort")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--n", type=int, default=200, help="held-out captions")
    parser.add_argument("--record", action="store_true",
                        help="write the result into the tiny VAE's manifest.json")
    args = parser.parse_args(argv)
    try:
        result = run_gate(args.model, args.vae, backend=args.backend, precision=args.precision,
                          n=args.n)
    except SdrtError as exc:
        sys.exit(f"error: {exc}")
    print(json.dumps(result, indent=2))
    if args.record:
        record(args.vae, result)
    if not result["passed"]:
        sys.exit(f"error: the tiny VAE failed its gate: {'; '.join(result['reasons'])}")


if __name__ == "__main__":
    main()
