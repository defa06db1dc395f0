"""Text conditioning: what every architecture's prompts → denoiser conditioning shares.

A conditioner (each architecture's, runtime/architectures/) turns one request's prompts into
`Conditioning` rows, uncond-then-cond when guided, as classifier-free guidance splits them.
CLIP prompts over the tokenizer's 77 tokens are cut there, with a warning quoting what was
dropped.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from sdrt.runtime.tokenizer import ClipTokenizer

log = logging.getLogger(__name__)

HIDDEN_STATES = "hidden_states."  # optimum's output names: hidden_states.N is layer N's input


def penultimate_output(config: dict[str, Any]) -> str:
    """The output name of a CLIP encoder's `hidden_states[-2]` (its last layer's input)."""
    return f"{HIDDEN_STATES}{int(config['num_hidden_layers']) - 1}"


@dataclass(frozen=True)
class Conditioning:
    """UNet conditioning rows: context (N, 77, D) and the UNet's added inputs, row-aligned."""

    context: np.ndarray
    added: dict[str, np.ndarray]

    def repeat(self, count: int) -> Conditioning:
        """Each row `count` times in place, as diffusers' num_images_per_prompt does."""
        return Conditioning(np.repeat(self.context, count, axis=0),
                            {name: np.repeat(value, count, axis=0)
                             for name, value in self.added.items()})


class TextConditioner(Protocol):
    """Turns one request's prompts into conditioning rows (uncond first when guided)."""

    tokenizer: ClipTokenizer

    def __call__(self, prompt: str, negative: str, *, guided: bool, width: int,
                 height: int) -> Conditioning: ...


# The dropped tail is quoted in the warning up to this many characters: a server's client may
# send a prompt of hundreds of kilobytes, which must not land whole in the log.
LOGGED_TAIL_CHARS = 120


def tokenize(tokenizer: ClipTokenizer, texts: list[str]) -> np.ndarray:
    """Token ids (N, 77), warning about each text cut at the tokenizer's length."""
    for text in texts:
        cut = tokenizer.truncated(text)
        if cut:
            more = (f" … ({len(cut) - LOGGED_TAIL_CHARS:,} more characters)"
                    if len(cut) > LOGGED_TAIL_CHARS else "")
            log.warning("prompt longer than %d tokens; ignored: %r%s", tokenizer.max_length,
                        cut[:LOGGED_TAIL_CHARS], more)
    return tokenizer(texts)  # (N, 77)
