"""Reading a graph's initializers without onnx (runtime/model/onnx_tensors.py): inline raw_data
and external data, each dtype NumPy holds, equal to onnx's own `numpy_helper` reading; bad names,
bfloat16, escaping or truncated external data refused in one line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from sdrt.runtime.errors import ModelError
from sdrt.runtime.model.onnx_tensors import WeightReader

onnx = pytest.importorskip("onnx")
from onnx import helper, numpy_helper  # noqa: E402

RNG = np.random.default_rng(0)
ARRAYS = {"f32": RNG.standard_normal((3, 5)).astype(np.float32),
          "f16": RNG.standard_normal((4, 2, 3, 3)).astype(np.float16),
          "i8": RNG.integers(-128, 127, (6,)).astype(np.int8),
          "i64": np.array([3, -1], np.int64),
          "scalar": np.array(2.5, np.float32)}


def _model(extra: list | None = None) -> onnx.ModelProto:
    """A graph whose initializers are ARRAYS (an Identity node keeps it valid)."""
    tensors = [numpy_helper.from_array(value, name) for name, value in ARRAYS.items()]
    node = helper.make_node("Identity", ["f32"], ["y"])
    out = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [3, 5])
    graph = helper.make_graph([node], "g", [], [out], initializer=tensors + (extra or []))
    return helper.make_model(graph)


def _expected(path: Path) -> dict[str, np.ndarray]:
    model = onnx.load(str(path))
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


@pytest.mark.parametrize("external", [False, True])
def test_reads_what_onnx_reads(tmp_path, external):
    path = tmp_path / "model.onnx"
    onnx.save_model(_model(), str(path), save_as_external_data=external,
                    all_tensors_to_one_file=True, location="model.onnx_data",
                    size_threshold=0)
    assert (tmp_path / "model.onnx_data").exists() == external
    got = WeightReader(path).read(ARRAYS)
    for name, value in _expected(path).items():
        assert got[name].dtype == value.dtype and np.array_equal(got[name], value), name
        assert not got[name].flags.writeable  # views of the mapped file


def test_tiny_unet_initializers(tiny_onnx_dir):
    path = tiny_onnx_dir / "unet" / "model.onnx"
    expected = _expected(path)
    got = WeightReader(path).read(expected)
    assert all(np.array_equal(got[name], value) for name, value in expected.items())


def _one_line(path: Path, names, match: str) -> None:
    with pytest.raises(ModelError, match=match) as caught:
        WeightReader(path).read(names)
    assert "\n" not in str(caught.value)


def test_unknown_names_and_bfloat16_refused(tmp_path):
    bf16 = helper.make_tensor("bf", onnx.TensorProto.BFLOAT16, [2], [1.0, 2.0])
    path = tmp_path / "model.onnx"
    onnx.save_model(_model([bf16]), str(path))
    _one_line(path, ["f32", "a", "b", "c", "d"], r"model.onnx has no initializer 'a', 'b', 'c' "
              "and 1 more$")
    _one_line(path, ["bf"], "initializer 'bf' is bfloat16")


def test_bad_external_data_refused(tmp_path):
    path = tmp_path / "unet" / "model.onnx"
    path.parent.mkdir()
    onnx.save_model(_model(), str(path), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="weights.bin", size_threshold=0)
    data = path.parent / "weights.bin"
    data.write_bytes(data.read_bytes()[:-4])
    _one_line(path, ["scalar"], r"unet/weights.bin is truncated: 'scalar' needs bytes")
    model = onnx.load(str(path), load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "../weights.bin"
    onnx.save_model(model, str(path))
    _one_line(path, ["f32"], r"names external data '../weights.bin', not a file in the graph's")


def test_truncated_or_empty_graph_refused(tmp_path):
    path = tmp_path / "model.onnx"
    onnx.save_model(_model(), str(path))
    path.write_bytes(path.read_bytes()[:-30])
    with pytest.raises(ModelError, match="is truncated or not an ONNX model"):
        WeightReader(path)
    path.write_bytes(b"")
    with pytest.raises(ModelError, match="is empty"):
        WeightReader(path)
