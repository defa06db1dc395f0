"""Hires fix: latent upscaling against torch's interpolate, A1111's target sizes, and both passes
on the tiny model (sizes, infotext, progress, the second pass's start). The tiny UNet's
attention is quadratic in the latent pixels, so runs start at 32×32 and go up to 64×64."""

import numpy as np
import pytest
import torch

from sdrt.runtime.errors import InputError
from sdrt.runtime.hires import LATENT_UPSCALERS, PIXEL_UPSCALERS, HiresFix, target
from sdrt.runtime.latent_upscale import upscale
from sdrt.runtime.metadata import parse_parameters
from sdrt.runtime.pipeline import GenerationRequest, Pipeline

# float64 weights against torch's float32 arithmetic: a few float32 ulps of values near 3
INTERPOLATE_ATOL = 1e-5


@pytest.fixture(scope="module")
def pipe(tiny_onnx_dir):
    return Pipeline.load(tiny_onnx_dir)


@pytest.mark.parametrize(("mode", "antialias"), [
    ("bilinear", False), ("bilinear", True), ("bicubic", False), ("bicubic", True),
    ("nearest", False), ("nearest-exact", False)])
@pytest.mark.parametrize("size", [(14, 18), (21, 13), (5, 4), (16, 30)])
def test_upscale_matches_torch_interpolate(mode, antialias, size):
    latents = np.random.default_rng(0).standard_normal((2, 4, 7, 9)).astype(np.float32)
    want = torch.nn.functional.interpolate(torch.from_numpy(latents), size=size, mode=mode,
                                           antialias=antialias).numpy()
    got = upscale(latents, size, mode, antialias)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=0, atol=INTERPOLATE_ATOL)


def test_upscale_refuses_what_torch_refuses():
    latents = np.zeros((1, 4, 8, 8), np.float32)
    with pytest.raises(InputError, match="antialias applies to bilinear and bicubic"):
        upscale(latents, (16, 16), "nearest", antialias=True)
    with pytest.raises(InputError, match="unknown latent upscale mode 'area'"):
        upscale(latents, (16, 16), "area")


@pytest.mark.parametrize(("hires", "upscaled", "size"), [
    (HiresFix(scale=2), (1024, 1536), (1024, 1536)),
    (HiresFix(scale=1.3), (664, 992), (664, 992)),  # int(512 · 1.3) = 665 → down to 8
    (HiresFix(resize_x=1024), (1024, 1536), (1024, 1536)),  # the aspect ratio kept
    (HiresFix(resize_y=900), (600, 896), (600, 896)),
    (HiresFix(resize_x=1024, resize_y=1024), (1024, 1536), (1024, 1024)),  # cover, then crop
    (HiresFix(resize_x=600, resize_y=1200), (800, 1200), (600, 1200)),
])
def test_target_is_a1111s_rounded_down(hires, upscaled, size):
    found = target(512, 768, hires, 8, 2048)
    assert (found.upscaled, found.size) == (upscaled, size)


def test_target_beyond_the_side_limit_is_refused():
    with pytest.raises(InputError, match="hires target 2560×3840"):
        target(1280, 1920, HiresFix(scale=2), 8, 2048)


@pytest.mark.parametrize(("fields", "message"), [
    ({"scale": True}, "hires scale must be a finite number between 1 and 4, got True"),
    ({"scale": 5}, "hires scale must be"), ({"denoise": 1.5}, "hires denoise must be"),
    ({"steps": -1}, "hires steps must be an integer between 0 and 1000"),
    ({"resize_x": 2.5}, "hires resize_x must be an integer"),
    ({"cfg": float("inf")}, "hires cfg must be a finite number ≥ 0"),
    ({"upscaler": "ESRGAN_4x"}, "unknown hires upscaler 'ESRGAN_4x'; choose one of: Latent,"),
])
def test_bad_settings_are_one_line_errors(pipe, fields, message):
    with pytest.raises(InputError, match=message) as raised:
        pipe.run(GenerationRequest("a cat", steps=2, hires=HiresFix(**fields)))
    assert "\n" not in str(raised.value)


def test_upscaler_names_are_a1111s():
    assert LATENT_UPSCALERS[0] == "Latent" and "Latent (nearest-exact)" in LATENT_UPSCALERS
    assert PIXEL_UPSCALERS == ("None", "Lanczos", "Nearest")
    assert HiresFix(upscaler="latent (BICUBIC)").checked(2048).upscaler == "Latent (bicubic)"


def test_latent_2x_size_infotext_and_progress(pipe):
    seen = []
    hires = HiresFix(scale=2, steps=3, upscaler="Latent")
    [result] = pipe.run(GenerationRequest("a cat", steps=2, seed=1, sampler="euler", width=32,
                                          height=32, hires=hires),
                        callback=lambda i, n, x: seen.append((i, n, x.shape)))
    assert result.image.size == (64, 64)
    params = _params(result)
    assert (params["Size-1"], params["Steps"], params["Hires upscale"]) == ("32", "2", "2")
    assert (params["Hires steps"], params["Hires upscaler"]) == ("3", "Latent")
    assert params["Denoising strength"] == "0.7"
    assert "Hires sampler" not in params and "Hires prompt" not in params
    # 2 first-pass calls, then int(3 · 0.7) = 2 of the hires pass's 3, at 2× the latents
    assert [(i, n) for i, n, _ in seen] == [(0, 4), (1, 4), (2, 4), (3, 4)]
    assert [shape[2:] for _, _, shape in seen] == [(16, 16)] * 2 + [(32, 32)] * 2


def test_pixel_upscaler_resize_crops_and_names_overrides(pipe):
    hires = HiresFix(resize_x=64, resize_y=48, upscaler="Lanczos", denoise=0.5,
                     sampler="Euler", prompt="a dog", cfg=3.0)
    request = GenerationRequest("a cat", steps=2, seed=3, num_images=2, sampler="euler_a",
                                width=32, height=32, hires=hires)
    results = pipe.run(request)
    assert [r.image.size for r in results] == [(64, 48)] * 2  # 64×64, cropped centred
    params = _params(results[1])
    assert (params["Hires resize-1"], params["Hires resize-2"]) == ("64", "48")
    assert (params["Hires upscaler"], params["Hires sampler"]) == ("Lanczos", "Euler")
    assert (params["Hires prompt"], params["Hires CFG Scale"]) == ("a dog", "3")
    assert params["Seed"] == "4" and "Hires upscale" not in params


def test_denoise_0_decodes_the_upscaled_first_pass(pipe):
    first = []
    hires = HiresFix(scale=2, upscaler="Latent (nearest)", denoise=0)
    [result] = pipe.run(GenerationRequest("a cat", steps=2, seed=2, sampler="euler", width=32,
                                          height=32, hires=hires),
                        callback=lambda i, n, x: first.append(x))
    assert len(first) == 2  # no second pass
    want = pipe.decode(upscale(first[-1], (32, 32), "nearest"))
    assert np.array_equal(np.asarray(result.image), np.asarray(want))


def test_stopping_in_the_first_pass_returns_it(pipe):
    [result] = pipe.run(GenerationRequest("a cat", steps=3, seed=0, width=32, height=32,
                                          hires=HiresFix()),
                        callback=lambda i, n, x: i == 0)
    assert result.image.size == (32, 32)


def test_hires_needs_text_to_image(pipe):
    from PIL import Image

    init = pipe.image_input(Image.new("RGB", (64, 64)), strength=0.5)
    with pytest.raises(InputError, match="hires fix is for text-to-image"):
        pipe.run(pipe.request_for(init, "a cat", steps=2, hires=HiresFix()), init=init)


def _params(result) -> dict[str, str]:
    from sdrt.runtime.metadata import format_parameters

    return parse_parameters(format_parameters(result.info))


def test_memory_plan_is_for_the_larger_pass(tiny_onnx_dir):
    from sdrt.runtime.memory.plan import plan_request

    def plan(**fields):
        return plan_request(tiny_onnx_dir, "ort", "fp32", GenerationRequest("x", **fields),
                            mode="default", budget=None)

    hires = plan(width=32, height=32, hires=HiresFix(scale=2))
    assert hires.estimate == plan(width=64, height=64).estimate
    assert hires.estimate != plan(width=32, height=32).estimate


def test_low_memory_decodes_the_larger_image_in_tiles(tiny_onnx_dir, monkeypatch):
    low = Pipeline.load(tiny_onnx_dir, low_memory=True)
    decoded = []
    decode = type(low.vae_decoder).__call__
    monkeypatch.setattr(type(low.vae_decoder), "__call__",
                        lambda self, x: decoded.append(x.shape) or decode(self, x))
    [result] = low.run(GenerationRequest("a cat", steps=2, seed=1, sampler="euler", width=32,
                                         height=32, hires=HiresFix(scale=2, denoise=0.5)))
    assert result.image.size == (64, 64)
    assert decoded == [(1, 4, 32, 32)]  # through the low-memory plan's (tiled) decoder
    assert type(low.vae_decoder).__name__ != "VaeDecoder"
