"""The int8-hybrid UNet for OpenVINO: int8 convolutions, int8 or weight-only int8 MatMuls, the
prompt's attention in float; each choice measured on the embedded model
(benchmarks/quantize_gates.md).

1. Static int8 of the convolutions, weights and activations (`nncf.quantize`), with activation
   ranges from UNet inputs recorded over whole sampling trajectories at several guidance scales
   (calibration.py; Q-Diffusion, Li et al. 2023: the ranges move with the timestep). The ranges
   are the minimum and maximum over all of them (MINMAX), as ONNX Runtime's static int8 takes
   them, not NNCF's default mean over samples, which clips the early, high-noise steps.
2. On CPUs with int8 dot products (VNNI, `int8_matmuls`): static int8 of the MatMuls with
   weights and of self-attention's products, which there run on int8 kernels at about twice
   bf16's rate (NNCF's transformer patterns quantize QKᵀ's operands; softmax's output stays
   float); cross-attention's products stay float (the prompt enters there).
   On the SD 1.5 UNet at 512² that took a guided step from 0.72× to 0.60–0.65× of bf16's on an
   AVX-512 VNNI CPU, with adherence within 2 points of fp32 on the embedded model.
3. Elsewhere every MatMul stays float in compute (weight-only int8, asymmetric per channel, as
   optimum-intel's hybrid recipe for diffusion models) and the attention products float: without
   VNNI their int8 kernels ran no faster than float, and AVX2's 16-bit saturation cost accuracy.
   Embedding tables get weight-only int8 either way (`nncf.compress_weights`).
"""

from __future__ import annotations

import logging

import numpy as np

log = logging.getLogger(__name__)

METHOD = ("unet: nncf.quantize of the convolutions (MINMAX activation ranges from inputs "
          "recorded at several guidance scales); with VNNI also of the weighted MatMuls and "
          "self-attention's QKᵀ, else those MatMuls INT8_ASYM weights only; "
          "cross-attention's products float")
SELF_ATTENTION = "attn1"  # diffusers' module name, kept in the exported graph's node names

Feeds = dict[str, np.ndarray]


def unet_int8(model, feeds: list[Feeds], int8_matmuls: bool = False):
    """The int8-hybrid form of the UNet `model` (an openvino.Model), ranges from `feeds`;
    `int8_matmuls` on CPUs with int8 dot products (module docstring, 2 and 3)."""
    import nncf
    from nncf.quantization.advanced_parameters import AdvancedSmoothQuantParameters
    from nncf.quantization.range_estimator import RangeEstimatorParametersSet

    if not feeds:
        raise ValueError("the int8-hybrid UNet needs recorded calibration inputs")
    nncf.set_log_level(logging.INFO if log.isEnabledFor(logging.INFO) else logging.WARNING)
    weighted = weighted_ops(model)
    if int8_matmuls:  # weight-only int8 for the embeddings alone; the rest quantized below
        matmuls = [op.get_friendly_name() for op in model.get_ops()
                   if op.get_type_name() == "MatMul"]
        float_ops = [name for name in matmuls  # attention products other than self-attention's
                     if name not in weighted and SELF_ATTENTION not in name]
        float_ops += [name for name in weighted if name not in matmuls]  # embeddings
        compressed = nncf.compress_weights(
            model, mode=nncf.CompressWeightsMode.INT8_ASYM,
            ignored_scope=nncf.IgnoredScope(types=["Convolution", "MatMul"]))
        ignored = nncf.IgnoredScope(names=float_ops, validate=False)
    else:
        compressed = nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT8_ASYM,
                                           ignored_scope=nncf.IgnoredScope(types=["Convolution"]))
        ignored = nncf.IgnoredScope(names=weighted, types=["MatMul"], validate=False)
    log.info("int8-hybrid UNet: %d calibration inputs, int8 MatMuls: %s", len(feeds),
             int8_matmuls)
    return nncf.quantize(
        compressed, nncf.Dataset(feeds), model_type=nncf.ModelType.TRANSFORMER,
        subset_size=len(feeds), ignored_scope=ignored,
        advanced_parameters=nncf.AdvancedQuantizationParameters(
            smooth_quant_alphas=AdvancedSmoothQuantParameters(matmul=-1),
            activations_range_estimator_params=RangeEstimatorParametersSet.MINMAX))


def weighted_ops(model) -> list[str]:
    """Names of the MatMuls with a constant operand and of embedding Gathers (float tables)."""
    names = []
    for op in model.get_ops():
        kind = op.get_type_name()
        ports = (0, 1) if kind == "MatMul" else (0,) if kind == "Gather" else ()
        if any(op.input_value(i).get_node().get_type_name() == "Constant" for i in ports):
            names.append(op.get_friendly_name())
    return names
