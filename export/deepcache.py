"""DeepCache graphs for an exported UNet: a "full" graph that also returns a cached feature, and a
"shallow" graph that recomputes only the skip branch on top of that feature.

DeepCache (Ma, Fang, Wang, CVPR 2024, arXiv:2312.00858): the UNet's deep features change slowly
from step to step, so a full call every N steps caches the up path's hidden state where it meets
a shallow skip branch; the calls between run only that branch (conv_in, the first down block's
first layers, the last up block's matching layers, conv_out) on the cached state. Branch b is
the skip concatenated into the last up block's (b+1)-th layer from the end (0: the skip from
conv_in, the cheapest branch and the paper's choice for Stable Diffusion).

The graphs are cut from unet/model.onnx as torch's exporter names its nodes (`…/up_blocks.3/
resnets.2/…`, with or without sdrt's `/model` prefix, so optimum's layout works too): the cached
tensor is the first input of the Concat feeding that layer. The shallow graph holds exactly the
nodes that lie between {sample, timestep, encoder_hidden_states, SDXL's added inputs, the cached
feature} and out_sample. Both graphs keep pointing at the UNet's weights file, hard-linked
into unet/deepcache/ (ONNX Runtime refuses external data outside a graph's folder).

Usage: python -m sdrt.export.deepcache MODEL_DIR [--branch B]
"""

from __future__ import annotations

import argparse
import re
import shutil
from dataclasses import replace
from pathlib import Path

import onnx
from onnx import helper

from sdrt.export.slice_attention import link_or_copy
from sdrt.runtime.deepcache import DEEPCACHE_DIR, FEATURE, FULL_GRAPH, SHALLOW_GRAPH
from sdrt.runtime.errors import ExportError
from sdrt.runtime.model.manifest import FileEntry, Manifest, sha256_file

DEFAULT_BRANCH = 0  # the paper's choice for Stable Diffusion: the most speed, and it held its gate
_UP_LAYER = re.compile(r"(?:^|/)up_blocks\.(\d+)/resnets\.(\d+)/")


def find_feature(graph: onnx.GraphProto, branch: int) -> str:
    """The tensor entering branch `branch`'s skip Concat in the last up block (its first input)."""
    layers: dict[tuple[int, int], list[onnx.NodeProto]] = {}
    for node in graph.node:
        match = _UP_LAYER.search(node.name)
        if match:
            layers.setdefault((int(match.group(1)), int(match.group(2))), []).append(node)
    if not layers:
        raise ExportError("unet: no node named like torch's '/up_blocks.N/resnets.M/…'; "
                          "DeepCache needs a graph exported by torch (sdrt's or optimum's)")
    last = max(block for block, _ in layers)
    count = max(layer for block, layer in layers if block == last) + 1
    if not 0 <= branch < count:
        raise ExportError(f"--branch must be between 0 and {count - 1} (the last up block has "
                          f"{count} layers), got {branch}")
    layer_inputs = {name for node in layers[(last, count - 1 - branch)] for name in node.input}
    for node in graph.node:
        if node.op_type == "Concat" and node.output[0] in layer_inputs and len(node.input) == 2:
            return node.input[0]
    raise ExportError(f"unet: no skip Concat feeds up_blocks.{last}/resnets.{count - 1 - branch}")


def full_graph(model: onnx.ModelProto, feature: str) -> onnx.ModelProto:
    """The UNet with the cached feature as a second output, FEATURE."""
    full = onnx.ModelProto()
    full.CopyFrom(model)
    full.graph.node.append(helper.make_node("Identity", [feature], [FEATURE],
                                            name="/deepcache/feature"))
    full.graph.output.append(helper.make_tensor_value_info(
        FEATURE, _elem_type(model), ["batch", "feature_channels", "feature_height",
                                     "feature_width"]))
    return full


def shallow_graph(model: onnx.ModelProto, feature: str) -> onnx.ModelProto:
    """The nodes between the UNet's inputs plus FEATURE (standing for `feature`) and out_sample,
    in the original order, with the initializers they use."""
    graph = model.graph
    producers = {out: node for node in graph.node for out in node.output}
    inputs = {value.name for value in graph.input}
    needed, stack = set(), ["out_sample"]
    seen = set()
    while stack:  # walk back from the output, stopping at the cached feature
        name = stack.pop()
        node = producers.get(name)
        if name in seen or name == feature or node is None:
            continue
        seen.add(name)
        needed.add(id(node))
        stack.extend(node.input)
        if any(attr.type == onnx.AttributeProto.GRAPH for attr in node.attribute):
            # a subgraph's outer-scope inputs are not in node.input: this walk would miss them
            raise ExportError(f"unet: node {node.name!r} has a subgraph; not supported")
    nodes = []
    for node in graph.node:
        if id(node) in needed:
            clone = onnx.NodeProto()
            clone.CopyFrom(node)
            for i, name in enumerate(clone.input):
                if name == feature:
                    clone.input[i] = FEATURE
            nodes.append(clone)
    used = {name for node in nodes for name in node.input}
    if FEATURE not in used:
        raise ExportError(f"unet: out_sample does not depend on {feature!r}")
    shallow = helper.make_graph(
        nodes, "deepcache_shallow",
        [value for value in graph.input if value.name in inputs & used] + [
            helper.make_tensor_value_info(FEATURE, _elem_type(model),
                                          ["batch", "feature_channels", "feature_height",
                                           "feature_width"])],
        list(graph.output),
        initializer=[init for init in graph.initializer if init.name in used])
    return helper.make_model(shallow, opset_imports=model.opset_import,
                             ir_version=model.ir_version, producer_name="sdrt.export.deepcache")


def _elem_type(model: onnx.ModelProto) -> int:
    return next(v.type.tensor_type.elem_type for v in model.graph.input if v.name == "sample")


def make_deepcache(folder: Path, branch: int = DEFAULT_BRANCH) -> str:
    """Write unet/deepcache/{full,shallow}.onnx beside the UNet and list them in the manifest
    (`extra.deepcache`: branch and cached tensor); the cached tensor's name."""
    manifest = Manifest.load(folder)
    source = folder / "unet" / "model.onnx"
    if not source.is_file():
        raise ExportError(f"'{folder}' has no unet/model.onnx to cut DeepCache graphs from")
    model = onnx.load(str(source), load_external_data=False)
    feature = find_feature(model.graph, branch)
    out = folder / DEEPCACHE_DIR
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    files = {rel: entry for rel, entry in manifest.files.items()
             if not rel.startswith(DEEPCACHE_DIR + "/")}
    for data in sorted({entry.value for init in model.graph.initializer
                        if init.data_location == onnx.TensorProto.EXTERNAL
                        for entry in init.external_data if entry.key == "location"}):
        link_or_copy(source.parent / data, out / data)  # the weights, shared
        rel = f"{DEEPCACHE_DIR}/{data}"
        files[rel] = manifest.files.get(f"unet/{data}") or FileEntry(
            sha256_file(out / data), (out / data).stat().st_size)
    for name, graph in ((FULL_GRAPH, full_graph(model, feature)),
                        (SHALLOW_GRAPH, shallow_graph(model, feature))):
        onnx.save_model(graph, str(out / name))
        files[f"{DEEPCACHE_DIR}/{name}"] = FileEntry(sha256_file(out / name),
                                                     (out / name).stat().st_size)
    previous = manifest.extra.get("deepcache", {})
    gates = previous.get("gates", {}) if previous.get("branch") == branch else {}
    extra = {**manifest.extra, "deepcache": {"branch": branch, "feature": feature,
                                             "gates": gates}}
    replace(manifest, files=files, extra=extra).save(folder)
    return feature



def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m sdrt.export.deepcache",
                                     description=__doc__.strip().splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--branch", type=int, default=DEFAULT_BRANCH,
                        help="skip branch to cache at, 0 = shallowest (default %(default)s)")
    args = parser.parse_args(argv)
    try:
        feature = make_deepcache(args.model, args.branch)
    except ExportError as error:
        raise SystemExit(f"error: {error}") from None
    print(f"cached feature {feature} → {args.model / DEEPCACHE_DIR}")


if __name__ == "__main__":
    main()
