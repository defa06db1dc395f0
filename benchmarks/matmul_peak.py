"""The most this CPU does through OpenVINO: one large square matrix product in fp32, bf16 and int8,
each with the kernel OpenVINO picked, as GFLOP/s (2·N³ per product). Dividing a pipeline's
operation count by these figures bounds its time from below on this machine, whatever the
runtime (benchmarks/RESULTS.md, "SD-Turbo architecture", with the FLOP counts it divides).

int8 is u8 activations × i8 weights (FakeQuantize on both, as NNCF writes them), which OpenVINO
runs on VNNI or AMX tiles where the CPU has them; bf16 runs on AVX-512 BF16 or AMX, and is not
measured on a CPU without them (OpenVINO would run it as fp32: runtime/machine.py).

`sdrt bench` divides each stage's FLOPs by these (benchmarks/flops.py): `ceilings` measures them
once per machine (runtime/machine.py's `machine_id`) and thread count and keeps them under the
sdrt cache folder (runtime/compile_cache.py); this command measures again and, at the default
size and runs, replaces them.

Usage: python -m sdrt.benchmarks.matmul_peak [--size 4096] [--runs 5] [--threads N]
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import statistics
import time
from pathlib import Path

import numpy as np

from sdrt.runtime import compile_cache
from sdrt.runtime.machine import has_native_bf16, machine_id

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "bf16", "int8")
SIZE = 4096  # large enough that every kernel runs at its peak (~1.4 s per fp32 product at 100
RUNS = 5  # GFLOP/s); the median of RUNS products after a warm-up
HINTS = {"fp32": "f32", "bf16": "bf16", "int8": "bf16"}  # int8: its float remainder in bf16


def product_model(size: int, weights: np.ndarray, int8: bool):
    """x (size × size) times a constant weight matrix, quantized to int8 on both sides if asked."""
    import openvino as ov
    from openvino import opset13 as ops

    def fake_quantize(node, low: float, high: float, levels: int):
        low_c, high_c = ops.constant(np.float32(low)), ops.constant(np.float32(high))
        return ops.fake_quantize(node, low_c, high_c, low_c, high_c, levels)

    x = ops.parameter([size, size], ov.Type.f32, name="x")
    w = ops.constant(weights)
    if int8:  # u8 activations (after a ReLU), symmetric i8 weights: the VNNI/AMX pairing
        product = ops.matmul(fake_quantize(ops.relu(x), 0.0, 8.0, 256),
                             fake_quantize(w, -4.0, 4.0, 255), False, True)
    else:
        product = ops.matmul(x, w, False, True)
    return ov.Model([product], [x])


def measure(precision: str, size: int, runs: int, threads: int | None) -> dict:
    """Median GFLOP/s of `runs` products after one warm-up, and the kernel that ran them."""
    import openvino as ov

    rng = np.random.default_rng(0)
    x = rng.standard_normal((size, size), dtype=np.float32)
    weights = rng.standard_normal((size, size), dtype=np.float32)
    config = {"INFERENCE_PRECISION_HINT": HINTS[precision]}
    if threads:
        config["INFERENCE_NUM_THREADS"] = str(threads)
    compiled = ov.Core().compile_model(product_model(size, weights, precision == "int8"), "CPU",
                                       config)
    request = compiled.create_infer_request()
    request.infer({"x": x})
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        request.infer({"x": x})
        times.append(time.perf_counter() - start)
    kernel = next(f"{info['runtimePrecision'].astype(str)} {info['primitiveType'].astype(str)}"
                  for info in (op.get_rt_info() for op in compiled.get_runtime_model().get_ops())
                  if info["layerType"].astype(str) == "FullyConnected")
    seconds = statistics.median(times)
    return {"precision": precision, "gflops": 2 * size**3 / seconds / 1e9,
            "seconds": seconds, "kernel": kernel}


def ceilings(threads: int | None = None, refresh: bool = False) -> dict[str, float | None]:
    """GFLOP/s by precision on this machine (None: not measured here), from the cache unless
    `refresh` or none is cached; measured with SIZE and RUNS."""
    path = cache_path(threads)
    cached = None if refresh or path is None else _read(path)
    if cached is None:
        cached = measure_all(SIZE, RUNS, threads)
        if path is not None:
            _write(path, cached)
    return {precision: (cached["measured"].get(precision) or {}).get("gflops")
            for precision in PRECISIONS}


def measure_all(size: int, runs: int, threads: int | None) -> dict:
    """Every precision this CPU runs natively, measured: the record `ceilings` caches."""
    wanted = [p for p in PRECISIONS if p != "bf16" or has_native_bf16()]
    return {"machine": machine_id(), "threads": threads, "size": size, "runs": runs,
            "date": datetime.date.today().isoformat(),
            "measured": {p: measure(p, size, runs, threads) for p in wanted}}


def cache_path(threads: int | None) -> Path | None:
    """Where this machine's ceilings are kept (None: the cache is off, or no OpenVINO)."""
    try:
        folder = compile_cache.cache_dir()  # OpenVINO's version's: its kernels measured
    except ModuleNotFoundError:
        return None
    suffix = f"-{threads}threads" if threads else ""
    return None if folder is None else folder / "ceilings" / f"{machine_id()}{suffix}.json"


def _read(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text("utf-8"))
    except (OSError, ValueError):  # none yet, or unreadable: measured again
        return None
    return data if isinstance(data, dict) and isinstance(data.get("measured"), dict) else None


def _write(path: Path, data: dict) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data, indent=2) + "\n", "utf-8")
    except OSError as exc:
        log.info("matmul ceilings not cached in %s: %s", path, exc)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=SIZE)
    parser.add_argument("--runs", type=int, default=RUNS)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    found = measure_all(args.size, args.runs, args.threads)
    path = cache_path(args.threads)
    if path is not None and (args.size, args.runs) == (SIZE, RUNS):
        _write(path, found)
    for precision, result in found["measured"].items():
        print(f"{precision}: {result['gflops']:.0f} GFLOP/s (median of {args.runs}, "
              f"{result['seconds'] * 1000:.0f} ms per {args.size}³ product; kernel "
              f"{result['kernel']})")
    if "bf16" not in found["measured"]:
        print("bf16: not measured (no AVX-512 BF16 or AMX on this CPU)")


if __name__ == "__main__":
    main()
