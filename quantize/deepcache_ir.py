"""DeepCache graphs for a variant's own UNet graph (OpenVINO IR), so `--deepcache N` runs on a
quantized UNet too: the cut export/deepcache.py makes in the fp32 ONNX UNet, made again in the
variant's graph, which keeps its quantized layers and their ranges as they are (no second
calibration, and the cached run's full calls are exactly the variant's UNet).

- `deepcache/full.xml` beside the variant's UNet: that UNet plus the cached tensor as output
  FEATURE;
- `deepcache/shallow.xml`: the nodes between the UNet's inputs, FEATURE standing for the cached
  tensor, and out_sample.

The cached tensor is found by the name the fp32 cut recorded (manifest.json's
`extra.deepcache.feature`): OpenVINO keeps ONNX tensor names when it reads a graph, and NNCF's
passes keep them on the tensors they quantize around.
"""

from __future__ import annotations

import logging
from pathlib import Path

from sdrt.runtime.deepcache import FEATURE, FULL_IR, SHALLOW_IR, find_graphs, graphs_dir
from sdrt.runtime.errors import QuantizeError
from sdrt.runtime.model.manifest import Manifest

log = logging.getLogger(__name__)


def make_deepcache_ir(folder: Path, unet_graph: Path) -> tuple[Path, Path] | None:
    """Write full.xml and shallow.xml in deepcache/ beside the IR UNet `unet_graph` when `folder`
    has fp32 DeepCache graphs (`python -m sdrt.export.deepcache`); their paths, else None."""
    feature = Manifest.load(folder).extra.get("deepcache", {}).get("feature")
    if find_graphs(folder) is None or not feature:
        return None
    import openvino as ov

    core = ov.Core()
    out = unet_graph.parent / graphs_dir(folder).name
    out.mkdir(exist_ok=True)
    full, shallow = out / FULL_IR, out / SHALLOW_IR
    ov.save_model(full_model(core.read_model(str(unet_graph)), feature), str(full),
                  compress_to_fp16=False)
    ov.save_model(shallow_model(core.read_model(str(unet_graph)), feature), str(shallow),
                  compress_to_fp16=False)
    log.info("DeepCache graphs cut from %s at %s", unet_graph.name, feature)
    return full, shallow


def full_model(model, feature: str):
    """`model` (an openvino.Model, edited) with tensor `feature` as a second output, FEATURE."""
    cached = _output(model, feature)
    cached.get_tensor().set_names({FEATURE})
    model.add_outputs([cached])
    return model


def shallow_model(model, feature: str):
    """The part of `model` (edited) that computes out_sample from its inputs and a FEATURE
    parameter standing for tensor `feature`."""
    import openvino as ov

    cached = _output(model, feature)
    parameter = ov.opset13.parameter(cached.get_partial_shape(), cached.get_element_type(),
                                     name=FEATURE)
    parameter.output(0).get_tensor().set_names({FEATURE})
    for target in cached.get_target_inputs():
        target.replace_source_output(parameter.output(0))
    results = [r for r in model.get_results() if "out_sample" in r.output(0).get_names()
               or "out_sample" in r.input_value(0).get_names()]
    if len(results) != 1:
        raise QuantizeError("unet: the variant's graph has no single 'out_sample' output")
    reached = _parameters_reached(results[0])
    if parameter.get_name() not in reached:
        raise QuantizeError(f"unet: out_sample does not depend on {feature!r}")
    inputs = [p for p in model.get_parameters() if p.get_name() in reached]
    return ov.Model(results, [*inputs, parameter], "deepcache_shallow")


def _output(model, name: str):
    """The output of `model`'s op that carries tensor `name`; QuantizeError when none does."""
    for op in model.get_ops():
        for output in op.outputs():
            if name in output.get_names():
                return output
    raise QuantizeError(f"unet: the variant's graph has no tensor {name!r}, where the fp32 "
                        "DeepCache graphs were cut; re-cut them with `python -m "
                        "sdrt.export.deepcache`, then make the variant again with --force")


def _parameters_reached(result) -> set[str]:
    """Unique names of the Parameters `result` depends on (a walk back over its inputs)."""
    seen, stack, found = set(), [result], set()
    while stack:
        node = stack.pop()
        name = node.get_name()
        if name in seen:
            continue
        seen.add(name)
        if node.get_type_name() == "Parameter":
            found.add(name)
        stack.extend(value.get_node() for value in node.input_values())
    return found
