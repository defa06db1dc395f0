"""`sdrt img2img`, `sdrt inpaint`, `sdrt outpaint`: happy paths with A1111 metadata, and bad
input (sizes, unreadable files, masks) as one-line errors with a non-zero exit."""

import numpy as np
import pytest
from PIL import Image

from sdrt.runtime.metadata import parse_parameters
from tests.cli.test_cli import assert_one_line_error, run


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A 64×64 picture, a mask of its centre, and broken files beside them."""
    folder = tmp_path_factory.mktemp("inputs")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(folder / "in.png")
    drawn = Image.new("L", (64, 64), 0)
    drawn.paste(255, (16, 16, 48, 48))
    drawn.save(folder / "mask.png")
    drawn.resize((32, 32)).save(folder / "small-mask.png")
    Image.new("L", (64, 64), 0).save(folder / "empty-mask.png")
    Image.new("L", (64, 64), 255).save(folder / "full-mask.png")
    data = (folder / "in.png").read_bytes()
    (folder / "cut.png").write_bytes(data[: len(data) // 3])
    (folder / "notes.png").write_text("hello")
    Image.new("RGB", (4000, 64)).save(folder / "wide.png")
    return folder


def test_img2img_writes_denoising_strength(tiny_onnx_dir, inputs, tmp_path):
    out = tmp_path / "x.png"
    result = run("img2img", inputs / "in.png", "a cat", "--model", tiny_onnx_dir, "--steps", 4,
                 "--strength", 0.5, "--seed", 3, "-o", out)
    assert result.exit_code == 0, result.output
    image = Image.open(out)
    params = parse_parameters(image.info["parameters"])
    assert image.size == (64, 64)
    assert params["Denoising strength"] == "0.5" and params["Steps"] == "4"
    assert "Mask blur" not in params


def test_img2img_strength_zero_returns_the_input(tiny_onnx_dir, inputs, tmp_path):
    out = tmp_path / "same.png"
    result = run("img2img", inputs / "in.png", "x", "--model", tiny_onnx_dir, "--strength", 0,
                 "-o", out)
    assert result.exit_code == 0, result.output
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(inputs / "in.png")))
    assert "Denoising strength: 0," in Image.open(out).info["parameters"]


def test_inpaint_keeps_pixels_outside_the_feathered_mask(tiny_onnx_dir, inputs, tmp_path):
    out = tmp_path / "inpainted.png"
    result = run("inpaint", inputs / "in.png", inputs / "mask.png", "a dog", "--model",
                 tiny_onnx_dir, "--steps", 3, "--mask-blur", 2, "-o", out)
    assert result.exit_code == 0, result.output
    got, original = (np.asarray(Image.open(p).convert("RGB")) for p in (out, inputs / "in.png"))
    far = np.ones((64, 64), dtype=bool)
    far[10:54, 10:54] = False  # the mask grown by more than the feather
    assert np.array_equal(got[far], original[far]) and not np.array_equal(got, original)
    params = parse_parameters(Image.open(out).info["parameters"])
    assert params["Denoising strength"] == "1" and params["Mask blur"] == "2"


def test_outpaint_grows_the_canvas(tiny_onnx_dir, inputs, tmp_path):
    out = tmp_path / "wider.png"
    result = run("outpaint", inputs / "in.png", "a field", "--model", tiny_onnx_dir,
                 "--steps", 2, "--right", 20, "--top", 8, "-o", out)
    assert result.exit_code == 0, result.output
    image = Image.open(out)
    assert image.size == (84, 72) and "Size: 84x72" in image.info["parameters"]
    # the picture sits at (0, 8); the seam band is 8 px and the 4 px feather fades out by 12
    inner = np.asarray(image.convert("RGB"))[8 + 20:, :64 - 20]
    assert np.array_equal(inner, np.asarray(Image.open(inputs / "in.png"))[20:, :44])


@pytest.mark.parametrize(("args", "fragment"), [
    (["img2img", "{cut}", "x"], "truncated or corrupt"),
    (["img2img", "{notes}", "x"], "not an image file"),
    (["img2img", "{missing}", "x"], "does not exist"),
    (["img2img", "{wide}", "x"], "--width/--height"),
    (["img2img", "{image}", "x", "--width", "4096"], "width must be"),
    (["img2img", "{image}", "x", "--width", "60"], "width must be a multiple of 8"),
    (["img2img", "{image}", "x", "--strength", "1.5"], "strength must be a number between"),
    (["img2img", "{image}", "x", "--strength", "0.01"], "leaves no denoising step"),
    (["inpaint", "{image}", "{small}", "x", "--strength", "0.01"], "leaves no denoising step"),
    (["inpaint", "{image}", "{empty}", "x"], "mask is empty"),
    (["inpaint", "{image}", "{full}", "x"], "whole image"),
    (["inpaint", "{image}", "{cut}", "x"], "mask 'cut.png' is truncated"),
    (["inpaint", "{image}", "{mask}", "x", "--mask-blur", "-1"], "mask blur"),
    (["outpaint", "{image}", "x"], "at least one of left"),
    (["outpaint", "{image}", "x", "--left", "2000"], "side limit"),
    (["outpaint", "{image}", "x", "--top", "8", "--fill", "plasma"], "plasma"),
])
def test_bad_image_inputs(tiny_onnx_dir, inputs, tmp_path, args, fragment):
    names = {"cut": "cut.png", "notes": "notes.png", "missing": "nope.png", "wide": "wide.png",
             "image": "in.png", "small": "small-mask.png", "empty": "empty-mask.png",
             "full": "full-mask.png", "mask": "mask.png"}
    filled = [str(inputs / names[a[1:-1]]) if a.startswith("{") else a for a in args]
    result = run(*filled, "--model", tiny_onnx_dir, "-o", tmp_path / "x.png")
    if fragment == "plasma":  # click's own usage error: one line, exit 2
        assert result.exit_code == 2 and "plasma" in result.output
        return
    assert_one_line_error(result, fragment)
    assert not (tmp_path / "x.png").exists()
