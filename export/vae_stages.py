"""Cut an exported VAE decoder's tail at every GroupNorm into stages, for an exact tiled decode.

A GroupNorm (Wu & He, 2018) needs its statistics over the whole image; the rest of the decoder's
tail (3×3 convolutions, nearest-neighbour upsampling, pointwise ops) needs only a few pixels of
neighbourhood. So the tail (everything after the mid block, which export/split_vae_decoder.py's
head runs on the whole latent) is cut into stages, one per GroupNorm: stage j takes the raw input
x_j of GroupNorm j and that norm's per-group `mean` and `inv_std` (B, G) as inputs, normalises
inside the graph (torch's export writes GroupNorm as Reshape(B, G, -1) → InstanceNormalization →
Reshape → Mul → Add; the InstanceNormalization becomes (grouped − mean) · inv_std), and runs on to
x_{j+1}, also passing on what a later stage still needs (a ResNet block's skip input). The runtime
(runtime/vae/exact_tiled.py) keeps those tensors as whole-image maps, reduces each norm's statistics
over the whole map, and runs every stage over windows with the halo its receptive field needs,
derived here from its Conv kernels and dilations and its Resize scales.

Writes vae_decoder_stages/stage_NN.onnx and vae_decoder_stages/stages.json (the plan: per stage
its graph, norm, map inputs, outputs with their scale, and halo).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from sdrt.export.split_vae_decoder import (
    FEATURES,
    _constant_value,
    features_info,
    group_norm_parts,
    mid_block_output,
    subgraph,
)
from sdrt.runtime.errors import ExportError
from sdrt.runtime.vae.exact_tiled import PLAN_FILE, PLAN_FORMAT, STAGES_DIR

# Ops that act on each pixel alone (the GroupNorm's layout Reshapes included: they only regroup
# channels, and the statistics come from the inputs); Conv and Resize widen the halo.
POINTWISE = frozenset({"Add", "Sub", "Mul", "Div", "Sigmoid", "Tanh", "Relu", "Clip", "Identity",
                       "Cast", "Reshape", "Unsqueeze", "Erf", "Pow", "Sqrt"})
# Ops whose outputs do not depend on pixel values: pulled into whichever stage reads them.
SHAPE_ONLY = frozenset({"Constant", "Shape"})


@dataclass
class _Norm:
    """One GroupNorm of the tail: its raw input, group count and epsilon, its stats inputs."""

    index: int
    input: str
    groups: int
    epsilon: float

    @property
    def mean(self) -> str:
        return f"norm{self.index}.mean"

    @property
    def inv_std(self) -> str:
        return f"norm{self.index}.inv_std"


def tail_graph(model: onnx.ModelProto) -> onnx.GraphProto:
    """The decoder after its mid block, reading `features` (the head's output)."""
    graph = model.graph
    cut = mid_block_output(graph)
    tail = subgraph(graph, [features_info(cut)], [o.name for o in graph.output],
                    "vae_decoder_tail")
    tail.input[0].name = FEATURES
    for node in tail.node:
        node.input[:] = [FEATURES if name == cut else name for name in node.input]
    return tail


def externalise_norms(graph: onnx.GraphProto) -> tuple[list[_Norm], dict[str, int]]:
    """Replace every InstanceNormalization of torch's GroupNorm pattern in place by
    (grouped − mean) · inv_std with the statistics as graph inputs; the norms in graph order,
    and the stage each norm's grouping nodes (Reshape, the new Sub/Mul) must run in."""
    producers = {out: node for node in graph.node for out in node.output}
    norms: list[_Norm] = []
    forced: dict[str, int] = {}  # node name → stage
    nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        if node.op_type != "InstanceNormalization":
            nodes.append(node)
            continue
        reshape, groups, epsilon = group_norm_parts(graph, producers, node)
        norm = _Norm(len(norms) + 1, reshape.input[0], groups, epsilon)
        norms.append(norm)
        axis = f"{node.name}/axis"
        graph.initializer.append(numpy_helper.from_array(np.array([2], np.int64), axis))
        mean, inv_std, centred = (f"{node.name}/{part}" for part in ("mean", "inv_std", "centred"))
        new = [helper.make_node("Unsqueeze", [norm.mean, axis], [mean], name=mean),
               helper.make_node("Unsqueeze", [norm.inv_std, axis], [inv_std], name=inv_std),
               helper.make_node("Sub", [node.input[0], mean], [centred], name=centred),
               helper.make_node("Mul", [centred, inv_std], [node.output[0]],
                                name=f"{node.name}/scaled")]
        nodes.extend(new)
        for forced_node in (reshape, *new):
            forced[forced_node.name] = norm.index
    del graph.node[:]
    graph.node.extend(nodes)
    if not norms:
        raise ExportError("vae_decoder: no GroupNorm after the mid block")
    return norms, forced


def stage_levels(graph: onnx.GraphProto, norms: list[_Norm],
                 forced: dict[str, int]) -> dict[str, int]:
    """The stage that computes each tensor: `features` 0, norm j's statistics j, a node's
    outputs the latest stage among its inputs (its norm's, for a norm's own nodes); -1 for
    tensors that depend on no pixel values (shapes, constants), which any stage can compute."""
    level = {FEATURES: 0} | {name: n.index for n in norms for name in (n.mean, n.inv_std)}
    for node in graph.node:  # torch's export is in topological order
        if node.op_type in SHAPE_ONLY:
            here = -1
        else:
            here = max([level.get(name, -1) for name in node.input if name] + [-1])
            here = forced.get(node.name, here)
        for out in node.output:
            level[out] = here
    return level


def stage_inputs(graph: onnx.GraphProto, level: dict[str, int], stage: int) -> list[str]:
    """The tensors stage `stage` reads from earlier stages (or the graph's inputs), through the
    shape-only nodes it recomputes."""
    producers = {out: node for node in graph.node for out in node.output}
    found: list[str] = []
    todo = [name for node in graph.node
            if level.get(node.output[0]) == stage and node.op_type not in SHAPE_ONLY
            for name in node.input]
    seen: set[str] = set()
    while todo:
        name = todo.pop(0)
        if not name or name in seen:
            continue
        seen.add(name)
        node = producers.get(name)
        if node is not None and node.op_type in SHAPE_ONLY:
            todo.extend(node.input)
        elif level.get(name, -1) >= 0 and (level[name] < stage or node is None):
            found.append(name)
    return found


def halo(graph: onnx.GraphProto, nodes: list[onnx.NodeProto], inputs: list[str],
         outputs: list[str]) -> tuple[int, dict[str, int]]:
    """Input pixels a window must extend past the part it keeps, so that every kept output
    pixel sees what it would in the whole image; and each output's scale over the inputs.
    Per tensor: the radius of its receptive field in its own pixels and its scale."""
    radius = dict.fromkeys(inputs, 0)
    scale = {name: 1 for name in radius}
    for node in nodes:
        known = [name for name in node.input if name in radius]
        if not known or node.op_type in SHAPE_ONLY:
            continue
        if len({scale[name] for name in known}) > 1:
            raise ExportError(f"vae_decoder: {node.name} mixes resolutions; cannot tile it")
        r, s = max(radius[name] for name in known), scale[known[0]]
        if node.op_type == "Conv":
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            kernel = attrs.get("kernel_shape") or list(_constant_value(
                graph, node.input[1]).shape[2:])
            dilations = attrs.get("dilations", [1] * len(kernel))
            reach = [(k - 1) // 2 * d for k, d in zip(kernel, dilations, strict=True)]
            if any(v != 1 for v in attrs.get("strides", [1])) or attrs.get(
                    "pads", [0] * 4) != reach + reach:
                raise ExportError(f"vae_decoder: {node.name} is not a same-size convolution")
            r += max(reach)
        elif node.op_type == "Resize":
            scales = _constant_value(graph, node.input[2]) if len(node.input) > 2 else None
            if scales is None or len(scales) != 4 or list(scales[:2]) != [1, 1] or scales[
                    2] != scales[3] or scales[2] != int(scales[2]) or scales[2] < 1:
                raise ExportError(f"vae_decoder: {node.name} is not an integer upsampling")
            mode = next((a.s for a in node.attribute if a.name == "mode"), b"nearest")
            factor = int(scales[2])
            r, s = (r + (mode != b"nearest")) * factor, s * factor
        elif node.op_type not in POINTWISE:
            raise ExportError(f"vae_decoder: cannot tile through {node.op_type} ({node.name})")
        for out in node.output:
            radius[out], scale[out] = r, s
    return (max(math.ceil(radius[name] / scale[name]) for name in outputs),
            {name: scale[name] for name in outputs})


def stage_decoder(model: onnx.ModelProto) -> tuple[list[onnx.ModelProto], dict]:
    """The stage graphs of a decoder graph loaded with its weights, and the plan (module doc)."""
    graph = tail_graph(model)
    norms, forced = externalise_norms(graph)
    level = stage_levels(graph, norms, forced)
    final = [o.name for o in graph.output]
    reads = {stage: stage_inputs(graph, level, stage) for stage in range(len(norms) + 1)}
    stats = {name: n.groups for n in norms for name in (n.mean, n.inv_std)}
    models, stages = [], []
    for stage in range(len(norms) + 1):
        nodes = [node for node in graph.node
                 if level.get(node.output[0]) == stage and node.op_type not in SHAPE_ONLY]
        if not nodes:
            continue
        later = {name for after in range(stage + 1, len(norms) + 1) for name in reads[after]}
        outputs = [name for name in dict.fromkeys(out for node in nodes for out in node.output)
                   if name in later or name in final]
        maps = [name for name in reads[stage] if name not in stats]
        infos = [features_info(name) for name in maps] + [
            helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", stats[name]])
            for name in reads[stage] if name in stats]
        part = subgraph(graph, infos, outputs, f"vae_decoder_stage_{stage:02d}")
        reach, scales = halo(graph, list(part.node), maps, outputs)
        models.append(helper.make_model(part, opset_imports=model.opset_import))
        norm = norms[stage - 1] if stage else None
        stages.append({
            "file": f"stage_{stage:02d}.onnx", "inputs": maps, "outputs": scales, "halo": reach,
            "norm": norm and {"input": norm.input, "groups": norm.groups,
                              "epsilon": norm.epsilon, "mean": norm.mean,
                              "inv_std": norm.inv_std}})
    return models, {"format": PLAN_FORMAT, "features": FEATURES, "output": final[0],
                    "stages": stages}


def write_stages(folder: Path, model: onnx.ModelProto) -> tuple[list[Path], int]:
    """Write the stage graphs and plan under `folder`/vae_decoder_stages; their paths (for the
    manifest) and the number of stages."""
    models, plan = stage_decoder(model)
    out = folder / STAGES_DIR
    out.mkdir(exist_ok=True)
    for old in out.glob("stage_*.onnx"):  # a previous split's stages
        old.unlink()
    paths = []
    for stage, part in zip(plan["stages"], models, strict=True):
        onnx.checker.check_model(part)
        path = out / stage["file"]
        onnx.save_model(part, str(path))
        paths.append(path)
    plan_path = out / PLAN_FILE
    plan_path.write_text(json.dumps(plan, indent=1) + "\n")
    return [*paths, plan_path], len(models)
