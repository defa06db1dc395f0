"""The command line: happy path, metadata, and one-line errors with a non-zero exit."""

import shutil
from dataclasses import replace

import pytest
from click.testing import CliRunner
from PIL import Image

from sdrt.cli.main import main
from sdrt.runtime.model.manifest import Manifest, scan_files


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_one_line_error(result, *fragments):
    assert result.exit_code != 0
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.output
    for fragment in fragments:
        assert fragment in lines[0], result.output


def test_help_lists_commands():
    result = run("--help")
    assert result.exit_code == 0
    assert "generate" in result.output and "export" in result.output


def test_generate_writes_png_with_a1111_parameters(tiny_onnx_dir, tmp_path):
    out = tmp_path / "cat.png"
    result = run("generate", "a cat, sitting", "--model", tiny_onnx_dir, "--steps", "3",
                 "--seed", "42", "--sampler", "Euler a", "-n", "dog", "-o", out)
    assert result.exit_code == 0, result.output
    image = Image.open(out)
    text = image.info["parameters"]
    lines = text.split("\n")
    assert lines[0] == "a cat, sitting"
    assert lines[1] == "Negative prompt: dog"
    assert lines[2].startswith("Steps: 3, Sampler: Euler a, CFG scale: 7.5, Seed: 42, Size: 64x64")
    assert str(tmp_path) not in text  # never a filesystem path in an image


def test_generate_numbers_images_in_a_folder(tiny_onnx_dir, tmp_path):
    for _ in range(2):
        result = run("generate", "x", "--model", tiny_onnx_dir, "--steps", "1",
                     "--num-images", "2", "--seed", "5", "-o", tmp_path)
        assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "00001.png", "00002.png", "00003.png", "00004.png"]
    assert "Seed: 6" in Image.open(tmp_path / "00002.png").info["parameters"]


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--width", "65"], "width must be a multiple of 8"),
        (["--height", "0"], "height must be a multiple of 8"),
        (["--width", "4096"], "width must be a multiple of 8"),
        (["--steps", "0"], "steps must be between 1"),
        (["--sampler", "heun++"], "unknown sampler 'heun++'"),
        (["--backend", "tensorrt"], "unknown backend 'tensorrt'"),
        (["--generator", "mt"], "unknown generator 'mt'"),
        (["--num-images", "0"], "num_images must be between 1"),
        (["--seed", "-3"], "seed must be between 0"),
    ],
)
def test_bad_generation_arguments(tiny_onnx_dir, tmp_path, args, fragment):
    result = run("generate", "x", "--model", tiny_onnx_dir, "-o", tmp_path / "x.png", *args)
    assert_one_line_error(result, fragment)
    assert not (tmp_path / "x.png").exists()


def test_missing_model_folder(tmp_path):
    result = run("generate", "x", "--model", tmp_path / "nope")
    assert_one_line_error(result, "does not exist")


def test_incomplete_model_folder(tiny_onnx_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_onnx_dir, broken)
    shutil.rmtree(broken / "unet")
    result = run("generate", "x", "--model", broken, "-o", tmp_path / "x.png")
    assert_one_line_error(result, "'unet/' is missing")


def test_component_with_unexpected_inputs(tiny_onnx_dir, tmp_path):
    broken = tmp_path / "swapped"
    shutil.copytree(tiny_onnx_dir, broken)
    shutil.copy(broken / "vae_decoder" / "model.onnx", broken / "unet" / "model.onnx")
    result = run("generate", "x", "--model", broken, "-o", tmp_path / "x.png")
    assert_one_line_error(result, "'unet/model.onnx'", "truncated or replaced file")  # its size
    manifest = Manifest.load(broken)  # listed as it is now: the graph's own inputs give it away
    replace(manifest, files=scan_files(broken)).save(broken)
    result = run("generate", "x", "--model", broken, "-o", tmp_path / "x.png")
    assert_one_line_error(result, "unet: expected inputs")
