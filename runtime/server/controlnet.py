"""The A1111 ControlNet extension's API (Mikubill/sd-webui-controlnet, API version 3): the units
of a txt2img/img2img body's `alwayson_scripts.controlnet.args` as ControlUnits, and its routes
`/controlnet/version`, `model_list`, `module_list`, `settings` and `detect`.

A unit is a dict with the extension's fields: image (base64; or {"image", "mask"}, or [image,
mask], as older clients send), mask, module (a preprocessor name or its alias), model (a title
"name [hash]" of `sdrt serve --controlnet-dir`, a name, or the name without the hash), weight
(0–2), resize_mode (0/1/2 or "Just Resize" / "Crop and Resize" / "Resize and Fill", and the
extension's older aliases), guidance_start/end, control_mode (0/1/2 or "Balanced" / "My prompt
is more important" / "ControlNet is more important"), pixel_perfect, processor_res,
threshold_a/b (outside the preprocessor's slider range, -1 included: its default, as the
extension resets them), enabled; low_vram, hr_option and the extension's other fields are
ignored, as are its legacy names (guidance, lowvram, input_image, mask_image) mapped onto the
current ones. A unit disabled or with model "None" is skipped; an img2img unit without an image
uses the init image (the extension's fallback). Bad units are one-line InputErrors (422).
"""

from __future__ import annotations

import base64
import io
from typing import Any

from fastapi import APIRouter
from PIL import Image
from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    ValidationError,
)
from starlette.concurrency import run_in_threadpool

from sdrt.runtime.control.library import ControlEntry, ControlLibrary
from sdrt.runtime.control.preprocess import PREPROCESSORS, Slider, detect
from sdrt.runtime.control.unit import ControlUnit
from sdrt.runtime.errors import InputError
from sdrt.runtime.images import MAX_INPUT_PIXELS
from sdrt.runtime.server.codec import decode_image
from sdrt.runtime.server.generation import INPUT_PIXELS_FACTOR
from sdrt.runtime.server.schemas import MAX_INIT_IMAGES
from sdrt.runtime.server.settings import ServerSettings

API_VERSION = 3  # the extension's `external_code.get_api_version()` since its Preprocessor rework
SCRIPT_TITLE = "controlnet"  # A1111 matches alwayson script names case-insensitively
NO_MODEL = "None"
# Units one request may hold: each decodes an image and runs a ControlNet per step. The
# extension's UI shows 3 by default (control_net_unit_count); 8 leaves room for any workflow.
MAX_UNITS = 8
LEGACY_KEYS = {"guidance": "guidance_end", "lowvram": "low_vram", "input_image": "image",
               "mask_image": "mask"}
RESIZE_MODES = {"Just Resize": "resize", "Crop and Resize": "crop", "Resize and Fill": "fill",
                "Inner Fit (Scale to Fit)": "crop", "Scale to Fit (Inner Fit)": "crop",
                "Outer Fit (Shrink to Fit)": "fill", "Envelope (Outer Fit)": "fill"}
RESIZE_BY_NUMBER = ("resize", "crop", "fill", "resize")  # 3: "Just Resize (Latent upscale)"
CONTROL_MODES = {"Balanced": "balanced", "My prompt is more important": "prompt",
                 "ControlNet is more important": "control"}
CONTROL_BY_NUMBER = ("balanced", "prompt", "control")


class UnitBody(BaseModel):
    """One unit of `alwayson_scripts.controlnet.args` (the extension's ControlNetUnit)."""

    model_config = ConfigDict(extra="ignore", protected_namespaces=())

    enabled: StrictBool = True  # older extensions' default, and what API clients send
    module: str = "none"
    model: str = NO_MODEL
    weight: StrictFloat = Field(1.0, ge=0, le=2)
    image: str | dict[str, Any] | list[Any] | None = None
    mask: str | None = None
    resize_mode: StrictInt | str = "Crop and Resize"
    processor_res: StrictInt = -1
    threshold_a: StrictFloat = -1
    threshold_b: StrictFloat = -1
    guidance_start: StrictFloat = Field(0.0, ge=0, le=1)
    guidance_end: StrictFloat = Field(1.0, ge=0, le=1)
    pixel_perfect: StrictBool = False
    control_mode: StrictInt | str = "Balanced"


class DetectRequest(BaseModel):
    """The extension's POST /controlnet/detect body (webuiapi sends `controlnet_images`)."""

    model_config = ConfigDict(extra="ignore")

    controlnet_module: str = "none"
    controlnet_input_images: list[str] = Field(
        [], max_length=MAX_INIT_IMAGES,
        validation_alias=AliasChoices("controlnet_input_images", "controlnet_images"))
    controlnet_processor_res: StrictInt = -1
    controlnet_threshold_a: StrictFloat = -1
    controlnet_threshold_b: StrictFloat = -1


class DetectResponse(BaseModel):
    images: list[str] = Field(description="the detected maps, base64 PNG")
    info: str = "Success"


class ControlModels:
    """The control folders of `--controlnet-dir` (none without it), scanned on each look-up."""

    def __init__(self, library: ControlLibrary | None) -> None:
        self.library = library

    def titles(self) -> list[str]:
        return [entry.title for entry in self.library.entries()] if self.library else []

    def find(self, wanted: str) -> ControlEntry:
        """A control folder by title or name (InputError listing the titles)."""
        if self.library is None:
            raise InputError(f"unknown ControlNet model {wanted!r}: this server has none (start "
                             "it with --controlnet-dir DIR)")
        return self.library.find(wanted)


def add_controlnet_routes(api: APIRouter, models: ControlModels,
                          settings: ServerSettings) -> None:
    @api.get("/controlnet/version")
    async def version() -> dict[str, int]:
        """The extension API version this server speaks."""
        return {"version": API_VERSION}

    @api.get("/controlnet/model_list")
    async def model_list() -> dict[str, list[str]]:
        """The control folders of --controlnet-dir, titled "name [hash]" (read afresh, as the
        extension's default `update=true` rescans)."""
        return {"model_list": await run_in_threadpool(models.titles)}

    @api.get("/controlnet/module_list")
    async def module_list(alias_names: bool = False) -> dict[str, Any]:
        """The preprocessors, by name (or by the extension's UI alias), with their sliders."""
        return module_listing(alias_names)

    @api.get("/controlnet/settings")
    async def control_settings() -> dict[str, int]:
        """The most units one request may hold."""
        return {"control_net_unit_count": MAX_UNITS}

    @api.post("/controlnet/detect", response_model=DetectResponse)
    async def detect_maps(body: DetectRequest) -> DetectResponse:
        """Each image through a preprocessor: the maps a unit with that module would use."""
        return await run_in_threadpool(run_detect, body, input_limit(settings))


def module_listing(alias_names: bool) -> dict[str, Any]:
    """The extension's module_list answer: names (or aliases) and each one's visible sliders."""
    names = [spec.label if alias_names else name for name, spec in PREPROCESSORS.items()]
    detail = {shown: {"model_free": False, "sliders": [_slider_json(slider) for slider in
                                                       (spec.resolution, spec.threshold_a,
                                                        spec.threshold_b) if slider]}
              for shown, spec in zip(names, PREPROCESSORS.values(), strict=True)}
    return {"module_list": names, "module_detail": detail}


def _slider_json(slider: Slider) -> dict[str, Any]:
    return {"name": slider.label, "value": slider.value, "min": slider.minimum,
            "max": slider.maximum, "step": slider.step}


def run_detect(body: DetectRequest, limit: int) -> DetectResponse:
    """The detect route's work (a worker thread's): decode, preprocess, encode."""
    module = module_name(body.controlnet_module, "controlnet_module")
    if not body.controlnet_input_images:
        raise InputError("controlnet_input_images is empty: no image to detect on")
    options = slider_values(module, body.controlnet_processor_res, body.controlnet_threshold_a,
                            body.controlnet_threshold_b)
    maps = []
    for i, data in enumerate(body.controlnet_input_images):
        image = decode_image(data, f"controlnet_input_images[{i}]", limit)
        maps.append(_png(detect(module, image, **options)))
    return DetectResponse(images=maps)


def _png(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def input_limit(settings: ServerSettings) -> int:
    """The most pixels an input image may have on this server (as img2img's init images)."""
    return min(MAX_INPUT_PIXELS, INPUT_PIXELS_FACTOR * settings.max_pixels)


def controlnet_args(scripts: dict[str, Any] | None) -> list[Any] | None:
    """The `args` of the ControlNet entry of `alwayson_scripts`, None when there is none."""
    for title, script in (scripts or {}).items():
        if title.lower() == SCRIPT_TITLE:
            args = script.get("args") if isinstance(script, dict) else None
            if not isinstance(args, list):
                raise InputError(f"alwayson_scripts.{title}.args must be a list of units")
            return args
    return None


def control_units(scripts: dict[str, Any] | None, models: ControlModels, limit: int,
                  init: Image.Image | None = None) -> tuple[ControlUnit, ...]:
    """The enabled units of a body's `alwayson_scripts` as ControlUnits (images decoded: a
    worker thread's job); `init` is img2img's picture, for units without an image."""
    args = controlnet_args(scripts) or []
    if len(args) > MAX_UNITS:
        raise InputError(f"alwayson_scripts.controlnet.args holds {len(args)} units; this "
                         f"server takes at most {MAX_UNITS}")
    units = []
    for i, arg in enumerate(args):
        where = f"alwayson_scripts.controlnet.args[{i}]"
        unit = _unit(_body(arg, where), i, models, limit, init)
        if unit is not None:
            units.append(unit)
    return tuple(units)


def _body(arg: Any, where: str) -> UnitBody:
    if not isinstance(arg, dict):
        raise InputError(f"{where} must be an object (a ControlNet unit)")
    values = {LEGACY_KEYS.get(key, key): value for key, value in arg.items()}
    try:
        return UnitBody.model_validate(values)
    except ValidationError as exc:
        problems = "; ".join(f"{where}.{'.'.join(str(p) for p in error['loc'])}: "
                             f"{error['msg']}" for error in exc.errors())
        raise InputError(problems) from None


def _unit(body: UnitBody, index: int, models: ControlModels, limit: int,
          init: Image.Image | None) -> ControlUnit | None:
    """Unit `index` as a ControlUnit, checked; None for a disabled one or one without a model."""
    where = f"alwayson_scripts.controlnet.args[{index}]"
    if not body.enabled or body.model in (NO_MODEL, ""):
        return None
    module = module_name(body.module, f"{where}.module")
    entry = models.find(body.model)
    image, mask = _images(body, where, limit)
    if image is None:
        if init is None:
            raise InputError(f"{where}: no image (a txt2img ControlNet unit needs one)")
        image = init
    return ControlUnit(model=entry.folder, image=image, mask=mask, module=module,
                       scale=body.weight, start=body.guidance_start, end=body.guidance_end,
                       mode=_mode(body.control_mode, CONTROL_MODES, CONTROL_BY_NUMBER,
                                  f"{where}.control_mode"),
                       resize=_mode(body.resize_mode, RESIZE_MODES, RESIZE_BY_NUMBER,
                                    f"{where}.resize_mode"),
                       pixel_perfect=body.pixel_perfect,
                       **slider_values(module, body.processor_res, body.threshold_a,
                                       body.threshold_b)).validate(index)


def _images(body: UnitBody, where: str, limit: int
            ) -> tuple[Image.Image | None, Image.Image | None]:
    """The unit's image and mask, in each form clients send them."""
    image, mask = body.image, body.mask
    if isinstance(image, dict):
        image, mask = image.get("image"), image.get("mask", mask)
    elif isinstance(image, list):
        if len(image) != 2:
            raise InputError(f"{where}.image: a list must be [image, mask]")
        image, mask = image
    decoded = []
    for name, data in (("image", image), ("mask", mask)):
        if data is not None and not isinstance(data, str):
            raise InputError(f"{where}.{name} must be a base64 image")
        decoded.append(decode_image(data, f"{where}.{name}", limit) if data else None)
    return decoded[0], decoded[1]


def _mode(value: int | str, names: dict[str, str], numbers: tuple[str, ...], what: str) -> str:
    """A mode by its number or its name (the canonical names come first in `names`)."""
    if isinstance(value, int) and 0 <= value < len(numbers):
        return numbers[value]
    if isinstance(value, str) and value in names:
        return names[value]
    shown = list(names)[:len(set(names.values()))]
    raise InputError(f"unknown {what} {value!r}; choose one of: {', '.join(shown)} "
                     "(or 0, 1, 2)")


def module_name(module: str, what: str) -> str:
    """A preprocessor by its name or the extension's alias for it."""
    for name, spec in PREPROCESSORS.items():
        if module in (name, spec.label):
            return name
    raise InputError(f"unknown {what} {module!r}; choose one of: {', '.join(PREPROCESSORS)}")


def slider_values(module: str, processor_res: int, threshold_a: float, threshold_b: float
                  ) -> dict[str, Any]:
    """The processor resolution and thresholds a preprocessor runs with: each given value
    inside its slider's range, else None (the preprocessor's default), as the extension's
    bound check resets them; a slider the preprocessor hides takes nothing."""
    spec = PREPROCESSORS[module]
    values = {}
    for name, value, slider in (("processor_res", processor_res, spec.resolution),
                                ("threshold_a", threshold_a, spec.threshold_a),
                                ("threshold_b", threshold_b, spec.threshold_b)):
        inside = slider is not None and slider.minimum <= value <= slider.maximum
        values[name] = value if inside else None
    return values
