"""Property-based tests (hypothesis): hostile generation parameters and input images end in one
of sdrt's own error types, never in another exception (issue: reliability and security).

Generation parameters are drawn as an HTTP client could send them, wrong types included, and
checked through `GenerationRequest.resolve` on the embedded model; requests that resolve and are
cheap are also run. Input images are real files of many formats, sizes and modes, the same files
truncated or with bytes flipped, random bytes, and headers claiming huge dimensions
(decompression bombs), read by runtime/images.py as `sdrt img2img`/`inpaint` read them, and
prepared for the model. Example counts are small so the module stays well under a minute.
"""

from __future__ import annotations

import io
import math
import struct
import zlib

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from sdrt.cli.main import main
from sdrt.runtime.errors import SdrtError
from sdrt.runtime.images import MAX_INPUT_PIXELS, read_image, read_mask
from sdrt.runtime.pipeline import MAX_SIDE, GenerationRequest, Pipeline
from sdrt.runtime.samplers import SAMPLERS

EXAMPLES = 40
FAST = settings(max_examples=EXAMPLES, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])
# Runs cheap enough to make inside a property: the embedded model is 64×64 at 8× VAE.
CHEAP_STEPS, CHEAP_SIDE, CHEAP_IMAGES = 2, 64, 2


@pytest.fixture(scope="module")
def embedded() -> Pipeline:
    return Pipeline.load()


# ------------------------------------------------------------------- generation parameters

def _anything(*typed: st.SearchStrategy) -> st.SearchStrategy:
    """The typed values, or what a careless or hostile client sends instead."""
    junk = st.one_of(st.none(), st.booleans(), st.text(max_size=5), st.floats(),
                     st.lists(st.integers(), max_size=2), st.integers(-2**70, 2**70))
    return st.one_of(*typed, junk)


# Unicode with lone surrogates and control characters, as a JSON body can carry them.
_TEXT = st.text(st.characters(codec=None, categories=None), max_size=300)
_SIDES = _anything(st.integers(-16, 4 * MAX_SIDE), st.sampled_from([8, 16, 56, 64, 72]))
# A cheap valid request; each example replaces up to three of its fields with drawn values.
BASE = {"prompt": "a red circle", "negative_prompt": "", "steps": CHEAP_STEPS,
        "guidance_scale": 3.0, "sampler": "euler", "seed": 1, "width": 64, "height": 64,
        "num_images": 1, "generator": "numpy"}
FIELDS = {
    "prompt": _anything(_TEXT, st.text(min_size=2000, max_size=5000)),
    "negative_prompt": _anything(_TEXT),
    "steps": _anything(st.integers(-3, 2000)),
    "guidance_scale": _anything(st.floats(allow_nan=True, allow_infinity=True)),
    "sampler": _anything(st.sampled_from(sorted(SAMPLERS)),
                         st.sampled_from(["Euler a", "DPM++ 2M", "DDIMScheduler"])),
    "seed": _anything(st.integers(-5, 2**33)),
    "width": _SIDES, "height": _SIDES,
    "num_images": _anything(st.integers(-1, 20)),
    "generator": _anything(st.sampled_from(["torch", "numpy"])),
    # A1111's prompt syntax: brackets, weights, BREAK and tags, well formed or not
    "prompt_syntax": _anything(st.sampled_from(["a1111", "plain"])),
    "emphasis": _anything(st.sampled_from(["original", "none", "no-norm"])),
    "loras": _anything(st.just(()), st.lists(st.tuples(st.text(max_size=8), st.floats()),
                                             max_size=2)),
}
FIELDS["prompt"] = st.one_of(FIELDS["prompt"], st.lists(st.sampled_from(
    ["red", "(", ")", "[", "]", ":1.3)", "\\(", "BREAK", ",", "<lora:x:0.5>", "<hypernet:y>",
     "<lora:", ":", " "]), max_size=40).map("".join))


@st.composite
def requests(draw) -> GenerationRequest:
    chosen = draw(st.sets(st.sampled_from(sorted(FIELDS)), max_size=3))
    return GenerationRequest(**{**BASE, **{name: draw(FIELDS[name]) for name in chosen}})


def _cheap(req: GenerationRequest) -> bool:
    return (req.steps <= CHEAP_STEPS and max(req.width, req.height) <= CHEAP_SIDE
            and req.num_images <= CHEAP_IMAGES)


def test_any_generation_request_resolves_runs_or_says_why(embedded):
    outcomes = {"ran": 0, "refused": 0}

    @FAST
    @given(request=requests())
    def resolves_runs_or_says_why(request):
        try:
            resolved = request.resolve(embedded.facts, embedded.scheduler)
            if not _cheap(resolved):
                return
            results = embedded.run(resolved)
        except SdrtError as exc:
            assert str(exc) and "\n" not in str(exc)  # one line for the user
            outcomes["refused"] += 1
            return
        outcomes["ran"] += 1
        assert len(results) == resolved.num_images
        for result in results:
            assert result.image.size == (resolved.width, resolved.height)

    resolves_runs_or_says_why()
    assert outcomes["ran"] and outcomes["refused"], outcomes  # both paths were exercised


# -------------------------------------------------------------------------------- images

FORMATS = ("PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP")
MODES = ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "CMYK", "YCbCr", "I", "I;16", "F")


def _encode(fmt: str, mode: str, size: tuple[int, int], seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    image = Image.fromarray(pixels).convert(mode)
    out = io.BytesIO()
    image.save(out, fmt)
    return out.getvalue()


def _writable(fmt: str, mode: str) -> bool:
    try:
        _encode(fmt, mode, (2, 2), 0)
    except (OSError, ValueError, KeyError):
        return False
    return True


# Every (format, mode) this Pillow writes.
ENCODINGS = st.sampled_from([(fmt, mode) for fmt in FORMATS for mode in MODES
                             if _writable(fmt, mode)])


def _png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims width × height pixels over a few bytes of data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


@st.composite
def image_files(draw) -> bytes:
    """Bytes of an image file: sound, truncated, with bytes flipped, huge, or not an image."""
    kind = draw(st.sampled_from(["sound", "truncated", "flipped", "huge", "random"]))
    if kind == "random":
        return draw(st.binary(max_size=512))
    if kind == "huge":
        side = draw(st.integers(1, 2**31 - 1))
        other = draw(st.integers(max(1, MAX_INPUT_PIXELS // side), 2**31 - 1))
        return _png_claiming(side, other)
    fmt, mode = draw(ENCODINGS)
    size = (draw(st.integers(1, 97)), draw(st.integers(1, 97)))
    data = _encode(fmt, mode, size, draw(st.integers(0, 2**16)))
    if kind == "truncated":
        return data[: draw(st.integers(0, len(data) - 1))]
    if kind == "flipped":
        data = bytearray(data)
        for _ in range(draw(st.integers(1, 8))):
            at = draw(st.integers(0, len(data) - 1))
            data[at] ^= draw(st.integers(1, 255))
        return bytes(data)
    return data


@FAST
@given(data=image_files(), as_mask=st.booleans())
def test_any_image_file_reads_or_says_why(tmp_path_factory, data, as_mask):
    path = tmp_path_factory.mktemp("img") / "input.img"
    path.write_bytes(data)
    try:
        image = (read_mask if as_mask else read_image)(path)
    except SdrtError as exc:
        assert str(exc) and "\n" not in str(exc)
        return
    assert image.mode == ("L" if as_mask else "RGB")
    assert 0 < image.width * image.height <= MAX_INPUT_PIXELS


@FAST
@given(fmt_mode=ENCODINGS, width=st.integers(1, 300), height=st.integers(1, 300),
       out_width=st.one_of(st.none(), st.integers(-8, 400), st.integers(2040, 2056)),
       strength=st.one_of(st.floats(allow_nan=True), st.integers(-1, 2)))
def test_any_picture_is_prepared_for_the_model_or_says_why(embedded, fmt_mode, width, height,
                                                           out_width, strength):
    fmt, mode = fmt_mode
    picture = Image.open(io.BytesIO(_encode(fmt, mode, (width, height), width * height)))
    try:
        init = embedded.image_input(picture, strength=strength, width=out_width)
    except SdrtError as exc:
        assert str(exc) and "\n" not in str(exc)
        return
    assert init.image.mode == "RGB" and max(init.image.size) <= MAX_SIDE
    assert 0 <= init.strength <= 1 and not math.isnan(init.strength)


@settings(max_examples=8, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=image_files())
def test_img2img_command_never_shows_a_traceback(tmp_path_factory, data):
    folder = tmp_path_factory.mktemp("cli")
    (folder / "in.png").write_bytes(data)
    result = CliRunner().invoke(main, ["img2img", str(folder / "in.png"), "a red circle",
                                       "--steps", "2", "-o", str(folder / "out.png")])
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    if result.exit_code:
        assert [line for line in result.output.splitlines() if line.startswith("error:")]
