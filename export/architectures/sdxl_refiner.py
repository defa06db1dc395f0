"""The SDXL refiner (Podell et al. 2023, §2.5): what its export writes.

It has no first text encoder: text_encoder_2 (OpenCLIP bigG with projection) alone feeds a UNet
whose time_ids are (B, 5): original size, crop top-left and an aesthetic score, diffusers'
`requires_aesthetics_score` (optimum's refiner export). Its UNet takes no guidance input.
"""

from __future__ import annotations

from sdrt.export.architectures.base import UNET_STEP, VAE_STEP, Step
from sdrt.export.architectures.sdxl import (
    ADDED_CONDITIONS,
    TEXT_ENCODER_2,
    StableDiffusionXL,
    second_text_graph,
)
from sdrt.export.components import GraphDef, unet_graph, vae_graphs
from sdrt.export.shapes import unet_sizes
from sdrt.export.source import SourceModel

AESTHETIC_SCORE = 6.0  # diffusers' default aesthetic_score, for the dummy time ids


class SDXLRefiner(StableDiffusionXL):
    """The SDXL refiner: SDXL's second text encoder, a UNet with aesthetic-score time ids."""

    names = ("sdxl-refiner",)

    def copied(self, src: SourceModel) -> tuple[str, ...]:
        return ("scheduler", "tokenizer_2")

    def steps(self, src: SourceModel) -> tuple[Step, ...]:
        return (TEXT_ENCODER_2, UNET_STEP, VAE_STEP)

    def graphs(self, src: SourceModel) -> dict[str, GraphDef]:
        sizes = unet_sizes(src.unet)
        return {"text_encoder_2": second_text_graph(src),
                "unet": unet_graph(sizes, ADDED_CONDITIONS, ADDED_CONDITIONS, self.added_inputs),
                **vae_graphs(src, sizes)}

    def time_ids(self, pixels: list[float]) -> list[float]:
        """Original size, crop top-left, aesthetic score."""
        return [*pixels, 0.0, 0.0, AESTHETIC_SCORE]
