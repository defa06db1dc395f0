"""The int8-hybrid UNet for OpenVINO: int8 convolutions, weight-only int8 MatMuls, attention in
float; each choice measured on the embedded model (benchmarks/quantize_gates.md).

1. Weight-only int8 (asymmetric, per channel) of the MatMuls with constant weights and of the
   embeddings (`nncf.compress_weights`), as optimum-intel's hybrid recipe for diffusion models.
2. Static int8 of the convolutions, weights and activations (`nncf.quantize`), with activation
   ranges from UNet inputs recorded over whole sampling trajectories at several guidance scales
   (calibration.py; Q-Diffusion, Li et al. 2023: the ranges move with the timestep). The ranges
   are the minimum and maximum over all of them (MINMAX), as ONNX Runtime's static int8 takes
   them, not NNCF's default mean over samples, which clips the early, high-noise steps.
3. Every MatMul stays float in compute, the attention products (QKᵀ, softmax·V) included:
   quantizing them cost adherence (cross-attention carries the prompt), and on CPUs without
   VNNI their int8 kernels were slower than float ones.
"""

from __future__ import annotations

import logging

import numpy as np

log = logging.getLogger(__name__)

METHOD = ("unet: nncf.compress_weights(INT8_ASYM) of MatMul/embeddings, then nncf.quantize of "
          "the convolutions (MINMAX activation ranges from inputs recorded at several guidance "
          "scales), every MatMul float")

Feeds = dict[str, np.ndarray]


def unet_int8(model, feeds: list[Feeds]):
    """The int8-hybrid form of the UNet `model` (an openvino.Model), ranges from `feeds`."""
    import nncf
    from nncf.quantization.advanced_parameters import AdvancedSmoothQuantParameters
    from nncf.quantization.range_estimator import RangeEstimatorParametersSet

    if not feeds:
        raise ValueError("the int8-hybrid UNet needs recorded calibration inputs")
    nncf.set_log_level(logging.INFO if log.isEnabledFor(logging.INFO) else logging.WARNING)
    weighted = weighted_ops(model)
    compressed = nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT8_ASYM,
                                       ignored_scope=nncf.IgnoredScope(types=["Convolution"]))
    log.info("int8-hybrid UNet: %d calibration inputs", len(feeds))
    return nncf.quantize(
        compressed, nncf.Dataset(feeds), model_type=nncf.ModelType.TRANSFORMER,
        subset_size=len(feeds),
        ignored_scope=nncf.IgnoredScope(names=weighted, types=["MatMul"], validate=False),
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
