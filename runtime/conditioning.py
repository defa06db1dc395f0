"""Text conditioning: what every architecture's prompts → denoiser conditioning shares.

A conditioner (each architecture's, runtime/architectures/) turns one request's prompts into
`Conditioning` rows, uncond-then-cond when guided, as classifier-free guidance splits them.
CLIP prompts are read as the request's `PromptStyle` says (runtime/prompts/): in A1111's syntax,
each prompt is encoded as its 77-token chunks, each chunk's hidden states weighted by the
emphasis mode, the chunks side by side along the sequence axis (A1111's
`FrozenCLIPEmbedderWithCustomWords`); as plain text, cut at 77 tokens with a warning quoting
what was dropped (diffusers' reading).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from sdrt.runtime.prompts import (
    MAX_CHUNKS,
    EmbeddingIndex,
    PromptChunks,
    PromptStyle,
    apply_emphasis,
    chunk_prompt,
    plain_chunks,
)
from sdrt.runtime.prompts.chunks import LOGGED_TAIL_CHARS as LOGGED_TAIL_CHARS
from sdrt.runtime.tokenizer import ClipTokenizer

if TYPE_CHECKING:
    from sdrt.runtime.components import TextEncoder

HIDDEN_STATES = "hidden_states."  # optimum's output names: hidden_states.N is layer N's input
DEFAULT_STYLE = PromptStyle()  # A1111's syntax and its "Original" emphasis


def penultimate_output(config: dict[str, Any]) -> str:
    """The output name of a CLIP encoder's `hidden_states[-2]` (its last layer's input)."""
    return f"{HIDDEN_STATES}{int(config['num_hidden_layers']) - 1}"


@dataclass(frozen=True)
class Conditioning:
    """UNet conditioning rows: context (N, L, D) and the UNet's added inputs, row-aligned.

    `uncond`, when set, holds the unconditional rows apart because their context length
    differs from the prompt's (a negative prompt of another chunk count): `context` and `added`
    are then the prompt's rows only, and the denoiser runs the two as separate calls, as A1111
    does by default."""

    context: np.ndarray
    added: dict[str, np.ndarray]
    uncond: Conditioning | None = None

    @classmethod
    def stack(cls, rows: Sequence[Conditioning]) -> Conditioning:
        """Rows (uncond then cond when guided) in one batch; kept apart when the two contexts'
        lengths differ."""
        lengths = {row.context.shape[1] for row in rows}
        if len(lengths) > 1:
            uncond, cond = rows  # only the CFG pair can differ
            return replace(cond, uncond=uncond)
        return cls(np.concatenate([row.context for row in rows]),  # (N, L, D)
                   {name: np.concatenate([row.added[name] for row in rows])
                    for name in rows[0].added})

    def repeat(self, count: int) -> Conditioning:
        """Each row `count` times in place, as diffusers' num_images_per_prompt does."""
        return Conditioning(np.repeat(self.context, count, axis=0),
                            {name: np.repeat(value, count, axis=0)
                             for name, value in self.added.items()},
                            None if self.uncond is None else self.uncond.repeat(count))


class TextConditioner(Protocol):
    """Turns one request's prompts into conditioning rows (uncond first when guided)."""

    tokenizer: ClipTokenizer

    def __call__(self, prompt: str, negative: str, *, guided: bool, width: int,
                 height: int, style: PromptStyle = DEFAULT_STYLE) -> Conditioning: ...


def tokenize(tokenizer: ClipTokenizer, texts: list[str]) -> np.ndarray:
    """Plain token ids (N, 77), warning about each text cut at the tokenizer's length."""
    return np.concatenate([plain_chunks(text, tokenizer).ids for text in texts])  # (N, 77)


def prompt_chunks(text: str, tokenizer: ClipTokenizer, style: PromptStyle,
                  embeddings: EmbeddingIndex | None = None,
                  max_chunks: int = MAX_CHUNKS) -> PromptChunks:
    """`text`'s chunks as `style` reads it (A1111's emphasis "none" also reads brackets as
    literal text)."""
    if style.syntax == "plain":
        return plain_chunks(text, tokenizer, embeddings=embeddings)
    return chunk_prompt(text, tokenizer, embeddings=embeddings,
                        attention=style.emphasis != "none", max_chunks=max_chunks)


def encode_prompts(texts: Sequence[str], tokenizer: ClipTokenizer, encoder: TextEncoder,
                   outputs: tuple[str, ...], style: PromptStyle,
                   embeddings: EmbeddingIndex | None = None,
                   max_chunks: int = MAX_CHUNKS) -> list[list[np.ndarray]]:
    """Per text: its context (1, 77·C, D), the first output of each of its C chunks weighted
    by the emphasis and joined along the sequence axis; then the other outputs of its first
    chunk (1, …), where A1111 takes SDXL's pooled embedding. All chunks of all texts go through
    the encoder as one batch."""
    chunks = [prompt_chunks(text, tokenizer, style, embeddings, max_chunks) for text in texts]
    encoded = encoder.outputs(np.concatenate([c.ids for c in chunks]), outputs)  # (ΣC, 77, …)
    hidden, rest = encoded[0], encoded[1:]
    per_text, start = [], 0
    for c in chunks:
        weighted = [apply_emphasis(hidden[start + i : start + i + 1], c.multipliers[i],
                                   style.emphasis) for i in range(len(c.ids))]
        per_text.append([np.concatenate(weighted, axis=1),  # (1, 77·C, D)
                         *(out[start : start + 1] for out in rest)])
        start += len(c.ids)
    return per_text
