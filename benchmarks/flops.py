"""Operations per call, counted from the ONNX graphs, and what they mean against this machine's
matrix-product ceilings (benchmarks/matmul_peak.py).

A graph's multiply-accumulates are those of its Conv, ConvTranspose, MatMul and Gemm nodes at
the shapes ONNX Runtime's symbolic shape inference gives every tensor for the inputs fed (the
rest, norms, activations and adds, are a few operations per element and bound nothing); a FLOP
is half a multiply-accumulate. A quantized variant's graph does the fp32 graph's arithmetic, so
its component's fp32 ONNX graph is counted. Counts are cached under the sdrt cache folder
(runtime/compile_cache.py), keyed by the graph file's path, size and modification time and the
input shapes (symbolic inference takes 7 s on SD 1.5's UNet and 9 s on its text encoder).

Each call is held to the ceiling of the precision its kernels run at: int8 where the graph
quantizes activations (OpenVINO FakeQuantize, ONNX QuantizeLinear and the integer ops; a graph
with int8 weights only computes in float), else bf16 where OpenVINO was asked for bf16 and the
CPU has it natively (runtime/machine.py), else fp32. A stage's ceiling is the time its calls
would take at their ceilings, as GFLOP/s: Σ flops ÷ Σ (flops ÷ ceiling).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from pathlib import Path

from sdrt.runtime import compile_cache
from sdrt.runtime.deepcache import DEEPCACHE_DIR
from sdrt.runtime.errors import ModelError
from sdrt.runtime.machine import has_native_bf16
from sdrt.runtime.model.folder import graph_file
from sdrt.runtime.model.graph_files import external_bytes
from sdrt.runtime.model.variants import VARIANTS_DIR, Variant

log = logging.getLogger(__name__)

# Ops whose multiply-accumulates are counted; the rest (norms, activations, adds) are a few
# per element and do not move the ratio.
MAC_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm")
SHAPE_CONSTANT = 4096  # elements: external tensors up to this are read for shape inference
# ONNX ops that mean int8 activations (static QDQ, dynamic quantization, QOperator format).
INT8_ONNX_OPS = frozenset({"QuantizeLinear", "DynamicQuantizeLinear", "MatMulInteger",
                           "ConvInteger", "QLinearConv", "QLinearMatMul",
                           "MatMulIntegerToFloat", "DynamicQuantizeMatMul"})
INT8_IR_OP = 'type="FakeQuantize"'  # NNCF's quantized activations in OpenVINO IR
CACHE_FILE = "flops.json"
_COUNTED: dict[str, int] = {}  # this process's counts, also where the cache is off


def graph_macs(graph: Path, shapes: dict[str, tuple[int, ...]]) -> int:
    """Multiply-accumulates of one call of `graph` with inputs of these shapes (its weights are
    not read): Conv, ConvTranspose, MatMul and Gemm, at the shapes ORT's symbolic shape
    inference gives every tensor."""
    import onnx
    from onnx.external_data_helper import uses_external_data
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    model = onnx.load(str(graph), load_external_data=False)
    for graph_input in model.graph.input:
        dims = graph_input.type.tensor_type.shape.dim
        for dim, size in zip(dims, shapes[graph_input.name], strict=True):
            dim.Clear()
            dim.dim_value = size
    # Shape arithmetic reads small constants' values: those are read; the weights become
    # inputs of their shape, so that no value of theirs is ever asked for.
    inline = []
    for tensor in model.graph.initializer:
        if not uses_external_data(tensor):
            inline.append(tensor)
        elif math.prod(tensor.dims) <= SHAPE_CONSTANT:
            tensor.raw_data = external_bytes(graph, tensor)  # not onnx's: hard links
            tensor.data_location = onnx.TensorProto.DEFAULT
            del tensor.external_data[:]
            inline.append(tensor)
        else:
            model.graph.input.append(onnx.helper.make_tensor_value_info(
                tensor.name, tensor.data_type, tensor.dims))
    del model.graph.initializer[:]
    model.graph.initializer.extend(inline)
    inferred = SymbolicShapeInference.infer_shapes(model, auto_merge=True)
    known = {info.name: _dims(info) for info in (*inferred.graph.value_info,
                                                  *inferred.graph.input, *inferred.graph.output)}
    known.update({t.name: tuple(t.dims) for t in inferred.graph.initializer})
    return sum(_node_macs(node, known) for node in inferred.graph.node
               if node.op_type in MAC_OPS)


def _dims(info) -> tuple[int, ...]:
    return tuple(d.dim_value if d.HasField("dim_value") else -1
                 for d in info.type.tensor_type.shape.dim)


def _node_macs(node, known: dict[str, tuple[int, ...]]) -> int:
    """One Conv/ConvTranspose/MatMul/Gemm node's multiply-accumulates."""
    out = known[node.output[0]]
    if node.op_type in ("MatMul", "Gemm"):
        a = known[node.input[0]]
        trans_a = any(x.name == "transA" and x.i for x in node.attribute)
        inner = a[-2] if trans_a else a[-1]
        shape = (*out, inner)
    else:  # Conv: every output element sums Cin/groups · kernel products; ConvTranspose:
        # every input element scatters Cout/groups · kernel of them
        weight = known[node.input[1]]
        shape = ((*out[:1], *out[2:], *weight) if node.op_type == "Conv"
                 else (*known[node.input[0]], *weight[1:]))
    if min(shape) < 0:
        raise ModelError(f"shape inference left {node.op_type} {node.name} unknown")
    return math.prod(shape)


def cached_macs(graph: Path, shapes: dict[str, tuple[int, ...]]) -> int:
    """graph_macs, read from the cache folder's CACHE_FILE where counted before."""
    try:
        folder = compile_cache.cache_dir()
    except ModuleNotFoundError:  # the cache folder is OpenVINO's version's; counted afresh
        folder = None
    stat = graph.stat()
    key = hashlib.sha256(json.dumps([str(graph.resolve()), stat.st_size, stat.st_mtime_ns,
                                     sorted(shapes.items())]).encode()).hexdigest()[:24]
    path = None if folder is None else folder / CACHE_FILE
    if key not in _COUNTED:
        counts = _read_json(path)
        if key not in counts:
            counts[key] = graph_macs(graph, shapes)
            if path is not None:
                _write_json(path, counts)
        _COUNTED[key] = counts[key]
    return _COUNTED[key]


def stage_flops(calls: list[dict], folder: Path, variant: Variant) -> dict[str, int]:
    """FLOPs of one call of a stage by ceiling precision, from its graph runs ({"graph",
    "shapes", "count"} each); {} where a graph cannot be counted (logged)."""
    by_precision: dict[str, int] = {}
    for call in calls:
        path = Path(call["graph"])
        counted = counted_graph(folder, path)
        if counted is None:
            log.info("no ONNX graph to count %s's operations in", path.name)
            return {}
        try:
            macs = cached_macs(counted, {k: tuple(v) for k, v in call["shapes"].items()})
        except Exception as exc:  # onnx missing, or shape inference failing: no figure
            log.warning("operations of %s not counted: %s", counted, exc)
            return {}
        precision = call_precision(folder, path, variant)
        by_precision[precision] = by_precision.get(precision, 0) + 2 * macs * call["count"]
    return by_precision


def counted_graph(folder: Path, path: Path) -> Path | None:
    """The ONNX graph whose operations stand for a call of `path`: its component's fp32 graph
    for a variant's file (the fp32 DeepCache cut for its DeepCache graphs), else `path` itself
    where it is ONNX; None where there is none."""
    parts = _parts(folder, path)
    try:
        if len(parts) > 2 and parts[0] == VARIANTS_DIR:
            if parts[-2] == Path(DEEPCACHE_DIR).name:  # runtime/deepcache.py graphs_dir
                fp32 = folder / DEEPCACHE_DIR / f"{path.stem}.onnx"
                return fp32 if fp32.is_file() else None
            return graph_file(folder, parts[2], "ort")
    except ModelError:  # that component has no ONNX graph (an OpenVINO IR folder)
        return None
    return path if path.suffix == ".onnx" else None


def call_precision(folder: Path, path: Path, variant: Variant) -> str:
    """The ceiling a call of graph `path` is held to: "int8", "bf16" or "fp32" (a graph outside
    the model folder, a tiny VAE's, is held to fp32)."""
    parts = _parts(folder, path)
    if not parts:
        return "fp32"
    in_variant = len(parts) > 2 and parts[0] == VARIANTS_DIR
    if in_variant and quantizes_activations(path):  # the folder's own graphs are float
        return "int8"
    component = parts[2] if in_variant else parts[0]
    bf16 = variant.backend == "openvino" and variant.execution(component) == "bf16"
    return "bf16" if bf16 and has_native_bf16() else "fp32"  # OpenVINO runs f32 without it


def _parts(folder: Path, path: Path) -> tuple[str, ...]:
    """`path`'s parts below `folder`; () outside it."""
    try:
        return path.resolve().relative_to(folder.resolve()).parts
    except ValueError:
        return ()


def quantizes_activations(path: Path) -> bool:
    """Whether graph `path` (ONNX or OpenVINO IR) runs int8 kernels on quantized activations."""
    if path.suffix == ".xml":
        return INT8_IR_OP in path.read_text("utf-8", errors="replace")
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return any(node.op_type in INT8_ONNX_OPS for node in model.graph.node)


def ceiling_figures(flops: dict[str, int], median_s: float,
                    ceilings: dict[str, float | None]) -> dict:
    """flops, gflops_per_s, ceiling_gflops and ceiling_fraction of a stage whose calls did
    `flops` (by precision) in `median_s`; None where a figure is unknown."""
    total = sum(flops.values())
    if not total:
        return {"flops": None, "gflops_per_s": None, "ceiling_gflops": None,
                "ceiling_fraction": None}
    achieved = total / median_s / 1e9
    known = all(ceilings.get(precision) for precision in flops)
    ceiling = (total / sum(count / ceilings[precision] for precision, count in flops.items())
               if known else None)
    return {"flops": total, "gflops_per_s": achieved, "ceiling_gflops": ceiling,
            "ceiling_fraction": achieved / ceiling if ceiling else None}


def _read_json(path: Path | None) -> dict:
    try:
        data = json.loads(path.read_text("utf-8")) if path is not None else {}
    except (OSError, ValueError):  # none yet, or a torn write: counted again
        return {}
    return data if isinstance(data, dict) else {}


def _write_json(path: Path, data: dict) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(".tmp")
        temporary.write_text(json.dumps(data, indent=1), "utf-8")
        temporary.replace(path)
    except OSError as exc:
        log.info("not caching in %s: %s", path, exc)
