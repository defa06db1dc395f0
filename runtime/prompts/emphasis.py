"""AUTOMATIC1111's emphasis modes: how token weights act on a chunk's hidden states.

- "original" (A1111's default): each token's hidden state times its weight, then the whole
  chunk rescaled so that its mean equals the mean before weighting;
- "no-norm": the multiplication alone;
- "none": weights are not read (A1111 then also reads brackets as literal text, which the
  chunking does: chunks.chunk_prompt's `attention`).

Applied per 77-token chunk and per text encoder, after the encoder (on the hidden state the
UNet reads), as A1111 does.
"""

from __future__ import annotations

import numpy as np

from sdrt.runtime.errors import InputError

EMPHASES = ("original", "none", "no-norm")


def apply_emphasis(z: np.ndarray, multipliers: np.ndarray, mode: str) -> np.ndarray:
    """One chunk's hidden states z (1, 77, D) weighted by `multipliers` (77,) as `mode` says."""
    if mode not in EMPHASES:
        raise InputError(f"unknown emphasis '{str(mode)[:20]}'; choose one of: "
                         f"{', '.join(EMPHASES)}")
    if mode == "none" or np.all(multipliers == 1.0):
        return z  # z·1 rescaled by mean/mean is z again: skip the arithmetic
    weighted = z * multipliers.astype(z.dtype)[None, :, None]  # (1, 77, D)
    if mode == "no-norm":
        return weighted
    # Means in float64: the ratio multiplies every value, so its own rounding should not add up.
    before, after = z.mean(dtype=np.float64), weighted.mean(dtype=np.float64)
    return weighted * np.float32(before / after)
