"""Weight-only int8 for ONNX Runtime, written one tensor at a time: for graphs too big to calibrate.

onnxruntime's quantize_static loads the whole model, adds outputs to every node and runs it to
record ranges: about three times the fp32 weights in memory, 30 GB for the SDXL UNet. This
writer instead streams the graph's initialisers: each Conv/MatMul/Gemm weight becomes int8,
symmetric per output channel (scale = max|w| / 127), behind a DequantizeLinear node that restores
float32 at run time; every other initialiser is copied as it is. Activations stay float32, so no
calibration is needed. ONNX Runtime does not constant-fold DequantizeLinear (its QDQ rule), so
the session keeps the int8 weights and dequantizes each layer's weight as that layer runs: a
quarter of the resident weight memory, for some extra time per call.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

WEIGHT_OPS = {"Conv": 1, "MatMul": 1, "Gemm": 1}  # op → input index that holds the weight
MIN_ELEMENTS = 4096  # smaller weights (biases, tiny projections) stay float32: nothing to gain
INLINE_BYTES = 1024  # tensors at most this big stay inside model.onnx
METHOD = ("weight-only int8: Conv/MatMul/Gemm weights symmetric per output channel behind "
          "DequantizeLinear, streamed one tensor at a time, float32 activations (no calibration)")


def quantize_weights(src: Path, dest: Path) -> Path:
    """Write the weight-only int8 graph of `src` to `dest` (+ `dest`_data); returns `dest`."""
    model = onnx.load(str(src), load_external_data=False)
    graph = model.graph
    axes = _weight_axes(graph)
    data_path = dest.with_name(dest.name + "_data")
    kept, dequantize = [], []
    with data_path.open("wb") as data:
        for tensor in graph.initializer:
            array = _read(tensor, src.parent)
            axis = axes.get(tensor.name)
            if axis is None or array.size < MIN_ELEMENTS or array.dtype != np.float32:
                kept.append(_stored(numpy_helper.from_array(array, tensor.name), data, data_path))
                continue
            quantized, scale = _int8(array, axis)
            kept.append(_stored(numpy_helper.from_array(quantized, tensor.name + "_int8"), data,
                                data_path))
            kept.append(numpy_helper.from_array(scale, tensor.name + "_scale"))
            dequantize.append(helper.make_node(
                "DequantizeLinear", [tensor.name + "_int8", tensor.name + "_scale"],
                [tensor.name], name=tensor.name + "_dequantize", axis=axis))
    del graph.initializer[:]
    graph.initializer.extend(kept)
    ordered = _interleaved(list(graph.node), dequantize)
    del graph.node[:]
    graph.node.extend(ordered)
    onnx.save_model(model, str(dest))
    return dest


def _interleaved(nodes: list, dequantize: list) -> list:
    """Each DequantizeLinear just before the first node that reads its weight, so a backend
    that runs nodes in file order holds one layer's float weights at a time, not all of them."""
    pending = {node.output[0]: node for node in dequantize}
    ordered = []
    for node in nodes:
        ordered.extend(pending.pop(name) for name in node.input if name in pending)
        ordered.append(node)
    return ordered


def _weight_axes(graph) -> dict[str, int]:
    """Initialiser name → output-channel axis, for the weights of Conv/MatMul/Gemm nodes."""
    names = {tensor.name: len(tensor.dims) for tensor in graph.initializer}
    axes: dict[str, int] = {}
    for node in graph.node:
        index = WEIGHT_OPS.get(node.op_type)
        if index is None or len(node.input) <= index or node.input[index] not in names:
            continue
        rank = names[node.input[index]]
        if node.op_type == "Conv":
            axis = 0  # (out, in, kh, kw)
        elif node.op_type == "Gemm":
            trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
            axis = 0 if trans_b else 1
        elif rank == 2:
            axis = 1  # MatMul(x, W): W is (in, out)
        else:
            continue
        if axes.get(node.input[index], axis) != axis:  # shared with another layout: keep fp32
            axes[node.input[index]] = -1
        else:
            axes[node.input[index]] = axis
    return {name: axis for name, axis in axes.items() if axis >= 0}


def _int8(array: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-channel int8 along `axis`, and the float32 scales (one per channel)."""
    others = tuple(i for i in range(array.ndim) if i != axis)
    peak = np.abs(array).max(axis=others, keepdims=True)
    scale = np.where(peak > 0, peak / 127.0, 1.0).astype(np.float32)
    quantized = np.clip(np.rint(array / scale), -127, 127).astype(np.int8)
    return quantized, scale.reshape(-1)


def _read(tensor, folder: Path) -> np.ndarray:
    """One initialiser's values, reading only its own bytes of an external data file."""
    if tensor.data_location != onnx.TensorProto.EXTERNAL:
        return numpy_helper.to_array(tensor)
    info = {entry.key: entry.value for entry in tensor.external_data}
    dtype = helper.tensor_dtype_to_np_dtype(tensor.data_type)
    count = int(np.prod(tensor.dims)) if tensor.dims else 1
    location = (folder / info["location"]).resolve()
    if folder.resolve() not in location.parents:
        raise ValueError(f"external data {info['location']!r} lies outside {folder}")
    values = np.fromfile(location, dtype=dtype, count=count, offset=int(info.get("offset", 0)))
    return values.reshape(tuple(tensor.dims))


def _stored(tensor, data, data_path: Path):
    """The tensor inline when small, else appended to the data file and referenced from it."""
    if len(tensor.raw_data) <= INLINE_BYTES:
        return tensor
    offset = data.tell()
    data.write(tensor.raw_data)
    tensor.ClearField("raw_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", data_path.name), ("offset", str(offset)),
                       ("length", str(data.tell() - offset))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    return tensor
