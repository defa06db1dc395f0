"""quantize/unet_int8.py on the tiny random UNet: what the recipe must hold, read off the graph
it writes (int8 convolutions; without VNNI, MatMuls, the attention products included, fed by no
activation quantizer and the weighted MatMuls' weights int8; with VNNI, the weighted MatMuls and
self-attention's QKᵀ int8 and cross-attention's products float), and outputs near fp32's on recorded
inputs. The embedded model's gate figures: benchmarks/quantize_gates.md."""

import numpy as np
import pytest

from sdrt.quantize import unet_int8
from sdrt.quantize.calibration import record_inputs
from tests.quantize.test_quantize import needs

# The tiny random UNet's output against fp32's on recorded inputs, relative squared error:
# random weights give no accuracy to keep, so this only catches a broken graph (ranges that do
# not cover the inputs give errors near 1); measured ≈ 1e-3.
MAX_TINY_RELATIVE_ERROR = 0.05


def _fed_by(op, kind: str) -> bool:
    """Whether any input of `op` comes through an op of type `kind` (past a Convert)."""
    for value in op.input_values():
        node = value.get_node()
        while node.get_type_name() == "Convert":
            node = node.input_value(0).get_node()
        if node.get_type_name() == kind:
            return True
    return False


@pytest.fixture(scope="module")
def recipe(tiny_onnx_dir):
    needs("openvino")
    import openvino as ov

    feeds = record_inputs(tiny_onnx_dir, "openvino", ("unet",), ["a red circle", "a blue cat"],
                          steps=4, guidance_factors=(1.0, 2.0))["unet"]
    path = str(tiny_onnx_dir / "unet" / "model.onnx")
    weighted = set(unet_int8.weighted_ops(ov.Core().read_model(path)))
    quantized = unet_int8.unet_int8(ov.Core().read_model(path), feeds)  # NNCF edits its input
    return ov.Core().read_model(path), quantized, feeds, weighted


@pytest.fixture(scope="module")
def vnni_recipe(tiny_onnx_dir, recipe):
    import openvino as ov

    source, _, feeds, weighted = recipe
    path = str(tiny_onnx_dir / "unet" / "model.onnx")
    return source, unet_int8.unet_int8(ov.Core().read_model(path), feeds, int8_matmuls=True), \
        feeds, weighted


def test_convolutions_are_int8_and_every_matmul_computes_in_float(recipe):
    _, quantized, _, weighted = recipe
    ops = quantized.get_ops()
    # all but the attention blocks' 1×1 proj_out, which NNCF leaves float after the float
    # attention feeding it
    convolutions = [op for op in ops if op.get_type_name() == "Convolution"
                    and "/attentions." not in op.get_friendly_name()]
    assert convolutions and all(_fed_by(op, "FakeQuantize") for op in convolutions)
    matmuls = [op for op in ops if op.get_type_name() == "MatMul"]
    assert matmuls and not any(_fed_by(op, "FakeQuantize") for op in matmuls)
    compressed = [op for op in matmuls if op.get_friendly_name() in weighted]
    assert compressed and all(_fed_by(op, "Multiply") or _fed_by(op, "Subtract")
                              for op in compressed)  # int8 weights, dequantized


def test_with_vnni_weighted_matmuls_and_self_attention_are_int8(vnni_recipe):
    _, quantized, _, weighted = vnni_recipe
    matmuls = [op for op in quantized.get_ops() if op.get_type_name() == "MatMul"]
    int8 = {op.get_friendly_name() for op in matmuls if _fed_by(op, "FakeQuantize")}
    products = [op.get_friendly_name() for op in matmuls
                if op.get_friendly_name() not in weighted]
    self_attention = {name for name in products if unet_int8.SELF_ATTENTION in name}
    cross_attention = {name for name in products if "attn2" in name}
    assert self_attention and cross_attention  # diffusers' names survive the export
    # NNCF's transformer patterns quantize QKᵀ's operands, not softmax's output
    scores = {name for name in self_attention if name.endswith("/attn1/MatMul")}
    assert scores and scores <= int8 and not cross_attention & int8
    assert {op.get_friendly_name() for op in matmuls} - set(products) <= int8


@pytest.mark.parametrize("fixture", ["recipe", "vnni_recipe"])
def test_outputs_stay_near_fp32s(request, fixture):
    import openvino as ov

    source, quantized, feeds, _ = request.getfixturevalue(fixture)
    core = ov.Core()
    reference = core.compile_model(source, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    int8 = core.compile_model(quantized, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    errors = []
    for feed in feeds[::3]:
        expected, got = reference(feed)[0], int8(feed)[0]
        errors.append(np.mean((got - expected) ** 2) / np.mean(expected ** 2))
    assert 0 < np.mean(errors) <= MAX_TINY_RELATIVE_ERROR
