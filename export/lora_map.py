"""Record, at export, where each LoRA-able layer's weight sits in the graph: lora_map.json.

A LoRA (Hu et al. 2021) changes the weights of Linear, Conv2d and Embedding layers, named by their
module path in the diffusers/transformers model; the runtime patches the graph's initializers
(format: sdrt.runtime.adapters.lora_map). torch's TorchScript exporter keeps a parameter's name
only where the graph uses it as it is: a Linear without bias becomes MatMul on a constant-folded
W.T named `onnx::MatMul_N`, and initializers of equal value are merged into one. So weights are
matched by value, not by name: each module's W (and a Linear's W.T) is hashed while the torch
model is in memory, then each float initializer of a wanted dtype and shape is hashed once, its
external data read through a memory map, so a 3.2 GB UNet is matched in seconds with no second
copy of its weights in memory. A Conv's, a Gemm(transB=1)'s and a Gather's initializer holds W, a
MatMul's W.T. A module whose weight matches no initializer, several, or one that another module
matches too (tied or zero-initialised weights), or a square Linear whose W equals W.T (which of
the two the graph holds cannot be told), is left out and logged at debug level.
"""

from __future__ import annotations

import hashlib
import logging
import mmap
from collections import defaultdict
from collections.abc import Iterator, Mapping
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import onnx
import torch
from onnx import helper, numpy_helper

from sdrt.runtime.adapters.lora_map import LoraMap, MapEntry
from sdrt.runtime.errors import ExportError

logger = logging.getLogger("sdrt.export")

KINDS = ((torch.nn.Linear, "linear"), (torch.nn.Conv2d, "conv"), (torch.nn.Embedding, "embedding"))
Key = tuple[str, tuple[int, ...], bytes]  # (numpy dtype name, shape, digest of the bytes)


@dataclass(frozen=True)
class Fingerprint:
    """One module's weight, as bytes digests: W and, for a Linear, W.T."""

    kind: str
    shape: tuple[int, ...]
    plain: Key
    transposed: Key | None


def fingerprints(model: torch.nn.Module) -> dict[str, Fingerprint]:
    """Every Linear, Conv2d and Embedding of `model` by its `named_modules()` path (a CLIP text
    model's under `text_model.`, as LoRA files and transformers 4 name them)."""
    prints = {}
    for path, module in model.named_modules(prefix=_path_prefix(model)):
        kind = next((name for cls, name in KINDS if isinstance(module, cls)), None)
        if kind is None:
            continue
        weight = module.weight.detach()
        prints[path] = Fingerprint(
            kind, tuple(weight.shape), _key(weight),
            _key(weight.T) if kind == "linear" else None)
    return prints


def _path_prefix(model: torch.nn.Module) -> str:
    # transformers 5 builds CLIPTextModel without its `text_model` level, which transformers 4,
    # every SD checkpoint and LoRA files have; the map names layers one way under either
    text = type(model).__name__.startswith("CLIPText")
    return "" if not text or hasattr(model, "text_model") else "text_model"


def _key(weight: torch.Tensor) -> Key:
    array = weight.contiguous().numpy()  # a transpose's copy lives for this one call
    return array.dtype.name, array.shape, _digest(memoryview(array).cast("B"))


def _digest(data: bytes | memoryview) -> bytes:
    return hashlib.sha256(data).digest()


def write_lora_map(folder: Path, graph: str, prints: Mapping[str, Fingerprint]) -> LoraMap:
    """Match `prints` to `folder/graph`'s initializers and save `folder/lora_map.json`."""
    wanted = {key[:2] for p in prints.values() for key in (p.plain, p.transposed) if key}
    found: dict[Key, list[str]] = defaultdict(list)
    for name, key in _initializer_keys(folder / graph, wanted):
        found[key].append(name)
    entries = {path: entry for path, p in prints.items()
               if (entry := _entry(path, p, found)) is not None}
    users: dict[str, list[str]] = defaultdict(list)
    for path, entry in entries.items():
        users[entry.initializer].append(path)
    for initializer, paths in users.items():
        if len(paths) > 1:  # one initializer for several layers: patching one changes all
            logger.debug("%s: %s share initializer %s; left out of the LoRA map", folder.name,
                         ", ".join(paths), initializer)
            for path in paths:
                del entries[path]
    if not entries:
        raise ExportError(f"{folder.name}: no layer's weight was found among {graph}'s "
                          "initializers, so no LoRA map can be written")
    logger.info("%s: LoRA map of %d of %d layers", folder.name, len(entries), len(prints))
    lora_map = LoraMap(graph, entries)
    lora_map.save(folder)
    return lora_map


def _entry(path: str, p: Fingerprint, found: Mapping[Key, list[str]]) -> MapEntry | None:
    if p.transposed == p.plain:
        logger.debug("%s: W equals W.T; left out of the LoRA map", path)
        return None
    matches = [(name, False) for name in found.get(p.plain, ())]
    matches += [(name, True) for name in found.get(p.transposed, ())] if p.transposed else []
    if len(matches) != 1:
        logger.debug("%s: weight matches %d initializers; left out of the LoRA map", path,
                     len(matches))
        return None
    name, transposed = matches[0]
    return MapEntry(name, p.kind, transposed, p.shape)


def _initializer_keys(path: Path, wanted: set[tuple[str, tuple[int, ...]]]
                      ) -> Iterator[tuple[str, Key]]:
    """(name, key) of each initializer whose dtype and shape are `wanted`."""
    model = onnx.load(str(path), load_external_data=False)
    with ExitStack() as stack:
        maps: dict[str, mmap.mmap] = {}
        for tensor in model.graph.initializer:
            dtype = helper.tensor_dtype_to_np_dtype(tensor.data_type).name
            shape = tuple(tensor.dims)
            if (dtype, shape) in wanted:
                yield tensor.name, (dtype, shape, _digest(_bytes(tensor, path.parent, maps,
                                                                 stack)))


def _bytes(tensor: onnx.TensorProto, base: Path, maps: dict[str, mmap.mmap],
           stack: ExitStack) -> bytes | memoryview:
    """An initializer's little-endian bytes: a slice of its external data file, or inline."""
    if tensor.data_location != onnx.TensorProto.EXTERNAL:
        return tensor.raw_data or numpy_helper.to_array(tensor).tobytes()
    info = {entry.key: entry.value for entry in tensor.external_data}
    location = info["location"]
    if location not in maps:
        handle = stack.enter_context(open(base / location, "rb"))
        maps[location] = stack.enter_context(
            mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ))
    start = int(info.get("offset", 0))
    length = int(info["length"]) if "length" in info else len(maps[location]) - start
    return memoryview(maps[location])[start:start + length]
