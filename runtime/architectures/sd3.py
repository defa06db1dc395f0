"""SD 3 (Esser et al., 2024): an MMDiT transformer predicting the flow velocity, conditioned
jointly on two CLIP encoders and an optional T5 (runtime/sd3.py has the component, the
conditioner and the guided velocity). Text-to-image only (the flow-matching samplers start from
noise); low-memory mode keeps the CFG pair in one transformer call; skip-layer guidance needs a
transformer exported by sdrt."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from sdrt.runtime.components import VaeDecoder
from sdrt.runtime.conditioning import Conditioning
from sdrt.runtime.guidance import ModelFn
from sdrt.runtime.sd3 import (
    Sd3Conditioner,
    SkipLayerGuidance,
    Transformer,
    load_sd3_conditioner,
    velocity_fn,
)
from sdrt.runtime.session import Session

if TYPE_CHECKING:
    from sdrt.runtime.architectures.base import GraphOpener
    from sdrt.runtime.control.apply import ControlRun
    from sdrt.runtime.pipeline import GenerationRequest

TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
T5_ENCODER = "text_encoder_3"  # optional: the paper drops T5 at random in training


@dataclass(frozen=True)
class Sd3Architecture:
    """SD 3's strategy (base.Architecture)."""

    name: str = "sd3"
    title: str = "SD 3"
    denoiser_graph: str = "transformer"
    features: frozenset[str] = frozenset({"skip_layers"})

    @property
    def required(self) -> tuple[str, ...]:
        return (*TEXT_ENCODERS, self.denoiser_graph, "vae_decoder")

    def graphs(self, folder: Path) -> tuple[str, ...]:
        t5 = (T5_ENCODER,) if (folder / T5_ENCODER).is_dir() else ()
        return (*TEXT_ENCODERS, *t5, self.denoiser_graph, "vae_decoder")

    def open_denoiser(self, session: Session,
                      residual_levels: tuple[int, ...] = ()) -> Transformer:
        return Transformer(session)

    def load_conditioner(self, folder: Path, open_graph: GraphOpener,
                         denoiser: Transformer) -> Sd3Conditioner:
        return load_sd3_conditioner(folder, open_graph, denoiser.context_width)

    def model_fn(self, denoiser: Transformer, cond: Conditioning, req: GenerationRequest, *,
                 guided: bool, image_channels: np.ndarray | None = None,
                 control: ControlRun | None = None) -> ModelFn:
        """SD 3's velocity under guidance; `control` is never set (the feature is refused)."""
        slg = SkipLayerGuidance(req.skip_layers, req.skip_layer_scale) if req.skip_layers \
            else None
        return velocity_fn(denoiser, cond, req.guidance_scale, guided, req.steps, slg)

    def low_memory(self, denoiser: Transformer) -> Transformer:
        return denoiser  # the CFG pair stays one call

    def compile_ahead(self, denoiser: Transformer, decoder: VaeDecoder, *, batch: int,
                      latent: tuple[int, int, int], context_length: int) -> None:
        """Nothing ahead: OpenVINO compiles the transformer on its first call."""


SD3 = Sd3Architecture()
