"""Input pictures and masks for image-to-image, inpainting and outpainting: reading, sizing and
the pixel arithmetic around the model (Pillow and NumPy only).

Reading (`read_image`, `read_mask`): any format Pillow decodes, fully decoded at once so a
truncated file fails here; EXIF orientation applied (`ImageOps.exif_transpose`); transparency
flattened, onto white for a picture (A1111's default img2img background) and onto black for a
mask (transparent = keep). Files over MAX_INPUT_PIXELS are refused before decoding.

Sizing (`output_size`): with no width or height the output is the input's size rounded down to
a multiple of the model's size step (diffusers' `VaeImageProcessor.get_default_height_width`);
with one of them the other follows the input's aspect ratio (to the nearest step); with both,
exactly that size; a size outside [step, MAX_SIDE] is refused, naming the option that fixes it.
The input is then brought to it by one of A1111's resize modes (`resize`), each with Lanczos as
diffusers' image processor resamples: stretched (0, the default), scaled to cover and
centre-cropped (1), or scaled to fit, centred, with the bands left over filled by its stretched
edge rows or columns (2). `fill` is A1111's "fill" masked content: masked pixels replaced by the
colours around them, blurred in from ever smaller radii.

Model arithmetic, as diffusers' `VaeImageProcessor` / its mask processor do it: pixels to
float32 / 255 then 2x − 1; a mask is feathered with Pillow's GaussianBlur (`blur`), binarised at
0.5 for the model, and reduced to the latent grid by nearest-neighbour sampling as
`torch.nn.functional.interpolate` does; `paste_back` is A1111's "apply overlay": the original's
pixels outside the feathered mask, blended with the generated ones across its soft edge.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter, ImageOps, UnidentifiedImageError

from sdrt.runtime.errors import InputError

ImageSource = str | Path | Image.Image
# A 64-megapixel photo is the largest input worth decoding: sdrt's outputs are at most
# MAX_SIDE², and Pillow's own bomb guard (89 MP warning, 179 MP error) is looser than that.
MAX_INPUT_PIXELS = 64_000_000
MASK_THRESHOLD = 0.5  # diffusers' binarize: a mask value ≥ 0.5 (pixel ≥ 128) is repainted
WHITE = (255, 255, 255)
# A1111's resize modes by index; 3 resizes pixels as 0 does (A1111 scales the latents instead)
RESIZE_MODES = ("just resize", "crop and resize", "resize and fill",
                "just resize (latent upscale)")
# (blur radius in pixels, passes) from far to near: distant colours first, near ones over them
FILL_PASSES = ((256, 1), (64, 1), (16, 2), (4, 4), (2, 2), (0, 1))


def read_image(source: ImageSource, what: str = "image") -> Image.Image:
    """An RGB picture: decoded, EXIF-oriented, transparency flattened onto white."""
    return _flatten(_open(source, what), WHITE).convert("RGB")


def read_mask(source: ImageSource, what: str = "mask") -> Image.Image:
    """An 8-bit grey mask (white = repaint): EXIF-oriented, transparency flattened onto black."""
    return _flatten(_open(source, what), (0, 0, 0)).convert("L")


def _open(source: ImageSource, what: str) -> Image.Image:
    if isinstance(source, Image.Image):
        _check_pixels(source.size, what)
        return ImageOps.exif_transpose(source)
    path = Path(source)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                _check_pixels(image.size, f"{what} '{path.name}'")
                image.load()  # decode now: a truncated file fails here, not mid-generation
                return ImageOps.exif_transpose(image)
    except FileNotFoundError:
        raise InputError(f"{what} '{path}' does not exist") from None
    except IsADirectoryError:
        raise InputError(f"{what} '{path}' is a folder, not an image file") from None
    except UnidentifiedImageError:
        raise InputError(f"{what} '{path.name}' is not an image file Pillow can read") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise InputError(f"{what} '{path.name}' has more than {MAX_INPUT_PIXELS:,} pixels, "
                         "sdrt's limit for an input") from None
    except (OSError, SyntaxError, ValueError) as exc:  # truncated or corrupt data
        raise InputError(f"{what} '{path.name}' is truncated or corrupt: "
                         f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
                         ) from None


def _check_pixels(size: tuple[int, int], what: str) -> None:
    if size[0] * size[1] > MAX_INPUT_PIXELS:
        raise InputError(f"{what} is {size[0]}×{size[1]}: more than {MAX_INPUT_PIXELS:,} "
                         "pixels, sdrt's limit for an input")
    if min(size) < 1:
        raise InputError(f"{what} is empty ({size[0]}×{size[1]})")


def _flatten(image: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """The image composited over a solid colour when it has transparency, else unchanged."""
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info
    if not has_alpha:
        return image
    rgba = image.convert("RGBA")
    return Image.alpha_composite(Image.new("RGBA", rgba.size, (*background, 255)), rgba)


def output_size(size: tuple[int, int], width: int | None, height: int | None, step: int,
                max_side: int) -> tuple[int, int]:
    """The (width, height) an input of `size` is worked at (module docstring's rule)."""
    in_w, in_h = size
    for name, side in (("width", width), ("height", height)):
        if side is not None and (isinstance(side, bool) or not isinstance(side, int)
                                 or not step <= side <= max_side):
            raise InputError(f"{name} must be between {step} and {max_side}, got {side!r}")
    if width is not None and height is not None:
        return width, height
    if width is not None or height is not None:  # the other side follows the aspect ratio
        out = ((width, max(step, round(width * in_h / in_w / step) * step)) if width is not None
               else (max(step, round(height * in_w / in_h / step) * step), height))
        if max(out) > max_side:  # checked before resizing: a 1×300 input at width 2048 …
            raise InputError(f"the image is {in_w}×{in_h}: at {out[0]}×{out[1]} it would pass "
                             f"the {max_side}-pixel side limit; pass both --width and --height")
        return out
    out = (in_w - in_w % step, in_h - in_h % step)
    if min(out) < step:
        raise InputError(f"the image is {in_w}×{in_h}: sides must be at least {step} pixels")
    if max(out) > max_side:
        raise InputError(f"the image is {in_w}×{in_h}, over the {max_side}-pixel side limit: "
                         "pass --width/--height (width=, height=) to scale it down")
    return out


def fit(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """`image` at `size`, resized with Lanczos when it differs (diffusers' resample)."""
    return image if image.size == size else image.resize(size, Image.Resampling.LANCZOS)


def resize(image: Image.Image, size: tuple[int, int], mode: int = 0) -> Image.Image:
    """`image` (RGB or L) at `size` by A1111 resize mode `mode` (module docstring)."""
    if mode in (0, 3) or image.size == size:
        return fit(image, size)
    (in_w, in_h), (out_w, out_h) = image.size, size
    wider = out_w * in_h > out_h * in_w  # the target is wider than the picture
    if (mode == 1) == wider:  # match the width: crop rows (1) or leave bands above/below (2)
        scaled = (out_w, max(1, in_h * out_w // in_w))
    else:
        scaled = (max(1, in_w * out_h // in_h), out_h)
    picture = np.asarray(fit(image, scaled))
    left, top = scaled[0] // 2 - out_w // 2, scaled[1] // 2 - out_h // 2  # ≤ 0 for mode 2
    if mode == 1:
        return Image.fromarray(picture[top:top + out_h, left:left + out_w])
    # mode 2: edge rows/columns stretched over the bands (np.take clamps indices to the edge)
    rows = np.clip(np.arange(out_h) + top, 0, scaled[1] - 1)
    cols = np.clip(np.arange(out_w) + left, 0, scaled[0] - 1)
    return Image.fromarray(picture[np.ix_(rows, cols)])


def fill(image: Image.Image, mask: Image.Image) -> Image.Image:
    """The picture with its masked pixels (L mask, white = masked, soft edges weighted) replaced
    by the colours around them: per pass, the kept pixels blurred with premultiplied alpha (so
    the blur averages kept colours only) are laid over what earlier, wider passes left."""
    kept = image.convert("RGBA")
    kept.putalpha(ImageOps.invert(mask.convert("L")))
    premultiplied = kept.convert("RGBa")
    out = Image.new("RGBA", image.size)
    for radius, passes in FILL_PASSES:
        layer = premultiplied.filter(ImageFilter.GaussianBlur(radius)) if radius else premultiplied
        layer = layer.convert("RGBA")  # back to straight alpha: colour = blurred sum / weight
        for _ in range(passes):
            out.alpha_composite(layer)
    return out.convert("RGB")


def to_model(image: Image.Image) -> np.ndarray:
    """(1, 3, H, W) float32 in [-1, 1], diffusers' arithmetic (x / 255, then 2x − 1)."""
    pixels = np.asarray(image.convert("RGB")).astype(np.float32) / np.float32(255.0)
    return (np.float32(2.0) * pixels - np.float32(1.0)).transpose(2, 0, 1)[None]


def blur(mask: Image.Image, radius: float) -> Image.Image:
    """The mask feathered by a Gaussian of `radius` pixels (diffusers' `VaeImageProcessor.blur`,
    A1111's mask blur); 0 leaves it as is."""
    return mask.filter(ImageFilter.GaussianBlur(radius)) if radius > 0 else mask


def binarize(mask: Image.Image) -> np.ndarray:
    """(H, W) float32 of 0 and 1: where the model repaints (value / 255 ≥ 0.5)."""
    values = np.asarray(mask.convert("L")).astype(np.float32) / np.float32(255.0)
    return (values >= MASK_THRESHOLD).astype(np.float32)


def to_latent_grid(mask: np.ndarray, height: int, width: int) -> np.ndarray:
    """An (H, W) mask sampled at (height, width) by nearest neighbour, as torch's
    `interpolate(mode="nearest")` picks the source index floor(i · in / out) in float32."""
    rows = _nearest(mask.shape[0], height)
    cols = _nearest(mask.shape[1], width)
    return mask[np.ix_(rows, cols)]


def _nearest(size_in: int, size_out: int) -> np.ndarray:
    scale = np.float32(size_in / size_out)
    index = np.floor(np.arange(size_out, dtype=np.float32) * scale).astype(np.int64)
    return np.minimum(index, size_in - 1)


def check_mask(repaint: np.ndarray, latent: np.ndarray, step: int) -> None:
    """Refuse masks that leave nothing to repaint, or nothing to keep (one-line reasons)."""
    if not repaint.any():
        raise InputError("the mask is empty: no pixel is white (≥ 128) where the image should "
                         "be repainted")
    if repaint.all():
        raise InputError("the mask covers the whole image: nothing is kept, so use "
                         "`sdrt generate` or `sdrt img2img` instead")
    if not latent.any():
        raise InputError(f"the mask is too small: the model sees one pixel in each {step}×{step}"
                         " block and none of those is masked; enlarge it or raise --mask-blur")


def paste_back(generated: Image.Image, original: Image.Image, alpha: Image.Image) -> Image.Image:
    """The original outside the feathered mask `alpha` (L), generated pixels inside, blended
    across the soft edge: A1111's "apply overlay" (diffusers' `apply_overlay`)."""
    a = np.asarray(alpha.convert("L")).astype(np.float32)[..., None] / np.float32(255.0)
    new = np.asarray(generated.convert("RGB")).astype(np.float32)
    old = np.asarray(original.convert("RGB")).astype(np.float32)
    return Image.fromarray(np.round(old + (new - old) * a).astype(np.uint8))


def dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """Binary dilation of an (H, W) bool mask by a (2r+1)² square (separable max)."""
    if radius <= 0:
        return mask.copy()
    out = mask.copy()
    for axis in (0, 1):
        padded = np.pad(out, [(radius, radius) if a == axis else (0, 0) for a in (0, 1)])
        windows = np.lib.stride_tricks.sliding_window_view(padded, 2 * radius + 1, axis=axis)
        out = windows.any(axis=-1)
    return out


def ceil_to(value: int, step: int) -> int:
    """`value` rounded up to a multiple of `step`."""
    return int(math.ceil(value / step) * step)
