"""Tiled VAE decode with image-wide GroupNorm statistics, from the split decoder graphs.

export/split_vae_decoder.py splits vae_decoder into a head (up to the mid block's output, with
its attention) and a tail (the upsampling blocks) whose GroupNorms (Wu & He, 2018) take their
mean and variance as inputs and return the window's weighted sums. The head runs once on the
whole latent, so the mid-block attention sees the whole image; the tail runs on overlapping
windows (runtime/vae/tiled.py's placement and blend) in one or more passes (SHARED_PASSES):

1. every window with its own statistics, returning its sums over its core (the latent pixels
   nearer its centre than any other window's, so every pixel counts once);
2. every window normalised with the image-wide statistics those sums give, returning its sums
   again (now from activations close to the untiled decode's), and so on: the last pass's
   blended output is the image.

Each window's sums are taken about the mean it normalised with and pooled in float64 (Chan,
Golub & LeVeque's parallel variance), so a large mean does not cancel the variance away.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from sdrt.runtime.components import VaeDecoder
from sdrt.runtime.session import Session
from sdrt.runtime.vae.exact_tiled import StagedGraphs, StagedVaeDecoder, StagePlan, stage_plan
from sdrt.runtime.vae.tiled import TiledVaeDecoder, Tiling, run_tiled, tile_starts

log = logging.getLogger(__name__)

# Tail passes over all windows: the first with each window's own statistics, each next one with
# the image-wide statistics the previous pass measured; the last pass's output is the image.
# Measured against the untiled decode (benchmarks/RESULTS.md): the embedded VAE at 1024² gave
# 28.1 dB with 1 pass, 30.4 with 2, 36.3 with 3, 40.0 with 4, then 39.2 and 33.0 (exact
# statistics: 67.8); but SD 1.5's random-weight VAE at 512² gave 18.7, 17.2 and 6.8 dB with 2, 3
# and 4 passes against 31.4 for per-window tiling, and the tiny random SD VAE 39.0 (1 pass), 32.6
# (3 passes) against 35.0. The iteration is not a contraction for every VAE, so the default is
# the one pass that never measured worse than per-window tiling (the head's whole-image
# attention is its gain); more passes are opt-in (`passes`) until a convergent scheme exists.
SHARED_PASSES = 1
# Statistics estimated instead from one untiled tail pass over the head's features average-pooled
# by this factor (0: off), then one tiled pass with them fixed. Measured (benchmarks/RESULTS.md):
# the embedded (trained) VAE at 1024² gave 47.6 dB with factor 2 and 37.9 with 4 (exact
# statistics 60.5); SD 1.5's random-weight VAE at 512² 31.6 with 2 and 21.5 with 4 (per-window
# 31.4; exact 57.1): random weights' activations do not survive pooling. Opt-in until a trained
# full-size VAE is measured; the pass holds the tail at 1/factor² of the image.
STATISTICS_DOWNSAMPLE = 0
SPLIT_COMPONENTS = ("vae_decoder_head", "vae_decoder_tail")
DEFAULT_TILING = Tiling()


def split_graphs(folder: Path, decoder_graph: Path) -> tuple[Path, Path] | None:
    """The head and tail graphs export/split_vae_decoder.py wrote from the folder's fp32
    decoder; None where there are none or the decoder that runs is another graph (a variant's)."""
    paths = tuple(folder / name / "model.onnx" for name in SPLIT_COMPONENTS)
    if decoder_graph != folder / "vae_decoder" / "model.onnx" or not all(
            path.is_file() for path in paths):
        return None
    return paths


def tiled_decode_graphs(folder: Path, decoder_graph: Path,
                        ) -> tuple[StagePlan | None, tuple[Path, Path] | None]:
    """What the folder's tiled decode runs on, best first: (the stage plan, None) for the exact
    staged decode; (None, the split graphs) for estimated statistics; (None, None) for
    per-window tiling."""
    stages = stage_plan(folder, decoder_graph)
    return stages, None if stages else split_graphs(folder, decoder_graph)


def tiled_decoder(decoder: VaeDecoder, split: tuple[Session, Session] | None,
                  tiling: Tiling = DEFAULT_TILING, factor: int = 8,
                  passes: int = SHARED_PASSES,
                  downsample: int = STATISTICS_DOWNSAMPLE,
                  stages: StagedGraphs | None = None) -> VaeDecoder:
    """The tiled decoder: exact, stage by stage, over the stage graphs where given
    (runtime/vae/exact_tiled.py); else (with a log line) sharing estimated GroupNorm statistics over
    the split graphs' (head, tail) sessions, or normalising per window (runtime/vae/tiled.py)."""
    if stages is not None:
        return StagedVaeDecoder(decoder, stages, tiling)
    if split is None:
        log.info("VAE decoder not split (python -m sdrt.export.split_vae_decoder MODEL_DIR): "
                 "tiles normalise over themselves, a few dB from the untiled decode")
        return TiledVaeDecoder(decoder, tiling, factor)
    log.info("VAE decoder split without stage graphs (re-run python -m "
             "sdrt.export.split_vae_decoder MODEL_DIR for the exact tiled decode): GroupNorm "
             "statistics are estimated")
    return SharedNormVaeDecoder(decoder, *split, tiling, factor, passes, downsample)


def core_masks(size: int, tile: int, overlap: int) -> list[np.ndarray]:
    """Per window along one axis, 1 where a pixel is nearer that window's middle than any
    other's (the boundary halfway through each overlap), 0 elsewhere: the masks sum to 1."""
    length = min(tile, size)
    starts = tile_starts(size, length, overlap)
    bounds = [0] + [(b + a + length) // 2 for a, b in zip(starts, starts[1:], strict=False)]
    bounds.append(size)
    masks = []
    for i, start in enumerate(starts):
        mask = np.zeros(length, np.float32)
        mask[max(bounds[i] - start, 0): bounds[i + 1] - start] = 1
        masks.append(mask)
    return masks


class Statistics:
    """Per-group mean and variance (B, S) as the tail graph takes them; `add` collects windows'
    `norm_sums` (B, 4, S): Σw, Σw·(x−m), Σw·(x−m)², m."""

    def __init__(self, mean: np.ndarray, var: np.ndarray) -> None:
        self.mean, self.var = mean, var
        self._windows: list[np.ndarray] = []

    def add(self, sums: np.ndarray) -> None:
        self._windows.append(sums.astype(np.float64))

    def combined(self) -> Statistics:
        """The image-wide statistics of the added windows (Chan, Golub & LeVeque's pairwise
        update): each window's mean and M2 about its own mean, then pooled."""
        count, first, second, centre = np.moveaxis(np.stack(self._windows), 2, 0)  # (W, B, S)
        with np.errstate(invalid="ignore", divide="ignore"):  # windows with an empty core
            means = np.where(count > 0, centre + first / count, 0)
        total = count.sum(axis=0)
        mean = (count * means).sum(axis=0) / total
        m2 = (second - np.where(count > 0, first**2 / np.maximum(count, 1e-30), 0)
              + count * (means - mean) ** 2).sum(axis=0)
        return Statistics(mean.astype(np.float32), np.maximum(m2 / total, 0).astype(np.float32))


class SharedNormVaeDecoder(VaeDecoder):
    """A VaeDecoder (same call and output) over the head/tail graphs: the head on the whole
    latent, the tail on windows sharing image-wide GroupNorm statistics (module doc)."""

    def __init__(self, decoder: VaeDecoder, head: Session, tail: Session,
                 tiling: Tiling = DEFAULT_TILING, factor: int = 8,
                 passes: int = SHARED_PASSES,
                 downsample: int = STATISTICS_DOWNSAMPLE) -> None:
        super().__init__(decoder.session)
        self.head, self.tail = head, tail
        self.tiling, self.factor, self.passes = tiling.validate(), factor, passes
        self.downsample = downsample
        self.groups = tail.inputs["norm_mean"].shape[1]

    def __call__(self, latents: np.ndarray) -> np.ndarray:
        if self.tiling.tile >= max(latents.shape[2:]):  # one window covers it
            return super().__call__(latents)
        features = self.head.run({"latent_sample": latents})["features"]  # (B, C, h, w)
        if self.downsample:
            stats = self._pooled_statistics(features)
            return run_tiled(self._runner(features, stats, local=False), features, self.tiling,
                             self.factor)
        zeros = np.zeros((len(features), self.groups), np.float32)
        stats = Statistics(zeros, np.ones_like(zeros))
        for step in range(self.passes - 1):  # statistics passes, outputs dropped
            measured = Statistics(stats.mean, stats.var)
            _each_window(self._runner(features, measured, local=step == 0), features,
                         self.tiling)
            stats = measured.combined()
        final = self._runner(features, stats, local=self.passes == 1)
        return run_tiled(final, features, self.tiling, self.factor)

    def _pooled_statistics(self, features: np.ndarray) -> Statistics:
        """Image-wide statistics from the tail run once, untiled, on `features` average-pooled
        by `downsample` (edges that do not fill a pooling cell are dropped)."""
        d = self.downsample
        batch, channels, height, width = features.shape
        pooled = features[:, :, : height // d * d, : width // d * d].reshape(
            batch, channels, height // d, d, width // d, d).mean(axis=(3, 5))
        zeros = np.zeros((batch, self.groups), np.float32)
        measured = Statistics(zeros, np.ones_like(zeros))
        measured.add(self.tail.run({
            "features": pooled, "norm_mean": zeros, "norm_var": np.ones_like(zeros),
            "local_statistics": np.float32([1]),
            "statistics_weight": np.ones((1, 1, *pooled.shape[2:]), np.float32)})["norm_sums"])
        return measured.combined()

    def _runner(self, features: np.ndarray, stats: Statistics, local: bool):
        """The tail on one window; windows must come in run_tiled's order (rows, then columns)
        for each to get its core mask."""
        _, _, height, width = features.shape
        masks = iter([(row, col) for row in core_masks(height, self.tiling.tile,
                                                       self.tiling.overlap)
                      for col in core_masks(width, self.tiling.tile, self.tiling.overlap)])

        def run(window: np.ndarray) -> np.ndarray:
            row, col = next(masks)
            out = self.tail.run({"features": window, "norm_mean": stats.mean,
                                 "norm_var": stats.var,
                                 "local_statistics": np.float32([local]),
                                 "statistics_weight": np.outer(row, col)[None, None]})
            stats.add(out["norm_sums"])
            return out["sample"]  # (B, 3, 8h, 8w)

        return run


def _each_window(run, features: np.ndarray, tiling: Tiling) -> None:
    """`run` on every window, in run_tiled's order."""
    _, _, height, width = features.shape
    tile_h, tile_w = min(tiling.tile, height), min(tiling.tile, width)
    for y in tile_starts(height, tile_h, tiling.overlap):
        for x in tile_starts(width, tile_w, tiling.overlap):
            run(features[:, :, y: y + tile_h, x: x + tile_w])
