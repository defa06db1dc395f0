"""Prompt adherence of the embedded model as diffusers itself runs it: a StableDiffusionPipeline
over the in-memory (or reloaded) components, images for held-out captions, and their scores from
`sdrt.evaluation.adherence` against the model's targets."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from sdrt.evaluation.adherence import evaluate
from sdrt.evaluation.scenes import held_out_captions
from sdrt.models.embedded_config import IMAGE_SIZE

TARGETS = {"background": 0.95, "colour": 0.90, "kind": 0.80, "position": 0.80}


def make_pipeline(vae: AutoencoderKL, text_encoder: CLIPTextModel, unet: UNet2DConditionModel,
                  tokenizer: CLIPTokenizer, scheduler: dict[str, Any]) -> StableDiffusionPipeline:
    """diffusers' StableDiffusionPipeline over in-memory components, with the shipped scheduler."""
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                   unet=unet, scheduler=DDIMScheduler(**scheduler),
                                   safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe: StableDiffusionPipeline, captions: Sequence[str], *, seed: int, steps: int,
             guidance: float, batch_size: int = 50) -> list[np.ndarray]:
    """One 64×64 image per caption; image i starts from torch's noise for seed `seed + i`."""
    images: list[np.ndarray] = []
    for start in range(0, len(captions), batch_size):
        chunk = list(captions[start:start + batch_size])
        generators = [torch.Generator().manual_seed(seed + start + i) for i in range(len(chunk))]
        out = pipe(chunk, height=IMAGE_SIZE, width=IMAGE_SIZE, num_inference_steps=steps,
                   guidance_scale=guidance, generator=generators, output_type="np").images
        images.extend(np.clip(np.rint(out * 255), 0, 255).astype(np.uint8))
    return images


def adherence(pipe: StableDiffusionPipeline, n: int, caption_seed: int, *, steps: int,
              guidance: float) -> dict[str, float]:
    """Adherence on `n` held-out captions (generation seeds 0, 1, ...), rounded for the log."""
    captions = held_out_captions(n, caption_seed)
    scores = evaluate(generate(pipe, captions, seed=0, steps=steps, guidance=guidance), captions)
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in scores.items()}


def target_score(scores: dict[str, float]) -> float:
    """How a guidance scale is chosen: the worst margin over the four targets."""
    return min(scores[k] - v for k, v in TARGETS.items())
