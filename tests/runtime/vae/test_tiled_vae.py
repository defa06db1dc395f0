"""Tiled VAE decode/encode (runtime/vae/tiled.py): window placement, blending, and fidelity of the
embedded model's VAE tiled against untiled."""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest

from sdrt.runtime.components import VaeDecoder, VaeEncoder
from sdrt.runtime.errors import InputError
from sdrt.runtime.model.folder import EMBEDDED_MODEL, read_facts
from sdrt.runtime.session import open_session
from sdrt.runtime.vae.tiled import (
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


# --- shared GroupNorm statistics over the split decoder (runtime/vae/pooled_norm.py) ---

# The split graphs on one window with the window's own statistics are the untiled graph's
# operations regrouped (GroupNorm's mean/variance written out instead of InstanceNormalization):
# float32 rounding only (measured 2e-6 on the embedded VAE, 1e-5 on SD 1.5's).
SPLIT_ATOL = 1e-4
# The embedded VAE's 384×384 picture in 128-px windows (32 latents, overlap 8): per-window
# statistics measured 29.4 dB, shared statistics (3 passes) 43.6 dB; 38 dB leaves margin for
# backends and still fails the per-window decode by 8 dB.
MIN_SHARED_PSNR_DB = 38.0
# The same picture with statistics from one untiled tail pass over the head's features pooled 2×2
# (split_vae.STATISTICS_DOWNSAMPLE): measured 39.8 dB; 36 dB leaves backend margin and still
# fails the per-window decode (29.4 dB) by 6 dB.
MIN_POOLED_PSNR_DB = 36.0
# The tiny SD VAE (random weights, mid-block attention), white-noise 64×64 latents in 32-latent
# windows overlapping by 16, against the untiled decode: per-window 35.0 dB; the head (with the
# attention) on the whole latent and the tail's windows on their own statistics 39.0 dB. (The
# statistics passes do not help this random VAE: 35.7 dB after 2 passes, 32.6 after 3; hence
# split_vae.SHARED_PASSES = 1.)
MIN_WHOLE_HEAD_VS_DIFFUSERS_PSNR_DB = 37.0
# OpenVINO against ONNX Runtime on the same split graphs (fp32 hint; optimum's 6e-3 tolerance
# for a whole pipeline, images in [-1, 1]).
OPENVINO_ATOL = 6e-3


def _picture_latents(folder, size):
    from sdrt.benchmarks.low_memory import _shapes_picture

    encoder = VaeEncoder(open_session(folder / "vae_encoder" / "model.onnx", "ort"))
    return encoder(_shapes_picture(size))


def _split_sessions(folder, backend="ort"):
    from sdrt.runtime.vae.pooled_norm import SPLIT_COMPONENTS

    return tuple(open_session(folder / name / "model.onnx", backend) for name in SPLIT_COMPONENTS)


def _whole_image(head, tail, latents):
    """Head and tail on the whole latent, the tail with its own statistics."""
    features = head.run({"latent_sample": latents})["features"]
    groups = tail.inputs["norm_mean"].shape[1]
    zeros = np.zeros((len(latents), groups), np.float32)
    return tail.run({"features": features, "norm_mean": zeros, "norm_var": zeros + 1,
                     "local_statistics": np.float32([1]),
                     "statistics_weight": np.ones((1, 1, *features.shape[2:]), np.float32)})


def test_core_masks_count_every_pixel_once():
    from sdrt.runtime.vae.pooled_norm import core_masks

    for size, tile, overlap in [(128, 48, 16), (100, 32, 8), (33, 32, 8), (20, 48, 16)]:
        starts = tile_starts(size, min(tile, size), overlap)
        total = np.zeros(size)
        for start, mask in zip(starts, core_masks(size, tile, overlap), strict=True):
            total[start: start + len(mask)] += mask
        np.testing.assert_array_equal(total, 1)


def test_windows_sums_pool_to_image_wide_statistics():
    from sdrt.runtime.vae.pooled_norm import Statistics

    rng = np.random.default_rng(4)
    x = rng.normal(50.0, 0.5, (2, 3, 1000))  # a large mean: naive Σx² would cancel
    stats = Statistics(np.zeros((2, 3), np.float32), np.ones((2, 3), np.float32))
    for part, centre in ((slice(0, 300), 49.0), (slice(300, 1000), 51.0)):
        d = x[:, :, part] - centre
        stats.add(np.stack([np.full((2, 3), d.shape[2]), d.sum(2), (d * d).sum(2),
                            np.full((2, 3), centre)], axis=1))
    pooled = stats.combined()
    np.testing.assert_allclose(pooled.mean, x.mean(2), rtol=1e-6)
    np.testing.assert_allclose(pooled.var, x.var(2), rtol=1e-5)


def test_split_graphs_on_one_window_are_the_untiled_decoder(split_embedded):
    latents = _picture_latents(split_embedded, 128)
    decoder = VaeDecoder(open_session(split_embedded / "vae_decoder" / "model.onnx", "ort"))
    out = _whole_image(*_split_sessions(split_embedded), latents)
    np.testing.assert_allclose(out["sample"], decoder(latents), atol=SPLIT_ATOL)
    count, _, _, centre = np.moveaxis(out["norm_sums"], 1, 0)
    assert (count > 0).all() and np.isfinite(centre).all()


@pytest.mark.parametrize(("estimate", "floor"), [
    ({"passes": 3}, MIN_SHARED_PSNR_DB),  # statistics from the previous pass's windows
    ({"downsample": 2}, MIN_POOLED_PSNR_DB),  # from one untiled pass over pooled features
])
def test_shared_statistics_tiled_decode_matches_untiled(split_embedded, estimate, floor):
    from sdrt.runtime.vae.pooled_norm import SharedNormVaeDecoder

    factor = read_facts(split_embedded).vae_scale_factor
    latents = _picture_latents(split_embedded, 384)
    decoder = VaeDecoder(open_session(split_embedded / "vae_decoder" / "model.onnx", "ort"))
    full = decoder(latents)
    shared = SharedNormVaeDecoder(decoder, *_split_sessions(split_embedded), Tiling(32, 8),
                                  factor, **estimate)(latents)
    per_window = TiledVaeDecoder(decoder, Tiling(32, 8), factor)(latents)
    assert shared.shape == full.shape
    assert psnr(shared, full) >= floor > psnr(per_window, full)


def test_shared_statistics_decode_on_openvino(split_embedded):
    pytest.importorskip("openvino")
    from sdrt.runtime.vae.pooled_norm import SharedNormVaeDecoder

    factor = read_facts(split_embedded).vae_scale_factor
    latents = _picture_latents(split_embedded, 192)
    results = []
    for backend in ("ort", "openvino"):
        decoder = VaeDecoder(open_session(split_embedded / "vae_decoder" / "model.onnx",
                                          backend))
        results.append(SharedNormVaeDecoder(decoder, *_split_sessions(split_embedded, backend),
                                            Tiling(24, 8), factor, passes=3)(latents))
    np.testing.assert_allclose(results[1], results[0], atol=OPENVINO_ATOL)


def test_split_refuses_a_folder_without_a_decoder(tmp_path):
    from sdrt.export.split_vae_decoder import split_folder
    from sdrt.runtime.errors import ExportError

    with pytest.raises(ExportError, match="no vae_decoder/model.onnx"):
        split_folder(tmp_path)


def test_whole_image_attention_matches_diffusers(tiny_sd_dir, tiny_onnx_dir, tmp_path):
    """The tiny SD VAE has mid-block attention: the head (queries in chunks) runs it on the
    whole latent; the split graphs and the tiled decode are compared with diffusers'."""
    import shutil

    import torch
    from diffusers import AutoencoderKL

    from sdrt.export.split_vae_decoder import split_folder
    from sdrt.runtime.vae.pooled_norm import SharedNormVaeDecoder

    folder = tmp_path / "tiny"
    shutil.copytree(tiny_onnx_dir, folder)
    split_folder(folder, query_chunks=4)
    factor = read_facts(folder).vae_scale_factor
    latents = np.random.default_rng(5).standard_normal((1, 4, 64, 64)).astype(np.float32)
    vae = AutoencoderKL.from_pretrained(tiny_sd_dir / "vae").eval()
    with torch.no_grad():
        reference = vae.decode(torch.from_numpy(latents)).sample.numpy()
    np.testing.assert_allclose(_whole_image(*_split_sessions(folder), latents)["sample"],
                               reference, atol=SPLIT_ATOL)
    decoder = VaeDecoder(open_session(folder / "vae_decoder" / "model.onnx", "ort"))
    tiled = SharedNormVaeDecoder(decoder, *_split_sessions(folder), Tiling(32, 16), factor,
                                 passes=1)(latents)
    per_window = TiledVaeDecoder(decoder, Tiling(32, 16), factor)(latents)
    clip = partial(np.clip, a_min=-1, a_max=1)
    assert psnr(clip(tiled), clip(reference)) >= MIN_WHOLE_HEAD_VS_DIFFUSERS_PSNR_DB > psnr(
        clip(per_window), clip(reference))


def test_split_decoder_estimate_is_the_larger_of_window_and_head():
    from sdrt.runtime.memory import estimate as memory
    at = {size: memory.Shapes(size, size, 1, 8, tile=48, split_decoder=True)
          for size in (512, 1024, 4096)}
    window = 384 * 384 * memory.SHARED_DECODER_BYTES_PER_PIXEL
    assert memory.working_bytes("vae_decoder", at[512], None) == window
    assert memory.working_bytes("vae_decoder", at[1024], None) == window
    assert memory.working_bytes("vae_decoder", at[4096], None) == (
        512 * 512 * memory.SPLIT_HEAD_BYTES_PER_LATENT_PIXEL)
