"""SDXL base → refiner (Podell et al. 2023, §2.5): the base model denoises the high-noise part of
the schedule and hands its still-noisy latents to the refiner, which denoises the rest and
decodes; one image per seed, whose metadata names both models.

Semantics are diffusers' two-pipeline flow, `StableDiffusionXLPipeline(..., denoising_end=f,
output_type="latent")` then `StableDiffusionXLImg2ImgPipeline(refiner, image=latents,
denoising_start=f)`:

- The switch: with T = num_train_timesteps, the cutoff is round(T − f·T); the base makes the
  model calls of its run at timesteps ≥ the cutoff, the refiner those of its own run (its
  scheduler config, the same sampler and step count) below it, starting from the base's latents
  as they are (no noise added). The refiner's sampler starts afresh, so a multistep sampler's
  history restarts there, as diffusers' second scheduler does.
- Prompts, steps, guidance and seeds are the same for both; the refiner goes on drawing from each
  image's generator where the base stopped (ancestral samplers draw per step), as passing the
  same torch generators to both pipelines does. The refiner's VAE decodes.
- The metadata adds A1111's `Refiner: NAME [hash]` and `Refiner switch at: f`.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np

from sdrt.runtime.architectures.base import check_request
from sdrt.runtime.errors import InputError
from sdrt.runtime.img2img import Start, text_start
from sdrt.runtime.progress import Progress
from sdrt.runtime.rng import make_generator
from sdrt.runtime.samplers import SAMPLERS, display_name, make_schedule, num_model_calls
from sdrt.runtime.schedules import SchedulerConfig, alphas_cumprod
from sdrt.runtime.variation import noise_rows

if TYPE_CHECKING:
    from sdrt.runtime.pipeline import GeneratedImage, GenerationRequest, Pipeline, StepCallback

DEFAULT_REFINER_START = 0.8  # diffusers' docs and A1111 switch to the refiner at 80 %
LATENT_SPACE = ("latent_channels", "vae_scale_factor", "scaling_factor")


def check_refiner_start(value: float) -> float:
    """The switch point as a float strictly between 0 and 1; InputError otherwise."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < 1:
        raise InputError(f"refiner start must be a number between 0 and 1 (exclusive), "
                         f"got {value!r}")
    return float(value)


def check_pair(base: Pipeline, refiner: Pipeline) -> None:
    """The base must be SDXL, the refiner an SDXL refiner (or SDXL) UNet on the same latents
    and training noise schedule (each architecture says whether it hands latents on or takes
    them: runtime/architectures/); InputError naming what differs."""
    if "refiner_base" not in base.architecture.features or base.facts.family.inpainting:
        raise InputError(f"the base model must be SDXL to hand its latents to a refiner, "
                         f"'{base.facts.name}' is {base.facts.family.title}")
    if "refiner" not in refiner.architecture.features or refiner.facts.family.inpainting:
        raise InputError(f"the refiner must be an SDXL refiner (or SDXL) model, "
                         f"'{refiner.facts.name}' is {refiner.facts.family.title}")
    for name in LATENT_SPACE:
        ours, theirs = getattr(base.facts, name), getattr(refiner.facts, name)
        if ours != theirs:
            raise InputError(f"the refiner's latents are not the base's: {name} {theirs} "
                             f"against {ours}")
    if base.scheduler.num_train_timesteps != refiner.scheduler.num_train_timesteps \
            or not np.array_equal(alphas_cumprod(base.scheduler),
                                  alphas_cumprod(refiner.scheduler)):
        raise InputError("the refiner's training noise schedule (betas, num_train_timesteps) "
                         "is not the base's")


def switch_step(config: SchedulerConfig, sampler: str, steps: int, fraction: float,
                schedule: str | None = None) -> int:
    """How many model calls of a run come before the switch: those at timesteps ≥
    round(T − fraction·T) (diffusers' denoising_end; denoising_start runs the others)."""
    total = config.num_train_timesteps
    cutoff = int(round(total - fraction * total))
    timesteps = make_schedule(config, sampler, steps, schedule=schedule).timesteps  # descending
    return sum(t >= cutoff for t in timesteps)


def refine(base: Pipeline, refiner: Pipeline, request: GenerationRequest, refiner_start: float,
           *, callback: StepCallback | None = None) -> list[GeneratedImage]:
    """Generate with `base` up to `refiner_start` of the schedule, finish with `refiner`;
    `callback(i, n, latents)` counts the model calls of both (n: all of them)."""
    from sdrt.runtime.pipeline import GeneratedImage  # it imports this module

    fraction = check_refiner_start(refiner_start)
    check_pair(base, refiner)
    req = request.resolve(base.facts, base.scheduler)
    check_request(base.architecture, req)  # before the base runs, not once it has
    check_request(refiner.architecture, base_only(req))
    if SAMPLERS[req.sampler].second_order:  # the handover counts steps as single model calls
        raise InputError(f"sampler '{display_name(req.sampler)}' makes two model calls a step; "
                         "the refiner takes first-order and multistep samplers only")
    calls = num_model_calls(req.sampler, req.steps)
    handed = switch_step(base.scheduler, req.sampler, req.steps, fraction, req.schedule)
    resumed = switch_step(refiner.scheduler, req.sampler, req.steps, fraction, req.schedule)
    if handed == 0 or resumed == calls:
        who = "base" if handed == 0 else "refiner"
        raise InputError(f"refiner start {fraction:g} leaves the {who} no step of {req.steps}: "
                         f"{'raise' if handed == 0 else 'lower'} it or use more steps")
    generators = [make_generator(req.generator, req.seed + i) for i in range(req.num_images)]
    shape = (req.num_images, base.facts.latent_channels,
             req.height // base.facts.vae_scale_factor, req.width // base.facts.vae_scale_factor)
    progress = Progress(callback, handed + calls - resumed)
    rows = noise_rows(req, base.facts.vae_scale_factor)  # A1111's variation seeds
    latents = base.denoise(req, generators, text_start(generators, shape, rows),
                           progress.relay(0), end_step=handed)  # (B, C, h, w), still noisy
    if not progress.stopped:  # LoRAs and their tags are the base's: an SDXL LoRA names layers
        latents = refiner.denoise(base_only(req), generators,  # the refiner lacks
                                  Start(latents, resumed, latents, add_noise=False),
                                  progress.relay(handed))
    name = refiner.facts.name if refiner.facts.unet_sha256 is None \
        else f"{refiner.facts.name} [{refiner.facts.unet_sha256[:10]}]"
    results = []
    for i in range(req.num_images):
        info = base.info(req, i)
        extra = {**info.extra, "Refiner": name, "Refiner switch at": fraction}
        results.append(GeneratedImage(refiner.decode(latents[i : i + 1]),
                                      replace(info, extra=extra)))
    return results


def base_only(req: GenerationRequest) -> GenerationRequest:
    """The request as the refiner runs it: without the base's LoRAs and ControlNets (the
    refiner takes no control), its prompt's tags out."""
    return replace(req, loras=(), controls=(), prompt=req.encoded_prompt)
