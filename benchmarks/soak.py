"""Soak test: many generations on one loaded pipeline, with resident memory (RSS) tracked.

One `Pipeline` generates `--runs` times in this process, prompts and seeds varying, and every
`--cancel-every`-th run is stopped by its step callback and every `--fail-every`-th (offset by
half that) fails in its callback with a GenerationError, so the paths that end a generation
early are soaked too. RSS is read after `--warmup` untimed generations (ONNX Runtime's arena and
the allocator's pools have grown to their working size by then) and after every run; the
drift is the RSS at the end minus the RSS after warm-up. The process exits 1 when the drift
exceeds `--max-drift-mb`.

Usage: python -m sdrt.benchmarks.soak --runs 500 [--model DIR] [--backend ort] [--steps N]
(no --model: sdrt's embedded model at its defaults).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from sdrt.runtime.errors import GenerationError
from sdrt.runtime.pipeline import GenerationRequest, Pipeline

MAX_DRIFT_MB = 20.0  # the bound on RSS growth after warm-up
WARMUP = 20
PROMPTS = ("a red circle on a blue background", "two small green squares on a white background",
           "a large yellow triangle in the top left", "a purple star on black, bottom right")
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes() -> int:
    """This process's resident set size now (Linux /proc; psutil elsewhere)."""
    statm = Path("/proc/self/statm")
    if statm.exists():
        return int(statm.read_text().split()[1]) * _PAGE
    import psutil

    return psutil.Process().memory_info().rss


@dataclass
class SoakResult:
    """RSS figures in MB and counts of how each run ended."""

    runs: int
    warmup: int
    rss_after_warmup_mb: float = 0.0
    rss_end_mb: float = 0.0
    rss_max_mb: float = 0.0
    seconds: float = 0.0
    completed: int = 0
    cancelled: int = 0
    failed: int = 0
    per_run_s: list[float] = field(default_factory=list, repr=False)

    @property
    def drift_mb(self) -> float:
        return self.rss_end_mb - self.rss_after_warmup_mb

    def to_json(self) -> dict[str, object]:
        return {"runs": self.runs, "warmup": self.warmup, "completed": self.completed,
                "cancelled": self.cancelled, "failed": self.failed,
                "rss_after_warmup_mb": round(self.rss_after_warmup_mb, 1),
                "rss_end_mb": round(self.rss_end_mb, 1), "rss_max_mb": round(self.rss_max_mb, 1),
                "drift_mb": round(self.drift_mb, 1), "seconds": round(self.seconds, 1),
                "median_run_s": round(statistics.median(self.per_run_s), 3)
                if self.per_run_s else None}


def _stop_after_first_step(step: int, total: int, latents) -> bool:
    return True


def _fail_after_first_step(step: int, total: int, latents) -> bool:
    raise GenerationError("soak: a generation failing mid-run")


def one_run(pipe: Pipeline, index: int, steps: int | None, cancel_every: int,
            fail_every: int) -> str:
    """Generation number `index`; returns how it ended (completed, cancelled, failed)."""
    callback, ending = None, "completed"
    if cancel_every and index % cancel_every == cancel_every - 1:
        callback, ending = _stop_after_first_step, "cancelled"
    elif fail_every and index % fail_every == fail_every // 2:
        callback, ending = _fail_after_first_step, "failed"
    request = GenerationRequest(prompt=PROMPTS[index % len(PROMPTS)], seed=index, steps=steps)
    try:
        pipe.run(request, callback=callback)
    except GenerationError:
        if ending != "failed":
            raise
    return ending


def soak(pipe: Pipeline, runs: int, *, warmup: int = WARMUP, steps: int | None = None,
         cancel_every: int = 25, fail_every: int = 25) -> SoakResult:
    """Warm up, then `runs` generations with RSS read after each (module docstring)."""
    for index in range(warmup):
        one_run(pipe, index, steps, cancel_every, fail_every)
    gc.collect()
    result = SoakResult(runs, warmup, rss_after_warmup_mb=rss_bytes() / 1e6)
    result.rss_max_mb = result.rss_after_warmup_mb
    started = time.perf_counter()
    for index in range(runs):
        began = time.perf_counter()
        ending = one_run(pipe, warmup + index, steps, cancel_every, fail_every)
        result.per_run_s.append(time.perf_counter() - began)
        setattr(result, ending, getattr(result, ending) + 1)
        result.rss_max_mb = max(result.rss_max_mb, rss_bytes() / 1e6)
    result.seconds = time.perf_counter() - started
    gc.collect()
    result.rss_end_mb = rss_bytes() / 1e6
    return result


def main(argv: list[str] | None = None) -> dict[str, object]:
    """Run the soak and print its figures as JSON; exit 1 when the drift is over the bound."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=500)
    parser.add_argument("--warmup", type=int, default=WARMUP)
    parser.add_argument("--model", help="model folder (default: sdrt's embedded model)")
    parser.add_argument("--backend", default="ort")
    parser.add_argument("--steps", type=int, default=None, help="default: the model's")
    parser.add_argument("--cancel-every", type=int, default=25)
    parser.add_argument("--fail-every", type=int, default=25)
    parser.add_argument("--max-drift-mb", type=float, default=MAX_DRIFT_MB)
    args = parser.parse_args(argv)
    pipe = Pipeline.load(args.model, backend=args.backend) if args.model \
        else Pipeline.load(backend=args.backend)
    result = soak(pipe, args.runs, warmup=args.warmup, steps=args.steps,
                  cancel_every=args.cancel_every, fail_every=args.fail_every)
    summary = {"command": "python -m sdrt.benchmarks.soak " + " ".join(sys.argv[1:] if argv is None
                                                                      else argv),
               "model": pipe.facts.name, "backend": pipe.backend, **result.to_json(),
               "max_drift_mb": args.max_drift_mb}
    print(json.dumps(summary, indent=2))
    if result.drift_mb > args.max_drift_mb:
        sys.exit(1)
    return summary


if __name__ == "__main__":
    main()
