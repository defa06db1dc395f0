"""The sizes each graph is traced and checked at, derived from the model's own config limits.

A traced graph is only as general as its checks prove (torch's tracer records Python branches
on shapes as constants), so each graph is traced at one size and checked at two others: a batch
of 2 at a square size and one image at unequal odd sides. Every size must be one the model
accepts, and small enough that checking a full-size model takes seconds:

- UNet (diffusers UNet2DConditionModel): any latent side runs; sides that are not multiples of
  its downsampling factor 2^(len(block_out_channels) − 1) take diffusers' general upsample path
  (interpolate to the skip connection's size), so tracing at such sides makes one graph serve
  every size. The square check is the native latent side (`sample_size`), capped at 32 and a
  multiple of that factor.
- MMDiT (diffusers SD3Transformer2DModel): latent sides are patch counts × `patch_size`, and
  each patch count is at most `pos_embed_max_size`, the grid its position embedding is cropped
  from (diffusers' PatchEmbed.cropped_pos_embed refuses more).
- Text: CLIP's `max_position_embeddings` tokens and a shorter prompt.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

Config = Mapping[str, Any]
Side = tuple[int, int]  # latent (height, width)

_CHECK_SIDE = 32  # the square check's latent side at most: 256 px on SD 1.5, seconds to run
# The odd check's sides: the square's ± this, made odd (25 × 39 for 32); its short side is at
# least the trace's, 2 × factor + 1, above the UNet's downsampling factor.
_ODD_SPREAD = 7
_PATCHES = 16  # the MMDiT's square check in patches at most (a 256-token image)
_ODD_PATCHES = 19  # the MMDiT's odd check: its long side in patches at most, the short one − 6
_TRACE_PATCHES = (12, 10)  # the MMDiT's trace grid at most: neither check's
_SHORT_PROMPT = 16  # tokens of the shorter text check


@dataclass(frozen=True)
class Sizes:
    """A graph's trace size (batch 2) and its checks, (batch, latent side) each."""

    trace: Side
    checks: tuple[tuple[int, Side], ...]


def downsampling(unet: Config) -> int:
    """How many times the UNet halves its input (diffusers: one halving per block but the last)."""
    return 2 ** (len(unet["block_out_channels"]) - 1)


def unet_sizes(unet: Config) -> Sizes:
    """Trace at odd sides above the downsampling factor; check the native square and odd sides."""
    factor = downsampling(unet)
    square = max(factor, min(int(unet["sample_size"]), _CHECK_SIDE) // factor * factor)
    odd = (max(2 * factor + 1, square - _ODD_SPREAD) | 1, (square + _ODD_SPREAD) | 1)
    return Sizes(trace=(2 * factor + 1, 2 * factor + 3), checks=((2, (square, square)), (1, odd)))


def transformer_sizes(transformer: Config) -> Sizes:
    """Patch grids within pos_embed_max_size (and the native grid for the square check), in
    latent sides: one odd grid of unequal sides so the cropped position grid is exercised."""
    patch = int(transformer.get("patch_size", 2))
    limit = int(transformer.get("pos_embed_max_size") or _ODD_PATCHES)  # None: no crop
    native = int(transformer["sample_size"]) // patch
    square = max(1, min(_PATCHES, limit, native))
    top = min(_ODD_PATCHES, limit)
    long = top if top % 2 else top - 1
    short = max(1, long - 6)
    trace = (min(_TRACE_PATCHES[0], limit), min(_TRACE_PATCHES[1], limit))
    return Sizes(trace=_latent(trace, patch),
                 checks=((2, _latent((square, square), patch)), (1, _latent((short, long), patch))))


def text_lengths(text_encoder: Config) -> tuple[int, int]:
    """(full, short) prompt lengths in tokens: the encoder's position table and a short prompt."""
    full = int(text_encoder.get("max_position_embeddings", 77))
    return full, min(_SHORT_PROMPT, full)


def _latent(patches: Side, patch: int) -> Side:
    return patches[0] * patch, patches[1] * patch
