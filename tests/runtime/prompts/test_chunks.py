"""chunk_prompt: A1111's tokenize_line, id for id with the reference on transformers'
CLIPTokenizer (SD 1.x and SD 2.x padding), comma backtracking, BREAK, embeddings, limits."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from sdrt.runtime.prompts import chunk_prompt, plain_chunks
from sdrt.runtime.prompts.chunks import COMMA_BACKTRACK
from sdrt.runtime.tokenizer import ClipTokenizer
from tests.conftest import ROOT
from tests.runtime.prompts import a1111_reference as ref

transformers = pytest.importorskip("transformers")

CLIP_DIR = ROOT / "models" / "clip_tokenizer"
WORDS = ("red fox", "tall tree", "blue sky", "old house", "green hill", "white cloud")
LONG = ", ".join(WORDS[i % len(WORDS)] + f" {i}" for i in range(40))  # > 75 tokens, commas
PROMPTS = [
    "", "a cat", "a (red:1.3) cat on [a mat], ((sharp))", "left side BREAK right side",
    "BREAK", "a BREAK BREAK b", LONG, "(" + LONG, "word " * 160, f"start BREAK {LONG}",
]


class Triggers:
    """An EmbeddingIndex over fixed trigger token sequences."""

    def __init__(self, table: dict[tuple[int, ...], list[int]]) -> None:
        self.table = table

    def match(self, tokens, position):
        for trigger, ids in self.table.items():
            if tuple(tokens[position : position + len(trigger)]) == trigger:
                return tuple(ids), len(trigger)
        return None


@pytest.fixture(scope="module")
def tok():
    return ClipTokenizer.from_dir(CLIP_DIR)


@pytest.fixture(scope="module")
def hf_tok():
    return transformers.CLIPTokenizer.from_pretrained(CLIP_DIR)


@pytest.mark.parametrize("text", PROMPTS)
def test_equals_the_reference(tok, hf_tok, text):
    got = chunk_prompt(text, tok)
    ids, multipliers = ref.chunks(text, hf_tok)
    np.testing.assert_array_equal(got.ids, ids)
    np.testing.assert_array_equal(got.multipliers, multipliers)
    assert got.ids.dtype == np.int64 and got.multipliers.dtype == np.float32


def test_sd2_pads_with_its_pad_token_after_the_first_eos(tiny_sd2_onnx_dir):
    tok2 = ClipTokenizer.from_dir(tiny_sd2_onnx_dir / "tokenizer")
    hf2 = transformers.CLIPTokenizer.from_pretrained(tiny_sd2_onnx_dir / "tokenizer")
    assert tok2.pad_id != tok2.eos_id
    for text in ["a cat", f"x BREAK {LONG}", ""]:
        got = chunk_prompt(text, tok2)
        np.testing.assert_array_equal(got.ids, ref.chunks(text, hf2)[0])
        for row in got.ids:  # BOS, tokens, one EOS, then only pad
            end = list(row).index(tok2.eos_id)
            assert (row[end + 1 :] == tok2.pad_id).all()
    # One chunk of weight-free text is exactly what the tokenizer itself gives.
    np.testing.assert_array_equal(chunk_prompt("a cat!", tok2).ids, tok2("a cat!"))


def test_comma_backtracking(tok):
    cat, dog = tok.token_ids("cat")[0], tok.token_ids("dog")[0]
    # 70 tokens, a comma, then 10: the 4 after the comma that would fill the chunk move on.
    got = chunk_prompt("cat " * 70 + ", " + "dog " * 10, tok).ids
    assert got.shape == (2, 77)
    assert list(got[0, 1:72]) == [cat] * 70 + [tok.comma_id]
    assert (got[0, 72:] == tok.eos_id).all()
    assert list(got[1, 1:12]) == [dog] * 10 + [tok.eos_id]
    # A comma further back than COMMA_BACKTRACK tokens: the chunk is cut where it is full.
    far = 75 - COMMA_BACKTRACK - 1
    got = chunk_prompt("cat " * far + ", " + "dog " * 30, tok).ids
    assert list(got[0, 1:76]) == [cat] * far + [tok.comma_id] + [dog] * (75 - far - 1)


def test_break_starts_a_chunk_and_weights_follow_their_tokens(tok):
    got = chunk_prompt("(red:1.5) cat BREAK [dog]", tok)
    red, cat, dog = (tok.token_ids(w)[0] for w in ("red", "cat", "dog"))
    assert got.ids[:, 1:3].tolist() == [[red, cat], [dog, tok.eos_id]]
    np.testing.assert_allclose(got.multipliers[:, :4],
                               [[1, 1.5, 1, 1], [1, 1 / 1.1, 1, 1]], rtol=1e-7)


def test_an_embedding_is_never_split_across_chunks(tok, hf_tok):
    trigger = tuple(tok.token_ids("mytoken"))
    vectors = [49408, 49409, 49410]
    for before in (71, 72, 73, 75):
        text = "cat " * before + "mytoken dog"
        got = chunk_prompt(text, tok, embeddings=Triggers({trigger: vectors}))
        ids, _ = ref.chunks(text, hf_tok, {trigger: vectors})
        np.testing.assert_array_equal(got.ids, ids)
        flat = got.ids[:, 1:76].ravel().tolist()
        start = flat.index(vectors[0])
        assert flat[start : start + 3] == vectors and start // 75 == (start + 2) // 75


def test_plain_chunks_are_the_tokenizers_ids_cut_at_77(tok, caplog):
    np.testing.assert_array_equal(plain_chunks("a (red) cat", tok).ids, tok("a (red) cat"))
    with caplog.at_level(logging.WARNING):
        got = plain_chunks(LONG, tok)
    np.testing.assert_array_equal(got.ids, tok(LONG))
    assert (got.multipliers == 1).all() and "longer than 77 tokens" in caplog.text


def test_plain_chunks_replace_embedding_triggers(tok):
    trigger = tuple(tok.token_ids("mytoken"))
    got = plain_chunks("a mytoken cat", tok, embeddings=Triggers({trigger: [49408, 49409]}))
    assert list(got.ids[0, :6]) == [tok.bos_id, *tok.token_ids("a"), 49408, 49409,
                                    *tok.token_ids("cat"), tok.eos_id]


def test_prompts_are_cut_at_max_chunks_with_a_warning(tok, caplog):
    with caplog.at_level(logging.WARNING):
        got = chunk_prompt("word " * 1000, tok, max_chunks=3)
    assert got.ids.shape == (3, 77) and "longer than 227 tokens" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        got = chunk_prompt("a BREAK b BREAK c BREAK d", tok, max_chunks=3)
    assert got.ids.shape == (3, 77) and "needs 4 chunks" in caplog.text
