"""End to end: sdrt images equal diffusers' StableDiffusionPipeline images from the same weights.

Both sides start from the same noise (torch-compatible generator, one seed per image) and run the
same scheduler, so the only differences are graph-vs-eager float32 arithmetic.
"""

import numpy as np
import pytest

from sdrt.runtime.pipeline import Pipeline
from tests.conftest import (
    MAX_PIXEL_DIFF,
    NEGATIVE,
    PARITY_SIZES,
    PROMPT,
    REFERENCE_SCHEDULERS,
    as_array,
    count_unet_calls,
    load_reference,
    reference_images,
)

pytest.importorskip("torch")
pytest.importorskip("diffusers")

pytestmark = pytest.mark.parity



@pytest.fixture(scope="module")
def reference(tiny_sd_dir):
    return load_reference(tiny_sd_dir)


@pytest.fixture(scope="module", params=["ort", "openvino"])
def sdrt_pipe(request, tiny_onnx_dir):
    if request.param == "openvino":
        pytest.importorskip("openvino")
    return Pipeline.load(tiny_onnx_dir, backend=request.param)


@pytest.mark.parametrize("size", PARITY_SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("sampler", sorted(REFERENCE_SCHEDULERS))
def test_images_equal_diffusers(reference, sdrt_pipe, sampler, size):
    width, height = size
    options = dict(steps=4, guidance=6.0, width=width, height=height, seed=7, num_images=2)
    expected = reference_images(reference, sampler, **options)
    images = sdrt_pipe.generate(
        PROMPT, negative_prompt=NEGATIVE, steps=4, guidance_scale=6.0, width=width,
        height=height, seed=7, num_images=2, sampler=sampler,
    )
    got = as_array(images)
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() <= MAX_PIXEL_DIFF[sdrt_pipe.backend]


def test_guidance_off_runs_unet_once_per_step_and_matches(reference, tiny_onnx_dir, monkeypatch):
    pipe = Pipeline.load(tiny_onnx_dir)
    calls = count_unet_calls(pipe, monkeypatch)
    images = pipe.generate(PROMPT, steps=3, guidance_scale=1.0, seed=3, sampler="euler")
    assert [shape[0] for shape in calls] == [1, 1, 1]
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
