"""One ControlNet in a request (the A1111 ControlNet extension's "unit"): which control folder,
which picture, how it is preprocessed and resized, and how strongly and when it steers.

Semantics are diffusers' StableDiffusion(XL)ControlNet(Img2Img)Pipeline's (runtime/control/
apply.py): `scale` is controlnet_conditioning_scale, `start`/`end` control_guidance_start/end
(fractions of the run's model calls), mode "control" is guess_mode; "prompt" is the extension's
"My prompt is more important" (soft injection), "balanced" plain. `resize` is the extension's
resize mode: "resize" (Just Resize), "crop" (Crop and Resize, its default), "fill" (Resize and
Fill). A unit without an image takes an image-to-image request's input picture, as the extension
does; text-to-image needs one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from PIL import Image

from sdrt.runtime.control.preprocess import preprocessor
from sdrt.runtime.errors import InputError
from sdrt.runtime.images import ImageSource

MODES = ("balanced", "prompt", "control")
RESIZE_MODES = ("resize", "crop", "fill")


@dataclass(frozen=True)
class ControlUnit:
    """One ControlNet's settings for a request (module docstring)."""

    model: str | Path  # a control folder, or a model name in the pipeline's control dir
    image: ImageSource | None = None  # None: an image-to-image request's input picture
    module: str = "none"  # the preprocessor (runtime/control/preprocess.py)
    scale: float = 1.0
    start: float = 0.0
    end: float = 1.0
    mode: str = "balanced"
    resize: str = "crop"
    threshold_a: float | None = None  # the module's settings; None: its defaults
    threshold_b: float | None = None
    processor_res: int | None = None
    pixel_perfect: bool = False
    mask: ImageSource | None = None  # inpaint modules only (none shipped)

    def validate(self, index: int = 0) -> ControlUnit:
        """Check each field's type and range; returns self, raises a one-line InputError."""
        what = f"ControlNet unit {index}"
        if not isinstance(self.model, str | Path) or str(self.model).strip() == "":
            raise InputError(f"{what}: model must be a control folder or a model name, got "
                             f"{str(self.model)[:40]!r}")
        for name in ("image", "mask"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str | Path | Image.Image):
                raise InputError(f"{what}: {name} must be a path or a PIL image, got "
                                 f"{type(value).__name__}")
        if not isinstance(self.module, str):
            raise InputError(f"{what}: module must be a name, got {type(self.module).__name__}")
        preprocessor(self.module)  # an unknown module: InputError listing the known ones
        scale = _number(what, "scale", self.scale)
        if not 0 <= scale < math.inf:
            raise InputError(f"{what}: scale must be finite and ≥ 0, got {self.scale}")
        start, end = _number(what, "start", self.start), _number(what, "end", self.end)
        if not 0 <= start < end <= 1:  # diffusers refuses start ≥ end
            raise InputError(f"{what}: guidance start and end must satisfy 0 ≤ start < end ≤ 1, "
                             f"got {self.start} and {self.end}")
        for name, allowed in (("mode", MODES), ("resize", RESIZE_MODES)):
            if getattr(self, name) not in allowed:
                raise InputError(f"{what}: {name} must be one of {', '.join(allowed)}, got "
                                 f"{str(getattr(self, name))[:20]!r}")
        if not isinstance(self.pixel_perfect, bool):
            raise InputError(f"{what}: pixel_perfect must be true or false")
        return self


def _number(what: str, name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InputError(f"{what}: {name} must be a number, got {type(value).__name__}")
    return float(value)


FIELDS = tuple(item.name for item in fields(ControlUnit))


def control_unit(item: ControlUnit | dict[str, Any], index: int = 0) -> ControlUnit:
    """A unit as `Pipeline.generate(controls=[...])` takes it (a ControlUnit or a dict of its
    fields), validated."""
    if isinstance(item, dict):
        unknown = sorted(set(item) - set(FIELDS))
        if unknown:
            raise InputError(f"ControlNet unit {index}: unknown field {unknown[0]!r}; fields: "
                             f"{', '.join(FIELDS)}")
        if "model" not in item:
            raise InputError(f"ControlNet unit {index}: 'model' is required")
        item = ControlUnit(**item)
    if not isinstance(item, ControlUnit):
        raise InputError(f"ControlNet unit {index} must be a ControlUnit or a dict, got "
                         f"{type(item).__name__}")
    return item.validate(index)


def control_units(items: Any) -> tuple[ControlUnit, ...]:
    """A request's `controls` as validated units."""
    if isinstance(items, ControlUnit | dict) or not isinstance(items, tuple | list):
        raise InputError(f"controls must be a list of ControlNet units, got "
                         f"{type(items).__name__}")
    return tuple(control_unit(item, i) for i, item in enumerate(items))
