"""A prompt and a negative prompt of different chunk counts: the UNet runs them as two calls
(A1111's default), equal to diffusers' loop with its UNet called twice per step on the
reference encodings; low-memory mode too; DeepCache refuses in one line."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from sdrt.runtime.architectures.unet import guided_unet
from sdrt.runtime.conditioning import Conditioning
from sdrt.runtime.deepcache import CachedUNet
from sdrt.runtime.errors import InputError
from sdrt.runtime.pipeline import Pipeline
from tests.conftest import MAX_PIXEL_DIFF, count_unet_calls, load_reference, use_sampler
from tests.runtime.prompts import a1111_reference as ref

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

PROMPT = "a small red circle BREAK on a blue background BREAK in the top left"  # 3 chunks
NEGATIVE = "blurry, text"  # 1 chunk
STEPS, SEED, GUIDANCE = 3, 4, 6.0


def reference_image(folder) -> np.ndarray:
    """diffusers' pipeline on the reference encodings, its UNet run once on the negative's
    (1, 77, D) context and once on the prompt's (1, 231, D) each step."""
    pipe = load_reference(folder)
    use_sampler(pipe, "euler")
    cond, _ = ref.encode(pipe.text_encoder, *ref.chunks(PROMPT, pipe.tokenizer))
    uncond, _ = ref.encode(pipe.text_encoder, *ref.chunks(NEGATIVE, pipe.tokenizer))
    contexts = [torch.from_numpy(uncond), torch.from_numpy(cond)]
    forward = pipe.unet.forward

    def two_calls(sample, timestep, encoder_hidden_states, **kwargs):
        halves = [forward(part, timestep, context, **kwargs)[0]
                  for part, context in zip(sample.chunk(2), contexts, strict=True)]
        return (torch.cat(halves),)

    pipe.unet.forward = two_calls
    # The negative passed here only has to have the prompt's shape: two_calls replaces both.
    out = pipe(prompt_embeds=contexts[1], negative_prompt_embeds=contexts[1],
               num_inference_steps=STEPS, guidance_scale=GUIDANCE, width=64, height=64,
               generator=torch.Generator().manual_seed(SEED), output_type="np")
    return np.round(out.images[0] * 255).astype(np.int16)


@pytest.fixture(scope="module")
def expected(tiny_sd_dir):
    return reference_image(tiny_sd_dir)


@pytest.mark.parametrize("low_memory", [False, True], ids=["default", "low-memory"])
def test_different_chunk_counts_equal_two_unet_calls(tiny_onnx_dir, expected, low_memory,
                                                     monkeypatch):
    pipe = Pipeline.load(tiny_onnx_dir, low_memory=low_memory)
    calls = count_unet_calls(pipe, monkeypatch)
    [image] = pipe.generate(PROMPT, negative_prompt=NEGATIVE, steps=STEPS, seed=SEED,
                            guidance_scale=GUIDANCE, sampler="euler")
    assert [shape[0] for shape in calls] == [1] * 2 * STEPS
    got = np.asarray(image, dtype=np.int16)
    assert np.abs(got - expected).max() <= MAX_PIXEL_DIFF["ort"]


def test_deepcache_refuses_contexts_of_different_lengths():
    graphs = SimpleNamespace(full=SimpleNamespace(guidance_dim=None))
    prompt = Conditioning(np.zeros((1, 154, 8), np.float32), {})
    cond = Conditioning.stack([Conditioning(np.zeros((1, 77, 8), np.float32), {}), prompt])
    with pytest.raises(InputError, match=r"equally long, got 154 and 77 tokens; make them "
                                         r"equal \(e\.g\. with BREAK\)"):
        guided_unet(CachedUNet(graphs, 2), cond, 6.0, True)
