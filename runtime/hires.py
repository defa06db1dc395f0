"""Hires fix: AUTOMATIC1111's two-pass text-to-image (`StableDiffusionProcessingTxt2Img`).

1. The first pass generates at the request's size, as without it.
2. Its latents are upscaled to the target: a latent upscaler resizes them as torch's
   interpolate does (runtime/latent_upscale.py); a pixel upscaler decodes them, resizes the
   picture with Pillow ("None" is A1111's plain Lanczos resize, "Lanczos" and "Nearest" its
   upscalers of those names) and encodes it again.
3. The target: `resize_x`×`resize_y` when given (one alone keeps the aspect ratio; both: the
   picture is scaled to cover them, then the latents are cropped centred to them), else
   `scale` × the size; rounded down to the model's size multiple.
4. The second pass is image-to-image on those latents at the target size with strength
   `denoise` (runtime/img2img.py's rule for the first step), over `steps` (0: the first pass's)
   with the sampler, schedule, prompts and guidance scale given for it (None: the first pass's).
   As A1111 (1.6+: a new `ImageRNG` for the hires pass) its noise comes from fresh generators
   seeded seed + i, varied as the first pass's (runtime/variation.py); a pixel upscaler's VAE
   posterior sample draws from the first pass's generators, continuing their streams.
5. The larger latents decode through the pipeline's decoder (tiled under --low-memory); the
   memory plan is made for the target size (memory/plan.py).

The infotext is A1111's: "Size" is the first pass's, then "Denoising strength", "Hires
upscale: 2" (or "Hires resize: WxH"), "Hires steps" when set, "Hires upscaler", and the
"Hires sampler", "Hires schedule type", "Hires CFG Scale", "Hires prompt" and "Hires negative
prompt" of a second pass that differs from the first.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from sdrt.runtime import images
from sdrt.runtime.architectures.base import check_request
from sdrt.runtime.errors import InputError
from sdrt.runtime.flow_match import is_flow_matching
from sdrt.runtime.img2img import Start, text_start
from sdrt.runtime.latent_upscale import upscale
from sdrt.runtime.progress import Progress
from sdrt.runtime.rng import make_generator
from sdrt.runtime.samplers import (
    display_name,
    num_model_calls,
    resolve_pair,
    start_step_for_strength,
)
from sdrt.runtime.schedules import schedule_infotext
from sdrt.runtime.variation import noise_rows

if TYPE_CHECKING:
    from sdrt.runtime.model.folder import ModelFacts
    from sdrt.runtime.pipeline import GeneratedImage, Pipeline, StepCallback
    from sdrt.runtime.request import GenerationRequest

# A1111's `shared.latent_upscale_modes`: name → torch interpolate (mode, antialias)
LATENT_MODES = {
    "Latent": ("bilinear", False),
    "Latent (antialiased)": ("bilinear", True),
    "Latent (bicubic)": ("bicubic", False),
    "Latent (bicubic antialiased)": ("bicubic", True),
    "Latent (nearest)": ("nearest", False),
    "Latent (nearest-exact)": ("nearest-exact", False),
}
LATENT_UPSCALERS: tuple[str, ...] = tuple(LATENT_MODES)
# A1111's always-present pixel upscalers → Pillow's filter
PIXEL_FILTERS = {"None": Image.Resampling.LANCZOS, "Lanczos": Image.Resampling.LANCZOS,
                 "Nearest": Image.Resampling.NEAREST}
PIXEL_UPSCALERS: tuple[str, ...] = tuple(PIXEL_FILTERS)
MAX_SCALE = 4.0  # A1111's hires slider's top; the target must also fit the request's MAX_SIDE
MAX_STEPS = 1000  # as the request's


@dataclass(frozen=True)
class HiresFix:
    """A1111's hires fix settings (`enable_hr` and the `hr_*` fields of txt2img)."""

    scale: float = 2.0
    resize_x: int = 0  # 0: from scale
    resize_y: int = 0
    upscaler: str = "Latent"
    steps: int = 0  # 0: the first pass's steps (A1111's hr_second_pass_steps)
    denoise: float = 0.7  # A1111's denoising_strength default for hires
    sampler: str | None = None  # None: the first pass's
    schedule: str | None = None
    prompt: str | None = None  # None / "": the first pass's
    negative_prompt: str | None = None
    cfg: float | None = None

    def checked(self, max_side: int) -> HiresFix:
        """Each field checked (one-line InputErrors naming it), the upscaler's name as A1111
        spells it (any case accepted)."""
        _number("hires scale", self.scale, 1.0, MAX_SCALE)
        _integer("hires resize_x", self.resize_x, 0, max_side)
        _integer("hires resize_y", self.resize_y, 0, max_side)
        _integer("hires steps", self.steps, 0, MAX_STEPS)
        _number("hires denoise", self.denoise, 0.0, 1.0)
        if self.cfg is not None:
            _number("hires cfg", self.cfg, 0.0, math.inf)
        for name in ("sampler", "schedule", "prompt", "negative_prompt"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise InputError(f"hires {name} must be a str, got {type(value).__name__}")
        names = {name.lower(): name for name in (*LATENT_UPSCALERS, *PIXEL_UPSCALERS)}
        upscaler = names.get(str(self.upscaler).lower()) if isinstance(self.upscaler, str) \
            else None
        if upscaler is None:
            raise InputError(f"unknown hires upscaler {str(self.upscaler)[:40]!r}; choose one "
                             f"of: {', '.join(names.values())}")
        return replace(self, upscaler=upscaler)


def _number(name: str, value: object, low: float, high: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) \
            or not math.isfinite(value) or not low <= value <= high:
        bound = f"≥ {low:g}" if high == math.inf else f"between {low:g} and {high:g}"
        raise InputError(f"{name} must be a finite number {bound}, got {str(value)[:20]}")


def _integer(name: str, value: object, low: int, high: int | None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) \
            or value < low or (high is not None and value > high):
        bound = f"≥ {low}" if high is None else f"between {low} and {high}"
        raise InputError(f"{name} must be an integer {bound}, got {str(value)[:20]}")


@dataclass(frozen=True)
class Target:
    """Where the first pass goes: upscaled to `upscaled`, then cropped centred to `size`
    ((width, height) in pixels, each a multiple of the model's size step)."""

    upscaled: tuple[int, int]
    size: tuple[int, int]


def target(width: int, height: int, hires: HiresFix, multiple: int, max_side: int) -> Target:
    """A1111's `calculate_target_resolution`, rounded down to `multiple`."""
    rx, ry = hires.resize_x, hires.resize_y
    if not rx and not ry:
        upscaled = (int(width * hires.scale), int(height * hires.scale))
        wanted = upscaled
    elif not ry or (rx and width / height < rx / ry):  # the width decides (and covers)
        upscaled = wanted = (rx, rx * height // width)
    else:
        upscaled = wanted = (ry * width // height, ry)
    if rx and ry:
        wanted = (rx, ry)
    up = tuple(side // multiple * multiple for side in upscaled)
    size = tuple(min(side // multiple * multiple, big) for side, big in zip(wanted, up,
                                                                              strict=True))
    if min(size) < multiple or max(up) > max_side:
        raise InputError(f"the hires target {up[0]}×{up[1]} (from {width}×{height}) must have "
                         f"sides between {multiple} and {max_side}")
    return Target(up, size)


def size_step(facts: ModelFacts) -> int:
    """What image sides must be multiples of (the request's rule)."""
    return max(8, facts.vae_scale_factor * facts.patch_size)


def planned_size(req: GenerationRequest, facts: ModelFacts) -> tuple[int, int]:
    """The size of a resolved request's larger pass (the memory plan's)."""
    from sdrt.runtime.request import MAX_SIDE  # it imports this module

    if req.hires is None:
        return req.width, req.height
    size = target(req.width, req.height, req.hires, size_step(facts), MAX_SIDE).size
    return max((req.width, req.height), size, key=lambda side: side[0] * side[1])


def second_pass(req: GenerationRequest, size: tuple[int, int]) -> GenerationRequest:
    """The request of the hires pass: the target size, the hires overrides."""
    hires = req.hires
    sampler = hires.sampler or req.sampler
    try:  # A1111's "Use same scheduler" where the hires sampler takes it, else its own
        pair = resolve_pair(sampler, hires.schedule or req.schedule)
    except InputError:
        if hires.schedule is not None:
            raise
        pair = resolve_pair(sampler)
    return replace(req, width=size[0], height=size[1], steps=hires.steps or req.steps,
                   sampler=pair[0], schedule=pair[1], prompt=hires.prompt or req.prompt,
                   negative_prompt=hires.negative_prompt or req.negative_prompt,
                   guidance_scale=req.guidance_scale if hires.cfg is None else hires.cfg,
                   hires=None)


def check_model(pipe: Pipeline) -> None:
    """The pipeline must run image-to-image on ordinary latents."""
    if pipe.facts.family.inpainting or is_flow_matching(pipe.scheduler):
        raise InputError(f"the hires fix is not supported for {pipe.facts.family.title} "
                         f"models (its second pass is image-to-image on a UNet's latents)")


def run(pipe: Pipeline, req: GenerationRequest,
        callback: StepCallback | None = None) -> list[GeneratedImage]:
    """Both passes of a resolved request with `hires` set (module doc); `callback(i, n, x)`
    counts the model calls of both (n: all of them)."""
    from sdrt.runtime.pipeline import GeneratedImage  # they import this module
    from sdrt.runtime.request import MAX_SIDE

    check_model(pipe)
    hires, facts = req.hires, pipe.facts
    goal = target(req.width, req.height, hires, size_step(facts), MAX_SIDE)
    second = second_pass(req, goal.size)
    check_request(pipe.architecture, req)
    check_request(pipe.architecture, second)
    start = _start_step(second.steps, hires.denoise)
    first_calls = num_model_calls(req.sampler, req.steps)
    second_calls = 0 if start is None else num_model_calls(second.sampler, second.steps, start)
    progress = Progress(callback, first_calls + second_calls)
    factor, rows = facts.vae_scale_factor, noise_rows(req, facts.vae_scale_factor)
    generators = [make_generator(req.generator, req.seed + i) for i in range(req.num_images)]
    shape = (req.num_images, facts.latent_channels, req.height // factor, req.width // factor)
    latents = pipe.denoise(req, generators, text_start(generators, shape, rows),
                           progress.relay(0))  # (B, C, h, w)
    if progress.stopped:  # A1111 returns the first pass when interrupted there
        return [GeneratedImage(pipe.decode(latents[i : i + 1]), pipe.info(req, i))
                for i in range(req.num_images)]
    latents = _crop(_upscaled(pipe, latents, goal.upscaled, hires.upscaler, generators),
                    (goal.size[1] // factor, goal.size[0] // factor))  # (B, C, H, W)
    if start is not None:
        fresh = [make_generator(req.generator, req.seed + i) for i in range(req.num_images)]
        latents = pipe.denoise(second, fresh, Start(rows(fresh, latents.shape), start, latents),
                               progress.relay(first_calls))
    return [GeneratedImage(pipe.decode(latents[i : i + 1]), _info(pipe, req, second, i))
            for i in range(req.num_images)]


def _start_step(steps: int, denoise: float) -> int | None:
    """The second pass's first step (None: denoise 0, no second pass); InputError when the
    strength leaves no step."""
    if denoise == 0:
        return None
    if int(steps * denoise) == 0:
        raise InputError(f"hires denoise {denoise:g} × {steps} steps leaves no denoising step: "
                         f"use at least {math.ceil(1 / denoise)} hires steps")
    return start_step_for_strength(steps, denoise)


def _upscaled(pipe: Pipeline, latents: np.ndarray, size: tuple[int, int], upscaler: str,
              generators: list) -> np.ndarray:
    """The first pass's latents at `size` (width, height) by the named upscaler."""
    factor = pipe.facts.vae_scale_factor
    if upscaler in LATENT_MODES:
        mode, antialias = LATENT_MODES[upscaler]
        return upscale(latents, (size[1] // factor, size[0] // factor), mode, antialias)
    encoder = pipe.encoder()
    out = []
    for i, generator in enumerate(generators):
        picture = pipe.decode(latents[i : i + 1]).resize(size, PIXEL_FILTERS[upscaler])
        out.append(encoder(images.to_model(picture), generator))  # (1, C, H, W)
    return np.concatenate(out)


def _crop(latents: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(B, C, h, w) cropped centred to `size` (h, w), A1111's truncation."""
    dy, dx = latents.shape[2] - size[0], latents.shape[3] - size[1]
    return latents[:, :, dy // 2 : dy // 2 + size[0], dx // 2 : dx // 2 + size[1]]


def _info(pipe: Pipeline, req: GenerationRequest, second: GenerationRequest, index: int):
    """The first pass's infotext with A1111's hires keys."""
    hires, info = req.hires, pipe.info(req, index)
    extra = dict(info.extra)
    if second.sampler != req.sampler:
        extra["Hires sampler"] = display_name(second.sampler)
    if second.schedule != req.schedule:
        extra["Hires schedule type"] = schedule_infotext(second.schedule).get("Schedule type",
                                                                              "Automatic")
    if second.guidance_scale != req.guidance_scale:
        extra["Hires CFG Scale"] = second.guidance_scale
    if second.prompt != req.prompt:
        extra["Hires prompt"] = second.prompt
    if second.negative_prompt != req.negative_prompt:
        extra["Hires negative prompt"] = second.negative_prompt
    if hires.resize_x or hires.resize_y:
        extra["Hires resize"] = f"{hires.resize_x}x{hires.resize_y}"
    else:
        extra["Hires upscale"] = hires.scale
    if hires.steps:
        extra["Hires steps"] = hires.steps
    extra["Hires upscaler"] = hires.upscaler
    return replace(info, denoising_strength=hires.denoise, extra=extra)
