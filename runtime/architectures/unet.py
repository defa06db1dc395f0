"""What every UNet architecture (SD 1.x/2.x, SDXL, the SDXL refiner) shares: the UNet component,
its guided model function, low-memory mode's batch-1 calls and OpenVINO's compile-ahead.

The model function is classifier-free guidance (Ho & Salimans, 2022) over the uncond-then-cond
rows, or for an LCM UNet the guidance scale as an input (Luo et al., 2023); an inpainting UNet
also takes the mask and masked-image latents as channels. What the raw output means (epsilon or
v) is the scheduler config's prediction type, which guidance.Denoiser reads.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from sdrt.runtime import guidance
from sdrt.runtime.compile_ahead import compile_ahead
from sdrt.runtime.components import UNet, VaeDecoder
from sdrt.runtime.conditioning import Conditioning, TextConditioner
from sdrt.runtime.deepcache import CachedUNet
from sdrt.runtime.errors import InputError
from sdrt.runtime.guidance import ModelFn
from sdrt.runtime.memory.low_memory import LOW_MEMORY_BATCH
from sdrt.runtime.session import Session

if TYPE_CHECKING:
    from sdrt.runtime.architectures.base import GraphOpener
    from sdrt.runtime.control.apply import ControlRun
    from sdrt.runtime.pipeline import GenerationRequest

CHUNK_LENGTH = 77  # tokens of one CLIP chunk, the context of a prompt up to 75 tokens
# What SD 1.x/2.x and SDXL run; the refiner drops the LoRA and embedding support (its single
# encoder is SDXL's second, which LoRA and embedding files name only beside the first).
UNET_FEATURES = frozenset({"img2img", "inpainting", "deepcache", "lora", "embeddings",
                           "controlnet"})


@dataclass(frozen=True)
class UNetArchitecture:
    """A UNet architecture's strategy (base.Architecture): its text encoders and conditioner
    loader are what sets one apart from another."""

    name: str
    title: str
    text_encoders: tuple[str, ...]
    conditioner: Callable[[Path, GraphOpener], TextConditioner]
    features: frozenset[str] = UNET_FEATURES
    denoiser_graph: str = "unet"

    @property
    def required(self) -> tuple[str, ...]:
        return (*self.text_encoders, self.denoiser_graph, "vae_decoder")

    def graphs(self, folder: Path) -> tuple[str, ...]:
        return self.required

    def open_denoiser(self, session: Session, residual_levels: tuple[int, ...] = ()) -> UNet:
        return UNet(session, residual_levels)

    def load_conditioner(self, folder: Path, open_graph: GraphOpener,
                         denoiser: UNet) -> TextConditioner:
        """The architecture's conditioner; one whose prompts stay within one 77-token chunk
        where the UNet graph fixes its context length there (older or static exports: longer
        prompts are cut, with a warning quoting what was dropped)."""
        conditioner = self.conditioner(folder, open_graph)
        length = denoiser.session.inputs["encoder_hidden_states"].shape[1]
        if isinstance(length, int):
            conditioner = replace(conditioner, max_chunks=max(1, length // CHUNK_LENGTH))
        return conditioner

    def model_fn(self, denoiser: UNet, cond: Conditioning, req: GenerationRequest, *,
                 guided: bool, image_channels: np.ndarray | None = None,
                 control: ControlRun | None = None) -> ModelFn:
        return guided_unet(denoiser, cond, req.guidance_scale, guided, image_channels, control)

    def low_memory(self, denoiser: UNet) -> UNet:
        return SplitBatchUNet(denoiser)

    def compile_ahead(self, denoiser: UNet, decoder: VaeDecoder, *, batch: int,
                      latent: tuple[int, int, int], context_length: int) -> None:
        compile_ahead(denoiser, decoder, unet_batch=batch, latent=latent,
                      context_length=context_length)


def guided_unet(unet: UNet, conditioning: Conditioning, scale: float, guided: bool,
                image_channels: np.ndarray | None = None,
                control: ControlRun | None = None) -> ModelFn:
    """(x, t) → the UNet's raw output under classifier-free guidance (module docstring); a
    negative prompt whose context length differs from the prompt's (`Conditioning.uncond`) is
    its own UNet call, as A1111 runs it by default. `control` gives each UNet call the
    ControlNets' residuals for its rows (runtime/control/apply.py)."""
    context, added, apart = conditioning.context, conditioning.added, conditioning.uncond
    if guided and apart is not None and isinstance(unet, CachedUNet):
        # DeepCache caches one feature for the whole CFG batch; two calls would mix theirs.
        raise InputError(f"DeepCache needs the prompt and the negative prompt to be equally "
                         f"long, got {context.shape[1]} and {apart.context.shape[1]} tokens; "
                         f"make them equal (e.g. with BREAK)")
    embedded = None
    if unet.guidance_dim is not None:  # (B, time_cond_proj_dim), one row per image
        embedded = np.repeat(guidance.guidance_embedding(scale, unet.guidance_dim)[None],
                             len(context), axis=0)

    def call(x: np.ndarray, t: float, context: np.ndarray, added: dict[str, np.ndarray],
             uncond_rows: int, timestep_cond: np.ndarray | None = None) -> np.ndarray:
        """One UNet call on latents x, with the control residuals for its rows, if any."""
        residuals = None if control is None else \
            control.residuals(x, t, context, added, uncond_rows)
        if image_channels is not None:  # inpainting UNet: latents ‖ mask ‖ masked latents
            channels = image_channels if len(x) == len(image_channels) \
                else np.concatenate([image_channels] * (len(x) // len(image_channels)))
            x = np.concatenate([x, channels], axis=1)  # (rows, 9, h, w)
        if residuals is None:
            return unet(x, t, context, added, timestep_cond)
        return unet(x, t, context, added, timestep_cond, residuals=residuals)

    def model(x_in: np.ndarray, t: float) -> np.ndarray:
        if not guided:
            return call(x_in, t, context, added, 0, embedded)
        if apart is not None:
            return guidance.cfg_combine(call(x_in, t, apart.context, apart.added, len(x_in)),
                                        call(x_in, t, context, added, 0), scale)
        out = call(np.concatenate([x_in, x_in]), t, context, added, len(x_in))  # (2B, C, h, w)
        uncond, cond = np.split(out, 2)
        return guidance.cfg_combine(uncond, cond, scale)

    return model


class SplitBatchUNet(UNet):
    """UNet that runs its batch `rows` at a time (the CFG pair as batch-1 calls), same result;
    ControlNet residuals are split with their rows."""

    def __init__(self, unet: UNet, rows: int = LOW_MEMORY_BATCH) -> None:
        super().__init__(unet.session, unet.residual_levels)
        self.rows = rows

    def __call__(self, sample: np.ndarray, t: float, context: np.ndarray,
                 added: dict[str, np.ndarray] | None = None,
                 timestep_cond: np.ndarray | None = None,
                 residuals: dict[str, np.ndarray] | None = None) -> np.ndarray:
        if len(sample) <= self.rows:
            return super().__call__(sample, t, context, added, timestep_cond, residuals)
        parts = []
        for i in range(0, len(sample), self.rows):
            rows = slice(i, i + self.rows)
            parts.append(super().__call__(
                sample[rows], t, context[rows],
                {name: value[rows] for name, value in (added or {}).items()},
                None if timestep_cond is None else timestep_cond[rows],
                None if residuals is None else {name: value[rows]
                                                for name, value in residuals.items()}))
        return np.concatenate(parts)  # (B, C, h, w)
