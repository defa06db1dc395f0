"""A request's LoRAs (Hu et al., 2021) applied to exported graphs: the denoiser and text encoders
opened again with patched weights, one set of sessions per LoRA set.

Why this way (measured in benchmarks/RESULTS.md, "LoRA at run time"): each LoRA's update
scale·(alpha/rank)·up·down is merged into the weights it names once per set, and the graphs are
opened with those initializers replaced (ONNX Runtime's initializer overrides, session.py;
OpenVINO's constants swapped before compiling). A step then costs what a plain step costs (the same
graph, other numbers), where a LoRA branch beside each layer (OpenVINO GenAI's adapters) adds its
matmuls to every step; a request without a LoRA runs the untouched sessions and pays nothing. A
switch costs the patch and a session build (full-size SD 1.5, rank 32 on every layer: 18.6 s on
OpenVINO, 35.5 s on ONNX Runtime, whose session build is the slower; a step is ~15 s there). The
last set stays open, so requests that repeat it pay nothing more.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar

import numpy as np

from sdrt.runtime.adapters.library import LoraLibrary
from sdrt.runtime.adapters.lora_file import LoraFile, read_lora
from sdrt.runtime.adapters.lora_map import read_lora_map
from sdrt.runtime.adapters.lora_weights import check_components, patched_weights
from sdrt.runtime.errors import InputError
from sdrt.runtime.model.onnx_tensors import WeightReader

log = logging.getLogger(__name__)

# LoRA sets whose sessions stay open beside the pipeline's own. Each holds a patched copy of the
# weights its LoRAs touch and the backend's packed copy of them: full-size SD 1.5 with a LoRA on
# every layer peaked at 14.7-16.4 GiB with one set open (benchmarks/RESULTS.md), so a second
# would pass a 24 GB machine. The old set is dropped before a new one is built.
MAX_ADAPTED_SETS = 1
MAX_READ_FILES = 8  # LoRA files kept read (a rank-32 SD 1.5 LoRA is ~150 MB of float32)
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")

Graphs = TypeVar("Graphs")


@dataclass(frozen=True)
class LoraRequest:
    """One LoRA a request asks for: a file path or a name in the LoRA folder, and its weight on
    the text encoders and on the UNet (A1111's `<lora:NAME:te=W1:unet=W2>`)."""

    name: str
    te: float = 1.0
    unet: float = 1.0


@dataclass(frozen=True)
class LoraUse:
    """A LoRA request resolved to its read file."""

    file: LoraFile
    te: float
    unet: float

    @property
    def key(self) -> tuple:
        return (self.file.sha256, self.te, self.unet)


class LoraFiles:
    """Read LoRA files, each read again only when its size or modification time changes."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._files: OrderedDict[tuple, LoraFile] = OrderedDict()

    def read(self, path: Path) -> LoraFile:
        try:
            stat = path.stat()
        except OSError as exc:
            raise InputError(f"LoRA file '{path}' cannot be read: {exc.strerror}") from exc
        key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
        with self._lock:
            if key in self._files:
                self._files.move_to_end(key)
                return self._files[key]
        lora = read_lora(path)
        with self._lock:
            self._files[key] = lora
            while len(self._files) > MAX_READ_FILES:
                self._files.popitem(last=False)
        return lora


class AdaptedGraphs(Generic[Graphs]):
    """The graphs of a model opened with each LoRA set's patched weights, most recent kept.

    `graph_paths` names each component's graph file (the variant's; the LoRA map is the fp32
    graph's, in `folder/<component>/`), `build(weights)` opens the denoiser and conditioner with
    `weights[component]` replacing initializers, and `base_weights` are replacements every set
    carries too (a token table with embeddings)."""

    def __init__(self, folder: Path, graph_paths: Mapping[str, Path],
                 build: Callable[[Mapping[str, Mapping[str, np.ndarray]]], Graphs],
                 base_weights: Mapping[str, Mapping[str, np.ndarray]] | None = None) -> None:
        self._folder = folder
        self._paths = dict(graph_paths)
        self._build = build
        self._base = dict(base_weights or {})
        self._lock = threading.Lock()
        self._sets: OrderedDict[tuple, Graphs] = OrderedDict()

    def graphs(self, uses: Sequence[LoraUse]) -> Graphs:
        """The graphs for this LoRA set, built now (patch + session build) if not kept."""
        key = tuple(use.key for use in uses)
        with self._lock:  # one build at a time: concurrent requests for a new set wait for it
            if key in self._sets:
                self._sets.move_to_end(key)
                return self._sets[key]
            start = time.perf_counter()
            for use in uses:  # before any patching: nothing is applied from a misfit set
                check_components(use.file, self._paths)
            while len(self._sets) >= MAX_ADAPTED_SETS:  # freed before the new set's memory
                self._sets.popitem(last=False)  # is taken (a request running keeps its own)
            gc.collect()  # backend sessions can sit in reference cycles with their bindings
            weights = {component: {**self._base.get(component, {}),
                                   **self._patched(component, uses)}
                       for component in self._paths}
            graphs = self._build(weights)
            del weights  # the sessions hold what they need
            self._sets[key] = graphs
            log.info("LoRA set %s applied in %.1f s",
                     ", ".join(f"{u.file.name}:{u.te:g}/{u.unet:g}" for u in uses),
                     time.perf_counter() - start)
            return graphs

    def _patched(self, component: str, uses: Sequence[LoraUse]) -> dict[str, np.ndarray]:
        scaled = [(use.file, use.unet if component == "unet" else use.te) for use in uses]
        if not any(scale for _, scale in scaled):
            return {}
        return patched_weights(WeightReader(self._paths[component]),
                               read_lora_map(self._folder / component), scaled, component)


def lora_components(denoiser_graph: str, text_encoders: Sequence[str]) -> tuple[str, ...]:
    """The components a LoRA may change: the denoiser and the text encoders."""
    return (denoiser_graph, *(name for name in text_encoders if name in TEXT_ENCODERS))


def resolve_loras(requests: Sequence[LoraRequest], library: LoraLibrary,
                  files: LoraFiles) -> tuple[LoraUse, ...]:
    """Each request's file read (names looked up in the library); weights checked finite."""
    uses = []
    for request in requests:
        for label, weight in (("te", request.te), ("unet", request.unet)):
            if isinstance(weight, bool) or not isinstance(weight, int | float) \
                    or not np.isfinite(weight):
                raise InputError(f"LoRA '{request.name}': {label} weight must be a finite "
                                 f"number, got {str(weight)[:20]}")
        uses.append(LoraUse(files.read(library.resolve(request.name)), float(request.te),
                            float(request.unet)))
    return tuple(uses)
