"""benchmarks/flops.py and matmul_peak.py's ceilings: which precision's ceiling a graph is held
to (decided from the graph and the CPU's facts, faked here both ways), how a stage's calls at
several precisions blend, and that the ceilings are measured once per machine and cached."""

import numpy as np
import pytest

from sdrt.benchmarks import flops, matmul_peak
from sdrt.runtime.model.variants import ComponentVariant, Variant


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SDRT_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def measured(cache, monkeypatch):
    """`measure` faked: each call logged, fp32 at 10 GFLOP/s, bf16 20, int8 40."""
    calls = []

    def fake(precision, size, runs, threads):
        calls.append((precision, threads))
        return {"precision": precision, "gflops": {"fp32": 10, "bf16": 20, "int8": 40}[precision],
                "seconds": 1.0, "kernel": "faked"}

    monkeypatch.setattr(matmul_peak, "measure", fake)
    return calls


def test_ceilings_are_measured_once_per_machine_and_thread_count(measured, monkeypatch):
    monkeypatch.setattr(matmul_peak, "has_native_bf16", lambda: False)
    assert matmul_peak.ceilings() == {"fp32": 10, "bf16": None, "int8": 40}
    assert matmul_peak.ceilings() == {"fp32": 10, "bf16": None, "int8": 40}
    assert measured == [("fp32", None), ("int8", None)]  # bf16 would run as fp32: not measured
    matmul_peak.ceilings(threads=1)
    matmul_peak.ceilings(refresh=True)
    assert len(measured) == 6
    monkeypatch.setattr(matmul_peak, "machine_id", lambda: "another-cpu0")
    monkeypatch.setattr(matmul_peak, "has_native_bf16", lambda: True)
    assert matmul_peak.ceilings() == {"fp32": 10, "bf16": 20, "int8": 40}
    assert len(measured) == 9


def test_no_cache_folder_measures_every_time(measured, monkeypatch):
    monkeypatch.setenv("SDRT_CACHE_DIR", "off")
    matmul_peak.ceilings()
    matmul_peak.ceilings()
    assert len(measured) == 2 * (2 + matmul_peak.has_native_bf16())


def test_measure_names_the_kernel_that_ran():
    pytest.importorskip("openvino")
    fp32 = matmul_peak.measure("fp32", 128, 1, None)
    int8 = matmul_peak.measure("int8", 128, 1, None)
    assert fp32["gflops"] > 0 and fp32["kernel"].startswith("f32")
    assert int8["kernel"].split()[0] in ("u8", "i8")  # OpenVINO ran an int8 kernel


def _onnx_matmul(path, quantized: bool):
    """x (1, 8) @ w (8, 4), through QuantizeLinear/DequantizeLinear when `quantized`."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes, inits = [], [numpy_helper.from_array(np.ones((8, 4), np.float32), "w")]
    source = "x"
    if quantized:
        inits += [numpy_helper.from_array(np.array(0.1, np.float32), "scale"),
                  numpy_helper.from_array(np.array(0, np.uint8), "zero")]
        nodes += [helper.make_node("QuantizeLinear", ["x", "scale", "zero"], ["xq"]),
                  helper.make_node("DequantizeLinear", ["xq", "scale", "zero"], ["xd"])]
        source = "xd"
    nodes.append(helper.make_node("MatMul", [source, "w"], ["y"]))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, ["batch", 8])], [helper.make_tensor_value_info(
            "y", TensorProto.FLOAT, ["batch", 4])], inits)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    return path


def test_a_variant_graph_is_counted_as_its_fp32_graph(tmp_path, cache):
    pytest.importorskip("onnx")
    fp32 = _onnx_matmul(tmp_path / "unet" / "model.onnx", quantized=False)
    made = _onnx_matmul(tmp_path / "variants" / "int8-ort" / "unet" / "model.onnx",
                        quantized=True)
    assert flops.counted_graph(tmp_path, made) == fp32
    assert flops.counted_graph(tmp_path, fp32) == fp32
    calls = [{"graph": str(made), "shapes": {"x": [3, 8]}, "count": 2}]
    variant = Variant("int8", "ort", {"unet": ComponentVariant(file="variants/int8-ort/unet/"
                                                               "model.onnx")})
    assert flops.stage_flops(calls, tmp_path, variant) == {"int8": 2 * 2 * 3 * 8 * 4}


def test_the_ceiling_precision_follows_the_graph_and_the_cpu(tmp_path, monkeypatch):
    ov = pytest.importorskip("openvino")
    pytest.importorskip("onnx")
    model = tmp_path / "model"
    onnx_int8 = _onnx_matmul(model / "variants" / "int8-ort" / "unet" / "model.onnx", True)
    ir_int8 = model / "variants" / "int8-hybrid-openvino" / "unet" / "openvino_model.xml"
    weights = np.ones((16, 16), np.float32)
    ov.save_model(matmul_peak.product_model(16, weights, int8=True), ir_int8)
    ir_float = model / "variants" / "int8-openvino" / "unet" / "openvino_model.xml"
    ov.save_model(matmul_peak.product_model(16, weights, int8=False), ir_float)  # weights only
    fp32 = _onnx_matmul(model / "unet" / "model.onnx", quantized=False)
    tiny_vae = _onnx_matmul(tmp_path / "taesd" / "vae_decoder" / "model.onnx", quantized=False)
    bf16 = Variant("bf16", "openvino", {name: ComponentVariant(execution="bf16")
                                        for name in ("unet", "vae_decoder")})
    plain = Variant("int8", "openvino")
    assert flops.call_precision(model, onnx_int8, plain) == "int8"
    assert flops.call_precision(model, ir_int8, bf16) == "int8"
    assert flops.call_precision(model, ir_float, plain) == "fp32"
    monkeypatch.setattr(flops, "has_native_bf16", lambda: True)
    assert flops.call_precision(model, fp32, bf16) == "bf16"
    assert flops.call_precision(model, ir_float, bf16) == "bf16"
    assert flops.call_precision(model, fp32, plain) == "fp32"
    assert flops.call_precision(model, tiny_vae, bf16) == "fp32"  # outside the model folder
    monkeypatch.setattr(flops, "has_native_bf16", lambda: False)  # OpenVINO would run f32
    assert flops.call_precision(model, fp32, bf16) == "fp32"


def test_a_stage_at_two_precisions_is_held_to_their_blend():
    """2 GFLOP at fp32 (100 GFLOP/s) and 2 at int8 (400) take at least 0.025 s: 160 GFLOP/s."""
    ceilings = {"fp32": 100.0, "bf16": None, "int8": 400.0}
    found = flops.ceiling_figures({"fp32": 2 * 10**9, "int8": 2 * 10**9}, 0.1, ceilings)
    assert found["flops"] == 4 * 10**9 and found["gflops_per_s"] == pytest.approx(40)
    assert found["ceiling_gflops"] == pytest.approx(160)
    assert found["ceiling_fraction"] == pytest.approx(0.25)
    unknown = flops.ceiling_figures({"bf16": 10**9}, 0.1, ceilings)
    assert unknown["gflops_per_s"] == pytest.approx(10) and unknown["ceiling_fraction"] is None
    assert flops.ceiling_figures({}, 0.1, ceilings)["flops"] is None


def test_without_openvino_the_ceilings_are_unknown(monkeypatch):
    from sdrt.benchmarks import bench

    def missing(*args, **kwargs):
        raise ModuleNotFoundError("No module named 'openvino'")

    monkeypatch.setattr(matmul_peak, "ceilings", missing)
    assert bench._ceilings(None, False) == {"fp32": None, "bf16": None, "int8": None}


def test_weights_shared_by_hard_link_are_counted(tmp_path, cache):
    """sdrt hard-links a UNet's weights into its DeepCache graphs' folder; onnx's loader refuses
    such files, so the shape constants are read by sdrt's own vetted reader."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    inits = [numpy_helper.from_array(np.ones((8, 4), np.float32), "w"),
             numpy_helper.from_array(np.array([-1, 2], np.int64), "shape")]
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"]),
             helper.make_node("Reshape", ["y", "shape"], ["z"]),
             helper.make_node("MatMul", ["z", "v"], ["out"])]
    inits.append(numpy_helper.from_array(np.ones((2, 5), np.float32), "v"))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, ["batch", 8])], [helper.make_tensor_value_info(
            "out", TensorProto.FLOAT, None)], inits)
    path = tmp_path / "unet" / "model.onnx"
    path.parent.mkdir()
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path),
              save_as_external_data=True, location="model.onnx_data", size_threshold=0)
    (tmp_path / "unet" / "deepcache").mkdir()
    (tmp_path / "unet" / "deepcache" / "model.onnx_data").hardlink_to(
        path.with_name("model.onnx_data"))
    # (3, 8) @ (8, 4) → (3, 4) → reshaped (6, 2) @ (2, 5): the second needs the shape's values
    assert flops.graph_macs(path, {"x": (3, 8)}) == 3 * 8 * 4 + 6 * 2 * 5
