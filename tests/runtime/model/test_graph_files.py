"""runtime/model/: onnx_proto.py and graph_files.py on hand-made ONNX files: external data found
wherever a tensor can sit, hostile bytes refused with sdrt's own errors, version stubs the
backends read as the stamps say."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sdrt.runtime.errors import ModelError
from sdrt.runtime.model.graph_files import sniff, vet_graph
from sdrt.runtime.model.onnx_proto import MAX_GRAPH_DEPTH, ProtoError, read_stamps, stub_model

onnx = pytest.importorskip("onnx")
helper, numpy_helper = onnx.helper, onnx.numpy_helper
FLOAT = onnx.TensorProto.FLOAT


def _external(name: str, location: str) -> onnx.TensorProto:
    """A 2-float tensor whose data lies in `location`."""
    tensor = numpy_helper.from_array(np.zeros(2, np.float32), name)
    tensor.ClearField("raw_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", "8")):
        tensor.external_data.add(key=key, value=value)
    return tensor


def _graph(nodes, initializers=(), name="g") -> onnx.GraphProto:
    return helper.make_graph(nodes, name, [helper.make_tensor_value_info("x", FLOAT, [2])],
                             [helper.make_tensor_value_info("y", FLOAT, [2])],
                             initializer=list(initializers))


def _save(model: onnx.ModelProto, folder: Path) -> Path:
    path = folder / "model.onnx"
    path.write_bytes(model.SerializeToString())
    return path


def _nested(depth: int, innermost: onnx.TensorProto) -> onnx.GraphProto:
    """`depth` If nodes, each holding the next as its then_branch (else: an empty graph); the
    last graph holds the tensor as an initializer."""
    graph = _graph([helper.make_node("Identity", ["x"], ["y"])], [innermost], "inner")
    for level in range(depth):
        node = helper.make_node("If", ["c"], ["y"], then_branch=graph, else_branch=_graph([]))
        graph = _graph([node], name=f"level{level}")
    return graph


def test_external_data_is_found_in_initializers_constants_and_subgraphs(tmp_path):
    constant = helper.make_node("Constant", [], ["k"], value=_external("k", "const.bin"))
    graph = _graph([constant, helper.make_node("If", ["c"], ["y"],
                                               then_branch=_nested(2, _external("w", "sub.bin")),
                                               else_branch=_graph([]))],
                   [_external("init", "init.bin")])
    stamps = read_stamps(_save(helper.make_model(graph), tmp_path))
    locations = sorted(ref.location for ref in stamps.external)
    assert locations == ["const.bin", "init.bin", "sub.bin"]


def test_stamps_match_the_onnx_package(tmp_path):
    model = helper.make_model(_graph([helper.make_node("Relu", ["x"], ["y"])]),
                              opset_imports=[helper.make_opsetid("", 17),
                                             helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 8
    stamps = read_stamps(_save(model, tmp_path))
    assert stamps.ir_version == 8
    assert stamps.opsets == {"ai.onnx": 17, "com.microsoft": 1}
    assert stamps.external == []
    stub = onnx.load_from_string(stub_model(8, stamps.opsets))
    onnx.checker.check_model(stub)
    assert stub.ir_version == 8 and {o.domain: o.version for o in stub.opset_import} == {
        "": 17, "com.microsoft": 1}


def test_graphs_nested_too_deep_are_refused_not_recursed(tmp_path):
    deep = _nested(MAX_GRAPH_DEPTH + 5, _external("w", "x.bin"))
    path = _save(helper.make_model(deep), tmp_path)
    with pytest.raises(ProtoError, match="nested"):
        read_stamps(path)
    with pytest.raises(ModelError, match="nested"):
        vet_graph(path, "ort")


@pytest.mark.parametrize(("location", "fragment"), [
    ("../x.bin", "a path outside"), ("/etc/passwd", "a path outside"),
    ("C:\\weights.bin", "a path outside"), ("sub/../../x.bin", "a path outside"),
    ("", "names no location"), ("missing.bin", "is missing"),
])
def test_external_locations_are_vetted(tmp_path, location, fragment):
    graph = _graph([helper.make_node("Add", ["x", "w"], ["y"])], [_external("w", location)])
    path = _save(helper.make_model(graph), tmp_path)
    with pytest.raises(ModelError, match=fragment) as info:
        vet_graph(path, "ort")
    assert "\n" not in str(info.value)


def test_a_constant_node_reaching_outside_is_refused(tmp_path):
    (tmp_path.parent / "secret.bin").write_bytes(b"\0" * 8)
    constant = helper.make_node("Constant", [], ["y"], value=_external("k", "../secret.bin"))
    path = _save(helper.make_model(_graph([constant])), tmp_path)
    with pytest.raises(ModelError, match="'../secret.bin', a path outside"):
        vet_graph(path, "ort")


def test_sniff_names_pointers_and_pages(tmp_path):
    cases = {"lfs": (b"version https://git-lfs.github.com/spec/v1\noid sha256:00\nsize 9\n",
                     "git-lfs pointer"),
             "html": (b"\xef\xbb\xbf  <!-- saved -->\n<!DOCTYPE HTML PUBLIC>", "HTML page"),
             "html2": (b"\n<html lang='en'>", "HTML page"), "empty": (b"", "empty"),
             "onnx": (stub_model(8, {"ai.onnx": 17}), None)}
    for name, (data, fragment) in cases.items():
        (tmp_path / name).write_bytes(data)
        problem = sniff(tmp_path / name)
        assert (problem is None) if fragment is None else (fragment in problem), name


@settings(max_examples=50, deadline=None)
@given(cut=st.integers(0, 400), flips=st.lists(st.tuples(st.integers(0, 400),
                                                         st.integers(1, 255)), max_size=4),
       junk=st.binary(max_size=64))
def test_any_bytes_parse_or_raise_proto_error(tmp_path_factory, cut, flips, junk):
    constant = helper.make_node("Constant", [], ["k"], value=_external("k", "const.bin"))
    data = bytearray(helper.make_model(_graph([constant], [_external("w", "w.bin")]))
                     .SerializeToString()[:cut] + junk)
    for at, mask in flips:
        if at < len(data):
            data[at] ^= mask
    path = tmp_path_factory.mktemp("proto") / "model.onnx"
    path.write_bytes(bytes(data))
    try:
        read_stamps(path)
    except ProtoError:
        pass
    try:
        vet_graph(path, "ort")
    except ModelError as exc:
        assert "\n" not in str(exc)
