"""AUTOMATIC1111's prompt syntax: emphasis weights, BREAK, 75-token chunks, extra-network tags.

`PromptStyle` says how a request's prompts are read: `syntax` "a1111" (attention.py,
chunks.py, emphasis.py) or "plain" (the literal text cut at 77 tokens, as diffusers reads it),
and the A1111 emphasis mode.
"""

from __future__ import annotations

from dataclasses import dataclass

from sdrt.runtime.errors import InputError
from sdrt.runtime.prompts.attention import BREAK, parse_attention
from sdrt.runtime.prompts.chunks import (
    MAX_CHUNKS,
    EmbeddingIndex,
    PromptChunks,
    chunk_prompt,
    plain_chunks,
)
from sdrt.runtime.prompts.emphasis import EMPHASES, apply_emphasis
from sdrt.runtime.prompts.networks import NetworkTag, extract_networks

SYNTAXES = ("a1111", "plain")


@dataclass(frozen=True)
class PromptStyle:
    """How prompts are read: A1111's syntax (default) or plain text, and the emphasis mode."""

    syntax: str = "a1111"
    emphasis: str = "original"

    def __post_init__(self) -> None:
        if self.syntax not in SYNTAXES:
            raise InputError(f"unknown prompt syntax '{str(self.syntax)[:20]}'; choose one of: "
                             f"{', '.join(SYNTAXES)}")
        if self.emphasis not in EMPHASES:
            raise InputError(f"unknown emphasis '{str(self.emphasis)[:20]}'; choose one of: "
                             f"{', '.join(EMPHASES)}")


__all__ = [
    "BREAK",
    "EMPHASES",
    "MAX_CHUNKS",
    "SYNTAXES",
    "EmbeddingIndex",
    "NetworkTag",
    "PromptChunks",
    "PromptStyle",
    "apply_emphasis",
    "chunk_prompt",
    "extract_networks",
    "parse_attention",
    "plain_chunks",
]
