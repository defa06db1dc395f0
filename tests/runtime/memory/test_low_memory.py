"""The low-memory plan (runtime/memory/low_memory.py) and GPU device selection with CPU fallback
(runtime/devices.py), on the embedded model and fake sessions."""

from __future__ import annotations

import logging
from dataclasses import replace

import numpy as np
import pytest
from click.testing import CliRunner

from sdrt.cli.main import main
from sdrt.runtime import devices
from sdrt.runtime.architectures.unet import SplitBatchUNet
from sdrt.runtime.components import UNet
from sdrt.runtime.errors import InputError
from sdrt.runtime.memory.low_memory import LazySession, Residency
from sdrt.runtime.pipeline import Pipeline
from sdrt.runtime.session import TensorSpec
from sdrt.runtime.vae.exact_tiled import StagedVaeDecoder
from sdrt.runtime.vae.tiled import Tiling

# Batch-1 calls and a batch-2 call differ only by the backend's summation order.
SPLIT_ATOL = 1e-4
# Low-memory and default images of the same seed: the UNet split changes float rounding only,
# and below the tile size the VAE runs untiled, so pixels differ by at most one level.
SAME_IMAGE_LEVELS = 1


class FakeSession:
    """A session that records how many are open at once."""

    open_now = 0
    most_open = 0

    def __init__(self) -> None:
        FakeSession.open_now += 1
        FakeSession.most_open = max(FakeSession.most_open, FakeSession.open_now)
        self.inputs = {"x": TensorSpec("x", (None,), np.float32)}
        self.outputs = {"y": TensorSpec("y", (None,), np.float32)}

    def __del__(self) -> None:
        FakeSession.open_now -= 1

    def run(self, feeds):
        return {"y": feeds["x"] * 2}


def test_residency_keeps_one_session_open():
    FakeSession.open_now = FakeSession.most_open = 0
    residency = Residency()
    first, second = LazySession(FakeSession, residency), LazySession(FakeSession, residency)
    for _ in range(3):
        np.testing.assert_array_equal(first.run({"x": np.ones(2)})["y"], 2)
        second.run({"x": np.ones(2)})
    assert FakeSession.most_open == 1
    residency.release_all()
    assert FakeSession.open_now == 0


def test_split_batch_unet_equals_one_batched_call():
    pipe = Pipeline.load()
    rng = np.random.default_rng(0)
    sample = rng.standard_normal((2, 4, 16, 16), dtype=np.float32)
    context = pipe.conditioner("a red circle", "", guided=True, width=64, height=64).context
    np.testing.assert_allclose(SplitBatchUNet(pipe.unet)(sample, 500.0, context),
                               pipe.unet(sample, 500.0, context), atol=SPLIT_ATOL)


def _image(pipe: Pipeline, size: int) -> np.ndarray:
    [image] = pipe.generate("a red circle on a blue background", steps=2, seed=2, width=size,
                            height=size)
    return np.asarray(image, dtype=np.float64)


def test_low_memory_pipeline_gives_the_default_image(split_embedded):
    default, low = Pipeline.load(), Pipeline.load(split_embedded, low_memory=True)
    assert isinstance(low.unet, SplitBatchUNet) and isinstance(low.unet, UNet)
    decoder = low.vae_decoder  # this copy of the embedded folder has the stage graphs
    assert isinstance(decoder, StagedVaeDecoder)
    assert np.abs(_image(low, 64) - _image(default, 64)).max() <= SAME_IMAGE_LEVELS
    # windows smaller than the default, so that a small image is tiled (latents 24×24): the
    # staged decode is exact, so the tiled image is the untiled one to a level as well
    low = replace(low, vae_decoder=StagedVaeDecoder(decoder, decoder.graphs, Tiling(16, 8),
                                                    window=32))
    assert np.abs(_image(low, 96) - _image(default, 96)).max() <= SAME_IMAGE_LEVELS


def test_low_memory_img2img_uses_the_tiled_encoder():
    low = Pipeline.load(low_memory=True)
    from PIL import Image

    picture = Image.new("RGB", (256, 256), (200, 30, 30))
    [out] = low.img2img(picture, "a red circle", strength=0.5, steps=2, seed=0)
    assert out.size == (256, 256)
    assert type(low.vae_encoder()).__name__ == "TiledVaeEncoder"


def test_ort_gpu_falls_back_to_cpu_with_a_warning(caplog):
    devices._warned.clear()
    with caplog.at_level(logging.WARNING):
        assert devices.ort_providers("gpu", available=["CPUExecutionProvider"]) == [devices.CPU]
    assert "no GPU for ONNX Runtime" in caplog.text


def test_ort_cuda_options_carry_the_vram_cap():
    providers = devices.ort_providers("gpu", 2 * 2**30, available=[devices.CUDA, devices.CPU])
    name, options = providers[0]
    assert name == devices.CUDA and providers[1] == devices.CPU
    assert options["gpu_mem_limit"] == str(2 * 2**30)
    assert options["arena_extend_strategy"] == "kSameAsRequested"
    assert devices.ort_providers("cpu") == [devices.CPU]


class FakeCore:
    def __init__(self, names, total=0):
        self.available_devices = names
        self.total = total

    def get_property(self, device, name):
        assert (device, name) == ("GPU", "GPU_DEVICE_TOTAL_MEM_SIZE")
        return self.total


def test_openvino_gpu_device_and_fallback(caplog):
    devices._warned.clear()
    with caplog.at_level(logging.WARNING):
        assert devices.openvino_device(FakeCore(["CPU"]), "gpu") == "CPU"
    assert "no GPU for OpenVINO" in caplog.text
    assert devices.openvino_device(FakeCore(["CPU", "GPU.0"], 4 * 2**30), "gpu", 2**30) == "GPU"
    with pytest.raises(InputError, match="more than the GPU has"):
        devices.openvino_device(FakeCore(["GPU"], 2**30), "gpu", 4 * 2**30)
    with pytest.raises(InputError, match="unknown device"):
        devices.check_device("tpu")


@pytest.mark.parametrize("backend", ["ort", "openvino"])
def test_generate_on_gpu_without_one_runs_on_the_cpu(tmp_path, backend):
    pytest.importorskip("onnxruntime" if backend == "ort" else "openvino")
    devices._warned.clear()
    result = CliRunner().invoke(main, ["generate", "a red circle", "--device", "gpu",
                                       "--max-vram", "1G", "--low-memory", "--backend", backend,
                                       "--steps", "2", "--seed", "0",
                                       "-o", str(tmp_path / "x.png")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "x.png").exists()
