"""ONNX Runtime's tools on a graph whose weights file has other hard links, as a UNet's has once
`python -m sdrt.export.deepcache` shares it with the DeepCache graphs: onnx's loader refuses such
files, so quantize/ort.py hands the tools a scratch copy and removes it afterwards."""

import numpy as np
import pytest

from sdrt.quantize import ort

onnx = pytest.importorskip("onnx")
onnxruntime = pytest.importorskip("onnxruntime")

# x (1, 16) · w with |x|, |w| ≤ 1: fp16 rounds each weight by at most 2⁻¹¹ relative, and int8
# (127 levels per channel, activations quantized per call) by about 1/127 of the range; 0.2 on
# sums of 16 products bounds both with room, and a wrong weight is off by far more.
MAX_OUTPUT_ERROR = 0.2


@pytest.fixture
def linked_graph(tmp_path):
    """unet/model.onnx + model.onnx_data, the data hard-linked into unet/deepcache/."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weight = rng.uniform(-1, 1, (16, 8)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])],
        [numpy_helper.from_array(weight, "w")])
    folder = tmp_path / "unet"
    folder.mkdir()
    path = folder / "model.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path),
              save_as_external_data=True, location="model.onnx_data", size_threshold=0)
    (folder / "deepcache").mkdir()
    (folder / "deepcache" / "model.onnx_data").hardlink_to(folder / "model.onnx_data")
    with pytest.raises(onnx.checker.ValidationError, match="hard link"):
        onnx.load(str(path))  # the refusal this works around
    return path, weight


@pytest.mark.parametrize(("precision", "component"), [("fp16", "text_encoder"),
                                                      ("int8", "text_encoder"),
                                                      ("int8", "unet")])
def test_a_hard_linked_graph_is_quantized(linked_graph, tmp_path, precision, component):
    src, weight = linked_graph
    dest_dir = tmp_path / "variant"
    dest_dir.mkdir()
    x = np.random.default_rng(1).uniform(-1, 1, (1, 16)).astype(np.float32)
    made = ort.make_graph(precision, component, src, dest_dir, [{"x": x}] * 2)
    session = onnxruntime.InferenceSession(str(made), providers=["CPUExecutionProvider"])
    [y] = session.run(None, {"x": x})
    assert np.abs(y - x @ weight).max() < MAX_OUTPUT_ERROR
    assert not list(dest_dir.glob(".unlinked-*"))  # the scratch copy is gone
    assert (src.parent / "model.onnx_data").stat().st_nlink == 2  # the shared weights stay
