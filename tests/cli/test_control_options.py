"""The ControlNet options (cli/control_options.py): how repeated settings reach the units, and
one-line errors before any model loads, on generate, img2img and inpaint."""

import json

import click
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from sdrt.cli.control_options import control_options
from sdrt.runtime.control.manifest import CONTROL_FORMAT
from sdrt.runtime.control.unit import ControlUnit
from tests.cli.test_cli import assert_one_line_error, run


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Two control folders (a manifest is all the options look at) and two control images."""
    root = tmp_path_factory.mktemp("control_inputs")
    folders = []
    for name in ("canny_net", "depth_net"):
        folder = root / name
        folder.mkdir()
        (folder / "manifest.json").write_text(json.dumps({"format": CONTROL_FORMAT}))
        folders.append(folder)
    pictures = []
    for name, colour in (("edges.png", (255, 255, 255)), ("depth.png", (90, 90, 90))):
        Image.new("RGB", (24, 16), colour).save(root / name)
        pictures.append(root / name)
    return folders, pictures


def probe(*args, needs_image=True):
    """The units the options make, through a command that only records them."""
    seen = {}

    @click.command()
    @control_options(needs_image=needs_image)
    def command(**kwargs):
        seen.update(kwargs)

    result = CliRunner().invoke(command, [str(a) for a in args])
    return result, seen.get("controls")


def test_one_controlnet_takes_every_setting(inputs):
    (canny, _), (edges, _) = inputs
    result, units = probe("--controlnet", canny, "--control-image", edges, "--control-scale",
                          "0.6", "--control-start", "0.1", "--control-end", "0.5",
                          "--control-mode", "Control", "--control-resize", "fill",
                          "--control-module", "canny", "--control-threshold-a", "50",
                          "--control-threshold-b", "120", "--control-processor-res", "256",
                          "--control-pixel-perfect")
    assert result.exit_code == 0, result.output
    (unit,) = units
    assert isinstance(unit, ControlUnit) and unit.model == canny
    assert isinstance(unit.image, Image.Image) and unit.image.size == (24, 16)  # read up front
    assert (unit.scale, unit.start, unit.end, unit.mode, unit.resize) == \
        (0.6, 0.1, 0.5, "control", "fill")
    assert (unit.module, unit.threshold_a, unit.threshold_b, unit.processor_res,
            unit.pixel_perfect) == ("canny", 50.0, 120.0, 256, True)


def test_settings_given_once_apply_to_all_and_k_times_in_order(inputs):
    (canny, depth), (edges, grey) = inputs
    result, units = probe("--controlnet", canny, "--controlnet", depth,
                          "--control-image", edges, "--control-image", grey,
                          "--control-scale", "0.5", "--control-scale", "1.5",
                          "--control-resize", "resize")
    assert result.exit_code == 0, result.output
    assert [u.model for u in units] == [canny, depth]
    assert [u.image.getpixel((0, 0)) for u in units] == [(255, 255, 255), (90, 90, 90)]
    assert [u.scale for u in units] == [0.5, 1.5]
    assert [u.resize for u in units] == ["resize", "resize"]  # once: both
    assert [(u.module, u.mode, u.start, u.end) for u in units] == \
        [("none", "balanced", 0.0, 1.0)] * 2  # not given: the unit's defaults


def test_no_controlnet_no_controls_and_image_optional_with_an_input_picture(inputs):
    result, units = probe()
    assert result.exit_code == 0 and units is None
    (canny, _), _ = inputs
    result, units = probe("--controlnet", canny, needs_image=False)
    assert result.exit_code == 0, result.output
    assert units[0].image is None  # img2img/inpaint: their input picture stands in


@pytest.mark.parametrize(("args", "fragment"), [
    (("--control-scale", "2"), "--control-scale needs --controlnet DIR"),
    (("--controlnet", "{canny}"), "--controlnet needs --control-image IMAGE"),
    (("--controlnet", "{canny}", "--controlnet", "{depth}", "--control-image", "{edges}",
      "--control-scale", "1", "--control-scale", "1", "--control-scale", "1"),
     "--control-scale is given 3 times for 2 --controlnet"),
    (("--controlnet", "{canny}", "--control-image", "{edges}", "--control-image", "{edges}"),
     "--control-image is given 2 times for 1 --controlnet"),
    (("--controlnet", "{canny}", "--control-image", "{edges}", "--control-scale", "big"),
     "--control-scale must be a number, got 'big'"),
    (("--controlnet", "{canny}", "--control-image", "{edges}", "--control-mode", "strong"),
     "--control-mode must be one of balanced, prompt, control, got 'strong'"),
    (("--controlnet", "{canny}", "--control-image", "{edges}", "--control-resize", "pad"),
     "--control-resize must be one of crop, resize, fill"),
    (("--controlnet", "{canny}", "--control-image", "{edges}", "--control-processor-res", "1.5"),
     "--control-processor-res must be an integer"),
    (("--controlnet", "{canny}", "--control-image", "{edges}", "--control-module", "depth"),
     "unknown ControlNet preprocessor 'depth'; choose one of: none, canny, invert"),
    (("--controlnet", "{canny}", "--control-image", "{edges}", "--control-start", "0.6",
      "--control-end", "0.4"), "start and end must satisfy 0 ≤ start < end ≤ 1"),
    (("--controlnet", "{canny}", "--control-image", "missing.png"),
     "--control-image 'missing.png' does not exist"),
    (("--controlnet", "{canny}", "--control-image", "{notes}"), "is not an image file"),
    (("--controlnet", "nowhere", "--control-image", "{edges}"), "--controlnet 'nowhere' is not "
                                                               "a folder"),
    (("--controlnet", "{model}", "--control-image", "{edges}"), "is not an exported ControlNet "
                                                                "folder"),
])
def test_bad_control_options_are_one_line_errors(inputs, tmp_path, args, fragment):
    (canny, depth), (edges, _) = inputs
    notes = tmp_path / "notes.png"
    notes.write_text("no picture")
    (tmp_path / "model").mkdir()
    names = {"canny": canny, "depth": depth, "edges": edges, "notes": notes,
             "model": tmp_path / "model"}
    filled = [str(a).format(**names) for a in args]
    result, units = probe(*filled)
    assert_one_line_error(result, fragment)
    assert units is None


@pytest.mark.parametrize("command", ["generate", "img2img", "inpaint"])
def test_the_commands_take_the_options(inputs, tmp_path, command):
    (canny, _), (edges, _) = inputs
    inputs_of = {"generate": [], "img2img": [edges], "inpaint": [edges, edges]}[command]
    out = tmp_path / "x.png"
    result = run(command, *inputs_of, "a cat", "--controlnet", canny, "--control-image", edges,
                 "--control-mode", "loud", "-o", out)  # fails before any model loads
    assert_one_line_error(result, "--control-mode must be one of")
    assert not out.exists()
    assert "--control-threshold-a" in run(command, "--help").output


def test_a_missing_preprocessor_dir_is_a_one_line_error(tmp_path):
    result = run("generate", "a cat", "--preprocessor-dir", tmp_path / "nope",
                 "-o", tmp_path / "x.png")
    assert_one_line_error(result, "preprocessor folder", "does not exist")


def test_controlnet_does_not_combine_with_the_refiner(inputs, tmp_path):
    (canny, _), (edges, _) = inputs
    result = run("generate", "a cat", "--controlnet", canny, "--control-image", edges,
                 "--refiner", tmp_path, "-o", tmp_path / "x.png")
    assert_one_line_error(result, "--controlnet does not combine with --refiner")


@pytest.fixture(scope="module")
def tiny_control(tiny_sd_dir, tmp_path_factory):
    """A tiny ControlNet made from the tiny model's UNet (non-zero zero-convs), exported."""
    from sdrt.export.onnx_export import export_pipeline
    from tests.export.controlnet_checkpoint import tiny_controlnet

    root = tmp_path_factory.mktemp("tiny_control")
    return export_pipeline(tiny_controlnet(tiny_sd_dir / "unet", root / "cn"), root / "cn-onnx")


def test_generate_with_a_controlnet_end_to_end(tiny_onnx_dir, tiny_control, tmp_path):
    from sdrt.runtime.metadata import parse_parameters
    from sdrt.runtime.pipeline import Pipeline

    picture = tmp_path / "shapes.png"
    edges = Image.new("RGB", (64, 64), (20, 20, 20))
    edges.paste((230, 230, 230), (16, 16, 48, 40))
    edges.save(picture)
    common = ("a red square", "--model", tiny_onnx_dir, "--steps", "2", "--seed", "3")
    plain, steered = tmp_path / "plain.png", tmp_path / "steered.png"
    assert run("generate", *common, "-o", plain).exit_code == 0
    result = run("generate", *common, "--controlnet", tiny_control, "--control-image", picture,
                 "--control-module", "canny", "--control-scale", "0.8", "--control-end", "0.5",
                 "-o", steered)
    assert result.exit_code == 0, result.output
    got = np.asarray(Image.open(steered))
    params = parse_parameters(Image.open(steered).info["parameters"])
    assert params["ControlNet 0"].startswith("Module: canny, Model: cn-onnx [")
    assert "Weight: 0.8" in params["ControlNet 0"] and "Guidance End: 0.5" in params["ControlNet 0"]
    assert np.abs(got.astype(int) - np.asarray(Image.open(plain)).astype(int)).max() > 0
    # the CLI's units are what the Python API makes of the same settings
    want = Pipeline.load(tiny_onnx_dir).generate(
        "a red square", steps=2, seed=3, controls=[ControlUnit(
            model=tiny_control, image=picture, module="canny", scale=0.8, end=0.5)])[0]
    np.testing.assert_array_equal(got, np.asarray(want))


def test_img2img_control_defaults_to_the_input_picture(tiny_onnx_dir, tiny_control, tmp_path):
    from sdrt.runtime.metadata import parse_parameters

    picture, out = tmp_path / "in.png", tmp_path / "out.png"
    Image.new("RGB", (64, 64), (200, 40, 40)).save(picture)
    result = run("img2img", picture, "a red square", "--model", tiny_onnx_dir, "--steps", "2",
                 "--strength", "0.5", "--controlnet", tiny_control, "-o", out)
    assert result.exit_code == 0, result.output
    params = parse_parameters(Image.open(out).info["parameters"])
    assert params["ControlNet 0"].startswith("Module: none, Model: cn-onnx [")
