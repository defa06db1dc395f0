"""The most this CPU does through OpenVINO: one large square matrix product in fp32, bf16 and int8,
each with the kernel OpenVINO picked, as GFLOP/s (2·N³ per product). Dividing a pipeline's
operation count by these figures bounds its time from below on this machine, whatever the
runtime (benchmarks/RESULTS.md, "SD-Turbo architecture", with the FLOP counts it divides).

int8 is u8 activations × i8 weights (FakeQuantize on both, as NNCF writes them), which OpenVINO
runs on VNNI or AMX tiles where the CPU has them; bf16 runs on AVX-512 BF16 or AMX.

Usage: python -m sdrt.benchmarks.matmul_peak [--size 4096] [--runs 5] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

PRECISIONS = ("fp32", "bf16", "int8")
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    for precision in PRECISIONS:
        found = measure(precision, args.size, args.runs, args.threads)
        print(f"{precision}: {found['gflops']:.0f} GFLOP/s (median of {args.runs}, "
              f"{found['seconds'] * 1000:.0f} ms per {args.size}³ product; kernel "
              f"{found['kernel']})")


if __name__ == "__main__":
    main()
