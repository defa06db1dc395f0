"""End to end: sdrt images equal diffusers' StableDiffusionPipeline images from the same weights.

Both sides start from the same noise (torch-compatible generator, one seed per image) and run the
same scheduler, so the only differences are graph-vs-eager float32 arithmetic.
"""

import numpy as np
import pytest

from sdrt.runtime.pipeline import Pipeline

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

pytestmark = pytest.mark.parity

# The bounds, in 8-bit steps: ORT runs the same float32 kernels as torch up to operator
# fusion order; OpenVINO fp32 reorders more aggressively (optimum-intel uses atol 6e-3 ≈ 1.5/255).
MAX_PIXEL_DIFF = {"ort": 2, "openvino": 4}

PROMPT = "a small red circle in the top left on a blue background"
NEGATIVE = "blurry, text"
SIZES = [(64, 64), (72, 56)]  # (width, height); 72 and 56 are not multiples of 64

REFERENCE_SCHEDULERS = {
    "ddim": ("DDIMScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {}),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
}


def load_reference(folder):
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(
        folder, safety_checker=None, requires_safety_checker=False
    )
    pipe.set_progress_bar_config(disable=True)
    pipe.folder_scheduler_config = pipe.scheduler.config  # each test starts from the folder's own
    return pipe


@pytest.fixture(scope="module")
def reference(tiny_sd_dir):
    return load_reference(tiny_sd_dir)


def reference_images(pipe, sampler, *, steps, guidance, width, height, seed, num_images,
                     negative=NEGATIVE):
    class_name, overrides = REFERENCE_SCHEDULERS[sampler]
    scheduler_class = getattr(diffusers, class_name)
    pipe.scheduler = scheduler_class.from_config(pipe.folder_scheduler_config, **overrides)
    generators = [torch.Generator().manual_seed(seed + i) for i in range(num_images)]
    out = pipe(PROMPT, negative_prompt=negative, num_inference_steps=steps,
               guidance_scale=guidance, width=width, height=height, generator=generators,
               num_images_per_prompt=num_images, output_type="np")
    return np.round(out.images * 255).astype(np.int16)  # (B, H, W, 3)


@pytest.fixture(scope="module", params=["ort", "openvino"])
def sdrt_pipe(request, tiny_onnx_dir):
    if request.param == "openvino":
        pytest.importorskip("openvino")
    return Pipeline.load(tiny_onnx_dir, backend=request.param)


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("sampler", sorted(REFERENCE_SCHEDULERS))
def test_images_equal_diffusers(reference, sdrt_pipe, sampler, size):
    width, height = size
    options = dict(steps=4, guidance=6.0, width=width, height=height, seed=7, num_images=2)
    expected = reference_images(reference, sampler, **options)
    images = sdrt_pipe.generate(
        PROMPT, negative_prompt=NEGATIVE, steps=4, guidance_scale=6.0, width=width,
        height=height, seed=7, num_images=2, sampler=sampler,
    )
    got = np.stack([np.asarray(image, dtype=np.int16) for image in images])
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() <= MAX_PIXEL_DIFF[sdrt_pipe.backend]


def test_guidance_off_runs_unet_once_per_step_and_matches(reference, tiny_onnx_dir):
    pipe = Pipeline.load(tiny_onnx_dir)
    calls = []
    original = pipe.unet.session.run

    def counting_run(feeds):
        calls.append(feeds["sample"].shape[0])
        return original(feeds)

    pipe.unet.session.run = counting_run
    images = pipe.generate(PROMPT, steps=3, guidance_scale=1.0, seed=3, sampler="euler")
    assert calls == [1, 1, 1]
    expected = reference_images(reference, "euler", steps=3, guidance=1.0, width=64, height=64,
                                seed=3, num_images=1, negative=None)
    assert np.abs(np.asarray(images[0], dtype=np.int16) - expected[0]).max() <= 2


@pytest.mark.parametrize("sampler", ["ddim", "euler_a", "dpmpp_2m"])
def test_v_prediction_images_equal_diffusers(tiny_sd_v_dir, tiny_onnx_v_dir, sampler):
    reference_v = load_reference(tiny_sd_v_dir)
    expected = reference_images(reference_v, sampler, steps=4, guidance=6.0, width=64,
                                height=64, seed=11, num_images=1)
    images = Pipeline.load(tiny_onnx_v_dir).generate(
        PROMPT, negative_prompt=NEGATIVE, steps=4, guidance_scale=6.0, seed=11, sampler=sampler
    )
    got = np.asarray(images[0], dtype=np.int16)
    assert np.abs(got - expected[0]).max() <= MAX_PIXEL_DIFF["ort"]
