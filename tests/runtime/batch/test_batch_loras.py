"""Batch jobs with LoRAs and prompt settings (runtime/batch/job_loras.py): the `loras`,
`prompt_syntax` and `emphasis` fields checked per line before anything runs, the pictures equal
to Pipeline's, and a resumed run that keeps a PNG only when its LoRAs match the job's."""

import numpy as np
import pytest
from PIL import Image

from sdrt.runtime.batch.runner import run_batch
from sdrt.runtime.metadata import parse_parameters
from sdrt.runtime.pipeline import Pipeline
from tests.cli.test_cli import run
from tests.cli.test_lora_options import lora_file
from tests.runtime.batch.test_batch import results, write_jobs
from tests.runtime.server.test_networks import fitting_lora


@pytest.fixture
def loras(tmp_path):
    folder = tmp_path / "loras"
    folder.mkdir()
    lora_file(folder / "ink.safetensors")
    return folder


@pytest.mark.parametrize(("fields", "fragment"), [
    ({"loras": "ink"}, "loras must be a list"),
    ({"loras": [["nope", 0.5]]}, "unknown LoRA 'nope'; --lora-dir"),
    ({"loras": [["ink", "high"]]}, "weight must be a finite number"),
    ({"loras": [{"name": "ink"}]}, "a LoRA is a name or path"),
    ({"prompt": "x <lora:nope:1>"}, "unknown LoRA 'nope'"),
    ({"prompt_syntax": "markdown"}, "unknown prompt syntax 'markdown'"),
    ({"emphasis": 2}, "emphasis must be a string"),
    ({"emphasis": "loud"}, "unknown emphasis 'loud'"),
])
def test_bad_lora_and_prompt_fields_fail_their_line(loras, tmp_path, fields, fragment):
    jobs = write_jobs(tmp_path / "jobs.jsonl", [{"prompt": "x", "steps": 1, **fields}])
    report = run_batch(jobs, tmp_path / "out", load={"lora_dir": str(loras)})
    [record] = report.records
    assert record["status"] == "invalid" and fragment in record["error"], record


def test_jobs_with_loras_equal_the_pipeline_and_resume_by_their_loras(tiny_onnx_dir, tmp_path):
    folder = tmp_path / "loras"
    folder.mkdir()
    fitting_lora(tiny_onnx_dir, folder / "style.safetensors")
    common = {"model": str(tiny_onnx_dir), "steps": 2, "seed": 3, "prompt": "a red circle"}
    jobs = [{"id": "field", **common, "loras": [["style", 0.8]]},
            {"id": "tag", **common, "prompt": "a red circle <lora:style:0.8>",
             "emphasis": "no-norm"},
            {"id": "path", **common, "loras": [str(folder / "style.safetensors")],
             "prompt_syntax": "plain"}]
    load = {"lora_dir": str(folder)}
    report = run_batch(write_jobs(tmp_path / "jobs.jsonl", jobs), tmp_path / "out", load=load)
    assert report.ok and report.counts == {"done": 3}, report.records
    pipe = Pipeline.load(tiny_onnx_dir, lora_dir=folder)
    want = {"field": pipe.generate("a red circle", steps=2, seed=3, loras=[("style", 0.8)]),
            "tag": pipe.generate("a red circle <lora:style:0.8>", steps=2, seed=3,
                                 emphasis="no-norm"),
            "path": pipe.generate("a red circle", steps=2, seed=3, prompt_syntax="plain",
                                  loras=[str(folder / "style.safetensors")])}
    for job_id, [image] in want.items():
        made = Image.open(tmp_path / "out" / f"{job_id}.png")
        assert np.array_equal(np.asarray(made), np.asarray(image)), job_id
        assert parse_parameters(made.info["parameters"])["Lora hashes"].startswith("style: ")
    # A re-run keeps what verifies; a job whose LoRAs changed is made again.
    jobs[0] = {**jobs[0], "loras": []}
    again = run_batch(write_jobs(tmp_path / "jobs.jsonl", jobs), tmp_path / "out", load=load)
    statuses = {record["id"]: record["status"] for record in again.records}
    assert statuses == {"field": "done", "tag": "skipped", "path": "skipped"}
    assert "Lora hashes" not in Image.open(tmp_path / "out" / "field.png").info["parameters"]


def test_batch_cli_gives_its_prompt_options_to_jobs_that_name_none(tiny_onnx_dir, tmp_path):
    folder = tmp_path / "loras"
    folder.mkdir()
    fitting_lora(tiny_onnx_dir, folder / "style.safetensors")
    jobs = write_jobs(tmp_path / "jobs.jsonl", [
        {"id": "styled", "prompt": "x", "steps": 1, "seed": 1},
        {"id": "own", "prompt": "x", "steps": 1, "seed": 1, "loras": []}])
    result = run("batch", jobs, "--out", tmp_path / "out", "--model", tiny_onnx_dir,
                 "--lora-dir", folder, "--lora", "style:0.5", "--emphasis", "none")
    assert result.exit_code == 0, result.output
    assert {record["status"] for record in results(tmp_path / "out")} == {"done"}
    styled = Image.open(tmp_path / "out" / "styled.png").info["parameters"]
    assert "Lora hashes: " in styled
    assert "Lora hashes" not in Image.open(tmp_path / "out" / "own.png").info["parameters"]
