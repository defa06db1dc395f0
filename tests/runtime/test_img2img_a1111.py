"""A1111's img2img options: resize modes, a mask of another size, "Only masked" inpainting,
masked content (inpainting_fill), the initial noise multiplier and several init images — the
geometry in NumPy, the runs end to end on the tiny SD model (ONNX Runtime, few steps)."""

import numpy as np
import pytest
from PIL import Image

from sdrt.runtime import images
from sdrt.runtime.errors import InputError
from sdrt.runtime.img2img import prepare
from sdrt.runtime.img2img_batch import run_images
from sdrt.runtime.inpaint_region import Region, fit_aspect, mask_box
from sdrt.runtime.metadata import format_parameters, parse_parameters
from sdrt.runtime.pipeline import Pipeline
from tests.conftest import PROMPT

STEPS, SEED = 3, 7
COMMON = dict(step=8, max_side=2048, latent_scale=8)


def picture(width: int, height: int, seed: int = 0) -> Image.Image:
    """A gradient with seeded noise, so every crop and band is recognisable."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:height, 0:width]
    base = np.stack([xs * 255 / width, ys * 255 / height, np.full_like(xs, 90.0)], axis=-1)
    return Image.fromarray(np.clip(base + rng.normal(0, 20, base.shape), 0, 255)
                           .astype(np.uint8))


def box_mask(size: tuple[int, int], box: tuple[int, int, int, int]) -> Image.Image:
    drawn = Image.new("L", size, 0)
    drawn.paste(255, box)
    return drawn


def arr(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


# ---- geometry (NumPy only) ----------------------------------------------------------------

def test_resize_modes_geometry():
    wide = picture(100, 50)
    lanczos = Image.Resampling.LANCZOS
    just = prepare(wide, strength=0.5, width=64, height=64, **COMMON).image
    assert np.array_equal(arr(just), arr(wide.resize((64, 64), lanczos)))
    # 1: scaled to cover (128×64), the middle 64 columns kept
    crop = prepare(wide, strength=0.5, width=64, height=64, resize_mode=1, **COMMON).image
    assert np.array_equal(arr(crop), arr(wide.resize((128, 64), lanczos))[:, 32:96])
    # 2: scaled to fit (64×32) in the middle rows, the bands its edge rows repeated
    fill = arr(prepare(wide, strength=0.5, width=64, height=64, resize_mode=2, **COMMON).image)
    inner = arr(wide.resize((64, 32), lanczos))
    assert np.array_equal(fill[16:48], inner)
    assert (fill[:16] == inner[0]).all() and (fill[48:] == inner[-1]).all()
    # 3 resizes the pixels as 0 does
    latent = prepare(wide, strength=0.5, width=64, height=64, resize_mode=3, **COMMON).image
    assert np.array_equal(arr(latent), arr(just))
    tall = arr(images.resize(picture(50, 100), (64, 64), 2))
    assert (tall[:, :16] == tall[:, :1]).all() and (tall[:, 48:] == tall[:, 63:]).all()


def test_mask_of_another_size_is_stretched_to_the_image():
    image = picture(64, 48)
    small = box_mask((32, 24), (8, 6, 24, 18))
    got = prepare(image, small, strength=1.0, width=None, height=None, mask_blur=2, **COMMON)
    stretched = small.resize((64, 48), Image.Resampling.LANCZOS)
    want = prepare(image, stretched, strength=1.0, width=None, height=None, mask_blur=2,
                   **COMMON)
    assert got.mask.size == (64, 48) and np.array_equal(arr(got.mask), arr(want.mask))
    with pytest.raises(InputError, match="mask is empty"):  # the other checks still apply
        prepare(image, Image.new("L", (10, 10)), strength=1.0, width=None, height=None,
                **COMMON)


def test_only_masked_region_is_padded_and_fitted_to_the_working_ratio():
    drawn = box_mask((200, 100), (90, 40, 110, 50))  # 20×10 at (90, 40)
    assert mask_box(drawn, 4) == (86, 36, 114, 54)
    assert mask_box(drawn, 80) == (10, 0, 190, 100)  # clipped to the picture
    assert fit_aspect((86, 36, 114, 54), (64, 64), (200, 100)) == (86, 31, 114, 59)
    assert fit_aspect((0, 40, 20, 50), (32, 64), (200, 100)) == (0, 25, 20, 65)
    assert fit_aspect((180, 90, 200, 100), (64, 64), (200, 100)) == (180, 80, 200, 100)
    region = Region.around(picture(200, 100), images.blur(drawn, 2), 8, (64, 48))
    left, top, right, bottom = region.box
    assert abs((right - left) * 48 - (bottom - top) * 64) <= 64  # the working ratio, to a pixel
    pasted = arr(region.paste(Image.new("RGB", (64, 48), (255, 0, 255))))
    outside = np.asarray(region.mask) == 0
    assert pasted.shape == (100, 200, 3)
    assert np.array_equal(pasted[outside], arr(region.picture)[outside])
    assert np.abs(pasted[45, 100] - (255, 0, 255)).max() <= 4  # the feather is 98% here


def test_fill_takes_the_colours_around_the_mask():
    split = np.zeros((64, 64, 3), dtype=np.uint8)
    split[:, :32] = (200, 30, 30)
    split[:, 32:] = (30, 30, 200)
    split[20:44, 4:28] = (0, 255, 0)  # a green square inside the red half, masked below
    drawn = box_mask((64, 64), (2, 18, 30, 46))
    filled = arr(images.fill(Image.fromarray(split), drawn))
    assert np.array_equal(filled[np.asarray(drawn) == 0], split[np.asarray(drawn) == 0])
    centre = filled[32, 16]
    assert centre[1] < 80 and centre[0] > centre[2]  # no green left; more red than blue


@pytest.mark.parametrize(("option", "value", "fragment"), [
    ("resize_mode", 4, "resize_mode must be one of 0 \\(just resize\\)"),
    ("resize_mode", True, "resize_mode"),
    ("inpainting_fill", -1, "inpainting_fill must be one of 0 \\(fill\\)"),
    ("inpaint_full_res", "yes", "inpaint_full_res must be true or false"),
    ("inpaint_full_res_padding", -1, "inpaint_full_res_padding must be"),
    ("inpaint_full_res_padding", 2.5, "inpaint_full_res_padding must be"),
    ("initial_noise_multiplier", float("nan"), "initial_noise_multiplier must be"),
    ("initial_noise_multiplier", 3.0, "between 0 and 2"),
])
def test_bad_options_are_one_line_errors(option, value, fragment):
    with pytest.raises(InputError, match=fragment) as error:
        prepare(picture(64, 64), box_mask((64, 64), (8, 8, 40, 40)), strength=0.5, width=None,
                height=None, **COMMON, **{option: value})
    assert "\n" not in str(error.value)


# ---- end to end on the tiny model ---------------------------------------------------------

@pytest.fixture(scope="module")
def pipe(tiny_onnx_dir):
    return Pipeline.load(tiny_onnx_dir, backend="ort")


def run(pipe, init, num_images=1, **options):
    request = pipe.request_for(init, PROMPT, steps=STEPS, seed=SEED, sampler="euler",
                               num_images=num_images, **options)
    return pipe.run(request, init=init)


def test_only_masked_returns_the_whole_picture_unchanged_outside_the_mask(pipe):
    original = picture(90, 70)  # not a multiple of 8: the output keeps this size
    drawn = box_mask((90, 70), (50, 20, 70, 44))
    init = pipe.image_input(original, drawn, strength=0.8, width=64, height=64, mask_blur=0,
                            inpaint_full_res=True, inpaint_full_res_padding=6)
    # the mask's box grown by 6 (32×36), then widened to the working size's 1:1
    assert init.image.size == (64, 64) and init.region.box == (42, 14, 78, 50)
    got = run(pipe, init)[0]
    assert got.image.size == (90, 70) and got.info.width == 64
    outside = np.asarray(drawn) == 0
    assert np.array_equal(arr(got.image)[outside], arr(original)[outside])
    assert not np.array_equal(arr(got.image), arr(original))
    unchanged = run(pipe, pipe.image_input(original, drawn, strength=0.0, width=64, height=64,
                                           inpaint_full_res=True))[0]
    assert np.array_equal(arr(unchanged.image), arr(original))


def test_each_masked_content_changes_the_masked_area_only(pipe):
    original, drawn = picture(64, 64, seed=3), box_mask((64, 64), (16, 16, 48, 48))
    results = {}
    for fill in range(4):
        init = pipe.image_input(original, drawn, strength=0.6, mask_blur=0,
                                inpainting_fill=fill)
        results[fill] = arr(run(pipe, init)[0].image)
    inside = np.asarray(drawn) > 0
    for fill in (0, 2, 3):
        assert not np.array_equal(results[fill][inside], results[1][inside]), fill
        assert np.array_equal(results[fill][~inside], arr(original)[~inside]), fill
    assert not np.array_equal(results[2], results[3])


def test_noise_multiplier_scales_the_starting_noise(pipe):
    original = picture(64, 64, seed=4)
    got = {m: run(pipe, pipe.image_input(original, strength=0.5, initial_noise_multiplier=m))[0]
           for m in (0.0, 1.0)}
    assert not np.array_equal(arr(got[0.0].image), arr(got[1.0].image))
    assert parse_parameters(format_parameters(got[0.0].info))["Noise multiplier"] == "0"
    assert "Noise multiplier" not in format_parameters(got[1.0].info)


def test_several_init_images_are_a_batch_in_order(pipe):
    inits = [pipe.image_input(picture(64, 64, seed=s), strength=0.7) for s in (5, 6)]
    request = pipe.request_for(inits[0], PROMPT, steps=STEPS, seed=SEED, sampler="euler_a",
                               num_images=3)
    seen = []
    got = run_images(pipe, request, inits, lambda i, n, latents: seen.append((i, n)))
    assert [r.info.seed for r in got] == [SEED, SEED + 1, SEED + 2]
    for i in (1, 2):  # the second init, then the first again
        alone = pipe.run(pipe.request_for(inits[i % 2], PROMPT, steps=STEPS, seed=SEED + i,
                                          sampler="euler_a"), init=inits[i % 2])[0]
        assert np.array_equal(arr(got[i].image), arr(alone.image)), i
    per_image = len(seen) // 3
    assert seen == [(j, 3 * per_image) for j in range(3 * per_image)]
    with pytest.raises(InputError, match="2 init images but the request makes 1"):
        run_images(pipe, pipe.request_for(inits[0], PROMPT, steps=STEPS), inits, None)
