"""AUTOMATIC1111's "Extras" tab over the API: `/sdapi/v1/extra-single-image` and
`/extra-batch-images` with the upscalers sdrt has (None, Lanczos, Nearest: Pillow's resampling,
as A1111's own upscalers of those names), and the routes of A1111 features sdrt lacks
(interrogate, embedding and hypernetwork training) answered with a one-line 422, never a 404.

A1111's rules (`scripts/postprocessing_upscale.py`): resize_mode 0 scales by
`upscaling_resize`; 1 scales, keeping the aspect ratio, to cover `upscaling_resize_w`×
`upscaling_resize_h` and, with `upscaling_crop`, crops the centre to it; upscaler_1 "None"
leaves the picture as it is; a second upscaler blends in at `extras_upscaler_2_visibility`.
Face restoration is refused.
"""

from __future__ import annotations

from fastapi import APIRouter
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from sdrt.runtime.errors import InputError
from sdrt.runtime.hires import PIXEL_FILTERS
from sdrt.runtime.images import MAX_INPUT_PIXELS, read_image
from sdrt.runtime.server.codec import decode_image, encode_png
from sdrt.runtime.server.settings import ServerSettings

MAX_SCALE = 8.0  # A1111's extras slider's top
MAX_BATCH_IMAGES = 16  # as img2img's init_images
# A1111 routes for features sdrt does not have (its API answers them; here a 4xx says why)
MISSING = {
    "/sdapi/v1/interrogate": "sdrt has no interrogator (CLIP or DeepBooru)",
    "/sdapi/v1/create/embedding": "sdrt does not train embeddings",
    "/sdapi/v1/create/hypernetwork": "sdrt does not train hypernetworks",
    "/sdapi/v1/train/embedding": "sdrt does not train embeddings",
    "/sdapi/v1/train/hypernetwork": "sdrt does not train hypernetworks",
}


class ExtrasRequest(BaseModel):
    """A1111's ExtrasBaseRequest (the fields sdrt reads; the others are ignored)."""

    model_config = ConfigDict(extra="ignore")

    resize_mode: int = Field(0, ge=0, le=1, strict=True)
    gfpgan_visibility: float = Field(0, ge=0, le=1, strict=True)
    codeformer_visibility: float = Field(0, ge=0, le=1, strict=True)
    upscaling_resize: float = Field(2, gt=0, le=MAX_SCALE, strict=True)
    upscaling_resize_w: int = Field(512, ge=1, strict=True)
    upscaling_resize_h: int = Field(512, ge=1, strict=True)
    upscaling_crop: bool = True
    upscaler_1: str = "None"
    upscaler_2: str = "None"
    extras_upscaler_2_visibility: float = Field(0, ge=0, le=1, strict=True)


class ExtrasSingleRequest(ExtrasRequest):
    image: str = Field(description="the picture in base64")


class ImageData(BaseModel):
    data: str
    name: str = ""


class ExtrasBatchRequest(ExtrasRequest):
    imageList: list[ImageData] = Field(min_length=1, max_length=MAX_BATCH_IMAGES)  # noqa: N815


def add_postprocess_routes(api: APIRouter, settings: ServerSettings) -> None:
    limit = min(MAX_INPUT_PIXELS, 16 * settings.max_pixels)  # as image inputs'

    @api.post("/sdapi/v1/extra-single-image")
    async def extra_single_image(body: ExtrasSingleRequest) -> dict[str, str]:
        """Upscale one picture (A1111's ExtrasSingleImageResponse)."""
        image = await run_in_threadpool(_processed, body, body.image, "image", limit)
        return {"html_info": "", "image": image}

    @api.post("/sdapi/v1/extra-batch-images")
    async def extra_batch_images(body: ExtrasBatchRequest) -> dict[str, str | list[str]]:
        """Upscale several pictures (A1111's ExtrasBatchImagesResponse)."""
        images = [await run_in_threadpool(_processed, body, item.data, f"imageList[{i}]", limit)
                  for i, item in enumerate(body.imageList)]
        return {"html_info": "", "images": images}

    for path, why in MISSING.items():
        api.add_api_route(path, _refuser(why), methods=["POST"], summary=why)


def _refuser(why: str):
    async def refuse() -> None:
        raise InputError(f"not supported: {why}")

    return refuse


def _processed(body: ExtrasRequest, data: str, what: str, limit: int) -> str:
    """One picture decoded, upscaled as the body says, and encoded as base64 PNG."""
    if body.gfpgan_visibility or body.codeformer_visibility:
        raise InputError("face restoration (GFPGAN, CodeFormer) is not supported by sdrt")
    first, second = (_filter(name, field) for name, field in
                     ((body.upscaler_1, "upscaler_1"), (body.upscaler_2, "upscaler_2")))
    picture = read_image(decode_image(data, what, limit))
    if first is None and (second is None or not body.extras_upscaler_2_visibility):
        return encode_png(picture)  # A1111: no upscaler, the picture as it came
    size, crop = _target(picture.size, body)
    if size[0] * size[1] > limit:
        raise InputError(f"{what}: the upscaled size {size[0]}×{size[1]} is more than "
                         f"{limit:,} pixels, this server's limit")
    result = picture.resize(size, first) if first is not None else picture.resize(size)
    if second is not None and body.extras_upscaler_2_visibility:
        result = Image.blend(result, picture.resize(size, second),
                             body.extras_upscaler_2_visibility)
    return encode_png(result.crop(crop) if crop else result)


def _filter(name: str, field: str) -> Image.Resampling | None:
    """Pillow's filter of a pixel upscaler named as A1111 names it; None for "None"."""
    if name == "None":
        return None
    if name not in PIXEL_FILTERS:
        raise InputError(f"unknown {field} {name[:40]!r}; choose one of: "
                         f"{', '.join(PIXEL_FILTERS)}")
    return PIXEL_FILTERS[name]


def _target(size: tuple[int, int], body: ExtrasRequest
            ) -> tuple[tuple[int, int], tuple[int, int, int, int] | None]:
    """The upscaled size and, for a cropped resize to w×h, the centre box to keep."""
    width, height = size
    if body.resize_mode == 0:
        scale = body.upscaling_resize
        return (max(1, round(width * scale)), max(1, round(height * scale))), None
    w, h = body.upscaling_resize_w, body.upscaling_resize_h
    scale = max(w / width, h / height)  # covers w×h, the aspect ratio kept
    up = (max(w, round(width * scale)), max(h, round(height * scale)))
    if not body.upscaling_crop:
        return up, None
    left, top = (up[0] - w) // 2, (up[1] - h) // 2
    return up, (left, top, left + w, top + h)
