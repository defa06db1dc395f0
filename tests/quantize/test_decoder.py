"""VAE decoder variants on the tiny random SD model: the int8-hybrid decoder is a static int8
graph (quantize/decoder_int8.py) that decodes as OpenVINO's fp32 decoder does, and bf16 can run
the decoder in bf16 (faked where the CPU lacks it: OpenVINO then runs f32, so the gate passes).

Random weights make the gate's figures meaningless; the embedded model's figures are in
docs/quantization.md.
"""

import numpy as np
import pytest

from sdrt.quantize import gates
from sdrt.quantize.calibration import record_inputs
from sdrt.quantize.stage import QuantizeOptions, quantize_model
from sdrt.runtime import pipeline as pipeline_module
from sdrt.runtime.model.manifest import Manifest
from sdrt.runtime.model.variants import Variant
from sdrt.runtime.pipeline import Pipeline
from tests.quantize.test_quantize import STEPS, fresh_copy, needs

DECODER = "vae_decoder"
# Decoded 8-bit images of the int8 decoder against OpenVINO's fp32 decoder on the same latents.
# The tiny model's random convolutions keep about 34 dB here; a decoder whose activation ranges
# were wrong (e.g. not calibrated on what it decodes) falls well below.
MIN_TINY_DECODE_PSNR_DB = 25.0


@pytest.fixture(scope="module")
def decoders(tiny_onnx_dir, tmp_path_factory):
    """A folder listing int8-hybrid and (faked native) bf16 variants of the decoder alone."""
    needs("openvino")
    folder = fresh_copy(tiny_onnx_dir, tmp_path_factory.mktemp("decoders") / "tiny")
    entries = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("sdrt.quantize.openvino.bf16_supported", lambda: True)
        for precision in ("int8-hybrid", "bf16"):
            options = QuantizeOptions(precision, "openvino", components=(DECODER,), steps=STEPS)
            entries[precision] = quantize_model(folder, options)
    return folder, entries


def int8_graph(folder, entry):
    import openvino as ov

    return ov.Core().read_model(str(folder / Variant.from_json(entry).components[DECODER].file))


def test_the_int8_hybrid_decoder_is_static_int8(decoders):
    from sdrt.quantize.decoder_int8 import float_ops

    folder, entries = decoders
    entry = entries["int8-hybrid"]
    assert entry in Manifest.load(folder).variants
    # with (faked) native bf16 the text encoder, not quantized, runs at bf16 (stage.BF16_REMAINDER)
    assert entry["components"]["text_encoder"] == {"execution": "bf16"}
    assert set(entry["components"]) == {DECODER, "text_encoder"}
    assert entry["gate"]["figures"]["image_psnr_db"] >= gates.MIN_IMAGE_PSNR_DB["int8-hybrid"]
    assert entry["bytes"][DECODER]["variant"] < entry["bytes"][DECODER]["fp32"]
    model = int8_graph(folder, entry)
    kept = set(float_ops(model))
    int8_inputs = {op.get_friendly_name(): any(
        op.input_value(i).get_node().get_type_name() == "FakeQuantize"
        for i in range(op.get_input_size()))
        for op in model.get_ops() if op.get_type_name() in ("Convolution", "MatMul")}
    assert kept and kept < set(int8_inputs)
    for name, int8 in int8_inputs.items():  # activations int8 except where kept float
        assert int8 == (name not in kept), name
    Manifest.load(folder).verify_files(folder)


def test_the_int8_decoder_decodes_as_the_fp32_one(decoders, tiny_onnx_dir):
    import openvino as ov

    folder, entries = decoders
    latents = record_inputs(tiny_onnx_dir, "openvino", (DECODER,), ["a blue square", "a cat"],
                            steps=STEPS, seed=7)[DECODER]
    assert [feeds["latent_sample"].shape for feeds in latents] == [(1, 4, 32, 32)] * 2  # per image
    core = ov.Core()
    fp32 = core.compile_model(str(tiny_onnx_dir / DECODER / "model.onnx"), "CPU")
    int8 = core.compile_model(int8_graph(folder, entries["int8-hybrid"]), "CPU")

    def pixels(compiled):
        images = np.concatenate([compiled(feeds)[0] for feeds in latents])
        return np.clip((images / 2 + 0.5) * 255 + 0.5, 0, 255).astype(np.uint8)

    assert gates.psnr(pixels(fp32), pixels(int8), 255.0) >= MIN_TINY_DECODE_PSNR_DB


@pytest.mark.parametrize("precision", ["int8-hybrid", "bf16"])
def test_the_pipeline_decodes_with_the_variant(decoders, precision, monkeypatch):
    folder, entries = decoders
    variant = Variant.from_json(entries[precision])
    opened = {}
    real_open = pipeline_module.open_session

    def spy(path, backend, **kwargs):
        opened[path.parent.name] = (path.relative_to(folder).as_posix(), kwargs["execution"])
        return real_open(path, backend, **kwargs)

    monkeypatch.setattr(pipeline_module, "open_session", spy)
    pipe = Pipeline.load(folder, "openvino", precision=precision)
    assert opened[DECODER] == (variant.components[DECODER].file or f"{DECODER}/model.onnx",
                               variant.execution(DECODER))
    assert opened["unet"] == ("unet/model.onnx", "f32")  # the variant names the decoder only
    image = pipe.generate("a red circle", steps=STEPS, seed=3)[0]
    assert f"Precision: {precision}" in image.info["parameters"]


def test_bf16_runs_the_decoder_in_bf16(decoders):
    folder, entries = decoders
    variant = Variant.from_json(entries["bf16"])
    assert variant.files == [] and variant.execution(DECODER) == "bf16"
    assert set(variant.components) == {DECODER}


def test_the_int8_decoder_execution_follows_native_bf16(decoders, monkeypatch):
    """On CPUs with native bf16 the int8 decoder's float remainder runs bf16, as the hybrid
    UNet's does; elsewhere f32."""
    from sdrt.quantize import openvino as recipes

    folder, entries = decoders
    assert Variant.from_json(entries["int8-hybrid"]).execution(DECODER) == "bf16"  # faked
    monkeypatch.setattr(recipes, "bf16_supported", lambda: False)
    assert recipes.execution("int8-hybrid", DECODER) == "f32"
    assert recipes.needs_calibration("int8-hybrid", DECODER)
    assert not recipes.needs_calibration("int8", DECODER)  # int8 stays weight-only


def test_a_graph_without_group_norms_is_refused():
    ov = pytest.importorskip("openvino")
    from sdrt.quantize.decoder_int8 import float_ops

    opset = ov.opset13
    sample = opset.parameter([1, 4, 8, 8], np.float32, name="latent_sample")
    conv = opset.convolution(sample, opset.constant(np.ones((3, 4, 3, 3), np.float32)),
                             [1, 1], [1, 1], [1, 1], [1, 1])
    with pytest.raises(ValueError, match="not a VAE decoder"):
        float_ops(ov.Model([conv], [sample]))
