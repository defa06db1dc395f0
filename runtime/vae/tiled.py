"""Tiled VAE decode and encode: bounded memory for any image size, with no seams.

The VAE's activations grow with the image (the SD decoder's last blocks hold 128 channels at full
resolution, and its mid-block attention a tokens² score tensor), so a 1024×1024 decode needs
gigabytes. Tiling runs the graph on overlapping windows of one fixed size (one compiled shape for
OpenVINO) and blends the windows' outputs with weights that ramp linearly across each overlap,
from 0 at a window's edge that has a neighbour to 1 where the neighbour's overlap ends, then
divides by the summed weights. The decoder tiles in latent space, the encoder in pixel space.
What tiling cannot reproduce exactly is GroupNorm's whole-image statistics: each window
normalises over itself, so windows should stay large (benchmarks/RESULTS.md measures the PSNR of
tiled against untiled decodes); runtime/vae/exact_tiled.py decodes exactly, GroupNorm by GroupNorm,
where the model folder has the stage graphs, runtime/vae/pooled_norm.py estimates shared statistics
where it has only the split decoder graphs, and both fall back to this decoder otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sdrt.runtime.components import VaeDecoder, VaeEncoder
from sdrt.runtime.errors import InputError

# Defaults in latent pixels (×8 for SD's VAE): 48-latent windows (384 px) overlapping by 16
# (128 px): one window's working memory is 0.55× a 512×512 decode's (416 vs 751 MB). Blending
# hides the seams but not GroupNorm's per-window statistics: a 1024×1024 decode so tiled was
# 24–28 dB from the untiled one (benchmarks/RESULTS.md), short of the 35 dB aimed for.
DEFAULT_TILE = 48
DEFAULT_OVERLAP = 16


@dataclass(frozen=True)
class Tiling:
    """Window side and overlap, both in the input's pixels (latent pixels for the decoder)."""

    tile: int = DEFAULT_TILE
    overlap: int = DEFAULT_OVERLAP

    def validate(self) -> Tiling:
        if self.tile < 1 or not 0 <= self.overlap < self.tile:
            raise InputError(f"VAE tiles need 0 ≤ overlap < tile, got tile {self.tile}, "
                             f"overlap {self.overlap}")
        return self

    def scaled(self, factor: int) -> Tiling:
        """The same tiling in units `factor` times larger (latent → pixel)."""
        return Tiling(self.tile * factor, self.overlap * factor)


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Window starts covering [0, size), evenly spread, neighbours overlapping by ≥ `overlap`."""
    if size <= tile:
        return [0]
    count = -(-(size - overlap) // (tile - overlap))  # ceil
    return [round(i * (size - tile) / (count - 1)) for i in range(count)]


def edge_weights(starts: list[int], index: int, length: int) -> np.ndarray:
    """1-D blend weights of window `index`: linear ramps across its overlaps with neighbours."""
    weights = np.ones(length, dtype=np.float32)
    start = starts[index]
    if index > 0:  # overlap with the previous window: ramp up from its end
        shared = starts[index - 1] + length - start
        weights[:shared] = np.minimum(weights[:shared], (np.arange(shared) + 0.5) / shared)
    if index < len(starts) - 1:  # overlap with the next window: ramp down to its start
        shared = start + length - starts[index + 1]
        ramp = (np.arange(shared)[::-1] + 0.5) / shared
        weights[length - shared:] = np.minimum(weights[length - shared:], ramp)
    return weights


def run_tiled(run, x: np.ndarray, tiling: Tiling, scale: float) -> np.ndarray:
    """`run` over overlapping windows of x (B, C, H, W), blended; its output is `scale` times the
    window's size (8 for a decoder, 1/8 for an encoder)."""
    _, _, height, width = x.shape
    tile_h, tile_w = min(tiling.tile, height), min(tiling.tile, width)
    rows = tile_starts(height, tile_h, tiling.overlap)
    cols = tile_starts(width, tile_w, tiling.overlap)
    out_h, out_w = round(tile_h * scale), round(tile_w * scale)
    total = weight_sum = None
    for i, y in enumerate(rows):
        wy = edge_weights([round(r * scale) for r in rows], i, out_h)
        for j, x0 in enumerate(cols):
            part = run(x[:, :, y : y + tile_h, x0 : x0 + tile_w])  # (B, C', out_h, out_w)
            if total is None:
                total = np.zeros((*part.shape[:2], round(height * scale), round(width * scale)),
                                 dtype=np.float32)
                weight_sum = np.zeros(total.shape[2:], dtype=np.float32)
            wx = edge_weights([round(c * scale) for c in cols], j, out_w)
            weight = wy[:, None] * wx[None, :]  # (out_h, out_w)
            oy, ox = round(y * scale), round(x0 * scale)
            total[:, :, oy : oy + out_h, ox : ox + out_w] += part * weight
            weight_sum[oy : oy + out_h, ox : ox + out_w] += weight
    return total / weight_sum


class TiledVaeDecoder(VaeDecoder):
    """VaeDecoder that decodes overlapping latent windows and blends them (same call);
    `factor` is the VAE's scale (manifest `vae_scale_factor`, 8 for SD)."""

    def __init__(self, decoder: VaeDecoder, tiling: Tiling = Tiling(), factor: int = 8) -> None:
        super().__init__(decoder.session)
        self.tiling = tiling.validate()
        self.factor = factor

    def __call__(self, latents: np.ndarray) -> np.ndarray:
        if self.tiling.tile >= max(latents.shape[2:]):  # one window covers it
            return super().__call__(latents)
        return run_tiled(super().__call__, latents, self.tiling, self.factor)


class TiledVaeEncoder(VaeEncoder):
    """VaeEncoder over overlapping pixel windows; mean and std blended alike (same call)."""

    def __init__(self, encoder: VaeEncoder, tiling: Tiling = Tiling(), factor: int = 8) -> None:
        super().__init__(encoder.session)
        self.pixel_tiling = tiling.validate().scaled(factor)
        self.factor = factor

    def posterior(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self.pixel_tiling.tile >= max(images.shape[2:]):
            return super().posterior(images)
        encode = super().posterior

        def both(window: np.ndarray) -> np.ndarray:
            mean, std = encode(window)
            return np.concatenate([mean, std], axis=1)  # (B, 2C, h, w)

        mean, std = np.split(run_tiled(both, images, self.pixel_tiling, 1 / self.factor), 2,
                             axis=1)
        return mean, std
