"""Image-to-image and inpainting end to end: sdrt equals diffusers' StableDiffusionImg2ImgPipeline
and StableDiffusionInpaintPipeline (4-channel UNet: latent blending; 9-channel inpainting UNet)
from the same weights, picture, mask and seeds, on ONNX Runtime and OpenVINO.

Both sides draw the VAE posterior sample and the noise from the same torch-compatible
generators in the same order, so the only differences are graph-vs-eager float32 arithmetic.
"""

import numpy as np
import pytest
from PIL import Image

from sdrt.runtime.pipeline import Pipeline
from tests.conftest import (
    MAX_PIXEL_DIFF,
    NEGATIVE,
    PROMPT,
    as_array,
    count_unet_calls,
    load_reference,
    use_sampler,
)

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

pytestmark = pytest.mark.parity

STEPS, GUIDANCE, SEED = 5, 6.0, 21
MASK_BLUR = 3  # pixels: the mask the model sees is the blurred one binarised, as diffusers does
# Text-to-image on an inpainting UNet encodes an all-zero masked picture. On a constant input the
# VAE encoder's GroupNorm divides float32 rounding noise by sqrt(eps) (torch's exact mean makes it
# 0, a graph's fused reduction does not): the masked-image latents then agree to ~0.6 only on the
# tiny random VAE, which costs one or two more 8-bit levels than the other cases.
BLANK_EXTRA_DIFF = 2


def picture(width: int, height: int) -> Image.Image:
    """A smooth random picture: a few colour blobs on a gradient (seeded)."""
    rng = np.random.default_rng(5)
    ys, xs = np.mgrid[0:height, 0:width] / max(width, height)
    pixels = np.stack([xs, ys, 1 - xs], axis=-1) * 160 + 40
    for _ in range(4):
        cx, cy, r = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8), rng.uniform(0.1, 0.25)
        blob = ((xs - cx) ** 2 + (ys - cy) ** 2) < r**2
        pixels[blob] = rng.uniform(0, 255, 3)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def mask(width: int, height: int) -> Image.Image:
    """White (repaint) over a rectangle that is not aligned to the latent grid."""
    drawn = Image.new("L", (width, height), 0)
    drawn.paste(255, (width // 4 + 1, height // 3 - 1, 3 * width // 4 - 3, 5 * height // 6))
    return drawn


def generators(num_images: int) -> list:
    return [torch.Generator().manual_seed(SEED + i) for i in range(num_images)]


def pixels(out) -> np.ndarray:
    return np.round(out.images * 255).astype(np.int16)


@pytest.fixture(scope="module", params=["ort", "openvino"])
def backend(request):
    if request.param == "openvino":
        pytest.importorskip("openvino")
    return request.param


@pytest.fixture(scope="module")
def expected(tiny_sd_dir, tiny_inpaint_dir):
    """diffusers' images for a case, computed once for both backends: (kind, sampler, size,
    strength, num_images) → (B, H, W, 3) int16; kind is img2img, inpaint4 or inpaint9."""
    references = {"img2img": load_reference(tiny_sd_dir, "StableDiffusionImg2ImgPipeline"),
                  "inpaint4": load_reference(tiny_sd_dir, "StableDiffusionInpaintPipeline"),
                  "inpaint9": load_reference(tiny_inpaint_dir)}
    cache = {}

    def images_for(kind: str, sampler: str, size: tuple[int, int], strength: float,
                   num_images: int) -> np.ndarray:
        key = (kind, sampler, size, strength, num_images)
        if key not in cache:
            reference = references[kind]
            use_sampler(reference, sampler)
            inputs = {"image": picture(*size)}
            if kind != "img2img":  # the mask the model sees: the blurred one, binarised
                inputs.update(mask_image=reference.mask_processor.blur(mask(*size), MASK_BLUR),
                              width=size[0], height=size[1])
            cache[key] = pixels(reference(
                PROMPT, strength=strength, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                negative_prompt=NEGATIVE, generator=generators(num_images),
                num_images_per_prompt=num_images, output_type="np", **inputs))
        return cache[key]

    images_for.references = references
    return images_for


@pytest.fixture(scope="module")
def pipes(backend, tiny_onnx_dir, tiny_inpaint_onnx_dir):
    plain = Pipeline.load(tiny_onnx_dir, backend=backend)
    return {"img2img": plain, "inpaint4": plain,
            "inpaint9": Pipeline.load(tiny_inpaint_onnx_dir, backend=backend)}


def ours(pipes, kind: str, sampler: str, size: tuple[int, int], strength: float,
         num_images: int, **extra) -> np.ndarray:
    options = dict(strength=strength, negative_prompt=NEGATIVE, steps=STEPS,
                   guidance_scale=GUIDANCE, seed=SEED, num_images=num_images, sampler=sampler)
    if kind == "img2img":
        return as_array(pipes[kind].img2img(picture(*size), PROMPT, **options))
    return as_array(pipes[kind].inpaint(picture(*size), mask(*size), PROMPT, mask_blur=MASK_BLUR,
                                        paste_back=False, **options, **extra))


# The samplers' starts and inpainting blends are checked against diffusers' schedulers one by
# one in test_sampler_parity.py; end to end, these cover the VP (DDIM) and VE (Euler) latent
# forms, the ancestral sampler (its per-step draws follow the posterior and noise draws in the
# generators' streams), Karras sigmas, and a size not a multiple of 64.
CASES = [
    ("img2img", "ddim", (64, 64), 0.6, 2), ("img2img", "euler_a", (64, 64), 0.6, 2),
    ("img2img", "dpmpp_2m_karras", (72, 56), 0.6, 2), ("img2img", "euler_a", (64, 64), 1.0, 1),
    ("inpaint4", "ddim", (64, 64), 1.0, 2), ("inpaint4", "euler_a", (64, 64), 1.0, 2),
    ("inpaint4", "dpmpp_2m", (72, 56), 0.7, 2),
    ("inpaint9", "ddim", (64, 64), 1.0, 2), ("inpaint9", "euler_a", (64, 64), 1.0, 2),
    ("inpaint9", "dpmpp_2m", (72, 56), 0.7, 2),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_images_equal_diffusers(expected, pipes, backend, case):
    want = expected(*case)
    got = ours(pipes, *case)
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= MAX_PIXEL_DIFF[backend]


@pytest.mark.parametrize("kind", ["inpaint4", "inpaint9"])
def test_paste_back_equals_diffusers_overlay(expected, pipes, backend, kind):
    """With paste-back on, sdrt equals diffusers' output put through diffusers' own
    `apply_overlay` with the blurred mask (what its padding_mask_crop path does)."""
    reference = expected.references[kind]
    image, blurred = picture(64, 64), reference.mask_processor.blur(mask(64, 64), MASK_BLUR)
    generated = Image.fromarray(expected(kind, "euler", (64, 64), 1.0, 1)[0].astype(np.uint8))
    want = np.asarray(reference.image_processor.apply_overlay(blurred, image, generated),
                      dtype=np.int16)
    got = as_array(pipes[kind].inpaint(image, mask(64, 64), PROMPT, mask_blur=MASK_BLUR,
                                       negative_prompt=NEGATIVE, steps=STEPS,
                                       guidance_scale=GUIDANCE, seed=SEED, sampler="euler"))[0]
    # the overlay blends in 8-bit premultiplied alpha: one more level of rounding than ours
    assert np.abs(got - want).max() <= MAX_PIXEL_DIFF[backend] + 1
    untouched = np.asarray(blurred) == 0
    assert np.array_equal(got[untouched], np.asarray(image, dtype=np.int16)[untouched])


def test_generate_on_an_inpainting_unet_is_inpainting_everything(expected, pipes, backend,
                                                                  monkeypatch):
    """A1111's text-to-image on an inpainting model: diffusers' inpainting of a blank picture
    with an all-white mask at strength 1."""
    calls = count_unet_calls(pipes["inpaint9"], monkeypatch)
    reference = expected.references["inpaint9"]
    use_sampler(reference, "ddim")
    out = reference(PROMPT, image=Image.new("RGB", (64, 64), (128, 128, 128)),
                    mask_image=Image.new("L", (64, 64), 255), num_inference_steps=STEPS,
                    guidance_scale=GUIDANCE, negative_prompt=NEGATIVE, generator=generators(1),
                    output_type="np")
    got = as_array(pipes["inpaint9"].generate(PROMPT, negative_prompt=NEGATIVE, steps=STEPS,
                                              guidance_scale=GUIDANCE, seed=SEED,
                                              sampler="ddim"))
    assert calls == [(2, 9, 32, 32)] * STEPS
    assert np.abs(got - pixels(out)).max() <= MAX_PIXEL_DIFF[backend] + BLANK_EXTRA_DIFF
