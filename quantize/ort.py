"""ONNX Runtime variants of one graph, made with onnxruntime's own tools.

- fp16: weights and compute in float16, inputs and outputs kept float32
  (`onnxruntime.transformers.float16.convert_float_to_float16`, keep_io_types=True), so the
  runtime feeds and reads the same tensors as for fp32.
- int8, dynamic (text encoders): int8 weights, activation ranges measured per call
  (`onnxruntime.quantization.quantize_dynamic`; Jacob et al. 2018's affine scheme).
- int8, static QDQ (UNet, a control folder's ControlNet, and the VAE decoder if asked): int8
  weights and activations of the compute-heavy ops with ranges calibrated on recorded pipeline
  inputs (`onnxruntime.quantization.quantize_static`, QuantizeLinear/DequantizeLinear pairs).
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnx

from sdrt.quantize.ort_weights import METHOD as WEIGHT_ONLY
from sdrt.quantize.ort_weights import quantize_weights
from sdrt.runtime.memory.estimate import graph_bytes
from sdrt.runtime.model.graph_files import vet_graph

GRAPH_NAME = "model.onnx"
PROTOBUF_LIMIT = 2 * 1024**3  # one serialised ONNX message; bigger graphs keep external data
# Graphs quantized statically (calibrated on recorded inputs); others get dynamic int8.
STATIC_COMPONENTS = ("unet", "vae_decoder", "controlnet")
# Dynamic int8: the text encoder's projections and its token embedding (a third of SD's CLIP).
DYNAMIC_OPS = ["MatMul", "Gather"]
# Static int8: only the ops that carry the compute; normalisations, softmax and element-wise ops
# stay float, where int8 costs accuracy and saves little time.
STATIC_OPS = ["Conv", "MatMul", "Gemm"]
# Static calibration holds about three copies of a graph's weights (30 GB for SDXL's UNet), so
# graphs above this are made weight-only int8 instead, one tensor at a time (ort_weights.py).
STREAM_ABOVE = 4 * 1024**3
METHODS = {
    "fp16": "onnxruntime.transformers.float16.convert_float_to_float16(keep_io_types=True)",
    "int8": "onnxruntime.quantization: quantize_static QDQ, per-channel int8 weights, uint8 "
            "activations, MinMax ranges from recorded inputs (unet, vae_decoder, controlnet); "
            "quantize_dynamic int8 MatMul/Gather weights (text encoders); graphs over 4 GB (the "
            f"SDXL UNet): {WEIGHT_ONLY}",
}


def needs_calibration(precision: str, component: str, src: Path | None = None) -> bool:
    """Whether making this graph needs recorded inputs (not when it is streamed weight-only)."""
    return precision == "int8" and component in STATIC_COMPONENTS and not streamed(src)


def streamed(src: Path | None) -> bool:
    """Whether graph `src` is too big to calibrate, so int8 streams it weight-only."""
    return src is not None and graph_bytes(src) > STREAM_ABOVE


def execution(precision: str, component: str) -> str:
    """ONNX Runtime graphs run in the precision their files hold."""
    return "f32"


def make_graph(precision: str, component: str, src: Path, dest_dir: Path,
               feeds: list[dict[str, np.ndarray]] | None) -> Path:
    """Write the `precision` variant of the ONNX graph `src` into `dest_dir`; its path."""
    dest = dest_dir / GRAPH_NAME
    if precision == "int8" and component in STATIC_COMPONENTS and streamed(src):
        quantize_weights(src, dest)  # reads the weights itself, one tensor at a time
        return dest
    files = _data_files(src)
    external = bool(files)
    with _unlinked(src, files, dest_dir) as graph:
        if precision == "fp16":
            to_fp16(graph, dest)
        elif needs_calibration(precision, component, src):
            int8_static(graph, dest, feeds or [], external=external)
        elif precision == "int8":
            int8_dynamic(graph, dest, external=external)
        else:
            raise ValueError(f"onnxruntime makes no {precision} graphs")
    return dest


@contextmanager
def _unlinked(src: Path, files: list[str], scratch: Path) -> Iterator[Path]:
    """`src`, or a scratch copy of it in `scratch` where one of its weights `files` (_data_files)
    has other hard links: onnx's loader (1.23), which onnxruntime's tools use, refuses such files,
    and sdrt hard-links a UNet's weights where two graphs share them (DeepCache). A copy on disk,
    not the model loaded into memory: the quantizers would copy a loaded 3.4 GB UNet twice more."""
    if all((src.parent / name).stat().st_nlink == 1 for name in files):
        yield src
        return
    vet_graph(src, "ort", versions=False)  # the names copied must lie beside the graph
    with tempfile.TemporaryDirectory(prefix=".unlinked-", dir=scratch) as folder:
        copy = Path(folder) / src.name
        for name in (src.name, *files):
            (Path(folder) / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src.parent / name, Path(folder) / name)
        yield copy


def to_fp16(src: Path, dest: Path) -> None:
    """float16 weights and compute, float32 graph inputs and outputs. The types are inferred
    before the weights are read: onnx's shape inference serialises the model it is given, which
    fails past protobuf's 2 GiB (SD 1.5's UNet is 3.4 GB)."""
    from onnx.external_data_helper import load_external_data_for_model
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.shape_inference.infer_shapes(onnx.load(str(src), load_external_data=False))
    load_external_data_for_model(model, str(src.parent))
    model = convert_float_to_float16(model, keep_io_types=True, disable_shape_infer=True)
    weights = sum(len(t.raw_data) for t in model.graph.initializer)
    onnx.save_model(model, str(dest), save_as_external_data=weights > PROTOBUF_LIMIT // 2,
                    all_tensors_to_one_file=True, location=dest.name + "_data")


def int8_dynamic(src: Path, dest: Path, *, external: bool) -> None:
    """int8 per-channel weights of MatMul and Gather; activations quantized per call."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(src, dest, op_types_to_quantize=DYNAMIC_OPS, per_channel=True,
                     weight_type=QuantType.QInt8, use_external_data_format=external)


def int8_static(src: Path, dest: Path, feeds: list[dict[str, np.ndarray]], *,
                external: bool) -> None:
    """QDQ int8: per-channel int8 weights, uint8 activations with MinMax calibrated ranges."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    if not feeds:
        raise ValueError("static quantization needs recorded calibration inputs")

    class RecordedFeeds(CalibrationDataReader):
        def __init__(self) -> None:
            self._feeds: Iterator[dict[str, np.ndarray]] = iter(feeds)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._feeds, None)

    quantize_static(src, dest, RecordedFeeds(), quant_format=QuantFormat.QDQ,
                    op_types_to_quantize=STATIC_OPS, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax,
                    use_external_data_format=external)


def _data_files(src: Path) -> list[str]:
    """The files beside graph `src` that hold its weights (optimum's `model.onnx_data`), by the
    names its initializers give."""
    model = onnx.load(str(src), load_external_data=False)
    return sorted({entry.value for tensor in model.graph.initializer
                   if tensor.data_location == onnx.TensorProto.EXTERNAL
                   for entry in tensor.external_data if entry.key == "location"})
