"""What an architecture decides at run time, as one strategy object per architecture.

A strategy names the graphs a generation opens, builds the text conditioner, opens the denoiser
(a UNet or an MMDiT transformer), wraps it as the sampler's model function (epsilon / v through
guidance.py, velocity for flow matching), says what low-memory mode does to it, and lists the
features it supports; `require` refuses any other in one line, for every architecture alike.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np

from sdrt.runtime.conditioning import Conditioning, TextConditioner
from sdrt.runtime.errors import InputError
from sdrt.runtime.guidance import ModelFn
from sdrt.runtime.session import Session

if TYPE_CHECKING:
    from sdrt.runtime.components import VaeDecoder
    from sdrt.runtime.control.apply import ControlRun
    from sdrt.runtime.img2img import ImageInput
    from sdrt.runtime.pipeline import GenerationRequest

GraphOpener = Callable[[str], Session]  # a component's name → its session, as the variant runs it

# feature → how a refusal names it
FEATURES = {
    "img2img": "image-to-image",
    "inpainting": "inpainting",
    "deepcache": "DeepCache",
    "skip_layers": "skip-layer guidance",
    "refiner_base": "handing latents to a refiner",
    "refiner": "refining another model's latents",
    "lora": "LoRA at run time",
    "embeddings": "textual inversion",
    "controlnet": "ControlNet",
}
# One line for DeepCache with ControlNet: the shallow calls reuse a deep feature computed
# without the residuals of the calls they stand for.
DEEPCACHE_CONTROL = ("DeepCache cannot run with ControlNet (its cached features would miss the "
                     "control residuals); drop deepcache or the ControlNet units")


class DenoiserGraph(Protocol):
    """The denoiser component (components.UNet, sd3.Transformer): latents, t, conditioning →
    the model's raw output, row for row."""

    session: Session
    in_channels: int | str | None
    guidance_dim: int | None  # an LCM UNet's guidance-embedding width; None: classifier-free

    def __call__(self, sample: np.ndarray, t: float, context: np.ndarray,
                 added: dict[str, np.ndarray] | None = None, timestep_cond=None) -> np.ndarray: ...


class Architecture(Protocol):
    """One architecture's run-time decisions (see the module docstring)."""

    name: str  # a families.Family.architecture
    title: str
    denoiser_graph: str  # the denoiser's component folder: "unet" or "transformer"
    required: tuple[str, ...]  # the graphs a folder of this architecture must have
    features: frozenset[str]  # among FEATURES

    def graphs(self, folder: Path) -> tuple[str, ...]:
        """The graphs one generation opens, in the order it runs them."""

    def open_denoiser(self, session: Session,
                      residual_levels: tuple[int, ...] = ()) -> DenoiserGraph:
        """The denoiser component; a UNet taking ControlNet residuals gets their levels."""

    def load_conditioner(self, folder: Path, open_graph: GraphOpener,
                         denoiser: DenoiserGraph) -> TextConditioner: ...

    def model_fn(self, denoiser: DenoiserGraph, cond: Conditioning, req: GenerationRequest, *,
                 guided: bool, image_channels: np.ndarray | None = None,
                 control: ControlRun | None = None) -> ModelFn:
        """(x, t) → the guided raw output the sampler's model-kind wrapper reads; `control`:
        the request's ControlNets (runtime/control/apply.py)."""

    def low_memory(self, denoiser: DenoiserGraph) -> DenoiserGraph:
        """The denoiser as low-memory mode runs it (how it splits the CFG batch)."""

    def compile_ahead(self, denoiser: DenoiserGraph, decoder: VaeDecoder, *, batch: int,
                      latent: tuple[int, int, int], context_length: int) -> None:
        """Start compiling the denoiser and decoder for a request's shapes, where it can."""


def refusal(architecture: Architecture, feature: str) -> str | None:
    """Why `architecture` cannot run `feature` (None: it can): the one line every refusal of an
    unsupported combination says."""
    if feature in architecture.features:
        return None
    return f"{FEATURES[feature]} is not supported for {architecture.title} models"


def require(architecture: Architecture, feature: str) -> None:
    """InputError when `architecture` does not support `feature`."""
    refused = refusal(architecture, feature)
    if refused:
        raise InputError(refused)


def check_request(architecture: Architecture, req: GenerationRequest,
                  init: ImageInput | None = None) -> None:
    """Refuse a request (and its image input) that asks for what the architecture lacks."""
    if init is not None:
        require(architecture, "inpainting" if init.mask is not None else "img2img")
    if req.skip_layers:
        require(architecture, "skip_layers")
    if req.deepcache is not None:
        require(architecture, "deepcache")
    if req.controls:
        require(architecture, "controlnet")
        if req.deepcache is not None:
            raise InputError(DEEPCACHE_CONTROL)
