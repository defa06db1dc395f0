"""Generation metadata: AUTOMATIC1111's "parameters" infotext (`processing.create_infotext`,
`infotext_utils.parse_generation_parameters`) and PNGs that carry it.

Text layout (A1111's `processing.create_infotext`)::

    {prompt}
    Negative prompt: {negative_prompt}      <- only when the negative prompt is non-empty
    Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 42, Size: 512x512, Model hash: ..., ...

Key order is A1111's (`A1111_KEY_ORDER`). Keys in `GenerationInfo.extra` that A1111 itself
defines (e.g. "Schedule type", "VAE", "Clip skip", "RNG", "Tiling") take A1111's position; the
others follow the fixed keys in the order given, as A1111 appends `extra_generation_params`; then
"Version" and "User" close the line. Keys whose value is None are left out.

A PNG gets the text as a `parameters` chunk (tEXt when latin-1 encodable, else iTXt, as Pillow
and A1111 decide) and the same facts as JSON under the `sdrt` keyword, because the A1111 text is
lossy (lines are stripped, a value spelt `"x"` reads back as `x`); the JSON also says why backend
and precision "auto" chose what ran ("Backend" and "Precision" in both). Neither ever holds a path.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, PngImagePlugin

from sdrt.runtime.errors import InputError, ModelError

logger = logging.getLogger(__name__)

# A1111's `generation_params` order (v1.10, plus "NGMS" from older releases), extras go after it.
A1111_KEY_ORDER = (
    "Steps",
    "Sampler",
    "Schedule type",
    "CFG scale",
    "Image CFG scale",
    "Seed",
    "Face restoration",
    "Size",
    "Model hash",
    "Model",
    "FP8 weight",
    "Cache FP16 weight for LoRA",
    "VAE hash",
    "VAE",
    "Variation seed",
    "Variation seed strength",
    "Seed resize from",
    "Denoising strength",
    "Conditional mask weight",
    "Clip skip",
    "ENSD",
    "Token merging ratio",
    "Token merging ratio hr",
    "Init image hash",
    "RNG",
    "NGMS",
    "Tiling",
)
# A1111 writes these after every extra parameter.
A1111_TRAILING_KEYS = ("Version", "User")
# Keys GenerationInfo fills from its own fields; `extra` may not set them too.
FIELD_KEYS = frozenset(
    {"Steps", "Sampler", "CFG scale", "Seed", "Size", "Model hash", "Model", "Denoising strength"}
)

# parse_parameters' keys for the two prompt texts, so `extra` may not use them.
PROMPT_KEYS = ("prompt", "negative_prompt")

# A1111's `re_param`: one `key: value` pair of the last line; a value is a JSON string or runs to
# the next comma.
RE_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
# A1111's `re_imagesize`: such a value becomes "{key}-1" and "{key}-2" ("Size-1" is the width).
RE_IMAGESIZE = re.compile(r"^(\d+)x(\d+)$")
# A key the parser can read back: what RE_PARAM's key group matches, whole.
RE_KEY = re.compile(r"\w[\w \-/]+")
NEGATIVE_PREFIX = "Negative prompt:"
# A1111 treats the last line as parameters only when RE_PARAM matches it at least this often.
MIN_PARAMS_ON_LAST_LINE = 3

PARAMETERS_KEYWORD = "parameters"
JSON_KEYWORD = "sdrt"
JSON_SCHEMA = "sdrt.generation/1"
HASH_CHUNK_BYTES = 1 << 20  # model files are GBs: hash in 1 MiB reads, never whole
AUTOV2_HEX_CHARS = 10  # A1111's "Model hash" (AutoV2) is the first 10 hex chars of the sha256
MAX_SEED = 2**64 - 1

ExtraValue = str | int | float | bool | None


@dataclass(frozen=True)
class GenerationInfo:
    """What made one image: the fields of A1111's infotext plus free-form `extra` pairs."""

    prompt: str
    negative_prompt: str
    steps: int
    sampler: str
    cfg_scale: float
    seed: int
    width: int
    height: int
    model_name: str | None = None
    model_hash: str | None = None
    denoising_strength: float | None = None  # image-to-image only
    extra: Mapping[str, ExtraValue] = field(default_factory=dict, hash=False)
    choice: str | None = None  # why "auto" ran this backend and precision (JSON only)

    def __post_init__(self) -> None:
        for name in ("prompt", "negative_prompt", "sampler"):
            _check_str(name, getattr(self, name))
        _check_int("steps", self.steps, 1)
        _check_int("seed", self.seed, 0, MAX_SEED)
        _check_int("width", self.width, 1)
        _check_int("height", self.height, 1)
        _check_number("cfg_scale", self.cfg_scale)
        if self.denoising_strength is not None:
            _check_number("denoising_strength", self.denoising_strength)
        if self.model_name is not None:
            _check_str("model_name", self.model_name)
            _check_not_a_path("model_name", self.model_name)
        if self.choice is not None:
            _check_str("choice", self.choice)
        if self.model_hash is not None:
            _check_str("model_hash", self.model_hash)
            if not re.fullmatch(r"[0-9a-fA-F]{8,64}", self.model_hash):
                raise InputError(f"model_hash must be 8-64 hex digits, got {self.model_hash!r}")
        # A private copy: a frozen record must not change when the caller's dict does.
        object.__setattr__(self, "extra", _checked_extra(self.extra))

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict of every field (the `sdrt` PNG chunk's content)."""
        return {"schema": JSON_SCHEMA, **dataclasses.asdict(self), "extra": dict(self.extra)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> GenerationInfo:
        """Inverse of `to_dict`; unknown keys are ignored so newer files still load."""
        names = {f.name for f in dataclasses.fields(cls)}
        try:
            return cls(**{k: v for k, v in data.items() if k in names})
        except TypeError as exc:  # a required field is missing
            raise InputError(f"generation info is incomplete: {exc}") from None


def _check_str(name: str, value: object) -> None:
    if not isinstance(value, str):
        raise InputError(f"{name} must be a str, got {type(value).__name__}")


def _check_int(name: str, value: object, low: int, high: int | None = None) -> None:
    # bool is an int subclass; True as a step count is a bug, not a 1.
    if isinstance(value, bool) or not isinstance(value, int):
        raise InputError(f"{name} must be an int, got {type(value).__name__}")
    if value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise InputError(f"{name} must be {bound}, got {value}")


def _check_number(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InputError(f"{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise InputError(f"{name} must be finite, got {value}")


def _check_not_a_path(name: str, value: str) -> None:
    """Refuse what looks like a filesystem path: images are shared, paths leak user names."""
    # A hub id ("org/name") is fine; anything absolute, home-relative, with a backslash, a
    # drive letter, a "." / ".." segment or more than one "/" is taken for a path.
    parts = value.split("/")
    if (
        value.startswith(("/", "~"))
        or "\\" in value
        or re.match(r"^[A-Za-z]:", value)
        or len(parts) > 2
        or any(p in (".", "..") for p in parts)
    ):
        raise InputError(f"{name} must be a model name or hub id, not a filesystem path")


def _checked_extra(extra: object) -> dict[str, ExtraValue]:
    if not isinstance(extra, Mapping):
        raise InputError(f"extra must be a mapping, got {type(extra).__name__}")
    out: dict[str, ExtraValue] = {}
    for key, value in extra.items():
        if not isinstance(key, str) or not RE_KEY.fullmatch(key):
            # Anything else could not be read back by A1111's parser (and Civitai's).
            raise InputError(
                f"extra key {key!r} must be 2+ letters, digits, '_', ' ', '-' or '/', "
                "starting with a letter, digit or '_'"
            )
        if key in FIELD_KEYS:
            raise InputError(f"extra key {key!r} duplicates a GenerationInfo field; set that")
        if key in PROMPT_KEYS:
            raise InputError(f"extra key {key!r} is reserved for the parsed prompt text")
        if isinstance(value, float) and not math.isfinite(value):
            raise InputError(f"extra[{key!r}] must be finite, got {value}")
        if value is not None and not isinstance(value, str | int | float):
            raise InputError(
                f"extra[{key!r}] must be str, int, float, bool or None, got {type(value).__name__}"
            )
        if key == "VAE" and isinstance(value, str):
            _check_not_a_path("extra['VAE']", value)
        out[key] = value
    return out


def format_value(value: ExtraValue) -> str:
    """A value as A1111 prints it: str(), but a whole-number float without ".0" (`CFG scale: 7`)."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def quote(text: str) -> str:
    """A1111's `infotext_utils.quote`: JSON-quote a value holding ',', ':' or a newline."""
    if "," not in text and "\n" not in text and ":" not in text:
        return text
    # A1111 json.dumps the raw value; dumping its str() is the same for strings and keeps a
    # non-string with a comma readable as one value.
    return json.dumps(text, ensure_ascii=False)


def parameter_items(info: GenerationInfo) -> list[tuple[str, str]]:
    """The (key, formatted value) pairs of the parameters line, in A1111's order, None omitted."""
    values: dict[str, ExtraValue] = {
        "Steps": info.steps,
        "Sampler": info.sampler,
        "CFG scale": info.cfg_scale,
        "Seed": info.seed,
        "Size": f"{info.width}x{info.height}",
        "Model hash": info.model_hash,
        "Model": info.model_name,
        "Denoising strength": info.denoising_strength,
        **info.extra,
    }
    fixed = [k for k in A1111_KEY_ORDER if k in values]
    trailing = [k for k in A1111_TRAILING_KEYS if k in values]
    others = [k for k in info.extra if k not in A1111_KEY_ORDER and k not in A1111_TRAILING_KEYS]
    return [
        (key, format_value(values[key]))
        for key in (*fixed, *others, *trailing)
        if values[key] is not None
    ]


def format_parameters(info: GenerationInfo) -> str:
    """The A1111 "parameters" text of `info` (`processing.create_infotext`'s layout)."""
    params = ", ".join(k if k == v else f"{k}: {quote(v)}" for k, v in parameter_items(info))
    negative = f"\n{NEGATIVE_PREFIX} {info.negative_prompt}" if info.negative_prompt else ""
    return f"{info.prompt}{negative}\n{params}".strip()


def parse_parameters(text: str) -> dict[str, str]:
    """A1111 "parameters" text → {"prompt", "negative_prompt", key: value, ...}, all str."""
    # Follows `parse_generation_parameters`: the last line holds the parameters only if it has
    # at least three `key: value` pairs; lines from the one starting "Negative prompt:" on are
    # the negative prompt; a `WxH` value becomes key-1 / key-2 (Size-1 = width). Unlike A1111,
    # it takes "\r\n" line ends and strips unquoted values, and adds no defaults (A1111 reads a
    # missing "Clip skip" as 1 and a missing "RNG" as "GPU").
    *lines, last = text.replace("\r\n", "\n").strip().split("\n")
    if len(RE_PARAM.findall(last)) < MIN_PARAMS_ON_LAST_LINE:
        lines.append(last)
        last = ""
    prompt, negative, in_negative = "", "", False
    for line in lines:
        line = line.strip()
        if line.startswith(NEGATIVE_PREFIX):
            in_negative = True
            line = line[len(NEGATIVE_PREFIX) :].strip()
        # A1111 joins with "\n" only once the text is non-empty, so leading blank lines vanish.
        if in_negative:
            negative += ("\n" if negative else "") + line
        else:
            prompt += ("\n" if prompt else "") + line
    params: dict[str, str] = {}
    for key, raw in RE_PARAM.findall(last):
        value = _unquote(raw.strip())
        size = RE_IMAGESIZE.match(value)
        if size:
            params[f"{key}-1"], params[f"{key}-2"] = size.group(1), size.group(2)
        else:
            params[key] = value
    # The prompt texts win over a stray "prompt: ..." pair on the parameters line.
    return {"prompt": prompt, "negative_prompt": negative} | {
        k: v for k, v in params.items() if k not in PROMPT_KEYS
    }


def _unquote(text: str) -> str:
    """A1111's `unquote`: a JSON string literal's content, anything else as is."""
    if len(text) < 2 or text[0] != '"' or text[-1] != '"':
        return text
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return text
    return value if isinstance(value, str) else text


def png_info(info: GenerationInfo) -> PngImagePlugin.PngInfo:
    """PNG text chunks: `parameters` (A1111) and `sdrt` (lossless JSON)."""
    chunks = PngImagePlugin.PngInfo()
    # Pillow writes tEXt when the text is latin-1 encodable and iTXt (UTF-8) otherwise, the
    # choice A1111 makes too; Civitai reads tEXt most reliably, so it is kept where possible.
    chunks.add_text(PARAMETERS_KEYWORD, format_parameters(info))
    # ASCII-escaped JSON is latin-1, so it is always tEXt and survives any reader's decoding.
    payload = json.dumps(info.to_dict(), ensure_ascii=True, allow_nan=False)
    chunks.add_text(JSON_KEYWORD, payload)
    return chunks


def save_png(image: Image.Image, path: str | Path, info: GenerationInfo | None = None) -> None:
    """Write `image` as PNG with A1111 + JSON metadata (none when `info` is None), atomically."""
    if not isinstance(image, Image.Image):
        raise InputError(f"image must be a PIL.Image.Image, got {type(image).__name__}")
    path = Path(path)
    if not path.parent.is_dir():
        raise InputError(f"output folder does not exist: {path.parent}")
    pnginfo = png_info(info) if info is not None else None
    # Written to a temporary file beside the target and renamed over it: a crash or Ctrl-C
    # mid-write leaves the old file (or none), never half a PNG under the final name.
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    # os.open with 0o666 honours the umask, unlike tempfile's private 0o600 files.
    fd = os.open(tmp, flags, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            image.save(f, format="PNG", pnginfo=pnginfo)
            f.flush()
            os.fsync(f.fileno())  # the bytes are on disk before the name points at them
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    """Persist the rename itself; best effort, as Windows cannot open a directory."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load_info(source: str | Path | Image.Image) -> GenerationInfo | None:
    """The GenerationInfo from a PNG's `sdrt` chunk; None if absent or unreadable."""
    if isinstance(source, Image.Image):
        text = source.info.get(JSON_KEYWORD)
    else:
        with Image.open(source) as image:
            text = image.info.get(JSON_KEYWORD)
    if not isinstance(text, str):
        return None
    try:
        data = json.loads(text)
        if not isinstance(data, dict) or data.get("schema") != JSON_SCHEMA:
            raise ValueError(f"schema is not {JSON_SCHEMA}")
        return GenerationInfo.from_dict(data)
    except (ValueError, InputError) as exc:
        # Someone else's chunk under our keyword, or a newer schema: not worth failing a read.
        logger.warning("ignoring unreadable %r PNG chunk: %s", JSON_KEYWORD, exc)
        return None


def model_hash(path: str | Path) -> str:
    """A1111's AutoV2 model hash: the first 10 hex chars of the file's sha256, read in chunks."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"cannot hash {path}: not a file")
    digest = hashlib.sha256()
    buffer = bytearray(HASH_CHUNK_BYTES)
    view = memoryview(buffer)
    try:
        with path.open("rb") as f:
            while n := f.readinto(buffer):
                digest.update(view[:n])
    except OSError as exc:
        raise ModelError(f"cannot hash {path}: {exc.strerror or exc}") from None
    return digest.hexdigest()[:AUTOV2_HEX_CHARS]
