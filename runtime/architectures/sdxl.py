"""SDXL (Podell et al., 2023) and its LCM and Turbo families: two CLIP encoders, as diffusers'
StableDiffusionXLPipeline.encode_prompt builds the conditioning: both encoders' penultimate
hidden states (`hidden_states[-2]`) side by side as the context, the second encoder's pooled
projection as `text_embeds`, and `time_ids` = (original height, width, crop top, left, target
height, width) micro-conditioning. An empty negative prompt becomes zeros when model_index.json
says `force_zeros_for_empty_prompt` (diffusers does so for a negative prompt of None, which is
what sdrt's empty default stands for). Prompts in A1111's syntax: each encoder chunks them alike
(each padding with its own tokenizer's pad), with emphasis per encoder before the two are joined
along the features, and `text_embeds` from the first chunk, as A1111 does. An SDXL base may hand
its latents to a refiner."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sdrt.runtime.architectures.base import GraphOpener
from sdrt.runtime.architectures.unet import UNET_FEATURES, UNetArchitecture
from sdrt.runtime.components import TextEncoder
from sdrt.runtime.conditioning import (
    DEFAULT_STYLE,
    Conditioning,
    encode_prompts,
    penultimate_output,
)
from sdrt.runtime.errors import InputError
from sdrt.runtime.model.folder import read_json
from sdrt.runtime.prompts import MAX_CHUNKS, EmbeddingIndex, PromptStyle
from sdrt.runtime.tokenizer import ClipTokenizer


@dataclass(frozen=True)
class SdxlConditioner:
    """Two encoders' penultimate states, pooled `text_embeds`, size `time_ids`; `embeddings`
    finds textual-inversion triggers for each encoder (None: no embeddings)."""

    tokenizer: ClipTokenizer
    tokenizer_2: ClipTokenizer
    encoder: TextEncoder
    encoder_2: TextEncoder
    hidden: tuple[str, str]  # each encoder's penultimate hidden-state output
    zeros_for_empty_negative: bool
    embeddings: tuple[EmbeddingIndex | None, ...] = (None, None)
    max_chunks: int = MAX_CHUNKS  # 1 for a UNet graph whose context is fixed at 77 tokens

    def __call__(self, prompt: str, negative: str, *, guided: bool, width: int,
                 height: int, style: PromptStyle = DEFAULT_STYLE) -> Conditioning:
        zeros = guided and not negative and self.zeros_for_empty_negative
        rows = self._encode([negative, prompt] if guided and not zeros else [prompt], style)
        if zeros:  # zeros as long as the prompt's context: attending to zeros, length is moot
            rows.insert(0, (np.zeros_like(rows[0][0]), np.zeros_like(rows[0][1])))
        # diffusers' _get_add_time_ids with its defaults: original = target size, no crop.
        time_ids = np.array([[height, width, 0, 0, height, width]], dtype=np.float32)  # (1, 6)
        return Conditioning.stack([Conditioning(context, {"text_embeds": pooled,
                                                          "time_ids": time_ids})
                                   for context, pooled in rows])

    def _encode(self, texts: list[str],
                style: PromptStyle) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per text: the context (1, 77·C, D1 + D2) and pooled `text_embeds` (1, P)."""
        first = encode_prompts(texts, self.tokenizer, self.encoder, self.hidden[:1], style,
                               self.embeddings[0], self.max_chunks)
        second = encode_prompts(texts, self.tokenizer_2, self.encoder_2,
                                (self.hidden[1], "text_embeds"), style, self.embeddings[1],
                                self.max_chunks)
        rows = []
        for (one,), (two, pooled) in zip(first, second, strict=True):
            if one.shape[1] != two.shape[1]:  # embeddings of different vector counts
                raise InputError(f"the prompt is {one.shape[1]} tokens long for text_encoder "
                                 f"but {two.shape[1]} for text_encoder_2; an embedding must "
                                 f"have as many vectors for both")
            rows.append((np.concatenate([one, two], axis=-1), pooled))
        return rows


def zeros_for_empty_negative(folder: Path) -> bool:
    """model_index.json's `force_zeros_for_empty_prompt` (diffusers' default: true)."""
    return bool(read_json(folder / "model_index.json").get("force_zeros_for_empty_prompt", True))


def load_sdxl_conditioner(folder: Path, open_graph: GraphOpener) -> SdxlConditioner:
    configs = [read_json(folder / name / "config.json")
               for name in ("text_encoder", "text_encoder_2")]
    return SdxlConditioner(
        ClipTokenizer.from_dir(folder / "tokenizer"),
        ClipTokenizer.from_dir(folder / "tokenizer_2"),
        TextEncoder(open_graph("text_encoder")),
        TextEncoder(open_graph("text_encoder_2"), "text_encoder_2"),
        hidden=(penultimate_output(configs[0]), penultimate_output(configs[1])),
        zeros_for_empty_negative=zeros_for_empty_negative(folder),
    )


SDXL = UNetArchitecture("sdxl", "SDXL", ("text_encoder", "text_encoder_2"),
                        load_sdxl_conditioner,  # any SDXL UNet may also refine, as in A1111
                        features=UNET_FEATURES | {"refiner_base", "refiner"})
