"""Text-to-image, image-to-image and inpainting: tokenizer → text encoder(s) → NumPy sampler loop
over the UNet → VAE decoder, starting from noise or from a picture's latents (runtime/img2img.py).

Latent diffusion (Rombach et al., 2022) with classifier-free guidance (Ho & Salimans, 2022), or
for LCM UNets the guidance scale as an input (Luo et al., 2023), run from exported graphs;
image-to-image is SDEdit (Meng et al., 2022). What differs between architectures (SD 1.x/2.x,
SDXL, the SDXL refiner, SD 3's MMDiT) is each one's strategy (runtime/architectures/).
ControlNets (Zhang et al., 2023) add their residuals to the UNet's at every model call
(runtime/control/).
`Pipeline.load` does all file I/O on a folder opened once (model/opened.py; the VAE encoder
opens on first use); `Pipeline.run` reads as numbered steps and keeps all per-call state local,
so several threads may generate at once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image

from sdrt.runtime import hires, variation
from sdrt.runtime import img2img as i2i
from sdrt.runtime.adapters.adapted import lora_components
from sdrt.runtime.adapters.pipeline_adapters import Adapters
from sdrt.runtime.architectures import architecture_for
from sdrt.runtime.architectures.base import (
    Architecture,
    DenoiserGraph,
    check_request,
)
from sdrt.runtime.components import VaeDecoder, VaeEncoder
from sdrt.runtime.conditioning import TextConditioner
from sdrt.runtime.control.apply import ControlRun, counting, prepare_controls
from sdrt.runtime.control.folder import ControlNets, model_fit
from sdrt.runtime.control.infotext import control_infotext
from sdrt.runtime.control.library import ControlLibrary
from sdrt.runtime.control.manifest import CONTROLNET
from sdrt.runtime.control.residuals import unet_levels
from sdrt.runtime.deepcache import PARAMETER as DEEPCACHE_KEY
from sdrt.runtime.deepcache import LazyDeepCache, graph_paths
from sdrt.runtime.errors import GenerationError, InputError, ModelError
from sdrt.runtime.images import ImageSource
from sdrt.runtime.img2img import Encoder, ImageInput, LazyEncoder, Start
from sdrt.runtime.memory.low_memory import LOOP, LOW_MEMORY_BATCH, Residency
from sdrt.runtime.metadata import GenerationInfo, format_parameters
from sdrt.runtime.model.auto import AUTO, Choice
from sdrt.runtime.model.folder import EMBEDDED_MODEL, ModelFacts
from sdrt.runtime.model.opened import OpenedModel
from sdrt.runtime.model.variants import Variant
from sdrt.runtime.prompts import PromptStyle
from sdrt.runtime.refiner import DEFAULT_REFINER_START, refine
from sdrt.runtime.request import MAX_SIDE, GenerationRequest
from sdrt.runtime.rng import NoiseGenerator, make_generator, randn_rows
from sdrt.runtime.samplers import display_name, num_model_calls, sample
from sdrt.runtime.schedules import SchedulerConfig, schedule_infotext
from sdrt.runtime.session import open_session
from sdrt.runtime.tokenizer import ClipTokenizer
from sdrt.runtime.vae.pooled_norm import SPLIT_COMPONENTS, tiled_decode_graphs
from sdrt.runtime.vae.tiny import TinyVae, open_tiny_vae

StepCallback = Callable[[int, int, np.ndarray], bool | None]


@dataclass(frozen=True)
class GeneratedImage:
    """A picture and what made it (the A1111 `parameters` metadata source)."""

    image: Image.Image
    info: GenerationInfo


@dataclass(frozen=True)
class Pipeline:
    """A loaded model folder, ready to generate; safe to share between threads."""

    folder: Path
    backend: str
    facts: ModelFacts
    scheduler: SchedulerConfig
    conditioner: TextConditioner  # the architecture's prompts → denoiser conditioning
    denoiser: DenoiserGraph  # the UNet, or SD 3's MMDiT transformer
    vae_decoder: VaeDecoder
    deepcache: LazyDeepCache  # `deepcache=N` requests only; opened on first use
    precision: str = "fp32"  # the variant that runs (sdrt.runtime.model.variants)
    vae_encoder: LazyEncoder | None = None  # image inputs only; opened on first use
    tiny_vae: TinyVae | None = None  # `vae=`: a tiny autoencoder in the VAE's place
    adapters: Adapters | None = None  # per-request LoRAs, embeddings (runtime/adapters/)
    controlnets: ControlNets | None = None  # opened on a request's first use (runtime/control/)
    choice: Choice | None = None  # what backend/precision "auto" resolved to, and why

    @property
    def tokenizer(self) -> ClipTokenizer:
        """The (first) text encoder's tokenizer."""
        return self.conditioner.tokenizer

    @property
    def architecture(self) -> Architecture:
        """The strategy of the model's architecture (runtime/architectures/)."""
        return architecture_for(self.facts.family)

    @property
    def unet(self) -> DenoiserGraph:
        """The denoiser under its older name (benchmarks and tools read it)."""
        return self.denoiser

    @classmethod
    def load(cls, folder: str | Path | OpenedModel = EMBEDDED_MODEL, backend: str | None = None,
             *, threads: int | None = None, precision: str | Variant | None = None,
             low_memory: bool = False, device: str = "cpu",
             vram_limit: int | None = None, vae: str | Path | None = None,
             deepcache: bool = False, lora_dir: str | Path | None = None,
             embeddings_dir: str | Path | None = None,
             controlnet_dir: str | Path | None = None) -> Pipeline:
        """Open a model folder (sdrt/optimum ONNX layout, or OpenVINO IR for `openvino`), by
        default sdrt's embedded shapes model, or load one already opened (an OpenedModel,
        which brings its backend and precision). `backend` ort, openvino or auto;
        `precision` auto or a variant manifest.json lists for this backend (quantize's gate
        passes a Variant it has not listed yet); both default to auto, the fastest gated
        configuration (model/auto.py), but a named backend alone runs fp32. `low_memory`
        keeps one graph resident at a time, runs the denoiser as its architecture says (a
        UNet's CFG pair as batch-1 calls) and the VAE in tiles (memory/low_memory.py);
        `device` "gpu", `vram_limit` bytes: runtime/devices.py. `vae` is an exported tiny
        autoencoder folder (runtime/vae/tiny.py) that replaces the model's VAE decoder, and
        its encoder where the folder has one. `deepcache` runs the UNet from the DeepCache
        full graph (the same UNet plus one output, runtime/deepcache.py), so `deepcache=N`
        requests add only the small shallow graph's memory. `lora_dir` is where requests'
        LoRA names (and `<lora:NAME>` tags) are looked up, `embeddings_dir` holds
        textual-inversion embeddings triggered by their file names (runtime/adapters/).
        `controlnet_dir` is where requests' ControlNet model names are looked up
        (runtime/control/library.py); a unit may also name a control folder by its path."""
        model = _opened(folder, backend, precision, keeps_unet=lora_dir is not None,
                        deepcache=0 if deepcache else None)  # requests name the interval
        folder, variant, facts, arch = model.folder, model.variant, model.facts, model.architecture
        backend = model.backend
        residency = Residency() if low_memory else None
        opener = residency.open_session if residency else open_session
        adapters = Adapters.prepare(model, lora_dir=lora_dir, embeddings_dir=embeddings_dir,
                                    low_memory=low_memory)

        def graph(path: Path, component: str, weights=None, execution: str | None = None):
            # as the variant runs `component`; the loop's graphs stay resident together
            group = {"group": LOOP} if residency and component in (arch.denoiser_graph,
                                                                   CONTROLNET) else {}
            return opener(path, backend, threads=threads,
                          execution=execution or variant.execution(component), device=device,
                          vram_limit=vram_limit, weights=weights, **group)

        def session(component: str, weights=None):
            return graph(variant.graph_path(folder, component), component,
                         weights or adapters.base_weights.get(component))

        def adapted(weights):  # the denoiser and conditioner with a LoRA set's weights
            def patched(component: str):
                return session(component, weights.get(component))
            denoiser = arch.open_denoiser(patched(arch.denoiser_graph), levels)
            return denoiser, adapters.with_embeddings(
                arch.load_conditioner(folder, patched, denoiser))

        def unet_graph(path: Path):  # a DeepCache graph
            return graph(path, "unet")

        def decoder_graph(path: Path):  # a tiny VAE's, or a stage of the VAE decoder's
            return graph(path, "vae_decoder")

        refusal = model.deepcache_refusal("--low-memory" if low_memory else None)
        if deepcache and refusal:
            raise InputError(refusal)
        full = unet_graph(graph_paths(folder, variant)[0]) if deepcache else None
        levels = unet_levels(folder) if arch.denoiser_graph == "unet" else ()
        denoiser = arch.open_denoiser(full if full is not None else session(arch.denoiser_graph),
                                      levels)
        conditioner = adapters.with_embeddings(arch.load_conditioner(folder, session, denoiser))
        adapters.bind(folder, {name: variant.graph_path(folder, name) for name in
                               lora_components(arch.denoiser_graph,
                                               getattr(arch, "text_encoders", ()))}, adapted)
        _check_channels(denoiser, facts)
        tiny = None if vae is None else open_tiny_vae(
            vae, decoder_graph, latent_channels=facts.latent_channels,
            vae_scale_factor=facts.vae_scale_factor)
        decoder = tiny.decoder if tiny else VaeDecoder(session("vae_decoder"))
        encoder = VaeEncoder
        encoder_session = tiny.open_encoder if tiny and tiny.open_encoder else \
            lambda: session("vae_encoder")
        if residency:  # the architecture's denoiser calls, tiled VAE (over stage or split graphs)
            stages, split = tiled_decode_graphs(folder, variant.graph_path(folder,
                                                                           "vae_decoder"))
            denoiser = arch.low_memory(denoiser)
            decoder, encoder = residency.vae(
                decoder, facts.vae_scale_factor,
                split and tuple(session(name) for name in SPLIT_COMPONENTS),
                stages and stages.open(decoder_graph))
        controlnets = ControlNets(
            lambda path, execution: graph(path, CONTROLNET, execution=execution),
            model_fit(denoiser, facts.family.architecture), backend=backend,
            precision=variant.precision,
            library=None if controlnet_dir is None else ControlLibrary.open(controlnet_dir),
            rows=LOW_MEMORY_BATCH if residency else None)
        return cls(folder, backend, facts, model.scheduler, conditioner, denoiser, decoder,
                   LazyDeepCache(folder, unet_graph, refusal, full, variant),
                   precision=variant.precision,
                   vae_encoder=LazyEncoder(lambda: encoder(encoder_session())), tiny_vae=tiny,
                   adapters=adapters, controlnets=controlnets, choice=model.choice)

    def generate(self, prompt: str, *, callback: StepCallback | None = None,
                 refiner: Pipeline | None = None, refiner_start: float = DEFAULT_REFINER_START,
                 **options) -> list[Image.Image]:
        """Generate images; each carries its A1111 `parameters` text in `image.info`. With a
        `refiner` pipeline (SDXL's), this one stops at `refiner_start` of the schedule and the
        refiner finishes (runtime/refiner.py)."""
        request = GenerationRequest(prompt=prompt, **options)
        if refiner is not None:
            return _with_parameters(refine(self, refiner, request, refiner_start,
                                           callback=callback))
        return _with_parameters(self.run(request, callback=callback))

    def img2img(self, image: ImageSource, prompt: str, *,
                strength: float = i2i.DEFAULT_STRENGTH, callback: StepCallback | None = None,
                **options) -> list[Image.Image]:
        """Image-to-image from `image` (a path or PIL image; sized by `images.output_size`'s
        rule from width/height); strength 0 returns it unchanged, 1 generates afresh."""
        init = self.image_input(image, strength=strength, width=options.pop("width", None),
                                height=options.pop("height", None), **i2i.pop_options(options))
        return _with_parameters(self.run(self.request_for(init, prompt, **options),
                                         callback=callback, init=init))

    def inpaint(self, image: ImageSource, mask: ImageSource, prompt: str, *,
                strength: float = i2i.DEFAULT_INPAINT_STRENGTH,
                mask_blur: float = i2i.DEFAULT_MASK_BLUR, paste_back: bool = True,
                callback: StepCallback | None = None, **options) -> list[Image.Image]:
        """Repaint where `mask` is white (≥ 128 after a `mask_blur`-pixel feather); with
        `paste_back` the original's pixels return outside the feathered mask."""
        init = self.image_input(image, mask, strength=strength, mask_blur=mask_blur,
                                paste_back=paste_back, width=options.pop("width", None),
                                height=options.pop("height", None), **i2i.pop_options(options))
        return _with_parameters(self.run(self.request_for(init, prompt, **options),
                                         callback=callback, init=init))

    def outpaint(self, image: ImageSource, prompt: str, *, left: int = 0, right: int = 0,
                 top: int = 0, bottom: int = 0, callback: StepCallback | None = None,
                 **options) -> list[Image.Image]:
        """Extend the canvas by the given pixels per side and paint the new area
        (runtime/outpaint.py; options: strength, mask_blur, fill and the generation ones)."""
        from sdrt.runtime.outpaint import Extension, outpaint

        return _with_parameters(outpaint(self, image, prompt, Extension(left, right, top, bottom),
                                         callback=callback, **options))

    def image_input(self, image: ImageSource, mask: ImageSource | None = None, *,
                    strength: float, width: int | None = None, height: int | None = None,
                    mask_blur: float = i2i.DEFAULT_MASK_BLUR, paste_back: bool = True,
                    resize_mode: int = 0, inpaint_full_res: bool = False,
                    inpaint_full_res_padding: int = i2i.DEFAULT_PADDING,
                    inpainting_fill: int = i2i.ORIGINAL,
                    initial_noise_multiplier: float = 1.0) -> ImageInput:
        """A picture (and mask) read and sized for this model, with A1111's img2img options
        (`img2img.prepare`)."""
        return i2i.prepare(image, mask, strength=strength, width=width, height=height,
                           step=max(8, self.facts.vae_scale_factor), max_side=MAX_SIDE,
                           mask_blur=mask_blur, paste_back=paste_back,
                           latent_scale=self.facts.vae_scale_factor, resize_mode=resize_mode,
                           inpaint_full_res=inpaint_full_res,
                           inpaint_full_res_padding=inpaint_full_res_padding,
                           inpainting_fill=inpainting_fill,
                           initial_noise_multiplier=initial_noise_multiplier)

    @staticmethod
    def request_for(init: ImageInput, prompt: str, **options) -> GenerationRequest:
        """A request at the size of a prepared image input."""
        return GenerationRequest(prompt=prompt, width=init.image.width,
                                 height=init.image.height, **options)

    def run(self, request: GenerationRequest, *, callback: StepCallback | None = None,
            init: ImageInput | None = None) -> list[GeneratedImage]:
        """Run one request, from noise or from `init` (img2img, inpainting);
        `callback(i, n, latents)` after each step may return True to stop."""
        # 1. Fill defaults and validate; the hires fix runs two passes (runtime/hires.py).
        req = request.resolve(self.facts, self.scheduler)
        if req.hires is not None:
            if init is not None:
                raise InputError("the hires fix is for text-to-image (A1111's txt2img), not "
                                 "for an image input")
            return hires.run(self, req, callback)
        # 2. One generator per image, seeded seed + i (A1111's convention).
        generators = [make_generator(req.generator, req.seed + i) for i in range(req.num_images)]
        return self.run_resolved(req, generators, init, callback)

    def run_resolved(self, req: GenerationRequest, generators: list[NoiseGenerator],
                     init: ImageInput | None = None,
                     callback: StepCallback | None = None) -> list[GeneratedImage]:
        """`run` from step 3 on, for a resolved request and the caller's generators (outpainting
        continues their streams from window to window)."""
        check_request(self.architecture, req, init)  # what the architecture cannot run
        if init is not None:  # a ControlNet unit without an image takes the input picture
            req = replace(req, controls=tuple(
                unit if unit.image is not None else replace(unit, image=init.image)
                for unit in req.controls))
        shown = init  # what the metadata reports; an inpainting UNet may get a stand-in below
        init = self._fit_unet(req, init)
        if init is not None and init.strength == 0.0:  # no denoising step: the input as it is
            return [GeneratedImage(init.unchanged(), self.info(req, i, shown))
                    for i in range(req.num_images)]
        # 3. Starting point: noise, or a picture's latents; a mask for inpainting. OpenVINO
        #    compiles the UNet and decoder for this size meanwhile (runtime/compile_ahead.py).
        self.architecture.compile_ahead(
            self.graphs(req)[0], self.vae_decoder,
            batch=req.num_images * (2 if self._guided(req) else 1),
            latent=(self.facts.latent_channels, req.height // self.facts.vae_scale_factor,
                    req.width // self.facts.vae_scale_factor),
            context_length=self.tokenizer.max_length)
        start = self._start(req, generators, init)
        # 4–5. Text conditioning and the sampler loop over the guided denoiser.
        latents = self.denoise(req, generators, start, callback)
        # 6. Decode, one image at a time to bound peak memory; inpainting puts the original's
        #    pixels back outside the feathered mask ("Only masked": into the whole picture).
        pixels = [self.decode(latents[i : i + 1]) for i in range(req.num_images)]
        if init is not None:
            pixels = [init.finish(image) for image in pixels]
        # 7. Attach what made each image.
        return [GeneratedImage(image, self.info(req, i, shown))
                for i, image in enumerate(pixels)]

    def denoise(self, req: GenerationRequest, generators: list[NoiseGenerator], start: Start,
                callback: StepCallback | None = None, *,
                end_step: int | None = None) -> np.ndarray:
        """Steps 4–5 of `run` from `start`: the latents diffusers hands to the VAE, or with
        `end_step` those after that many model calls, still noisy (diffusers' denoising_end)."""
        check_request(self.architecture, req)  # the refiner's runs come here without `run`
        guided = self._guided(req)
        denoiser, conditioner = self.graphs(req)  # a LoRA set's, or the pipeline's own
        # 4. Text conditioning: (2B, 77·k, D) uncond-then-cond when guided, else (B, 77·k, D),
        #    with the denoiser's added conditions (SDXL's, SD 3's pooled) row-aligned; A1111's
        #    prompt syntax read (runtime/prompts/), its <lora:…> tags taken out of the text.
        cond = conditioner(req.encoded_prompt, req.negative_prompt, guided=guided, width=req.width,
                           height=req.height, style=PromptStyle(req.prompt_syntax, req.emphasis),
                           ).repeat(req.num_images)
        # 5. Sampler loop over the guided denoiser; DeepCache keeps one cache per generation;
        #    ControlNets get their control images at this size and act per model call.
        if req.deepcache is not None:
            denoiser = self.deepcache().unet(req.deepcache)
        control = self.prepare_controls(req, num_model_calls(req.sampler, req.steps,
                                                             start.start_step))
        model = self.architecture.model_fn(denoiser, cond, req, guided=guided,
                                           image_channels=start.image_channels, control=control)
        return sample(model,
                      start.noise, config=self.scheduler, sampler=req.sampler,
                      steps=req.steps, step_noise=lambda shape: randn_rows(generators, shape),
                      callback=counting(control, callback), start_step=start.start_step,
                      init_latents=start.init_latents, keep=start.keep, end_step=end_step,
                      add_noise=start.add_noise, schedule=req.schedule)

    def prepare_controls(self, req: GenerationRequest, calls: int) -> ControlRun | None:
        """The request's ControlNets opened and their control images made at its size, for a
        run of `calls` model calls; None without controls."""
        if not req.controls:
            return None
        if self.controlnets is None:
            raise ModelError("this pipeline was built without ControlNet support")
        return prepare_controls(req.controls, self.controlnets, width=req.width,
                                height=req.height, calls=calls)

    def graphs(self, req: GenerationRequest) -> tuple[DenoiserGraph, TextConditioner]:
        """The denoiser and conditioner a request runs: with its LoRA set's weights where it
        names LoRAs (runtime/adapters/adapted.py), else the pipeline's own."""
        own = (self.denoiser, self.conditioner)
        return own if self.adapters is None else self.adapters.graphs(req, own)

    def _guided(self, req: GenerationRequest) -> bool:
        """diffusers' rule: one UNet call per step when guidance ≤ 1, or when the UNet takes the
        scale as an input (LCM's guidance embedding) instead of classifier-free guidance."""
        return req.guidance_scale > 1.0 and self.denoiser.guidance_dim is None

    def _fit_unet(self, req: GenerationRequest, init: ImageInput | None) -> ImageInput | None:
        """The input checked against the request; an inpainting UNet gets A1111's stand-ins: a
        blank picture for text-to-image, the whole picture masked for image-to-image."""
        if init is not None and init.image.size != (req.width, req.height):
            raise InputError(f"the input image is {init.image.width}×{init.image.height} but "
                             f"the request is {req.width}×{req.height}")
        if not self.facts.family.inpainting or (init is not None and init.mask is not None):
            return init
        if init is None:
            return i2i.blank_inpainting_input((req.width, req.height))
        return replace(init, mask=Image.new("L", init.image.size, 255), paste_back=False)

    def _start(self, req: GenerationRequest, generators: list[NoiseGenerator],
               init: ImageInput | None) -> Start:
        shape = (req.num_images, self.facts.latent_channels,
                 req.height // self.facts.vae_scale_factor,
                 req.width // self.facts.vae_scale_factor)
        rows = variation.noise_rows(req, self.facts.vae_scale_factor)  # A1111's subseeds
        if init is None:
            return i2i.text_start(generators, shape, rows)
        encoder = self.encoder()
        if init.mask is None:
            return i2i.img2img_start(encoder, init, generators, shape, req.steps, rows)
        return i2i.inpaint_start(encoder, init, generators, shape, req.steps,
                                 self.facts.family.inpainting, rows)

    def encoder(self) -> Encoder:
        """Pictures → the UNet's latents through this pipeline's VAE encoder (or tiny VAE's)."""
        if self.vae_encoder is None:
            raise ModelError("this pipeline was built without a VAE encoder, which image "
                             "inputs need")
        return Encoder(self.vae_encoder(), self._vae_latents(encoder=True)[0])

    def _vae_latents(self, *, encoder: bool = False) -> tuple[float, float]:
        """(scaling_factor, shift_factor) between UNet latents and the VAE's: a tiny VAE's own
        (1 and 0: TAESD reads the UNet's latents as they are) for its decoder, and for its
        encoder where it has one; else the model's."""
        tiny = self.tiny_vae
        if tiny is not None and (not encoder or tiny.open_encoder is not None):
            return tiny.scaling_factor, tiny.shift_factor
        return self.facts.scaling_factor, self.facts.shift_factor

    def decode(self, latents: np.ndarray) -> Image.Image:
        """One image's latents (1, C, h, w) → the picture, through this pipeline's VAE decoder
        (or tiny VAE); GenerationError for NaN/Inf pixels."""
        # SD 3's VAE also shifts its latents (shift_factor 0 elsewhere)
        scaling, shift = self._vae_latents()
        decoded = self.vae_decoder(latents / np.float32(scaling)
                                   + np.float32(shift))  # (1, 3, H, W)
        if not np.isfinite(decoded).all():
            raise GenerationError(
                "the VAE decoder produced NaN/Inf values; the model or precision is unstable"
            )
        pixels = np.clip(decoded[0] / 2 + 0.5, 0.0, 1.0).transpose(1, 2, 0)  # (H, W, 3)
        return Image.fromarray(np.round(pixels * 255).astype(np.uint8))

    def info(self, req: GenerationRequest, index: int,
             init: ImageInput | None = None) -> GenerationInfo:
        """What made image `index` of a resolved request (from `init`, if any): the A1111
        parameters' source."""
        extra = {"Backend": self.backend, "Precision": self.precision}
        extra["RNG"] = "CPU" if req.generator == "torch" else "NumPy"
        if init is not None:  # A1111's Mask blur (inpainting only), Noise multiplier
            extra.update(init.infotext())
        if self.tiny_vae is not None:  # A1111's keys for a VAE other than the model's
            extra["VAE hash"] = self.tiny_vae.manifest.autov2_hash
            extra["VAE"] = self.tiny_vae.manifest.name
        extra.update(schedule_infotext(req.schedule))  # A1111's "Schedule type"
        extra.update(variation.infotext(req, index))  # its variation seed keys
        if req.deepcache is not None:
            extra[DEEPCACHE_KEY] = req.deepcache
        if self.adapters is not None:
            extra.update(self.adapters.infotext(req, self.tokenizer))  # Lora and TI hashes
        if req.controls and self.controlnets is not None:  # the extension's "ControlNet i"
            extra.update(control_infotext(req.controls, [self.controlnets.title(unit.model)
                                                         for unit in req.controls]))
        if req.skip_layers:  # SD 3's skip-layer guidance (quoted: the layers hold commas)
            extra["Skip layers"] = ",".join(map(str, req.skip_layers))
            extra["Skip layer scale"] = req.skip_layer_scale
        return GenerationInfo(
            prompt=req.prompt, negative_prompt=req.negative_prompt, steps=req.steps,
            sampler=display_name(req.sampler), cfg_scale=req.guidance_scale,
            seed=req.seed + index, width=req.width, height=req.height,
            model_name=self.facts.name,
            model_hash=self.facts.unet_sha256[:10] if self.facts.unet_sha256 else None,
            denoising_strength=None if init is None else init.strength, extra=extra,
            choice=self.choice.reason if self.choice else None,
        )


def _with_parameters(results: list[GeneratedImage]) -> list[Image.Image]:
    """The images, each carrying its A1111 `parameters` text in `image.info`."""
    for result in results:
        result.image.info["parameters"] = format_parameters(result.info)
    return [result.image for result in results]


def _check_channels(denoiser: DenoiserGraph, facts: ModelFacts) -> None:
    """The denoiser graph's input channels must be what the model family says (the latent
    channels, or 2 × them + 1 to inpaint)."""
    latent = facts.latent_channels
    want = 2 * latent + 1 if facts.family.inpainting else latent
    if isinstance(denoiser.in_channels, int) and denoiser.in_channels != want:
        raise ModelError(f"unet: the graph takes {denoiser.in_channels} input channels, but the "
                         f"{facts.family.title} family's UNet takes {want}")


def _opened(folder: str | Path | OpenedModel, backend: str | None,
            precision: str | Variant | None, *, keeps_unet: bool,
            deepcache: int | None = None) -> OpenedModel:
    """`folder` opened with the backend and precision (default auto; with a backend named, fp32:
    what quantize's calibration and the benchmarks that name one measure); an OpenedModel as it
    is, when the ones given (if any, auto included) are its own."""
    if not isinstance(folder, OpenedModel):
        backend = backend or AUTO
        return OpenedModel.open(folder, backend, precision or (AUTO if backend == AUTO else "fp32"),
                                keeps_unet=keeps_unet, deepcache=deepcache)
    asked = precision.precision if isinstance(precision, Variant) else precision
    if backend not in (None, AUTO, folder.backend) or asked not in (None, AUTO,
                                                                   folder.precision):
        raise InputError(f"the model was opened for {folder.backend} {folder.precision}, not "
                         f"{backend or folder.backend} {asked or folder.precision}")
    return folder
