"""A ControlNet unit's control image: read, preprocessed by its module, brought to the output
size by its resize mode, and as the ControlNet graph's `controlnet_cond` (float32 RGB in [0, 1]).

Resize modes are the A1111 ControlNet extension's, by sdrt's names: "resize" (Just Resize:
stretched to the size, Lanczos as diffusers' `VaeImageProcessor` resizes a control image, a map
already that size left as is), "crop" (Crop and Resize, the extension's default: scaled to cover
the size and centre-cropped; runtime/images.py's mode 1) and "fill" (Resize and Fill: scaled to
fit, centred on a background of the map's median border colour, as the extension pads a map so
an edge map's black stays black).
Pixel perfect is the extension's processor resolution for a target: the picture's short side
times the larger of the two target/picture side ratios ("fill": the smaller), rounded.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from sdrt.runtime.control.preprocess import detect, preprocessor
from sdrt.runtime.errors import InputError
from sdrt.runtime.images import fit, read_image, resize

if TYPE_CHECKING:
    from sdrt.runtime.control.unit import ControlUnit

CONTROL_RESIZE_MODES = ("resize", "crop", "fill")
_CROP = 1  # runtime/images.py's A1111 mode index for "crop and resize"


def control_image(unit: ControlUnit, width: int, height: int) -> np.ndarray:
    """(1, 3, height, width) float32 in [0, 1]: the unit's image, preprocessed and resized."""
    if unit.resize not in CONTROL_RESIZE_MODES:
        raise InputError(f"unknown control resize mode {unit.resize!r}; choose one of: "
                         f"{', '.join(CONTROL_RESIZE_MODES)}")
    preprocessor(unit.module)  # an unknown module fails before the image is read
    if unit.image is None:
        raise InputError(f"a ControlNet unit with module {unit.module!r} needs a control image")
    picture = read_image(unit.image, "control image")
    resolution = unit.processor_res
    if unit.pixel_perfect:
        resolution = pixel_perfect_resolution(picture.size, width, height, unit.resize)
    detected = detect(unit.module, picture, processor_res=resolution,
                      threshold_a=unit.threshold_a, threshold_b=unit.threshold_b)
    sized = resize_control(detected, (width, height), unit.resize)
    pixels = np.asarray(sized.convert("RGB")).astype(np.float32) / np.float32(255.0)
    return np.ascontiguousarray(pixels.transpose(2, 0, 1)[None])  # (1, 3, H, W)


def pixel_perfect_resolution(size: tuple[int, int], width: int, height: int, mode: str) -> int:
    """The extension's pixel-perfect processor_res for a `size` (w, h) picture and a target."""
    ratios = (height / size[1], width / size[0])
    k = min(ratios) if mode == "fill" else max(ratios)
    return max(1, round(k * min(size)))


def resize_control(image: Image.Image, size: tuple[int, int], mode: str) -> Image.Image:
    """A map at `size` (w, h) by a control resize mode (module docstring)."""
    if mode == "resize" or image.size == size:
        return fit(image, size)
    if mode == "crop":
        return resize(image, size, _CROP)
    (in_w, in_h), (out_w, out_h) = image.size, size
    k = min(out_w / in_w, out_h / in_h)
    scaled = fit(image, (max(1, round(in_w * k)), max(1, round(in_h * k))))
    pixels = np.asarray(image.convert("RGB"))
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])  # (n, 3)
    colour = np.median(border, axis=0).astype(np.uint8)  # truncated, as the extension's astype
    canvas = Image.new("RGB", size, tuple(int(c) for c in colour))
    canvas.paste(scaled.convert("RGB"), ((out_w - scaled.width) // 2,
                                         (out_h - scaled.height) // 2))
    return canvas
