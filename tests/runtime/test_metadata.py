"""sdrt.runtime.metadata: A1111 "parameters" text, its parser, PNG chunks, AutoV2 model hash."""

from __future__ import annotations

import hashlib
import os
import struct
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from sdrt.runtime import metadata
from sdrt.runtime.errors import InputError, ModelError
from sdrt.runtime.metadata import (
    GenerationInfo,
    format_parameters,
    load_info,
    model_hash,
    parse_parameters,
    save_png,
)


def make_info(**changes: object) -> GenerationInfo:
    fields: dict[str, object] = {
        "prompt": "a cat",
        "negative_prompt": "",
        "steps": 20,
        "sampler": "Euler a",
        "cfg_scale": 7.0,
        "seed": 42,
        "width": 512,
        "height": 512,
        "model_name": "tiny",
        "model_hash": "45dee52b1c",
        "extra": {"Schedule type": "Karras", "Backend": "ort", "Version": "sdrt 0.1.0"},
    }
    fields.update(changes)
    return GenerationInfo(**fields)  # type: ignore[arg-type]


def png_text_chunks(path: Path) -> list[tuple[str, str]]:
    """(chunk type, keyword) of every text chunk, read from the raw PNG bytes."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    out, pos = [], 8
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8].decode("ascii")
        body = data[pos + 8 : pos + 8 + length]
        if kind in ("tEXt", "iTXt", "zTXt"):
            out.append((kind, body.split(b"\0", 1)[0].decode("latin-1")))
        pos += 12 + length
    return out


@pytest.fixture
def image() -> Image.Image:
    return Image.new("RGB", (8, 8), (200, 100, 50))


# --- exact text --------------------------------------------------------------------------------


def test_exact_text_without_negative_prompt() -> None:
    assert format_parameters(make_info()) == (
        "a cat\n"
        "Steps: 20, Sampler: Euler a, Schedule type: Karras, CFG scale: 7, Seed: 42, "
        "Size: 512x512, Model hash: 45dee52b1c, Model: tiny, Backend: ort, Version: sdrt 0.1.0"
    )


def test_exact_text_with_negative_prompt_and_a1111_key_order() -> None:
    # A1111's own keys passed in `extra` take A1111's positions (VAE after Model, Clip skip and
    # RNG after Denoising strength); the rest follow in the given order; Version, User close.
    info = make_info(
        prompt="masterpiece, 1girl",
        negative_prompt="lowres, bad hands",
        steps=30,
        sampler="DPM++ 2M",
        cfg_scale=7.5,
        seed=965400086,
        width=768,
        model_name="sd15",
        model_hash="6ce0161689",
        denoising_strength=0.75,
        extra={
            "User": "kiosk",
            "Version": "sdrt 0.1.0",
            "Backend": "openvino",
            "RNG": "CPU",
            "Clip skip": 2,
            "VAE": "vae-ft-mse-840000",
            "Schedule type": "Karras",
            "Precision": "fp16",
        },
    )
    assert format_parameters(info) == (
        "masterpiece, 1girl\n"
        "Negative prompt: lowres, bad hands\n"
        "Steps: 30, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7.5, Seed: 965400086, "
        "Size: 768x512, Model hash: 6ce0161689, Model: sd15, VAE: vae-ft-mse-840000, "
        "Denoising strength: 0.75, Clip skip: 2, RNG: CPU, Backend: openvino, Precision: fp16, "
        "Version: sdrt 0.1.0, User: kiosk"
    )


def test_values_with_comma_colon_or_newline_are_json_quoted() -> None:
    info = make_info(
        model_name="my model, v2",
        extra={
            "Lora hashes": "add_detail: 7c6b1f0, film: 0d2a3e1",
            "Note": "line one\nline two",
            "Style": 'say "hi"',  # no , : or newline: written raw, quotes and all
            "Tag": "猫, 🐱",  # ensure_ascii=False, as A1111
            "Time": "12:30",
        },
    )
    assert format_parameters(info).split("\n")[1] == (
        "Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 42, Size: 512x512, "
        'Model hash: 45dee52b1c, Model: "my model, v2", Lora hashes: "add_detail: 7c6b1f0, '
        'film: 0d2a3e1", Note: "line one\\nline two", Style: say "hi", Tag: "猫, 🐱", '
        'Time: "12:30"'
    )


def test_none_is_omitted_and_whole_floats_print_as_ints() -> None:
    info = make_info(
        prompt="p",
        sampler="Euler",
        cfg_scale=7,
        seed=0,
        width=64,
        height=64,
        model_name=None,
        model_hash=None,
        denoising_strength=1.0,
        extra={
            "Hires upscale": 2.0,
            "Hires steps": None,
            "Token merging ratio": 0.5,
            "Eta": 1e-05,
            "Tiny": 0.1,
            "Big": 1e16,
            "Tiling": True,
        },
    )
    assert format_parameters(info) == (
        "p\nSteps: 20, Sampler: Euler, CFG scale: 7, Seed: 0, Size: 64x64, "
        "Denoising strength: 1, Token merging ratio: 0.5, Tiling: True, Hires upscale: 2, "
        "Eta: 1e-05, Tiny: 0.1, Big: 10000000000000000"
    )


@pytest.mark.parametrize(
    ("cfg", "text"), [(7.0, "7"), (7, "7"), (7.5, "7.5"), (0.1 + 0.2, "0.30000000000000004")]
)
def test_cfg_scale_formatting(cfg: float, text: str) -> None:
    assert f"CFG scale: {text}," in format_parameters(make_info(cfg_scale=cfg))


def test_multiline_prompts_and_outer_whitespace() -> None:
    info = make_info(prompt="  line one\nline two", negative_prompt="bad\nworse", extra={})
    assert format_parameters(info) == (
        "line one\nline two\nNegative prompt: bad\nworse\n"
        "Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 42, Size: 512x512, "
        "Model hash: 45dee52b1c, Model: tiny"
    )


def test_empty_prompts_leave_only_the_parameters_line() -> None:
    text = format_parameters(make_info(prompt="", extra={}))
    assert text.startswith("Steps: 20,") and "\n" not in text
    assert parse_parameters(text)["prompt"] == ""


# --- parser ---------------------------------------------------------------------------------


def test_round_trip_through_the_parser() -> None:
    info = make_info(
        prompt="masterpiece, (best quality:1.2)\nBREAK sunset",
        negative_prompt="lowres, bad hands",
        height=768,
        extra={"Lora hashes": "a: 1, b: 2", "Note": "x\ny", "Version": "sdrt 0.1.0"},
    )
    assert parse_parameters(format_parameters(info)) == {
        "prompt": "masterpiece, (best quality:1.2)\nBREAK sunset",
        "negative_prompt": "lowres, bad hands",
        "Steps": "20",
        "Sampler": "Euler a",
        "CFG scale": "7",
        "Seed": "42",
        "Size-1": "512",
        "Size-2": "768",
        "Model hash": "45dee52b1c",
        "Model": "tiny",
        "Lora hashes": "a: 1, b: 2",
        "Note": "x\ny",
        "Version": "sdrt 0.1.0",
    }


def test_parse_a1111_webui_text() -> None:
    text = (
        "masterpiece, best quality, (1girl:1.2), <lora:detail:0.6>\n"
        "BREAK sunset\n"
        "Negative prompt: (worst quality:1.4), lowres\n"
        "bad hands\n"
        "Steps: 28, Sampler: DPM++ 2M Karras, CFG scale: 7, Seed: 3815249834, Size: 512x768, "
        "Model hash: 7f96a1a9ca, Model: AnythingV5, Denoising strength: 0.5, Clip skip: 2, "
        "Hires upscale: 2, Hires upscaler: R-ESRGAN 4x+ Anime6B, "
        'Lora hashes: "detail: 2b2ab8f4a6f2", TI hashes: "easynegative: c74b4e810b03", '
        "Seed resize from: 640x960, Version: v1.6.0"
    )
    parsed = parse_parameters(text)
    assert (
        parsed["prompt"]
        == "masterpiece, best quality, (1girl:1.2), <lora:detail:0.6>\nBREAK sunset"
    )
    assert parsed["negative_prompt"] == "(worst quality:1.4), lowres\nbad hands"
    assert parsed["Size-1"] == "512" and parsed["Size-2"] == "768" and "Size" not in parsed
    assert parsed["Seed resize from-1"] == "640"  # A1111 splits every WxH value
    assert parsed["Lora hashes"] == "detail: 2b2ab8f4a6f2"
    assert parsed["Hires upscaler"] == "R-ESRGAN 4x+ Anime6B"
    assert parsed["Version"] == "v1.6.0"


def test_parse_tolerates_other_writers() -> None:
    # stable-diffusion.cpp: printf floats, an unquoted list, CRLF line ends.
    text = (
        "a cat\r\nNegative prompt: dog\r\n"
        "Steps: 20, CFG scale: 7.000000, Sampler: euler_a, Seed: 42, Size: 512x512, "
        "Skip layers: [7, 8, 9], Version: stable-diffusion.cpp"
    )
    parsed = parse_parameters(text)
    assert parsed["prompt"] == "a cat" and parsed["negative_prompt"] == "dog"
    assert parsed["CFG scale"] == "7.000000" and parsed["Version"] == "stable-diffusion.cpp"


@pytest.mark.parametrize(
    ("text", "prompt"),
    [
        ("", ""),
        ("just a prompt", "just a prompt"),
        ("a cat\nSteps: 20, Seed: 1", "a cat\nSteps: 20, Seed: 1"),  # < 3 pairs: still prompt
        ("  spaced  \n\n", "spaced"),
    ],
)
def test_parse_text_without_parameters(text: str, prompt: str) -> None:
    assert parse_parameters(text) == {"prompt": prompt, "negative_prompt": ""}


def test_parse_keeps_a_bad_json_value_raw() -> None:
    parsed = parse_parameters('p\nNote: "bad \\q", Steps: 1, Seed: 2, Size: 1x1')
    assert parsed["Note"] == '"bad \\q"' and parsed["Steps"] == "1"


def test_parse_prompt_keys_win_over_a_stray_pair() -> None:
    parsed = parse_parameters("real\nprompt: fake, Steps: 1, Seed: 2, Size: 1x1")
    assert parsed["prompt"] == "real"


# --- PNG ----------------------------------------------------------------------------------------


def test_latin1_text_goes_in_tEXt(tmp_path: Path, image: Image.Image) -> None:
    info = make_info(prompt="café crème, 50°C, ½ size", negative_prompt="ÿ")
    save_png(image, tmp_path / "a.png", info)
    assert png_text_chunks(tmp_path / "a.png") == [("tEXt", "parameters"), ("tEXt", "sdrt")]
    with Image.open(tmp_path / "a.png") as read:
        assert read.info["parameters"] == format_parameters(info)


def test_unicode_text_goes_in_iTXt(tmp_path: Path, image: Image.Image) -> None:
    info = make_info(prompt="一只猫 🐱, (masterpiece:1.2)", negative_prompt="Москва")
    save_png(image, tmp_path / "u.png", info)
    # The JSON chunk is ASCII-escaped, so it stays tEXt.
    assert png_text_chunks(tmp_path / "u.png") == [("iTXt", "parameters"), ("tEXt", "sdrt")]
    with Image.open(tmp_path / "u.png") as read:
        parsed = parse_parameters(read.info["parameters"])
    assert parsed["prompt"] == "一只猫 🐱, (masterpiece:1.2)"
    assert parsed["negative_prompt"] == "Москва"


def test_json_chunk_round_trips_exactly(tmp_path: Path, image: Image.Image) -> None:
    # What the A1111 text loses (edge whitespace, a value spelt with quotes, types) survives.
    info = make_info(
        prompt="  edges \n\n kept ",
        negative_prompt="Negative prompt: inside",
        cfg_scale=7.0,
        denoising_strength=0.3,
        extra={"Quoted": '"x"', "Count": 3, "Flag": False, "Ratio": 0.25, "Nothing": None},
    )
    save_png(image, tmp_path / "j.png", info)
    loaded = load_info(tmp_path / "j.png")
    assert loaded == info
    assert isinstance(loaded.cfg_scale, float) and loaded.extra["Count"] == 3
    with Image.open(tmp_path / "j.png") as read:
        assert load_info(read) == info
        assert read.size == (8, 8) and read.getpixel((0, 0)) == (200, 100, 50)


def test_no_info_writes_no_text_chunks(tmp_path: Path, image: Image.Image) -> None:
    save_png(image, tmp_path / "plain.png")
    assert png_text_chunks(tmp_path / "plain.png") == []
    assert load_info(tmp_path / "plain.png") is None


def test_foreign_json_chunk_is_ignored(tmp_path: Path, image: Image.Image) -> None:
    from PIL import PngImagePlugin

    chunks = PngImagePlugin.PngInfo()
    chunks.add_text("sdrt", '{"something": "else"}')
    image.save(tmp_path / "other.png", pnginfo=chunks)
    assert load_info(tmp_path / "other.png") is None


def test_png_never_holds_a_filesystem_path(tmp_path: Path, image: Image.Image) -> None:
    save_png(image, tmp_path / "n.png", make_info(model_name="runwayml/stable-diffusion-v1-5"))
    data = (tmp_path / "n.png").read_bytes()
    assert str(tmp_path).encode() not in data and b"n.png" not in data


@pytest.mark.parametrize(
    "name",
    [
        "/home/me/models/sd15.safetensors",
        "C:\\models\\sd15",
        "c:/models/sd15",
        "~/sd15",
        "../sd15",
        "./sd15",
        "models/sd/v15",
        "a\\b",
    ],
)
def test_path_like_model_names_are_refused(name: str) -> None:
    with pytest.raises(InputError, match="model_name"):
        make_info(model_name=name)


def test_path_like_vae_is_refused() -> None:
    with pytest.raises(InputError, match="VAE"):
        make_info(extra={"VAE": "/home/me/vae.safetensors"})


# --- atomic writes ------------------------------------------------------------------------------


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


@pytest.mark.parametrize("error", [OSError("disk full"), KeyboardInterrupt()])
def test_interrupted_write_leaves_no_half_png(
    tmp_path: Path, image: Image.Image, monkeypatch: pytest.MonkeyPatch, error: BaseException
) -> None:
    target = tmp_path / "out.png"
    save_png(image, target, make_info())
    before = target.read_bytes()

    def half_save(self: Image.Image, fp: object, *args: object, **kwargs: object) -> None:
        fp.write(b"\x89PNG\r\n\x1a\n half")  # type: ignore[attr-defined]
        raise error

    monkeypatch.setattr(Image.Image, "save", half_save)
    with pytest.raises(type(error)):
        save_png(image, target, make_info(seed=7))
    with pytest.raises(type(error)):
        save_png(image, tmp_path / "new.png", make_info(seed=7))
    assert target.read_bytes() == before  # the old file is untouched
    assert not (tmp_path / "new.png").exists()
    assert _leftovers(tmp_path) == []


def test_overwrite_replaces_the_file(tmp_path: Path, image: Image.Image) -> None:
    target = tmp_path / "out.png"
    save_png(image, target, make_info(seed=1))
    save_png(image, target, make_info(seed=2))
    with Image.open(target) as read:
        assert parse_parameters(read.info["parameters"])["Seed"] == "2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.png"]


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX permission bits")
def test_written_file_honours_the_umask(tmp_path: Path, image: Image.Image) -> None:
    old = os.umask(0o022)
    try:
        save_png(image, tmp_path / "m.png", make_info())
    finally:
        os.umask(old)
    assert (tmp_path / "m.png").stat().st_mode & 0o777 == 0o644


def test_missing_output_folder_is_an_input_error(tmp_path: Path, image: Image.Image) -> None:
    with pytest.raises(InputError, match="output folder"):
        save_png(image, tmp_path / "nope" / "x.png", make_info())


def test_non_image_is_an_input_error(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="PIL"):
        save_png("not an image", tmp_path / "x.png", make_info())  # type: ignore[arg-type]


# --- model hash -------------------------------------------------------------------------------


def test_model_hash_is_autov2(tmp_path: Path) -> None:
    (tmp_path / "hello.bin").write_bytes(b"hello")
    assert model_hash(tmp_path / "hello.bin") == "2cf24dba5f"  # sha256("hello")[:10]
    (tmp_path / "empty.bin").write_bytes(b"")
    assert model_hash(tmp_path / "empty.bin") == "e3b0c44298"


def test_model_hash_streams_files_larger_than_a_chunk(tmp_path: Path) -> None:
    data = os.urandom(metadata.HASH_CHUNK_BYTES * 3 + 12345)
    (tmp_path / "big.safetensors").write_bytes(data)
    assert model_hash(tmp_path / "big.safetensors") == hashlib.sha256(data).hexdigest()[:10]


def test_model_hash_of_missing_or_folder_is_a_model_error(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="not a file"):
        model_hash(tmp_path / "missing.safetensors")
    with pytest.raises(ModelError, match="not a file"):
        model_hash(tmp_path)


# --- validation -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"steps": 0}, "steps"),
        ({"steps": True}, "steps"),
        ({"steps": 2.0}, "steps"),
        ({"seed": -1}, "seed"),
        ({"seed": 2**64}, "seed"),
        ({"width": 0}, "width"),
        ({"cfg_scale": float("nan")}, "cfg_scale"),
        ({"cfg_scale": "7"}, "cfg_scale"),
        ({"denoising_strength": float("inf")}, "denoising_strength"),
        ({"prompt": None}, "prompt"),
        ({"model_hash": "xyz"}, "model_hash"),
        ({"extra": {"a:b": 1}}, "extra key"),
        ({"extra": {"x": 1}}, "extra key"),  # one character: A1111's parser needs two
        ({"extra": {"Steps": 5}}, "duplicates"),
        ({"extra": {"prompt": "x"}}, "reserved"),
        ({"extra": {"List": [1, 2]}}, "extra"),
        ({"extra": {"Ratio": float("nan")}}, "finite"),
        ({"extra": ["not", "a", "mapping"]}, "mapping"),
    ],
)
def test_invalid_info_is_an_input_error(changes: dict, match: str) -> None:
    with pytest.raises(InputError, match=match):
        make_info(**changes)


def test_extra_is_copied() -> None:
    extra = {"Backend": "ort"}
    info = make_info(extra=extra)
    extra["Backend"] = "openvino"
    assert info.extra == {"Backend": "ort"}


# --- properties -------------------------------------------------------------------------------

# Text A1111's parser reads back unchanged: lines without edge whitespace, none starting with
# "Negative prompt:". (Values and prompts outside this set are what the JSON chunk is for.)
LINE = st.text(st.characters(exclude_characters="\n\r"), max_size=30).filter(
    lambda s: s == s.strip() and not s.startswith("Negative prompt:")
)
PROMPT = st.lists(LINE, max_size=4).map("\n".join).filter(lambda s: s == s.strip())
VALUE = st.text(max_size=30).filter(
    lambda s: s == s.strip() and not s.startswith('"') and not metadata.RE_IMAGESIZE.match(s)
)
KEY = st.from_regex(r"[A-Za-z_][\w \-/]{1,20}", fullmatch=True).filter(
    lambda k: k not in metadata.FIELD_KEYS and k not in metadata.PROMPT_KEYS and k == k.rstrip()
)


@settings(max_examples=300, deadline=None)
@given(
    prompt=PROMPT,
    negative=PROMPT,
    sampler=VALUE.filter(lambda s: s != "Sampler"),
    extra=st.dictionaries(KEY, VALUE, max_size=4).filter(
        lambda d: all(k != v for k, v in d.items())
    ),
)
def test_parser_inverts_the_formatter(
    prompt: str, negative: str, sampler: str, extra: dict
) -> None:
    info = make_info(prompt=prompt, negative_prompt=negative, sampler=sampler, extra=extra)
    parsed = parse_parameters(format_parameters(info))
    assert parsed["prompt"] == prompt
    assert parsed["negative_prompt"] == negative
    assert parsed["Sampler"] == sampler
    for key, value in extra.items():
        assert parsed[key] == value


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(prompt=st.text(max_size=60), negative=st.text(max_size=60), value=st.text(max_size=20))
def test_png_round_trip_is_lossless_for_any_text(
    tmp_path: Path, image: Image.Image, prompt: str, negative: str, value: str
) -> None:
    info = make_info(prompt=prompt, negative_prompt=negative, extra={"Anything": value})
    save_png(image, tmp_path / "h.png", info)
    assert load_info(tmp_path / "h.png") == info
    with Image.open(tmp_path / "h.png") as read:
        assert read.info["parameters"] == format_parameters(info)


@pytest.mark.parametrize("sampler, schedule", [
    ("dpmpp_2m", "karras"), ("euler_a", "exponential"), ("euler", "automatic"), ("pndm", None),
])
def test_sampler_and_schedule_type_round_trip(sampler: str, schedule: str | None) -> None:
    # A1111 (≥ 1.9) writes "Sampler: DPM++ 2M, Schedule type: Karras"; reading both fields back
    # gives the same pair, and a missing "Schedule type" reads as Automatic, as A1111's parser.
    from sdrt.runtime.samplers import display_name, resolve_pair
    from sdrt.runtime.schedules import schedule_infotext

    pair = resolve_pair(sampler, schedule)
    info = make_info(sampler=display_name(pair[0]), extra=schedule_infotext(pair[1]))
    parsed = parse_parameters(format_parameters(info))
    assert resolve_pair(parsed["Sampler"], parsed.get("Schedule type")) == pair
    assert ("Schedule type" in parsed) == (pair[1] != "automatic")


def test_a1111_schedule_in_the_sampler_name_reads_as_the_pair() -> None:
    from sdrt.runtime.samplers import resolve_pair

    old = parse_parameters("x\nSteps: 28, Sampler: DPM++ 2M Karras, CFG scale: 7, Seed: 3")
    new = parse_parameters("x\nSteps: 28, Sampler: DPM++ 2M, Schedule type: Karras, Seed: 3")
    for parsed in (old, new):
        assert resolve_pair(parsed["Sampler"], parsed.get("Schedule type")) == \
            ("dpmpp_2m", "karras")
