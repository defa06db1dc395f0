"""Image-to-image and inpainting: the sampler's starting point from an input picture (and mask).

Semantics are diffusers' StableDiffusionImg2ImgPipeline and StableDiffusionInpaintPipeline:

- Strength: a run of `steps` steps at strength s makes the last int(steps · s) of them
  (`get_timesteps`), starting from the input's latents noised to that step's level
  (`scheduler.add_noise`). s = 0 makes none and returns the input unchanged; a strength > 0 that
  leaves no step is refused (raise the steps); s = 1 is generation from noise (img2img still adds
  the input's latents scaled by the first step's sqrt(ᾱ), ≈ 0 for SD's schedules, as diffusers).
- Latents of a picture are a sample of the VAE posterior, drawn from the generator (diffusers'
  `retrieve_latents`), times the VAE's scaling factor. img2img: every image's generator draws
  its own posterior sample, then its noise. Inpainting encodes the picture once, with the first
  image's generator: its posterior sample (when a 4-channel UNet needs the original, or s < 1),
  then every image's noise, then the masked picture's posterior sample (drawn, as diffusers
  does, even for a 4-channel UNet that does not use it, so later draws stay in step).
- Inpainting UNet (9 channels): its input is the noisy latents ‖ the mask on the latent grid ‖
  the latents of the picture with the masked pixels set to 0 (mid-grey).
- Ordinary UNet (4 channels): after every step the latents outside the mask are replaced by the
  original's, re-noised to the next step's level (`samplers.KeepOutside`).
- Text-to-image with an inpainting UNet conditions it as inpainting a blank (grey) picture with
  everything masked, A1111's way (its `txt2img_image_conditioning`).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from sdrt.runtime import images
from sdrt.runtime.components import VaeEncoder
from sdrt.runtime.errors import InputError
from sdrt.runtime.rng import NoiseGenerator, randn_rows
from sdrt.runtime.samplers import KeepOutside, start_step_for_strength

DEFAULT_STRENGTH = 0.75  # A1111's and diffusers' img2img default denoising strength
DEFAULT_INPAINT_STRENGTH = 1.0  # diffusers' inpainting default: the masked area from noise
DEFAULT_MASK_BLUR = 4  # pixels; A1111's default mask blur


@dataclass(frozen=True)
class ImageInput:
    """What image-to-image adds to a request: the picture at the output size, how much of it
    to denoise, and for inpainting the (feathered) mask, white where the model repaints."""

    image: Image.Image  # RGB, (width, height) of the request
    strength: float
    mask: Image.Image | None = None  # L, same size, feathered by mask_blur
    mask_blur: float = 0.0
    paste_back: bool = True  # the original's pixels outside the feathered mask (A1111 overlay)

    def start_step(self, steps: int) -> int:
        """The first of `steps` steps this input's strength runs (strength must leave one)."""
        if int(steps * self.strength) == 0:
            raise InputError(f"strength {self.strength:g} × {steps} steps leaves no denoising "
                             f"step: use at least {math.ceil(1 / self.strength)} steps")
        return start_step_for_strength(steps, self.strength)


def check_strength(strength: float) -> float:
    """Strength as a float in [0, 1]; InputError otherwise."""
    if isinstance(strength, bool) or not isinstance(strength, int | float) \
            or not 0.0 <= strength <= 1.0:
        raise InputError(f"strength must be a number between 0 and 1, got {strength!r}")
    return float(strength)


def prepare(image: images.ImageSource, mask: images.ImageSource | None = None, *,
            strength: float, width: int | None, height: int | None, step: int, max_side: int,
            mask_blur: float = DEFAULT_MASK_BLUR, paste_back: bool = True,
            latent_scale: int = 8) -> ImageInput:
    """Read, orient, flatten and size the picture (and mask) by `images.output_size`'s rule; a
    mask must match the picture's size, is feathered by `mask_blur` pixels at that size, then
    sized with it, and must leave something to repaint and something to keep."""
    strength = check_strength(strength)
    picture = images.read_image(image)
    size = images.output_size(picture.size, width, height, step, max_side)
    if mask is None:
        return ImageInput(images.fit(picture, size), strength)
    if isinstance(mask_blur, bool) or not isinstance(mask_blur, int | float) \
            or not 0 <= mask_blur <= max_side:
        raise InputError(f"mask blur must be a number of pixels between 0 and {max_side}, "
                         f"got {mask_blur!r}")
    drawn = images.read_mask(mask)
    if drawn.size != picture.size:
        raise InputError(f"the mask is {drawn.size[0]}×{drawn.size[1]} but the image is "
                         f"{picture.size[0]}×{picture.size[1]}: they must be the same size")
    feathered = images.fit(images.blur(drawn, mask_blur), size)
    repaint = images.binarize(feathered)
    grid = images.to_latent_grid(repaint, size[1] // latent_scale, size[0] // latent_scale)
    images.check_mask(repaint, grid, latent_scale)
    return ImageInput(images.fit(picture, size), strength, feathered, float(mask_blur),
                      paste_back)


class LazyEncoder:
    """The VAE encoder, opened on first use (text-to-image never needs it), once per pipeline."""

    def __init__(self, open_encoder: Callable[[], VaeEncoder]) -> None:
        self._open = open_encoder
        self._encoder: VaeEncoder | None = None
        self._lock = threading.Lock()

    def __call__(self) -> VaeEncoder:
        with self._lock:
            if self._encoder is None:
                self._encoder = self._open()
            return self._encoder


@dataclass(frozen=True)
class Start:
    """Where one sampling run begins; text-to-image has noise alone."""

    noise: np.ndarray  # (B, C, h, w) float32
    start_step: int = 0
    init_latents: np.ndarray | None = None  # (B, C, h, w), noised to the first step's level
    keep: KeepOutside | None = None  # 4-channel inpainting
    image_channels: np.ndarray | None = None  # (B, 1 + C, h, w): mask ‖ masked-image latents
    add_noise: bool = True  # False: init_latents are already at start_step's level (a refiner's)


@dataclass(frozen=True)
class Encoder:
    """Pictures → scaled latents, sampling the VAE posterior with a given generator."""

    vae: VaeEncoder
    scaling_factor: float

    def __call__(self, pixels: np.ndarray, generator: NoiseGenerator) -> np.ndarray:
        mean, std = self.vae.posterior(pixels)  # (1, C, h, w) each
        sample = mean + std * generator.randn(mean.shape)  # diffusers' latent_dist.sample
        return sample * np.float32(self.scaling_factor)


def text_start(generators: Sequence[NoiseGenerator], shape: tuple[int, ...]) -> Start:
    """Text-to-image: one noise row per generator."""
    return Start(randn_rows(generators, shape))


def img2img_start(encoder: Encoder, init: ImageInput, generators: Sequence[NoiseGenerator],
                  shape: tuple[int, ...], steps: int) -> Start:
    """StableDiffusionImg2ImgPipeline.prepare_latents: per generator, posterior then noise."""
    pixels = images.to_model(init.image)  # (1, 3, H, W)
    latents = np.concatenate([encoder(pixels, g) for g in generators])  # (B, C, h, w)
    return Start(randn_rows(generators, shape), init.start_step(steps), latents)


def inpaint_start(encoder: Encoder, init: ImageInput, generators: Sequence[NoiseGenerator],
                  shape: tuple[int, ...], steps: int, nine_channels: bool) -> Start:
    """StableDiffusionInpaintPipeline.prepare_latents and prepare_mask_latents (module doc)."""
    batch, h, w = shape[0], shape[2], shape[3]
    pixels = images.to_model(init.image)  # (1, 3, H, W)
    repaint = images.binarize(init.mask)  # (H, W) 0/1
    first = generators[0]
    original = None
    if not nine_channels or init.strength < 1.0:
        original = np.repeat(encoder(pixels, first), batch, axis=0)  # (B, C, h, w)
    noise = randn_rows(generators, shape)
    grid = images.to_latent_grid(repaint, h, w)[None, None]  # (1, 1, h, w)
    mask = np.repeat(grid, batch, axis=0).astype(np.float32)  # (B, 1, h, w)
    channels = None
    if nine_channels:
        masked = encoder(pixels * (1.0 - repaint), first)  # (1, C, h, w); masked pixels → 0
        channels = np.concatenate([mask, np.repeat(masked, batch, axis=0)], axis=1)
    else:
        first.randn((1, *shape[1:]))  # the masked picture's posterior draw diffusers makes
    start = init.start_step(steps) if init.strength < 1.0 else 0
    return Start(noise, start, original if init.strength < 1.0 else None,
                 None if nine_channels else KeepOutside(mask, original, noise), channels)


def blank_inpainting_input(size: tuple[int, int]) -> ImageInput:
    """Text-to-image on an inpainting UNet: a grey picture, all of it masked, strength 1."""
    return ImageInput(Image.new("RGB", size, (128, 128, 128)), 1.0,
                      Image.new("L", size, 255), paste_back=False)
