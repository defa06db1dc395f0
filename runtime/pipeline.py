"""Text-to-image: tokenizer → text encoder(s) → NumPy sampler loop over the UNet → VAE decoder.

Latent diffusion (Rombach et al., 2022) with classifier-free guidance (Ho & Salimans, 2022), or
for LCM UNets the guidance scale as an input (Luo et al., 2023), run from exported graphs.
`Pipeline.load` does all file I/O; `Pipeline.run` reads as numbered steps and keeps all per-call
state local, so several threads may generate at once.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image

from sdrt.runtime import guidance
from sdrt.runtime.components import UNet, VaeDecoder
from sdrt.runtime.conditioning import Conditioning, TextConditioner, load_conditioner
from sdrt.runtime.errors import GenerationError, InputError
from sdrt.runtime.metadata import GenerationInfo, format_parameters
from sdrt.runtime.model_folder import (
    EMBEDDED_MODEL,
    ModelFacts,
    check_folder,
    read_facts,
)
from sdrt.runtime.rng import GENERATORS, make_generator
from sdrt.runtime.samplers import default_sampler, display_name, resolve_sampler, sample
from sdrt.runtime.schedules import SchedulerConfig
from sdrt.runtime.session import BACKENDS, open_session
from sdrt.runtime.tokenizer import ClipTokenizer
from sdrt.runtime.variants import Variant, resolve_variant

MAX_SIDE = 2048  # pixels; beyond this one UNet call needs more memory than the machines we target
MAX_IMAGES = 16  # per call; larger batches belong to `sdrt batch`
MAX_STEPS = 1000  # the training schedule has 1000 timesteps; more steps repeat them
MAX_SEED = 2**32 - 1  # torch's manual_seed range that A1111 and diffusers users pass around

StepCallback = Callable[[int, int, np.ndarray], bool | None]


@dataclass(frozen=True)
class GenerationRequest:
    """One text-to-image call; None fields take the model family's defaults in `resolve`."""

    prompt: str
    negative_prompt: str = ""
    steps: int | None = None
    guidance_scale: float | None = None
    sampler: str | None = None
    seed: int | None = None
    width: int | None = None
    height: int | None = None
    num_images: int = 1
    generator: str = "torch"

    def resolve(self, facts: ModelFacts, scheduler: SchedulerConfig) -> GenerationRequest:
        """Fill defaults from the model and its family, then check each field (errors name it)."""
        family = facts.family
        sampler = self.sampler or family.sampler
        filled = replace(
            self,
            steps=family.steps if self.steps is None else self.steps,
            guidance_scale=family.guidance_scale if self.guidance_scale is None
            else self.guidance_scale,
            sampler=resolve_sampler(sampler) if sampler else default_sampler(scheduler),
            seed=secrets.randbelow(MAX_SEED + 1) if self.seed is None else self.seed,
            width=facts.default_size if self.width is None else self.width,
            height=facts.default_size if self.height is None else self.height,
        )
        filled.validate(facts.vae_scale_factor)
        return filled

    def validate(self, vae_scale_factor: int) -> None:
        multiple = max(8, vae_scale_factor)
        for name, side in (("width", self.width), ("height", self.height)):
            if not isinstance(side, int) or side <= 0 or side > MAX_SIDE or side % multiple:
                raise InputError(
                    f"{name} must be a multiple of {multiple} between {multiple} and "
                    f"{MAX_SIDE}, got {side}"
                )
        if not 1 <= self.steps <= MAX_STEPS:
            raise InputError(f"steps must be between 1 and {MAX_STEPS}, got {self.steps}")
        if not 1 <= self.num_images <= MAX_IMAGES:
            raise InputError(
                f"num_images must be between 1 and {MAX_IMAGES}, got {self.num_images}"
            )
        if not 0 <= self.seed <= MAX_SEED:
            raise InputError(f"seed must be between 0 and {MAX_SEED}, got {self.seed}")
        if not np.isfinite(self.guidance_scale) or self.guidance_scale < 0:
            raise InputError(f"guidance scale must be ≥ 0, got {self.guidance_scale}")
        if self.generator not in GENERATORS:
            raise InputError(
                f"unknown generator '{self.generator}'; choose one of: {', '.join(GENERATORS)}"
            )


@dataclass(frozen=True)
class GeneratedImage:
    """A picture and what made it (the A1111 `parameters` metadata source)."""

    image: Image.Image
    info: GenerationInfo


@dataclass(frozen=True)
class Pipeline:
    """A loaded SD 1.x/2.x/XL model folder, ready to generate; safe to share between threads."""

    folder: Path
    backend: str
    facts: ModelFacts
    scheduler: SchedulerConfig
    conditioner: TextConditioner  # the family's prompts → UNet conditioning
    unet: UNet
    vae_decoder: VaeDecoder
    precision: str = "fp32"  # the variant that runs (sdrt.runtime.variants)

    @property
    def tokenizer(self) -> ClipTokenizer:
        """The (first) text encoder's tokenizer."""
        return self.conditioner.tokenizer

    @classmethod
    def load(cls, folder: str | Path = EMBEDDED_MODEL, backend: str = "ort", *,
             threads: int | None = None, precision: str | Variant = "fp32") -> Pipeline:
        """Open a model folder (sdrt/optimum ONNX layout, or OpenVINO IR for `openvino`);
        by default sdrt's embedded shapes model. `precision` names a variant manifest.json lists
        for this backend (quantize's gate passes a Variant it has not listed yet)."""
        folder = Path(folder)
        if backend not in BACKENDS:
            raise InputError(f"unknown backend '{backend}'; choose one of: {', '.join(BACKENDS)}")
        check_folder(folder)
        variant = resolve_variant(folder, precision, backend)
        facts = read_facts(folder)
        scheduler = SchedulerConfig.from_file(folder / "scheduler" / "scheduler_config.json")
        scheduler.validate()

        def session(component: str):
            return open_session(variant.graph_path(folder, component), backend, threads=threads,
                                execution=variant.execution(component))

        return cls(folder, backend, facts, scheduler,
                   load_conditioner(folder, facts.family.architecture, session),
                   UNet(session("unet")), VaeDecoder(session("vae_decoder")),
                   precision=variant.precision)

    def generate(self, prompt: str, *, callback: StepCallback | None = None,
                 **options) -> list[Image.Image]:
        """Generate images; each carries its A1111 `parameters` text in `image.info`."""
        results = self.run(GenerationRequest(prompt=prompt, **options), callback=callback)
        for result in results:
            result.image.info["parameters"] = format_parameters(result.info)
        return [result.image for result in results]

    def run(self, request: GenerationRequest, *,
            callback: StepCallback | None = None) -> list[GeneratedImage]:
        """Run one request; `callback(i, n, latents)` after each step may return True to stop."""
        # 1. Fill defaults and validate.
        req = request.resolve(self.facts, self.scheduler)
        # diffusers' rule: one UNet call per step when guidance ≤ 1, or when the UNet takes the
        # scale as an input (LCM's guidance embedding) instead of classifier-free guidance
        guided = req.guidance_scale > 1.0 and self.unet.guidance_dim is None
        # 2. Text conditioning: (2B, 77, D) uncond-then-cond when guided, else (B, 77, D),
        #    with the UNet's added conditions (SDXL) row-aligned.
        cond = self.conditioner(req.prompt, req.negative_prompt, guided=guided,
                                width=req.width, height=req.height).repeat(req.num_images)
        # 3. Starting noise: one generator per image, seeded seed + i (A1111's convention).
        generators = [make_generator(req.generator, req.seed + i) for i in range(req.num_images)]
        latent_shape = (1, self.facts.latent_channels,
                        req.height // self.facts.vae_scale_factor,
                        req.width // self.facts.vae_scale_factor)

        def draw(shape: tuple[int, ...]) -> np.ndarray:
            one = (1, *shape[1:])
            return np.concatenate([g.randn(one) for g in generators])  # (B, C, h, w)

        noise = draw((req.num_images, *latent_shape[1:]))
        # 4. Sampler loop over the guided UNet.
        latents = sample(self._model_fn(cond, req.guidance_scale, guided), noise,
                         config=self.scheduler, sampler=req.sampler, steps=req.steps,
                         step_noise=draw, callback=callback)
        # 5. Decode, one image at a time to bound peak memory.
        pixels = [self._decode(latents[i : i + 1]) for i in range(req.num_images)]
        # 6. Attach what made each image.
        return [GeneratedImage(image, self._info(req, i)) for i, image in enumerate(pixels)]

    def _model_fn(self, conditioning: Conditioning, scale: float, guided: bool):
        unet, context, added = self.unet, conditioning.context, conditioning.added
        embedded = None
        if unet.guidance_dim is not None:  # (B, time_cond_proj_dim), one row per image
            embedded = np.repeat(guidance.guidance_embedding(scale, unet.guidance_dim)[None],
                                 len(context), axis=0)

        def model(x_in: np.ndarray, t: float) -> np.ndarray:
            if not guided:
                return unet(x_in, t, context, added, embedded)
            out = unet(np.concatenate([x_in, x_in]), t, context, added)  # (2B, C, h, w)
            uncond, cond = np.split(out, 2)
            return guidance.cfg_combine(uncond, cond, scale)

        return model

    def _decode(self, latents: np.ndarray) -> Image.Image:
        decoded = self.vae_decoder(latents / self.facts.scaling_factor)  # (1, 3, H, W) in [-1, 1]
        if not np.isfinite(decoded).all():
            raise GenerationError(
                "the VAE decoder produced NaN/Inf values; the model or precision is unstable"
            )
        pixels = np.clip(decoded[0] / 2 + 0.5, 0.0, 1.0).transpose(1, 2, 0)  # (H, W, 3)
        return Image.fromarray(np.round(pixels * 255).astype(np.uint8))

    def _info(self, req: GenerationRequest, index: int) -> GenerationInfo:
        extra = {"Backend": self.backend, "Precision": self.precision}
        extra["RNG"] = "CPU" if req.generator == "torch" else "NumPy"
        return GenerationInfo(
            prompt=req.prompt, negative_prompt=req.negative_prompt, steps=req.steps,
            sampler=display_name(req.sampler), cfg_scale=req.guidance_scale,
            seed=req.seed + index, width=req.width, height=req.height,
            model_name=self.facts.name,
            model_hash=self.facts.unet_sha256[:10] if self.facts.unet_sha256 else None,
            extra=extra,
        )
