"""Peak-memory estimate before loading, and the plan a memory budget allows.

The estimate (peak RSS of the whole process) adds, per component, its resident weights (the
graph files' bytes times what the backend keeps of them) and its working memory at the request's
shapes, to a base for the interpreter and the backend's libraries:

- default plan: every graph resident at once, plus the largest working memory of one call;
- low-memory plan (runtime/memory/low_memory.py): one graph resident at a time, so the peak is the
  largest single component's weights plus its own working memory; the UNet runs the CFG pair as
  two batch-1 calls and the VAE in tiles (runtime/vae/tiled.py).

Working memory: the UNet's convolution activations grow with batch × latent pixels; its attention
holds a (batch·heads, N, N) score tensor at the finest attention level (N tokens), or one head's
(B, N, N) when the graph was exported with `--attention sliced`; the VAE decoder's grow with
output pixels (its last blocks run 128 channels at full resolution) plus its mid-block attention
over the latent tokens. DeepCache (`--deepcache N`) adds its shallow graph as one more component:
the weights it names in the UNet's shared file and its own finest-level working memory
(DEEPCACHE_SHALLOW). The per-unit constants below were fitted to fresh-process peak RSS
measurements of the SD 1.5 and SDXL architectures on ONNX Runtime (benchmarks/RESULTS.md,
"Low-memory mode"), where the estimate is checked within ESTIMATE_TOLERANCE of each measured peak.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

from sdrt.runtime.errors import InputError
from sdrt.runtime.model.folder import read_json

MIB = 2**20
GIB = 2**30
FLOAT = 4  # bytes per float32 activation

# The promise for the estimate against the measured peak RSS of the same run.
ESTIMATE_TOLERANCE = 0.20

# Fitted on fresh-process peak RSS (ru_maxrss) of single graphs on the SD 1.5 architecture, ONNX
# Runtime 1.32 with the low-memory session options, 2026-11-26 (benchmarks/RESULTS.md,
# "Low-memory mode", where end-to-end runs then check the estimate):
# Interpreter, NumPy, Pillow, tokenizer and the backend's libraries before any graph loads
# (ORT: 76 MB with a 2 MB graph loaded and run).
BASE_BYTES = {"ort": 80 * MIB, "openvino": 125 * MIB}
# Resident bytes per byte of graph file once a session is ready (ORT: the int8 QDQ UNet held
# 880 MB for 826 MB of files, pre-packed for its kernels; the VAE decoder its file size). The
# OpenVINO figure is not fitted: only its base (122 MiB) and int8 UNet were measured here.
RESIDENT_FACTOR = {"ort": 1.05, "openvino": 1.10}
# A graph with its weights inside model.onnx is held twice while ORT loads it (the parsed
# protobuf and the session's initialisers): 1.37× for SD's text encoder, 1.87× for its VAE.
INLINE_LOAD_FACTOR = 1.6
# OpenVINO's CPU plugin turns int8-compressed convolution weights back into f32 when it compiles
# (the SD 1.5 int8 UNet: 5.3 GB at batch 1), so its int8 files count four times.
OPENVINO_INT8_EXPANSION = 4.0

# UNet working memory: feature maps per latent pixel per batch row, plus the attention score
# tensor and its softmax (two copies) at the finest attention level; the SD 1.5 int8 UNet with
# sliced attention used 178 MB at 64×64 latents, batch 1 (134 MB of it the scores).
UNET_BYTES_PER_LATENT_PIXEL = 11 * 1024
ATTENTION_COPIES = 2
# DeepCache (runtime/deepcache.py): the UNet runs as the full graph (the same weights) and the
# shallow graph is a session of its own: its weights (a slice of the UNet's file, hard-linked
# beside it, so only the tensors it names count) and its working memory at the finest level,
# where it runs the UNet's first and last layers: feature maps per latent pixel per batch row, plus
# on ONNX Runtime that level's attention scores and softmax in the session's own arena. Measured
# on SD 1.5 at 512², 2 steps, batch 2, fresh processes, 2026-11-26 (benchmarks/low_memory.py
# generate --deepcache 3): ORT fp32 peaked 2,184 and 2,227 MiB above the same run without
# DeepCache (31 MiB of weights, 2,048 MiB of scores: 13-18 KiB per latent pixel-row left);
# OpenVINO bf16 189-203 MiB above in four pairs (34 MiB of weights, 19-21 KiB per latent pixel-row,
# no score tensor: its CPU plugin fuses the attention).
DEEPCACHE_SHALLOW = "unet (shallow)"  # its row in the estimate
# ControlNets (runtime/control/): one row per unit, "controlnet 0", "controlnet 1", … A ControlNet
# is the UNet's down path and mid block, so it holds about half the UNet's feature maps per call
# and the same finest-level attention scores (not fitted: an architectural share). Low-memory
# mode keeps the denoiser and the ControlNets resident together through the loop (they run at
# every step), so that plan's peak counts their weights side by side.
CONTROLNET_ROW = "controlnet {}"
CONTROLNET_FEATURE_SHARE = 0.5
SHALLOW_BYTES_PER_LATENT_PIXEL = 19 * 1024
SHALLOW_HOLDS_SCORES = {"ort": True, "openvino": False}
# VAE decoder working memory per output pixel (its 128-channel full-resolution blocks), plus one
# copy of its mid-block attention scores over the latent tokens: 416 MB for a 384×384 window,
# 751 MB for 512×512.
DECODER_BYTES_PER_PIXEL = 2650
DECODER_ATTENTION_COPIES = 1
# The split decoder (runtime/vae/pooled_norm.py): its tail on one window holds more per output pixel
# (each GroupNorm's centred copy for the shared statistics: a 384² window peaked at 820 MiB, 653
# MiB without them), and its head runs on the whole latent (512 channels, attention queries in
# 16 chunks): 238 MiB of working memory at 128×128 latents, 44 MiB at 64×64.
SHARED_DECODER_BYTES_PER_PIXEL = 4100
SPLIT_HEAD_BYTES_PER_LATENT_PIXEL = 15 * 1024
# The staged decoder (runtime/vae/exact_tiled.py) keeps whole-image maps: at most 512 float32
# channels per output pixel in SD's last up blocks (2 KiB; the peaks below grew 2,049 B per
# pixel from 512² to 1024²), plus one stage's window; it holds one stage's weights, not the
# decoder's that the estimate counts as resident. SD 1.5's decode in a fresh process peaked at
# 666 MiB (512²) and 2.15 GiB (1024²); this value puts the estimate at 1.11 and 0.97 of them.
STAGED_DECODER_BYTES_PER_PIXEL = 1850
# VAE encoder: the same blocks in reverse order, per input pixel.
ENCODER_BYTES_PER_PIXEL = DECODER_BYTES_PER_PIXEL
# Text encoder working memory: 77 tokens per row, negligible beside its weights.
TEXT_BYTES_PER_ROW = 77 * 4096 * FLOAT * 4
# Default plan: each ORT session keeps its own arena at its busiest call's size, and glibc's
# growing mmap threshold leaves freed activation memory in fragmented heaps. Fitted on three
# default-plan `sdrt generate` peaks (512² SD 1.5 fp32 7.56 GiB and int8 sliced 3.47 GiB, 1024²
# SDXL fp32 19.6 GiB), whose individual fits are 1.23, 1.77 and 0.94; 1.35 keeps all three
# within 15%.
DEFAULT_WORKING_FACTOR = 1.35

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


def parse_size(text: str) -> int:
    """Bytes from a size such as "1.2G", "900M", "4GiB" or "512000" (binary units)."""
    match = _SIZE.match(str(text))
    if not match:
        raise InputError(f"memory size must be a number with an optional unit K, M, G or T "
                         f"(e.g. 1.2G), got {text!r}")
    value = float(match.group(1)) * _UNITS[match.group(2).lower()]
    if value < 1:
        raise InputError(f"memory size must be positive, got {text!r}")
    return int(value)


def format_size(size: float) -> str:
    """Bytes as GB (binary) with two decimals, or MB below 1 GB."""
    return f"{size / GIB:.2f} GB" if size >= GIB else f"{size / MIB:.0f} MB"


def available_memory(meminfo: Path = Path("/proc/meminfo")) -> int | None:
    """MemAvailable in bytes (what can be allocated without swapping), None where unknown."""
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def referenced_bytes(path: Path) -> int:
    """Bytes of an .onnx graph's weights: the file plus the external-data ranges it names, so a
    weights file it shares with another graph counts only for its own tensors; an IR's own
    .xml and .bin (it shares no weights file)."""
    from sdrt.runtime.model.onnx_proto import read_stamps

    if path.suffix != ".onnx":
        return graph_bytes(path)
    ranges = 0
    for ref in read_stamps(path).external:
        whole = (path.parent / (ref.location or "")).stat().st_size - int(ref.offset or 0)
        ranges += int(ref.length) if ref.length else whole
    return path.stat().st_size + ranges


def graph_bytes(path: Path) -> int:
    """Bytes of one graph's files: model.onnx plus its external data, or an IR's .xml and .bin."""
    prefix = path.stem + "."
    return sum(item.stat().st_size for item in path.parent.iterdir()
               if item.is_file() and item.name.startswith(prefix)
               and not item.name.endswith(".json"))


@dataclass(frozen=True)
class Shapes:
    """What one generation's working memory depends on."""

    width: int
    height: int
    batch: int  # UNet rows per call: 2 × images when guided, else images
    vae_scale_factor: int = 8
    tile: int | None = None  # VAE window side in latent pixels (None: whole image)
    split_decoder: bool = False  # tiles share GroupNorm statistics (runtime/vae/pooled_norm.py)
    staged_decoder: bool = False  # exact, stage by stage (runtime/vae/exact_tiled.py)

    @property
    def latent_pixels(self) -> int:
        return (self.width // self.vae_scale_factor) * (self.height // self.vae_scale_factor)


@dataclass(frozen=True)
class UNetShape:
    """The attention heads and downsampling of each UNet level that has attention."""

    levels: tuple[tuple[int, int], ...]  # (downsampling factor, heads) per attention level
    sliced: bool
    query_chunks: int = 1  # export/slice_attention.py --query-chunks

    @classmethod
    def from_config(cls, config: dict, sliced: bool, query_chunks: int = 1) -> UNetShape:
        """From unet/config.json: diffusers' `attention_head_dim` is the head count for SD
        UNets (its legacy naming), unless `num_attention_heads` is set."""
        blocks = config.get("down_block_types", [])
        heads = config.get("num_attention_heads") or config.get("attention_head_dim", 8)
        heads = heads if isinstance(heads, list) else [heads] * len(blocks)
        levels = tuple((2**i, int(heads[i])) for i, kind in enumerate(blocks)
                       if "CrossAttn" in kind)
        return cls(levels, sliced, query_chunks)

    def score_bytes(self, latent_h: int, latent_w: int, batch: int,
                    finest_only: bool = False) -> int:
        """The largest attention score tensor one call holds (`finest_only`: at the latent's
        own resolution, 0 where that level has no attention, as SDXL's)."""
        largest = 0
        for factor, heads in self.levels:
            if finest_only and factor != 1:
                continue
            tokens = math.ceil(latent_h / factor) * math.ceil(latent_w / factor)
            largest = max(largest, (1 if self.sliced else heads) * tokens * tokens)
        return batch * math.ceil(largest / self.query_chunks) * FLOAT


@dataclass(frozen=True)
class ComponentEstimate:
    """One graph: its file bytes, what stays resident, its working memory per call, and its
    peak while the backend loads it (a graph with weights inside model.onnx is briefly held
    twice: the parsed file and the session's own copy)."""

    name: str
    file_bytes: int
    resident: int
    working: int
    loading: int = 0

    @property
    def peak(self) -> int:
        return max(self.resident + self.working, self.loading)


@dataclass(frozen=True)
class MemoryEstimate:
    """Per-component figures and the whole-process peaks of both plans."""

    backend: str
    base: int
    components: tuple[ComponentEstimate, ...]
    low_components: tuple[ComponentEstimate, ...]  # the same graphs at the low-memory shapes

    @property
    def default_peak(self) -> int:
        """Everything resident at once, each session keeping its busiest call's working memory
        (ONNX Runtime's arena and the allocator hold on to it, DEFAULT_WORKING_FACTOR)."""
        return (self.base + sum(c.resident for c in self.components)
                + int(DEFAULT_WORKING_FACTOR * sum(c.working for c in self.components)))

    @property
    def low_memory_peak(self) -> int:
        """One graph resident at a time (the largest single component's peak), but the denoiser
        and ControlNets together: their weights and the largest one's working memory."""
        peaks = [c.peak for c in self.low_components]
        loop = [c for c in self.low_components if _in_loop(c.name)]
        if len(loop) > 1:  # the denoiser with its ControlNets
            peaks.append(sum(c.resident for c in loop) + max(c.working for c in loop))
        return self.base + max(peaks)

    def table(self) -> str:
        """The estimate as lines of text for `--dry-run`."""
        lines = [f"{'component':<16}{'files':>11}{'resident':>11}{'loading':>11}"
                 f"{'working':>11}{'low-mem working':>17}"]
        for full, low in zip(self.components, self.low_components, strict=True):
            lines.append(f"{full.name:<16}{format_size(full.file_bytes):>11}"
                         f"{format_size(full.resident):>11}{format_size(full.loading):>11}"
                         f"{format_size(full.working):>11}{format_size(low.working):>17}")
        lines.append(f"{'base':<16}{'':>11}{format_size(self.base):>11}")
        lines.append(f"estimated peak: default {format_size(self.default_peak)}, "
                     f"low-memory {format_size(self.low_memory_peak)}")
        return "\n".join(lines)


def is_controlnet(component: str) -> bool:
    """Whether an estimate row is a ControlNet's."""
    return component.startswith(CONTROLNET_ROW.format(""))


def _in_loop(component: str) -> bool:
    """The graphs the low-memory plan keeps resident together through the sampler loop."""
    return component in ("unet", "transformer") or is_controlnet(component)


def working_bytes(component: str, shapes: Shapes, unet: UNetShape | None,
                  backend: str = "ort") -> int:
    """Working memory of one call of `component` at `shapes` on `backend`."""
    factor = shapes.vae_scale_factor
    latent_h, latent_w = shapes.height // factor, shapes.width // factor
    if component.startswith("text_encoder"):
        return shapes.batch * TEXT_BYTES_PER_ROW
    if component == DEEPCACHE_SHALLOW:  # the finest level only
        scores = unet.score_bytes(latent_h, latent_w, shapes.batch, finest_only=True) \
            if unet and SHALLOW_HOLDS_SCORES[backend] else 0
        return (shapes.batch * shapes.latent_pixels * SHALLOW_BYTES_PER_LATENT_PIXEL
                + ATTENTION_COPIES * scores)
    if component in ("unet", "transformer") or is_controlnet(component):
        # SD 3's MMDiT: no attention levels read (yet)
        scores = unet.score_bytes(latent_h, latent_w, shapes.batch) if unet else 0
        share = CONTROLNET_FEATURE_SHARE if is_controlnet(component) else 1.0
        return int(share * shapes.batch * shapes.latent_pixels * UNET_BYTES_PER_LATENT_PIXEL
                   + ATTENTION_COPIES * scores)
    if shapes.tile is not None and shapes.staged_decoder and component == "vae_decoder":
        pixels = latent_h * latent_w * factor * factor
        return max(pixels * STAGED_DECODER_BYTES_PER_PIXEL,  # the maps and one window
                   shapes.latent_pixels * SPLIT_HEAD_BYTES_PER_LATENT_PIXEL)  # or the head
    if shapes.tile is not None and shapes.split_decoder and component == "vae_decoder":
        window = min(latent_h, shapes.tile) * min(latent_w, shapes.tile) * factor * factor
        return max(window * SHARED_DECODER_BYTES_PER_PIXEL,  # the tail on one window
                   shapes.latent_pixels * SPLIT_HEAD_BYTES_PER_LATENT_PIXEL)  # or the head
    if shapes.tile is not None:  # one window of the tiled VAE at a time
        latent_h, latent_w = min(latent_h, shapes.tile), min(latent_w, shapes.tile)
    pixels = latent_h * latent_w * factor * factor
    per_pixel = DECODER_BYTES_PER_PIXEL if component == "vae_decoder" else ENCODER_BYTES_PER_PIXEL
    mid_attention = DECODER_ATTENTION_COPIES * (latent_h * latent_w) ** 2 * FLOAT
    return int(pixels * per_pixel + mid_attention)


def resident_bytes(file_bytes: int, backend: str, compressed: bool) -> int:
    """What a loaded session keeps of a graph's `file_bytes`."""
    factor = RESIDENT_FACTOR[backend]
    if backend == "openvino" and compressed:
        factor *= OPENVINO_INT8_EXPANSION
    return int(file_bytes * factor)


def loading_bytes(path: Path, file_bytes: int, backend: str) -> int:
    """Peak while a session loads the graph: twice-held weights when they sit in model.onnx."""
    inline = backend == "ort" and path.suffix == ".onnx" and path.stat().st_size == file_bytes
    return int(file_bytes * (INLINE_LOAD_FACTOR if inline else RESIDENT_FACTOR[backend]))


def estimate(graphs: dict[str, Path], backend: str, *, shapes: Shapes, low_shapes: Shapes,
             unet: UNetShape | None, compressed: frozenset[str] = frozenset(),
             halved: frozenset[str] = frozenset()) -> MemoryEstimate:
    """The estimate for `graphs` (component → graph file; DEEPCACHE_SHALLOW: DeepCache's shallow
    graph; CONTROLNET_ROW: a ControlNet's); `compressed` names components whose graphs hold
    int8/int4 weights, `halved` those read from a float16 copy (runtime/compile_cache.py);
    `low_shapes` are the low-memory plan's (batch 1, tiles)."""
    def rows(at: Shapes) -> tuple[ComponentEstimate, ...]:
        out = []
        for name, path in graphs.items():
            size = referenced_bytes(path) if name == DEEPCACHE_SHALLOW else graph_bytes(path)
            if name in halved:
                size //= 2  # float weights as float16
            out.append(ComponentEstimate(name, size,
                                         resident_bytes(size, backend, name in compressed),
                                         working_bytes(name, at, unet, backend),
                                         loading_bytes(path, size, backend)))
        return tuple(out)

    return MemoryEstimate(backend, BASE_BYTES[backend], rows(shapes), rows(low_shapes))


def unet_shape(folder: Path, sliced: bool, query_chunks: int = 1) -> UNetShape | None:
    """The UNet's attention levels from unet/config.json, None where the folder has no config."""
    config = folder / "unet" / "config.json"
    if not config.is_file():
        return None
    return UNetShape.from_config(read_json(config), sliced, query_chunks)
