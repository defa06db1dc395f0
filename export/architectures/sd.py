"""SD 1.x and 2.x (Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion
Models"), with their inpainting, LCM, LCM-LoRA and SD-Turbo families: what their export writes.

Graphs, in optimum's layout: text_encoder (CLIP ViT-L for SD 1.x, OpenCLIP ViT-H for SD 2.x)
`input_ids → last_hidden_state, pooler_output`; unet `sample, timestep, encoder_hidden_states
[, timestep_cond], down_block_residual_0…, mid_block_residual → out_sample` (the last: a
ControlNet's residuals, zeros without one; an inpainting UNet's sample has 9 channels: latents,
mask, masked-image latents); vae_encoder and vae_decoder. The UNet traces and checks at sizes from
its config (sdrt.export.shapes).
"""

from __future__ import annotations

from sdrt.export.architectures.base import UNET_STEP, VAE_STEP, Architecture, Step
from sdrt.export.components import (
    GraphDef,
    control_levels,
    guidance_inputs,
    load_text_encoder,
    text_graph,
    unet_graph,
    vae_graphs,
)
from sdrt.export.shapes import unet_sizes
from sdrt.export.source import SourceModel


class StableDiffusion(Architecture):
    """SD 1.x / 2.x: one CLIP text encoder, a UNet, the VAE."""

    names = ("sd1", "sd2")
    lora_keys = "sd"
    sliced_attention = True

    def copied(self, src: SourceModel) -> tuple[str, ...]:
        return ("tokenizer", "scheduler")

    def steps(self, src: SourceModel) -> tuple[Step, ...]:
        return (Step("text_encoder", load_text_encoder, ("text_encoder",)), UNET_STEP, VAE_STEP)

    def graphs(self, src: SourceModel) -> dict[str, GraphDef]:
        sizes = unet_sizes(src.unet)
        return {"text_encoder": text_graph("text_encoder"),
                "unet": unet_graph(sizes, guidance_inputs(src), levels=control_levels(src)),
                **vae_graphs(src, sizes)}
