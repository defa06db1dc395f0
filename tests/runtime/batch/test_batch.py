"""`sdrt batch` with the local engine: same pixels as Pipeline, bad lines reported by number and
skipped, resumable runs, results.jsonl, and one-line CLI errors."""

import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from sdrt.cli.main import main
from sdrt.runtime.batch.runner import RESULTS_FILE, run_batch
from sdrt.runtime.pipeline import Pipeline

JOBS = [
    {"id": "circle", "prompt": "a big red circle on a blue background", "seed": 7, "steps": 4},
    {"prompt": "a small green square in the top left", "negative_prompt": "purple", "seed": 8,
     "steps": 3, "sampler": "Euler a", "guidance_scale": 5},
    {"id": "tri", "prompt": "a yellow triangle", "seed": 9, "steps": 4, "size": "32x48",
     "sampler": "dpmpp_2m", "generator": "numpy"},
]


def write_jobs(path, lines):
    """A JSONL file: dicts as JSON, strings as they are."""
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n"
                            for line in lines), "utf-8")
    return path


def results(out):
    return [json.loads(line) for line in (out / RESULTS_FILE).read_text("utf-8").splitlines()]


@pytest.fixture(scope="module")
def pipe():
    return Pipeline.load(threads=1)


def reference(pipe, job):
    """What Pipeline.generate makes for a job's fields."""
    options = {k: v for k, v in job.items() if k not in ("id", "prompt", "size")}
    if "size" in job:
        options["width"], options["height"] = map(int, job["size"].split("x"))
    return pipe.generate(job["prompt"], **options)[0]


def test_batch_matches_pipeline_and_writes_results(pipe, tmp_path):
    jobs = write_jobs(tmp_path / "jobs.jsonl", JOBS)
    report = run_batch(jobs, tmp_path / "out", workers=2, threads_per_worker=1)
    assert report.ok and report.counts == {"done": 3}
    records = {record["id"]: record for record in results(tmp_path / "out")}
    assert sorted(records) == ["00002", "circle", "tri"]
    for job, job_id in zip(JOBS, ("circle", "00002", "tri"), strict=True):
        made = Image.open(tmp_path / "out" / f"{job_id}.png")
        want = reference(pipe, job)
        assert np.array_equal(np.asarray(made), np.asarray(want)), job_id
        assert made.info["parameters"] == want.info["parameters"]
        record = records[job_id]
        assert (record["status"], record["file"], record["seed"], record["attempts"]) == (
            "done", f"{job_id}.png", job["seed"], 1)
        assert set(record["timings"]) == {"load_s", "generate_s", "save_s"}
        assert record["worker"].split(":")[0]  # host:pid/thread
    # the two threads share one worker, which loads the model once
    assert sum(record["timings"]["load_s"] > 0 for record in records.values()) == 1


def test_bad_lines_are_reported_by_number_and_skipped(tmp_path):
    lines = [
        JOBS[0],
        "not json",
        {"prompt": "x", "promt": "typo"},
        "",
        {"prompt": "x", "steps": 0},
        {"id": "circle", "prompt": "same id"},
        {"id": "../up", "prompt": "x"},
        {"prompt": "x", "model": str(tmp_path / "missing")},
        {"prompt": "x", "size": 64, "width": 64},
        {"prompt": 5},
        {"negative_prompt": "no prompt"},
        {"prompt": "x", "width": 30},
        {"prompt": "x", "precision": "int4"},
        "[1, 2]",
        {"prompt": "last one is fine", "seed": 1, "steps": 2},
    ]
    report = run_batch(write_jobs(tmp_path / "jobs.jsonl", lines), tmp_path / "out")
    invalid = {r["line"]: r["error"] for r in report.records if r["status"] == "invalid"}
    # a fragment of each message (those of GenerationRequest and the variants module are theirs)
    assert sorted(invalid) == [2, 3, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14]
    for line, fragment in {
        2: "not valid JSON: Expecting value at column 1",
        3: "unknown field 'promt'; fields: id, prompt, negative_prompt, seed, width, height, "
           "size, steps, guidance_scale, sampler, generator, model, backend, precision",
        5: "steps", 6: "id 'circle' is taken by line 1",
        7: "id must be 1-100 letters, digits, '.', '_' or '-', not starting with '.', "
           "got '../up'",
        8: f"model folder '{tmp_path / 'missing'}' does not exist",
        9: "give size or width/height, not both", 10: "prompt must be a string, got int",
        11: "prompt is missing", 12: "width", 13: "int4",
        14: "a job must be a JSON object, got list",
    }.items():
        assert fragment in invalid[line], (line, invalid[line])
    assert sorted(r["id"] for r in report.records if r["status"] == "done") == ["00015", "circle"]
    assert not report.ok
    assert results(tmp_path / "out") == report.records


def test_rerun_skips_verified_outputs_and_redoes_the_rest(tmp_path):
    out = tmp_path / "out"
    jobs = [dict(job, id=f"j{i}", steps=2) for i, job in enumerate(JOBS)]
    jobs.append({"id": "random", "prompt": "a circle", "steps": 2})  # no seed: a random one
    path = write_jobs(tmp_path / "jobs.jsonl", jobs)
    first = {r["id"]: r for r in run_batch(path, out).records}
    kept = (out / "j0.png").read_bytes()
    whole = (out / "j1.png").read_bytes()
    (out / "j1.png").write_bytes(whole[: len(whole) // 2])  # truncated
    (out / "j2.png").unlink()
    jobs[0] = dict(jobs[0], seed=70)  # j0's old PNG no longer matches its job
    jobs.append({"id": "new", "prompt": "a square", "steps": 2, "seed": 1})
    second = {r["id"]: r for r in run_batch(write_jobs(path, jobs), out).records}
    assert {job_id: r["status"] for job_id, r in second.items()} == {
        "j0": "done", "j1": "done", "j2": "done", "new": "done", "random": "skipped"}
    assert second["random"]["seed"] == first["random"]["seed"]  # the seed its PNG has
    assert second["j0"]["seed"] == 70 and (out / "j0.png").read_bytes() != kept
    assert (out / "j1.png").read_bytes() == whole  # made again, byte for byte
    third = run_batch(path, out)
    assert third.counts == {"skipped": 5}
    assert len(results(out)) == 4 + 5 + 5  # every run appends one record per job


def run_cli(*args):
    return CliRunner().invoke(main, [str(arg) for arg in args])


def test_cli_reports_bad_lines_and_runs_the_rest(tmp_path):
    path = write_jobs(tmp_path / "jobs.jsonl", [dict(JOBS[0], steps=2), '{"prompt": 1}'])
    result = run_cli("batch", path, "--out", tmp_path / "out")
    assert result.exit_code == 1
    assert result.stderr.splitlines() == ["line 2: skipped: prompt must be a string, got int"]
    assert "Traceback" not in result.output
    assert f"saved {tmp_path / 'out' / 'circle.png'}" in result.stdout
    assert "1 done, 0 kept, 0 failed, 1 bad lines" in result.stdout
    write_jobs(path, [dict(JOBS[0], steps=2)])
    again = run_cli("batch", path, "--out", tmp_path / "out")
    assert again.exit_code == 0, again.output
    assert f"kept {tmp_path / 'out' / 'circle.png'}  (exists and verifies)" in again.stdout


@pytest.mark.parametrize(("args", "message"), [
    (["missing.jsonl", "--out", "out"], "error: jobs file 'missing.jsonl' does not exist"),
    (["jobs.jsonl", "--out", "jobs.jsonl"],
     "error: output folder 'jobs.jsonl' exists and is not a folder"),
    (["jobs.jsonl", "--out", "out", "--engine", "spark"],
     "error: unknown engine 'spark'; choose one of: local, ray"),
    (["jobs.jsonl", "--out", "out", "--ray-address", "auto"],
     "error: a Ray address needs the ray engine (--engine ray)"),
])
def test_cli_fatal_errors_are_one_line(tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    write_jobs(tmp_path / "jobs.jsonl", [JOBS[0]])
    result = run_cli("batch", *args)
    assert result.exit_code == 1
    assert result.stderr.splitlines() == [message]
    assert not (tmp_path / "out").exists()
