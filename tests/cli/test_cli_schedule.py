"""`--schedule` (A1111's Schedule type) beside `--sampler`, on the embedded model."""

import numpy as np
from click.testing import CliRunner
from PIL import Image

from sdrt.cli.main import main
from sdrt.runtime.metadata import parse_parameters
from sdrt.runtime.samplers import sampler_names
from sdrt.runtime.schedules import SCHEDULES


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_schedule_karras_equals_the_named_pair_and_is_recorded(tmp_path):
    base = ("generate", "a red circle", "--steps", "3", "--seed", "2")
    explicit = run(*base, "--sampler", "dpmpp_2m", "--schedule", "karras",
                   "-o", tmp_path / "a.png")
    named = run(*base, "--sampler", "DPM++ 2M Karras", "-o", tmp_path / "b.png")
    assert explicit.exit_code == 0 and named.exit_code == 0, explicit.output + named.output
    a, b = Image.open(tmp_path / "a.png"), Image.open(tmp_path / "b.png")
    assert np.array_equal(np.asarray(a), np.asarray(b))
    params = parse_parameters(a.info["parameters"])
    assert (params["Sampler"], params["Schedule type"]) == ("DPM++ 2M", "Karras")


def test_help_lists_the_registries(tmp_path):
    text = " ".join(run("generate", "--help").output.split())
    assert ", ".join(sampler_names()) in text
    assert "|".join(SCHEDULES) in text


def test_a_sampler_on_its_own_timesteps_refuses_a_schedule(tmp_path):
    result = run("generate", "x", "--sampler", "ddim", "--schedule", "Karras",
                 "-o", tmp_path / "x.png")
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert "error: sampler 'ddim' runs on its own timesteps only" in result.output
    assert not (tmp_path / "x.png").exists()
