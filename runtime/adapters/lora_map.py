"""A component folder's `lora_map.json`: where each LoRA-able layer's weight sits in its graph.

A LoRA names layers by their diffusers/transformers module path (`down_blocks.0.resnets.0.conv1`,
`text_model.encoder.layers.0.mlp.fc1`); an exported graph holds their weights as initializers
under names the exporter chose, a Linear's often as W.T (MatMul). `sdrt export` records, per
component, each module's initializer, kind, layout and torch shape:

    {"format": "sdrt-lora-map", "format_version": 1, "graph": "model.onnx",
     "modules": {"<module path>": {"initializer": "onnx::MatMul_2397", "kind": "linear",
                                   "transposed": true, "shape": [320, 320]}, ...}}

`kind` is "linear" (Gemm/MatMul), "conv" (Conv) or "embedding" (Gather); `transposed` is true when
the initializer holds W.T; `shape` is the torch weight's (out, in[, kh, kw]). Folders exported
before the map existed have none and must be exported again.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

from sdrt.runtime.errors import ModelError

MAP_NAME = "lora_map.json"
FORMAT = "sdrt-lora-map"
FORMAT_VERSION = 1
KIND_RANKS = {"linear": 2, "conv": 4, "embedding": 2}  # kind → rank of the torch weight


@dataclass(frozen=True)
class MapEntry:
    """One layer's weight in the graph: initializer name, kind, whether it holds W.T, W's shape."""

    initializer: str
    kind: str
    transposed: bool
    shape: tuple[int, ...]

    def to_json(self) -> dict[str, Any]:
        return {"initializer": self.initializer, "kind": self.kind,
                "transposed": self.transposed, "shape": list(self.shape)}


@dataclass(frozen=True)
class LoraMap:
    """A component's map: its graph file (beside the map) and module path → MapEntry."""

    graph: str
    modules: Mapping[str, MapEntry]

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "format_version": FORMAT_VERSION, "graph": self.graph,
                "modules": {path: entry.to_json() for path, entry in self.modules.items()}}

    def save(self, component_folder: Path) -> Path:
        """Write `component_folder/lora_map.json`; returns its path."""
        path = Path(component_folder) / MAP_NAME
        path.write_text(json.dumps(self.to_json(), indent=1) + "\n", "utf-8")
        return path


def read_lora_map(component_folder: Path) -> LoraMap:
    """The map of an exported component folder; ModelError (one line) when missing or malformed."""
    folder = Path(component_folder)
    path = folder / MAP_NAME
    if not path.is_file():
        raise ModelError(f"{folder} has no LoRA map (exported before sdrt recorded one); "
                         "re-export it with `sdrt export`")
    try:
        data = json.loads(path.read_text("utf-8"))
        return _parse(data)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, _Malformed) as exc:
        reason = str(exc).splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"{path} is malformed: {reason}; re-export the model with "
                         "`sdrt export`") from exc


class _Malformed(ValueError):
    """What is wrong with a map's content (reported inside ModelError)."""


def _expect(condition: bool, message: str) -> None:
    if not condition:
        raise _Malformed(message)


def _parse(data: Any) -> LoraMap:
    _expect(isinstance(data, dict) and data.get("format") == FORMAT,
            f"'format' must be {FORMAT!r}")
    _expect(data.get("format_version") == FORMAT_VERSION,
            f"'format_version' {data.get('format_version')!r} is not {FORMAT_VERSION}, the one "
            "this sdrt reads")
    graph = data.get("graph")
    # the graph sits beside the map: a bare file name, so the map cannot point outside the folder
    _expect(isinstance(graph, str) and graph not in ("", ".", "..") and "/" not in graph
            and "\\" not in graph, f"'graph' must be a file name in the folder, got {graph!r}")
    modules = data.get("modules")
    _expect(isinstance(modules, dict) and bool(modules), "'modules' must be a non-empty object")
    return LoraMap(graph, MappingProxyType({str(path): _entry(path, entry)
                                            for path, entry in modules.items()}))


def _entry(path: str, data: Any) -> MapEntry:
    where = f"modules[{path!r}]"
    _expect(isinstance(data, dict), f"{where} must be an object")
    initializer, kind = data.get("initializer"), data.get("kind")
    transposed, shape = data.get("transposed"), data.get("shape")
    _expect(isinstance(initializer, str) and bool(initializer),
            f"{where}.initializer must be a name")
    _expect(kind in KIND_RANKS, f"{where}.kind must be one of {', '.join(KIND_RANKS)}, "
            f"got {kind!r}")
    _expect(isinstance(transposed, bool) and (kind == "linear" or not transposed),
            f"{where}.transposed must be true or false (true only for a linear layer)")
    _expect(isinstance(shape, list) and len(shape) == KIND_RANKS[kind]
            and all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in shape),
            f"{where}.shape must be {KIND_RANKS[kind]} positive integers, got {shape!r}")
    return MapEntry(initializer, kind, transposed, tuple(shape))
