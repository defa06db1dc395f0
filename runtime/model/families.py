"""Model families: how sdrt recognises each one from its configs, and what it runs it with.

Recognition reads configs (and so the weight shapes they fix), never folder or file names
(a renamed folder must not change how a model runs), in this order:

1. Architecture: SDXL has a second text encoder (`text_encoder_2` in model_index.json) and a UNet
   with addition_embed_type "text_time" (pooled text embeddings plus size/crop
   micro-conditioning, Podell et al. 2023); one sign without the other is refused. SD 2.x has an
   OpenCLIP ViT-H text encoder (hidden_act "gelu", 1024 wide; its penultimate-layer output is
   baked into a 23-layer config) and linear projections in the UNet's transformer blocks; SD 1.x
   has OpenAI CLIP ViT-L (quick_gelu, 768 wide). Any SD 2.x sign wins.
2. LCM (Luo et al. 2023): a UNet with time_cond_proj_dim takes the guidance scale as an input
   (`timestep_cond`) instead of classifier-free guidance: LCM-Dreamshaper (SD 1.x) and
   lcm-sdxl. Their model cards run 4 steps at guidance 8 (diffusers' LCM pipeline defaults to
   8.5; 8 is what the releases show). Without that input but with an LCMScheduler, the weights
   are distilled for LCM sampling with ordinary guidance, as LCM-LoRA fused into SD 1.x or SDXL
   is (Luo et al. 2023b): 4 steps at guidance 1, i.e. one UNet call per step, as its model
   cards run it. SD 2.x has no LCM release: a guidance input there is refused.
3. Turbo: SD 2.x (SD-Turbo) or SDXL (SDXL-Turbo) weights shipped with an epsilon-prediction
   scheduler and "trailing" timestep spacing. Adversarial diffusion distillation (Sauer et al.
   2023) samples from pure noise in 1–4 steps, which needs trailing spacing; SD 2.x/XL releases
   ship "leading" or no spacing, and v-prediction with "trailing" marks zero-terminal-SNR
   fine-tunes (Lin et al. 2023), which want guidance and many steps.
   The SDXL refiner (Podell et al. 2023, §2.5) has no first text encoder: only text_encoder_2
   (OpenCLIP bigG with projection) feeds a text_time UNet whose time ids are original size, crop
   and an aesthetic score, five values instead of base SDXL's six (diffusers'
   `requires_aesthetics_score`), read from projection_class_embeddings_input_dim.
4. Inpainting (Rombach et al. 2022, §4.5; the SD 1.5 / SD 2 inpainting releases): a UNet with
   in_channels = 2 × latent channels + 1 takes the noisy latents, the mask and the masked
   image's latents concatenated (4 + 1 + 4 = 9 channels for SD). It is its own family, so the
   manifest says so; sdrt runs it on SD 1.x and 2.x, not with LCM or Turbo distillation, nor on
   SDXL (whose inpainting UNet needs the aesthetic-score conditioning sdrt does not feed).

5. SD 3 (Esser et al. 2024): model_index.json names StableDiffusion3Pipeline, whose denoiser is an
   MMDiT (`transformer/`, SD3Transformer2DModel) trained for rectified flow, conditioned on two
   CLIP encoders with projection (their penultimate states side by side, zero-padded to the
   joint_attention_dim, then T5's 256 token states or zeros; pooled_projections = both pooled
   projections) and sampled with FlowMatchEulerDiscreteScheduler. `detect_sd3_family` checks
   that those widths fit each other. diffusers' SD 3 pipeline defaults: 28 steps, guidance 7.

Where a folder's configs say otherwise (an exported SD 1.5 with LCM-LoRA fused keeps its PNDM
config), `sdrt export --family` records the right family in manifest.json, which the runtime
trusts over the configs; it must keep the architecture and whether the UNet takes the guidance.

The native image size is not in the table: it is the UNet's sample_size × the VAE's scale factor
(1024 for SDXL, 768 for SD 2.x 768-v, 512 for the SD 2.x base, SD-Turbo, SDXL-Turbo and SD 1.x),
as diffusers has it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sdrt.runtime.errors import ModelError

Config = Mapping[str, Any]
REFINER_TIME_IDS = 5  # original size, crop top-left, aesthetic score


@dataclass(frozen=True)
class Family:
    """A model family: its architecture and the defaults of a generation that names none."""

    name: str
    title: str
    architecture: str  # families that share one run the same graphs ("sd1", "sd2", "sdxl")
    steps: int
    guidance_scale: float  # ≤ 1 runs the UNet once per step (no classifier-free guidance)
    sampler: str | None = None  # None: the model folder's own scheduler
    guidance_input: bool = False  # the UNet takes the scale as `timestep_cond` (LCM), no CFG
    inpainting: bool = False  # the UNet also takes the mask and masked-image latents (9 channels)


FAMILIES: dict[str, Family] = {family.name: family for family in (
    Family("sd1", "SD 1.x", "sd1", steps=20, guidance_scale=7.5),
    Family("sd2", "SD 2.x", "sd2", steps=20, guidance_scale=7.5),
    Family("sd-turbo", "SD-Turbo", "sd2", steps=1, guidance_scale=0.0),
    # diffusers' SDXL pipeline defaults to guidance 5; 25 steps is the usual Euler budget.
    Family("sdxl", "SDXL", "sdxl", steps=25, guidance_scale=5.0),
    Family("sdxl-turbo", "SDXL-Turbo", "sdxl", steps=1, guidance_scale=0.0),
    Family("sdxl-refiner", "SDXL refiner", "sdxl-refiner", steps=25, guidance_scale=5.0),
    Family("lcm", "LCM", "sd1", steps=4, guidance_scale=8.0, sampler="lcm", guidance_input=True),
    Family("lcm-sdxl", "LCM-SDXL", "sdxl", steps=4, guidance_scale=8.0, sampler="lcm",
           guidance_input=True),
    Family("lcm-lora", "LCM-LoRA", "sd1", steps=4, guidance_scale=1.0, sampler="lcm"),
    Family("lcm-lora-sdxl", "LCM-LoRA SDXL", "sdxl", steps=4, guidance_scale=1.0, sampler="lcm"),
    Family("sd1-inpainting", "SD 1.x inpainting", "sd1", steps=20, guidance_scale=7.5,
           inpainting=True),
    Family("sd2-inpainting", "SD 2.x inpainting", "sd2", steps=20, guidance_scale=7.5,
           inpainting=True),
    Family("sd3", "SD 3", "sd3", steps=28, guidance_scale=7.0, sampler="flow_euler"),
)}
# architecture → (its LCM family, its LCM-LoRA family); (its Turbo family)
_LCM = {"sd1": ("lcm", "lcm-lora"), "sdxl": ("lcm-sdxl", "lcm-lora-sdxl")}
_TURBO = {"sd2": "sd-turbo", "sdxl": "sdxl-turbo"}
_INPAINTING = {"sd1": "sd1-inpainting", "sd2": "sd2-inpainting"}


def get_family(name: str) -> Family:
    """The family called `name`; ModelError for one this sdrt does not know."""
    if name not in FAMILIES:
        raise ModelError(f"model family {name!r} is not supported by this sdrt; "
                         f"known: {', '.join(FAMILIES)}")
    return FAMILIES[name]


def detect_family(index: Config, unet: Config, vae: Config, text_encoder: Config | None,
                  scheduler: Config, text_encoder_2: Config | None = None) -> str:
    """The family of a model from its configs (see the module docstring); ModelError if unfit.
    `text_encoder` is None for a folder without one (the SDXL refiner)."""
    architecture = _architecture(index, unet, vae, text_encoder, text_encoder_2)
    if is_inpainting_unet(unet, vae):
        return _inpainting(architecture, unet, scheduler)
    if unet.get("time_cond_proj_dim") is not None:
        if architecture not in _LCM:
            raise ModelError("unet has time_cond_proj_dim (LCM's guidance input), which sdrt "
                             "supports on SD 1.x and SDXL only, not on "
                             f"{get_family(architecture).title}")
        return _LCM[architecture][0]
    if scheduler.get("_class_name") == "LCMScheduler" and architecture in _LCM:
        return _LCM[architecture][1]
    if _is_turbo(scheduler) and architecture in _TURBO:
        return _TURBO[architecture]
    return architecture


def detect_sd3_family(transformer: Config, vae: Config, text_encoder: Config,
                      text_encoder_2: Config, text_encoder_3: Config | None,
                      scheduler: Config) -> str:
    """"sd3" when SD 3's parts fit together (module docstring, 5); ModelError naming the misfit."""
    latent = vae.get("latent_channels", 4)
    if transformer.get("in_channels") != latent or transformer.get("out_channels") != latent:
        raise ModelError(f"transformer in/out channels {transformer.get('in_channels')}/"
                         f"{transformer.get('out_channels')} do not match the VAE's {latent} "
                         "latent channels")
    pooled = text_encoder.get("projection_dim", 0) + text_encoder_2.get("projection_dim", 0)
    if transformer.get("pooled_projection_dim") != pooled:
        raise ModelError(f"transformer pooled_projection_dim "
                         f"{transformer.get('pooled_projection_dim')} does not match the CLIP "
                         f"encoders' projections side by side ({pooled})")
    joint = transformer.get("joint_attention_dim", 0)
    clip = text_encoder.get("hidden_size", 0) + text_encoder_2.get("hidden_size", 0)
    if joint < clip:
        raise ModelError(f"transformer joint_attention_dim {joint} is narrower than the CLIP "
                         f"states side by side ({clip})")
    if text_encoder_3 is not None and text_encoder_3.get("d_model") != joint:
        raise ModelError(f"text_encoder_3 d_model {text_encoder_3.get('d_model')} does not match "
                         f"the transformer's joint_attention_dim {joint}")
    if scheduler.get("_class_name") != "FlowMatchEulerDiscreteScheduler":
        raise ModelError(f"SD 3 samples with FlowMatchEulerDiscreteScheduler, this folder names "
                         f"{scheduler.get('_class_name')!r}")
    return "sd3"


def is_inpainting_unet(unet: Config, vae: Config) -> bool:
    """Whether the UNet takes latents ‖ mask ‖ masked-image latents (2 × latent + 1 channels)."""
    latent = vae.get("latent_channels", 4)
    return unet.get("in_channels") == 2 * latent + 1 and unet.get("out_channels") == latent


def _inpainting(architecture: str, unet: Config, scheduler: Config) -> str:
    if architecture not in _INPAINTING:
        raise ModelError(f"{get_family(architecture).title} inpainting UNets (in_channels "
                         f"{unet.get('in_channels')}) are not supported; SD 1.x and 2.x ones are")
    if unet.get("time_cond_proj_dim") is not None or scheduler.get("_class_name") == "LCMScheduler":
        raise ModelError("LCM inpainting UNets are not supported (an inpainting UNet with LCM's "
                         "guidance input or scheduler)")
    return _INPAINTING[architecture]


def _architecture(index: Config, unet: Config, vae: Config, text_encoder: Config | None,
                  text_encoder_2: Config | None) -> str:
    if text_encoder is None:
        return _refiner(unet, vae, text_encoder_2)
    if _is_sdxl(index, unet, text_encoder_2):
        _check_unet(unet, vae, text_encoder, text_encoder_2)
        if sdxl_time_ids(unet, text_encoder_2) == REFINER_TIME_IDS:
            raise ModelError("unet takes the SDXL refiner's aesthetic-score time ids, but the "
                             "model has two text encoders: not supported")
        return "sdxl"
    _check_unet(unet, vae, text_encoder)
    if text_encoder.get("hidden_act") == "gelu" or text_encoder.get("hidden_size") == 1024 \
            or unet.get("use_linear_projection"):
        return "sd2"
    return "sd1"


def _is_sdxl(index: Config, unet: Config, text_encoder_2: Config | None) -> bool:
    two_encoders = "text_encoder_2" in index or text_encoder_2 is not None
    text_time = unet.get("addition_embed_type") == "text_time"
    if two_encoders != text_time or (two_encoders and text_encoder_2 is None):
        raise ModelError("SDXL needs both a text_encoder_2 (with its config) and a unet with "
                         "addition_embed_type 'text_time'; this model has only one of them")
    return text_time


def _refiner(unet: Config, vae: Config, text_encoder_2: Config | None) -> str:
    """The SDXL refiner's signs: text_encoder_2 alone, a text_time UNet, five time ids."""
    if text_encoder_2 is None or unet.get("addition_embed_type") != "text_time":
        raise ModelError("a model without text_encoder must be an SDXL refiner: a "
                         "text_encoder_2 and a unet with addition_embed_type 'text_time'")
    _check_unet(unet, vae, None, text_encoder_2)
    if sdxl_time_ids(unet, text_encoder_2) != REFINER_TIME_IDS:
        raise ModelError(f"unet takes {sdxl_time_ids(unet, text_encoder_2)} time ids, the SDXL "
                         f"refiner {REFINER_TIME_IDS} (size, crop, aesthetic score)")
    return "sdxl-refiner"


def sdxl_time_ids(unet: Config, text_encoder_2: Config) -> float:
    """How many time ids a text_time UNet embeds: its added-embedding input is each id's
    addition_time_embed_dim-wide embedding plus the pooled text (projection_dim)."""
    width = unet.get("projection_class_embeddings_input_dim", 0) \
        - text_encoder_2.get("projection_dim", 0)
    return width / max(1, unet.get("addition_time_embed_dim", 1))


def _is_turbo(scheduler: Config) -> bool:
    return scheduler.get("prediction_type", "epsilon") == "epsilon" \
        and scheduler.get("timestep_spacing") == "trailing"


def check_override(detected: str, chosen: str) -> str:
    """`chosen` if it fits the detected family's architecture and guidance input; else
    ModelError (an LCM family's guidance embedding is in the UNet's weights or not)."""
    found, wanted = get_family(detected), get_family(chosen)
    if wanted.architecture != found.architecture:
        raise ModelError(f"family {chosen!r} ({wanted.title}) does not fit this model: its "
                         f"configs are {found.title}'s architecture")
    if wanted.inpainting != found.inpainting:
        has = "takes" if found.inpainting else "does not take"
        raise ModelError(f"family {chosen!r} ({wanted.title}) does not fit this model: its UNet "
                         f"{has} the mask and masked-image latents (inpainting)")
    if wanted.guidance_input != found.guidance_input:
        has = "has" if found.guidance_input else "has no"
        raise ModelError(f"family {chosen!r} ({wanted.title}) does not fit this model: its UNet "
                         f"{has} LCM's guidance input (time_cond_proj_dim)")
    return chosen


def _check_unet(unet: Config, vae: Config, text_encoder: Config | None,
                text_encoder_2: Config | None = None) -> None:
    latent = vae.get("latent_channels", 4)
    in_ok = unet.get("in_channels") == latent or is_inpainting_unet(unet, vae)
    if not in_ok or unet.get("out_channels") != latent:
        raise ModelError(f"unet in/out channels {unet.get('in_channels')}/"
                         f"{unet.get('out_channels')} fit neither the VAE's {latent} latent "
                         f"channels nor an inpainting UNet's {2 * latent + 1} in (depth and "
                         "other image-conditioned UNets are not supported)")
    # SDXL's context is both encoders' hidden states side by side.
    hidden = sum(config.get("hidden_size", 0) for config in (text_encoder or {},
                                                             text_encoder_2 or {}))
    if unet.get("cross_attention_dim") != hidden:
        raise ModelError(f"unet cross_attention_dim {unet.get('cross_attention_dim')} does not "
                         f"match the text encoders' hidden size {hidden}")
    if text_encoder_2 is None and unet.get("addition_embed_type") is not None:
        raise ModelError(f"unet has addition_embed_type={unet['addition_embed_type']!r}: "
                         "not an SD 1.x/2.x UNet")
    if unet.get("class_embed_type") is not None:
        raise ModelError(f"unet has class_embed_type={unet['class_embed_type']!r}: not a Stable "
                         "Diffusion text-to-image UNet")
