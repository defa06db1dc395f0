"""Pipeline behaviour beyond parity: early stop, generators, NaN handling, request validation."""

import numpy as np
import pytest

from sdrt.runtime.errors import GenerationError, InputError
from sdrt.runtime.pipeline import GenerationRequest, Pipeline
from tests.conftest import count_unet_calls


@pytest.fixture(scope="module")
def pipe(tiny_onnx_dir):
    return Pipeline.load(tiny_onnx_dir)


def test_callback_stops_early(pipe, monkeypatch):
    calls = count_unet_calls(pipe, monkeypatch)
    seen = []

    def stop_after_two(i, n, latents):
        seen.append((i, n, latents.shape))
        return i == 1

    images = pipe.generate("a cat", steps=10, sampler="euler", seed=0, callback=stop_after_two)
    assert len(images) == 1 and images[0].size == (64, 64)
    assert [s[0] for s in seen] == [0, 1] and seen[0][1] == 10
    assert len(calls) == 2


def test_cfg_batches_uncond_and_cond_together(pipe, monkeypatch):
    calls = count_unet_calls(pipe, monkeypatch)
    pipe.generate("a cat", steps=2, sampler="ddim", seed=0, num_images=3)
    assert calls == [(6, 4, 32, 32)] * 2  # (2B, C, h, w): one call per step


def test_same_seed_same_image_and_seed_plus_i(pipe):
    one = pipe.generate("a dog", steps=2, seed=5, num_images=2, generator="numpy")
    again = pipe.generate("a dog", steps=2, seed=6, generator="numpy")
    assert np.array_equal(np.asarray(one[1]), np.asarray(again[0]))
    assert not np.array_equal(np.asarray(one[0]), np.asarray(one[1]))
    assert "RNG: NumPy" in one[0].info["parameters"]


def test_nan_output_is_an_error_not_a_black_image(pipe, monkeypatch):
    def nan_decoder(feeds):
        return {"sample": np.full((1, 3, 64, 64), np.nan, np.float32)}

    monkeypatch.setattr(pipe.vae_decoder.session, "run", nan_decoder)
    with pytest.raises(GenerationError, match="NaN"):
        pipe.generate("a cat", steps=1, seed=0)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [("width", 60, "width must be a multiple of 8"), ("steps", 0, "steps must be between"),
     ("guidance_scale", float("nan"), "guidance scale"),
     ("guidance_scale", 10**400, "guidance scale"),  # beyond float's range, as JSON allows
     ("num_images", 17, "num_images")],
)
def test_request_validation(pipe, field, value, message):
    with pytest.raises(InputError, match=message):
        pipe.run(GenerationRequest("x", **{field: value}))


def test_an_over_long_prompt_is_logged_by_its_head_not_whole(pipe, caplog):
    from sdrt.runtime.conditioning import LOGGED_TAIL_CHARS

    prompt = "a red circle " + "and more words " * 20_000  # ~300 kB, a server body's size
    with caplog.at_level("WARNING", logger="sdrt.runtime.conditioning"):
        pipe.generate(prompt, steps=1, seed=0)
    (record,) = [r for r in caplog.records if "longer than" in r.getMessage()]
    message = record.getMessage()
    assert len(message) < LOGGED_TAIL_CHARS + 200 and "more characters)" in message
