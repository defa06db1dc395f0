"""SDXL and SDXL-Turbo: detection, export in optimum's layout, text conditioning, and parity of
sdrt's images with diffusers' StableDiffusionXLPipeline on the same weights and seeds."""

import json
from dataclasses import replace

import numpy as np
import pytest

from sdrt.runtime.control.residuals import residual_names
from sdrt.runtime.errors import ModelError
from sdrt.runtime.model.families import detect_family
from sdrt.runtime.model.manifest import Manifest
from sdrt.runtime.pipeline import Pipeline
from tests.conftest import (
    MAX_PIXEL_DIFF,
    NEGATIVE,
    PARITY_SIZES,
    PROMPT,
    as_array,
    count_unet_calls,
    load_reference,
    reference_images,
)
from tests.runtime.model.test_families import configs_of

# ---------------------------------------------------------------- detection (no torch needed)


def test_sdxl_needs_both_its_signs():
    configs = configs_of("tiny_sdxl")
    del configs["text_encoder_2"]
    with pytest.raises(ModelError, match="only one of them"):
        detect_family(**configs)
    configs = configs_of("tiny_sdxl")
    configs["unet"]["cross_attention_dim"] = 32  # the first encoder's width alone
    with pytest.raises(ModelError, match="text encoders' hidden size 64"):
        detect_family(**configs)


# ---------------------------------------------------------------- export


def test_export_writes_optimums_sdxl_layout(tiny_sdxl_onnx_dir):
    manifest = Manifest.load(tiny_sdxl_onnx_dir)
    assert manifest.family == "sdxl"
    io = {name: (list(spec.inputs), list(spec.outputs))
          for name, spec in manifest.components.items()}
    # Only the penultimate hidden state (index num_hidden_layers - 1 = 4) of each encoder.
    assert io["text_encoder"] == (["input_ids"],
                                  ["last_hidden_state", "pooler_output", "hidden_states.4"])
    assert io["text_encoder_2"] == (["input_ids"],
                                    ["text_embeds", "last_hidden_state", "hidden_states.4"])
    # ControlNet's residuals (runtime/control/residuals.py) follow SDXL's added conditions.
    unet_inputs, unet_outputs = io["unet"]
    assert unet_inputs[:5] == ["sample", "timestep", "encoder_hidden_states", "text_embeds",
                               "time_ids"]
    assert unet_inputs[5:] == list(residual_names(len(unet_inputs) - 6))
    assert unet_outputs == ["out_sample"]
    assert manifest.components["unet"].inputs["time_ids"].shape == (None, 6)
    assert "validation" in manifest.components["text_encoder_2"].extra
    for name in ("tokenizer_2/vocab.json", "text_encoder_2/config.json"):
        assert (tiny_sdxl_onnx_dir / name).is_file()
    index = json.loads((tiny_sdxl_onnx_dir / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline"


def test_turbo_export_records_its_family(tiny_sdxl_turbo_onnx_dir):
    assert Manifest.load(tiny_sdxl_turbo_onnx_dir).family == "sdxl-turbo"


# ---------------------------------------------------------------- runtime


def test_conditioning_rows(tiny_sdxl_onnx_dir):
    conditioner = Pipeline.load(tiny_sdxl_onnx_dir).conditioner
    cond = conditioner(PROMPT, "", guided=True, width=72, height=56)
    assert cond.context.shape == (2, 77, 64)  # both encoders' 32 wide states side by side
    assert cond.added["text_embeds"].shape == (2, 32)
    # force_zeros_for_empty_prompt: an empty negative prompt is zeros, not encoded "".
    assert not cond.context[0].any() and not cond.added["text_embeds"][0].any()
    assert cond.added["time_ids"].tolist() == [[56, 72, 0, 0, 56, 72]] * 2
    encoded = replace(conditioner, zeros_for_empty_negative=False)(
        PROMPT, "", guided=True, width=72, height=56)
    assert encoded.context[0].any() and np.array_equal(encoded.context[1], cond.context[1])
    assert conditioner(PROMPT, NEGATIVE, guided=False, width=64, height=64).context.shape[0] == 1


# ---------------------------------------------------------------- parity with diffusers

parity = pytest.mark.parity


@pytest.fixture(scope="module")
def sdxl_reference(tiny_sdxl_dir):
    return load_reference(tiny_sdxl_dir)


@parity
@pytest.mark.parametrize("size", PARITY_SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("negative", [None, NEGATIVE], ids=["no-negative", "negative"])
def test_images_equal_diffusers(sdxl_reference, tiny_sdxl_onnx_dir, backend, negative, size):
    width, height = size
    expected = reference_images(sdxl_reference, "euler", steps=4, guidance=6.0, width=width,
                                height=height, seed=7, num_images=2, negative=negative)
    images = Pipeline.load(tiny_sdxl_onnx_dir, backend).generate(
        PROMPT, negative_prompt=negative or "", steps=4, guidance_scale=6.0, width=width,
        height=height, seed=7, num_images=2, sampler="euler")
    got = as_array(images)
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() <= MAX_PIXEL_DIFF[backend]


@parity
def test_turbo_one_step_without_guidance_equals_diffusers(tiny_sdxl_turbo_dir,
                                                          tiny_sdxl_turbo_onnx_dir, backend,
                                                          monkeypatch):
    pipe = Pipeline.load(tiny_sdxl_turbo_onnx_dir, backend)
    calls = count_unet_calls(pipe, monkeypatch)
    images = pipe.generate(PROMPT, seed=5, num_images=2)  # the family's 1 step, guidance 0
    assert [shape[0] for shape in calls] == [2]  # one UNet call, no uncond half
    expected = reference_images(load_reference(tiny_sdxl_turbo_dir), "euler_a", steps=1,
                                guidance=0.0, width=64, height=64, seed=5, num_images=2,
                                negative=None)
    assert np.abs(as_array(images) - expected).max() <= MAX_PIXEL_DIFF[backend]


# ---------------------------------------------------------------- full size (slow)


@pytest.mark.slow
def test_full_size_sdxl_exports_and_generates_one_step(tmp_path_factory):
    # 13.9 GB of random fp32 weights written, exported and checked against torch (≈ 5 min on a
    # 2-core CPU, peak RSS 15.4 GB), then one guided step at 1024² (≈ 2.5 min, peak 20.6 GB):
    # benchmarks/RESULTS.md. Too heavy for CI's machines, hence slow.
    from tests.conftest import _build, _export

    folder = _export(_build("sdxl", tmp_path_factory), tmp_path_factory)
    assert Manifest.load(folder).family == "sdxl"
    image = Pipeline.load(folder).generate(PROMPT, steps=1, seed=0)[0]
    assert image.size == (1024, 1024)
