"""Model families: detection from configs, per-family defaults, and parity with diffusers for
SD 2.x (v-prediction, OpenCLIP-style gelu text encoder, `!` padding) and SD-Turbo (trailing
spacing, guidance off: one UNet call per step)."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdrt.runtime.errors import ModelError
from sdrt.runtime.model.families import FAMILIES, check_override, detect_family
from sdrt.runtime.model.manifest import MANIFEST_NAME, Manifest
from sdrt.runtime.pipeline import GenerationRequest, Pipeline
from tests.cli.test_cli import assert_one_line_error, run
from tests.conftest import (
    MAX_PIXEL_DIFF,
    NEGATIVE,
    ROOT,
    as_array,
    count_unet_calls,
    load_reference,
    reference_images,
)

CONFIGS = ROOT / "models" / "configs"
# `!` is SD 2.x's pad token (id 0): in a prompt each one is its own token, as transformers has it.
BANG_PROMPT = "a red circle!! on a blue background!"


def configs_of(arch: str) -> dict[str, dict]:
    """The configs detect_family reads, from models/configs/<arch>."""
    files = {"index": "model_index.json", "unet": "unet/config.json", "vae": "vae/config.json",
             "text_encoder": "text_encoder/config.json",
             "scheduler": "scheduler/scheduler_config.json"}
    if (CONFIGS / arch / "text_encoder_2").is_dir():  # SDXL
        files["text_encoder_2"] = "text_encoder_2/config.json"
    return {key: json.loads((CONFIGS / arch / rel).read_text()) for key, rel in files.items()}


# ---------------------------------------------------------------- detection (no torch needed)


@pytest.mark.parametrize(("arch", "family"), [
    ("tiny_sd", "sd1"), ("sd15", "sd1"), ("tiny_sd2", "sd2"), ("sd21", "sd2"),
    ("tiny_turbo", "sd-turbo"), ("sd_turbo", "sd-turbo"), ("tiny_sdxl", "sdxl"),
    ("sdxl", "sdxl"), ("tiny_sdxl_turbo", "sdxl-turbo"), ("sdxl_turbo", "sdxl-turbo"),
    ("tiny_sd_lcm", "lcm"), ("tiny_sdxl_lcm", "lcm-sdxl"), ("tiny_sd_inpaint", "sd1-inpainting"),
])
def test_family_detected_from_configs(arch, family):
    assert detect_family(**configs_of(arch)) == family


def test_sd2_base_and_zero_snr_fine_tunes_are_not_turbo():
    configs = configs_of("sd21")
    configs["unet"]["sample_size"] = 64  # SD 2.x base: epsilon at 512, no spacing key
    configs["scheduler"].update(prediction_type="epsilon", _class_name="PNDMScheduler")
    assert detect_family(**configs) == "sd2"
    configs = configs_of("sd21")  # v-prediction with trailing spacing: zero terminal SNR
    configs["scheduler"]["timestep_spacing"] = "trailing"
    assert detect_family(**configs) == "sd2"


def test_each_sd2_sign_alone_is_enough():
    for part, key, value in [("text_encoder", "hidden_act", "gelu"),
                             ("unet", "use_linear_projection", True)]:
        configs = configs_of("tiny_sd")
        configs[part][key] = value
        assert detect_family(**configs) == "sd2"


@pytest.mark.parametrize(("part", "change", "fragment"), [
    ("index", {"text_encoder_2": ["transformers", "CLIPTextModelWithProjection"]}, "only one"),
    ("unet", {"addition_embed_type": "text_time"}, "only one"),
    ("unet", {"time_cond_proj_dim": 256}, "SD 1.x and SDXL only, not on SD 2.x"),
    ("unet", {"in_channels": 5}, "depth and other image-conditioned UNets"),
    ("unet", {"in_channels": 9, "time_cond_proj_dim": 256}, "LCM inpainting"),
    ("unet", {"cross_attention_dim": 1024}, "cross_attention_dim"),
])
def test_unsupported_models_are_refused_with_a_reason(part, change, fragment):
    configs = configs_of("tiny_sd2")
    configs[part].update(change)
    with pytest.raises(ModelError, match=fragment) as info:
        detect_family(**configs)
    assert "\n" not in str(info.value)


def test_inpainting_is_recognised_from_the_unet_input_channels_not_names():
    configs = configs_of("tiny_sd2")
    configs["unet"]["in_channels"] = 9  # latents 4 + mask 1 + masked-image latents 4
    assert detect_family(**configs) == "sd2-inpainting"
    configs = configs_of("tiny_sd_inpaint")
    configs["index"]["_class_name"] = "StableDiffusionPipeline"  # the name does not matter
    assert detect_family(**configs) == "sd1-inpainting"
    configs = configs_of("tiny_sdxl")
    configs["unet"]["in_channels"] = 9
    with pytest.raises(ModelError, match="SDXL inpainting UNets"):
        detect_family(**configs)
    with pytest.raises(ModelError, match="inpainting"):
        check_override("sd1-inpainting", "sd1")


def test_family_override_keeps_the_architecture():
    assert check_override("sd2", "sd-turbo") == "sd-turbo"
    assert check_override("sd-turbo", "sd2") == "sd2"
    with pytest.raises(ModelError, match="does not fit"):
        check_override("sd1", "sd-turbo")
    with pytest.raises(ModelError, match="not supported"):
        check_override("sd1", "flux")
    with pytest.raises(ModelError, match="does not fit"):
        check_override("sd1", "sd3")
    with pytest.raises(ModelError, match="does not fit"):
        check_override("sd2", "sdxl-turbo")


def test_every_family_default_is_valid():
    for family in FAMILIES.values():
        assert family.steps >= 1 and family.guidance_scale >= 0
        assert family.architecture in FAMILIES  # each architecture's plain family exists


# ---------------------------------------------------------------- export records the family


def test_sdxl_index_without_second_encoder_names_it(tiny_sd_dir, tmp_path):
    from sdrt.export.source import read_source

    src = shutil.copytree(tiny_sd_dir, tmp_path / "src")
    index = json.loads((src / "model_index.json").read_text())
    index.update(_class_name="StableDiffusionXLPipeline",
                 text_encoder_2=["transformers", "CLIPTextModelWithProjection"])
    (src / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ModelError, match="incomplete: 'text_encoder_2/' is missing"):
        read_source(src)


def test_manifest_records_the_family(tiny_onnx_dir, tiny_sd2_onnx_dir, tiny_turbo_onnx_dir):
    found = [Manifest.load(folder).family
             for folder in (tiny_onnx_dir, tiny_sd2_onnx_dir, tiny_turbo_onnx_dir)]
    assert found == ["sd1", "sd2", "sd-turbo"]
    assert Manifest.load(tiny_sd2_onnx_dir).prediction_type == "v_prediction"


def test_export_family_override(tiny_sd2_dir, tmp_path):
    from sdrt.export.source import read_source

    assert read_source(tiny_sd2_dir, "sd-turbo").family == "sd-turbo"
    result = run("export", tiny_sd2_dir, tmp_path / "out", "--family", "sd1")
    assert_one_line_error(result, "family 'sd1' (SD 1.x) does not fit")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- runtime defaults per family


def resolved(folder: Path, **fields) -> GenerationRequest:
    pipe = Pipeline.load(folder)
    return GenerationRequest("x", **fields).resolve(pipe.facts, pipe.scheduler)


@pytest.mark.parametrize(("folder", "want"), [
    ("tiny_onnx_dir", ("sd1", 20, 7.5, "pndm", 64)),
    ("tiny_sd2_onnx_dir", ("sd2", 20, 7.5, "ddim", 96)),  # 96 = 768-v's 1.5 × the base size
    ("tiny_turbo_onnx_dir", ("sd-turbo", 1, 0.0, "euler", 64)),
    ("tiny_sdxl_onnx_dir", ("sdxl", 25, 5.0, "euler", 64)),
    ("tiny_sdxl_turbo_onnx_dir", ("sdxl-turbo", 1, 0.0, "euler_a", 64)),
])
def test_defaults_follow_the_family(request, folder, want):
    path = request.getfixturevalue(folder)
    req = resolved(path)
    assert (Pipeline.load(path).facts.family.name, req.steps, req.guidance_scale, req.sampler,
            req.width) == want
    assert req.height == req.width
    explicit = resolved(path, steps=3, guidance_scale=2.0, sampler="Euler a", width=48)
    assert (explicit.steps, explicit.guidance_scale, explicit.sampler, explicit.width) == (
        3, 2.0, "euler_a", 48)


def test_folder_without_manifest_detects_its_family(tiny_turbo_onnx_dir, tmp_path):
    folder = shutil.copytree(tiny_turbo_onnx_dir, tmp_path / "optimum-like")
    (folder / MANIFEST_NAME).unlink()
    assert Pipeline.load(folder).facts.family.name == "sd-turbo"


def test_unknown_family_in_manifest_is_refused_at_load(tiny_onnx_dir, tmp_path):
    folder = shutil.copytree(tiny_onnx_dir, tmp_path / "future")
    data = json.loads((folder / MANIFEST_NAME).read_text())
    (folder / MANIFEST_NAME).write_text(json.dumps({**data, "family": "flux"}))
    with pytest.raises(ModelError, match="model family 'flux' is not supported"):
        Pipeline.load(folder)


def test_inpainting_export_records_the_family_and_a_9_channel_unet(tiny_inpaint_onnx_dir,
                                                                    tmp_path):
    manifest = Manifest.load(tiny_inpaint_onnx_dir)
    assert manifest.family == "sd1-inpainting"
    assert manifest.components["unet"].inputs["sample"].shape == (None, 9, None, None)
    assert "validation" in manifest.components["unet"].extra
    folder = shutil.copytree(tiny_inpaint_onnx_dir, tmp_path / "optimum-like")
    (folder / MANIFEST_NAME).unlink()  # detected from unet/config.json's in_channels alone
    assert Pipeline.load(folder).facts.family.name == "sd1-inpainting"


def test_family_and_unet_channels_must_agree(tiny_onnx_dir, tmp_path):
    folder = shutil.copytree(tiny_onnx_dir, tmp_path / "mislabelled")
    data = json.loads((folder / MANIFEST_NAME).read_text())
    (folder / MANIFEST_NAME).write_text(json.dumps({**data, "family": "sd1-inpainting"}))
    with pytest.raises(ModelError, match="takes 4 input channels"):
        Pipeline.load(folder)


def test_cli_turbo_defaults_and_metadata(tiny_turbo_onnx_dir, tmp_path):
    out = tmp_path / "turbo.png"
    result = run("generate", "a cat", "--model", tiny_turbo_onnx_dir, "--seed", "4", "-o", out)
    assert result.exit_code == 0, result.output
    params = Image.open(out).info["parameters"].split("\n")[-1]
    assert params.startswith("Steps: 1, Sampler: Euler, CFG scale: 0, Seed: 4, Size: 64x64")


# ---------------------------------------------------------------- parity with diffusers

parity = pytest.mark.parity


@pytest.fixture(scope="module")
def sd2_reference(tiny_sd2_dir):
    return load_reference(tiny_sd2_dir)


@pytest.fixture(scope="module")
def turbo_reference(tiny_turbo_dir):
    return load_reference(tiny_turbo_dir)


@parity
def test_sd2_pads_with_bang(tiny_sd2_onnx_dir):
    tokenizer = Pipeline.load(tiny_sd2_onnx_dir).tokenizer
    ids = tokenizer([BANG_PROMPT])[0]
    assert tokenizer.pad_id == 0 and ids[-1] == 0
    transformers = pytest.importorskip("transformers")
    reference = transformers.CLIPTokenizer.from_pretrained(tiny_sd2_onnx_dir / "tokenizer")
    want = reference(BANG_PROMPT, padding="max_length", max_length=77).input_ids
    assert ids.tolist() == want


@parity
@pytest.mark.parametrize("sampler", ["ddim", "euler_a", "dpmpp_2m"])
def test_sd2_v_prediction_images_equal_diffusers(sd2_reference, tiny_sd2_onnx_dir, backend,
                                                 sampler):
    expected = reference_images(sd2_reference, sampler, steps=4, guidance=6.0, width=72,
                                height=56, seed=9, num_images=2, prompt=BANG_PROMPT)
    images = Pipeline.load(tiny_sd2_onnx_dir, backend).generate(
        BANG_PROMPT, negative_prompt=NEGATIVE, steps=4, guidance_scale=6.0, width=72,
        height=56, seed=9, num_images=2, sampler=sampler)
    assert np.abs(as_array(images) - expected).max() <= MAX_PIXEL_DIFF[backend]


@parity
def test_sd2_defaults_equal_diffusers_defaults(sd2_reference, tiny_sd2_onnx_dir, backend):
    # diffusers' own defaults for this folder: its DDIM scheduler, 96 px (sample_size × 2).
    expected = reference_images(sd2_reference, "ddim", steps=20, guidance=7.5, width=96,
                                height=96, seed=2, num_images=1, prompt=BANG_PROMPT)
    images = Pipeline.load(tiny_sd2_onnx_dir, backend).generate(
        BANG_PROMPT, negative_prompt=NEGATIVE, seed=2)
    assert np.abs(as_array(images) - expected).max() <= MAX_PIXEL_DIFF[backend]


@parity
@pytest.mark.parametrize(("steps", "sampler"), [(1, None), (2, None), (4, None), (4, "euler_a")])
def test_turbo_images_equal_diffusers_one_unet_call_per_step(
        turbo_reference, tiny_turbo_onnx_dir, backend, steps, sampler, monkeypatch):
    pipe = Pipeline.load(tiny_turbo_onnx_dir, backend)
    calls = count_unet_calls(pipe, monkeypatch)
    options = {} if steps == 1 else {"steps": steps}  # 1 step is SD-Turbo's default
    images = pipe.generate(BANG_PROMPT, seed=5, num_images=2, sampler=sampler, **options)
    assert [shape[0] for shape in calls] == [2] * steps  # the images only, no uncond half
    expected = reference_images(turbo_reference, sampler or "euler", steps=steps, guidance=0.0,
                                width=64, height=64, seed=5, num_images=2, negative=None,
                                prompt=BANG_PROMPT)
    assert np.abs(as_array(images) - expected).max() <= MAX_PIXEL_DIFF[backend]
