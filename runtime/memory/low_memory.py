"""The low-memory plan: one graph resident at a time, the CFG pair as batch-1 calls, tiled VAE.

`Residency` keeps at most one session open: opening a component's session (text encoder, then
UNet, then VAE decoder, as a generation uses them) first releases the one before, so the peak is
one component's weights and working memory instead of all of them (memory/estimate.py estimates both
plans). Members of one group stay open together: the UNet and the ControlNets (group LOOP), which
run at every step and would otherwise reload each other twice a step. A `LazySession` reads its
graph's input/output specs once at load, then opens and releases the real session as the
residency decides. Calls through one residency are serialised:
several threads may share a low-memory pipeline, but they take turns, and a component another
thread needs is reopened (low memory trades time for the bound). How the denoiser runs its CFG
pair is its architecture's call (runtime/architectures/: batch-1 calls for a UNet).

`plan_for` decides, from the estimate and a budget (default: MemAvailable), whether a request
runs with the default plan, switches to the low-memory one, or is refused with a message that
names the estimate and the budget, instead of being killed by the kernel midway (memory/plan.py
plans a request on an opened model folder).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sdrt.runtime import compile_cache
from sdrt.runtime.components import VaeDecoder, VaeEncoder
from sdrt.runtime.deepcache import graph_paths as deepcache_graphs
from sdrt.runtime.errors import InputError
from sdrt.runtime.memory import estimate as memory
from sdrt.runtime.model.manifest import MANIFEST_NAME, Manifest
from sdrt.runtime.model.variants import Variant
from sdrt.runtime.session import Session, TensorSpec, open_session
from sdrt.runtime.vae.exact_tiled import StagedGraphs
from sdrt.runtime.vae.pooled_norm import tiled_decode_graphs, tiled_decoder
from sdrt.runtime.vae.tiled import TiledVaeEncoder

log = logging.getLogger(__name__)

MODES = ("auto", "default", "low")
# UNet rows per call in the low-memory plan: the CFG pair as two calls, since the working memory
# grows with the batch (SD 1.5's int8 UNet at 512²: 178 MiB at batch 1, 367 MiB at batch 2); the
# price is time, one call's overhead per extra row.
LOW_MEMORY_BATCH = 1
LOOP = "loop"  # the residency group of the sampler loop's graphs: the denoiser and ControlNets


# glibc malloc's M_MMAP_THRESHOLD (mallopt parameter -3) and the value the low-memory plan sets:
# by default glibc raises the threshold up to 32 MB each time a mapped block is freed, after which
# a backend's many short-lived activation buffers come from the heap, fragment it and are not
# returned; fixed at 64 KiB they are mapped and unmapped, and a VAE window's peak RSS fell from
# 1,419 MiB to 690 MiB (benchmarks/RESULTS.md, "Low-memory mode").
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 64 * 1024


def map_large_allocations() -> bool:
    """Fix glibc's mmap threshold (see MMAP_THRESHOLD_BYTES); False where libc is not glibc."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))
    except (OSError, AttributeError):  # not glibc (macOS, Windows, musl without mallopt)
        return False


class Residency:
    """At most one open session among its members, or the members of one group; opening one
    releases the others."""

    def __init__(self) -> None:
        if not map_large_allocations():
            log.info("could not fix the C allocator's mmap threshold; peaks may be higher")
        self.lock = threading.RLock()
        self._open: list[LazySession] = []

    def activate(self, member: LazySession) -> Session:
        """The member's open session, after releasing the open members outside its group."""
        if member not in self._open:
            if member.group is None or any(other.group != member.group for other in self._open):
                for other in self._open:
                    other.release()
                self._open = []
            self._open.append(member)
        return member.session()

    def open_session(self, path: Path, backend: str, *, group: str | None = None,
                     **options) -> LazySession:
        """open_session's signature; the session opens with low-memory backend options, and
        stays open beside the other members of its `group` (None: alone)."""
        return LazySession(lambda: open_session(path, backend, low_memory=True, **options), self,
                           group)

    @staticmethod
    def vae(decoder: VaeDecoder, factor: int,
            split_decoder: tuple[Session, Session] | None = None,
            stages: StagedGraphs | None = None,
            ) -> tuple[VaeDecoder, Callable[[Session], VaeEncoder]]:
        """The low-memory plan's tiled decoder (exact over the stage graphs where given:
        vae/exact_tiled.py; else sharing GroupNorm statistics over the split decoder's head and
        tail sessions where given: vae/pooled_norm.py), and tiled encoder maker. How the
        denoiser splits its CFG batch is its architecture's (runtime/architectures/)."""
        return (tiled_decoder(decoder, split_decoder, factor=factor, stages=stages),
                lambda session: TiledVaeEncoder(VaeEncoder(session), factor=factor))

    def release_all(self) -> None:
        with self.lock:
            for member in self._open:
                member.release()
            self._open = []


class LazySession:
    """A Session whose backend session lives only while its residency lets it."""

    def __init__(self, opener: Callable[[], Session], residency: Residency,
                 group: str | None = None) -> None:
        self._opener = opener
        self._residency = residency
        self.group = group
        self._session: Session | None = None
        with residency.lock:  # specs once; this session stays open until another one opens
            session = residency.activate(self)
            self.inputs: dict[str, TensorSpec] = session.inputs
            self.outputs: dict[str, TensorSpec] = session.outputs

    def session(self) -> Session:
        if self._session is None:
            self._session = self._opener()
        return self._session

    def release(self) -> None:
        """Drop the backend session and return its memory."""
        self._session = None
        gc.collect()  # backend objects can sit in reference cycles with their bindings

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with self._residency.lock:
            return self._residency.activate(self).run(feeds)


@dataclass(frozen=True)
class Plan:
    """The chosen plan and the estimate it was chosen from."""

    low_memory: bool
    estimate: memory.MemoryEstimate
    budget: int | None
    reason: str

    @property
    def peak(self) -> int:
        return self.estimate.low_memory_peak if self.low_memory else self.estimate.default_peak


def estimate_for(folder: Path, variant: Variant, *, width: int, height: int, images: int,
                 guided: bool, vae_scale_factor: int, tile: int,
                 components: tuple[str, ...], deepcache: bool = False,
                 controls: tuple[tuple[Path, bool], ...] = ()) -> memory.MemoryEstimate:
    """The memory estimate of one generation with `variant`'s graphs from `folder`; with
    `deepcache`, DeepCache's shallow graph beside them (its full graph is the UNet's weights);
    `controls`: each ControlNet's graph and whether its weights are int8/int4-compressed."""
    graphs = {name: variant.graph_path(folder, name) for name in components}
    if deepcache:
        graphs[memory.DEEPCACHE_SHALLOW] = deepcache_graphs(folder, variant)[1]
    nets = {memory.CONTROLNET_ROW.format(i): item for i, item in enumerate(controls)}
    graphs.update({name: path for name, (path, _) in nets.items()})
    compressed = frozenset(name for name in components
                           if variant.precision in ("int8", "int8-hybrid", "int4")
                           and variant.components.get(name) is not None
                           and variant.components[name].file) | frozenset(
        name for name, (_, packed) in nets.items() if packed)
    # OpenVINO reads float16 copies of external-weight graphs at 16-bit executions
    cached = variant.backend == "openvino" and compile_cache.cache_dir() is not None
    halved = frozenset(
        name for name, path in graphs.items() if cached and compile_cache.half_weights(
            path, variant.execution("unet" if name == memory.DEEPCACHE_SHALLOW else name)))
    rows = images * (2 if guided else 1)
    shapes = memory.Shapes(width, height, rows, vae_scale_factor)
    stages, split = tiled_decode_graphs(folder, graphs["vae_decoder"]) \
        if "vae_decoder" in graphs else (None, None)
    low = memory.Shapes(width, height, LOW_MEMORY_BATCH, vae_scale_factor, tile=tile,
                        split_decoder=split is not None, staged_decoder=stages is not None)
    return memory.estimate(graphs, variant.backend, shapes=shapes, low_shapes=low,
                           unet=memory.unet_shape(folder, *sliced_attention(folder)),
                           compressed=compressed, halved=halved)


def sliced_attention(folder: Path) -> tuple[bool, int]:
    """Whether the folder's UNet attention is sliced by head (`sdrt export --attention sliced`
    or export/slice_attention.py), and in how many query chunks (manifest extra)."""
    if not (folder / MANIFEST_NAME).is_file():
        return False, 1
    extra = Manifest.load(folder).extra
    return extra.get("attention") == "sliced", int(extra.get("attention_query_chunks", 1))


def plan_for(estimate: memory.MemoryEstimate, mode: str, budget: int | None) -> Plan:
    """Default or low-memory plan for a budget (None: unlimited); InputError when even the
    low-memory plan's estimate exceeds it, or when `mode` "default" does."""
    if mode not in MODES:
        raise InputError(f"memory mode must be one of {', '.join(MODES)}, got {mode!r}")
    fmt = memory.format_size
    limit = f"the {fmt(budget)} budget" if budget is not None else "no budget"
    if mode == "low":
        plan = Plan(True, estimate, budget, "--low-memory")
    elif budget is None or estimate.default_peak <= budget:
        plan = Plan(False, estimate, budget, f"default plan fits {limit}")
    elif mode == "default":
        raise InputError(f"this generation needs about {fmt(estimate.default_peak)} but "
                         f"--max-memory allows {fmt(budget)}; add --low-memory (about "
                         f"{fmt(estimate.low_memory_peak)}) or raise --max-memory")
    else:
        plan = Plan(True, estimate, budget,
                    f"default plan (about {fmt(estimate.default_peak)}) exceeds {limit}")
    if budget is not None and plan.peak > budget:
        raise InputError(f"this generation needs about {fmt(plan.peak)} even in low-memory "
                         f"mode, more than {limit}; try a smaller size, an int8 precision, or "
                         f"a UNet exported with --attention sliced")
    return plan
