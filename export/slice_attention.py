"""Slice the attention of an already exported UNet graph, head by head, without re-exporting.

`sdrt export --attention sliced` traces diffusers with a head-by-head processor
(chunked_attention.py). An exported folder can get the same bound afterwards: this rewrites each
attention core of unet/model.onnx — MatMul(Q, Kᵀ) → Softmax → MatMul(·, V) on (B, heads, N, d)
tensors, as torch's exporter writes scaled_dot_product_attention — into `heads` such cores on
Split slices of Q, Kᵀ and V, concatenated back, so one (B, 1, N, M) score tensor is alive at a
time. Only the graph (a few MB) is rewritten; the weights file is shared by a hard link, as is
every other file of the folder, so the new folder costs no disk. The head count of each
attention comes from unet/config.json by the block its node names.

With `--query-chunks N`, a folder sliced already (by either way) gets each core's queries split
in N chunks along the tokens too, in its UNet graph and its variants' (a quantized graph's
QuantizeLinear/DequantizeLinear pairs are cloned with the core), so the score tensor is held an
N-th at a time: for SD 1.5's int8 UNet at 512×512, 32 MB instead of 64.

Usage: python -m sdrt.export.slice_attention MODEL_DIR OUT_DIR [--query-chunks N]
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from dataclasses import replace
from pathlib import Path

import onnx
from onnx import helper

from sdrt.runtime.errors import ExportError
from sdrt.runtime.model.manifest import FileEntry, Manifest, sha256_file

_BLOCK = re.compile(r"/(down_blocks|up_blocks)\.(\d+)/|/mid_block/")


def heads_by_block(config: dict) -> dict[str, int]:
    """Node-name block prefix → attention heads, as diffusers' UNet2DConditionModel assigns them
    (`attention_head_dim` is the head count in SD configs unless num_attention_heads is set)."""
    count = len(config["down_block_types"])
    heads = config.get("num_attention_heads") or config["attention_head_dim"]
    heads = heads if isinstance(heads, list) else [heads] * count
    found = {f"down_blocks.{i}": int(h) for i, h in enumerate(heads)}
    found.update({f"up_blocks.{i}": int(h) for i, h in enumerate(reversed(heads))})
    found["mid_block"] = int(heads[-1])
    return found


def slice_graph(model: onnx.ModelProto, heads: dict[str, int]) -> int:
    """Rewrite every attention core of `model` in place; how many were sliced."""
    graph = model.graph
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    producers = {out: node for node in graph.node for out in node.output}
    replaced: dict[int, list[onnx.NodeProto]] = {}  # id of the core's last node → its nodes
    dropped: set[int] = set()
    for softmax in graph.node:
        if softmax.op_type != "Softmax":
            continue
        scores = producers.get(softmax.input[0])
        after = consumers.get(softmax.output[0], [])
        if (scores is None or scores.op_type != "MatMul" or len(after) != 1
                or after[0].op_type != "MatMul" or after[0].input[0] != softmax.output[0]
                or len(consumers.get(scores.output[0], [])) != 1):
            continue
        count = _heads_of(scores.name, heads)
        # at the last node's place, where Q, Kᵀ and V are all computed already
        replaced[id(after[0])] = _sliced_core(scores, softmax, after[0], count)
        dropped.update({id(scores), id(softmax)})
    _replace(graph, replaced, dropped)
    return len(replaced)


PASS_THROUGH = ("QuantizeLinear", "DequantizeLinear", "Mul", "Div", "Cast")


def chunk_queries(model: onnx.ModelProto, chunks: int) -> int:
    """Split every attention core's queries into `chunks` along the token axis (-2), so its
    score tensor is held a `chunks`-th at a time; QuantizeLinear/DequantizeLinear pairs of a
    quantized graph are cloned with the core, so ONNX Runtime still fuses them. How many cores."""
    graph = model.graph
    producers = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    replaced: dict[int, list[onnx.NodeProto]] = {}
    dropped: set[int] = set()
    for softmax in graph.node:
        chain = _core_chain(softmax, producers, consumers) if softmax.op_type == "Softmax" else None
        if chain is None:
            continue
        replaced[id(chain[-1])] = _chunked(chain, chunks)
        dropped.update(id(node) for node in chain[:-1])
    _replace(graph, replaced, dropped)
    return len(replaced)


def _core_chain(softmax, producers, consumers) -> list[onnx.NodeProto] | None:
    """[query DequantizeLinear?, MatMul, …, Softmax, …, MatMul]: one attention core, each node's
    output used only by the next; None where the pattern differs."""
    def single(node):
        users = consumers.get(node.output[0], [])
        return users[0] if len(users) == 1 else None

    back = [softmax]
    while True:
        node = producers.get(back[0].input[0])
        if node is None or single(node) is not back[0]:
            return None
        back.insert(0, node)
        if node.op_type == "MatMul":
            break
        if node.op_type not in PASS_THROUGH:
            return None
    query = producers.get(back[0].input[0])
    if query is not None and query.op_type == "DequantizeLinear" and single(query) is back[0]:
        back.insert(0, query)
    node = softmax
    while True:
        node = single(node)
        if node is None:
            return None
        back.append(node)
        if node.op_type == "MatMul":
            return back if node.input[0] == back[-2].output[0] else None
        if node.op_type not in PASS_THROUGH:
            return None


def _chunked(chain: list[onnx.NodeProto], chunks: int) -> list[onnx.NodeProto]:
    """The chain cloned per query chunk: Split its first input, Concat its last output."""
    first, last = chain[0], chain[-1]
    prefix = first.name + "/chunk"
    parts = [f"{prefix}{c}/in" for c in range(chunks)]
    nodes = [helper.make_node("Split", [first.input[0]], parts, name=f"{prefix}/split", axis=-2,
                              num_outputs=chunks)]
    outputs = []
    for c in range(chunks):
        rename = {first.input[0]: parts[c]}
        for node in chain:
            clone = onnx.NodeProto()
            clone.CopyFrom(node)
            clone.name = f"{node.name}/chunk{c}"
            for i, name in enumerate(clone.input):
                clone.input[i] = rename.get(name, name)
            rename[node.output[0]] = f"{node.output[0]}/chunk{c}"
            clone.output[0] = rename[node.output[0]]
            nodes.append(clone)
        outputs.append(rename[last.output[0]])
    nodes.append(helper.make_node("Concat", outputs, [last.output[0]], name=f"{prefix}/concat",
                                  axis=-2))
    return nodes


def _replace(graph, replaced: dict[int, list[onnx.NodeProto]], dropped: set[int]) -> None:
    """Put each replacement at its node's place and drop the nodes it covers."""
    nodes = []
    for node in graph.node:
        if id(node) in replaced:
            nodes.extend(replaced[id(node)])
        elif id(node) not in dropped:
            nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)


def _heads_of(name: str, heads: dict[str, int]) -> int:
    match = _BLOCK.search(name)
    if match is None:
        raise ExportError(f"unet: cannot tell which block attention node {name!r} belongs to")
    key = "mid_block" if match.group(1) is None else f"{match.group(1)}.{match.group(2)}"
    return heads[key]


def _sliced_core(scores: onnx.NodeProto, softmax: onnx.NodeProto, weighted: onnx.NodeProto,
                 count: int) -> list[onnx.NodeProto]:
    """The nodes of one core split into `count` heads (axis 1 of (B, heads, N, d))."""
    prefix = scores.name + "/head"
    query, key_t = scores.input
    value = weighted.input[1]
    axis = next((a.i for a in softmax.attribute if a.name == "axis"), -1)
    nodes = []
    parts = {}
    for label, tensor in (("q", query), ("k", key_t), ("v", value)):
        parts[label] = [f"{prefix}/{label}{h}" for h in range(count)]
        nodes.append(helper.make_node("Split", [tensor], parts[label],
                                      name=f"{prefix}/split_{label}",
                                      axis=1, num_outputs=count))
    outputs = []
    for h in range(count):  # one head's scores, softmax and weighted sum before the next head
        names = [f"{prefix}{h}/{step}" for step in ("scores", "probs", "out")]
        nodes += [
            helper.make_node("MatMul", [parts["q"][h], parts["k"][h]], [names[0]],
                             name=f"{prefix}{h}/MatMul"),
            helper.make_node("Softmax", [names[0]], [names[1]], name=f"{prefix}{h}/Softmax",
                             axis=axis),
            helper.make_node("MatMul", [names[1], parts["v"][h]], [names[2]],
                             name=f"{prefix}{h}/MatMul_1"),
        ]
        outputs.append(names[2])
    nodes.append(helper.make_node("Concat", outputs, list(weighted.output), name=f"{prefix}/concat",
                                  axis=1))
    return nodes


def slice_folder(src: Path, out: Path, query_chunks: int = 1) -> int:
    """OUT_DIR: SRC's files hard-linked, the UNet graphs rewritten, the manifest updated.

    With `query_chunks` 1: unet/model.onnx sliced head by head (variants dropped: they were
    made from the unsliced graph). Above 1: an already sliced folder's UNet graphs, its
    variants' too, get their queries split in that many chunks (variants kept)."""
    if out.exists():
        raise ExportError(f"OUT_DIR '{out}' already exists")
    manifest = Manifest.load(src)
    if query_chunks > 1 and manifest.extra.get("attention") != "sliced":
        raise ExportError(f"'{src}' is not sliced yet: run without --query-chunks first")
    graphs = ([src / "unet" / "model.onnx"] if query_chunks == 1 else
              [src / rel for rel in manifest.files if rel.endswith("unet/model.onnx")])
    rewritten = {}
    for graph_path in graphs:
        model = onnx.load(str(graph_path), load_external_data=False)
        count = (slice_graph(model, heads_by_block(json.loads(
            (src / "unet" / "config.json").read_text("utf-8")))) if query_chunks == 1
            else chunk_queries(model, query_chunks))
        if not count:
            raise ExportError(f"{graph_path}: no attention core (MatMul → Softmax → MatMul)")
        rewritten[graph_path] = model
    keep_variants = query_chunks > 1
    for path in sorted(src.rglob("*")):
        dest = out / path.relative_to(src)
        if path.is_dir():
            dest.mkdir(parents=True, exist_ok=True)
        elif (path not in rewritten and path != src / "manifest.json"
              and (keep_variants or "variants" not in path.parts)):
            dest.parent.mkdir(parents=True, exist_ok=True)
            link_or_copy(path, dest)
    files = {rel: entry for rel, entry in manifest.files.items()
             if keep_variants or not rel.startswith("variants/")}
    for graph_path, model in rewritten.items():
        written = out / graph_path.relative_to(src)
        written.parent.mkdir(parents=True, exist_ok=True)
        onnx.save_model(model, str(written))
        files[graph_path.relative_to(src).as_posix()] = FileEntry(sha256_file(written),
                                                                  written.stat().st_size)
    extra = {**manifest.extra, "attention": "sliced"}
    if query_chunks > 1:
        extra["attention_query_chunks"] = query_chunks
    replace(manifest, files=files, variants=manifest.variants if keep_variants else [],
            extra=extra).save(out)
    return count


def link_or_copy(path: Path, dest: Path) -> None:
    """Hard-link `path` to `dest` (weights shared, no disk), else copy it."""
    try:
        os.link(path, dest)
    except OSError:  # another filesystem: a copy
        shutil.copyfile(path, dest)


def main() -> None:
    args = sys.argv[1:]
    chunks = 1
    if len(args) == 4 and args[2] == "--query-chunks" and args[3].isdigit():
        chunks, args = int(args[3]), args[:2]
    if len(args) != 2 or chunks < 1:
        sys.exit(__doc__.strip().splitlines()[-1])
    count = slice_folder(Path(args[0]), Path(args[1]), chunks)
    print(f"rewrote {count} attention cores per UNet graph → {args[1]}")


if __name__ == "__main__":
    main()
