"""One SD 3 generation split into its stages: load, text conditioning, transformer step(s),
VAE decode, each timed (wall seconds) on an exported folder; run it under `/usr/bin/time -v` for
the process's peak RSS. Prints one JSON object.

Usage: python -m sdrt.benchmarks.sd3_step MODEL_DIR [--steps 1] [--size 1024] [--backend ort]
       [--guidance 7] [--low-memory]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import time

from sdrt.runtime.pipeline import GenerationRequest, Pipeline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--size", type=int, default=None, help="default: the model's native")
    parser.add_argument("--backend", default="ort")
    parser.add_argument("--guidance", type=float, default=7.0)
    parser.add_argument("--low-memory", action="store_true",
                        help="one graph resident at a time, tiled VAE (memory/low_memory.py)")
    args = parser.parse_args()

    started = time.perf_counter()
    pipe = Pipeline.load(args.model, args.backend, low_memory=args.low_memory)
    loaded = time.perf_counter()
    marks: list[float] = []
    request = GenerationRequest("a lighthouse on a cliff at dusk", steps=args.steps, seed=0,
                                guidance_scale=args.guidance, width=args.size, height=args.size)
    conditioner = pipe.conditioner

    def timed_conditioner(*a, **k):
        out = conditioner(*a, **k)
        marks.append(time.perf_counter())  # conditioning done: the sampler loop starts
        return out

    pipe = dataclasses.replace(pipe, conditioner=timed_conditioner)
    begun = time.perf_counter()
    image = pipe.run(request, callback=lambda i, n, x: marks.append(time.perf_counter()))[0]
    ended = time.perf_counter()
    step_s = [b - a for a, b in zip(marks, marks[1:], strict=False)]
    print(json.dumps({
        "model": args.model, "backend": args.backend, "precision": pipe.precision,
        "low_memory": args.low_memory,
        "size": list(image.image.size), "steps": args.steps, "guidance": args.guidance,
        "load_s": round(loaded - started, 1), "conditioning_s": round(marks[0] - begun, 1),
        "step_s": [round(s, 1) for s in step_s], "decode_s": round(ended - marks[-1], 1),
        "machine": platform.processor() or platform.machine(),
    }, indent=2))


if __name__ == "__main__":
    main()
