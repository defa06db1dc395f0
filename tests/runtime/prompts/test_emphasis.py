"""apply_emphasis: A1111's "Original", "No norm" and "None" on one chunk."""

import numpy as np
import pytest

from sdrt.runtime.errors import InputError
from sdrt.runtime.prompts import EMPHASES, PromptStyle, apply_emphasis


@pytest.fixture
def chunk():
    rng = np.random.default_rng(0)
    z = rng.normal(0.3, 1.0, (1, 77, 16)).astype(np.float32)
    multipliers = np.ones(77, np.float32)
    multipliers[3:6] = [1.4, 0.8, 1.21]
    return z, multipliers


def test_original_weights_then_restores_the_mean(chunk):
    z, m = chunk
    out = apply_emphasis(z, m, "original")
    assert out.dtype == np.float32 and out.shape == z.shape
    np.testing.assert_allclose(out.mean(dtype=np.float64), z.mean(dtype=np.float64), rtol=1e-5)
    ratio = out / (z * m[None, :, None])  # one factor for the whole chunk
    np.testing.assert_allclose(ratio, ratio.flat[0], rtol=1e-5)


def test_no_norm_only_multiplies_and_none_ignores_weights(chunk):
    z, m = chunk
    np.testing.assert_array_equal(apply_emphasis(z, m, "no-norm"), z * m[None, :, None])
    assert apply_emphasis(z, m, "none") is z


@pytest.mark.parametrize("mode", EMPHASES)
def test_weights_of_one_leave_the_chunk_as_it_is(chunk, mode):
    z, _ = chunk
    assert apply_emphasis(z, np.ones(77, np.float32), mode) is z


def test_unknown_modes_are_refused():
    with pytest.raises(InputError, match="unknown emphasis"):
        apply_emphasis(np.zeros((1, 77, 4), np.float32), np.ones(77, np.float32), "strong")
    with pytest.raises(InputError, match="unknown emphasis"):
        PromptStyle(emphasis="Original")
    with pytest.raises(InputError, match="unknown prompt syntax"):
        PromptStyle(syntax="comfy")
