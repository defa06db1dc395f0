"""Check an exported graph against the torch module it came from, as optimum's export does.

torch's outputs on the component's check inputs are computed first (`reference_outputs`); then
the graph runs in ONNX Runtime (CPU) on the same inputs and must match them within
`atol + rtol · max|torch output|` per output; NaN/Inf or a shape mismatch fails at once.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from sdrt.export.components import GraphDef, Inputs
from sdrt.runtime.errors import ExportError

logger = logging.getLogger("sdrt.export")

# optimum's export check (ATOL_FOR_VALIDATION): 1e-5 by default, 3e-4 for the VAE, whose
# outputs are pixel-scale sums over many conv taps.
VALIDATION_ATOL = {"text_encoder": 1e-5, "text_encoder_2": 1e-5, "text_encoder_3": 1e-5,
                   "unet": 1e-5, "transformer": 1e-5, "controlnet": 1e-5, "vae_encoder": 3e-4,
                   "vae_decoder": 3e-4}
# float32 kernels in ONNX Runtime sum in another order than torch's; the error grows with the
# depth of those sums and the size of the output. Measured max |ORT − torch| on the tiny model
# is ≤ 4e-6 for outputs up to ~2 (≈ 2e-6 relative); 1e-4 of the output's peak leaves room for
# SD 1.5's deeper, wider sums while a wrong graph (errors of order 1) still fails by far.
VALIDATION_RTOL = 1e-4


def reference_outputs(module: torch.nn.Module, graph: GraphDef,
                      cases: list[Inputs]) -> list[tuple[np.ndarray, ...]]:
    """torch's outputs on each check case, computed while the module is in memory.

    The exporter frees the torch weights before ONNX Runtime loads the graph, so a component's
    weights are never held twice (the SDXL UNet alone is 10.3 GB in float32).
    """
    outputs = []
    for feeds in cases:
        with torch.no_grad():
            got = module(*(feeds[name] for name in graph.inputs))
        outputs.append(tuple(t.numpy() for t in (got if isinstance(got, tuple) else (got,))))
    return outputs


def check_graph(graph: GraphDef, path: Path, cases: list[Inputs],
                expected: list[tuple[np.ndarray, ...]]) -> dict[str, Any]:
    """Compare ORT with torch's `expected` outputs on each case; returns the report or raises."""
    import onnxruntime as ort

    onnx.checker.check_model(str(path))  # by path, so graphs with external data work too
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    atol = VALIDATION_ATOL[graph.name]
    worst = 0.0
    for feeds, reference in zip(cases, expected, strict=True):
        got = session.run(list(graph.outputs), {k: v.numpy() for k, v in feeds.items()})
        for name, ref, out in zip(graph.outputs, reference, got, strict=True):
            worst = max(worst, _compare(graph.name, name, ref, out, atol, feeds))
    del session
    logger.info("%s: ONNX Runtime matches torch (max |diff| %.2e)", graph.name, worst)
    return {"max_abs_diff": worst, "atol": atol, "rtol": VALIDATION_RTOL,
            "checked_shapes": [{k: list(v.shape) for k, v in feeds.items()} for feeds in cases]}


def _compare(component: str, output: str, ref: np.ndarray, got: np.ndarray, atol: float,
             feeds: Inputs) -> float:
    shapes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in feeds.items())
    where = f"{component} output '{output}' for {shapes}"
    if ref.shape != got.shape:
        raise ExportError(f"{where}: ONNX shape {got.shape} differs from torch's {ref.shape}")
    if not np.isfinite(ref).all():
        raise ExportError(f"{where}: torch itself gives NaN/Inf on random input")
    if not np.isfinite(got).all():
        raise ExportError(f"{where}: ONNX Runtime gives NaN/Inf where torch does not")
    diff = float(np.max(np.abs(got.astype(np.float64) - ref))) if ref.size else 0.0
    tolerance = atol + VALIDATION_RTOL * float(np.max(np.abs(ref), initial=0.0))
    if not diff <= tolerance or math.isnan(diff):
        raise ExportError(f"{where}: ONNX Runtime differs from torch by {diff:.3g} "
                          f"(tolerance {tolerance:.3g})")
    return diff
