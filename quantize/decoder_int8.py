"""A static int8 VAE decoder for OpenVINO: int8 weights and activations, calibrated with NNCF.

The KL autoencoder's decoder (Rombach et al. 2022, "High-Resolution Image Synthesis with Latent
Diffusion Models") is a stack of 3×3 convolutions at up to the image's full size, so int8
convolutions are what makes it cheaper; weight-only int8 (the other graphs' recipe) saves file
size, not time. `nncf.quantize` places int8 quantizers on the convolutions' inputs and weights
(post-training static quantization, Jacob et al. 2018) with activation ranges from recorded
decoder inputs: the final latents of the calibration runs, unscaled as the decoder receives them.

Measured on the embedded model's decoder (24 held-out latents, decoded 8-bit image PSNR against
fp32, 8 calibration latents): quantizing every convolution gives 28.9 dB (worst image 22.4);
keeping the convolutions on the latent side of the first group norm (`post_quant_conv`,
`conv_in`: 4 input channels, a negligible share of the compute) and after the last one
(`conv_out`, whose error lands on the pixels) in float gives 34.8 dB; taking each activation's
range as the minimum and maximum over all calibration latents (NNCF's MINMAX) rather than the
mean of the per-latent ones gives 37.1 dB (worst 27.1). Asymmetric activations (preset MIXED)
lost 1–3 dB in every configuration. The attention block's MatMuls (SD's mid block; the embedded
model has none) stay float: they multiply two activations and carry ~1% of the FLOPs.

Decode time of a decoder graph in f32 and int8 (one process, calls alternating; the int8 graph is
calibrated on Gaussian latents, since only its speed is measured):

    python -m sdrt.quantize.decoder_int8 DIR/vae_decoder/model.onnx [--latent 64] [--calls 5]
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

METHOD = ("nncf.quantize (preset PERFORMANCE, MINMAX activation ranges) of the convolutions with "
          "recorded final latents; the latent-side convolutions before the first group norm, "
          "conv_out and attention MatMuls stay float")
NORM = "MVN"  # OpenVINO's form of a GroupNorm's normalisation
# Timing only: SD 1.5's unscaled latents have a standard deviation of about 1 / 0.18215.
TIMING_LATENT_STD = 5.5
TIMING_CALIBRATION = 2  # latents; ranges do not change the int8 graph's speed


def decoder_int8(model, feeds: list[dict[str, np.ndarray]]):
    """The VAE decoder `model` (an openvino.Model) with int8 convolutions, ranges from `feeds`."""
    import nncf
    from nncf.quantization.range_estimator import RangeEstimatorParametersSet

    if not feeds:
        raise ValueError("the int8 VAE decoder needs recorded calibration inputs")
    nncf.set_log_level(logging.INFO if log.isEnabledFor(logging.INFO) else logging.WARNING)
    kept = float_ops(model)
    log.info("int8 VAE decoder: %d calibration latents; float: %s", len(feeds), ", ".join(kept))
    return nncf.quantize(
        model, nncf.Dataset(feeds), preset=nncf.QuantizationPreset.PERFORMANCE,
        subset_size=len(feeds), ignored_scope=nncf.IgnoredScope(names=kept),
        advanced_parameters=nncf.AdvancedQuantizationParameters(
            activations_range_estimator_params=RangeEstimatorParametersSet.MINMAX))


def float_ops(model) -> list[str]:
    """Names of the ops kept float: the convolutions before the first normalisation and after
    the last one (topological order), and every MatMul."""
    ops = list(model.get_ordered_ops())
    norms = [i for i, op in enumerate(ops) if op.get_type_name() == NORM]
    if not norms:
        raise ValueError("no group normalisation found: not a VAE decoder graph")
    return [op.get_friendly_name() for i, op in enumerate(ops)
            if op.get_type_name() == "MatMul"
            or (op.get_type_name() == "Convolution" and not norms[0] < i < norms[-1])]


def time_decoders(graph: Path, latent: int, calls: int) -> dict:
    """Median seconds per decode of one latent² latent by OpenVINO's f32 graph `graph` and its
    int8 version, each compiled for that shape first, then called alternately `calls` times."""
    import openvino as ov

    from sdrt.runtime.session import OpenVinoSession

    model = ov.Core().read_model(str(graph))
    shape = (1, model.input(0).get_partial_shape()[1].get_length(), latent, latent)
    rng = np.random.default_rng(0)

    def latents() -> dict[str, np.ndarray]:
        return {"latent_sample": (rng.standard_normal(shape) * TIMING_LATENT_STD)
                .astype(np.float32)}

    with tempfile.TemporaryDirectory() as tmp:
        int8 = Path(tmp) / "openvino_model.xml"
        calibration = [latents() for _ in range(TIMING_CALIBRATION)]
        ov.save_model(decoder_int8(model, calibration), str(int8), compress_to_fp16=False)
        sessions = {"f32": OpenVinoSession(graph), "int8": OpenVinoSession(int8)}
        feed = latents()
        for session in sessions.values():
            session.run(feed)  # compiles this shape
        times: dict[str, list[float]] = {name: [] for name in sessions}
        for _ in range(calls):
            for name, session in sessions.items():
                start = time.perf_counter()
                session.run(feed)
                times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(values) for name, values in times.items()}
    return {"graph": graph.name, "latent": list(shape), "calls": calls, "times_s": times,
            "f32_s": medians["f32"], "int8_s": medians["int8"],
            "ratio": medians["int8"] / medians["f32"]}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m sdrt.quantize.decoder_int8",
                                     description="decode time of a VAE decoder, f32 vs int8")
    parser.add_argument("graph", type=Path, help="a VAE decoder graph (.onnx or .xml)")
    parser.add_argument("--latent", type=int, default=64, help="latent side (64: 512² pixels)")
    parser.add_argument("--calls", type=int, default=5)
    args = parser.parse_args(argv)
    print(json.dumps(time_decoders(args.graph, args.latent, args.calls), indent=2))


if __name__ == "__main__":
    main()
