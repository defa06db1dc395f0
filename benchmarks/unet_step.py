"""UNet size and step time of each precision variant against fp32 (or `--reference`) on the same
backend.

One model folder, one process: for each variant (`precision-backend`, fp32 included) the
pipeline is loaded, the UNet is called once (OpenVINO compiles the shape then; timed apart) and
`--runs` more times at the CFG batch and size asked; the median is compared with fp32's on the
same backend. The size is the bytes of the graph files the variant's UNet loads (fp32's for an
execution-only precision such as bf16). Variants must be listed in the folder's manifest
(`sdrt quantize` lists a variant only once it passes its gate).

Usage: python -m sdrt.benchmarks.unet_step --model DIR
       [--variants fp32-ort,int8-ort,fp32-openvino,int8-openvino] [--batch 2] [--size 512]
       [--runs 3] [--threads N] [--reference bf16] [--json FILE]
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
from pathlib import Path

from sdrt.benchmarks.step_overhead import time_unet
from sdrt.runtime.model.variants import resolve_variant
from sdrt.runtime.pipeline import Pipeline
from sdrt.runtime.session import BACKENDS

DEFAULT_VARIANTS = "fp32-ort,int8-ort,fp32-openvino,int8-openvino"


def split_key(key: str) -> tuple[str, str]:
    """'int8-hybrid-openvino' → ('int8-hybrid', 'openvino')."""
    precision, _, backend = key.rpartition("-")
    if not precision or backend not in BACKENDS:
        raise SystemExit(f"variant '{key}' must be PRECISION-BACKEND, backend one of "
                         f"{', '.join(BACKENDS)}")
    return precision, backend


def unet_bytes(folder: Path, precision: str, backend: str) -> int:
    """Bytes of the graph file(s) the variant's UNet loads (graph + external data)."""
    path = resolve_variant(folder, precision, backend).graph_path(folder, "unet")
    return sum(f.stat().st_size for f in path.parent.iterdir()
               if f.is_file() and f.name.startswith(path.stem))


def measure(folder: Path, key: str, *, batch: int, size: int, runs: int,
            threads: int | None) -> dict:
    """One variant's UNet bytes, first-call seconds and steady-state call seconds."""
    precision, backend = split_key(key)
    pipe = Pipeline.load(folder, backend, precision=precision, threads=threads)
    side = size // pipe.facts.vae_scale_factor
    shape = (batch, pipe.unet.session.inputs["sample"].shape[1], side, side)
    first, times = time_unet(pipe, shape, runs)
    del pipe
    gc.collect()
    return {"variant": key, "precision": precision, "backend": backend,
            "unet_bytes": unet_bytes(folder, precision, backend), "first_call_s": first,
            "step_s": times, "step_median_s": statistics.median(times)}


def with_ratios(rows: list[dict], reference: str = "fp32") -> list[dict]:
    """Each row's size and median step as a fraction of the `reference` precision's on the same
    backend (keys `size_vs_<reference>`, `step_vs_<reference>`)."""
    base_rows = {row["backend"]: row for row in rows if row["precision"] == reference}
    for row in rows:
        base = base_rows.get(row["backend"])
        if base is not None:
            row[f"size_vs_{reference}"] = row["unet_bytes"] / base["unet_bytes"]
            row[f"step_vs_{reference}"] = row["step_median_s"] / base["step_median_s"]
    return rows


def table(rows: list[dict], reference: str = "fp32") -> str:
    """The rows as a Markdown table, ratios against `reference` (with_ratios)."""
    lines = [f"| variant | UNet size | × {reference} | first call | step (median) | "
             f"× {reference} step |", "|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(
            f"| {row['variant']} | {row['unet_bytes'] / 1e9:.2f} GB | "
            f"{row.get(f'size_vs_{reference}', float('nan')):.3f} | "
            f"{row['first_call_s']:.2f} s | {row['step_median_s']:.3f} s | "
            f"{row.get(f'step_vs_{reference}', float('nan')):.3f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--variants", default=DEFAULT_VARIANTS)
    parser.add_argument("--batch", type=int, default=2, help="2: one guided step")
    parser.add_argument("--size", type=int, default=512, help="image side in pixels")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--reference", default="fp32",
                        help="the precision ratios are against, e.g. bf16 (in --variants)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    rows = [measure(args.model, key, batch=args.batch, size=args.size, runs=args.runs,
                    threads=args.threads) for key in args.variants.split(",")]
    rows = with_ratios(rows, args.reference)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n", "utf-8")
    print(table(rows, args.reference))


if __name__ == "__main__":
    main()
