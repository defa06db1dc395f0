"""Convert an A1111/civitai single-file SD checkpoint (LDM key layout) into a diffusers folder.

Keys (LDM/CompVis layout): the UNet under `model.diffusion_model.`, the VAE under
`first_stage_model.`, the text encoder under `cond_stage_model.transformer.` (OpenAI CLIP, SD 1.x)
or `cond_stage_model.model.` (OpenCLIP, SD 2.x). SDXL files (Stability's `sgm` layout) keep the
UNet (with its `label_emb` for the added size/crop conditioning) and VAE there and hold two text
encoders under `conditioner.embedders.`: `0.transformer.` (CLIP ViT-L → text_encoder) and
`1.model.` (OpenCLIP ViT-bigG → text_encoder_2, a CLIPTextModelWithProjection whose
`text_projection` is stored transposed). diffusers' `single_file_utils` renames the keys;
the configs come from `models/configs/<name>/`, so nothing is fetched. The config is the shipped
one whose weight shapes the checkpoint fits, found by converting the checkpoint's shapes on
torch's meta device (tiny test models have no fixed sizes, and file names are never trusted).
Where several fit alike, see `BASE_CONFIGS`. Every model weight must come from the file and
every tensor of the file must land in the model: diffusers' converters skip what they do not
know, which would silently re-initialise weights.
"""

from __future__ import annotations

import json
import logging
import pickle
import re
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sdrt.export.components import check_loading_info
from sdrt.export.source import CONFIG_FILES
from sdrt.export.sources import PICKLE_SUFFIXES
from sdrt.models import CLIP_TOKENIZER as TOKENIZER
from sdrt.models import SHIPPED_CONFIGS
from sdrt.runtime.errors import ExportError, InputError, ModelError, first_line

logger = logging.getLogger("sdrt.export")

TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json")
UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."
OPEN_CLIP_PREFIX = "cond_stage_model.model."
SDXL_PREFIX = "conditioner."
SDXL_CLIP_PREFIX = "conditioner.embedders.0.transformer."  # CLIP ViT-L/14 → text_encoder
SDXL_OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."  # OpenCLIP ViT-bigG/14 → text_encoder_2
SDXL_REFINER_PREFIX = "conditioner.embedders.0.model."  # the refiner's only encoder (bigG)
TOKENIZER_FOLDERS = ("tokenizer", "tokenizer_2")
# Base models, in order of preference, for a checkpoint whose shapes fit several shipped configs
# alike: sdxl and sdxl_turbo (or tiny_sdxl and tiny_sdxl_turbo) have the same weight shapes, and
# only the scheduler defaults and native size tell them apart, which no tensor of a file shows.
# Most single files are fine-tunes of a base model, so the first of these that fits is chosen,
# with a warning naming the others and `--config NAME` to pick one. It is chosen only where every
# other fit has its prediction type: a wrong one gives noise, not a worse image, so SD 2.x 768-v
# (v-prediction) against SD-Turbo (epsilon) still needs --config.
BASE_CONFIGS = ("sd15", "sdxl", "sd21", "tiny_sd", "tiny_sdxl", "tiny_sd2")
# What an LDM (or SDXL's sgm) training checkpoint holds beside the models: the DDPM schedule
# buffers of ldm.models.diffusion.ddpm (sgm: the denoiser's sigmas) and the EMA copy (diffusers
# and A1111 load the non-EMA weights).
_LDM_BUFFERS = frozenset({
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
    "posterior_mean_coef1", "posterior_mean_coef2", "logvar", "lvlb_weights",
    "denoiser.sigmas"})  # sgm's DiscreteDenoiser registers its sigma table as a buffer
_LDM_EMA_PREFIX = "model_ema."
Tensors = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Checkpoint:
    """A single-file checkpoint: every tensor's shape, and a reader for the tensors of some keys."""

    name: str
    shapes: dict[str, tuple[int, ...]]
    read: Callable[[Iterable[str]], Tensors]

    def meta(self) -> Tensors:
        """Shape-only tensors: conversion and matching without reading a byte of weights."""
        return {key: torch.empty(shape, device="meta") for key, shape in self.shapes.items()}


@dataclass(frozen=True)
class _Part:
    """One diffusers component: where its tensors sit in the checkpoint and how to convert them."""

    folder: str
    prefix: str
    weights: str  # the file name diffusers/transformers look for
    build: Callable[[Path], torch.nn.Module]
    convert: Callable[[Tensors, torch.nn.Module], Tensors]
    spare: Callable[[str], bool] = field(default=lambda key: False)  # may stay unused

    def keys(self, names: Iterable[str]) -> list[str]:
        return [key for key in names if key.startswith(self.prefix)]


def open_checkpoint(path: Path, *, allow_pickle: bool = False) -> Checkpoint:
    """A .safetensors file, or (only with `allow_pickle`) a torch pickle read weights_only."""
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return _open_safetensors(path)
    if suffix not in PICKLE_SUFFIXES:
        raise ModelError(f"'{path.name}' is not a checkpoint sdrt reads: expected .safetensors "
                         f"(or, with --allow-pickle, {'/'.join(PICKLE_SUFFIXES)})")
    if not allow_pickle:
        raise ExportError(f"'{path.name}' is a pickle checkpoint, which can run code when loaded; "
                          "pass --allow-pickle to load it with torch.load(weights_only=True), "
                          "or use a .safetensors file")
    return _open_pickle(path)


def _open_safetensors(path: Path) -> Checkpoint:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
    except (SafetensorError, OSError) as exc:
        raise ModelError(f"'{path.name}' is not a readable .safetensors file: "
                         f"{first_line(exc)}") from exc

    def read(keys: Iterable[str]) -> Tensors:
        with safe_open(str(path), framework="pt") as handle:
            return {key: handle.get_tensor(key) for key in keys}

    return Checkpoint(path.name, shapes, read)


def _open_pickle(path: Path) -> Checkpoint:
    """torch.load with weights_only=True: an allow-list unpickler, so no code in the file runs."""
    try:
        try:  # mmap: tensors stay on disk until read (torch ≥ 1.6 zip files only)
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch's message spans lines; its "WeightsUnpickler error" line names what was refused.
        refused = re.search(r"WeightsUnpickler error: (.*?)(?: was not|$)", str(exc), re.M)
        raise ModelError(f"'{path.name}' holds more than tensors "
                         f"({refused[1] if refused else first_line(exc)}), which "
                         "torch.load(weights_only=True) will not build; convert it to "
                         ".safetensors with a tool you trust") from exc
    except (RuntimeError, OSError, EOFError) as exc:
        raise ModelError(f"cannot read '{path.name}' with torch.load(weights_only=True): "
                         f"{first_line(exc)}") from exc
    while isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]  # Lightning checkpoints nest the weights
    if not isinstance(state, dict):
        raise ModelError(f"'{path.name}' holds a {type(state).__name__}, not a state dict")
    tensors = {key: value for key, value in state.items() if isinstance(value, torch.Tensor)}
    return Checkpoint(path.name, {key: tuple(t.shape) for key, t in tensors.items()},
                      lambda keys: {key: tensors[key] for key in keys})


def shipped_configs() -> list[str]:
    """Names of the complete diffusers configs under models/configs/ (weights not included)."""
    if not SHIPPED_CONFIGS.is_dir():
        return []
    return sorted(p.name for p in SHIPPED_CONFIGS.iterdir()
                  if all((p / rel).is_file() for rel in CONFIG_FILES))


def choose_config(checkpoint: Checkpoint, *, config: str | None = None) -> str:
    """The shipped config whose weight shapes `checkpoint` fits (`config`: the one to check)."""
    return _choose_config(checkpoint, _parts(checkpoint), config)


def convert_checkpoint(checkpoint: Checkpoint, out_dir: Path, *, config: str | None = None) -> str:
    """Write `checkpoint` as a diffusers folder at `out_dir`; returns the shipped config's name."""
    parts = _parts(checkpoint)
    name = _choose_config(checkpoint, parts, config)
    logger.info("%s: converting with models/configs/%s", checkpoint.name, name)
    shutil.copytree(SHIPPED_CONFIGS / name, out_dir)
    index = json.loads((out_dir / "model_index.json").read_text())
    for folder in TOKENIZER_FOLDERS:  # SDXL's tokenizer_2 as well, where the config has one
        if folder in index:
            _complete_tokenizer(out_dir / folder)
    for part in parts:
        _write_part(checkpoint, part, SHIPPED_CONFIGS / name, out_dir)
    return name


def _parts(checkpoint: Checkpoint) -> tuple[_Part, ...]:
    parts = (_UNET, _VAE, *_text_parts(checkpoint))
    _check_known(checkpoint, parts)
    return parts


def _text_parts(checkpoint: Checkpoint) -> tuple[_Part, ...]:
    """The text encoders' layout; refuses checkpoints that are not SD 1.x/2.x/XL text-to-image."""
    from diffusers.loaders.single_file_utils import CHECKPOINT_KEY_NAMES as KEYS

    shapes, name = checkpoint.shapes, checkpoint.name
    sdxl = any(key.startswith(SDXL_PREFIX) for key in shapes)
    if sdxl and any(key.startswith(SDXL_REFINER_PREFIX) for key in shapes):
        raise ModelError(f"'{name}' is an SDXL refiner checkpoint ('{SDXL_REFINER_PREFIX}*'), "
                         "which is not converted from a single file: export the refiner's "
                         "diffusers folder (or hub id) and pass it to `sdrt generate --refiner`")
    unet_in = shapes.get(KEYS["inpainting"])
    if unet_in is None or len(unet_in) != 4:
        raise ModelError(f"'{name}' has no UNet ('{KEYS['inpainting']}'): not a full SD "
                         "checkpoint (a LoRA, VAE or embedding file?)")
    if unet_in[1] != 4:
        raise ModelError(f"'{name}' has a UNet with {unet_in[1]} input channels, not 4 "
                         "(inpainting/depth checkpoints are not supported)")
    if sdxl:
        return _sdxl_text_parts(checkpoint)
    if KEYS["clip"] in shapes:
        return (_CLIP,)
    if KEYS["open_clip"] in shapes:
        return (_OPEN_CLIP,)
    raise ModelError(f"'{name}' has no text encoder: neither '{CLIP_PREFIX}*' (CLIP, SD 1.x) "
                     f"nor '{OPEN_CLIP_PREFIX}*' (OpenCLIP, SD 2.x)")


def _sdxl_text_parts(checkpoint: Checkpoint) -> tuple[_Part, ...]:
    """SDXL base's two encoders: both must be there (diffusers would make up a missing one)."""
    encoders = {"CLIP ViT-L": SDXL_CLIP_PREFIX, "OpenCLIP ViT-bigG": SDXL_OPEN_CLIP_PREFIX}
    lacking = [f"{what} ('{prefix}*')" for what, prefix in encoders.items()
               if not any(key.startswith(prefix) for key in checkpoint.shapes)]
    if lacking:
        raise ModelError(f"'{checkpoint.name}' is an SDXL checkpoint ('{SDXL_PREFIX}*') without "
                         f"its {' or '.join(lacking)} text encoder: not a complete SDXL "
                         "checkpoint")
    return _SDXL_CLIP, _SDXL_OPEN_CLIP


def _check_known(checkpoint: Checkpoint, parts: tuple[_Part, ...]) -> None:
    prefixes = tuple(part.prefix for part in parts)
    unknown = sorted(key for key in checkpoint.shapes if key not in _LDM_BUFFERS
                     and not key.startswith((*prefixes, _LDM_EMA_PREFIX)))
    if unknown:
        raise ModelError(f"'{checkpoint.name}' has {len(unknown)} tensor(s) outside the UNet, VAE "
                         f"and text encoder(s) (e.g. '{unknown[0]}'): not a plain SD checkpoint")


def _choose_config(checkpoint: Checkpoint, parts: tuple[_Part, ...], wanted: str | None) -> str:
    """The shipped config the checkpoint's shapes fit (or `wanted`, if it fits).

    Only configs with the same components compete (SDXL's second text encoder or not). Where
    several fit, `_prefer` picks a base model or asks for --config; where none fits, the error
    names the closest: the fewest keys off, then `BASE_CONFIGS` order, then the name.
    """
    names, meta = shipped_configs(), checkpoint.meta()
    kind = "SDXL" if _is_sdxl(parts) else "SD 1.x/2.x"
    family = [name for name in names if _is_sdxl(parts) == _config_is_sdxl(name)]
    if wanted is not None:
        if wanted not in names:
            raise InputError(f"--config {wanted!r} is not a shipped config; known: "
                             f"{', '.join(names)}")
        if wanted not in family:
            raise ModelError(f"'{checkpoint.name}' does not fit --config {wanted}: it is an "
                             f"{kind} checkpoint and {wanted} is not; {kind} configs: "
                             f"{', '.join(family) or 'none'}")
        count, message = _misfit(meta, parts, SHIPPED_CONFIGS / wanted)
        if count:
            raise ModelError(f"'{checkpoint.name}' does not fit --config {wanted}: {message}")
        return wanted
    if not family:
        raise ModelError(f"no {kind} configs are shipped in {SHIPPED_CONFIGS} to convert "
                         f"'{checkpoint.name}' with")
    verdicts = {name: _misfit(meta, parts, SHIPPED_CONFIGS / name) for name in family}
    fits = [name for name, (count, _) in verdicts.items() if count == 0]
    if len(fits) == 1:
        return fits[0]
    if fits:
        return _prefer(checkpoint.name, fits)
    closest = min(verdicts, key=lambda name: (verdicts[name][0], *_preference(name)))
    raise ModelError(f"'{checkpoint.name}' fits no shipped config in models/configs "
                     f"({', '.join(verdicts)}); closest (fewest keys off), {closest}: "
                     f"{verdicts[closest][1]}")


def _prefer(name: str, fits: list[str]) -> str:
    """The base model among configs that fit alike (BASE_CONFIGS), or an error asking for one."""
    base = min(fits, key=_preference)
    others = [other for other in fits if other != base]
    if base not in BASE_CONFIGS or any(_prediction_type(other) != _prediction_type(base)
                                       for other in others):
        raise InputError(f"'{name}' fits several shipped configs ({', '.join(fits)}) "
                         "that its weights cannot tell apart (prediction type, scheduler, native "
                         "size); pass --config NAME")
    logger.warning("'%s' fits several shipped configs alike (%s); using %s, the base model, "
                   "for the scheduler and native size; pass --config %s to use another's",
                   name, ", ".join(fits), base, " or --config ".join(others))
    return base


def _preference(name: str) -> tuple[int, str]:
    """Sort key: BASE_CONFIGS in their order, then the other configs by name."""
    order = BASE_CONFIGS.index(name) if name in BASE_CONFIGS else len(BASE_CONFIGS)
    return order, name


def _prediction_type(name: str) -> str:
    scheduler = SHIPPED_CONFIGS / name / "scheduler" / "scheduler_config.json"
    return json.loads(scheduler.read_text()).get("prediction_type", "epsilon")


def _is_sdxl(parts: tuple[_Part, ...]) -> bool:
    return any(part.folder == "text_encoder_2" for part in parts)


def _config_is_sdxl(name: str) -> bool:
    return (SHIPPED_CONFIGS / name / "text_encoder_2" / "config.json").is_file()


def _misfit(meta: Tensors, parts: tuple[_Part, ...], config: Path) -> tuple[int, str]:
    """How many keys do not fit the config at `config`, and the first unfit part's message."""
    count, message = 0, ""
    for part in parts:
        with torch.device("meta"):
            model = part.build(config / part.folder)
        tensors = {key: meta[key] for key in part.keys(meta)}
        converted, info = _fit(part, model, tensors)
        try:
            check_loading_info(info, part.folder)
        except ModelError as exc:
            if converted:
                count += sum(len(keys) for keys in info.values())
            else:  # nothing converted (diffusers could not, or the part is absent): none fits
                count += len(tensors) + len(_expected(part, model))
            message = message or str(exc)
    return count, message


def _fit(part: _Part, model: torch.nn.Module, tensors: Tensors) -> tuple[Tensors, dict[str, list]]:
    """The converted weights, and what does not fit them as transformers' loading info."""
    try:
        converted = part.convert(tensors, model)
    except (KeyError, IndexError, ValueError, RuntimeError, AttributeError) as exc:
        return {}, {"unexpected_keys": [f"(diffusers cannot convert them: {first_line(exc)})"]}
    expected = _expected(part, model)
    # Tensors no weight came from (diffusers' converters skip keys they do not map), told
    # apart by the tensor they view: the VAE's 1×1 convolutions become views as linear weights,
    # and safetensors hands out each tensor as a view of its own buffer.
    taken = {id(_root(t)) for t in converted.values()}
    unused = [key for key, t in tensors.items()
              if id(_root(t)) not in taken and not part.spare(key)]
    return converted, {
        "missing_keys": sorted(expected.keys() - converted.keys()),
        "unexpected_keys": sorted(converted.keys() - expected.keys()) + sorted(unused),
        "mismatched_keys": sorted(key for key in expected.keys() & converted.keys()
                                  if tuple(converted[key].shape) != expected[key]),
    }


def _root(tensor: torch.Tensor) -> torch.Tensor:
    return tensor if tensor._base is None else tensor._base


def _expected(part: _Part, model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """The model's weights by name in SD's folder layout (CLIP keys under `text_model.`)."""
    shapes = {key: tuple(t.shape) for key, t in model.state_dict().items()}
    if not part.folder.startswith("text_encoder"):
        return shapes
    # transformers ≥ 5.6 flattened CLIPTextModel; SD folders and diffusers keep the prefix.
    # CLIPTextModelWithProjection (SDXL's text_encoder_2) keeps it, and `text_projection.` beside.
    return {key if key.startswith(("text_model.", "text_projection.")) else f"text_model.{key}":
            shape for key, shape in shapes.items()}


def _write_part(checkpoint: Checkpoint, part: _Part, config: Path, out_dir: Path) -> None:
    """Read, convert, re-check and save one component: one model's weights in memory at a time."""
    from safetensors.torch import save_file

    with torch.device("meta"):
        model = part.build(config / part.folder)
    converted, info = _fit(part, model, checkpoint.read(part.keys(checkpoint.shapes)))
    check_loading_info(info, part.folder)
    expected = _expected(part, model)  # leaves out buffers such as CLIP's position_ids
    state = {key: t.contiguous() for key, t in converted.items() if key in expected}
    save_file(state, str(out_dir / part.folder / part.weights), metadata={"format": "pt"})


def _complete_tokenizer(folder: Path) -> None:
    """The shared CLIP tokenizer files the config does not carry itself (SD 2.x pads with '!')."""
    folder.mkdir(exist_ok=True)
    for name in TOKENIZER_FILES:
        if not (folder / name).is_file():
            shutil.copy(TOKENIZER / name, folder / name)


def _build_unet(folder: Path) -> torch.nn.Module:
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder))


def _build_vae(folder: Path) -> torch.nn.Module:
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_config(AutoencoderKL.load_config(folder))


def _build_text_encoder(folder: Path) -> torch.nn.Module:
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig.from_json_file(folder / "config.json"))


def _build_text_encoder_2(folder: Path) -> torch.nn.Module:
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    return CLIPTextModelWithProjection(CLIPTextConfig.from_json_file(folder / "config.json"))


def _convert_unet(tensors: Tensors, model: Any) -> Tensors:
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    return convert_ldm_unet_checkpoint(tensors, model.config)


def _convert_vae(tensors: Tensors, model: Any) -> Tensors:
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    return convert_ldm_vae_checkpoint(tensors, model.config)


def _convert_clip(tensors: Tensors, model: Any) -> Tensors:
    """OpenAI CLIP: the prefix off (`cond_stage_model.transformer.` or SDXL's embedder 0)."""
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint

    return convert_ldm_clip_checkpoint(tensors)


def _convert_open_clip(tensors: Tensors, model: Any) -> Tensors:
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint

    return convert_open_clip_checkpoint(model, tensors, prefix=OPEN_CLIP_PREFIX)


def _convert_sdxl_open_clip(tensors: Tensors, model: Any) -> Tensors:
    """OpenCLIP bigG, every layer, and its projection transposed into `text_projection.weight`."""
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint

    return convert_open_clip_checkpoint(model, tensors, prefix=SDXL_OPEN_CLIP_PREFIX)


def _open_clip_spare(key: str) -> bool:
    """OpenCLIP tensors SD 2.x leaves out, or that diffusers splits into q/k/v copies.

    SD 2.x reads the penultimate layer (diffusers' list drops the last one of the 24); the
    projection and logit scale serve only CLIP's contrastive loss; in_proj weights become
    q_proj/k_proj/v_proj copies, whose names and shapes the model side checks.
    """
    from diffusers.loaders.single_file_utils import SD_2_TEXT_ENCODER_KEYS_TO_IGNORE

    return (key in SD_2_TEXT_ENCODER_KEYS_TO_IGNORE or key == f"{OPEN_CLIP_PREFIX}logit_scale"
            or key.endswith((".in_proj_weight", ".in_proj_bias")))


def _sdxl_open_clip_spare(key: str) -> bool:
    """SDXL's OpenCLIP tensors that land in the model as new tensors, or serve only training.

    in_proj weights become q/k/v copies and `text_projection` a transposed copy, whose names and
    shapes the model side checks; the logit scale serves only CLIP's contrastive loss. SDXL
    keeps every layer (it reads the penultimate one's output, and the last one feeds the pooled
    embedding).
    """
    return (key == f"{SDXL_OPEN_CLIP_PREFIX}logit_scale"
            or key == f"{SDXL_OPEN_CLIP_PREFIX}text_projection"
            or key.endswith((".in_proj_weight", ".in_proj_bias")))


_UNET = _Part("unet", UNET_PREFIX, "diffusion_pytorch_model.safetensors", _build_unet,
              _convert_unet)
_VAE = _Part("vae", VAE_PREFIX, "diffusion_pytorch_model.safetensors", _build_vae, _convert_vae)
_CLIP = _Part("text_encoder", CLIP_PREFIX, "model.safetensors", _build_text_encoder,
              _convert_clip)
_OPEN_CLIP = _Part("text_encoder", OPEN_CLIP_PREFIX, "model.safetensors", _build_text_encoder,
                   _convert_open_clip, _open_clip_spare)
_SDXL_CLIP = _Part("text_encoder", SDXL_CLIP_PREFIX, "model.safetensors", _build_text_encoder,
                   _convert_clip)
_SDXL_OPEN_CLIP = _Part("text_encoder_2", SDXL_OPEN_CLIP_PREFIX, "model.safetensors",
                        _build_text_encoder_2, _convert_sdxl_open_clip, _sdxl_open_clip_spare)
