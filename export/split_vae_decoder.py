"""Split an exported VAE decoder into a whole-image head and a tileable tail with shared GroupNorm.

A tiled decode differs from the untiled one because every GroupNorm (Wu & He, 2018) of a window
normalises over the window, and the mid-block attention sees only the window. This rewrite of
vae_decoder/model.onnx (torch's export writes GroupNorm as Reshape(B, G, -1) →
InstanceNormalization → Reshape → Mul → Add) writes two graphs beside it:

- vae_decoder_head/model.onnx: `latent_sample` → `features`, everything up to the mid block's
  output (post_quant_conv, conv_in, mid_block with its attention). It runs once on the whole
  latent: its activations are at latent resolution, and its attention's queries are split in
  chunks (slice_attention.chunk_queries) so the score tensor stays bounded.
- vae_decoder_tail/model.onnx: `features` window → `sample`, the upsampling blocks, run per
  window. Each GroupNorm takes its per-group mean and variance from the inputs `norm_mean`,
  `norm_var` (B, S; S the groups of all tail norms in graph order), or from the window itself
  where `local_statistics` is 1, and outputs in `norm_sums` (B, 4, S) the window's Σw, Σw·(x−m),
  Σw·(x−m)² and m, with m the mean it normalised with and w `statistics_weight` (1, 1, h, w)
  upsampled to the norm's resolution, so windows' sums combine into image-wide statistics
  (runtime/vae/pooled_norm.py).

It also cuts the tail at every GroupNorm into stage graphs (export/vae_stages.py) for the exact
tiled decode (runtime/vae/exact_tiled.py),
which the runtime prefers where they exist; the shared-norm
tail stays for folders split before the stages existed and for the estimated-statistics modes.
The graphs are added in place with their manifest `files` entries; the untiled decoder is kept.

Usage: python -m sdrt.export.split_vae_decoder MODEL_DIR [--query-chunks N]
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from sdrt.export.slice_attention import chunk_queries
from sdrt.runtime.errors import ExportError
from sdrt.runtime.model.manifest import FileEntry, Manifest, sha256_file
from sdrt.runtime.vae.exact_tiled import STAGES_DIR

HEAD, TAIL = "vae_decoder_head", "vae_decoder_tail"
FEATURES = "features"
# The tensor torch's export names for the decoder's mid-block output (diffusers' Decoder).
MID_BLOCK_OUTPUT = "/decoder/mid_block/"
# Query chunks of the head's attention: at 1024² (16,384 latent tokens) one chunk's fp32 score
# tensor is 64 MiB instead of 1 GiB.
DEFAULT_QUERY_CHUNKS = 16


def mid_block_output(graph: onnx.GraphProto) -> str:
    """The last tensor the mid block writes (the up blocks' input)."""
    mids = [node for node in graph.node if node.name.startswith(MID_BLOCK_OUTPUT)]
    if not mids:
        raise ExportError("vae_decoder: no /decoder/mid_block/ nodes (not a diffusers export?)")
    return mids[-1].output[0]


def subgraph(graph: onnx.GraphProto, inputs: list[onnx.ValueInfoProto],
             outputs: list[str], name: str) -> onnx.GraphProto:
    """The nodes between `inputs` and `outputs`, with the initializers they use."""
    producers = {out: node for node in graph.node for out in node.output}
    starts = {info.name for info in inputs}
    initializers = {init.name: init for init in graph.initializer}
    needed: set[int] = set()
    todo = list(outputs)
    while todo:
        tensor = todo.pop()
        node = producers.get(tensor)
        if tensor in starts or tensor in initializers or not tensor or node is None:
            if node is None and tensor not in starts and tensor not in initializers and tensor:
                raise ExportError(f"vae_decoder: {name} needs {tensor!r}, outside the split")
            continue
        if id(node) not in needed:
            needed.add(id(node))
            todo.extend(node.input)
    nodes = [node for node in graph.node if id(node) in needed]
    used = {tensor for node in nodes for tensor in node.input}
    outs = [helper.make_tensor_value_info(out, TensorProto.FLOAT, ["batch", "channels",
                                                                   "out_height", "out_width"])
            for out in outputs]
    return helper.make_graph(nodes, name, inputs, outs,
                             [initializers[t] for t in sorted(used) if t in initializers])


def features_info(name: str = FEATURES) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT,
                                         ["batch", "channels", "height", "width"])


class _Builder:
    """Appends nodes with unique names under one prefix; constants as initializers."""

    def __init__(self, prefix: str, initializers: list[onnx.TensorProto]) -> None:
        self.prefix, self.nodes, self.initializers, self.count = prefix, [], initializers, 0

    def const(self, value, dtype=np.int64) -> str:
        name = f"{self.prefix}/const{len(self.initializers)}"
        self.initializers.append(numpy_helper.from_array(np.asarray(value, dtype), name))
        return name

    def op(self, op_type: str, *inputs: str, output: str | None = None, **attrs) -> str:
        self.count += 1
        out = output or f"{self.prefix}/{op_type}{self.count}"
        self.nodes.append(helper.make_node(op_type, list(inputs), [out],
                                           name=f"{self.prefix}/{op_type}{self.count}", **attrs))
        return out


def _constant_value(graph: onnx.GraphProto, name: str) -> np.ndarray:
    for node in graph.node:
        if node.output and node.output[0] == name and node.op_type == "Constant":
            return numpy_helper.to_array(node.attribute[0].t)
    for init in graph.initializer:
        if init.name == name:
            return numpy_helper.to_array(init)
    raise ExportError(f"vae_decoder: {name!r} is not a constant")


def group_norm_parts(graph: onnx.GraphProto, producers: dict[str, onnx.NodeProto],
                     node: onnx.NodeProto) -> tuple[onnx.NodeProto, int, float]:
    """For an InstanceNormalization of torch's GroupNorm export (Reshape(B, G, -1) →
    InstanceNormalization with scale 1, bias 0 → ...): its Reshape, group count and epsilon;
    ExportError for any other InstanceNormalization."""
    reshape = producers.get(node.input[0])
    if reshape is None or reshape.op_type != "Reshape":
        raise ExportError(f"vae_decoder: {node.name} is not a GroupNorm (no Reshape before)")
    scale, bias = (_constant_value(graph, node.input[i]) for i in (1, 2))
    target = _constant_value(graph, reshape.input[1])
    if not (np.all(scale == 1) and np.all(bias == 0)) or list(target[::2]) != [0, -1]:
        raise ExportError(f"vae_decoder: {node.name} is not torch's GroupNorm pattern")
    return reshape, int(target[1]), next((a.f for a in node.attribute if a.name == "epsilon"),
                                         1e-5)


def share_norms(graph: onnx.GraphProto) -> int:
    """Replace each GroupNorm's InstanceNormalization of the tail graph in place (module doc);
    adds the statistics inputs and `norm_sums` output. How many norms (S columns in all)."""
    producers = {out: node for node in graph.node for out in node.output}
    extra: list[onnx.TensorProto] = []
    sums: list[list[str]] = [[], [], [], []]
    replaced, offset = {}, 0
    for node in graph.node:
        if node.op_type != "InstanceNormalization":
            continue
        reshape, groups, eps = group_norm_parts(graph, producers, node)
        build = _Builder(node.name + "/shared", extra)
        _shared_norm(build, reshape.input[0], node.input[0], node.output[0], groups, offset,
                     eps, sums)
        replaced[id(node)] = build.nodes
        offset += groups
    if not replaced:
        raise ExportError("vae_decoder: no GroupNorm after the mid block")
    nodes = []
    for node in graph.node:
        nodes.extend(replaced.get(id(node), [node]))
    final = _Builder("/norm_sums", extra)
    rows = [final.op("Unsqueeze", final.op("Concat", *part, axis=1), final.const([1]))
            for part in sums]  # (B, 1, S) each
    final.op("Concat", *rows, axis=1, output="norm_sums")  # (B, 4, S)
    del graph.node[:]
    graph.node.extend(nodes + final.nodes)
    graph.initializer.extend(extra)
    graph.input.extend([
        helper.make_tensor_value_info("norm_mean", TensorProto.FLOAT, ["batch", offset]),
        helper.make_tensor_value_info("norm_var", TensorProto.FLOAT, ["batch", offset]),
        helper.make_tensor_value_info("local_statistics", TensorProto.FLOAT, [1]),
        helper.make_tensor_value_info("statistics_weight", TensorProto.FLOAT,
                                      [1, 1, "height", "width"])])
    graph.output.append(helper.make_tensor_value_info("norm_sums", TensorProto.FLOAT,
                                                      ["batch", 4, offset]))
    return len(replaced)


def _shared_norm(b: _Builder, x: str, grouped: str, output: str, groups: int, offset: int,
                 eps: float, sums: list[list[str]]) -> None:
    """One GroupNorm on `grouped` (B, G, N) = Reshape(x (B, C, H, W)), statistics given or own.
    Ordered so that at most two activation-sized tensors live at once, as in the node it
    replaces: the weighted sums are matrix-vector products, not weighted copies."""
    axis = b.const([2])

    def given(name: str) -> str:  # (B, S) → this norm's (B, G, 1)
        part = b.op("Slice", name, b.const([offset]), b.const([offset + groups]), b.const([1]))
        return b.op("Unsqueeze", part, axis)

    mean_in, var_in = given("norm_mean"), given("norm_var")
    own_mean = b.op("ReduceMean", grouped, axis)  # (B, G, 1)
    size = b.op("Cast", b.op("Gather", b.op("Shape", grouped), b.const(2), axis=0),
                to=TensorProto.FLOAT)
    own_var = b.op("Div", b.op("ReduceSumSquare", b.op("Sub", grouped, own_mean), axis), size)
    local = "local_statistics"
    mean = b.op("Add", mean_in, b.op("Mul", local, b.op("Sub", own_mean, mean_in)))
    var = b.op("Add", var_in, b.op("Mul", local, b.op("Sub", own_var, var_in)))
    scale = b.op("Reciprocal", b.op("Sqrt", b.op("Add", var, b.const(eps, np.float32))))
    # the window's weights at this norm's resolution, as a (N, 1) column in `grouped`'s order
    spatial = b.op("Slice", b.op("Shape", x), b.const([2]), b.const([4]))
    sizes = b.op("Concat", b.const([1, 1]), spatial, axis=0)
    weight = b.op("Resize", "statistics_weight", "", "", sizes, mode="nearest",
                  coordinate_transformation_mode="asymmetric", nearest_mode="floor")
    per_group = b.op("Div", b.op("Gather", b.op("Shape", x), b.const(1), axis=0),
                     b.const(groups))
    repeat = b.op("Concat", b.const([1]), b.op("Unsqueeze", per_group, b.const([0])),
                  b.const([1, 1]), axis=0)
    column = b.op("Reshape", b.op("Expand", weight, repeat), b.const([-1, 1]))  # (N, 1)
    centred = b.op("Sub", grouped, mean)  # (B, G, N)
    second = b.op("MatMul", b.op("Mul", centred, centred), column)  # (B, G, 1)
    first = b.op("MatMul", centred, column)
    # ONNX Runtime runs a branch that only a graph output needs as late as it can, keeping
    # `centred` of every norm alive to the end (1.35 GiB instead of 0.65 for a 384² window):
    # a zero-valued dependency makes the output wait for the sums instead.
    after = b.op("Mul", b.op("Add", first, second), b.const(0, np.float32))
    b.op("Mul", centred, b.op("Add", scale, after), output=output)
    squeeze = b.const([2])
    first, second = (b.op("Squeeze", t, squeeze) for t in (first, second))  # (B, G)
    count = b.op("Expand", b.op("ReduceSum", column, keepdims=0), b.op("Shape", first))
    for row, tensor in zip(sums, (count, first, second, b.op("Squeeze", mean, squeeze)),
                           strict=True):
        row.append(tensor)


def split_decoder(model: onnx.ModelProto,
                  query_chunks: int = DEFAULT_QUERY_CHUNKS) -> tuple[onnx.ModelProto,
                                                                     onnx.ModelProto, int]:
    """(head, tail, tail GroupNorm count) from a decoder graph loaded with its weights."""
    graph = model.graph
    cut = mid_block_output(graph)
    head_graph = subgraph(graph, list(graph.input), [cut], "vae_decoder_head")
    head_graph.node.append(helper.make_node("Identity", [cut], [FEATURES], name="/features"))
    del head_graph.output[:]
    head_graph.output.append(features_info())
    tail_graph = subgraph(graph, [features_info(cut)], [o.name for o in graph.output],
                          "vae_decoder_tail")
    tail_graph.input[0].name = FEATURES
    for node in tail_graph.node:
        node.input[:] = [FEATURES if name == cut else name for name in node.input]
    norms = share_norms(tail_graph)
    head = helper.make_model(head_graph, opset_imports=model.opset_import)
    tail = helper.make_model(tail_graph, opset_imports=model.opset_import)
    if query_chunks > 1:
        chunk_queries(head, query_chunks)  # none where the decoder has no mid-block attention
    return head, tail, norms


def split_folder(folder: Path, query_chunks: int = DEFAULT_QUERY_CHUNKS) -> tuple[int, int]:
    """Write the head, tail and stage graphs (export/vae_stages.py) into `folder` and list them
    in its manifest; the tail's shared GroupNorm count and the number of stages."""
    source = folder / "vae_decoder" / "model.onnx"
    if not source.is_file():
        raise ExportError(f"'{folder}' has no vae_decoder/model.onnx")
    from sdrt.export.vae_stages import write_stages  # it imports this module's helpers

    manifest = Manifest.load(folder)
    decoder = onnx.load(str(source))
    head, tail, norms = split_decoder(decoder, query_chunks)
    written = []
    for name, model in ((HEAD, head), (TAIL, tail)):
        onnx.checker.check_model(model)
        path = folder / name / "model.onnx"
        path.parent.mkdir(exist_ok=True)
        onnx.save_model(model, str(path))
        written.append(path)
    del head, tail
    stage_files, stages = write_stages(folder, decoder)
    files = {rel: entry for rel, entry in manifest.files.items()
             if not rel.startswith(STAGES_DIR + "/")}  # a previous split's stages
    for path in written + stage_files:
        files[path.relative_to(folder).as_posix()] = FileEntry(sha256_file(path),
                                                               path.stat().st_size)
    replace(manifest, files=files).save(folder)
    return norms, stages


def main() -> None:
    args = sys.argv[1:]
    chunks = DEFAULT_QUERY_CHUNKS
    if len(args) == 3 and args[1] == "--query-chunks" and args[2].isdigit():
        chunks, args = int(args[2]), args[:1]
    if len(args) != 1 or chunks < 1:
        sys.exit(__doc__.strip().splitlines()[-1])
    try:
        norms, stages = split_folder(Path(args[0]), chunks)
    except ExportError as exc:
        sys.exit(f"error: {exc}")
    print(f"wrote {HEAD}, {TAIL} ({norms} shared GroupNorms) and {STAGES_DIR} ({stages} "
          f"stages) in {args[0]}")


if __name__ == "__main__":
    main()
