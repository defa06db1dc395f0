"""Exact tiled VAE decode stage by stage (export/vae_stages.py, runtime/vae/exact_tiled.py): window
placement, statistics, the stage cut, equality with the untiled decode on both backends, and the
fall-back where a folder has no stage graphs."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from sdrt.runtime.components import VaeDecoder
from sdrt.runtime.session import open_session
from sdrt.runtime.vae import exact_tiled as staged_vae
from sdrt.runtime.vae.exact_tiled import StagedVaeDecoder, group_statistics, stage_plan, windows
from sdrt.runtime.vae.tiled import TiledVaeDecoder, Tiling

# The staged decode computes what the untiled graph computes, regrouped: float32 rounding in the
# convolutions' summation order and GroupNorm statistics reduced in float64 instead of float32.
# Measured 1.4e-6 (ORT) and 8e-7 (OpenVINO, f32 hint) on the embedded VAE; 1e-4 leaves margin
# and still fails any statistic or halo error (a per-window GroupNorm is off by 1e-2 or more).
STAGED_ATOL = 1e-4
# OpenVINO's fp32 convolutions against diffusers' torch ones (optimum's OpenVINO tolerance).
OPENVINO_ATOL = 6e-3
# Windows small enough that every stage of the tiny VAE runs in several windows per axis.
SMALL_WINDOW = 10


def _untiled(folder, backend="ort"):
    return VaeDecoder(open_session(folder / "vae_decoder" / "model.onnx", backend))


def _staged(folder, backend="ort", window=SMALL_WINDOW):
    graph = folder / "vae_decoder" / "model.onnx"
    graphs = stage_plan(folder, graph).open(lambda path: open_session(path, backend))
    return StagedVaeDecoder(_untiled(folder, backend), graphs, Tiling(4, 2), window)


@pytest.fixture(scope="module")
def staged_tiny(tiny_onnx_dir, tmp_path_factory):
    """The tiny SD folder (a VAE with mid-block attention) split into head and stages."""
    from sdrt.export.split_vae_decoder import split_folder

    folder = tmp_path_factory.mktemp("staged") / "tiny"
    shutil.copytree(tiny_onnx_dir, folder)
    split_folder(folder, query_chunks=4)
    return folder


@pytest.mark.parametrize("size,side,halo", [(64, 16, 1), (100, 24, 2), (33, 10, 2), (7, 10, 2),
                                            (5000, 256, 1)])
def test_windows_keep_every_pixel_once_inside_their_halo(size, side, halo):
    parts = windows(size, side, halo)
    covered = np.zeros(size, int)
    for start, end, keep_start, keep_end in parts:
        assert end - start == min(side, size)  # one window shape per axis (OpenVINO compiles)
        covered[keep_start:keep_end] += 1
        assert keep_start == 0 or keep_start >= start + halo
        assert keep_end == size or keep_end <= end - halo
    np.testing.assert_array_equal(covered, 1)
    assert len(parts) > 1 or side >= size


def test_windows_too_small_for_the_halo_are_refused():
    from sdrt.runtime.errors import InputError

    with pytest.raises(InputError, match="halo"):
        windows(64, 4, 2)


def test_group_statistics_are_exact_for_a_large_mean(monkeypatch):
    monkeypatch.setattr(staged_vae, "STATISTICS_CHUNK_BYTES", 3000)  # several chunks per image
    x = np.random.default_rng(0).normal(50.0, 0.5, (2, 8, 9, 11)).astype(np.float32)
    mean, inv_std = group_statistics(x, 4, 1e-6)
    grouped = x.astype(np.float64).reshape(2, 4, -1)
    np.testing.assert_allclose(mean, grouped.mean(2), rtol=1e-7)
    np.testing.assert_allclose(inv_std, 1 / np.sqrt(grouped.var(2) + 1e-6), rtol=1e-6)


def test_stages_cut_after_the_mid_block_attention_at_every_group_norm(staged_tiny):
    """The head keeps the mid block (attention, and its GroupNorms over the whole latent); the
    tail's GroupNorms each start a stage; no stage holds attention."""
    source = onnx.load(str(staged_tiny / "vae_decoder" / "model.onnx"), load_external_data=False)
    tail_norms = [n for n in source.graph.node if n.op_type == "InstanceNormalization"
                  and not n.name.startswith(("/decoder/mid_block/", "/decoder/conv_in"))]
    plan = json.loads((staged_tiny / staged_vae.STAGES_DIR / staged_vae.PLAN_FILE).read_text())
    assert len(plan["stages"]) == len(tail_norms)
    assert plan["stages"][0]["inputs"] == ["features"]
    assert [s["norm"]["input"] for s in plan["stages"]][:1] == ["features"]
    head = onnx.load(str(staged_tiny / "vae_decoder_head" / "model.onnx"))
    assert any(n.op_type == "Softmax" for n in head.graph.node)
    for stage in plan["stages"]:
        graph = onnx.load(str(staged_tiny / staged_vae.STAGES_DIR / stage["file"])).graph
        ops = {n.op_type for n in graph.node}
        assert "Softmax" not in ops and "InstanceNormalization" not in ops
        upsamples = "Resize" in ops
        # a 3×3 conv reaches 1 px; one before a 2× upsampling and one after reach 3 px of the
        # output, 2 px of the input
        assert stage["halo"] == (2 if upsamples else 1)
        assert set(stage["outputs"].values()) == {2 if upsamples else 1}
    assert plan["stages"][-1]["outputs"] == {"sample": 1}


@pytest.mark.parametrize("backend", ["ort", "openvino"])
def test_staged_decode_equals_the_untiled_decode(staged_tiny, tiny_sd_dir, backend):
    """Batch 2, an odd latent size, several windows per axis at every stage; against the untiled
    graph on the same backend, and against diffusers."""
    if backend == "openvino":
        pytest.importorskip("openvino")
    import torch
    from diffusers import AutoencoderKL

    latents = np.random.default_rng(5).standard_normal((2, 4, 13, 20)).astype(np.float32)
    staged = _staged(staged_tiny, backend)(latents)
    untiled = _untiled(staged_tiny, backend)(latents)
    np.testing.assert_allclose(staged, untiled, atol=STAGED_ATOL)
    vae = AutoencoderKL.from_pretrained(tiny_sd_dir / "vae").eval()
    with torch.no_grad():
        reference = vae.decode(torch.from_numpy(latents)).sample.numpy()
    np.testing.assert_allclose(staged, reference, atol=OPENVINO_ATOL)
    per_window = TiledVaeDecoder(_untiled(staged_tiny), Tiling(8, 4), 2)(latents)
    assert np.abs(per_window - untiled).max() > 10 * STAGED_ATOL  # what the stages fix


def test_staged_decode_of_the_trained_embedded_vae(split_embedded):
    from sdrt.benchmarks.low_memory import _shapes_picture

    encoder = open_session(split_embedded / "vae_encoder" / "model.onnx", "ort")
    from sdrt.runtime.components import VaeEncoder

    latents = VaeEncoder(encoder)(_shapes_picture(200))  # (1, 4, 25, 25)
    np.testing.assert_allclose(_staged(split_embedded, window=16)(latents),
                               _untiled(split_embedded)(latents), atol=STAGED_ATOL)


def test_low_memory_pipeline_prefers_stages_then_split_then_windows(split_embedded, tmp_path,
                                                                   caplog):
    from sdrt.runtime.pipeline import Pipeline
    from sdrt.runtime.vae.pooled_norm import SharedNormVaeDecoder

    assert isinstance(Pipeline.load(split_embedded, "ort", low_memory=True).vae_decoder,
                      StagedVaeDecoder)
    split_only = _copy_without(split_embedded, tmp_path / "split", (staged_vae.STAGES_DIR,))
    with caplog.at_level("INFO", logger="sdrt.runtime.vae.pooled_norm"):
        decoder = Pipeline.load(split_only, "ort", low_memory=True).vae_decoder
    assert type(decoder) is SharedNormVaeDecoder and "without stage graphs" in caplog.text
    plain = _copy_without(split_embedded, tmp_path / "plain",
                          ("vae_decoder_head", "vae_decoder_tail", staged_vae.STAGES_DIR))
    assert type(Pipeline.load(plain, "ort", low_memory=True).vae_decoder) is TiledVaeDecoder


def test_stage_plan_refuses_a_missing_stage_graph(staged_tiny, tmp_path):
    from sdrt.runtime.errors import ModelError

    folder = tmp_path / "broken"
    shutil.copytree(staged_tiny, folder)
    (folder / staged_vae.STAGES_DIR / "stage_02.onnx").unlink()
    with pytest.raises(ModelError, match="stage graph is missing"):
        stage_plan(folder, folder / "vae_decoder" / "model.onnx")


def _copy_without(folder, out, names):
    """A copy of `folder` without the named component folders (nor their manifest entries)."""
    from dataclasses import replace

    from sdrt.runtime.model.manifest import Manifest

    shutil.copytree(folder, out, ignore=shutil.ignore_patterns(*names))
    manifest = Manifest.load(out)
    replace(manifest, files={rel: entry for rel, entry in manifest.files.items()
                             if rel.split("/")[0] not in names}).save(out)
    return out


def test_halo_follows_kernels_dilations_and_upsampling():
    """Conv 5×5 dilated 2 (reach 4), nearest 2× upsampling, Conv 3×3 (reach 1): 4·2 + 1 = 9
    output pixels, 5 input pixels."""
    from sdrt.export.vae_stages import halo

    weights = [numpy_helper.from_array(np.zeros((1, 1, k, k), np.float32), f"w{k}")
               for k in (5, 3)]
    scales = numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales")
    nodes = [helper.make_node("Conv", ["x", "w5"], ["a"], kernel_shape=[5, 5],
                              dilations=[2, 2], pads=[4, 4, 4, 4]),
             helper.make_node("Resize", ["a", "", "scales"], ["b"], mode="nearest"),
             helper.make_node("Conv", ["b", "w3"], ["y"], kernel_shape=[3, 3],
                              pads=[1, 1, 1, 1])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, [1, 1, 8, 8])], [], [*weights, scales])
    assert halo(graph, nodes, ["x"], ["y"]) == (5, {"y": 2})
    strided = helper.make_node("Conv", ["x", "w3"], ["y"], kernel_shape=[3, 3], strides=[2, 2],
                               pads=[1, 1, 1, 1])
    from sdrt.runtime.errors import ExportError

    with pytest.raises(ExportError, match="same-size"):
        halo(graph, [strided], ["x"], ["y"])


def test_low_memory_estimate_counts_the_staged_decoders_maps(split_embedded):
    """The staged decode holds whole-image maps: its estimate grows with the image (4× from
    512² to 1024²), unlike the split decoder's one window."""
    from sdrt.runtime.memory import estimate as memory
    from sdrt.runtime.memory.low_memory import estimate_for
    from sdrt.runtime.model.variants import resolve_variant

    variant = resolve_variant(split_embedded, "fp32", "ort")
    working = {}
    for size in (512, 1024):
        found = estimate_for(split_embedded, variant, width=size, height=size, images=1,
                             guided=True, vae_scale_factor=8, tile=48,
                             components=("vae_decoder",))
        working[size] = found.low_components[0].working
    assert working[512] == 512 * 512 * memory.STAGED_DECODER_BYTES_PER_PIXEL
    assert working[1024] == 4 * working[512]
