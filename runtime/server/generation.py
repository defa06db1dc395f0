"""AUTOMATIC1111 request bodies to sdrt's requests, and its responses back: the server's caps,
prompt styles, hires fix, variation seeds and img2img options (A1111's
`StableDiffusionProcessing*` fields) mapped onto `GenerationRequest`, `HiresFix` and
`Pipeline.image_input`; `info` written as A1111's `Processed.js()`."""

from __future__ import annotations

import json
import secrets
from datetime import datetime
from importlib.metadata import PackageNotFoundError, version

from PIL import ImageOps

from sdrt.runtime.control.unit import ControlUnit
from sdrt.runtime.errors import InputError
from sdrt.runtime.hires import HiresFix, planned_size
from sdrt.runtime.images import MAX_INPUT_PIXELS, read_image, read_mask
from sdrt.runtime.img2img import ImageInput
from sdrt.runtime.metadata import format_parameters
from sdrt.runtime.pipeline import GeneratedImage, GenerationRequest, Pipeline
from sdrt.runtime.request import MAX_SEED
from sdrt.runtime.server.codec import decode_image, encode_image
from sdrt.runtime.server.jobs import Job
from sdrt.runtime.server.models import ModelHost
from sdrt.runtime.server.schemas import ImageResponse, Img2ImgRequest, Txt2ImgRequest
from sdrt.runtime.server.settings import ServerSettings
from sdrt.runtime.server.styles import apply_styles

# An input photo may be this many times the largest output: it is resized down; beyond that,
# decoding it would cost more memory than generating.
INPUT_PIXELS_FACTOR = 16
# Classifier-free guidance extrapolates uncond + s·(cond − uncond). On the embedded model the
# image is saturated to one flat colour from s ≈ 1e3 on and float32 overflows (NaN/Inf out of
# the VAE) between 1e30 and 1e38; A1111's own slider stops at 30. 100 is far past any useful
# value and far below any overflow, so nothing a client sends reaches float32's range.
MAX_CFG_SCALE = 100.0


def build_request(host: ModelHost, settings: ServerSettings, body: Txt2ImgRequest,
                  inits: list[ImageInput] | None = None, checkpoint: str | None = None,
                  controls: tuple[ControlUnit, ...] = ()) -> GenerationRequest:
    """The request's generation parameters, checked against this server's caps first (so a
    message names the server's limit, not the library's), then resolved against the model it
    runs on (`checkpoint`, else the selected one); `controls`: its ControlNet units
    (runtime/server/controlnet.py)."""
    if body.unsupported():
        raise InputError(f"not supported by sdrt: {', '.join(body.unsupported())} "
                         "(leave them at A1111's defaults)")
    batch = max(body.batch_size, len(inits)) if inits and len(inits) > 1 else body.batch_size
    if batch < 1 or body.n_iter < 1 or batch * body.n_iter > settings.max_batch:
        raise InputError(f"batch_size × n_iter must be between 1 and {settings.max_batch} on "
                         f"this server, got {batch} × {body.n_iter}")
    for name, low in (("steps", 1), ("hr_second_pass_steps", 0)):  # 0: the first pass's
        steps = getattr(body, name)
        if steps is not None and not low <= steps <= settings.max_steps:
            raise InputError(f"{name} must be between {low} and {settings.max_steps} on this "
                             f"server, got {steps}")
    for name in ("cfg_scale", "hr_cfg"):
        scale = getattr(body, name)
        if scale is not None and not 0 <= scale <= MAX_CFG_SCALE:  # NaN fails too
            raise InputError(f"{name} must be between 0 and {MAX_CFG_SCALE:g} (beyond, guidance "
                             f"only saturates the image), got {scale:g}")
    prompt, negative = apply_styles(body.prompt or "", body.negative_prompt or "",
                                    body.styles or [], settings.styles)
    options = {"negative_prompt": negative, "steps": body.steps,
               "guidance_scale": body.cfg_scale,
               "sampler": body.sampler_name or body.sampler_index or None,
               "schedule": body.scheduler or None,
               "seed": None if body.seed == -1 else body.seed,
               "num_images": batch * body.n_iter, **_variation(body),
               **settings.request_fields(), **({"controls": controls} if controls else {})}
    if body.enable_hr and not inits:  # A1111's hires fix is txt2img's alone
        options["hires"] = hires_fix(body)
    request = (Pipeline.request_for(inits[0], prompt, **options) if inits else
               GenerationRequest(prompt=prompt, width=body.width, height=body.height, **options))
    facts, scheduler = host.facts(checkpoint)
    request = request.resolve(facts, scheduler)
    if request.width * request.height > settings.max_pixels:
        raise InputError(f"{request.width}×{request.height} is more than {settings.max_pixels:,} "
                         "pixels, this server's limit per image")
    width, height = planned_size(request, facts)  # the hires pass's, if larger
    if width * height > settings.max_pixels:
        raise InputError(f"the hires fix's {width}×{height} is more than "
                         f"{settings.max_pixels:,} pixels, this server's limit per image")
    return request


def _variation(body: Txt2ImgRequest) -> dict:
    """A1111's variation-seed fields, only where they change the picture."""
    fields: dict = {}
    if body.subseed_strength:
        fields["subseed"] = None if body.subseed == -1 else body.subseed
        fields["subseed_strength"] = body.subseed_strength
    if body.seed_resize_from_w > 0 and body.seed_resize_from_h > 0:
        fields["seed_resize_from"] = (body.seed_resize_from_w, body.seed_resize_from_h)
    return fields


def hires_fix(body: Txt2ImgRequest) -> HiresFix:
    """A1111's hr_* fields as a HiresFix (runtime/hires.py)."""
    return HiresFix(scale=body.hr_scale, resize_x=body.hr_resize_x, resize_y=body.hr_resize_y,
                    upscaler=body.hr_upscaler or "Latent", steps=body.hr_second_pass_steps,
                    denoise=body.denoising_strength, sampler=body.hr_sampler_name or None,
                    schedule=body.hr_scheduler or None, prompt=body.hr_prompt or None,
                    negative_prompt=body.hr_negative_prompt or None, cfg=body.hr_cfg)


def image_inputs(pipe: Pipeline, settings: ServerSettings, body: Img2ImgRequest
                 ) -> list[ImageInput]:
    """Each init image (and the mask) decoded and sized for the model (a worker thread's job)."""
    limit = min(MAX_INPUT_PIXELS, INPUT_PIXELS_FACTOR * settings.max_pixels)
    mask = None
    if body.mask:
        mask = read_mask(decode_image(body.mask, "mask", limit))
        if body.inpainting_mask_invert:  # A1111: 1 repaints where the mask is black
            mask = ImageOps.invert(mask)
    options = _img2img_options(body, mask is not None)
    return [pipe.image_input(read_image(decode_image(data, f"init_images[{i}]", limit)), mask,
                             strength=body.denoising_strength, width=body.width,
                             height=body.height,
                             mask_blur=4 if body.mask_blur is None else body.mask_blur,
                             **options)
            for i, data in enumerate(body.init_images)]


def _img2img_options(body: Img2ImgRequest, inpainting: bool) -> dict:
    """A1111's img2img options for `Pipeline.image_input`, only where they differ from its
    defaults (the inpainting ones only with a mask, where A1111 reads them)."""
    options: dict = {}
    if body.resize_mode:
        options["resize_mode"] = body.resize_mode
    if body.initial_noise_multiplier != 1.0:
        options["initial_noise_multiplier"] = body.initial_noise_multiplier
    if inpainting:
        if body.inpaint_full_res:
            options["inpaint_full_res"] = True
            options["inpaint_full_res_padding"] = body.inpaint_full_res_padding
        if body.inpainting_fill != 1:
            options["inpainting_fill"] = body.inpainting_fill
    return options


def image_response(body: Txt2ImgRequest, results: list[GeneratedImage], job: Job,
                   **encoding) -> ImageResponse:
    """A1111's response: base64 images (PNG unless `encoding`, codec.encode_image's options,
    says otherwise), the request read back, and `info` as JSON text."""
    infos = [result.info for result in results]
    first, request = infos[0], job.request
    subseed = getattr(request, "subseed", None)
    subseed = (body.subseed if body.subseed != -1 else secrets.randbelow(MAX_SEED + 1)) \
        if subseed is None else subseed  # A1111 reports a subseed even when unused
    info = {
        "prompt": first.prompt, "all_prompts": [i.prompt for i in infos],
        "negative_prompt": first.negative_prompt,
        "all_negative_prompts": [i.negative_prompt for i in infos],
        "seed": first.seed, "all_seeds": [i.seed for i in infos],
        "subseed": subseed, "all_subseeds": [(subseed + n) % (MAX_SEED + 1)
                                             for n in range(len(infos))],
        "subseed_strength": body.subseed_strength,
        "seed_resize_from_w": body.seed_resize_from_w if body.seed_resize_from_w > 0 else -1,
        "seed_resize_from_h": body.seed_resize_from_h if body.seed_resize_from_h > 0 else -1,
        "width": first.width, "height": first.height, "sampler_name": first.sampler,
        "cfg_scale": first.cfg_scale, "steps": first.steps, "batch_size": body.batch_size,
        "n_iter": body.n_iter, "restore_faces": False, "sd_model_name": first.model_name,
        "sd_model_hash": first.model_hash, "sd_vae_name": first.extra.get("VAE"),
        "sd_vae_hash": first.extra.get("VAE hash"), "denoising_strength": first.denoising_strength,
        "extra_generation_params": dict(first.extra), "index_of_first_image": 0,
        "infotexts": [format_parameters(i) for i in infos], "styles": list(body.styles or []),
        "job_timestamp": datetime.fromtimestamp(job.created).strftime("%Y%m%d%H%M%S"),
        "interrupted": job.interrupted, "skipped": job.skipped, "task_id": job.id,
        "version": server_version(),
    }
    parameters = body.model_dump()
    if isinstance(body, Img2ImgRequest) and not body.include_init_images:
        parameters["init_images"], parameters["mask"] = None, None  # as A1111 does
    return ImageResponse(images=[encode_image(r.image, r.info, **encoding) for r in results],
                         parameters=parameters, info=json.dumps(info))


def server_version() -> str:
    try:
        return version("sdrt")
    except PackageNotFoundError:
        return "unknown"
