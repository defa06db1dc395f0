"""Wall time of a whole `sdrt generate` command, as a user runs it, and where the time goes.

Each run is a fresh process of the `sdrt` console script beside this Python: interpreter start,
imports, model load, text encoding, the sampler loop, VAE decoding and writing the PNG all count.
One untimed run first warms the disk cache. Then, in this process, the same request is split
into model load and generation through the Python API.

Usage: python -m sdrt.benchmarks.generate_time [--model DIR] [--runs 7] [PROMPT]
(no --model: sdrt's embedded model at its native size and defaults).
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_PROMPT = "a red circle on a blue background"


def command_seconds(argv: list[str]) -> float:
    """Wall seconds of one command; raises if it fails."""
    start = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def in_process_seconds(model: str | None, prompt: str, runs: int) -> dict[str, float]:
    """Median seconds of `Pipeline.load` and of one `Pipeline.generate` in this process."""
    from sdrt.runtime.model.folder import EMBEDDED_MODEL
    from sdrt.runtime.pipeline import Pipeline

    loads, generations = [], []
    for _ in range(runs):
        start = time.perf_counter()
        pipe = Pipeline.load(model or EMBEDDED_MODEL)
        loads.append(time.perf_counter() - start)
        start = time.perf_counter()
        pipe.generate(prompt, seed=0)
        generations.append(time.perf_counter() - start)
    return {"load_s": statistics.median(loads), "generate_s": statistics.median(generations)}


def main(argv: list[str] | None = None) -> dict[str, object]:
    """Time `runs` fresh `sdrt generate` processes; print and return the summary."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("prompt", nargs="?", default=DEFAULT_PROMPT)
    parser.add_argument("--model", help="model folder (default: sdrt's embedded model)")
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        options = ["generate", args.prompt, "--seed", "0"]
        options += ["--model", args.model] if args.model else []
        argv_ = [str(Path(sys.executable).with_name("sdrt")), *options,
                 "-o", str(Path(scratch) / "out.png")]
        command_seconds(argv_)  # warm the disk cache
        walls = [command_seconds(argv_) for _ in range(args.runs)]
    summary = {"command": shlex.join(["sdrt", *options]), "runs": args.runs,
               "wall_median_s": round(statistics.median(walls), 3),
               "wall_min_s": round(min(walls), 3), "wall_max_s": round(max(walls), 3),
               **{k: round(v, 3) for k, v in
                  in_process_seconds(args.model, args.prompt, args.runs).items()}}
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
