"""Write one ONNX graph file as optimum's layout has it: `model.onnx` + `model.onnx_data`.

optimum writes a graph's weights beside it in `<name>_data` when the model is over protobuf's
2 GiB limit (convert.py, `location=output.name + "_data"`). torch's TorchScript exporter instead
scatters such weights over one file per tensor; this module gathers them into the single data
file, one tensor at a time so a 3.4 GB UNet never sits in memory twice.
"""

from __future__ import annotations

import logging
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path

import onnx
import torch

from sdrt.export.components import GraphDef, Inputs
from sdrt.runtime.errors import ExportError
from sdrt.runtime.model.manifest import TensorSpec

logger = logging.getLogger("sdrt.export")

EXTERNAL_DATA_THRESHOLD = 2 * 1024**3  # protobuf's hard limit on one serialised message
EXTERNAL_MIN_TENSOR_BYTES = 1024  # smaller tensors stay inline, as onnx.save_model does
DATA_ALIGNMENT = 4096  # page-aligned offsets let runtimes mmap the weights
TORCHSCRIPT_OPSETS = range(14, 21)  # the TorchScript exporter's range; SD graphs need ≥ 14


def export_graph(module: torch.nn.Module, graph: GraphDef, inputs: Inputs, dest: Path, *,
                 opset: int, external_data_threshold: int = EXTERNAL_DATA_THRESHOLD) -> None:
    """Trace `module` with torch's TorchScript ONNX exporter and write `dest` (+ `_data`)."""
    scratch = dest.parent / ".torch_export"
    scratch.mkdir(parents=True)
    raw = scratch / dest.name
    try:
        with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.onnx.export(
                module, tuple(inputs[name] for name in graph.inputs), str(raw), dynamo=False,
                opset_version=opset, input_names=list(graph.inputs),
                output_names=list(graph.outputs), dynamic_axes=graph.dynamic_axes,
                do_constant_folding=True)
        _log_warnings(graph.name, caught)
    except Exception as exc:  # torch raises many types; report one line, keep the cause
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ExportError(f"torch could not export {graph.name}: {type(exc).__name__}: "
                          f"{first}") from exc
    write_onnx(raw, dest, external_data_threshold=external_data_threshold)
    shutil.rmtree(scratch)


def _log_warnings(name: str, caught: list[warnings.WarningMessage]) -> None:
    # Tracer warnings flag Python-level branches on shapes; the checks at two other sizes are
    # what proves the graph general, so these are debug detail, not user-facing noise.
    for message in sorted({str(w.message).splitlines()[0] for w in caught}):
        logger.debug("%s export: %s", name, message)


def write_onnx(raw: Path, dest: Path, *,
               external_data_threshold: int = EXTERNAL_DATA_THRESHOLD) -> None:
    """Move `raw` to `dest`, gathering weights into `dest`_data if external or over threshold."""
    model = onnx.load(str(raw), load_external_data=False)
    tensors = list(_weight_tensors(model.graph))
    scattered = any(_is_external(t) for t in tensors)
    inline = sum(len(t.raw_data) for t in tensors if not _is_external(t))
    if not scattered and inline <= external_data_threshold:
        raw.replace(dest)
        return
    data_path = dest.with_name(dest.name + "_data")
    with open(data_path, "wb") as out:
        for tensor in tensors:
            blob = _tensor_bytes(tensor, raw.parent)
            if blob is None:
                continue
            out.write(b"\0" * (-out.tell() % DATA_ALIGNMENT))
            _point_to(tensor, data_path.name, out.tell(), len(blob))
            out.write(blob)
    onnx.save_model(model, str(dest))
    logger.info("%s: weights in %s (%.1f MB)", dest.parent.name, data_path.name,
                data_path.stat().st_size / 1e6)


def _weight_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """Initializers and constant tensors of a graph and its subgraphs."""
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from _weight_tensors(attr.g)
            for sub in attr.graphs:
                yield from _weight_tensors(sub)


def _is_external(tensor: onnx.TensorProto) -> bool:
    return tensor.data_location == onnx.TensorProto.EXTERNAL


def _tensor_bytes(tensor: onnx.TensorProto, base: Path) -> bytes | None:
    """The tensor's bytes to move into the data file, or None to leave it inline."""
    if not _is_external(tensor):
        raw = tensor.raw_data
        return raw if len(raw) >= EXTERNAL_MIN_TENSOR_BYTES else None
    info = {entry.key: entry.value for entry in tensor.external_data}
    path = (base / info["location"]).resolve()
    if base.resolve() not in path.parents:  # a graph may only name files beside it
        raise ExportError(f"exported graph names weights outside its folder: {info['location']}")
    with open(path, "rb") as handle:
        handle.seek(int(info.get("offset", 0)))
        length = int(info["length"]) if "length" in info else -1
        return handle.read(length)


def _point_to(tensor: onnx.TensorProto, location: str, offset: int, length: int) -> None:
    del tensor.external_data[:]
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    tensor.data_location = onnx.TensorProto.EXTERNAL
    tensor.ClearField("raw_data")


def graph_io(path: Path) -> tuple[dict[str, TensorSpec], dict[str, TensorSpec]]:
    """Inputs and outputs of an ONNX graph as manifest TensorSpecs (dynamic axes → None)."""
    model = onnx.load(str(path), load_external_data=False)
    initializers = {t.name for t in model.graph.initializer}
    inputs = {v.name: _spec(v) for v in model.graph.input if v.name not in initializers}
    return inputs, {v.name: _spec(v) for v in model.graph.output}


def _spec(value: onnx.ValueInfoProto) -> TensorSpec:
    tensor_type = value.type.tensor_type
    dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type).name
    shape = tuple(d.dim_value if d.HasField("dim_value") else None
                  for d in tensor_type.shape.dim)
    return TensorSpec(shape=shape, dtype=dtype)
