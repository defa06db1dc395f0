"""AUTOMATIC1111's smaller `/sdapi/v1` routes: skip, memory, cmd-flags, png-info, upscalers,
latent-upscale-modes, prompt-styles, and the lists of features sdrt has none of (scripts,
face restorers, Real-ESRGAN models, hypernetworks, script info, extensions, SD modules),
answered empty rather than 404 so A1111 clients (webuiapi probes /scripts on start) carry on.

Shapes follow A1111's `modules/api/models.py`: MemoryResponse, UpscalerItem, LatentUpscalerModeItem,
PromptStyleItem, PNGInfoResponse; /cmd-flags its argparse namespace, with sdrt's serve settings
under A1111's flag names (never a secret or a path).
"""

from __future__ import annotations

import os
from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from sdrt.runtime.errors import InputError
from sdrt.runtime.hires import LATENT_UPSCALERS, PIXEL_UPSCALERS
from sdrt.runtime.metadata import parse_parameters
from sdrt.runtime.server.codec import decode_image
from sdrt.runtime.server.jobs import JobQueue
from sdrt.runtime.server.settings import ServerSettings, is_loopback
from sdrt.runtime.server.styles import PromptStyle

PNG_INFO_MAX_PIXELS = 64 * 1024 * 1024  # only the header and text chunks matter; bound decoding
CUDA_NOTE = "sdrt does not use torch's CUDA; generation runs on ONNX Runtime or OpenVINO"


class PngInfoRequest(BaseModel):
    image: str = Field(description="a PNG (or other image) in base64, optionally a data: URL")


class PngInfoResponse(BaseModel):
    """A1111's PNGInfoResponse: the `parameters` text, every text chunk, the parsed fields."""

    info: str
    items: dict[str, Any]
    parameters: dict[str, Any]


class UpscalerItem(BaseModel):
    name: str
    model_name: str | None = None
    model_path: str | None = None
    model_url: str | None = None
    scale: float | None = None


def add_extra_routes(api: APIRouter, queue: JobQueue, settings: ServerSettings) -> None:
    @api.post("/sdapi/v1/skip")
    async def skip() -> dict:
        """Stop the current job at its next step; it returns the picture as it stands, and
        the jobs waiting run on (A1111's skip). Answers {} as A1111."""
        queue.skip()
        return {}

    @api.get("/sdapi/v1/memory")
    async def memory() -> dict[str, Any]:
        """A1111's MemoryResponse: `ram` as {free, used, total} bytes (used: this process's
        resident memory), `cuda` an error, as A1111 answers without a CUDA device."""
        return {"ram": await run_in_threadpool(ram), "cuda": {"error": CUDA_NOTE}}

    @api.get("/sdapi/v1/cmd-flags")
    async def cmd_flags() -> dict[str, Any]:
        """The serve settings under A1111's command-line names (secrets as booleans only)."""
        return cmd_flags_of(settings)

    @api.post("/sdapi/v1/png-info", response_model=PngInfoResponse)
    async def png_info(body: PngInfoRequest) -> PngInfoResponse:
        """The generation parameters in an image's text chunks (A1111's /png-info)."""
        return await run_in_threadpool(read_png_info, body.image)

    @api.get("/sdapi/v1/upscalers", response_model=list[UpscalerItem])
    async def upscalers() -> list[UpscalerItem]:
        """The hires fix's pixel upscalers (resampling filters: no model, scale 4 as A1111
        lists its Lanczos and Nearest)."""
        return [UpscalerItem(name=name, scale=None if name == "None" else 4)
                for name in PIXEL_UPSCALERS]

    @api.get("/sdapi/v1/latent-upscale-modes")
    async def latent_upscale_modes() -> list[dict[str, str]]:
        """The hires fix's latent upscalers (A1111's LatentUpscalerModeItem)."""
        return [{"name": name} for name in LATENT_UPSCALERS]

    @api.get("/sdapi/v1/prompt-styles")
    async def prompt_styles() -> list[dict[str, str]]:
        """The styles of `--styles FILE` (A1111's PromptStyleItem: name, prompt, negative)."""
        return [style_item(style) for style in settings.styles]

    for path in ("/sdapi/v1/face-restorers", "/sdapi/v1/realesrgan-models",
                 "/sdapi/v1/hypernetworks", "/sdapi/v1/script-info", "/sdapi/v1/extensions",
                 "/sdapi/v1/sd-modules"):
        api.add_api_route(path, _none, methods=["GET"],
                          summary=f"{path.rsplit('/', 1)[1]}: none in sdrt (an empty list)")

    @api.get("/sdapi/v1/scripts")
    async def scripts() -> dict[str, list[str]]:
        """A1111's script lists: sdrt runs no scripts."""
        return {"txt2img": [], "img2img": []}


async def _none() -> list:
    return []


def style_item(style: PromptStyle) -> dict[str, str]:
    return {"name": style.name, "prompt": style.prompt, "negative_prompt": style.negative_prompt}


def cmd_flags_of(settings: ServerSettings) -> dict[str, Any]:
    """A1111's flags that mean something here, under its names, from the serve settings."""
    return {
        "api": True, "nowebui": False, "listen": not is_loopback(settings.host),
        "port": settings.port, "api_auth": bool(settings.api_auth or settings.token),
        "cors_allow_origins": ",".join(settings.cors_origins) or None,
        # sdrt's own limits, which A1111 does not have
        "max_queue": settings.max_queue, "max_pixels": settings.max_pixels,
        "max_steps": settings.max_steps, "max_batch": settings.max_batch,
        "workers": settings.workers, "styles": len(settings.styles) > 0,
    }


def read_png_info(data: str) -> PngInfoResponse:
    """`info` (the parameters text), `items` (the other text chunks), `parameters` (parsed)."""
    image = decode_image(data, "image", PNG_INFO_MAX_PIXELS)
    items = {key: value for key, value in image.info.items() if isinstance(value, str)}
    text = items.pop("parameters", "")
    if not isinstance(text, str):
        raise InputError("image: its parameters chunk is not text")
    return PngInfoResponse(info=text, items=items,
                           parameters=parse_parameters(text) if text else {})


def ram() -> dict[str, int]:
    """{free, used, total} in bytes as A1111 reports them: used = this process's RSS, total
    the machine's memory (/proc on Linux, psutil elsewhere when installed)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            total = next(int(line.split()[1]) * 1024 for line in meminfo
                         if line.startswith("MemTotal:"))
        with open(f"/proc/{os.getpid()}/statm", encoding="ascii") as statm:
            used = int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, StopIteration, ValueError):
        try:
            import psutil
        except ImportError:
            return {"free": 0, "used": 0, "total": 0}
        total, used = psutil.virtual_memory().total, psutil.Process().memory_info().rss
    return {"free": total - used, "used": used, "total": total}
