"""Variation seeds and seed resize: AUTOMATIC1111's starting noise (`create_random_tensors`,
since 1.6 `rng.ImageRNG.first`), for `subseed`, `subseed_strength` and `seed_resize_from`.

Per image i, with seed s + i and subseed u + i, on the latent shape (C, h, w):

1. The image's generator draws its noise row as usual (so later draws, e.g. an ancestral
   sampler's, continue the same stream whatever the variation).
2. With seed resize from (W, H), the seed's noise is drawn again, from a fresh generator, at the
   latent shape of that size (C, H / f, W / f); otherwise it is the row of step 1.
3. With a strength > 0, the subseed's noise at that shape (a fresh generator's first draw) is
   mixed in by spherical linear interpolation (Shoemake 1985) at the strength: 0 keeps the
   seed's noise, 1 gives the subseed's.
4. With seed resize, that noise is pasted centred into the row of step 1 (cropped centred when
   it is the larger).

A1111's slerp works on one image's (C, h, w) noise with the norms and dot products taken over the
rows axis (h), one angle per channel and column; where the two are nearly parallel (mean dot
above 0.9995) it falls back to linear interpolation.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from sdrt.runtime.errors import InputError
from sdrt.runtime.rng import NoiseGenerator, make_generator, randn_rows

if TYPE_CHECKING:
    from sdrt.runtime.img2img import NoiseRows
    from sdrt.runtime.request import GenerationRequest

MAX_SEED = 2**32 - 1  # the request's seed range, as A1111 and diffusers users pass seeds
MIN_RESIZE = 8  # pixels: the smallest side whose noise has a latent row or column
PARALLEL_DOT = 0.9995  # A1111's threshold below which slerp's angle is well defined


def slerp(strength: float, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """A1111's slerp of two (C, h, w) noises: norms and dots over axis 1, per (channel, column)."""
    low_unit = low / np.linalg.norm(low, axis=1, keepdims=True)
    high_unit = high / np.linalg.norm(high, axis=1, keepdims=True)
    dot = (low_unit * high_unit).sum(axis=1)  # (C, w)
    if dot.mean() > PARALLEL_DOT:
        return (low * (1.0 - strength) + high * strength).astype(np.float32)
    omega = np.arccos(dot)
    sine = np.sin(omega)
    low_weight = (np.sin((1.0 - strength) * omega) / sine)[:, None]  # (C, 1, w)
    high_weight = (np.sin(strength * omega) / sine)[:, None]
    return (low_weight * low + high_weight * high).astype(np.float32)


def paste_centred(noise: np.ndarray, into: np.ndarray) -> np.ndarray:
    """`noise` (C, h0, w0) put centred into a copy of `into` (C, h, w), each cropped centred
    where it is the larger (A1111's seed resize)."""
    out = into.copy()
    spans = []
    for small, big in zip(noise.shape[1:], into.shape[1:], strict=True):
        offset = (big - small) // 2
        length = small if offset >= 0 else small + 2 * offset
        spans.append((max(offset, 0), max(-offset, 0), length))
    (ty, sy, h), (tx, sx, w) = spans
    out[:, ty:ty + h, tx:tx + w] = noise[:, sy:sy + h, sx:sx + w]
    return out


@dataclass(frozen=True)
class Variation:
    """A resolved request's variation: what `rows` mixes into each image's starting noise."""

    generator: str  # the request's generator kind (runtime/rng.py)
    seed: int
    subseed: int | None
    strength: float
    resize_from: tuple[int, int] | None  # latent (h, w) of the seed's noise; None: the run's

    def rows(self, generators: Sequence[NoiseGenerator], shape: tuple[int, ...]) -> np.ndarray:
        """Starting noise (B, C, h, w), row i from generators[i] varied as the module says."""
        base = randn_rows(generators, shape)  # (B, C, h, w): every generator draws its row
        out = []
        for i, row in enumerate(base):
            noise_shape = (shape[1], *self.resize_from) if self.resize_from else row.shape
            noise = row if noise_shape == row.shape \
                else make_generator(self.generator, self.seed + i).randn(noise_shape)
            if self.strength and self.subseed is not None:
                sub = make_generator(self.generator, self.subseed + i).randn(noise_shape)
                noise = slerp(self.strength, noise, sub)
            out.append(paste_centred(noise, row) if noise.shape != row.shape else noise)
        return np.stack(out)  # (B, C, h, w)


def variation(req: GenerationRequest, latent_scale: int) -> Variation | None:
    """A resolved request's Variation; None when it asks for none (plain `randn_rows`)."""
    resize = req.seed_resize_from
    latent = None if not resize or 0 in resize else \
        (resize[1] // latent_scale, resize[0] // latent_scale)
    if not req.subseed_strength and latent is None:
        return None
    return Variation(req.generator, req.seed, req.subseed, float(req.subseed_strength), latent)


def noise_rows(req: GenerationRequest, latent_scale: int) -> NoiseRows:
    """The starting-noise drawer for img2img.py's start functions: the request's Variation's
    rows, or plain `randn_rows`."""
    found = variation(req, latent_scale)
    return randn_rows if found is None else found.rows


def checked(subseed: object, strength: object, resize_from: object, max_side: int
            ) -> tuple[int | None, float, tuple[int, int] | None]:
    """The three fields validated (one-line InputErrors naming them), a random subseed drawn
    when a strength asks for one (A1111's -1), a (0, 0) resize read as off."""
    if isinstance(strength, bool) or not isinstance(strength, int | float) \
            or not 0.0 <= strength <= 1.0:
        raise InputError(f"subseed_strength must be a number between 0 and 1, got "
                         f"{str(strength)[:20]}")
    if subseed is not None and (isinstance(subseed, bool) or not isinstance(subseed, int)
                                or not 0 <= subseed <= MAX_SEED):
        raise InputError(f"subseed must be an integer between 0 and {MAX_SEED}, got "
                         f"{str(subseed)[:20]}")
    if subseed is None and strength > 0:
        subseed = secrets.randbelow(MAX_SEED + 1)
    return subseed, float(strength), _resize(resize_from, max_side)


def _resize(value: object, max_side: int) -> tuple[int, int] | None:
    if value is None:
        return None
    if not isinstance(value, tuple | list) or len(value) != 2 or any(
            isinstance(side, bool) or not isinstance(side, int)
            or not (side == 0 or MIN_RESIZE <= side <= max_side) for side in value):
        raise InputError(f"seed_resize_from must be (width, height), each 0 (off) or "
                         f"{MIN_RESIZE} to {max_side} pixels, got {str(value)[:40]}")
    return None if 0 in value else (int(value[0]), int(value[1]))


def infotext(req: GenerationRequest, index: int) -> dict[str, object]:
    """A1111's keys for image `index`: the variation seed and strength when the strength is
    not 0, "Seed resize from: WxH" when resizing."""
    extra: dict[str, object] = {}
    if req.subseed_strength:
        extra["Variation seed"] = req.subseed + index
        extra["Variation seed strength"] = req.subseed_strength
    if req.seed_resize_from:
        extra["Seed resize from"] = f"{req.seed_resize_from[0]}x{req.seed_resize_from[1]}"
    return extra
