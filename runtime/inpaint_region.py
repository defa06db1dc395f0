"""A1111's "Only masked" inpaint area (`inpaint_full_res`): the model works on a crop around the
mask at the full working size, and the result goes back into the picture at its own size.

The crop is the bounding box of the feathered mask's non-zero pixels grown by `padding` pixels
on each side (clipped to the picture), then widened or heightened about its centre to the
working size's aspect ratio, shifted back inside the picture where it overhangs (and clipped
where the picture is too small for it). The crop is brought to the working size by resize mode
2 ("resize and fill"); the generated picture returns to the crop's size by mode 1 ("crop and
resize"), is pasted into a copy of the picture, and with the overlay the picture's own pixels
are blended back outside the feathered mask, so everything outside it is unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from sdrt.runtime import images
from sdrt.runtime.errors import InputError

Box = tuple[int, int, int, int]  # (left, top, right, bottom), right/bottom exclusive (Pillow)


def mask_box(mask: Image.Image, padding: int) -> Box:
    """The bounding box of the mask's non-zero pixels, `padding` pixels wider on each side,
    clipped to the mask."""
    values = np.asarray(mask.convert("L"))  # (H, W)
    rows, cols = np.flatnonzero(values.any(axis=1)), np.flatnonzero(values.any(axis=0))
    if rows.size == 0:
        raise InputError("the mask is empty: no pixel is white (≥ 128) where the image should "
                         "be repainted")
    width, height = mask.size
    return (max(int(cols[0]) - padding, 0), max(int(rows[0]) - padding, 0),
            min(int(cols[-1]) + 1 + padding, width), min(int(rows[-1]) + 1 + padding, height))


def _grow(low: int, high: int, length: int, limit: int) -> tuple[int, int]:
    """[low, high) grown about its centre to `length`, moved inside [0, limit), then clipped."""
    extra = length - (high - low)
    low, high = low - extra // 2, high + extra - extra // 2
    shift = max(0, high - limit)  # overhangs the far edge: move back
    low, high = low - shift, high - shift
    if low < 0:  # overhangs the near edge: move forward
        low, high = 0, high - low
    return low, min(high, limit)


def fit_aspect(box: Box, size: tuple[int, int], picture: tuple[int, int]) -> Box:
    """`box` grown along one side to the aspect ratio of `size` (width, height), inside
    `picture`'s (width, height) where it fits."""
    left, top, right, bottom = box
    width, height = right - left, bottom - top
    if width * size[1] > height * size[0]:  # wider than the working size: add rows
        top, bottom = _grow(top, bottom, int(width * size[1] / size[0]), picture[1])
    else:
        left, right = _grow(left, right, int(height * size[0] / size[1]), picture[0])
    return left, top, right, bottom


@dataclass(frozen=True)
class Region:
    """The part of a picture an "Only masked" inpainting works on, and how it goes back."""

    picture: Image.Image  # RGB, the whole input picture at its own size
    mask: Image.Image  # L, the feathered mask at the picture's size (the overlay's alpha)
    box: Box

    @classmethod
    def around(cls, picture: Image.Image, mask: Image.Image, padding: int,
               size: tuple[int, int]) -> Region:
        """The region of `picture` around `mask` (same size) for work at `size`."""
        return cls(picture, mask, fit_aspect(mask_box(mask, padding), size, picture.size))

    def crop(self, image: Image.Image, size: tuple[int, int]) -> Image.Image:
        """`image` (the picture or its mask) cut to the region and sized for the model."""
        return images.resize(image.crop(self.box), size, 2)

    def paste(self, generated: Image.Image, overlay: bool = True) -> Image.Image:
        """The picture at its own size with `generated` (at the working size) in the region;
        with `overlay`, its own pixels blended back outside the feathered mask."""
        left, top, right, bottom = self.box
        out = self.picture.copy()
        out.paste(images.resize(generated.convert("RGB"), (right - left, bottom - top), 1),
                  (left, top))
        return images.paste_back(out, self.picture, self.mask) if overlay else out
