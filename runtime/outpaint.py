"""Outpainting: a larger canvas around a picture, its new area painted by inpainting.

1. Canvas: the picture with `left/right/top/bottom` pixels added; the right and bottom grow a
   little more, up to the model's size step, and are cropped off at the end.
2. Pre-fill: the new area takes the picture's edge pixels stretched outwards ("edge") or its
   mirror image ("mirror"), Gaussian-blurred; inpainting starts from it when strength < 1.
3. Mask: the new area plus a band of SEAM_BAND pixels (at least `2 × mask_blur`) into the
   picture, so the seam is repainted too, then feathered by `mask_blur`.
4. Windows: a canvas wider or taller than the model's native size is painted in windows of that
   size overlapping by WINDOW_OVERLAP of a side, nearest the picture first; each window
   inpaints what is still unpainted (grown by the band, never past the mask) with what is
   already painted around it as context, and is pasted back through its feathered mask, which
   blends the seams (faded out towards the window's inner edges over what was painted before).

Each image keeps one generator (seed + i) from window to window.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageFilter

from sdrt.runtime import images
from sdrt.runtime.errors import InputError
from sdrt.runtime.img2img import DEFAULT_INPAINT_STRENGTH, DEFAULT_MASK_BLUR, ImageInput
from sdrt.runtime.img2img import check_strength as _check_strength
from sdrt.runtime.rng import make_generator

if TYPE_CHECKING:
    from sdrt.runtime.metadata import GenerationInfo
    from sdrt.runtime.pipeline import GeneratedImage, GenerationRequest, Pipeline, StepCallback
    from sdrt.runtime.rng import NoiseGenerator

FILLS = ("edge", "mirror")
SEAM_BAND = 8  # pixels of the picture repainted along the seam (at least; 2 × mask blur if more)
FILL_BLUR_FRACTION = 0.25  # the pre-fill's Gaussian radius, as a fraction of the widest side added
# Neighbouring windows share this fraction of a side: room for the seam band and some painted
# context (16 px of a 64 px window, 128 of 512), with fewer windows than half overlap needs.
WINDOW_OVERLAP = 0.25
Box = tuple[int, int, int, int]  # left, top, right, bottom (Pillow's crop box)


@dataclass(frozen=True)
class Extension:
    """Pixels to add on each side of the picture."""

    left: int = 0
    right: int = 0
    top: int = 0
    bottom: int = 0

    def validate(self, max_side: int) -> Extension:
        for side in ("left", "right", "top", "bottom"):
            value = getattr(self, side)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= max_side:
                raise InputError(f"{side} must be a whole number of pixels between 0 and "
                                 f"{max_side}, got {value!r}")
        if not any((self.left, self.right, self.top, self.bottom)):
            raise InputError("outpainting needs at least one of left, right, top, bottom > 0")
        return self


def extend(picture: Image.Image, ext: Extension, *, step: int, band: int, fill: str
           ) -> tuple[Image.Image, np.ndarray, tuple[int, int]]:
    """(canvas pre-filled, (H, W) bool mask of new area + band, output size); the canvas is the
    output size grown on the right and bottom to multiples of `step`."""
    if fill not in FILLS:
        raise InputError(f"unknown fill {fill!r}; choose one of: {', '.join(FILLS)}")
    w, h = picture.size
    out = (w + ext.left + ext.right, h + ext.top + ext.bottom)
    size = (images.ceil_to(out[0], step), images.ceil_to(out[1], step))
    pads = ((ext.top, size[1] - h - ext.top), (ext.left, size[0] - w - ext.left), (0, 0))
    mode = "edge" if fill == "edge" else "symmetric"
    padded = Image.fromarray(np.pad(np.asarray(picture), pads, mode=mode))
    radius = max(1.0, FILL_BLUR_FRACTION * max(ext.left, ext.right, ext.top, ext.bottom))
    canvas = padded.filter(ImageFilter.GaussianBlur(radius))
    canvas.paste(picture, (ext.left, ext.top))
    keep = np.zeros((size[1], size[0]), dtype=bool)  # the picture less the band on each seam
    keep[ext.top + (band if ext.top else 0): ext.top + h - (band if ext.bottom else 0),
         ext.left + (band if ext.left else 0): ext.left + w - (band if ext.right else 0)] = True
    return canvas, ~keep, out


def plan_windows(size: tuple[int, int], window: int, step: int, picture: Box) -> list[Box]:
    """Windows of at most `window` pixels a side covering the canvas, overlapping by
    WINDOW_OVERLAP, ordered nearest the picture first (centre distance to the picture's box)."""
    xs = _positions(size[0], window, step)
    ys = _positions(size[1], window, step)
    ww, wh = min(window, size[0]), min(window, size[1])
    boxes = [(x, y, x + ww, y + wh) for y in ys for x in xs]

    def distance(box: Box) -> float:
        cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
        dx = max(picture[0] - cx, 0, cx - picture[2])
        dy = max(picture[1] - cy, 0, cy - picture[3])
        return math.hypot(dx, dy)

    return sorted(boxes, key=distance)


def _positions(length: int, window: int, step: int) -> list[int]:
    if length <= window:
        return [0]
    count = math.ceil((length - window) / (window * (1 - WINDOW_OVERLAP))) + 1
    return sorted({int(round(p / step)) * step for p in np.linspace(0, length - window, count)})


def outpaint(pipe: Pipeline, image: images.ImageSource, prompt: str, ext: Extension, *,
             strength: float = DEFAULT_INPAINT_STRENGTH, mask_blur: float = DEFAULT_MASK_BLUR,
             fill: str = "edge", callback: StepCallback | None = None,
             **options) -> list[GeneratedImage]:
    """Outpaint `image` by `ext` (module docstring); options are GenerationRequest fields."""
    from sdrt.runtime.pipeline import MAX_SIDE, GeneratedImage, GenerationRequest

    strength = _check_strength(strength)
    if isinstance(mask_blur, bool) or not isinstance(mask_blur, int | float) \
            or not 0 <= mask_blur <= MAX_SIDE:
        raise InputError(f"mask blur must be a number of pixels between 0 and {MAX_SIDE}, "
                         f"got {mask_blur!r}")
    ext.validate(MAX_SIDE)
    step = max(8, pipe.facts.vae_scale_factor)
    picture = images.read_image(image)
    band = max(SEAM_BAND, math.ceil(2 * mask_blur))
    if band * 2 >= min(picture.size):
        raise InputError(f"the image is {picture.width}×{picture.height}: outpainting needs "
                         f"sides over {2 * band} pixels (twice the seam band)")
    canvas, mask, out = extend(picture, ext, step=step, band=band, fill=fill)
    if max(canvas.size) > MAX_SIDE:
        raise InputError(f"the outpainted canvas would be {out[0]}×{out[1]}, over the "
                         f"{MAX_SIDE}-pixel side limit")
    req = GenerationRequest(prompt=prompt, width=canvas.width, height=canvas.height,
                            **options).resolve(pipe.facts, pipe.scheduler)
    box = (ext.left, ext.top, ext.left + picture.width, ext.top + picture.height)
    windows = plan_windows(canvas.size, pipe.facts.default_size, step, box)
    painter = _Painter(pipe, strength, float(mask_blur), band, callback)
    results = []
    for i in range(req.num_images):
        one = replace(req, seed=req.seed + i, num_images=1)
        painted, info = painter.paint(canvas, mask, windows, one,
                                      [make_generator(req.generator, one.seed)])
        results.append(GeneratedImage(painted.crop((0, 0, *out)),
                                      replace(info, width=out[0], height=out[1])))
    return results


@dataclass(frozen=True)
class _Painter:
    """Paints one canvas window by window (step 4 of the module docstring)."""

    pipe: Pipeline
    strength: float
    mask_blur: float
    band: int
    callback: StepCallback | None

    def paint(self, canvas: Image.Image, mask: np.ndarray, windows: list[Box],
              req: GenerationRequest, generators: list[NoiseGenerator]
              ) -> tuple[Image.Image, GenerationInfo]:
        """The canvas with every window painted, and the last window's metadata."""
        canvas = canvas.copy()
        todo = mask.copy()
        info = None
        for box in windows:
            left, top, right, bottom = box
            pending = todo[top:bottom, left:right]
            if not pending.any():
                continue
            repaint = images.dilate(pending, self.band) & mask[top:bottom, left:right]
            feathered = images.blur(Image.fromarray(repaint.astype(np.uint8) * 255),
                                    self.mask_blur)
            before = canvas.crop(box)
            init = ImageInput(before, self.strength, feathered, self.mask_blur, paste_back=False)
            window_req = replace(req, width=right - left, height=bottom - top)
            (done,) = self.pipe.run_resolved(window_req, generators, init, self.callback)
            # Over pixels painted before, fade out towards the window's inner edges: a decoded
            # window's outermost pixels carry the VAE's border artefacts.
            weight = np.where(pending, 1.0, _edge_ramp(box, canvas.size, self.band))
            alpha = np.round(np.asarray(feathered, dtype=np.float64) * weight)
            canvas.paste(images.paste_back(done.image, before,
                                           Image.fromarray(alpha.astype(np.uint8))), box[:2])
            todo[top:bottom, left:right] = False
            info = done.info
        return canvas, info


def _edge_ramp(box: Box, size: tuple[int, int], width: int) -> np.ndarray:
    """(h, w) weights of a window: 0 on its edges that lie inside the canvas, rising linearly
    to 1 over `width` pixels; 1 along the canvas's own edges."""
    left, top, right, bottom = box

    def ramp(length: int, inner_start: bool, inner_end: bool) -> np.ndarray:
        index = np.arange(length, dtype=np.float64)
        out = np.ones(length)
        if inner_start:
            out = np.minimum(out, index / width)
        if inner_end:
            out = np.minimum(out, (length - 1 - index) / width)
        return np.clip(out, 0.0, 1.0)

    rows = ramp(bottom - top, top > 0, bottom < size[1])
    cols = ramp(right - left, left > 0, right < size[0])
    return rows[:, None] * cols[None, :]
