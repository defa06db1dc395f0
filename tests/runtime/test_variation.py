"""Variation seeds (A1111's subseed, subseed_strength, seed_resize_from): the slerp against a
direct formula, the centred paste, and on the tiny model strength 0 and 1 giving the seed's and
the subseed's images exactly, with A1111's infotext."""

import numpy as np
import pytest
import torch

from sdrt.runtime.errors import InputError
from sdrt.runtime.metadata import format_parameters, parse_parameters
from sdrt.runtime.pipeline import GenerationRequest, Pipeline
from sdrt.runtime.rng import make_generator
from sdrt.runtime.variation import Variation, paste_centred, slerp

# float32 noise through float32 trigonometry: a few ulps of values near 4
SLERP_ATOL = 1e-5
# a deterministic sampler: an ancestral one draws its step noise from the seed's stream
RUN = {"steps": 2, "sampler": "euler", "width": 32, "height": 32}


@pytest.fixture(scope="module")
def pipe(tiny_onnx_dir):
    return Pipeline.load(tiny_onnx_dir)


def _direct_slerp(t: float, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """Slerp per (channel, column) of a (C, h, w) tensor, the angle from the unit columns."""
    a = low / low.norm(dim=1, keepdim=True)
    b = high / high.norm(dim=1, keepdim=True)
    omega = torch.acos((a * b).sum(1)).unsqueeze(1)  # (C, 1, w)
    return (torch.sin((1 - t) * omega) * low + torch.sin(t * omega) * high) / torch.sin(omega)


@pytest.mark.parametrize("strength", [0.0, 0.25, 0.5, 1.0])
def test_slerp_matches_the_direct_formula_and_its_ends(strength):
    low = make_generator("torch", 1).randn((4, 6, 5))
    high = make_generator("torch", 2).randn((4, 6, 5))
    got = slerp(strength, low, high)
    want = _direct_slerp(strength, torch.from_numpy(low), torch.from_numpy(high)).numpy()
    np.testing.assert_allclose(got, want, rtol=0, atol=SLERP_ATOL)
    if strength in (0.0, 1.0):
        assert np.array_equal(got, low if strength == 0 else high)


def test_slerp_of_parallel_noises_is_linear():
    noise = make_generator("numpy", 3).randn((4, 6, 5))
    np.testing.assert_allclose(slerp(0.3, noise, 2 * noise), 1.3 * noise, rtol=1e-6)


def test_paste_centred_both_ways():
    big = np.zeros((1, 6, 8), np.float32)
    small = np.arange(8, dtype=np.float32).reshape(1, 2, 4) + 1
    pasted = paste_centred(small, big)
    assert np.array_equal(pasted[:, 2:4, 2:6], small) and pasted.sum() == small.sum()
    assert np.array_equal(paste_centred(big + 5, small), np.full_like(small, 5))
    cropped = paste_centred(np.arange(36.0).reshape(1, 6, 6), np.zeros((1, 2, 4)))
    assert np.array_equal(cropped[0], [[13, 14, 15, 16], [19, 20, 21, 22]])


def test_seed_resize_pastes_the_seeds_smaller_noise():
    generators = [make_generator("torch", 10 + i) for i in range(2)]
    rows = Variation("torch", 10, None, 0.0, (4, 6)).rows(generators, (2, 4, 8, 8))
    for i, row in enumerate(rows):
        plain = make_generator("torch", 10 + i).randn((4, 8, 8))
        small = make_generator("torch", 10 + i).randn((4, 4, 6))
        assert np.array_equal(row, paste_centred(small, plain))


def test_strength_0_is_the_seeds_image_and_1_the_subseeds(pipe):
    plain = pipe.run(GenerationRequest("a cat", seed=5, num_images=2, **RUN))
    none = pipe.run(GenerationRequest("a cat", seed=5, num_images=2, subseed=40,
                                      subseed_strength=0.0, **RUN))
    full = pipe.run(GenerationRequest("a cat", seed=5, num_images=2, subseed=40,
                                      subseed_strength=1.0, **RUN))
    sub = pipe.run(GenerationRequest("a cat", seed=40, num_images=2, **RUN))
    for i in range(2):  # image i: seed + i and subseed + i
        assert np.array_equal(np.asarray(none[i].image), np.asarray(plain[i].image))
        assert np.array_equal(np.asarray(full[i].image), np.asarray(sub[i].image))
    assert "Variation seed" not in format_parameters(none[0].info)
    params = parse_parameters(format_parameters(full[1].info))
    assert (params["Seed"], params["Variation seed"], params["Variation seed strength"]) == \
        ("6", "41", "1")


def test_random_subseed_is_recorded_and_reproduces(pipe):
    [first] = pipe.run(GenerationRequest("a cat", seed=1, subseed_strength=0.5, **RUN))
    params = parse_parameters(format_parameters(first.info))
    assert params["Variation seed strength"] == "0.5"
    [again] = pipe.run(GenerationRequest("a cat", seed=1, subseed=int(params["Variation seed"]),
                                         subseed_strength=0.5, **RUN))
    assert np.array_equal(np.asarray(again.image), np.asarray(first.image))


def test_seed_resize_infotext(pipe):
    [result] = pipe.run(GenerationRequest("a cat", seed=1, seed_resize_from=(24, 16), **RUN))
    text = format_parameters(result.info)
    assert "Seed resize from: 24x16" in text and "Variation seed" not in text
    [off] = pipe.run(GenerationRequest("a cat", seed=1, seed_resize_from=(0, 0), **RUN))
    assert "Seed resize" not in format_parameters(off.info)


@pytest.mark.parametrize(("fields", "message"), [
    ({"subseed_strength": True}, "subseed_strength must be a number between 0 and 1, got True"),
    ({"subseed_strength": 1.5}, "subseed_strength must be a number between 0 and 1"),
    ({"subseed": -1}, "subseed must be an integer between 0 and 4294967295, got -1"),
    ({"subseed": 2.0}, "subseed must be an integer"),
    ({"seed_resize_from": (4, 64)}, r"seed_resize_from must be \(width, height\), each 0"),
    ({"seed_resize_from": (64,)}, "seed_resize_from must be"),
])
def test_bad_values_are_one_line_errors(pipe, fields, message):
    with pytest.raises(InputError, match=message) as raised:
        pipe.run(GenerationRequest("a cat", **fields, **RUN))
    assert "\n" not in str(raised.value)
