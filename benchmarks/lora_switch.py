"""LoRA at run time: what a new LoRA set costs, the step time with one active, peak RSS.

For each backend and LoRA count, one fresh process loads the model, calls the guided UNet once
without a LoRA (OpenVINO compiles the shape then), then applies a set of random kohya-format
LoRAs covering every linear and conv layer of the UNet and the text encoder at `--rank` (the
folder's LoRA maps list the layers). The switch is `Pipeline.graphs` (read, patch, session
build) plus what the first call with the set costs beyond a steady one (OpenVINO compiles
then). The steady step times alternate, plain then with the set, `--runs` pairs, so that a
shared machine's drift falls on both alike; each column is the median. Peak RSS is the child's
ru_maxrss, both sessions being open.

Usage: python -m sdrt.benchmarks.lora_switch --model DIR [--backends ort,openvino]
       [--counts 1,3] [--rank 32] [--runs 3] [--size 512] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from sdrt.runtime.adapters.lora_map import read_lora_map
from sdrt.runtime.pipeline import GenerationRequest, Pipeline

KOHYA_PREFIX = {"unet": "lora_unet_", "text_encoder": "lora_te_"}
LORA_STD = 0.01  # small updates keep the random model's images finite


def write_random_lora(folder: Path, path: Path, *, rank: int, seed: int) -> Path:
    """A kohya-format LoRA over every linear and conv layer the folder's maps list."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    tensors = {}
    for component, prefix in KOHYA_PREFIX.items():
        for module, entry in read_lora_map(folder / component).modules.items():
            if entry.kind not in ("linear", "conv"):
                continue
            out_features, in_features, *kernel = entry.shape
            key = prefix + module.replace(".", "_")
            tensors[f"{key}.lora_down.weight"] = rng.normal(
                0, LORA_STD, (rank, in_features, *kernel)).astype(np.float32)
            tensors[f"{key}.lora_up.weight"] = rng.normal(
                0, LORA_STD, (out_features, rank, *([1] * len(kernel)))).astype(np.float32)
            tensors[f"{key}.alpha"] = np.array(float(rank), dtype=np.float32)
    save_file(tensors, str(path))
    return path


def unet_call(denoiser, shape: tuple[int, ...], width: int):
    """One guided-batch UNet call on fixed random inputs; returns its seconds when called."""
    rng = np.random.default_rng(0)
    sample = rng.standard_normal(shape, dtype=np.float32)
    context = rng.standard_normal((shape[0], 77, width), dtype=np.float32)

    def call() -> float:
        start = time.perf_counter()
        denoiser(sample, 999.0, context)
        return time.perf_counter() - start

    return call


def child(args: argparse.Namespace) -> dict:
    """One backend and LoRA count, in this process."""
    folder = Path(args.model)
    pipe = Pipeline.load(folder, args.backend)
    side = args.size // pipe.facts.vae_scale_factor
    shape = (2, pipe.denoiser.session.inputs["sample"].shape[1], side, side)
    width = pipe.denoiser.session.inputs["encoder_hidden_states"].shape[-1]
    plain_call = unet_call(pipe.denoiser, shape, width)
    plain_first = plain_call()
    with tempfile.TemporaryDirectory() as tmp:
        files = [write_random_lora(folder, Path(tmp) / f"random{i}.safetensors",
                                   rank=args.rank, seed=i) for i in range(args.count)]
        request = GenerationRequest("", loras=tuple((str(f), 0.8) for f in files))
        start = time.perf_counter()
        denoiser, _ = pipe.graphs(request.resolve(pipe.facts, pipe.scheduler))
        applied = time.perf_counter() - start
    lora_call = unet_call(denoiser, shape, width)
    lora_first = lora_call()
    pairs = [(plain_call(), lora_call()) for _ in range(args.runs)]
    plain = statistics.median(p for p, _ in pairs)
    lora = statistics.median(q for _, q in pairs)
    return {"backend": args.backend, "loras": args.count, "rank": args.rank,
            "plain_step_s": plain, "plain_first_s": plain_first, "apply_s": applied,
            "switch_s": applied + lora_first - lora, "lora_step_s": lora,
            "lora_first_s": lora_first, "pairs": pairs,
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--backends", default="ort,openvino")
    parser.add_argument("--counts", default="1,3")
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--json")
    parser.add_argument("--backend", help=argparse.SUPPRESS)  # the child's
    parser.add_argument("--count", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.backend:
        print(json.dumps(child(args)))
        return
    rows = []
    for backend in args.backends.split(","):
        for count in map(int, args.counts.split(",")):
            argv = [sys.executable, "-m", "sdrt.benchmarks.lora_switch", "--model", args.model,
                    "--backend", backend, "--count", str(count), "--rank", str(args.rank),
                    "--runs", str(args.runs), "--size", str(args.size)]
            out = subprocess.run(argv, check=True, capture_output=True, text=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), flush=True)
    print("| backend | LoRAs | plain step | step with LoRA | ratio | switch | peak RSS |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['backend']} | {row['loras']} | {row['plain_step_s']:.2f} s | "
              f"{row['lora_step_s']:.2f} s | {row['lora_step_s'] / row['plain_step_s']:.3f} | "
              f"{row['switch_s']:.1f} s | {row['peak_rss_gib']:.2f} GiB |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
