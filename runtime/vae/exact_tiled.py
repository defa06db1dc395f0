"""Exact tiled VAE decode: the decoder's tail stage by stage, each GroupNorm over the whole image.

export/vae_stages.py cuts the decoder's tail (after the mid block) at every GroupNorm (Wu & He,
2018) into stage graphs; export/split_vae_decoder.py's head runs the mid block (its attention
with chunked queries) once on the whole latent. Here every tensor that crosses a cut is kept as a
whole-image float32 map; before each stage its GroupNorm's per-group mean and variance are
reduced over the whole map in float64, and the stage runs over windows that extend `halo` pixels
past the part they keep (its convolutions' and upsampling's reach), so the kept pixels are what
the untiled graph computes: the decode equals the untiled one up to float rounding, whatever the
weights. Memory grows with the image, unlike a one-window decode's: the live maps (two or three;
for SD's VAE at most 512 float32 channels' worth per output pixel, 2 KiB) plus one window's
working memory; SD 1.5's decode peaked at 666 MiB at 512² and 2.15 GiB at 1024²
(runtime/memory/estimate.py estimates it for the low-memory plan).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sdrt.runtime.components import VaeDecoder
from sdrt.runtime.errors import InputError, ModelError
from sdrt.runtime.session import Session
from sdrt.runtime.vae.tiled import Tiling, tile_starts

STAGES_DIR = "vae_decoder_stages"
PLAN_FILE = "stages.json"
PLAN_FORMAT = 1
HEAD = "vae_decoder_head"
# Window side in a stage's output pixels (halo included; an upsampling stage's windows are half
# as wide in its input). SD's decoder's widest full-resolution stage holds 256 channels: a 128²
# window is 16 MiB per tensor, small beside a 512² decode's whole-image maps (128 MiB per 128
# channels); larger windows cut the halo's overlap (2–4 px a side) and the calls.
STAGE_WINDOW = 128
# Latents no larger than one window of the tiled decoder's default tiling are decoded untiled.
DEFAULT_TILING = Tiling()
# The float64 copy group_statistics works on: a few groups at a time, so the reduction adds this
# much at most beside the maps (one SD group at 1024², 4 channels, is 32 MiB in float64).
STATISTICS_CHUNK_BYTES = 32 * 2**20


@dataclass(frozen=True)
class StagePlan:
    """The stages.json that export/vae_stages.py wrote, with the graphs' paths."""

    head: Path
    stages: tuple[dict, ...]
    graphs: tuple[Path, ...]
    output: str

    def open(self, opener: Callable[[Path], Session]) -> StagedGraphs:
        """The head's and every stage's session from `opener` (path → Session)."""
        return StagedGraphs(opener(self.head), tuple(opener(path) for path in self.graphs),
                            self)


@dataclass(frozen=True)
class StagedGraphs:
    head: Session
    stages: tuple[Session, ...]
    plan: StagePlan


def stage_plan(folder: Path, decoder_graph: Path) -> StagePlan | None:
    """The folder's stage plan; None where it has none or the decoder that runs is another
    graph (a variant's)."""
    plan_path, head = folder / STAGES_DIR / PLAN_FILE, folder / HEAD / "model.onnx"
    if decoder_graph != folder / "vae_decoder" / "model.onnx" or not (
            plan_path.is_file() and head.is_file()):
        return None
    try:
        plan = json.loads(plan_path.read_text())
        stages = tuple(plan["stages"])
        graphs = tuple(plan_path.parent / stage["file"] for stage in stages)
        output = plan["output"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ModelError(f"{STAGES_DIR}/{PLAN_FILE} is malformed ({exc}); re-run "
                         "python -m sdrt.export.split_vae_decoder") from exc
    if plan.get("format") != PLAN_FORMAT or any(
            Path(stage["file"]).name != stage["file"] or not path.is_file()
            for stage, path in zip(stages, graphs, strict=True)):
        raise ModelError(f"{STAGES_DIR}/{PLAN_FILE}: a stage graph is missing or the plan's "
                         f"format is not {PLAN_FORMAT}; re-run python -m "
                         "sdrt.export.split_vae_decoder")
    return StagePlan(head, stages, graphs, output)


def group_statistics(x: np.ndarray, groups: int, epsilon: float) -> tuple[np.ndarray, ...]:
    """Per-group mean and 1/sqrt(var + ε) (B, G) of x (B, C, H, W) as GroupNorm takes them,
    accumulated in float64 a few groups at a time (STATISTICS_CHUNK_BYTES, not the map's)."""
    grouped = x.reshape(len(x), groups, -1)  # (B, G, C/G·H·W)
    mean, var = np.empty(grouped.shape[:2]), np.empty(grouped.shape[:2])
    step = max(1, STATISTICS_CHUNK_BYTES // (grouped.shape[2] * 8))
    for b in range(grouped.shape[0]):
        for g in range(0, groups, step):
            centred = grouped[b, g: g + step].astype(np.float64)  # (step, N)
            mean[b, g: g + step] = centred.mean(axis=1)
            centred -= mean[b, g: g + step, None]
            var[b, g: g + step] = np.einsum("gn,gn->g", centred, centred) / centred.shape[1]
    return mean.astype(np.float32), (1 / np.sqrt(var + epsilon)).astype(np.float32)


def windows(size: int, side: int, halo: int) -> list[tuple[int, int, int, int]]:
    """Along one axis: (start, end) of each window and (start, end) of the part it keeps; the
    kept parts tile [0, size) and lie `halo` inside their window except at the image's edges."""
    side = min(side, size)
    if side < size and side <= 2 * halo:
        raise InputError(f"VAE stage windows of {side} px cannot keep anything inside a halo "
                         f"of {halo} px; use larger windows")
    starts = tile_starts(size, side, 2 * halo)
    kept, out = 0, []
    for i, start in enumerate(starts):
        end = start + side - halo if i < len(starts) - 1 else size
        out.append((start, start + side, kept, end))
        kept = end
    return out


class StagedVaeDecoder(VaeDecoder):
    """A VaeDecoder (same call and output) over the head and stage graphs (module doc)."""

    def __init__(self, decoder: VaeDecoder, graphs: StagedGraphs, tiling: Tiling = DEFAULT_TILING,
                 window: int = STAGE_WINDOW) -> None:
        super().__init__(decoder.session)
        self.graphs, self.tiling, self.window = graphs, tiling.validate(), window
        stages = graphs.plan.stages
        self.last_use = {name: i for i, stage in enumerate(stages) for name in stage["inputs"]}

    def __call__(self, latents: np.ndarray) -> np.ndarray:
        if self.tiling.tile >= max(latents.shape[2:]):  # one window of the untiled decoder
            return super().__call__(latents)
        maps = {"features": self.graphs.head.run({"latent_sample": latents})["features"]}
        for i, (stage, session) in enumerate(zip(self.graphs.plan.stages, self.graphs.stages,
                                                 strict=True)):
            maps.update(self._run_stage(stage, session, maps))
            for name in stage["inputs"]:
                if self.last_use[name] == i:
                    del maps[name]
        return maps[self.graphs.plan.output]  # (B, 3, H, W)

    def _run_stage(self, stage: dict, session: Session,
                   maps: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One stage over windows of its input maps; its whole-image output maps."""
        feeds = {}
        if stage["norm"]:
            norm = stage["norm"]
            feeds[norm["mean"]], feeds[norm["inv_std"]] = group_statistics(
                maps[norm["input"]], norm["groups"], norm["epsilon"])
        inputs = [maps[name] for name in stage["inputs"]]
        height, width = inputs[0].shape[2:]
        if any(x.shape[2:] != (height, width) for x in inputs):
            raise ModelError(f"VAE stage {stage['file']}: its inputs differ in size")
        halo, out = stage["halo"], {}
        side = self.window // max(stage["outputs"].values())  # in the stage's input pixels
        for y0, y1, keep_y0, keep_y1 in windows(height, side, halo):
            for x0, x1, keep_x0, keep_x1 in windows(width, side, halo):
                window = {name: np.ascontiguousarray(x[:, :, y0:y1, x0:x1])
                          for name, x in zip(stage["inputs"], inputs, strict=True)}
                result = session.run(feeds | window)
                for name, scale in stage["outputs"].items():
                    part = result[name]  # (B, C, scale·(y1 − y0), scale·(x1 − x0))
                    if name not in out:
                        out[name] = np.empty((*part.shape[:2], height * scale, width * scale),
                                             np.float32)
                    out[name][:, :, keep_y0 * scale: keep_y1 * scale,
                              keep_x0 * scale: keep_x1 * scale] = part[
                        :, :, (keep_y0 - y0) * scale: (keep_y1 - y0) * scale,
                        (keep_x0 - x0) * scale: (keep_x1 - x0) * scale]
        return out
