"""`sdrt batch --engine ray` on a local Ray cluster started once for this module: the local
engine's images for the same jobs, a worker killed mid-batch, the CLI joining a running cluster."""

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from sdrt.runtime.batch.runner import RESULTS_FILE, run_batch
from sdrt.runtime.model.folder import EMBEDDED_MODEL

ray = pytest.importorskip("ray", reason="ray is not installed (pip install 'sdrt[ray]')")

PROMPTS = ["a big red circle on a blue background", "a small green square in the top left",
           "a yellow triangle on the right", "black background, big white square"]
SAMPLERS = ["ddim", "euler_a", "dpmpp_2m", "euler"]
JOBS = [{"id": f"job{i}", "prompt": PROMPTS[i % 4], "seed": 100 + i, "steps": 6,
         "sampler": SAMPLERS[i % 4]} for i in range(7)]
JOBS[3]["size"] = "48x32"
# The third job in the queue goes to whichever worker finishes first, and the fault test kills
# that worker as soon as its first image is saved: many steps keep this job running until then.
JOBS[2]["steps"] = 150
JOB_IDS = sorted(job["id"] for job in JOBS)


def write_jobs(path, jobs):
    path.write_text("".join(json.dumps(job) + "\n" for job in jobs), "utf-8")
    return path


def pngs(out):
    """{job id: PNG bytes}: equal bytes mean equal pixels and equal metadata."""
    return {path.stem: path.read_bytes() for path in sorted(out.glob("*.png"))}


def pid(record):
    return int(record["worker"].split(":")[1])


@pytest.fixture(scope="module")
def cluster():
    """A two-CPU local Ray cluster; yields its address for other drivers to join."""
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def jobs_file(tmp_path_factory):
    return write_jobs(tmp_path_factory.mktemp("jobs") / "jobs.jsonl", JOBS)


@pytest.fixture(scope="module")
def local_pngs(jobs_file, tmp_path_factory):
    """The local engine's PNGs for JOBS (one thread, as each Ray worker below has)."""
    out = tmp_path_factory.mktemp("local")
    assert run_batch(jobs_file, out, threads_per_worker=1).counts == {"done": len(JOBS)}
    return pngs(out)


@pytest.fixture(scope="module")
def broken_model(tmp_path_factory):
    """The embedded model with its UNet graph cut in half: it fails in the worker's load."""
    folder = tmp_path_factory.mktemp("broken") / "broken"
    shutil.copytree(EMBEDDED_MODEL, folder)
    graph = folder / "unet" / "model.onnx"
    os.truncate(graph, graph.stat().st_size // 2)
    return folder


def test_ray_makes_the_local_engines_images(cluster, jobs_file, local_pngs, broken_model,
                                            tmp_path):
    broken = {"id": "broken", "prompt": "x", "steps": 2, "model": str(broken_model)}
    jobs = write_jobs(tmp_path / "jobs.jsonl", [*JOBS, broken])
    report = run_batch(jobs, tmp_path / "out", engine="ray", workers=2, threads_per_worker=1)
    assert report.counts == {"done": len(JOBS), "failed": 1}
    assert pngs(tmp_path / "out") == local_pngs
    done = [r for r in report.records if r["status"] == "done"]
    assert len({pid(r) for r in done}) == 2 and os.getpid() not in {pid(r) for r in done}
    [failed] = [r for r in report.records if r["status"] == "failed"]
    assert failed["id"] == "broken" and failed["attempts"] == 1  # the job's fault: no retry
    assert "'unet/model.onnx' in 'broken' has" in failed["error"]


def test_a_worker_killed_mid_batch_loses_only_its_job(cluster, jobs_file, local_pngs, tmp_path):
    killed = []

    def kill_first_worker(record):
        # By now the driver has handed this worker its next job (JOBS[2], long): kill -9.
        if record["status"] == "done" and not killed:
            killed.append(pid(record))
            os.kill(killed[0], signal.SIGKILL)

    out = tmp_path / "out"
    report = run_batch(jobs_file, out, engine="ray", workers=2, threads_per_worker=1,
                       on_result=kill_first_worker)
    done = [r for r in report.records if r["status"] == "done"]
    assert sorted(r["id"] for r in done) == JOB_IDS  # every job once, none failed
    assert report.counts == {"done": len(JOBS)}
    [retried] = [r for r in done if r["attempts"] > 1]
    assert (retried["id"], retried["attempts"]) == ("job2", 2)
    assert [r for r in done if pid(r) == killed[0]] == [done[0]]  # nothing after its death
    assert pngs(out) == local_pngs
    assert [json.loads(line) for line in (out / RESULTS_FILE).read_text().splitlines()] == done


def test_cli_joins_a_running_cluster(cluster, local_pngs, tmp_path):
    jobs = write_jobs(tmp_path / "jobs.jsonl", JOBS[:2])
    sdrt = Path(sys.executable).with_name("sdrt")
    result = subprocess.run([sdrt, "batch", jobs, "--out", tmp_path / "out", "--engine", "ray",
                             "--ray-address", cluster, "--threads-per-worker", "1"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "2 done, 0 kept, 0 failed, 0 bad lines" in result.stdout
    assert pngs(tmp_path / "out") == {job["id"]: local_pngs[job["id"]] for job in JOBS[:2]}
