"""A component's weights with LoRAs merged in: W' = W + Σ scale · (alpha / rank) · up @ down.

The merge LoRA's authors describe (Hu et al. 2021, §4.1: W = W0 + BA, no extra inference cost)
and what diffusers' `fuse_lora` and A1111 compute. Each product is taken in float32 as a matrix,
(out, rank) @ (rank, in · kh · kw), and reshaped to the torch weight's shape, so a LoCon conv
(3×3 down, 1×1 up) and a Linear LoRA on a 1×1 conv (or the reverse) need no special case; an
Embedding's update is the transpose (PEFT's lora_embedding_B @ lora_embedding_A is (dim, num)).
The lora_map says where each module's weight sits in the graph and whether it is stored
transposed (a MatMul's W.T); the sum is added there and cast back to the initializer's dtype.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import Protocol

import numpy as np

from sdrt.runtime.adapters.lora_file import LoraFile, LoraLayer
from sdrt.runtime.adapters.lora_names import module_paths
from sdrt.runtime.errors import InputError, ModelError
from sdrt.runtime.model.onnx_tensors import WeightReader

LISTED = 3  # layer names an error message lists before "and N more"
FLOATS = (np.float32, np.float16)  # initializer dtypes a LoRA can be merged into


class MapEntry(Protocol):
    """Where one module's weight sits in the graph (lora_map.json's entry)."""

    @property
    def initializer(self) -> str: ...

    @property
    def kind(self) -> str: ...  # "linear" | "conv" | "embedding"

    @property
    def transposed(self) -> bool: ...  # the initializer holds W.T

    @property
    def shape(self) -> Sequence[int]: ...  # the torch weight's: (out, in[, kh, kw])


class LoraMapLike(Protocol):
    """A component's lora_map: module path → entry."""

    @property
    def modules(self) -> Mapping[str, MapEntry]: ...


def patched_weights(base: WeightReader, lora_map: LoraMapLike,
                    loras: Sequence[tuple[LoraFile, float]], component: str
                    ) -> dict[str, np.ndarray]:
    """initializer → its weights with every LoRA's layers for `component` merged at its scale;
    only the initializers some LoRA changes. InputError, before anything is computed, for a
    LoRA with layers this model lacks or whose shapes do not fit."""
    terms: dict[str, list[tuple[MapEntry, LoraLayer, float]]] = {}
    for lora, scale in loras:
        if scale == 0:
            continue
        for entry, layer in _placed(lora, lora_map, component):
            terms.setdefault(entry.initializer, []).append((entry, layer, scale))
    weights = base.read(terms)
    return {name: _merged(base, name, weights[name], changes) for name, changes in terms.items()}


def check_components(lora: LoraFile, components: Collection[str]) -> None:
    """InputError when `lora` changes a model part this model lacks (an SDXL LoRA's
    text_encoder_2 on SD 1.5)."""
    extra = sorted(lora.components - set(components))
    if extra:
        raise InputError(f"LoRA '{lora.name}' was made for another model (it changes "
                         f"{', '.join(extra)}, which this model does not have)")


def _placed(lora: LoraFile, lora_map: LoraMapLike, component: str
            ) -> list[tuple[MapEntry, LoraLayer]]:
    """(map entry, layer) for each of the LoRA's layers for `component`, checked to fit."""
    layers = {name: layer for (part, name), layer in lora.layers.items() if part == component}
    paths = module_paths(layers, lora_map.modules.keys())
    placed, unmatched = [], []
    for name, path in paths.items():
        if path is None:
            unmatched.append(name)
            continue
        entry = lora_map.modules[path]
        problem = _misfit(layers[name], entry)
        if problem:
            raise InputError(f"LoRA '{lora.name}' was made for another model ({component} "
                             f"layer '{path}': {problem})")
        placed.append((entry, layers[name]))
    if unmatched:
        more = f" and {len(unmatched) - LISTED} more" if len(unmatched) > LISTED else ""
        raise InputError(f"LoRA '{lora.name}': {len(unmatched)} of its {len(layers)} "
                         f"{component} layers match no layer of this model: "
                         f"{', '.join(unmatched[:LISTED])}{more}")
    return placed


def _misfit(layer: LoraLayer, entry: MapEntry) -> str | None:
    """Why the layer's update cannot be added to the entry's weight, or None."""
    shape = tuple(entry.shape)
    out, rest = (shape[1], shape[:1]) if entry.kind == "embedding" else (shape[0], shape[1:])
    down = layer.down.shape[1:]
    if layer.up.shape[0] == out and _squeezed(down) == _squeezed(rest):
        return None
    return (f"its factors make a weight of ({layer.up.shape[0]}, {', '.join(map(str, down))}), "
            f"the model's is {shape}")


def _squeezed(dims: tuple[int, ...]) -> tuple[int, ...]:
    """A 1×1 conv's input dims as a Linear's: the two hold the same matrix."""
    return dims[:1] if dims[1:] == (1, 1) else dims


def _delta(layer: LoraLayer, entry: MapEntry, scale: float) -> np.ndarray:
    """scale · (alpha / rank) · up @ down in float32, laid out as the graph's initializer (the
    torch weight's shape, transposed where the map says): the product is formed in that
    layout, the scale folded into the small factor, so each layer's update is one matmul that
    writes its result once (the full-size UNet's updates are as large as its weights)."""
    up = layer.up.reshape(layer.up.shape[0], layer.rank).astype(np.float32)
    up *= np.float32(scale * layer.factor)
    down = layer.down.reshape(layer.rank, -1).astype(np.float32)
    if entry.kind == "embedding" or entry.transposed:
        # a Gather's table is (rows, width), where up @ down is (width, rows); MatMul's is W.T
        return (down.T @ up.T).reshape(tuple(entry.shape) if entry.kind == "embedding"
                                       else tuple(entry.shape)[::-1])
    return (up @ down).reshape(tuple(entry.shape))  # (out, in · kh · kw) → (out, in, kh, kw)


def _merged(base: WeightReader, name: str, weight: np.ndarray,
            changes: Sequence[tuple[MapEntry, LoraLayer, float]]) -> np.ndarray:
    """The initializer plus every change's update, in float32, cast back to its dtype."""
    if weight.dtype not in FLOATS:
        raise ModelError(f"{base.path.parent.name}: weight '{name}' is {weight.dtype}; LoRAs "
                         "merge into float32 or float16 graphs, not quantized ones")
    merged = None
    for entry, layer, scale in changes:
        delta = _delta(layer, entry, scale)  # a new array: the base stays as it is
        if delta.shape != weight.shape:
            raise ModelError(f"{base.path.parent.name}: weight '{name}' is {weight.shape} in "
                             f"the graph, but its lora_map.json entry says {delta.shape}; "
                             "export the model again")
        if merged is None:
            merged = delta
        else:
            merged += delta
    merged += weight  # float16 weights widen as they are added
    return merged if weight.dtype == np.float32 else merged.astype(weight.dtype)
