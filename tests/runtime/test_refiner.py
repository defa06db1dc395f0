"""SDXL refiner: detection, export in optimum's layout, aesthetic-score conditioning, and base →
refiner generation equal to diffusers' two-pipeline flow (StableDiffusionXLPipeline with
denoising_end, output_type="latent", then StableDiffusionXLImg2ImgPipeline with
denoising_start) on the same weights and seeds, on ONNX Runtime and OpenVINO; the refiner's own
image-to-image equal to StableDiffusionXLImg2ImgPipeline."""

import json

import numpy as np
import pytest
from PIL import Image

from sdrt.cli.main import main
from sdrt.runtime.errors import InputError, ModelError
from sdrt.runtime.metadata import parse_parameters
from sdrt.runtime.model.check import check_model
from sdrt.runtime.model.families import detect_family
from sdrt.runtime.model.manifest import Manifest
from sdrt.runtime.pipeline import Pipeline
from sdrt.runtime.refiner import check_refiner_start, switch_step
from sdrt.runtime.schedules import SchedulerConfig
from tests.conftest import (
    MAX_PIXEL_DIFF,
    NEGATIVE,
    PROMPT,
    _build,
    _export,
    as_array,
    count_unet_calls,
    load_reference,
    use_sampler,
)
from tests.runtime.model.test_families import CONFIGS, configs_of

SEED, GUIDANCE = 11, 6.0

# ---------------------------------------------------------------- detection (no torch needed)


def refiner_configs(arch: str) -> dict[str, dict | None]:
    """What detect_family reads, from models/configs/<arch> (configs_of wants text_encoder/)."""
    files = {"index": "model_index.json", "unet": "unet/config.json", "vae": "vae/config.json",
             "scheduler": "scheduler/scheduler_config.json",
             "text_encoder_2": "text_encoder_2/config.json"}
    configs = {key: json.loads((CONFIGS / arch / rel).read_text()) for key, rel in files.items()}
    return {**configs, "text_encoder": None}


def picture(width: int, height: int) -> Image.Image:
    """A smooth picture for image-to-image: colour gradients."""
    ys, xs = np.mgrid[0:height, 0:width] / max(width, height)
    pixels = np.stack([xs, ys, 1 - xs * ys], axis=-1) * 200 + 30
    return Image.fromarray(pixels.astype(np.uint8))


@pytest.mark.parametrize("arch", ["tiny_sdxl_refiner", "sdxl_refiner"])
def test_refiner_configs_are_recognised(arch):
    assert detect_family(**refiner_configs(arch)) == "sdxl-refiner"


def test_refiner_signs_are_checked():
    configs = refiner_configs("tiny_sdxl_refiner")
    configs["unet"]["projection_class_embeddings_input_dim"] = 80  # six time ids
    with pytest.raises(ModelError, match="takes 6.0 time ids, the SDXL refiner 5"):
        detect_family(**configs)
    configs = refiner_configs("tiny_sdxl_refiner")
    configs["unet"]["cross_attention_dim"] = 64
    with pytest.raises(ModelError, match="text encoders' hidden size 32"):
        detect_family(**configs)
    configs = configs_of("tiny_sdxl")  # two encoders with the refiner's aesthetic-score UNet
    configs["unet"]["projection_class_embeddings_input_dim"] = 72
    with pytest.raises(ModelError, match="aesthetic-score time ids, but the model has two"):
        detect_family(**configs)


def test_refiner_start_must_be_inside_the_schedule():
    assert check_refiner_start(0.8) == 0.8
    for bad in (0, 1, 1.5, -0.2, True, "0.8", float("nan")):
        with pytest.raises(InputError, match="refiner start must be a number between 0 and 1"):
            check_refiner_start(bad)


def test_switch_step_is_diffusers_cutoff():
    # Euler, "leading" + steps_offset 1, 10 steps: timesteps 901, 801, …, 1; the cutoff
    # round(1000 − 0.8 · 1000) = 200 leaves 8 calls to the base, 2 to the refiner.
    config = SchedulerConfig.from_file(CONFIGS / "sdxl" / "scheduler" / "scheduler_config.json")
    assert switch_step(config, "euler", 10, 0.8) == 8
    assert switch_step(config, "euler", 10, 0.85) == 8  # cutoff 150: 201 is the last above
    assert switch_step(config, "euler", 10, 0.1) == 1  # cutoff 900: 901 only


# ---------------------------------------------------------------- export

@pytest.fixture(scope="module")
def refiner_dir(tmp_path_factory):
    return _build("tiny_sdxl_refiner", tmp_path_factory)


@pytest.fixture(scope="module")
def refiner_onnx_dir(refiner_dir, tmp_path_factory):
    return _export(refiner_dir, tmp_path_factory)


def test_export_writes_the_refiners_layout(refiner_onnx_dir):
    manifest = Manifest.load(refiner_onnx_dir)
    assert manifest.family == "sdxl-refiner"
    io = {name: (list(spec.inputs), list(spec.outputs))
          for name, spec in manifest.components.items()}
    assert set(io) == {"text_encoder_2", "unet", "vae_encoder", "vae_decoder"}
    assert io["text_encoder_2"] == (["input_ids"],
                                    ["text_embeds", "last_hidden_state", "hidden_states.4"])
    assert io["unet"][0] == ["sample", "timestep", "encoder_hidden_states", "text_embeds",
                             "time_ids"]
    assert manifest.components["unet"].inputs["time_ids"].shape == (None, 5)
    assert not (refiner_onnx_dir / "text_encoder").exists()
    assert not (refiner_onnx_dir / "tokenizer").exists()
    report = check_model(refiner_onnx_dir)
    assert report.family == "sdxl-refiner" and not report.problems


def test_conditioning_rows(refiner_onnx_dir):
    conditioner = Pipeline.load(refiner_onnx_dir).conditioner
    cond = conditioner(PROMPT, "", guided=True, width=72, height=56)
    assert cond.context.shape == (2, 77, 32)  # text_encoder_2's penultimate state alone
    assert cond.added["text_embeds"].shape == (2, 32)
    # aesthetic score 2.5 on the negative row, 6 on the prompt's; no target size
    assert cond.added["time_ids"].tolist() == [[56, 72, 0, 0, 2.5], [56, 72, 0, 0, 6.0]]
    # force_zeros_for_empty_prompt is false for the refiner: "" is encoded, not zeros
    assert cond.context[0].any() and cond.added["text_embeds"][0].any()


# ---------------------------------------------------------------- parity with diffusers

parity = pytest.mark.parity


@pytest.fixture(scope="module")
def references(tiny_sdxl_dir, refiner_dir):
    """diffusers' base and refiner pipelines on the same weights as the exports."""
    return load_reference(tiny_sdxl_dir), load_reference(refiner_dir)


@pytest.fixture(scope="module")
def pipes(backend, tiny_sdxl_onnx_dir, refiner_onnx_dir):
    return Pipeline.load(tiny_sdxl_onnx_dir, backend), Pipeline.load(refiner_onnx_dir, backend)


def reference_refined(references, sampler, *, steps, start, size, num_images, negative):
    """diffusers' two-pipeline flow: the base's latents at denoising_end, handed to the
    refiner at denoising_start, with the same torch generators (their streams go on)."""
    import torch

    base, refiner = references
    use_sampler(base, sampler)
    use_sampler(refiner, sampler)
    generators = [torch.Generator().manual_seed(SEED + i) for i in range(num_images)]
    options = dict(num_inference_steps=steps, guidance_scale=GUIDANCE, generator=generators,
                   num_images_per_prompt=num_images, negative_prompt=negative)
    latents = base(PROMPT, width=size[0], height=size[1], denoising_end=start,
                   output_type="latent", **options).images
    out = refiner(PROMPT, image=latents, denoising_start=start, output_type="np", **options)
    return np.round(out.images * 255).astype(np.int16)


# Euler (the folders' scheduler, the default switch), ancestral Euler (its per-step draws go on
# in the generators' streams), DPM++ 2M (multistep history restarts at the switch; diffusers'
# VP latents) and a size not a multiple of 64. OpenVINO recompiles for every new shape, so it
# runs the two Euler cases only (DPM++'s handover is the same NumPy code on either backend).
CASES = [("euler", 5, 0.8, (64, 64), NEGATIVE), ("euler_a", 6, 0.7, (72, 56), NEGATIVE),
         ("dpmpp_2m", 6, 0.6, (64, 64), None)]


@parity
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[1]}-{c[2]}")
def test_base_then_refiner_equals_diffusers(references, pipes, backend, case, monkeypatch):
    sampler, steps, start, size, negative = case
    if backend == "openvino" and sampler == "dpmpp_2m":
        pytest.skip("OpenVINO runs the Euler cases (see CASES)")
    base, refiner = pipes
    base_calls = count_unet_calls(base, monkeypatch)
    refiner_calls = count_unet_calls(refiner, monkeypatch)
    images = base.generate(PROMPT, negative_prompt=negative or "", steps=steps,
                           guidance_scale=GUIDANCE, sampler=sampler, seed=SEED, width=size[0],
                           height=size[1], num_images=2, refiner=refiner, refiner_start=start)
    handed = switch_step(base.scheduler, sampler, steps, start)
    assert 0 < handed < steps
    assert len(base_calls) == handed and len(refiner_calls) == steps - handed
    expected = reference_refined(references, sampler, steps=steps, start=start, size=size,
                                 num_images=2, negative=negative)
    got = as_array(images)
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() <= MAX_PIXEL_DIFF[backend]
    params = parse_parameters(images[0].info["parameters"])
    assert params["Model"] == base.facts.name
    assert params["Refiner"] == f"{refiner.facts.name} [{refiner.facts.unet_sha256[:10]}]"
    assert float(params["Refiner switch at"]) == start


# The tiny random refiner barely reacts to its time ids in pixels (an aesthetic score of 2.5 for
# 6 moves the image by 1/255), so the UNet's inputs are compared too, call by call: the same
# timesteps (the switch), time ids, text conditioning and latents as diffusers' refiner UNet.
# ORT vs torch float32 over a few steps of the tiny graphs (each export-checked at 1e-5).
FEED_ATOL = 1e-4


@parity
def test_refiner_unet_sees_what_diffusers_refiner_unet_sees(references, tiny_sdxl_onnx_dir,
                                                            refiner_onnx_dir, monkeypatch):
    base, refiner = Pipeline.load(tiny_sdxl_onnx_dir), Pipeline.load(refiner_onnx_dir)
    ours, theirs = [], []
    run = refiner.unet.session.run
    monkeypatch.setattr(refiner.unet.session, "run",
                        lambda feeds: ours.append(dict(feeds)) or run(feeds))
    forward = references[1].unet.forward

    def spy(sample, timestep, encoder_hidden_states, *args, added_cond_kwargs, **kwargs):
        theirs.append({"sample": sample.numpy(), "timestep": float(timestep),
                       "encoder_hidden_states": encoder_hidden_states.numpy(),
                       **{name: value.numpy() for name, value in added_cond_kwargs.items()}})
        return forward(sample, timestep, encoder_hidden_states, *args,
                       added_cond_kwargs=added_cond_kwargs, **kwargs)

    monkeypatch.setattr(references[1].unet, "forward", spy)
    base.generate(PROMPT, negative_prompt=NEGATIVE, steps=6, guidance_scale=GUIDANCE,
                  sampler="euler_a", seed=SEED, width=72, height=56, refiner=refiner,
                  refiner_start=0.7)
    reference_refined(references, "euler_a", steps=6, start=0.7, size=(72, 56), num_images=1,
                      negative=NEGATIVE)
    assert len(ours) == len(theirs) == 2  # timesteps 167 and 1 are below the cutoff 300
    for got, want in zip(ours, theirs, strict=True):
        assert float(got["timestep"]) == want["timestep"]
        assert got["time_ids"].tolist() == [[56, 72, 0, 0, 2.5], [56, 72, 0, 0, 6.0]]
        assert np.array_equal(got["time_ids"], want["time_ids"])
        for name in ("sample", "encoder_hidden_states", "text_embeds"):
            np.testing.assert_allclose(got[name], want[name], atol=FEED_ATOL, err_msg=name)


@parity
def test_refiner_img2img_equals_diffusers(references, pipes, backend):
    _, reference = references
    use_sampler(reference, "euler")
    import torch

    generators = [torch.Generator().manual_seed(SEED + i) for i in range(2)]
    out = reference(PROMPT, image=picture(64, 64), strength=0.6, num_inference_steps=5,
                    guidance_scale=GUIDANCE, negative_prompt=NEGATIVE, generator=generators,
                    num_images_per_prompt=2, output_type="np")
    got = as_array(pipes[1].img2img(picture(64, 64), PROMPT, strength=0.6, steps=5,
                                    guidance_scale=GUIDANCE, negative_prompt=NEGATIVE,
                                    seed=SEED, num_images=2, sampler="euler"))
    assert np.abs(got - np.round(out.images * 255).astype(np.int16)).max() \
        <= MAX_PIXEL_DIFF[backend]


# ---------------------------------------------------------------- API and CLI


def test_callback_counts_both_runs_and_stops(tiny_sdxl_onnx_dir, refiner_onnx_dir):
    base, refiner = Pipeline.load(tiny_sdxl_onnx_dir), Pipeline.load(refiner_onnx_dir)
    seen = []
    base.generate(PROMPT, steps=5, seed=1, refiner=refiner,
                  callback=lambda i, n, latents: seen.append((i, n)))
    assert seen == [(i, 5) for i in range(5)]  # 4 base calls, then 1 of the refiner's
    seen.clear()
    base.generate(PROMPT, steps=5, seed=1, refiner=refiner,
                  callback=lambda i, n, latents: seen.append(i) or i == 2)
    assert seen == [0, 1, 2]


def test_unfit_pairs_are_refused(tiny_sdxl_onnx_dir, refiner_onnx_dir, tiny_onnx_dir):
    base, refiner = Pipeline.load(tiny_sdxl_onnx_dir), Pipeline.load(refiner_onnx_dir)
    with pytest.raises(InputError, match="the base model must be SDXL"):
        refiner.generate(PROMPT, steps=2, refiner=base)
    with pytest.raises(InputError, match="the base model must be SDXL"):
        Pipeline.load(tiny_onnx_dir).generate(PROMPT, steps=2, refiner=refiner)
    with pytest.raises(InputError, match="refiner start must be"):
        base.generate(PROMPT, steps=4, refiner=refiner, refiner_start=1.0)
    with pytest.raises(InputError, match="leaves the refiner no step of 4: lower it"):
        base.generate(PROMPT, steps=4, refiner=refiner, refiner_start=0.999)
    with pytest.raises(InputError, match="leaves the base no step of 4: raise it"):
        base.generate(PROMPT, steps=4, refiner=refiner, refiner_start=0.01)
    with pytest.raises(InputError, match="'Heun' makes two model calls a step"):
        base.generate(PROMPT, steps=4, refiner=refiner, sampler="Heun")


def run_cli(*args):
    from click.testing import CliRunner

    return CliRunner().invoke(main, [str(a) for a in args])


def test_cli_generate_with_refiner(tiny_sdxl_onnx_dir, refiner_onnx_dir, tmp_path):
    out = tmp_path / "refined.png"
    result = run_cli("generate", PROMPT, "--model", tiny_sdxl_onnx_dir, "--refiner",
                     refiner_onnx_dir, "--refiner-start", "0.7", "--steps", "5", "--seed", "3",
                     "-o", out)
    assert result.exit_code == 0, result.output
    params = parse_parameters(Image.open(out).info["parameters"])
    assert params["Model"] == tiny_sdxl_onnx_dir.name
    assert params["Refiner"].startswith(refiner_onnx_dir.name + " [")
    assert params["Refiner switch at"] == "0.7"
    result = run_cli("generate", PROMPT, "--model", tiny_sdxl_onnx_dir, "--refiner-start", "0.7",
                     "-o", tmp_path / "x.png")
    assert result.exit_code == 1 and "error: --refiner-start needs --refiner" in result.output


def test_loras_are_the_bases_alone(tiny_sdxl_onnx_dir, refiner_onnx_dir, tmp_path):
    """A LoRA (given or tagged) changes the base's part; the refiner, whose layers an SDXL LoRA
    does not fit, runs without it instead of refusing the request."""
    from tests.runtime.adapters.lora_files import SDXL_SGM, write_lora

    lora = write_lora(tmp_path / "sdxl.safetensors", SDXL_SGM, seed=4)
    base, refiner = Pipeline.load(tiny_sdxl_onnx_dir), Pipeline.load(refiner_onnx_dir)
    options = {"steps": 4, "seed": 3, "width": 64, "height": 64, "refiner": refiner}
    plain = np.asarray(base.generate(PROMPT, **options)[0], dtype=np.int16)
    given = base.generate(PROMPT, loras=[(str(lora), 0.8)], **options)[0]
    tagged = base.generate(f"{PROMPT} <lora:{lora}:0.8>", **options)[0]
    assert np.abs(np.asarray(given, dtype=np.int16) - plain).max() > 0
    assert np.array_equal(np.asarray(given), np.asarray(tagged))
    assert 'Lora hashes: "sdxl: ' in given.info["parameters"]
