"""The SDXL refiner (Podell et al., 2023, §2.5; diffusers' StableDiffusionXLImg2ImgPipeline with
`requires_aesthetics_score`): text_encoder_2 alone, its penultimate state as the context and its
`text_embeds`; `time_ids` = (original height, width, crop top, left, aesthetic score), the score
6.0 on the prompt's rows and 2.5 on the negative's (diffusers' defaults). It finishes an SDXL
base's latents (runtime/refiner.py), or runs on its own like any UNet model."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sdrt.runtime.architectures.base import GraphOpener
from sdrt.runtime.architectures.sdxl import zeros_for_empty_negative
from sdrt.runtime.architectures.unet import UNET_FEATURES, UNetArchitecture
from sdrt.runtime.components import TextEncoder
from sdrt.runtime.conditioning import (
    DEFAULT_STYLE,
    Conditioning,
    encode_prompts,
    penultimate_output,
)
from sdrt.runtime.model.folder import read_json
from sdrt.runtime.prompts import MAX_CHUNKS, PromptStyle
from sdrt.runtime.tokenizer import ClipTokenizer

AESTHETIC_SCORE = 6.0  # diffusers' StableDiffusionXLImg2ImgPipeline defaults, the refiner's
NEGATIVE_AESTHETIC_SCORE = 2.5  # time ids on the prompt's and the negative prompt's rows


@dataclass(frozen=True)
class RefinerConditioner:
    """text_encoder_2's penultimate state and `text_embeds`, and `time_ids` of size, crop and
    aesthetic score (module docstring)."""

    tokenizer: ClipTokenizer  # tokenizer_2, the only one
    encoder: TextEncoder  # text_encoder_2
    hidden: str  # its penultimate hidden-state output
    zeros_for_empty_negative: bool
    aesthetic_score: float = AESTHETIC_SCORE
    negative_aesthetic_score: float = NEGATIVE_AESTHETIC_SCORE
    max_chunks: int = MAX_CHUNKS  # 1 for a UNet graph whose context is fixed at 77 tokens

    def __call__(self, prompt: str, negative: str, *, guided: bool, width: int,
                 height: int, style: PromptStyle = DEFAULT_STYLE) -> Conditioning:
        zeros = guided and not negative and self.zeros_for_empty_negative
        texts = [negative, prompt] if guided and not zeros else [prompt]
        # [(1, 77·C, D), (1, P)] per text, as SDXL's (sdxl.py)
        rows = encode_prompts(texts, self.tokenizer, self.encoder, (self.hidden, "text_embeds"),
                              style, max_chunks=self.max_chunks)
        if zeros:  # as long as the prompt's context: attending to zeros, length is moot
            rows.insert(0, [np.zeros_like(rows[0][0]), np.zeros_like(rows[0][1])])
        scores = [self.negative_aesthetic_score, self.aesthetic_score] if guided \
            else [self.aesthetic_score]
        return Conditioning.stack([
            Conditioning(context, {"text_embeds": pooled, "time_ids": np.array(
                [[height, width, 0, 0, score]], dtype=np.float32)})  # (1, 5)
            for (context, pooled), score in zip(rows, scores, strict=True)])


def load_refiner_conditioner(folder: Path, open_graph: GraphOpener) -> RefinerConditioner:
    return RefinerConditioner(
        ClipTokenizer.from_dir(folder / "tokenizer_2"),
        TextEncoder(open_graph("text_encoder_2"), "text_encoder_2"),
        penultimate_output(read_json(folder / "text_encoder_2" / "config.json")),
        zeros_for_empty_negative=zeros_for_empty_negative(folder))


SDXL_REFINER = UNetArchitecture(
    "sdxl-refiner", "SDXL refiner", ("text_encoder_2",), load_refiner_conditioner,
    features=(UNET_FEATURES - {"lora", "embeddings", "controlnet"}) | {"refiner"})
