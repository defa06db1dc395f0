"""Text conditioning per architecture: prompts → what the UNet is conditioned on.

- SD 1.x/2.x: one CLIP encoder's last hidden state is the cross-attention context.
- SDXL (Podell et al. 2023; diffusers' StableDiffusionXLPipeline.encode_prompt): both encoders'
  penultimate hidden states (`hidden_states[-2]`) side by side as the context, the second
  encoder's pooled projection as `text_embeds`, and `time_ids` = (original height, width, crop
  top, left, target height, width) micro-conditioning. An empty negative prompt becomes zeros
  when model_index.json says `force_zeros_for_empty_prompt` (diffusers does so for a negative
  prompt of None, which is what sdrt's empty default stands for).
- SDXL refiner (Podell et al. 2023, §2.5; diffusers' StableDiffusionXLImg2ImgPipeline with
  `requires_aesthetics_score`): text_encoder_2 alone, its penultimate state as the context and
  its `text_embeds`; `time_ids` = (original height, width, crop top, left, aesthetic score), the
  score 6.0 on the prompt's rows and 2.5 on the negative's (diffusers' defaults).

Rows come uncond-then-cond when guided, as the pipeline's classifier-free guidance splits them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from sdrt.runtime.components import TextEncoder
from sdrt.runtime.model.folder import read_json
from sdrt.runtime.session import Session
from sdrt.runtime.tokenizer import ClipTokenizer

log = logging.getLogger(__name__)

HIDDEN_STATES = "hidden_states."  # optimum's output names: hidden_states.N is layer N's input
AESTHETIC_SCORE = 6.0  # diffusers' StableDiffusionXLImg2ImgPipeline defaults, the refiner's
NEGATIVE_AESTHETIC_SCORE = 2.5  # time ids on the prompt's and the negative prompt's rows


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


def _tokenize(tokenizer: ClipTokenizer, texts: list[str]) -> np.ndarray:
    for text in texts:
        cut = tokenizer.truncated(text)
        if cut:
            more = (f" … ({len(cut) - LOGGED_TAIL_CHARS:,} more characters)"
                    if len(cut) > LOGGED_TAIL_CHARS else "")
            log.warning("prompt longer than %d tokens; ignored: %r%s", tokenizer.max_length,
                        cut[:LOGGED_TAIL_CHARS], more)
    return tokenizer(texts)  # (N, 77)


@dataclass(frozen=True)
class ClipConditioner:
    """SD 1.x/2.x: the encoder's last hidden state, no added conditions."""

    tokenizer: ClipTokenizer
    encoder: TextEncoder

    def __call__(self, prompt: str, negative: str, *, guided: bool, width: int,
                 height: int) -> Conditioning:
        texts = [negative, prompt] if guided else [prompt]
        return Conditioning(self.encoder(_tokenize(self.tokenizer, texts)), {})  # (N, 77, D)


@dataclass(frozen=True)
class SdxlConditioner:
    """SDXL: two encoders' penultimate states, pooled `text_embeds`, size `time_ids`."""

    tokenizer: ClipTokenizer
    tokenizer_2: ClipTokenizer
    encoder: TextEncoder
    encoder_2: TextEncoder
    hidden: tuple[str, str]  # each encoder's penultimate hidden-state output
    zeros_for_empty_negative: bool

    def __call__(self, prompt: str, negative: str, *, guided: bool, width: int,
                 height: int) -> Conditioning:
        zeros = guided and not negative and self.zeros_for_empty_negative
        context, pooled = self._encode([negative, prompt] if guided and not zeros else [prompt])
        if zeros:
            context = np.concatenate([np.zeros_like(context), context])  # (2, 77, D)
            pooled = np.concatenate([np.zeros_like(pooled), pooled])  # (2, P)
        # diffusers' _get_add_time_ids with its defaults: original = target size, no crop.
        time_ids = np.array([[height, width, 0, 0, height, width]], dtype=np.float32)
        return Conditioning(context, {"text_embeds": pooled,
                                      "time_ids": np.repeat(time_ids, len(context), axis=0)})

    def _encode(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        (first,) = self.encoder.outputs(_tokenize(self.tokenizer, texts), self.hidden[:1])
        second, pooled = self.encoder_2.outputs(_tokenize(self.tokenizer_2, texts),
                                                (self.hidden[1], "text_embeds"))
        return np.concatenate([first, second], axis=-1), pooled  # (N, 77, D1 + D2), (N, P)


@dataclass(frozen=True)
class RefinerConditioner:
    """The SDXL refiner: text_encoder_2's penultimate state and `text_embeds`, and
    `time_ids` of size, crop and aesthetic score (module docstring)."""

    tokenizer: ClipTokenizer  # tokenizer_2, the only one
    encoder: TextEncoder  # text_encoder_2
    hidden: str  # its penultimate hidden-state output
    zeros_for_empty_negative: bool
    aesthetic_score: float = AESTHETIC_SCORE
    negative_aesthetic_score: float = NEGATIVE_AESTHETIC_SCORE

    def __call__(self, prompt: str, negative: str, *, guided: bool, width: int,
                 height: int) -> Conditioning:
        zeros = guided and not negative and self.zeros_for_empty_negative
        texts = [negative, prompt] if guided and not zeros else [prompt]
        context, pooled = self.encoder.outputs(_tokenize(self.tokenizer, texts),
                                               (self.hidden, "text_embeds"))
        if zeros:
            context = np.concatenate([np.zeros_like(context), context])  # (2, 77, D)
            pooled = np.concatenate([np.zeros_like(pooled), pooled])  # (2, P)
        scores = [self.negative_aesthetic_score, self.aesthetic_score] if guided \
            else [self.aesthetic_score]
        time_ids = np.array([[height, width, 0, 0, score] for score in scores],
                            dtype=np.float32)  # (N, 5)
        return Conditioning(context, {"text_embeds": pooled, "time_ids": time_ids})


def load_conditioner(folder: Path, architecture: str,
                     open_graph: Callable[[str], Session]) -> TextConditioner:
    """The conditioner for a model folder of `architecture` (a families.Family field)."""
    if architecture == "sdxl-refiner":
        index = read_json(folder / "model_index.json")
        return RefinerConditioner(
            ClipTokenizer.from_dir(folder / "tokenizer_2"),
            TextEncoder(open_graph("text_encoder_2"), "text_encoder_2"),
            penultimate_output(read_json(folder / "text_encoder_2" / "config.json")),
            zeros_for_empty_negative=bool(index.get("force_zeros_for_empty_prompt", True)))
    tokenizer = ClipTokenizer.from_dir(folder / "tokenizer")
    encoder = TextEncoder(open_graph("text_encoder"))
    if architecture != "sdxl":
        return ClipConditioner(tokenizer, encoder)
    configs = [read_json(folder / name / "config.json")
               for name in ("text_encoder", "text_encoder_2")]
    index = read_json(folder / "model_index.json")
    return SdxlConditioner(
        tokenizer, ClipTokenizer.from_dir(folder / "tokenizer_2"), encoder,
        TextEncoder(open_graph("text_encoder_2"), "text_encoder_2"),
        hidden=(penultimate_output(configs[0]), penultimate_output(configs[1])),
        zeros_for_empty_negative=bool(index.get("force_zeros_for_empty_prompt", True)),
    )

