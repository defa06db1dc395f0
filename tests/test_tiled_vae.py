"""Tiled VAE decode/encode (runtime/tiled_vae.py): window placement, blending, and fidelity of the
embedded model's VAE tiled against untiled."""

from __future__ import annotations

import numpy as np
import pytest

from sdrt.runtime.components import VaeDecoder, VaeEncoder
from sdrt.runtime.errors import InputError
from sdrt.runtime.model_folder import EMBEDDED_MODEL, read_facts
from sdrt.runtime.session import open_session
from sdrt.runtime.tiled_vae import (
    TiledVaeDecoder,
    TiledVaeEncoder,
    Tiling,
    edge_weights,
    run_tiled,
    tile_starts,
)

# Tiled against untiled decodes of white-noise latents at 256×320 px with 128-px windows
# (images in [-1, 1]): 36 dB measured; the bound catches blending or placement errors. (Larger
# images of structured latents fare worse, 24–28 dB at 1024×1024: benchmarks/RESULTS.md.)
MIN_TILED_PSNR_DB = 35.0
# A pointwise function is the same on any window, so blending must reproduce it to float
# rounding (weights sum to 1 after normalisation).
POINTWISE_ATOL = 1e-5


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(4.0 / np.mean((a - b) ** 2)))


@pytest.mark.parametrize("size,tile,overlap", [(64, 48, 16), (128, 48, 16), (100, 32, 8),
                                               (33, 32, 8), (20, 48, 16)])
def test_windows_cover_the_image_and_overlap(size, tile, overlap):
    starts = tile_starts(size, tile, overlap)
    length = min(tile, size)
    assert starts[0] == 0 and starts[-1] + length == size
    assert all(b - a <= length - overlap for a, b in zip(starts, starts[1:], strict=False))


def test_blend_weights_fall_to_zero_only_where_a_neighbour_overlaps():
    starts = tile_starts(128, 48, 16)
    first, middle = edge_weights(starts, 0, 48), edge_weights(starts, 1, 48)
    assert first[0] == 1 and first[-1] < 0.1 and middle[0] < 0.1 and middle[-1] < 0.1
    assert (middle > 0).all()


def test_pointwise_function_is_reproduced_exactly():
    x = np.random.default_rng(0).standard_normal((2, 4, 70, 90)).astype(np.float32)

    def upsample(window):  # (B, 4, h, w) → (B, 3, 8h, 8w), pointwise per latent pixel
        return np.tanh(window[:, :3]).repeat(8, axis=2).repeat(8, axis=3)

    np.testing.assert_allclose(run_tiled(upsample, x, Tiling(32, 8), 8), upsample(x),
                               atol=POINTWISE_ATOL)


def test_bad_tiling_is_refused():
    with pytest.raises(InputError, match="overlap < tile"):
        Tiling(16, 16).validate()


@pytest.fixture(scope="module")
def embedded_vae():
    folder = EMBEDDED_MODEL
    facts = read_facts(folder)
    return (VaeDecoder(open_session(folder / "vae_decoder" / "model.onnx", "ort")),
            VaeEncoder(open_session(folder / "vae_encoder" / "model.onnx", "ort")),
            facts.vae_scale_factor)


def test_tiled_decode_matches_untiled(embedded_vae):
    decoder, _, factor = embedded_vae
    latents = np.random.default_rng(1).standard_normal((1, 4, 64, 80)).astype(np.float32)
    full = decoder(latents)
    tiled = TiledVaeDecoder(decoder, Tiling(32, 8), factor)(latents)
    assert tiled.shape == full.shape
    assert psnr(tiled, full) >= MIN_TILED_PSNR_DB


def test_tiled_encode_matches_untiled(embedded_vae):
    _, encoder, factor = embedded_vae
    images = np.random.default_rng(2).uniform(-1, 1, (1, 3, 256, 192)).astype(np.float32)
    mean, std = encoder.posterior(images)
    tiled_mean, tiled_std = TiledVaeEncoder(encoder, Tiling(32, 8), factor).posterior(images)
    assert tiled_mean.shape == mean.shape and tiled_std.shape == std.shape
    peak = float(np.ptp(mean))
    assert 10 * np.log10(peak**2 / np.mean((tiled_mean - mean) ** 2)) >= MIN_TILED_PSNR_DB


def test_one_window_is_the_untiled_call(embedded_vae):
    decoder, _, factor = embedded_vae
    latents = np.random.default_rng(3).standard_normal((1, 4, 16, 16)).astype(np.float32)
    np.testing.assert_array_equal(TiledVaeDecoder(decoder, factor=factor)(latents),
                                  decoder(latents))
