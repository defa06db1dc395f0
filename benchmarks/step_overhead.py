"""The runtime's own per-step cost outside the UNet call, against the UNet call it wraps.

Runs the real `Pipeline.run` loop twice at SD 1.5 shapes (512×512, CFG batch 2, 77×768 text
states): once with the exported UNet to time a UNet call, once with that session swapped for one
that returns a ready output at no cost, so whatever time remains per step is sdrt's overhead
(feed checks and casts, CFG combine, sampler arithmetic, noise draws, the callback).

Usage: python -m sdrt.benchmarks.step_overhead --model DIR [--steps 10] [--unet-runs 3]
(DIR: a full-size SD 1.5 export, e.g. from models/build_random_sd.py then `sdrt export`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

from sdrt.runtime.flow_match import is_flow_matching
from sdrt.runtime.pipeline import GenerationRequest, Pipeline
from sdrt.runtime.samplers import SAMPLERS
from sdrt.runtime.session import CheckedSession


class InstantSession(CheckedSession):
    """Stands in for a graph: same specs and boundary checks, output ready in advance."""

    def __init__(self, real, output: np.ndarray) -> None:
        self.inputs, self.outputs, self.label = real.inputs, real.outputs, real.label
        self._output = output

    def _infer(self, feeds):
        return {"out_sample": self._output}


def time_unet(pipe: Pipeline, shape: tuple[int, ...], runs: int) -> tuple[float, list[float]]:
    """Seconds of the first UNet call at `shape` (the CFG batch; OpenVINO compiles the shape
    then) and of each of `runs` calls after it."""
    rng = np.random.default_rng(0)
    sample = rng.standard_normal(shape, dtype=np.float32)
    width = pipe.unet.session.inputs["encoder_hidden_states"].shape[-1]
    context = rng.standard_normal((shape[0], 77, width), dtype=np.float32)
    start = time.perf_counter()
    pipe.unet(sample, 999.0, context)
    first = time.perf_counter() - start
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        pipe.unet(sample, 999.0, context)
        times.append(time.perf_counter() - start)
    return first, times


def step_overheads(pipe: Pipeline, request: GenerationRequest) -> list[float]:
    """Seconds between consecutive step callbacks with the instant UNet (steps 2..n)."""
    stamps: list[float] = []
    pipe.run(request, callback=lambda i, n, x: stamps.append(time.perf_counter()))
    return list(np.diff(stamps))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--unet-runs", type=int, default=3)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--height", type=int, default=512)
    args = parser.parse_args()

    pipe = Pipeline.load(args.model)
    latent = (2, 4, args.height // 8, args.width // 8)  # CFG doubles the batch
    unet_s = statistics.median(time_unet(pipe, latent, args.unet_runs)[1])
    pipe.unet.session = InstantSession(pipe.unet.session, np.zeros(latent, np.float32))
    rows = []
    flow = is_flow_matching(pipe.scheduler)
    for sampler in (name for name, spec in SAMPLERS.items() if spec.flow == flow):
        request = GenerationRequest("a photo", steps=args.steps, sampler=sampler, seed=0,
                                    guidance_scale=7.5,  # guided, as `latent` assumes
                                    width=args.width, height=args.height)
        overhead_s = statistics.median(step_overheads(pipe, request))
        rows.append({"sampler": sampler, "overhead_ms": overhead_s * 1e3,
                     "percent_of_unet_call": 100 * overhead_s / unet_s})
    print(json.dumps({"unet_call_ms": unet_s * 1e3, "shape": latent, "steps": args.steps,
                      "samplers": rows}, indent=2))
    worst = max(row["percent_of_unet_call"] for row in rows)
    print(f"worst per-step overhead: {worst:.3f}% of a UNet call (limit 2%)")


if __name__ == "__main__":
    main()
