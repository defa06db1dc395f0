"""Export-side memory options: head-by-head attention (export/chunked_attention.py, and the
graph rewrite export/slice_attention.py) and streamed weight-only int8 (quantize/ort_weights.py)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from sdrt.runtime.memory import estimate as memory
from sdrt.runtime.memory.low_memory import sliced_attention
from sdrt.runtime.memory.plan import plan_request
from sdrt.runtime.model.folder import EMBEDDED_MODEL
from sdrt.runtime.pipeline import GenerationRequest
from sdrt.runtime.session import open_session

# Head-by-head attention is the same arithmetic per head; only summation order may differ.
SLICED_ATOL = 1e-5
# Weight-only int8 of the embedded UNet: per-channel 8-bit weights keep its output within this.
MIN_INT8_PSNR_DB = 40.0
MAX_INT8_FILE_RATIO = 0.35  # int8 weights are a quarter of fp32; small tensors stay fp32


def _unet_feeds(session, batch=2, shape=(24, 16)):
    rng = np.random.default_rng(0)
    width = session.inputs["encoder_hidden_states"].shape[2]
    timestep = (np.array(500.0, np.float32) if not session.inputs["timestep"].shape
                else np.full(batch, 500.0, np.float32))
    return {"sample": rng.standard_normal((batch, 4, *shape), dtype=np.float32),
            "timestep": timestep,
            "encoder_hidden_states": rng.standard_normal((batch, 77, width), dtype=np.float32)}


@pytest.fixture(scope="module")
def sliced_dir(tmp_path_factory):
    from sdrt.export.slice_attention import slice_folder

    out = tmp_path_factory.mktemp("sliced") / "embedded-sliced"
    assert slice_folder(EMBEDDED_MODEL, out) > 0
    return out


def test_sliced_graph_computes_the_same_unet(sliced_dir):
    original = open_session(EMBEDDED_MODEL / "unet" / "model.onnx", "ort")
    sliced = open_session(sliced_dir / "unet" / "model.onnx", "ort")
    feeds = _unet_feeds(original)
    np.testing.assert_allclose(sliced.run(feeds)["out_sample"], original.run(feeds)["out_sample"],
                               atol=SLICED_ATOL)
    heads = onnx.load(str(sliced_dir / "unet" / "model.onnx"))
    softmaxes = sum(node.op_type == "Softmax" for node in heads.graph.node)
    assert softmaxes == 4 * sum(node.op_type == "Softmax" for node in
                                onnx.load(str(EMBEDDED_MODEL / "unet" / "model.onnx")).graph.node)


def test_sliced_folder_is_marked_and_estimated_lower(sliced_dir):
    assert sliced_attention(sliced_dir) == (True, 1)
    assert sliced_attention(EMBEDDED_MODEL) == (False, 1)
    request = GenerationRequest("x", width=256, height=256)
    sliced, full = (plan_request(folder, "ort", "fp32", request, mode="auto", budget=None)
                    for folder in (sliced_dir, EMBEDDED_MODEL))
    assert sliced.estimate.components[1].working < full.estimate.components[1].working


def test_query_chunks_compute_the_same_unet_and_lower_the_estimate(sliced_dir, tmp_path):
    from sdrt.export.slice_attention import slice_folder

    chunked = tmp_path / "chunked"
    assert slice_folder(sliced_dir, chunked, query_chunks=2) > 0
    assert sliced_attention(chunked) == (True, 2)
    before = open_session(sliced_dir / "unet" / "model.onnx", "ort")
    after = open_session(chunked / "unet" / "model.onnx", "ort")
    feeds = _unet_feeds(before, shape=(24, 15))  # 360 tokens at the first level: chunks differ
    np.testing.assert_allclose(after.run(feeds)["out_sample"], before.run(feeds)["out_sample"],
                               atol=SLICED_ATOL)
    request = GenerationRequest("x", width=256, height=256)
    low = [plan_request(folder, "ort", "fp32", request, mode="low", budget=None)
           .estimate.low_components[1].working for folder in (chunked, sliced_dir)]
    assert low[0] < low[1]


def test_query_chunks_need_a_sliced_folder(tmp_path):
    from sdrt.export.slice_attention import slice_folder
    from sdrt.runtime.errors import ExportError

    with pytest.raises(ExportError, match="not sliced yet"):
        slice_folder(EMBEDDED_MODEL, tmp_path / "x", query_chunks=2)


def test_weight_only_int8_is_close_and_a_quarter_of_the_size(tmp_path):
    from sdrt.quantize.ort_weights import quantize_weights

    src = EMBEDDED_MODEL / "unet" / "model.onnx"
    dest = quantize_weights(src, tmp_path / "model.onnx")
    assert memory.graph_bytes(dest) < MAX_INT8_FILE_RATIO * memory.graph_bytes(src)
    graph = onnx.load(str(dest), load_external_data=False).graph
    assert any(node.op_type == "DequantizeLinear" for node in graph.node)
    reference, candidate = open_session(src, "ort"), open_session(dest, "ort")
    feeds = _unet_feeds(reference)
    want, got = reference.run(feeds)["out_sample"], candidate.run(feeds)["out_sample"]
    assert 10 * np.log10(np.ptp(want) ** 2 / np.mean((want - got) ** 2)) >= MIN_INT8_PSNR_DB


def test_head_chunked_processor_equals_diffusers_attention():
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    from sdrt.export.chunked_attention import HeadChunkedAttention

    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        block_out_channels=(16, 32), layers_per_block=1, sample_size=8, cross_attention_dim=16,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), attention_head_dim=4,
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), norm_num_groups=8).eval()
    sample, context = torch.randn(2, 4, 8, 12), torch.randn(2, 5, 16)
    with torch.no_grad():
        want = unet(sample, 10, context).sample
        unet.set_attn_processor(HeadChunkedAttention())
        got = unet(sample, 10, context).sample
    assert float((want - got).abs().max()) <= SLICED_ATOL


def test_export_refuses_an_unknown_attention_mode(tmp_path):
    pytest.importorskip("torch")
    from sdrt.export.onnx_export import export_pipeline
    from sdrt.runtime.errors import InputError

    with pytest.raises(InputError, match="attention must be one of full, sliced"):
        export_pipeline(tmp_path / "src", tmp_path / "out", attention="flash")
