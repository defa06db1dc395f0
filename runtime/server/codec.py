"""Images in and out of A1111's JSON bodies: base64 PNG (optionally a `data:` URL)."""

from __future__ import annotations

import base64
import binascii
import io
import re
import warnings

from PIL import Image, UnidentifiedImageError

from sdrt.runtime.errors import InputError
from sdrt.runtime.metadata import GenerationInfo, format_parameters, png_info

DATA_URL_PREFIX = re.compile(r"^data:image/[\w.+-]+;base64,")  # what browsers' FileReader give
PILLOW_FORMATS = {"jpg": "JPEG", "jpeg": "JPEG", "webp": "WEBP"}  # A1111's samples_format
EXIF_IFD, USER_COMMENT = 0x8769, 0x9286  # EXIF 2.3: the Exif sub-IFD and its UserComment tag


def encode_png(image: Image.Image, info: GenerationInfo | None = None) -> str:
    """Base64 PNG carrying A1111 `parameters` and sdrt's JSON (never a path: metadata.py)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=png_info(info) if info is not None else None)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def encode_image(image: Image.Image, info: GenerationInfo | None = None, fmt: str = "png", *,
                 quality: int = 80, lossless: bool = False) -> str:
    """Base64 in A1111's `samples_format`: PNG as encode_png, or JPEG / WebP with the
    `parameters` text in EXIF UserComment, as A1111 writes it ("UNICODE\\0" + UTF-16BE)."""
    if fmt.lower() == "png":
        return encode_png(image, info)
    exif = Image.Exif()
    if info is not None:
        exif.get_ifd(EXIF_IFD)[USER_COMMENT] = (b"UNICODE\0" +
                                                format_parameters(info).encode("utf-16-be"))
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format=PILLOW_FORMATS[fmt.lower()], quality=quality,
                              lossless=lossless, exif=exif.tobytes())
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def decode_image(data: str, what: str, max_pixels: int) -> Image.Image:
    """A base64 image from a request, decoded; its header's size is checked before decoding."""
    try:
        raw = base64.b64decode(DATA_URL_PREFIX.sub("", data.strip(), count=1), validate=True)
    except (binascii.Error, ValueError):
        raise InputError(f"{what} is not valid base64") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(raw))
            if image.width * image.height > max_pixels:
                raise InputError(f"{what} is {image.width}×{image.height}: more than "
                                 f"{max_pixels:,} pixels, this server's limit for an input")
            image.load()
    except InputError:
        raise
    except UnidentifiedImageError:
        raise InputError(f"{what} is not an image Pillow can read") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise InputError(f"{what} has too many pixels to decode safely") from None
    except (OSError, SyntaxError, ValueError) as exc:  # truncated or corrupt data
        raise InputError(f"{what} is truncated or corrupt: "
                         f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
                         ) from None
    return image
