"""DeepCache at run time: a full UNet call every N-th call caches a deep feature, the calls
between run only the shallow skip branch on it (Ma, Fang, Wang, CVPR 2024, arXiv:2312.00858).

The graphs come from `python -m sdrt.export.deepcache MODEL` (export/deepcache.py):
unet/deepcache/full.onnx (the UNet, plus the cached feature as output FEATURE) and shallow.onnx
(the branch, FEATURE as an input). A variant with a UNet graph of its own (an OpenVINO IR one)
gets the same cut of that graph from `sdrt quantize`, as full.xml and shallow.xml in deepcache/
beside it (quantize/deepcache_ir.py), so DeepCache runs on the quantized UNet. The cache lives
in one `CachedUNet` per generation, so threads never share it; calls are counted, not steps, so
samplers that call the model twice per step (Heun, DPM2) still refresh every N calls, and the
CFG pair (2B rows) is cached together.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np

from sdrt.runtime.components import UNet
from sdrt.runtime.control.residuals import unet_levels
from sdrt.runtime.errors import InputError, ModelError
from sdrt.runtime.model.variants import Variant
from sdrt.runtime.session import Session

DEEPCACHE_DIR = "unet/deepcache"
FULL_GRAPH = "full.onnx"
SHALLOW_GRAPH = "shallow.onnx"
FULL_IR = "full.xml"  # a variant's, cut from its own IR UNet (quantize/deepcache_ir.py)
SHALLOW_IR = "shallow.xml"
FEATURE = "deepcache_feature"
PARAMETER = "DeepCache"  # the key in the PNG's A1111 parameters: the interval N


class DeepCacheGraphs:
    """The full and shallow graphs, opened once per pipeline and shared between threads."""

    def __init__(self, full: Session, shallow: Session,
                 residual_levels: tuple[int, ...] = ()) -> None:
        self.full = UNet(full, residual_levels)  # zero ControlNet residuals where it takes them
        if FEATURE not in full.outputs or FEATURE not in shallow.inputs \
                or "out_sample" not in shallow.outputs:
            raise ModelError(f"unet/deepcache: expected {FULL_GRAPH} to output {FEATURE!r} and "
                             f"{SHALLOW_GRAPH} to take it and output 'out_sample'; rebuild them "
                             f"with `python -m sdrt.export.deepcache MODEL`")
        self.shallow = shallow

    def unet(self, interval: int) -> CachedUNet:
        """A UNet for one generation, running the full graph on calls 0, N, 2N, …"""
        if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
            raise InputError(f"deepcache must be an interval N ≥ 1, got {interval!r}")
        return CachedUNet(self, interval)


class CachedUNet:
    """One generation's UNet under DeepCache; called like `UNet`, keeps its own feature."""

    def __init__(self, graphs: DeepCacheGraphs, interval: int) -> None:
        self.graphs = graphs
        self.interval = interval
        self.calls = 0
        self.full_calls = 0
        self.feature: np.ndarray | None = None  # (rows, C, h, w) from the last full call

    @property
    def guidance_dim(self) -> int | None:
        """As `UNet.guidance_dim` (LCM's guidance-scale embedding width)."""
        return self.graphs.full.guidance_dim

    def __call__(self, sample: np.ndarray, t: float, context: np.ndarray,
                 added: dict[str, np.ndarray] | None = None,
                 timestep_cond: np.ndarray | None = None) -> np.ndarray:
        feeds = self.graphs.full.feeds(sample, t, context, added, timestep_cond)
        stale = self.feature is None or self.feature.shape[0] != sample.shape[0]
        if stale or self.calls % self.interval == 0:
            out = self.graphs.full.session.run(feeds)
            self.feature = out[FEATURE]  # (rows, C, h, w)
            self.full_calls += 1
        else:
            shallow = self.graphs.shallow
            out = shallow.run({**{k: v for k, v in feeds.items() if k in shallow.inputs},
                               FEATURE: self.feature})
        self.calls += 1
        return out["out_sample"]


def _own_unet(variant: Variant | None) -> str | None:
    """The UNet graph file `variant` runs instead of the fp32 one (None: it runs the fp32 one)."""
    own = variant.components.get("unet") if variant is not None else None
    return own.file if own is not None else None


def graphs_dir(folder: Path, variant: Variant | None = None) -> Path:
    """Where the DeepCache graphs of `variant`'s UNet live: deepcache/ beside the variant's own
    UNet graph, else the fp32 cut's unet/deepcache/."""
    own = _own_unet(variant)
    return (folder / own).parent / Path(DEEPCACHE_DIR).name if own else folder / DEEPCACHE_DIR


def find_graphs(folder: Path, variant: Variant | None = None) -> tuple[Path, Path] | None:
    """The full and shallow graphs `variant`'s UNet runs DeepCache with, if they exist."""
    where = graphs_dir(folder, variant)
    for full, shallow in ((FULL_GRAPH, SHALLOW_GRAPH), (FULL_IR, SHALLOW_IR)):
        if (where / full).is_file() and (where / shallow).is_file():
            return where / full, where / shallow
    return None


def uncut_variant(folder: Path, variant: Variant) -> bool:
    """Whether `variant` runs a UNet graph of its own that no DeepCache graphs were cut from."""
    return _own_unet(variant) is not None and find_graphs(folder, variant) is None


def graph_paths(folder: Path, variant: Variant | None = None) -> tuple[Path, Path]:
    """As `find_graphs`; ModelError saying how to make them if missing."""
    found = find_graphs(folder, variant)
    if found is None:
        raise ModelError(missing_graphs(folder, variant))
    return found


def missing_graphs(folder: Path, variant: Variant | None = None) -> str:
    """What to run when `variant` (None: fp32) has no DeepCache graphs."""
    make = f"`python -m sdrt.export.deepcache {folder}`"
    if _own_unet(variant) is None:
        return f"'{folder.name}' has no DeepCache graphs; make them with {make}"
    if variant.backend != "openvino":  # quantize cuts OpenVINO IR UNets only
        return (f"the {variant.key} variant has a UNet graph of its own, without DeepCache "
                f"graphs; use fp32, or a variant made for OpenVINO")
    return (f"the {variant.precision} variant of '{folder.name}' has no DeepCache graphs: make "
            f"the fp32 ones with {make}, then the variant again with `sdrt quantize "
            f"{folder.name} --precision {variant.precision} --backend {variant.backend} "
            f"--force` (or run --precision fp32)")


class LazyDeepCache:
    """The DeepCache graphs, opened on first use (most runs never ask for them), once. `full` is
    the full graph's session when the pipeline's UNet runs it already (Pipeline.load's
    `deepcache`), so only the shallow graph is added."""

    def __init__(self, folder: Path, open_graph: Callable[[Path], Session],
                 refusal: str | None = None, full: Session | None = None,
                 variant: Variant | None = None) -> None:
        self._folder = folder
        self._variant = variant  # whose UNet runs: its DeepCache graphs (graphs_dir)
        self._open = open_graph
        self._refusal = refusal  # why this pipeline cannot run DeepCache, if it cannot
        self._full = full
        self._graphs: DeepCacheGraphs | None = None
        self._lock = threading.Lock()

    def __call__(self) -> DeepCacheGraphs:
        if self._refusal:
            raise InputError(self._refusal)
        with self._lock:
            if self._graphs is None:
                full, shallow = graph_paths(self._folder, self._variant)
                self._graphs = DeepCacheGraphs(
                    self._full if self._full is not None else self._open(full),
                    self._open(shallow), unet_levels(self._folder))
            return self._graphs


def gate_key(precision: str, backend: str, interval: int) -> str:
    """The key of interval N's fidelity gate record in manifest.json's extra.deepcache.gates."""
    return f"{precision}-{backend}/{interval}"


def gate_record(manifest_extra: dict, precision: str, backend: str, interval: int) -> dict | None:
    """Interval N's gate record at this precision and backend, if one passed
    (quantize/deepcache_gate.py writes them)."""
    gates = manifest_extra.get("deepcache", {}).get("gates", {})
    entry = gates.get(gate_key(precision, backend, interval))
    return entry if isinstance(entry, dict) and entry.get("passed") else None
