"""Shared by the peer runner scripts: their command line, the timing loop and the report line.

A runner runs inside its peer's own venv (the peers' pins clash with sdrt's and each other's),
so this file and the runners import only the standard library, numpy and the peer's own
packages, never sdrt. Each runner prints one JSON line on stdout: load seconds (model read,
scheduler swap, reshape and compile), the first generation apart, the steady-state generations
(list, median, p90), peak RSS of the process, UNet calls per image and library versions; or
`{"skipped": reason}` when the peer cannot run the request here (e.g. no bf16 on this CPU).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import resource
import statistics
import sys
import time
from collections.abc import Callable
from importlib import metadata
from typing import Any, NoReturn

import numpy as np

# Samplers every side can run with the same step count: one UNet call per step (diffusers'
# default PNDM makes 20 steps 21 calls). sdrt name → diffusers scheduler class.
SCHEDULERS = {"ddim": "DDIMScheduler", "euler": "EulerDiscreteScheduler"}


def parse_args(description: str, precisions: tuple[str, ...]) -> argparse.Namespace:
    """The options every runner takes (the comparison passes the same ones to each)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--model", required=True, help="model folder in this peer's layout")
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--height", type=int, default=512)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--runs", type=int, default=3, help="steady-state generations")
    parser.add_argument("--sampler", choices=sorted(SCHEDULERS), default="ddim")
    parser.add_argument("--precision", choices=precisions, default=precisions[0])
    parser.add_argument("--prompt", default="a photograph of an astronaut riding a horse")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="default: the library's own")
    return parser.parse_args()


def versions(*names: str) -> dict[str, str]:
    """Installed versions of the named distributions (those missing are left out)."""
    found = {}
    for name in names:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


def count_forward(part: Any) -> list[None]:
    """A list that grows by one per call of `part` (its `forward`, wrapped on the instance).

    diffusers, optimum and optimum-intel all call a UNet part through `__call__`, which calls
    `self.forward`; functools.wraps keeps the signature that pipelines inspect.
    """
    calls: list[None] = []
    original = part.forward

    @functools.wraps(original)
    def counting(*args, **kwargs):
        calls.append(None)
        return original(*args, **kwargs)

    part.forward = counting
    return calls


def set_sampler(pipe: Any, sampler: str, diffusers: Any) -> None:
    """Give a diffusers-style pipeline the scheduler of `sampler` and silence its progress bar."""
    scheduler = getattr(diffusers, SCHEDULERS[sampler])
    pipe.scheduler = scheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)


def pipeline_call(args: argparse.Namespace, torch: Any,
                  context: Callable[[], Any] = contextlib.nullcontext) -> Callable[[Any], int]:
    """`generate` for `measure`: one image from a loaded (pipeline, UNet call counter) pair, the
    request from the runner's options, inside `context()` (e.g. torch.autocast); its UNet calls."""

    def generate(loaded: tuple[Any, list[None]]) -> int:
        pipe, calls = loaded
        before = len(calls)
        with context():
            pipe(args.prompt, num_inference_steps=args.steps, guidance_scale=args.guidance,
                 width=args.width, height=args.height,
                 generator=torch.Generator().manual_seed(args.seed))
        return len(calls) - before

    return generate


def measure(load: Callable[[], Any], generate: Callable[[Any], int | None],
            runs: int) -> tuple[dict, Any]:
    """Time `load()`, then the first `generate(loaded)` apart from `runs` more; the row, and
    what `load` returned. `generate` returns its UNet calls (None: the peer cannot count them).
    """
    start = time.perf_counter()
    loaded = load()
    load_s = time.perf_counter() - start
    start = time.perf_counter()
    unet_calls = generate(loaded)
    first_call_s = time.perf_counter() - start
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        generate(loaded)
        times.append(time.perf_counter() - start)
    row = {
        "load_s": load_s, "first_call_s": first_call_s, "first_run_s": load_s + first_call_s,
        "times_s": times, "median_s": statistics.median(times) if times else first_call_s,
        "p90_s": float(np.percentile(times, 90)) if times else first_call_s,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "unet_calls": unet_calls,
    }
    return row, loaded


def report(row: dict) -> None:
    """The runner's result: one JSON line, the last on stdout."""
    print(json.dumps(row), flush=True)


def skip(reason: str) -> NoReturn:
    """Report that this peer cannot run the request here, and stop."""
    report({"skipped": reason})
    sys.exit(0)
