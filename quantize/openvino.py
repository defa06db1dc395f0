"""OpenVINO variants of one graph as IR (`openvino_model.xml` + `.bin`), made with NNCF.

- fp16: weights stored as float16 (`openvino.save_model(compress_to_fp16=True)`); OpenVINO
  decompresses them at load, so this halves the files, not the compute.
- int8: weight-only compression, asymmetric per-channel (`nncf.compress_weights`, INT8_ASYM).
- int4: weight-only compression, symmetric in groups of INT4_GROUP_SIZE input channels
  (INT4_SYM; NNCF keeps convolutions and the embedding at int8), group sizes adjusted down
  where a layer's width is not a multiple.
- int8-hybrid: the UNet with int8 convolutions, and int8 MatMuls where the CPU has int8 dot
  products (VNNI) or int8 MatMul weights elsewhere (unet_int8.py); the VAE decoder, when named,
  with int8 convolutions (decoder_int8.py); other graphs get int8 weights.
  On CPUs with native bf16 the hybrid graphs' float remainder (the MatMuls' compute,
  normalisations, softmax) runs in bf16, as OpenVINO chooses by itself on AMX CPUs (the earlier
  hybrid recipe's step took 0.36× fp32's time so against 0.44× in f32 on AVX-512 BF16).
- bf16 is an execution precision (INFERENCE_PRECISION_HINT), not a file: see `bf16_supported`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from types import ModuleType

import numpy as np

from sdrt.quantize.decoder_int8 import METHOD as DECODER_METHOD
from sdrt.quantize.decoder_int8 import decoder_int8
from sdrt.quantize.unet_int8 import METHOD as UNET_METHOD
from sdrt.quantize.unet_int8 import unet_int8
from sdrt.runtime.machine import has_int8_dot_products

log = logging.getLogger(__name__)

GRAPH_NAME = "openvino_model.xml"
INT4_GROUP_SIZE = 64  # NNCF's usual group for 4-bit weights; smaller groups cost size
HYBRID_COMPONENTS = ("unet",)
DECODER = "vae_decoder"  # int8-hybrid: a static int8 decoder (decoder_int8.py), when named
METHODS = {
    "fp16": "openvino.save_model(compress_to_fp16=True)",
    "int8": "nncf.compress_weights(INT8_ASYM), weight-only per-channel",
    "int4": f"nncf.compress_weights(INT4_SYM, group_size={INT4_GROUP_SIZE}, ratio=1, "
            "group_size_fallback_mode=ADJUST); convolutions and embeddings int8",
    "int8-hybrid": UNET_METHOD + "; float ops in bf16 where the CPU has it; vae_decoder: "
                   + DECODER_METHOD + "; other graphs INT8_ASYM weights",
    "bf16": "OpenVINO INFERENCE_PRECISION_HINT=bf16 on the fp32 graphs",
}


def needs_calibration(precision: str, component: str, src: Path | None = None) -> bool:
    """Whether making this graph needs recorded inputs (at any size of graph `src`)."""
    return precision == "int8-hybrid" and component in (*HYBRID_COMPONENTS, DECODER)


def make_graph(precision: str, component: str, src: Path, dest_dir: Path,
               feeds: list[dict[str, np.ndarray]] | None) -> Path:
    """Write the `precision` variant of graph `src` (ONNX or IR) into `dest_dir`; its path."""
    import openvino as ov

    model = ov.Core().read_model(str(src))
    if precision == "fp16":
        compressed = model
    elif precision == "int8-hybrid" and component == DECODER:
        compressed = decoder_int8(model, feeds or [])
    elif needs_calibration(precision, component):
        compressed = unet_int8(model, feeds or [], int8_matmuls=has_int8_dot_products())
    elif precision in ("int8", "int8-hybrid"):
        compressed = weights_int8(model)
    elif precision == "int4":
        compressed = weights_int4(model)
    else:
        raise ValueError(f"NNCF makes no {precision} graphs")
    dest = dest_dir / GRAPH_NAME
    # Float weights NNCF left alone stay fp32 unless fp16 is what was asked for.
    ov.save_model(compressed, str(dest), compress_to_fp16=precision == "fp16")
    return dest


def weights_int8(model):
    """int8 asymmetric per-channel weights of every weighted layer."""
    nncf = _nncf()
    return nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT8_ASYM)


def weights_int4(model):
    """int4 symmetric group-wise weights (int8 where NNCF keeps a layer at its backup mode)."""
    nncf = _nncf()
    from nncf.quantization.advanced_parameters import (
        AdvancedCompressionParameters,
        GroupSizeFallbackMode,
    )

    return nncf.compress_weights(
        model, mode=nncf.CompressWeightsMode.INT4_SYM, group_size=INT4_GROUP_SIZE, ratio=1.0,
        advanced_parameters=AdvancedCompressionParameters(
            group_size_fallback_mode=GroupSizeFallbackMode.ADJUST))


def execution(precision: str, component: str) -> str:
    """The INFERENCE_PRECISION_HINT a variant's graph runs with (see the module docstring)."""
    if needs_calibration(precision, component) and bf16_supported():
        return "bf16"
    return "f32"


def bf16_supported() -> bool:
    """Whether this machine's CPU runs bf16 natively (OpenVINO OPTIMIZATION_CAPABILITIES)."""
    import openvino as ov

    return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def _nncf() -> ModuleType:
    """nncf, logging at INFO only under `sdrt -v` (it lists every quantizer it skips)."""
    import nncf

    nncf.set_log_level(logging.INFO if log.isEnabledFor(logging.INFO) else logging.WARNING)
    return nncf
