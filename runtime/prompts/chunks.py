"""A prompt as 77-token chunks with a weight per token: AUTOMATIC1111's `tokenize_line`.

Each parsed piece (attention.py) is tokenized on its own, without BOS/EOS. Tokens fill chunks of
`max_length - 2` (75); a full chunk closes, and when the token that meets a full chunk is not a
comma and the chunk's last comma is at most COMMA_BACKTRACK tokens back, the tokens after that
comma move on to the next chunk, so a phrase is not cut in two. BREAK closes the chunk at once.
A textual-inversion embedding is never split: one that does not fit moves to the next chunk.
Each chunk is BOS + its tokens + EOS padding to 75 + EOS, weights 1 outside the tokens; then, as
A1111 feeds SD 2.x, every position after the first EOS becomes the tokenizer's pad id where that
differs from EOS (`!` for SD 2.x and SDXL's second tokenizer). An empty prompt is one chunk.

`plain_chunks` is diffusers' reading instead: the literal text cut at 77 tokens.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from sdrt.runtime.errors import InputError
from sdrt.runtime.prompts.attention import BREAK, BREAK_WEIGHT, parse_attention
from sdrt.runtime.tokenizer import ClipTokenizer

log = logging.getLogger(__name__)

COMMA_BACKTRACK = 20  # A1111's `comma_padding_backtrack` default
# A1111 sets no limit, but each chunk lengthens every cross-attention of every UNet call (and a
# server's client may send hundreds of kilobytes): prompts are cut at this many chunks (600
# tokens, several times the longest prompts people write), with a warning.
MAX_CHUNKS = 8
# The dropped tail is quoted in the warning up to this many characters: a server's client may
# send a prompt of hundreds of kilobytes, which must not land whole in the log.
LOGGED_TAIL_CHARS = 120


@dataclass(frozen=True)
class PromptChunks:
    """A prompt's chunks: token ids (C, 77) int64 and each token's weight (C, 77) float32."""

    ids: np.ndarray
    multipliers: np.ndarray


class EmbeddingIndex(Protocol):
    """Where a textual-inversion trigger starts in a token list, for one text encoder."""

    def match(self, tokens: Sequence[int], position: int) -> tuple[tuple[int, ...], int] | None:
        """The ids standing for the embedding's vectors and how many of `tokens` the trigger
        word takes, when an embedding's trigger starts at `position`; else None."""


@dataclass
class _Chunker:
    """tokenize_line's state: the chunk being filled and the chunks closed so far."""

    size: int  # tokens per chunk between BOS and EOS
    comma: int | None
    tokens: list[int] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)
    last_comma: int = -1  # index in `tokens` of the chunk's last comma; -1: none
    closed: list[tuple[list[int], list[float]]] = field(default_factory=list)

    def close(self) -> None:
        self.closed.append((self.tokens, self.weights))
        self.tokens, self.weights, self.last_comma = [], [], -1

    def add(self, tokens: Sequence[int], weight: float,
            embeddings: EmbeddingIndex | None) -> None:
        position = 0
        while position < len(tokens):
            token = tokens[position]
            if token == self.comma:
                self.last_comma = len(self.tokens)
            elif (len(self.tokens) == self.size and self.last_comma != -1
                  and len(self.tokens) - self.last_comma <= COMMA_BACKTRACK):
                self._move_after_comma()
            if len(self.tokens) == self.size:
                self.close()
            found = embeddings.match(tokens, position) if embeddings is not None else None
            if found is None:
                self.tokens.append(token)
                self.weights.append(weight)
                position += 1
                continue
            ids, used = found
            if len(ids) > self.size:
                raise InputError(f"an embedding of {len(ids)} vectors does not fit in a "
                                 f"{self.size}-token chunk")
            if len(self.tokens) + len(ids) > self.size:
                self.close()
            self.tokens += ids
            self.weights += [weight] * len(ids)
            position += used

    def _move_after_comma(self) -> None:
        cut = self.last_comma + 1  # the comma stays in this chunk
        tokens, weights = self.tokens[cut:], self.weights[cut:]
        self.tokens, self.weights = self.tokens[:cut], self.weights[:cut]
        self.close()
        self.tokens, self.weights = tokens, weights


def chunk_prompt(text: str, tokenizer: ClipTokenizer, *,
                 embeddings: EmbeddingIndex | None = None, attention: bool = True,
                 max_chunks: int = MAX_CHUNKS) -> PromptChunks:
    """A1111's chunks of `text` (module docstring), at most `max_chunks` of them (the text as
    written is cut first at that many chunks' tokens, with a warning quoting what was dropped);
    `attention=False` reads brackets and BREAK as literal text (A1111's emphasis "None")."""
    size = tokenizer.max_length - 2
    text = _cut(tokenizer, text, max_chunks * size + 2)
    pieces = parse_attention(text) if attention else [(text, 1.0)]
    chunker = _Chunker(size, tokenizer.comma_id)
    for piece, weight in pieces:
        if piece == BREAK and weight == BREAK_WEIGHT:
            chunker.close()
        else:
            chunker.add(tokenizer.token_ids(piece), weight, embeddings)
    if chunker.tokens or not chunker.closed:
        chunker.close()
    if len(chunker.closed) > max_chunks:  # BREAKs and comma moves may add chunks
        log.warning("prompt needs %d chunks of %d tokens; only the first %d are used",
                    len(chunker.closed), size, max_chunks)
    rows = [_framed(tokens, weights, tokenizer, size) for tokens, weights in
            chunker.closed[:max_chunks]]
    return PromptChunks(np.array([ids for ids, _ in rows], np.int64),  # (C, 77)
                        np.array([weights for _, weights in rows], np.float32))  # (C, 77)


def _framed(tokens: list[int], weights: list[float], tokenizer: ClipTokenizer,
            size: int) -> tuple[list[int], list[float]]:
    """BOS + tokens + EOS up to `size` + EOS, pad after the first EOS (module docstring)."""
    fill = size - len(tokens)
    ids = [tokenizer.bos_id, *tokens, *[tokenizer.eos_id] * fill, tokenizer.eos_id]
    if tokenizer.pad_id != tokenizer.eos_id:
        end = ids.index(tokenizer.eos_id) + 1
        ids[end:] = [tokenizer.pad_id] * (len(ids) - end)
    return ids, [1.0, *weights, *[1.0] * fill, 1.0]


def plain_chunks(text: str, tokenizer: ClipTokenizer, *,
                 embeddings: EmbeddingIndex | None = None) -> PromptChunks:
    """The literal text in one chunk, cut at the tokenizer's length with a warning quoting what
    was dropped (diffusers' reading); weights all 1. Embeddings' triggers are replaced first."""
    if embeddings is None:
        _cut(tokenizer, text, tokenizer.max_length)
        ids = tokenizer(text)  # (1, 77)
    else:
        tokens, position, raw = [], 0, tokenizer.token_ids(text)
        while position < len(raw):
            found = embeddings.match(raw, position)
            ids_here, used = found if found is not None else ((raw[position],), 1)
            tokens += ids_here
            position += used
        size = tokenizer.max_length - 2
        if len(tokens) > size:
            log.warning("prompt longer than %d tokens; the last %d are ignored",
                        tokenizer.max_length, len(tokens) - size)
        ids = np.full((1, tokenizer.max_length), tokenizer.pad_id, np.int64)  # (1, 77)
        row = [tokenizer.bos_id, *tokens[:size], tokenizer.eos_id]
        ids[0, : len(row)] = row
    return PromptChunks(ids, np.ones(ids.shape, np.float32))


def _cut(tokenizer: ClipTokenizer, text: str, length: int) -> str:
    """`text` without what does not fit in `length` tokens (BOS, EOS included), warning with
    the start of what was dropped."""
    cut = tokenizer.truncated(text, length)
    if not cut:
        return text
    more = (f" … ({len(cut) - LOGGED_TAIL_CHARS:,} more characters)"
            if len(cut) > LOGGED_TAIL_CHARS else "")
    log.warning("prompt longer than %d tokens; ignored: %r%s", length, cut[:LOGGED_TAIL_CHARS],
                more)
    return text[: len(text) - len(cut)]
