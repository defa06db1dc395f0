"""The residuals a ControlNet adds to the UNet's skip connections (Zhang et al. 2023, §3.2).

diffusers' `UNet2DConditionModel` takes `down_block_additional_residuals` (one per skip sample, in
the order the down path pushes them) and `mid_block_additional_residual`. sdrt's UNet graphs take
them as inputs named `down_block_residual_0 … down_block_residual_{n-1}` and `mid_block_residual`,
and a ControlNet graph returns them under the same names. The skip samples are: conv_in's output
(level 0), then per down block b its `layers_per_block` resnets (level b) and, for every block but
the last, its stride-2 downsampler (level b+1); the mid residual sits at the last block's level.
A level-k map is the latent ceil-halved k times (3×3 conv, stride 2, padding 1).

Also here, as pure functions: diffusers' guess-mode scales (`torch.logspace(-1, 0, n_down + 1)`,
the curve A1111 ControlNet's soft injection `0.825 ** (12 - j)` approximates) and the per-net keep
rule of StableDiffusionControlNetPipeline for model call i of n; and the levels of a model
folder's UNet, read from its unet/config.json.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sdrt.runtime.errors import ModelError

DOWN_RESIDUAL = "down_block_residual_{}"
MID_RESIDUAL = "mid_block_residual"


def residual_names(n: int) -> tuple[str, ...]:
    """The residual tensor names for n down residuals: downs in order, then mid."""
    return tuple(DOWN_RESIDUAL.format(j) for j in range(n)) + (MID_RESIDUAL,)


def _per_block(value: Any, blocks: int) -> list[int]:
    """A config entry that is an int or one int per down block, as a per-block list."""
    if isinstance(value, int):
        return [value] * blocks
    return [int(v) for v in value]


def residual_levels(unet_config: Mapping[str, Any]) -> tuple[int, ...]:
    """Each residual's level (times halved), downs then mid, from a UNet's config.json."""
    blocks = len(unet_config["down_block_types"])
    layers = _per_block(unet_config.get("layers_per_block", 2), blocks)
    levels = [0]
    for b in range(blocks):
        levels += [b] * layers[b]
        if b < blocks - 1:
            levels.append(b + 1)
    return (*levels, blocks - 1)


def residual_channels(unet_config: Mapping[str, Any]) -> tuple[int, ...]:
    """Each residual's channel count, downs then mid, from a UNet's config.json."""
    widths = [int(c) for c in unet_config["block_out_channels"]]
    layers = _per_block(unet_config.get("layers_per_block", 2), len(widths))
    channels = [widths[0]]
    for b, width in enumerate(widths):
        channels += [width] * layers[b]
        if b < len(widths) - 1:
            channels.append(width)
    return (*channels, widths[-1])


def level_size(size: int, level: int) -> int:
    """A latent side after `level` stride-2 convolutions with padding 1 (ceil-halving)."""
    for _ in range(level):
        size = -(-size // 2)
    return size


def residual_shapes(
    levels: Sequence[int], channels: Sequence[int], batch: int, latent_hw: tuple[int, int]
) -> dict[str, tuple[int, int, int, int]]:
    """Name → (batch, channels, h, w) of every residual for a latent of size latent_hw."""
    if len(levels) != len(channels):
        raise ValueError(f"{len(levels)} residual levels but {len(channels)} channel counts")
    h, w = latent_hw
    names = residual_names(len(levels) - 1)
    return {
        name: (batch, int(c), level_size(h, k), level_size(w, k))
        for name, k, c in zip(names, levels, channels, strict=True)
    }


def zero_residuals(
    levels: Sequence[int], channels: Sequence[int], batch: int, latent_hw: tuple[int, int]
) -> dict[str, np.ndarray]:
    """Zero residuals (np.zeros: pages never written cost no memory) for a UNet with no control."""
    shapes = residual_shapes(levels, channels, batch, latent_hw)
    return {name: np.zeros(shape, np.float32) for name, shape in shapes.items()}


def guess_scales(n_down: int) -> np.ndarray:
    """diffusers' guess-mode scale per residual (downs, then mid = 1): logspace(-1, 0, n_down+1)."""
    return np.logspace(-1.0, 0.0, n_down + 1).astype(np.float32)


def keep(i: int, n: int, start: float, end: float) -> float:
    """1.0 when a net acts at model call i of n, given guidance start/end (diffusers), else 0."""
    return 1.0 - float(i / n < start or (i + 1) / n > end)


def unet_levels(folder: Path) -> tuple[int, ...]:
    """The residual levels of a model folder's UNet, from `unet/config.json` (export copies it
    there); () where the folder has none (an SD 3 transformer, an old hand-made folder)."""
    path = folder / "unet" / "config.json"
    if not path.is_file():
        return ()
    try:
        return residual_levels(json.loads(path.read_text("utf-8")))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelError(f"unet/config.json cannot give the ControlNet residual levels: "
                         f"{exc}") from None
