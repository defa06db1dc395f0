"""What an architecture's export strategy says, and the steps every strategy shares.

A strategy names the folders copied as they are (tokenizers, scheduler), the components loaded
in turn (one's weights in memory at a time) and the graphs each gives, those graphs' wrappers,
I/O names, dynamic axes and dummy inputs (sdrt.export.components), and the numbers it writes into
manifest.json. sdrt.export.onnx_export runs any strategy the same way.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sdrt.export.components import GraphDef, load_unet, load_vae
from sdrt.export.source import SourceModel

Loader = Callable[[Path], torch.nn.Module]


@dataclass(frozen=True)
class Step:
    """One component: the source folder its weights load from and the graphs exported from it
    (the first graph's folder gets the component's config.json, the others a copy)."""

    folder: str
    load: Loader
    graphs: tuple[str, ...]


UNET_STEP = Step("unet", load_unet, ("unet",))
VAE_STEP = Step("vae", load_vae, ("vae_encoder", "vae_decoder"))


class Architecture(ABC):
    """One architecture's export: which components, which graphs, what the manifest says."""

    names: tuple[str, ...]  # the runtime families' `architecture` values it exports
    denoiser = "unet"  # the denoiser's source folder and graph (a UNet or a transformer)
    lora_keys: str | None = None  # whose LoRA key layout diffusers reads ("sd", "sdxl"); None:
    # LoRA files are not fused into this architecture
    sliced_attention = False  # `--attention sliced` (one head at a time) applies to its denoiser

    @abstractmethod
    def copied(self, src: SourceModel) -> tuple[str, ...]:
        """Source folders copied into the export as they are (tokenizers, scheduler)."""

    @abstractmethod
    def steps(self, src: SourceModel) -> tuple[Step, ...]:
        """The components to load and export, in order."""

    @abstractmethod
    def graphs(self, src: SourceModel) -> dict[str, GraphDef]:
        """Every graph the steps name, by its folder name."""

    def prediction_type(self, src: SourceModel) -> str:
        """What the denoiser predicts, as the manifest names it (the scheduler's, for a UNet)."""
        return str(src.scheduler.get("prediction_type", "epsilon"))

    def manifest_fields(self, src: SourceModel) -> dict[str, Any]:
        """The manifest's numbers for this model: VAE scaling and shift, latent channels and
        scale factor, the denoiser's native sample size and prediction type."""
        return {
            "scaling_factor": src.scaling_factor, "latent_channels": src.latent_channels,
            "vae_scale_factor": src.vae_scale_factor,
            "sample_size": int(getattr(src, self.denoiser)["sample_size"]),
            "prediction_type": self.prediction_type(src),
            "shift_factor": float(src.vae.get("shift_factor") or 0.0),
        }
