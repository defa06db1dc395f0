"""Throughput of `sdrt batch` in images per minute: the local engine, and Ray at 1 and 2 workers.

Every scenario runs the same jobs (distinct prompts and seeds, the model's default steps and
size) into a fresh folder, `--runs` times, the scenarios taking turns so that load from other
users of a shared machine spreads over all of them. Figures are medians over the runs:

- end to end: jobs / wall time of `run_batch`, which counts loading the pipelines and, for Ray,
  starting the actors, but not starting the Ray cluster (once, timed apart);
- steady: (jobs - 1) / time from the first image saved to the last, the rate once running;
- generate: seconds per image inside a worker (under the other workers' contention).

Usage: python -m sdrt.benchmarks.batch_throughput [--jobs 24] [--runs 3] [--model DIR]
       [--scenarios local-1x2,local-2x1,ray-1x2,ray-2x1] [--json FILE]
(SCENARIO is ENGINE-WORKERSxTHREADS; no --model: sdrt's embedded model.)
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

from sdrt.runtime.batch.runner import run_batch
from sdrt.runtime.machine import cpu_facts

DEFAULT_SCENARIOS = "local-1x2,local-2x1,ray-1x2,ray-2x1"
COLOURS = ["red", "green", "blue", "yellow", "purple", "white"]
SHAPES = ["circle", "square", "triangle"]
PLACES = ["top left", "centre", "bottom right", "on the left"]


def make_jobs(count: int, model: str | None) -> list[dict]:
    """`count` jobs the embedded model knows how to draw, seeds 0..count-1."""
    scenes = itertools.cycle(itertools.product(COLOURS, SHAPES, PLACES))
    jobs = []
    for seed, (colour, shape, place) in zip(range(count), scenes, strict=False):
        job = {"id": f"job{seed:03d}", "prompt": f"a {colour} {shape} in the {place}",
               "seed": seed}
        jobs.append({**job, "model": model} if model else job)
    return jobs


def parse_scenario(text: str) -> tuple[str, int, int]:
    """"ray-2x1" → ("ray", 2 workers, 1 thread each)."""
    engine, _, shape = text.partition("-")
    workers, _, threads = shape.partition("x")
    return engine, int(workers), int(threads)


def run_once(jobs: list[dict], scenario: str) -> dict[str, float]:
    """One batch of `jobs` in a fresh folder: its wall time, steady rate and generate times."""
    engine, workers, threads = parse_scenario(scenario)
    saved: list[float] = []
    generate: list[float] = []

    def seen(record: dict) -> None:
        saved.append(time.perf_counter())
        generate.append(record["timings"]["generate_s"])

    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        report = run_batch(jobs, out, engine=engine, workers=workers,
                           threads_per_worker=threads, on_result=seen)
        wall = time.perf_counter() - start
    if report.counts != {"done": len(jobs)}:
        raise RuntimeError(f"{scenario}: {dict(report.counts)}")
    steady = (len(jobs) - 1) / (saved[-1] - saved[0]) * 60 if len(jobs) > 1 else float("nan")
    return {"wall_s": wall, "per_min": len(jobs) / wall * 60, "steady_per_min": steady,
            "generate_s": statistics.median(generate)}


def machine() -> dict[str, object]:
    """CPU, cores and library versions: what the figures depend on."""
    import onnxruntime
    import ray

    return {"cpu": cpu_facts()["cpu"], "cores": os.cpu_count(), "python": platform.python_version(),
            "onnxruntime": onnxruntime.__version__, "ray": ray.__version__}


def main(argv: list[str] | None = None) -> dict[str, object]:
    """Run every scenario `--runs` times; print a Markdown table and return the report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=24)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--model", help="model folder (default: sdrt's embedded model)")
    parser.add_argument("--scenarios", default=DEFAULT_SCENARIOS)
    parser.add_argument("--json", type=Path, help="also write the report here")
    args = parser.parse_args(argv)
    scenarios = args.scenarios.split(",")
    jobs = make_jobs(args.jobs, args.model)
    cluster_start_s = None
    if any(parse_scenario(s)[0] == "ray" for s in scenarios):
        import ray

        start = time.perf_counter()
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level=logging.WARNING)
        cluster_start_s = time.perf_counter() - start
    load_before = os.getloadavg()
    runs: dict[str, list[dict[str, float]]] = {s: [] for s in scenarios}
    for _ in range(args.runs):
        for scenario in scenarios:
            runs[scenario].append(run_once(jobs, scenario))
    rows = [{"scenario": s, **{key: statistics.median(run[key] for run in runs[s])
                                for key in runs[s][0]}, "runs": runs[s]} for s in scenarios]
    report = {"jobs": args.jobs, "runs": args.runs, "model": args.model or "embedded",
              "ray_cluster_start_s": cluster_start_s, "machine": machine(),
              "load_average_before_after": [load_before[0], os.getloadavg()[0]], "rows": rows}
    print("| scenario | images/min end to end | images/min steady | s/image in a worker |")
    print("| --- | ---: | ---: | ---: |")
    for row in rows:
        print(f"| {row['scenario']} | {row['per_min']:.0f} | {row['steady_per_min']:.0f} | "
              f"{row['generate_s']:.3f} |")
    print(f"Ray cluster start: {cluster_start_s and round(cluster_start_s, 1)} s; load average "
          f"{load_before[0]:.1f} → {os.getloadavg()[0]:.1f}; {report['machine']}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n", "utf-8")
    return report


if __name__ == "__main__":
    main()
