"""Fidelity gates: a variant is listed only while its pictures stay close to fp32's.

fp32 and the variant run on the same backend with the same prompts, seeds and steps. The gate
compares the final latents and the decoded 8-bit images by PSNR (peak signal-to-noise ratio:
10·log10(peak² / mean squared error)), and, for models trained on sdrt's simple scenes, prompt
adherence read from the pixels by `sdrt.evaluation.adherence.evaluate` over held-out captions.
NaN/Inf anywhere and all-black images fail whatever the figures (fp16 VAEs are
known to give NaN or black images).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from sdrt.runtime.errors import GenerationError, QuantizeError
from sdrt.runtime.memory.estimate import available_memory
from sdrt.runtime.memory.plan import plan_request
from sdrt.runtime.model.variants import Variant
from sdrt.runtime.pipeline import GenerationRequest, Pipeline

if TYPE_CHECKING:
    from sdrt.runtime.control.unit import ControlUnit

log = logging.getLogger(__name__)

# Decoded-image PSNR floors against fp32, dB, 8-bit pixels (peak 255).
MIN_IMAGE_PSNR_DB = {
    # fp16 keeps 11 significant bits, bf16 8: at ≥ 30 dB the difference is barely visible
    # (the bar, on the embedded model).
    "fp16": 30.0,
    "bf16": 30.0,
    # Integer variants perturb every UNet call and the sampler compounds it: pixels drift while
    # the picture keeps its content. These floors only catch broken output; adherence (below)
    # is their quality gate where it can be measured.
    "int8": 20.0,
    "int8-hybrid": 20.0,
    "int4": 15.0,
}
# Largest drop of adherence ("all attributes right" accuracy) against fp32: 3 points (issue 5).
MAX_ADHERENCE_DROP = 0.03
BLACK_LEVEL = 2  # 8-bit: no pixel above this is an all-black image (an overflowed fp16 VAE's)
IDENTICAL_PSNR_DB = 100.0  # reported for bit-identical outputs, whose PSNR is infinite
GATE_SEEDS = (0, 1)


class UnusableOutput(Exception):
    """NaN/Inf or an all-black image: fails any gate, whatever the figures."""


@dataclass(frozen=True)
class GateSettings:
    """What the gate generates: each prompt with each seed; adherence captions once each."""

    prompts: tuple[str, ...]
    seeds: tuple[int, ...] = GATE_SEEDS
    steps: int | None = None  # None: the model family's
    size: int | None = None  # square image side in pixels; None: the model's native size
    adherence_captions: tuple[str, ...] = ()
    deepcache: int | None = None  # DeepCache interval N (runtime/deepcache.py); None: off
    controls: tuple[ControlUnit, ...] = ()  # ControlNet units on every image (control.py)


@dataclass(frozen=True)
class Outputs:
    """One pipeline's gate outputs, in prompt-major, seed-minor order."""

    images: np.ndarray  # (N, H, W, 3) uint8
    latents: np.ndarray  # (N, C, h, w) float32, as handed to the VAE decoder


def psnr(reference: np.ndarray, candidate: np.ndarray, peak: float) -> float:
    """PSNR of `candidate` against `reference` in dB (IDENTICAL_PSNR_DB if they are equal)."""
    error = np.mean((reference.astype(np.float64) - candidate.astype(np.float64)) ** 2)
    if error == 0:
        return IDENTICAL_PSNR_DB
    return min(IDENTICAL_PSNR_DB, 10 * math.log10(peak**2 / error))


def render(pipe: Pipeline, settings: GateSettings) -> Outputs:
    """Every prompt × seed through `pipe`; UnusableOutput on NaN/Inf or an all-black image."""
    images, latents = [], []
    for prompt in settings.prompts:
        for seed in settings.seeds:
            request = GenerationRequest(prompt, seed=seed, steps=settings.steps,
                                        width=settings.size, height=settings.size,
                                        deepcache=settings.deepcache,
                                        controls=settings.controls)
            image, final = _generate(pipe, request)
            where = f"'{prompt}' seed {seed}"
            if not np.isfinite(final).all():
                raise UnusableOutput(f"NaN/Inf latents on {where}")
            if image is None:
                raise UnusableOutput(f"NaN/Inf in the decoded image on {where}")
            if image.max() <= BLACK_LEVEL:
                raise UnusableOutput(f"all-black image on {where}")
            images.append(image)
            latents.append(final[0])
    return Outputs(np.stack(images), np.stack(latents))


def _generate(pipe: Pipeline, request: GenerationRequest) -> tuple[np.ndarray | None, np.ndarray]:
    """The image (None if decoding gave NaN/Inf) and the final latents of one request."""
    seen: list[np.ndarray] = []

    def keep(i: int, n: int, latents: np.ndarray) -> None:
        seen.append(latents)  # the last one is what the VAE decodes

    try:
        (result,) = pipe.run(request, callback=keep)
    except GenerationError:
        return None, seen[-1]
    return np.asarray(result.image), seen[-1]


def compare(reference: Outputs, candidate: Outputs) -> dict[str, float]:
    """Image PSNR (over all images, and the worst image) and latent PSNR, in dB."""
    latent_peak = float(np.ptp(reference.latents)) or 1.0  # the reference's dynamic range
    worst = min(psnr(r, c, 255.0) for r, c in zip(reference.images, candidate.images,
                                                   strict=True))
    return {
        "image_psnr_db": round(psnr(reference.images, candidate.images, 255.0), 2),
        "worst_image_psnr_db": round(worst, 2),
        "latent_psnr_db": round(psnr(reference.latents, candidate.latents, latent_peak), 2),
    }


def adherence(pipe: Pipeline, captions: tuple[str, ...], steps: int | None,
              deepcache: int | None = None) -> float:
    """Share of captions whose every attribute the image shows (caption i with seed i)."""
    from sdrt.evaluation.adherence import evaluate

    images = [pipe.generate(text, seed=i, steps=steps, deepcache=deepcache)[0]
              for i, text in enumerate(captions)]
    return round(evaluate(images, list(captions))["all"], 4)


def failures(precision: str, figures: dict[str, float]) -> list[str]:
    """Why the figures fail `precision`'s gate (empty when they pass)."""
    reasons = []
    floor = MIN_IMAGE_PSNR_DB[precision]
    if figures["image_psnr_db"] < floor:
        reasons.append(f"image PSNR {figures['image_psnr_db']:.1f} dB < {floor:g} dB vs fp32")
    if "adherence" in figures:
        drop = figures["adherence_fp32"] - figures["adherence"]
        if drop > MAX_ADHERENCE_DROP:
            reasons.append(f"adherence {figures['adherence']:.3f} is {100 * drop:.1f} points "
                           f"below fp32's {figures['adherence_fp32']:.3f} "
                           f"(limit {100 * MAX_ADHERENCE_DROP:g})")
    return reasons


def run_gate(folder: Path, variant: Variant, settings: GateSettings,
             budget: int | None = None) -> dict:
    """Measure `variant` against fp32 on its backend; its gate record, or QuantizeError.
    One pipeline is loaded at a time (fp32 first), each in low-memory mode where its default
    plan exceeds `budget` bytes (default: the free memory; SDXL's fp32 pipeline alone is 14 GB)."""
    reference_pipe = load_pipeline(folder, variant.backend, "fp32", settings, budget)
    facts = reference_pipe.facts
    try:
        reference = render(reference_pipe, settings)
    except UnusableOutput as exc:
        raise QuantizeError(f"fp32 itself gives unusable output ({exc}): no gate can pass; "
                            f"{variant.key} is not listed") from exc
    figures = {}
    if settings.adherence_captions:
        figures["adherence_fp32"] = adherence(reference_pipe, settings.adherence_captions,
                                              settings.steps)
    del reference_pipe
    candidate_pipe = load_pipeline(folder, variant.backend, variant, settings, budget)
    try:
        figures = {**compare(reference, render(candidate_pipe, settings)), **figures}
    except UnusableOutput as exc:
        raise QuantizeError(f"{variant.key} failed its gate ({exc}); its files were removed "
                            "and it is not listed") from exc
    if settings.adherence_captions:
        figures["adherence"] = adherence(candidate_pipe, settings.adherence_captions,
                                         settings.steps)
    text = summary(figures)
    log.info("%s gate: %s", variant.key, text)
    reasons = failures(variant.precision, figures)
    if reasons:
        raise QuantizeError(f"{variant.key} failed its gate: {'; '.join(reasons)} ({text}); "
                            "its files were removed and it is not listed")
    return {
        "figures": figures, "summary": text,
        "thresholds": {"min_image_psnr_db": MIN_IMAGE_PSNR_DB[variant.precision],
                       **({"max_adherence_drop": MAX_ADHERENCE_DROP}
                          if settings.adherence_captions else {})},
        "prompts": list(settings.prompts), "seeds": list(settings.seeds),
        "steps": settings.steps or facts.family.steps,
        "size": settings.size or facts.default_size,
        "adherence_captions": len(settings.adherence_captions),
    }


def load_pipeline(folder: Path, backend: str, precision: str | Variant, settings: GateSettings,
                  budget: int | None = None) -> Pipeline:
    """A pipeline for the gate: low-memory where the default plan (with the settings' controls)
    exceeds `budget` bytes (default: the free memory)."""
    request = GenerationRequest("gate", steps=settings.steps, width=settings.size,
                                height=settings.size, controls=settings.controls)
    plan = plan_request(folder, backend, precision, request, mode="auto",
                        budget=budget or available_memory())
    if plan.low_memory:
        log.info("gate pipeline in low-memory mode: %s", plan.reason)
    return Pipeline.load(folder, backend, precision=precision, low_memory=plan.low_memory)


def summary(figures: dict[str, float]) -> str:
    """The figures in one line, as logs and `sdrt quantize` show them."""
    text = (f"image PSNR {figures['image_psnr_db']:.1f} dB (worst "
            f"{figures['worst_image_psnr_db']:.1f}), latent PSNR "
            f"{figures['latent_psnr_db']:.1f} dB vs fp32")
    if "adherence" in figures:
        text += f", adherence {figures['adherence']:.3f} (fp32 {figures['adherence_fp32']:.3f})"
    return text
