"""`sdrt generate`'s hires fix and variation seed options (cli/hires_options.py) on the
embedded model: they reach the run and its infotext, and bad values are one-line errors
before anything is written."""

import pytest
from PIL import Image

from sdrt.runtime.metadata import parse_parameters
from tests.cli.test_cli import assert_one_line_error, run


def test_hires_and_variation_reach_the_image(tmp_path):
    out = tmp_path / "x.png"
    result = run("generate", "a red circle", "--steps", "2", "--seed", "1",
                 "--hires-scale", "1.5", "--hires-upscaler", "latent (bicubic)",
                 "--hires-steps", "2", "--hires-denoise", "0.5", "--subseed", "3",
                 "--subseed-strength", "0.25", "--seed-resize-from", "48x48", "-o", out)
    assert result.exit_code == 0, result.output
    image = Image.open(out)
    assert image.size == (96, 96)  # the embedded model's 64 × 1.5
    params = parse_parameters(image.info["parameters"])
    assert (params["Size-1"], params["Hires upscale"], params["Hires steps"]) == \
        ("64", "1.5", "2")
    assert (params["Hires upscaler"], params["Denoising strength"]) == \
        ("Latent (bicubic)", "0.5")
    assert (params["Variation seed"], params["Variation seed strength"]) == ("3", "0.25")
    assert (params["Seed resize from-1"], params["Seed resize from-2"]) == ("48", "48")


@pytest.mark.parametrize(("args", "fragment"), [
    (("--hires-scale", "big"), "--hires-scale must be a number, got 'big'"),
    (("--hires-scale", "9"), "hires scale must be a finite number between 1 and 4, got 9"),
    (("--hires-denoise", "2"), "hires denoise must be"),
    (("--hires-steps", "1.5"), "--hires-steps must be an integer, got '1.5'"),
    (("--hires-upscaler", "ESRGAN"), "unknown hires upscaler 'ESRGAN'; choose one of"),
    (("--subseed-strength", "-1"), "subseed_strength must be a number between 0 and 1"),
    (("--subseed", "x"), "--subseed must be an integer, got 'x'"),
    (("--seed-resize-from", "512"), "--seed-resize-from must be WIDTHxHEIGHT"),
    (("--hires-scale", "2", "--refiner", "somewhere"), "does not combine with --refiner"),
])
def test_bad_values_are_one_line_errors(tmp_path, args, fragment):
    out = tmp_path / "x.png"
    result = run("generate", "a red circle", "--steps", "2", *args, "-o", out)
    assert_one_line_error(result, fragment)
    assert not out.exists()
