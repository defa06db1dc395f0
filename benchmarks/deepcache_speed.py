"""DeepCache speed: one guided UNet call of the plain, full and shallow graphs, then end to end
per interval N against the uncached run, all in one process so the ratios hold on a noisy
machine (DeepCache: Ma, Fang, Wang, CVPR 2024, arXiv:2312.00858; runtime/deepcache.py). Each
figure is wall seconds and this process's CPU seconds (all its threads): on a machine other jobs
share, the CPU seconds of the same work vary less than the wall time.

Usage: python -m sdrt.benchmarks.deepcache_speed --model DIR [--backend openvino]
       [--precision bf16] [--intervals 2,3,4,5] [--steps 20] [--size 512] [--guidance 7.5]
       [--runs 3] [--threads N] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from sdrt.runtime.deepcache import FEATURE
from sdrt.runtime.pipeline import Pipeline

PROMPT = "a photograph of an astronaut riding a horse"


def clocked(call: Callable[[], object]) -> tuple[float, float]:
    """Wall and process CPU seconds of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    call()
    return time.perf_counter() - wall, time.process_time() - cpu


def timed(call: Callable[[], object], runs: int) -> dict[str, float]:
    """The first call's seconds (compile) apart from the medians of `runs` more."""
    first, _ = clocked(call)
    walls, cpus = zip(*(clocked(call) for _ in range(runs)), strict=True)
    return {"first_s": round(first, 3), "median_s": round(statistics.median(walls), 3),
            "median_cpu_s": round(statistics.median(cpus), 3),
            "runs_s": [round(t, 3) for t in walls]}


def step_times(pipe: Pipeline, size: int, runs: int) -> dict[str, dict[str, float]]:
    """One guided (batch 2) call of the plain UNet, the full graph and the shallow graph."""
    rng = np.random.default_rng(0)
    latent = size // pipe.facts.vae_scale_factor
    sample = rng.standard_normal((2, pipe.facts.latent_channels, latent, latent),
                                 dtype=np.float32)  # (2, 4, h, w)
    width = pipe.unet.session.inputs["encoder_hidden_states"].shape[-1]
    context = rng.standard_normal((2, 77, width), dtype=np.float32)  # (2, 77, D)
    graphs = pipe.deepcache()
    feeds = graphs.full.feeds(sample, 500.0, context)
    feature = graphs.full.session.run(feeds)[FEATURE]
    shallow = {**{k: v for k, v in feeds.items() if k in graphs.shallow.inputs},
               FEATURE: feature}
    return {"plain": timed(lambda: pipe.unet(sample, 500.0, context), runs),
            "full": timed(lambda: graphs.full.session.run(feeds), runs),
            "shallow": timed(lambda: graphs.shallow.run(shallow), runs)}


def end_to_end(pipe: Pipeline, intervals: list[int], options: dict) -> dict[str, list[float]]:
    """[wall, CPU] seconds of one text-to-image call, uncached and per interval (after a
    warm-up call)."""
    pipe.generate(PROMPT, **{**options, "steps": 2}, deepcache=2)  # compiles every graph
    seconds = {}
    for interval in [None, *intervals]:
        wall, cpu = clocked(lambda n=interval: pipe.generate(PROMPT, **options, deepcache=n))
        seconds["uncached" if interval is None else f"N={interval}"] = [round(wall, 2),
                                                                         round(cpu, 2)]
        print(json.dumps(seconds), flush=True)
    return seconds


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--backend", default="openvino")
    parser.add_argument("--precision", default="bf16")
    parser.add_argument("--intervals", default="2,3,4,5")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    pipe = Pipeline.load(args.model, args.backend, precision=args.precision,
                         threads=args.threads)
    steps = step_times(pipe, args.size, args.runs)
    print(json.dumps(steps), flush=True)
    options = {"steps": args.steps, "guidance_scale": args.guidance, "width": args.size,
               "height": args.size, "seed": 0}
    intervals = [int(n) for n in args.intervals.split(",") if n]
    result = {"model": str(args.model), "backend": args.backend, "precision": args.precision,
              "size": args.size, "steps": args.steps, "guidance": args.guidance,
              "unet_call": steps,
              "shallow_over_full": round(steps["shallow"]["median_s"]
                                         / steps["full"]["median_s"], 3),
              "shallow_over_full_cpu": round(steps["shallow"]["median_cpu_s"]
                                             / steps["full"]["median_cpu_s"], 3),
              "end_to_end_s": end_to_end(pipe, intervals, options)}
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
