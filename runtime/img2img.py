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

A1111's img2img options (its StableDiffusionProcessingImg2Img): `resize_mode` brings the picture
and mask to the working size (`images.resize`; 3, A1111's latent upscale, resizes pixels as 0);
a mask of another size than the picture is first stretched to the picture's size; "Only masked"
(`inpaint_full_res`) works on a crop around the mask and pastes it back (runtime/inpaint_region.py);
`inpainting_fill` is the masked content the run starts from: 0 the picture's surrounding colours
(`images.fill`, before encoding), 1 the original, 2 noise (the run's starting noise rows) and
3 zeros in the masked latents (`latents · (1 − mask) + fill · mask`; they change the start only
at strength < 1, where the start holds the picture's latents); `initial_noise_multiplier` scales
the noise the run starts from (not the noise that re-noises the original outside the mask).
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
from sdrt.runtime.inpaint_region import Region
from sdrt.runtime.rng import NoiseGenerator, randn_rows
from sdrt.runtime.samplers import KeepOutside, start_step_for_strength

DEFAULT_STRENGTH = 0.75  # A1111's and diffusers' img2img default denoising strength
DEFAULT_INPAINT_STRENGTH = 1.0  # diffusers' inpainting default: the masked area from noise
DEFAULT_MASK_BLUR = 4  # pixels; A1111's default mask blur
DEFAULT_PADDING = 32  # pixels around the mask for "Only masked"; A1111's default
FILLS = ("fill", "original", "latent noise", "latent nothing")  # A1111's inpainting_fill names
FILL, ORIGINAL, LATENT_NOISE, LATENT_NOTHING = range(4)
MAX_NOISE_MULTIPLIER = 2.0  # A1111's setting slider stops at 1.5; beyond 2 is only noise


@dataclass(frozen=True)
class ImageInput:
    """What image-to-image adds to a request: the picture at the output size, how much of it
    to denoise, and for inpainting the (feathered) mask, white where the model repaints."""

    image: Image.Image  # RGB, (width, height) of the request
    strength: float
    mask: Image.Image | None = None  # L, same size, feathered by mask_blur
    mask_blur: float = 0.0
    paste_back: bool = True  # the original's pixels outside the feathered mask (A1111 overlay)
    fill: int = ORIGINAL  # A1111's inpainting_fill (FILLS): the masked content sampling starts from
    noise_multiplier: float = 1.0  # A1111's initial_noise_multiplier
    region: Region | None = None  # "Only masked": `image`/`mask` are the region's crop

    def finish(self, generated: Image.Image) -> Image.Image:
        """A generated picture as the caller gets it: pasted back into the whole picture for
        "Only masked", the original's pixels back outside the feathered mask with paste_back."""
        if self.region is not None:
            return self.region.paste(generated, self.paste_back)
        if self.mask is not None and self.paste_back:
            return images.paste_back(generated, self.image, self.mask)
        return generated

    def unchanged(self) -> Image.Image:
        """What strength 0 returns: the input picture (the whole one for "Only masked")."""
        return (self.image if self.region is None else self.region.picture).copy()

    def infotext(self) -> dict[str, object]:
        """A1111's parameters keys this input adds (mask blur for inpainting only)."""
        extra: dict[str, object] = {} if self.mask is None else {"Mask blur": self.mask_blur}
        if self.noise_multiplier != 1.0:
            extra["Noise multiplier"] = self.noise_multiplier
        return extra

    def pixels(self) -> Image.Image:
        """The picture the VAE encodes: for fill 0, masked pixels from the colours around."""
        if self.fill == FILL and self.mask is not None:
            return images.fill(self.image, self.mask)
        return self.image

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
            latent_scale: int = 8, resize_mode: int = 0, inpaint_full_res: bool = False,
            inpaint_full_res_padding: int = DEFAULT_PADDING, inpainting_fill: int = ORIGINAL,
            initial_noise_multiplier: float = 1.0) -> ImageInput:
    """Read, orient, flatten and size the picture (and mask) by `images.output_size`'s rule and
    `resize_mode`; a mask is stretched to the picture's size, feathered by `mask_blur` pixels
    there, then sized with it (or both cut to the region around it, `inpaint_full_res`), and
    must leave something to repaint and something to keep. The A1111 options: module doc."""
    strength = check_strength(strength)
    _check_index("resize_mode", resize_mode, images.RESIZE_MODES)
    _check_index("inpainting_fill", inpainting_fill, FILLS)
    multiplier = _check_number("initial_noise_multiplier", initial_noise_multiplier,
                               MAX_NOISE_MULTIPLIER)
    if not isinstance(inpaint_full_res, bool):
        raise InputError(f"inpaint_full_res must be true or false, got {inpaint_full_res!r}")
    if isinstance(inpaint_full_res_padding, bool) or not isinstance(inpaint_full_res_padding, int) \
            or not 0 <= inpaint_full_res_padding <= max_side:
        raise InputError(f"inpaint_full_res_padding must be a whole number of pixels between 0 "
                         f"and {max_side}, got {inpaint_full_res_padding!r}")
    picture = images.read_image(image)
    size = images.output_size(picture.size, width, height, step, max_side)
    if mask is None:
        return ImageInput(images.resize(picture, size, resize_mode), strength,
                          noise_multiplier=multiplier)
    if isinstance(mask_blur, bool) or not isinstance(mask_blur, int | float) \
            or not 0 <= mask_blur <= max_side:
        raise InputError(f"mask blur must be a number of pixels between 0 and {max_side}, "
                         f"got {mask_blur!r}")
    drawn = images.fit(images.read_mask(mask), picture.size)  # A1111 resizes another size
    feathered = images.blur(drawn, mask_blur)
    region = Region.around(picture, feathered, inpaint_full_res_padding, size) \
        if inpaint_full_res else None
    if region is not None:
        picture, feathered = region.crop(picture, size), region.crop(feathered, size)
    else:
        picture, feathered = (images.resize(picture, size, resize_mode),
                              images.resize(feathered, size, resize_mode))
    repaint = images.binarize(feathered)
    grid = images.to_latent_grid(repaint, size[1] // latent_scale, size[0] // latent_scale)
    images.check_mask(repaint, grid, latent_scale)
    return ImageInput(picture, strength, feathered, float(mask_blur), paste_back,
                      inpainting_fill, multiplier, region)


OPTIONS = ("resize_mode", "inpaint_full_res", "inpaint_full_res_padding", "inpainting_fill",
           "initial_noise_multiplier")  # A1111's img2img options, `prepare`'s keywords


def pop_options(options: dict[str, object]) -> dict[str, object]:
    """The A1111 img2img options (OPTIONS) taken out of a call's keyword arguments."""
    return {name: options.pop(name) for name in OPTIONS if name in options}


def _check_index(name: str, value: int, names: Sequence[str]) -> None:
    """An A1111 option given as the index of one of `names`; InputError listing them."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < len(names):
        listed = ", ".join(f"{i} ({label})" for i, label in enumerate(names))
        raise InputError(f"{name} must be one of {listed}; got {value!r}")


def _check_number(name: str, value: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= high:
        raise InputError(f"{name} must be a number between 0 and {high:g}, got {value!r}")
    return float(value)


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


# Draws a request's starting noise rows: `randn_rows`, or A1111's variation seeds
# (runtime/variation.py) mixed into them.
NoiseRows = Callable[[Sequence[NoiseGenerator], tuple[int, ...]], np.ndarray]


def text_start(generators: Sequence[NoiseGenerator], shape: tuple[int, ...],
               rows: NoiseRows = randn_rows) -> Start:
    """Text-to-image: one noise row per generator."""
    return Start(rows(generators, shape))


def img2img_start(encoder: Encoder, init: ImageInput, generators: Sequence[NoiseGenerator],
                  shape: tuple[int, ...], steps: int, rows: NoiseRows = randn_rows) -> Start:
    """StableDiffusionImg2ImgPipeline.prepare_latents: per generator, posterior then noise."""
    pixels = images.to_model(init.image)  # (1, 3, H, W)
    latents = np.concatenate([encoder(pixels, g) for g in generators])  # (B, C, h, w)
    return Start(_scaled(rows(generators, shape), init), init.start_step(steps), latents)


def inpaint_start(encoder: Encoder, init: ImageInput, generators: Sequence[NoiseGenerator],
                  shape: tuple[int, ...], steps: int, nine_channels: bool,
                  rows: NoiseRows = randn_rows) -> Start:
    """StableDiffusionInpaintPipeline.prepare_latents and prepare_mask_latents (module doc)."""
    batch, h, w = shape[0], shape[2], shape[3]
    pixels = images.to_model(init.pixels())  # (1, 3, H, W)
    repaint = images.binarize(init.mask)  # (H, W) 0/1
    first = generators[0]
    original = None
    if not nine_channels or init.strength < 1.0:
        original = np.repeat(encoder(pixels, first), batch, axis=0)  # (B, C, h, w)
    noise = rows(generators, shape)
    grid = images.to_latent_grid(repaint, h, w)[None, None]  # (1, 1, h, w)
    mask = np.repeat(grid, batch, axis=0).astype(np.float32)  # (B, 1, h, w)
    channels = None
    if nine_channels:
        masked = encoder(pixels * (1.0 - repaint), first)  # (1, C, h, w); masked pixels → 0
        channels = np.concatenate([mask, np.repeat(masked, batch, axis=0)], axis=1)
    else:
        first.randn((1, *shape[1:]))  # the masked picture's posterior draw diffusers makes
    if original is not None and init.fill in (LATENT_NOISE, LATENT_NOTHING):
        content = noise if init.fill == LATENT_NOISE else np.zeros_like(original)
        original = original * (1 - mask) + content * mask  # (B, C, h, w); A1111's init_latent
    start = init.start_step(steps) if init.strength < 1.0 else 0
    return Start(_scaled(noise, init), start, original if init.strength < 1.0 else None,
                 None if nine_channels else KeepOutside(mask, original, noise), channels)


def _scaled(noise: np.ndarray, init: ImageInput) -> np.ndarray:
    """The starting noise times the input's initial noise multiplier (A1111's `x *= m`)."""
    if init.noise_multiplier == 1.0:
        return noise
    return noise * np.float32(init.noise_multiplier)


def blank_inpainting_input(size: tuple[int, int]) -> ImageInput:
    """Text-to-image on an inpainting UNet: a grey picture, all of it masked, strength 1."""
    return ImageInput(Image.new("RGB", size, (128, 128, 128)), 1.0,
                      Image.new("L", size, 255), paste_back=False)
