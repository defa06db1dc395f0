"""ControlNet end to end: sdrt's images equal diffusers' StableDiffusion(XL)ControlNet(Img2Img)
Pipeline's from the same weights, control images and seeds, on ONNX Runtime and OpenVINO.

The ControlNets are ControlNetModel.from_unet of the tiny UNets with their zero convolutions
given non-zero weights (tests/export/controlnet_checkpoint.py), so control changes the image;
each is exported once for the module. Control images are given at the output size, so neither
side resizes them (sdrt's and diffusers' resizing are checked in test_preprocess.py).
"""

from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from sdrt.runtime.control.unit import ControlUnit
from sdrt.runtime.pipeline import Pipeline
from tests.conftest import MAX_PIXEL_DIFF, NEGATIVE, PROMPT, as_array, use_sampler

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

pytestmark = pytest.mark.parity

STEPS, GUIDANCE, SEED, SAMPLER = 4, 6.0, 11, "euler"
SIZE = (72, 56)  # not multiples of 64: the residuals' maps are ceil-halved
# A control that changes nothing would pass every comparison: each case also differs from the
# same run without control by more than this (8-bit levels).
MIN_CONTROL_EFFECT = 8


def control_picture(width: int, height: int, seed: int) -> Image.Image:
    """A seeded map of white strokes on black, as an edge map looks."""
    rng = np.random.default_rng(seed)
    pixels = np.zeros((height, width, 3), np.uint8)
    for _ in range(6):
        y, x = rng.integers(0, height - 4), rng.integers(0, width - 16)
        pixels[y:y + 3, x:x + 16] = 255  # across
        y, x = rng.integers(0, height - 16), rng.integers(0, width - 4)
        pixels[y:y + 16, x:x + 3] = 255  # down
    return Image.fromarray(pixels)


def init_picture(width: int, height: int) -> Image.Image:
    """A smooth seeded picture for image-to-image."""
    ys, xs = np.mgrid[0:height, 0:width] / max(width, height)
    pixels = np.stack([xs, ys, 1 - xs], axis=-1) * 180 + 30
    return Image.fromarray(pixels.astype(np.uint8))


def generators(num_images: int = 1) -> list:
    return [torch.Generator().manual_seed(SEED + i) for i in range(num_images)]


def reference_pixels(pipe, **options) -> np.ndarray:
    use_sampler(pipe, SAMPLER)
    out = pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=STEPS,
               guidance_scale=GUIDANCE, generator=generators(), output_type="np", **options)
    return np.round(out.images * 255).astype(np.int16)


def _torch_net(folder):
    return diffusers.ControlNetModel.from_pretrained(folder)


@pytest.fixture(scope="module")
def nets(tiny_sd_dir, tmp_path_factory):
    """Two tiny SD ControlNets (diffusers folders) and their exports."""
    from sdrt.export.onnx_export import export_pipeline
    from tests.export.controlnet_checkpoint import tiny_controlnet

    tmp = tmp_path_factory.mktemp("control")
    made = [tiny_controlnet(tiny_sd_dir / "unet", tmp / f"cn{seed}", seed=seed)
            for seed in (0, 1)]
    return made, [export_pipeline(cn, tmp / f"{cn.name}-onnx") for cn in made]


@pytest.fixture(scope="module")
def reference(tiny_sd_dir, nets):
    """diffusers' images from its ControlNet pipelines on the tiny SD weights (one net, two
    nets, img2img), each computed once for both backends: reference(kind, case, **options)."""
    base = diffusers.StableDiffusionPipeline.from_pretrained(
        tiny_sd_dir, safety_checker=None, requires_safety_checker=False)
    torch_nets = [_torch_net(folder) for folder in nets[0]]
    pipes = {
        "one": diffusers.StableDiffusionControlNetPipeline(**base.components,
                                                           controlnet=torch_nets[0]),
        "two": diffusers.StableDiffusionControlNetPipeline(**base.components,
                                                           controlnet=torch_nets),
        "img2img": diffusers.StableDiffusionControlNetImg2ImgPipeline(**base.components,
                                                                      controlnet=torch_nets[0]),
    }
    for pipe in pipes.values():
        pipe.set_progress_bar_config(disable=True)
        pipe.folder_scheduler_config = base.scheduler.config
    cache = {}

    def images(kind: str, case: str, **options) -> np.ndarray:
        if (kind, case) not in cache:
            cache[kind, case] = reference_pixels(pipes[kind], **options)
        return cache[kind, case]

    return images


@pytest.fixture(scope="module", params=["ort", "openvino"])
def backend(request):
    if request.param == "openvino":
        pytest.importorskip("openvino")
    return request.param


@pytest.fixture(scope="module")
def pipe(backend, tiny_onnx_dir):
    return Pipeline.load(tiny_onnx_dir, backend=backend)


def ours(pipe, controls, **options) -> np.ndarray:
    width, height = SIZE
    return as_array(pipe.generate(PROMPT, negative_prompt=NEGATIVE, steps=STEPS,
                                  guidance_scale=GUIDANCE, seed=SEED, sampler=SAMPLER,
                                  width=width, height=height, controls=controls, **options))


def unit(folder, seed: int = 0, **settings) -> ControlUnit:
    return ControlUnit(model=folder, image=control_picture(*SIZE, seed), module="none",
                       resize="resize", **settings)


def check(got: np.ndarray, want: np.ndarray, plain: np.ndarray, backend: str) -> None:
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= MAX_PIXEL_DIFF[backend]
    assert np.abs(want - plain).max() > MIN_CONTROL_EFFECT


@pytest.fixture(scope="module")
def plain(pipe):
    """sdrt's image without control, the baseline every control case must move away from."""
    return ours(pipe, [])


# (sdrt unit settings, diffusers options) for one ControlNet
ONE_NET = {
    "scale": ({"scale": 0.8}, {"controlnet_conditioning_scale": 0.8}),
    "end-half": ({"end": 0.5}, {"control_guidance_end": 0.5}),
    "guess-mode": ({"mode": "control"}, {"guess_mode": True}),
}


@pytest.mark.parametrize("case", sorted(ONE_NET))
def test_one_controlnet_equals_diffusers(reference, nets, pipe, plain, backend, case):
    settings, options = ONE_NET[case]
    want = reference("one", case, image=control_picture(*SIZE, 0), width=SIZE[0],
                     height=SIZE[1], **options)
    check(ours(pipe, [unit(nets[1][0], **settings)]), want, plain, backend)


def test_two_controlnets_equal_multicontrolnet(reference, nets, pipe, plain, backend):
    want = reference("two", "scales", image=[control_picture(*SIZE, 0),
                                             control_picture(*SIZE, 1)],
                     controlnet_conditioning_scale=[1.0, 0.4], width=SIZE[0], height=SIZE[1])
    got = ours(pipe, [unit(nets[1][0], 0, scale=1.0), unit(nets[1][1], 1, scale=0.4)])
    check(got, want, plain, backend)


def test_img2img_with_control_equals_diffusers(reference, nets, pipe, backend):
    strength = 0.75
    want = reference("img2img", "strength", image=init_picture(*SIZE),
                     control_image=control_picture(*SIZE, 0), strength=strength,
                     controlnet_conditioning_scale=1.0)  # this pipeline's default: 0.8
    options = dict(negative_prompt=NEGATIVE, steps=STEPS, guidance_scale=GUIDANCE, seed=SEED,
                   sampler=SAMPLER, strength=strength)
    got = as_array(pipe.img2img(init_picture(*SIZE), PROMPT, controls=[unit(nets[1][0])],
                                **options))
    plain = as_array(pipe.img2img(init_picture(*SIZE), PROMPT, **options))
    check(got, want, plain, backend)


@pytest.fixture(scope="module")
def sdxl(tiny_sdxl_dir, tmp_path_factory):
    """A tiny SDXL ControlNet exported, and diffusers' SDXL ControlNet pipeline's image."""
    from sdrt.export.onnx_export import export_pipeline
    from tests.export.controlnet_checkpoint import tiny_controlnet

    tmp = tmp_path_factory.mktemp("control-sdxl")
    source = tiny_controlnet(tiny_sdxl_dir / "unet", tmp / "cn-xl")
    base = diffusers.StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir,
                                                               add_watermarker=False)
    reference = diffusers.StableDiffusionXLControlNetPipeline(
        **base.components, controlnet=_torch_net(source), add_watermarker=False)
    reference.set_progress_bar_config(disable=True)
    reference.folder_scheduler_config = base.scheduler.config
    want = reference_pixels(reference, image=control_picture(*SIZE, 0), width=SIZE[0],
                            height=SIZE[1])
    return export_pipeline(source, tmp / "cn-xl-onnx"), want


def test_sdxl_controlnet_equals_diffusers(sdxl, tiny_sdxl_onnx_dir, backend):
    control, want = sdxl
    ours_xl = Pipeline.load(tiny_sdxl_onnx_dir, backend=backend)
    check(ours(ours_xl, [unit(control)]), want, ours(ours_xl, []), backend)


# Low-memory mode splits the CFG pair into batch-1 calls of both graphs: float rounding only.
SAME_IMAGE_LEVELS = 1


def test_low_memory_with_control_equals_default(nets, tiny_onnx_dir, pipe, backend):
    if backend != "ort":
        pytest.skip("one backend shows the plan")
    low = Pipeline.load(tiny_onnx_dir, low_memory=True)
    controls = [unit(nets[1][0], mode="control")]
    assert np.abs(ours(low, controls) - ours(pipe, controls)).max() <= SAME_IMAGE_LEVELS


def test_memory_plan_counts_the_controlnet(nets, tiny_onnx_dir):
    from sdrt.runtime.memory.plan import plan_request
    from sdrt.runtime.request import GenerationRequest

    request = GenerationRequest(PROMPT, width=SIZE[0], height=SIZE[1],
                                controls=(ControlUnit(nets[1][0]),))
    plan = plan_request(tiny_onnx_dir, "ort", "fp32", request, mode="auto", budget=None)
    without = plan_request(tiny_onnx_dir, "ort", "fp32", replace(request, controls=()),
                           mode="auto", budget=None)
    names = [row.name for row in plan.estimate.components]
    assert names[-1] == "controlnet 0" and "controlnet 0" not in [
        row.name for row in without.estimate.components]
    assert plan.estimate.default_peak > without.estimate.default_peak


def test_hires_second_pass_gets_control_at_its_size(nets, tiny_onnx_dir, monkeypatch):
    from sdrt.runtime.hires import HiresFix

    hires_pipe = Pipeline.load(tiny_onnx_dir)
    session = hires_pipe.controlnets.open(nets[1][0]).net.session
    sizes, run = [], session.run
    monkeypatch.setattr(session, "run", lambda feeds: sizes.append(
        feeds["controlnet_cond"].shape[2:]) or run(feeds))
    hires_pipe.generate(PROMPT, steps=2, width=64, height=64, seed=1, sampler=SAMPLER,
                        controls=[ControlUnit(nets[1][0], image=control_picture(64, 64, 0))],
                        hires=HiresFix(scale=1.5, denoise=1.0))
    assert sizes == [(64, 64)] * 2 + [(96, 96)] * 2
