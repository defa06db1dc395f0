"""The run options every generating command shares (cli/options.py): accepted by generate,
img2img, inpaint, outpaint, serve and batch, and applied by each (the memory plan before any
model loads, the load options, batch's job defaults), or refused in one line where they cannot
apply."""

import json
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from sdrt.runtime.memory.plan import plan_request
from sdrt.runtime.metadata import parse_parameters
from sdrt.runtime.model.folder import EMBEDDED_MODEL
from sdrt.runtime.pipeline import GenerationRequest
from tests.cli.test_cli import assert_one_line_error, run

SHARED = ("--backend", "--precision", "--threads", "--generator", "--vae", "--deepcache",
          "--low-memory", "--max-memory", "--dry-run", "--device", "--max-vram")
COMMANDS = ("generate", "img2img", "inpaint", "outpaint", "serve", "batch")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A 64×64 picture (the embedded model's size), a mask of its centre, a jobs file."""
    folder = tmp_path_factory.mktemp("inputs")
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(folder / "in.png")
    drawn = Image.new("L", (64, 64), 0)
    drawn.paste(255, (16, 16, 48, 48))
    drawn.save(folder / "mask.png")
    jobs = [{"id": "a", "prompt": "a red circle", "steps": 2, "seed": 1},
            {"id": "b", "prompt": "a blue square", "steps": 2, "seed": 2, "size": "64x128"},
            {"id": "c", "prompt": "a green star", "steps": 2, "seed": 3,
             "generator": "torch"}]
    (folder / "jobs.jsonl").write_text("".join(json.dumps(job) + "\n" for job in jobs))
    return folder


def image_args(command, inputs):
    """The positional arguments (and outpaint's extension) of an image command."""
    return {"img2img": [inputs / "in.png", "a cat"],
            "inpaint": [inputs / "in.png", inputs / "mask.png", "a cat"],
            "outpaint": [inputs / "in.png", "a cat", "--right", 16]}[command]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_generating_command_lists_the_shared_options(command):
    result = run(command, "--help")
    assert result.exit_code == 0, result.output
    listed = set(re.findall(r"(--[a-z-]+)", result.output))
    assert set(SHARED) <= listed, set(SHARED) - listed


@pytest.mark.parametrize("command", ["img2img", "inpaint", "outpaint"])
def test_image_commands_plan_memory_before_loading(command, inputs, tmp_path):
    out = tmp_path / "x.png"
    result = run(command, *image_args(command, inputs), "--dry-run", "--low-memory",
                 "--device", "cpu", "--max-memory", "2G", "--max-vram", "1G", "-o", out)
    assert result.exit_code == 0, result.output
    assert "unet" in result.output and "estimated peak: default" in result.output
    assert "budget: 2" in result.output and "plan: low-memory" in result.output
    assert not out.exists()


@pytest.mark.parametrize("command", ["img2img", "inpaint", "outpaint"])
def test_image_commands_refuse_a_budget_too_small_in_one_line(command, inputs, tmp_path):
    result = run(command, *image_args(command, inputs), "--max-memory", "1M", "-o",
                 tmp_path / "x.png")
    assert_one_line_error(result, "even in low-memory mode", "1 MB budget")
    assert not (tmp_path / "x.png").exists()


def test_img2img_plans_at_the_size_it_works_at(inputs, tmp_path):
    small = run("img2img", inputs / "in.png", "x", "--dry-run", "-o", tmp_path / "x.png")
    large = run("img2img", inputs / "in.png", "x", "--dry-run", "-W", 512, "-H", 512, "-o",
                tmp_path / "x.png")
    peak = re.compile(r"estimated peak: default (\S+ \S+)")
    assert small.exit_code == large.exit_code == 0, small.output + large.output
    assert peak.search(small.output)[1] != peak.search(large.output)[1]


def test_img2img_switches_to_low_memory_between_the_plans(inputs, tmp_path):
    plan = plan_request(EMBEDDED_MODEL, "ort", "fp32", GenerationRequest("x", width=64,
                                                                          height=64),
                        mode="auto", budget=None)
    budget = (plan.estimate.default_peak + plan.estimate.low_memory_peak) // 2
    out = tmp_path / "x.png"
    result = run("img2img", inputs / "in.png", "a cat", "--steps", 2, "--strength", 0.5,
                 "--seed", 0, "--threads", 1, "--device", "cpu", "--generator", "numpy",
                 "--max-memory", budget, "-o", out)
    assert result.exit_code == 0, result.output
    assert "switching to --low-memory" in result.output
    assert parse_parameters(Image.open(out).info["parameters"])["RNG"] == "NumPy"


def test_outpaint_runs_in_low_memory_mode(inputs, tmp_path):
    out = tmp_path / "wide.png"
    result = run("outpaint", inputs / "in.png", "a field", "--right", 16, "--steps", 2,
                 "--low-memory", "--device", "cpu", "-o", out)
    assert result.exit_code == 0, result.output
    assert Image.open(out).size == (80, 64)


def test_serve_dry_run_prints_the_plan_and_serves_nothing():
    pytest.importorskip("uvicorn")
    result = run("serve", "--dry-run", "--low-memory", "--device", "cpu", "--max-memory", "2G")
    assert result.exit_code == 0, result.output
    assert "plan: low-memory" in result.output and "budget: 2" in result.output


@pytest.mark.parametrize(("args", "fragment"), [
    (["--max-memory", "1M"], "even in low-memory mode"),
    (["--deepcache", "3"], "--deepcache does not apply to serve"),
    (["--generator", "numpy"], "--generator numpy does not apply to serve"),
])
def test_serve_refuses_in_one_line(args, fragment):
    pytest.importorskip("uvicorn")
    assert_one_line_error(run("serve", *args), fragment)


def test_batch_dry_run_plans_each_job_size(inputs, tmp_path):
    result = run("batch", inputs / "jobs.jsonl", "--out", tmp_path / "out", "--dry-run",
                 "--max-memory", "2G")
    assert result.exit_code == 0, result.output
    assert "64×64: jobs a, c" in result.output and "64×128: jobs b" in result.output
    assert result.output.count("plan: default") == 2
    assert not (tmp_path / "out").exists()


def test_batch_refuses_a_job_over_the_budget_in_one_line(inputs, tmp_path):
    result = run("batch", inputs / "jobs.jsonl", "--out", tmp_path / "out", "--max-memory",
                 "1M")
    assert_one_line_error(result, "job a (line 1)", "even in low-memory mode")
    assert not (tmp_path / "out").exists()


def test_batch_options_are_job_defaults_and_worker_load_options(inputs, tmp_path):
    out = tmp_path / "out"
    result = run("batch", inputs / "jobs.jsonl", "--out", out, "--model", EMBEDDED_MODEL,
                 "--generator", "numpy", "--low-memory", "--device", "cpu", "--threads", 1)
    assert result.exit_code == 0, result.output
    rng = {job: parse_parameters(Image.open(out / f"{job}.png").info["parameters"])["RNG"]
           for job in "abc"}
    assert rng == {"a": "NumPy", "b": "NumPy", "c": "CPU"}  # c names its own generator
    again = run("batch", inputs / "jobs.jsonl", "--out", out, "--generator", "numpy")
    assert again.exit_code == 0 and again.output.count("exists and verifies") == 3


@pytest.mark.parametrize(("args", "fragment"), [
    (["--deepcache", "3"], "--deepcache does not apply to batch"),
    (["--threads", "2", "--threads-per-worker", "3"], "give one"),
])
def test_batch_refuses_in_one_line(inputs, tmp_path, args, fragment):
    result = run("batch", inputs / "jobs.jsonl", "--out", tmp_path / "out", *args)
    assert_one_line_error(result, fragment)


def test_python_dash_m_runs_the_cli():
    done = subprocess.run([sys.executable, "-m", "sdrt.cli", "--help"], capture_output=True,
                          text=True, check=True)
    assert done.stdout.startswith("Usage: sdrt ") and "img2img" in done.stdout
