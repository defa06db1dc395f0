"""SD 1.x and SD 2.x (Rombach et al., 2022), and the families that run their graphs (inpainting,
LCM, LCM-LoRA, Turbo): one CLIP encoder's last hidden state is the UNet's cross-attention
context, with no added conditions (diffusers' StableDiffusionPipeline.encode_prompt); prompts in
A1111's syntax become 77-token chunks side by side (runtime/conditioning.py)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sdrt.runtime.architectures.base import GraphOpener
from sdrt.runtime.architectures.unet import UNetArchitecture
from sdrt.runtime.components import TextEncoder
from sdrt.runtime.conditioning import DEFAULT_STYLE, Conditioning, encode_prompts
from sdrt.runtime.prompts import MAX_CHUNKS, EmbeddingIndex, PromptStyle
from sdrt.runtime.tokenizer import ClipTokenizer


@dataclass(frozen=True)
class ClipConditioner:
    """The encoder's last hidden state, no added conditions; uncond-then-cond when guided.
    `embeddings` finds textual-inversion triggers for the encoder (None: no embeddings)."""

    tokenizer: ClipTokenizer
    encoder: TextEncoder
    embeddings: tuple[EmbeddingIndex | None, ...] = (None,)
    max_chunks: int = MAX_CHUNKS  # 1 for a UNet graph whose context is fixed at 77 tokens

    def __call__(self, prompt: str, negative: str, *, guided: bool, width: int,
                 height: int, style: PromptStyle = DEFAULT_STYLE) -> Conditioning:
        texts = [negative, prompt] if guided else [prompt]
        encoded = encode_prompts(texts, self.tokenizer, self.encoder, ("last_hidden_state",),
                                 style, self.embeddings[0], self.max_chunks)
        return Conditioning.stack([Conditioning(context, {})  # (1, 77·C, D) each
                                   for context, in encoded])


def load_clip_conditioner(folder: Path, open_graph: GraphOpener) -> ClipConditioner:
    return ClipConditioner(ClipTokenizer.from_dir(folder / "tokenizer"),
                           TextEncoder(open_graph("text_encoder")))


SD1 = UNetArchitecture("sd1", "SD 1.x", ("text_encoder",), load_clip_conditioner)
SD2 = UNetArchitecture("sd2", "SD 2.x", ("text_encoder",), load_clip_conditioner)
