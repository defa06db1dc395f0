"""Just enough of ONNX's protobuf (onnx/onnx.proto) to vet a graph file before a backend loads it.

`read_stamps` walks a `.onnx` file's protobuf wire format (protobuf.dev/programming-guides/encoding)
through a memory map, skipping every payload it does not need, so a 2 GB graph with inline
weights costs a walk over its field headers, not a read of its weights. It returns the IR version,
the opset imports and every tensor's `external_data` entries, wherever the tensor sits: graph
initializers, sparse initializers, node attributes (Constant values), nested graphs (If/Loop
bodies), functions and training info. `initializer_locations` says where each of the main
graph's initializers keeps its values (name, dims, type, byte range or external data), so they
can be read as views of the mapped files (model/onnx_tensors.py). `stub_model` writes a one-node
model carrying given version stamps, so the installed backend can be asked whether it accepts
them.
Stdlib only; the `onnx` package is not a runtime dependency.
"""

from __future__ import annotations

import mmap
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

# Wire types (protobuf encoding guide): varint, 64-bit, length-delimited, 32-bit.
VARINT, I64, LEN, I32 = 0, 1, 2, 5
_FIXED = {I64: 8, I32: 4}
# Nested graphs (an If inside a Loop inside ...) deeper than this are refused rather than walked:
# real exports nest one or two levels, and protobuf's own parsers stop at 100 message levels
# (3 per graph level: node, attribute, graph); a crafted file could otherwise exhaust the stack.
MAX_GRAPH_DEPTH = 16
EXTERNAL = 1  # TensorProto.DataLocation.EXTERNAL

# Field numbers, onnx.proto (IR version 10/11 schema).
_MODEL_IR_VERSION, _MODEL_OPSET, _MODEL_GRAPH = 1, 8, 7
_MODEL_TRAINING, _MODEL_FUNCTIONS = 20, 25
_GRAPH_NODE, _GRAPH_INITIALIZER, _GRAPH_SPARSE = 1, 5, 15
_NODE_ATTRIBUTE, _FUNCTION_NODE = 5, 7
_ATTR_TENSOR, _ATTR_GRAPH, _ATTR_TENSORS, _ATTR_GRAPHS = 5, 6, 10, 11
_ATTR_SPARSE, _ATTR_SPARSES = 22, 23
_SPARSE_VALUES, _SPARSE_INDICES = 1, 2
_TRAINING_INIT, _TRAINING_ALGORITHM = 1, 2
_TENSOR_NAME, _TENSOR_EXTERNAL, _TENSOR_LOCATION = 8, 13, 14
_LOCATION = b"location"  # the key of the external-data entry that names the file


class ProtoError(ValueError):
    """The bytes are not a well-formed protobuf message (truncated, or not ONNX at all)."""


@dataclass(frozen=True)
class ExternalRef:
    """One tensor's external data: file `location` relative to the graph's folder, byte range."""

    tensor: str
    location: str | None
    offset: str | None
    length: str | None


@dataclass
class Stamps:
    """What a backend checks before anything else: IR version, opset per domain; plus every
    external-data reference, which must be vetted before the backend opens any file."""

    ir_version: int = 0
    opsets: dict[str, int] = field(default_factory=dict)
    external: list[ExternalRef] = field(default_factory=list)


def read_stamps(path: Path) -> Stamps:
    """The IR version, opset imports and external-data references of a `.onnx` file."""
    with open(path, "rb") as handle:
        size = handle.seek(0, 2)
        if size == 0:
            raise ProtoError("the file is empty")
        data = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
    # The map is closed when the last view of it goes: on error, the walk's frames (held by the
    # traceback) still view it, so the error is raised afresh once they are gone.
    try:
        return _model(_Buffer(memoryview(data), data), size)
    except ProtoError as exc:
        reason = str(exc)
    raise ProtoError(reason)


def _varint(buf: memoryview, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= end:
            raise ProtoError("a number runs past the end of its message (truncated file?)")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
        if shift >= 64:
            raise ProtoError("a number is longer than 10 bytes")


def fields(buf: memoryview, start: int, end: int) -> Iterator[tuple[int, int, int | slice]]:
    """(field number, wire type, value) per field; a varint's value is the int, anything else's
    is the slice of its bytes (not copied)."""
    pos = start
    while pos < end:
        key = buf[pos]
        if key < 0x80:  # one-byte key: fields 1–15, nearly every key in an ONNX file
            pos += 1
        else:
            key, pos = _varint(buf, pos, end)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise ProtoError("field number 0 (not a protobuf message)")
        if wire == VARINT:
            value, pos = _varint(buf, pos, end)
            yield number, wire, value
            continue
        if wire == LEN:
            if pos < end and buf[pos] < 0x80:
                length = buf[pos]
                pos += 1
            else:
                length, pos = _varint(buf, pos, end)
        elif wire in _FIXED:
            length = _FIXED[wire]
        else:
            raise ProtoError(f"wire type {wire} (groups or garbage, never written by ONNX)")
        if pos + length > end:
            raise ProtoError("a field runs past the end of its message (truncated file?)")
        yield number, wire, slice(pos, pos + length)
        pos += length


def _messages(buf: _Buffer, span: slice, wanted: Mapping[int, str]) -> Iterator[tuple[str,
                                                                                      slice]]:
    """The length-delimited fields of one message whose numbers `wanted` names, by that name."""
    for number, wire, value in fields(buf.view, span.start, span.stop):
        if number in wanted and wire == LEN:
            yield wanted[number], value


def _text(buf: _Buffer, span: slice) -> str:
    return bytes(buf.view[span]).decode("utf-8", errors="replace")


class _Buffer:
    """The mapped file as a memoryview (indexing, slicing) and as the map (a fast `find`)."""

    def __init__(self, view: memoryview, raw: mmap.mmap) -> None:
        self.view, self.raw = view, raw

    def mentions_location(self, span: slice) -> bool:
        """Whether these bytes hold "location" at all: an external-data entry names its file
        under that key, in any encoding, so a node without it has no external data to vet."""
        return self.raw.find(_LOCATION, span.start, span.stop) != -1


def _model(buf: _Buffer, size: int) -> Stamps:
    stamps = Stamps()
    for number, wire, value in fields(buf.view, 0, size):
        if number == _MODEL_IR_VERSION and wire == VARINT:
            stamps.ir_version = value
        elif number == _MODEL_OPSET and wire == LEN:
            domain, version = _opset(buf, value)
            stamps.opsets[domain] = version
        elif number == _MODEL_GRAPH and wire == LEN:
            _graph(buf, value, stamps, 0)
        elif number == _MODEL_FUNCTIONS and wire == LEN:
            for _, node in _messages(buf, value, {_FUNCTION_NODE: "node"}):
                _node(buf, node, stamps, 0)
        elif number == _MODEL_TRAINING and wire == LEN:
            for _, graph in _messages(buf, value, {_TRAINING_INIT: "g", _TRAINING_ALGORITHM: "g"}):
                _graph(buf, graph, stamps, 0)
    if stamps.ir_version == 0 or not stamps.opsets:
        raise ProtoError("no IR version or opset import (not an ONNX model)")
    return stamps


def _opset(buf: _Buffer, span: slice) -> tuple[str, int]:
    domain, version = "", 0
    for number, wire, value in fields(buf.view, span.start, span.stop):
        if number == 1 and wire == LEN:
            domain = _text(buf, value)
        elif number == 2 and wire == VARINT:
            version = value
    return ("ai.onnx" if domain == "" else domain), version


def _graph(buf: _Buffer, span: slice, stamps: Stamps, depth: int) -> None:
    if depth > MAX_GRAPH_DEPTH:
        raise ProtoError(f"graphs nested more than {MAX_GRAPH_DEPTH} deep")
    parts = {_GRAPH_NODE: "node", _GRAPH_INITIALIZER: "tensor", _GRAPH_SPARSE: "sparse"}
    for kind, value in _messages(buf, span, parts):
        if kind == "node":
            if buf.mentions_location(value):  # most nodes: a find in C, not a walk
                _node(buf, value, stamps, depth)
        elif kind == "tensor":
            _tensor(buf, value, stamps)
        else:
            _sparse(buf, value, stamps)


def _node(buf: _Buffer, span: slice, stamps: Stamps, depth: int) -> None:
    parts = {_ATTR_TENSOR: "tensor", _ATTR_TENSORS: "tensor", _ATTR_GRAPH: "graph",
             _ATTR_GRAPHS: "graph", _ATTR_SPARSE: "sparse", _ATTR_SPARSES: "sparse"}
    for _, attribute in _messages(buf, span, {_NODE_ATTRIBUTE: "attribute"}):
        for kind, value in _messages(buf, attribute, parts):
            if kind == "tensor":
                _tensor(buf, value, stamps)
            elif kind == "graph":
                _graph(buf, value, stamps, depth + 1)
            else:
                _sparse(buf, value, stamps)


def _sparse(buf: _Buffer, span: slice, stamps: Stamps) -> None:
    for _, tensor in _messages(buf, span, {_SPARSE_VALUES: "t", _SPARSE_INDICES: "t"}):
        _tensor(buf, tensor, stamps)


def _tensor(buf: _Buffer, span: slice, stamps: Stamps) -> None:
    name, entries, external = "", {}, False
    for number, wire, value in fields(buf.view, span.start, span.stop):
        if number == _TENSOR_NAME and wire == LEN:
            name = _text(buf, value)
        elif number == _TENSOR_EXTERNAL and wire == LEN:
            key, text = _entry(buf, value)
            entries[key] = text
        elif number == _TENSOR_LOCATION and wire == VARINT:
            external = value == EXTERNAL
    if external or entries:  # a location without the EXTERNAL flag is vetted all the same
        stamps.external.append(ExternalRef(name, entries.get("location"), entries.get("offset"),
                                           entries.get("length")))


def _entry(buf: _Buffer, span: slice) -> tuple[str, str]:
    key = text = ""
    for number, wire, value in fields(buf.view, span.start, span.stop):
        if number == 1 and wire == LEN:
            key = _text(buf, value)
        elif number == 2 and wire == LEN:
            text = _text(buf, value)
    return key, text


# ------------------------------------------------------------------------ initializer locations

_TENSOR_DIMS, _TENSOR_TYPE, _TENSOR_RAW = 1, 2, 9


@dataclass(frozen=True)
class TensorLocation:
    """Where one graph initializer's values lie: `raw` (its raw_data, a byte range of the .onnx)
    or `external` (a range of another file); neither when they sit in typed fields."""

    name: str
    dims: tuple[int, ...]
    data_type: int  # TensorProto.DataType
    raw: slice | None
    external: ExternalRef | None


def initializer_locations(data: mmap.mmap) -> dict[str, TensorLocation]:
    """The main graph's initializers of a mapped `.onnx` file, by name; no value is read."""
    buf = _Buffer(memoryview(data), data)
    found = {}
    for number, wire, value in fields(buf.view, 0, len(data)):
        if number == _MODEL_GRAPH and wire == LEN:
            for _, tensor in _messages(buf, value, {_GRAPH_INITIALIZER: "tensor"}):
                location = _location(buf, tensor)
                found[location.name] = location
    return found


def _location(buf: _Buffer, span: slice) -> TensorLocation:
    name, dims, data_type, raw, entries, external = "", [], 0, None, {}, False
    for number, wire, value in fields(buf.view, span.start, span.stop):
        if number == _TENSOR_DIMS and wire == VARINT:
            dims.append(value)
        elif number == _TENSOR_DIMS and wire == LEN:  # packed, as proto3 writers do
            dims.extend(_packed(buf.view, value))
        elif number == _TENSOR_TYPE and wire == VARINT:
            data_type = value
        elif number == _TENSOR_NAME and wire == LEN:
            name = _text(buf, value)
        elif number == _TENSOR_RAW and wire == LEN:
            raw = value
        elif number == _TENSOR_EXTERNAL and wire == LEN:
            key, text = _entry(buf, value)
            entries[key] = text
        elif number == _TENSOR_LOCATION and wire == VARINT:
            external = value == EXTERNAL
    reference = (ExternalRef(name, entries.get("location"), entries.get("offset"),
                             entries.get("length")) if external or entries else None)
    return TensorLocation(name, tuple(dims), data_type, raw, reference)


def _packed(view: memoryview, span: slice) -> Iterator[int]:
    """The varints of a packed repeated field."""
    pos = span.start
    while pos < span.stop:
        value, pos = _varint(view, pos, span.stop)
        yield value


# ------------------------------------------------------------------------ writing a version stub


def _key(number: int, wire: int) -> bytes:
    return _encode_varint(number << 3 | wire)


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _len_field(number: int, payload: bytes) -> bytes:
    return _key(number, LEN) + _encode_varint(len(payload)) + payload


def _value_info(name: str) -> bytes:
    """ValueInfoProto: a float tensor of shape [1]."""
    dim = _len_field(1, _key(1, VARINT) + _encode_varint(1))  # Dimension.dim_value = 1
    tensor_type = _key(1, VARINT) + _encode_varint(1) + _len_field(2, dim)  # FLOAT, shape
    return _len_field(1, name.encode()) + _len_field(2, _len_field(1, tensor_type))


def stub_model(ir_version: int, opsets: Mapping[str, int]) -> bytes:
    """A model `x → Identity → y` stamped with this IR version and these opset imports."""
    node = _len_field(1, b"x") + _len_field(2, b"y") + _len_field(4, b"Identity")
    graph = (_len_field(1, node) + _len_field(2, b"stub") + _len_field(11, _value_info("x"))
             + _len_field(12, _value_info("y")))
    imports = b"".join(
        _len_field(_MODEL_OPSET, (b"" if domain == "ai.onnx" else _len_field(1, domain.encode()))
                   + _key(2, VARINT) + _encode_varint(version))
        for domain, version in opsets.items())
    return (_key(_MODEL_IR_VERSION, VARINT) + _encode_varint(ir_version) + imports
            + _len_field(_MODEL_GRAPH, graph))
