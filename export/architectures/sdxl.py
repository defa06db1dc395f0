"""SDXL (Podell et al. 2023, "SDXL: Improving Latent Diffusion Models for High-Resolution Image
Synthesis"), with SDXL-Turbo, LCM-SDXL and LCM-LoRA SDXL: what their export writes.

Graphs, in optimum's SDXL layout: text_encoder (CLIP ViT-L) `input_ids → last_hidden_state,
pooler_output, hidden_states.N`; text_encoder_2 (OpenCLIP bigG with projection) `input_ids →
text_embeds, last_hidden_state, hidden_states.N`; unet `sample, timestep, encoder_hidden_states,
text_embeds (B, projection_dim), time_ids (B, 6) [, timestep_cond], down_block_residual_0…,
mid_block_residual → out_sample` (a ControlNet's residuals, zeros without one); vae_encoder
and vae_decoder. optimum exports every `hidden_states.N` of both encoders; SDXL reads only the
penultimate one (`hidden_states[-2]`, index num_hidden_layers − 1), so sdrt exports that one
alone under optimum's name: 33 outputs of OpenCLIP bigG would only add graph outputs nobody
reads. time_ids are diffusers' `_get_add_time_ids`: original size, crop top-left, target size.
"""

from __future__ import annotations

import torch

from sdrt.export.architectures.base import UNET_STEP, VAE_STEP, Architecture, Step
from sdrt.export.components import (
    SD_TEXT_OUTPUTS,
    GraphDef,
    Inputs,
    control_levels,
    guidance_inputs,
    load_clip_with_projection,
    load_text_encoder,
    text_graph,
    unet_graph,
    vae_graphs,
)
from sdrt.export.shapes import Side, unet_sizes
from sdrt.export.source import SourceModel
from sdrt.runtime.conditioning import penultimate_output

ADDED_CONDITIONS = ("text_embeds", "time_ids")  # diffusers' added_cond_kwargs, in this order
TEXT_ENCODER_2 = Step("text_encoder_2", load_clip_with_projection, ("text_encoder_2",))


class StableDiffusionXL(Architecture):
    """SDXL: two CLIP text encoders, a UNet with pooled-text and size conditions, the VAE."""

    names = ("sdxl",)
    lora_keys = "sdxl"
    sliced_attention = True

    def copied(self, src: SourceModel) -> tuple[str, ...]:
        return ("tokenizer", "scheduler", "tokenizer_2")

    def steps(self, src: SourceModel) -> tuple[Step, ...]:
        return (Step("text_encoder", load_text_encoder, ("text_encoder",)), TEXT_ENCODER_2,
                UNET_STEP, VAE_STEP)

    def graphs(self, src: SourceModel) -> dict[str, GraphDef]:
        sizes = unet_sizes(src.unet)
        return {
            "text_encoder": text_graph(
                "text_encoder", (*SD_TEXT_OUTPUTS, penultimate_output(src.text_encoder))),
            "text_encoder_2": second_text_graph(src),
            "unet": unet_graph(sizes, (*ADDED_CONDITIONS, *guidance_inputs(src)),
                               ADDED_CONDITIONS, self.added_inputs, control_levels(src)),
            **vae_graphs(src, sizes),
        }

    def time_ids(self, pixels: list[float]) -> list[float]:
        """One image's time ids at `pixels` (height, width): original size, crop, target size."""
        return [*pixels, 0.0, 0.0, *pixels]

    def added_inputs(self, src: SourceModel, batch: int, hw: Side,
                     gen: torch.Generator) -> Inputs:
        """text_embeds (B, projection_dim) and time_ids (B, n) at latent side `hw`."""
        pixels = [float(side * src.vae_scale_factor) for side in hw]
        return {"text_embeds": torch.randn(batch, src.text_encoder_2["projection_dim"],
                                           generator=gen),
                "time_ids": torch.tensor([self.time_ids(pixels)] * batch)}


def second_text_graph(src: SourceModel) -> GraphDef:
    """OpenCLIP bigG with projection → text_embeds, last_hidden_state, the penultimate state."""
    return text_graph("text_encoder_2", ("text_embeds", "last_hidden_state",
                                         penultimate_output(src.text_encoder_2)))
