"""Read a `.onnx` graph's initializers as NumPy arrays without the `onnx` package.

The file is walked once (model/onnx_proto.py's `initializer_locations`); each initializer asked
for is then a read-only NumPy view of the memory-mapped `.onnx` (inline `raw_data`) or of its
external-data file (onnx/docs/ExternalData.md: `location`, `offset`, `length`), so reading the
weights a LoRA changes costs page-ins of those weights only. External files must lie in the
graph's folder (or its hub cache's blobs), as for every graph the runtime opens.
"""

from __future__ import annotations

import math
import mmap
from collections.abc import Iterable
from pathlib import Path, PurePosixPath

import numpy as np

from sdrt.runtime.errors import ModelError
from sdrt.runtime.model.graph_files import confinement_roots, escapes, label
from sdrt.runtime.model.onnx_proto import (
    ExternalRef,
    ProtoError,
    TensorLocation,
    initializer_locations,
)

# TensorProto.DataType → little-endian NumPy dtype, for the types NumPy holds.
DTYPES = {1: "<f4", 2: "u1", 3: "i1", 4: "<u2", 5: "<i2", 6: "<i4", 7: "<i8", 9: "?",
          10: "<f2", 11: "<f8", 12: "<u4", 13: "<u8"}
BFLOAT16 = 16
LISTED = 3  # names an unknown-initializer message lists


class WeightReader:
    """The initializers of one `.onnx` graph file, by name."""

    def __init__(self, graph_path: str | Path) -> None:
        self.path = Path(graph_path)
        if self.path.suffix != ".onnx":
            raise ModelError(f"{label(self.path)}: weights are read from .onnx graphs only")
        self._data = _map(self.path)
        try:
            self._locations = initializer_locations(self._data)
        except ProtoError as exc:
            raise ModelError(f"{label(self.path)} is truncated or not an ONNX model: "
                             f"{exc}") from None
        self._roots = confinement_roots(self.path.parent)
        self._files: dict[str, mmap.mmap] = {}

    def __contains__(self, name: str) -> bool:
        return name in self._locations

    def external(self, names: Iterable[str]) -> set[str]:
        """Those of `names` whose values lie in an external-data file (not in the .onnx)."""
        return {name for name in names
                if name in self._locations and self._locations[name].external is not None}

    def read(self, names: Iterable[str]) -> dict[str, np.ndarray]:
        """name → its values (read-only views); ModelError naming the ones the graph lacks."""
        names = list(names)
        missing = [name for name in names if name not in self._locations]
        if missing:
            more = f" and {len(missing) - LISTED} more" if len(missing) > LISTED else ""
            raise ModelError(f"{label(self.path)} has no initializer "
                             f"{', '.join(repr(n) for n in missing[:LISTED])}{more}")
        return {name: self._array(self._locations[name]) for name in names}

    def _array(self, location: TensorLocation) -> np.ndarray:
        where = f"{label(self.path)}: initializer '{location.name}'"
        if location.data_type == BFLOAT16:
            raise ModelError(f"{where} is bfloat16, which NumPy cannot hold; use the float32 or "
                             "float16 graphs")
        if location.data_type not in DTYPES:
            raise ModelError(f"{where} has ONNX data type {location.data_type}, which sdrt does "
                             "not read")
        dtype = np.dtype(DTYPES[location.data_type])
        count = math.prod(location.dims)
        if location.external is not None:
            data, start, length = self._external(location.external, where)
        elif location.raw is not None:
            data, start = self._data, location.raw.start
            length = location.raw.stop - location.raw.start
        elif count == 0:
            return np.zeros(location.dims, dtype)
        else:
            raise ModelError(f"{where} keeps its values in typed fields, not raw_data; save the "
                             "graph again with onnx (which writes raw_data)")
        if length != count * dtype.itemsize:
            raise ModelError(f"{where} holds {length} bytes, not the {count * dtype.itemsize} "
                             f"its shape {location.dims} needs")
        return np.frombuffer(data, dtype, count, start).reshape(location.dims)

    def _external(self, ref: ExternalRef, where: str) -> tuple[mmap.mmap, int, int]:
        """(mapped file, offset, length) of external data, after checking its name and range."""
        location = ref.location or ""
        parts = PurePosixPath(location).parts
        if (not location or "\0" in location or "\\" in location or ":" in location
                or location.startswith("/") or ".." in parts):
            raise ModelError(f"{where} names external data {location!r}, not a file in the "
                             "graph's folder")
        if location not in self._files:
            path = self.path.parent / location
            if (path.is_symlink() or path.exists()) and escapes(path, self._roots):
                raise ModelError(f"{where}: its external data {location!r} resolves outside "
                                 "the model folder")
            self._files[location] = _map(path)
        data = self._files[location]
        try:
            offset = int(ref.offset or 0)
            length = len(data) - offset if ref.length is None else int(ref.length)
        except ValueError:
            raise ModelError(f"{where} has a malformed external-data offset {ref.offset!r} or "
                             f"length {ref.length!r}") from None
        if offset < 0 or length < 0 or offset + length > len(data):
            raise ModelError(f"{self.path.parent.name}/{location} is truncated: '{ref.tensor}' "
                             f"needs bytes {offset}–{offset + length}, the file has {len(data)}")
        return data, offset, length


def _map(path: Path) -> mmap.mmap:
    """The file mapped read-only (views of it stay valid while any array uses them)."""
    try:
        with open(path, "rb") as handle:
            if handle.seek(0, 2) == 0:
                raise ModelError(f"{label(path)} is empty (0 bytes)")
            return mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError as exc:
        raise ModelError(f"{label(path)} cannot be read: {exc.strerror}") from None
