"""SDXL (Podell et al., 2023) and its LCM and Turbo families: two CLIP encoders, as diffusers'
StableDiffusionXLPipeline.encode_prompt builds the conditioning: both encoders' penultimate
hidden states (`hidden_states[-2]`) side by side as the context, the second encoder's pooled
projection as `text_embeds`, and `time_ids` = (original height, width, crop top, left, target
height, width) micro-conditioning. An empty negative prompt becomes zeros when model_index.json
says `force_zeros_for_empty_prompt` (diffusers does so for a negative prompt of None, which is
what sdrt's empty default stands for). An SDXL base may hand its latents to a refiner."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sdrt.runtime.architectures.base import GraphOpener
from sdrt.runtime.architectures.unet import UNET_FEATURES, UNetArchitecture
from sdrt.runtime.components import TextEncoder
from sdrt.runtime.conditioning import Conditioning, penultimate_output, tokenize
from sdrt.runtime.model.folder import read_json
from sdrt.runtime.tokenizer import ClipTokenizer


@dataclass(frozen=True)
class SdxlConditioner:
    """Two encoders' penultimate states, pooled `text_embeds`, size `time_ids`."""

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
        (first,) = self.encoder.outputs(tokenize(self.tokenizer, texts), self.hidden[:1])
        second, pooled = self.encoder_2.outputs(tokenize(self.tokenizer_2, texts),
                                                (self.hidden[1], "text_embeds"))
        return np.concatenate([first, second], axis=-1), pooled  # (N, 77, D1 + D2), (N, P)


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
