"""The SD, SD 2.x and SDXL conditioners on the exported graphs (ONNX Runtime) equal A1111's
algorithm built on the torch text encoders (a1111_reference.py): emphasis, BREAK, prompts over
75 tokens, every emphasis mode; one chunk of weight-free text equals the plain prompt exactly.
SD 1.x runs on conftest.py's copy with a final layer-norm bias (its docstring says why); SDXL's
penultimate states have a mean of their own; the SD 2.x test (on its padding) uses "no-norm"."""

from __future__ import annotations

import numpy as np
import pytest

from sdrt.runtime.conditioning import Conditioning
from sdrt.runtime.pipeline import Pipeline
from sdrt.runtime.prompts import PromptStyle
from tests.conftest import load_reference
from tests.runtime.prompts import a1111_reference as ref

pytest.importorskip("torch")
pytest.importorskip("diffusers")

# ORT and torch run the same float32 CLIP up to kernel order (~1e-6 on these hidden states of
# magnitude ~1); emphasis rescaling multiplies by weights ≤ 1.5, so 1e-5 bounds both.
ATOL = 1e-5
EMPHASIS = "a (red:1.4) fox on [[a hill]], (((sky)))"
BROKEN = "a red fox BREAK (green:1.2) hill"
LONG = ", ".join(f"(word {i}:1.1) thing {i}" for i in range(30))  # 3 chunks with backtracking
NEGATIVE = "blurry, [text]"


def reference_context(pipe, text, emphasis="original", layer=None, second=False):
    tokenizer = pipe.tokenizer_2 if second else pipe.tokenizer
    model = pipe.text_encoder_2 if second else pipe.text_encoder
    ids, multipliers = ref.chunks(text, tokenizer)
    if emphasis == "none":  # A1111's "None" reads the brackets as text
        ids, multipliers = ref.chunks(text.replace("(", "\\(").replace(")", "\\)")
                                      .replace("[", "\\[").replace("]", "\\]")
                                      .replace("BREAK", "BREA\\K"), tokenizer)
    return ref.encode(model, ids, multipliers, layer=layer, emphasis=emphasis)


def rows(cond: Conditioning) -> tuple[Conditioning, Conditioning]:
    """(uncond, cond) rows of a guided conditioning, stacked or apart."""
    if cond.uncond is not None:
        return cond.uncond, cond
    half = {name: np.split(value, 2) for name, value in cond.added.items()}
    context = np.split(cond.context, 2)
    return (Conditioning(context[0], {k: v[0] for k, v in half.items()}),
            Conditioning(context[1], {k: v[1] for k, v in half.items()}))


@pytest.fixture(scope="module")
def sd(biased_onnx_dir):
    return Pipeline.load(biased_onnx_dir).conditioner


@pytest.fixture(scope="module")
def sd_ref(biased_sd_dir):
    return load_reference(biased_sd_dir)


@pytest.mark.parametrize("prompt", [EMPHASIS, BROKEN, LONG])
@pytest.mark.parametrize("emphasis", ["original", "no-norm", "none"])
def test_sd_equals_the_reference(sd, sd_ref, prompt, emphasis):
    cond = sd(prompt, NEGATIVE, guided=True, width=64, height=64,
              style=PromptStyle(emphasis=emphasis))
    uncond, positive = rows(cond)
    np.testing.assert_allclose(positive.context,
                               reference_context(sd_ref, prompt, emphasis)[0], atol=ATOL)
    np.testing.assert_allclose(uncond.context,
                               reference_context(sd_ref, NEGATIVE, emphasis)[0], atol=ATOL)


def test_long_prompts_are_77_token_multiples_and_kept_apart_from_a_shorter_negative(sd):
    cond = sd(LONG, NEGATIVE, guided=True, width=64, height=64)
    assert cond.context.shape[:2] == (1, 231) and cond.uncond.context.shape[:2] == (1, 77)
    repeated = cond.repeat(3)
    assert repeated.context.shape[0] == 3 and repeated.uncond.context.shape[0] == 3
    same = sd(LONG, f"{NEGATIVE} BREAK x BREAK y", guided=True, width=64, height=64)
    assert same.uncond is None and same.context.shape[:2] == (2, 231)


@pytest.mark.parametrize("prompt", ["a red fox on a hill", "", "a fox, " * 12])
def test_one_weight_free_chunk_equals_the_plain_prompt_exactly(sd, prompt):
    a1111 = sd(prompt, "blurry", guided=True, width=64, height=64)
    plain = sd(prompt, "blurry", guided=True, width=64, height=64,
               style=PromptStyle(syntax="plain"))
    assert a1111.uncond is None
    np.testing.assert_array_equal(a1111.context, plain.context)


def test_plain_syntax_reads_brackets_as_text_and_cuts_at_77(sd, sd_ref):
    cond = sd(LONG, "", guided=False, width=64, height=64, style=PromptStyle(syntax="plain"))
    ids = sd_ref.tokenizer(LONG, padding="max_length", truncation=True, max_length=77,
                           return_tensors="pt").input_ids
    np.testing.assert_allclose(cond.context, sd_ref.text_encoder(ids)[0].detach().numpy(),
                               atol=ATOL)


def test_sd2_equals_the_reference(tiny_sd2_dir, tiny_sd2_onnx_dir):
    reference = load_reference(tiny_sd2_dir)
    cond = Pipeline.load(tiny_sd2_onnx_dir).conditioner(
        LONG, "", guided=False, width=64, height=64, style=PromptStyle(emphasis="no-norm"))
    expected, _ = reference_context(reference, LONG, "no-norm")
    np.testing.assert_allclose(cond.context, expected, atol=ATOL)


@pytest.fixture(scope="module")
def sdxl(tiny_sdxl_onnx_dir):
    return Pipeline.load(tiny_sdxl_onnx_dir).conditioner


@pytest.fixture(scope="module")
def sdxl_ref(tiny_sdxl_dir):
    return load_reference(tiny_sdxl_dir)


def sdxl_reference(pipe, text, emphasis="original"):
    first, _ = reference_context(pipe, text, emphasis, layer=-2)
    second, pooled = reference_context(pipe, text, emphasis, layer=-2, second=True)
    return np.concatenate([first, second], axis=-1), pooled


@pytest.mark.parametrize("prompt", [EMPHASIS, BROKEN, LONG])
@pytest.mark.parametrize("emphasis", ["original", "no-norm"])
def test_sdxl_equals_the_reference(sdxl, sdxl_ref, prompt, emphasis):
    cond = sdxl(prompt, NEGATIVE, guided=True, width=72, height=56,
                style=PromptStyle(emphasis=emphasis))
    for row, text in zip(rows(cond), (NEGATIVE, prompt), strict=True):
        context, pooled = sdxl_reference(sdxl_ref, text, emphasis)
        np.testing.assert_allclose(row.context, context, atol=ATOL)
        np.testing.assert_allclose(row.added["text_embeds"], pooled, atol=ATOL)
        np.testing.assert_array_equal(row.added["time_ids"], [[56, 72, 0, 0, 56, 72]])


def test_sdxl_empty_negative_is_zeros_as_long_as_the_prompt(sdxl):
    cond = sdxl(LONG, "", guided=True, width=64, height=64)
    assert cond.uncond is None and cond.context.shape[:2] == (2, 231)
    assert not cond.context[0].any() and not cond.added["text_embeds"][0].any()


@pytest.mark.parametrize("prompt", ["a red fox on a hill", "a fox, " * 12])
def test_sdxl_one_weight_free_chunk_equals_the_plain_prompt_exactly(sdxl, prompt):
    a1111 = sdxl(prompt, "blurry", guided=True, width=64, height=64)
    plain = sdxl(prompt, "blurry", guided=True, width=64, height=64,
                 style=PromptStyle(syntax="plain"))
    for name in ("text_embeds", "time_ids"):
        np.testing.assert_array_equal(a1111.added[name], plain.added[name])
    np.testing.assert_array_equal(a1111.context, plain.context)
