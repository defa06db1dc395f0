"""Fuse LoRA files (Hu et al. 2021) into a model's weights before it is exported.

A LoRA adds scale · (alpha / rank) · up @ down to chosen UNet and text-encoder layers. Files are
safetensors in kohya's layout (`lora_unet_…`, `lora_te_…`/`lora_te1_…`/`lora_te2_…` with
`.lora_down.weight`, `.lora_up.weight`, `.alpha`) or diffusers/peft's (`unet.….lora_A.weight`,
`.lora_B.weight`, `text_encoder.…`); pickle LoRAs are not read. diffusers' LoRA loaders read both
layouts (`lora_state_dict` renames kohya's keys), peft wraps the named layers, and each
component's LoRA layers are fused at the file's scale and removed (diffusers' `fuse_lora` then
`unload_lora`), so the exported graphs are plain ones. The export loads one component at a
time, so each is fused right after it is loaded; a LoRA key that matches no layer is an error,
where diffusers would only log it.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sdrt.runtime.errors import ExportError, InputError, first_line
from sdrt.runtime.model.manifest import sha256_file

logger = logging.getLogger("sdrt.export")

LORA_COMPONENTS = ("unet", "text_encoder", "text_encoder_2")  # what a LoRA may change
# key layout → (diffusers' loader mixin that reads it, the components its keys may name)
LORA_KEYS = {"sd": ("StableDiffusionLoraLoaderMixin", LORA_COMPONENTS[:2]),
             "sdxl": ("StableDiffusionXLLoraLoaderMixin", LORA_COMPONENTS)}
_ANY_LORA_KEY = re.compile(r"lora([._](down|up)|_[AB])\.weight$")  # kohya, diffusers, peft
# One down weight per layer peft wraps, in each form diffusers' renaming leaves it: kohya UNet
# and attention keys `…lora.down` / `…_lora.down`, kohya text-encoder MLP keys
# `…lora_linear_layer.down`, peft's `…lora_A`.
_DOWN_KEY = re.compile(r"(lora[._]down|lora_linear_layer\.down|lora_A)\.weight$")

# a text-encoder alpha's key after diffusers' renaming, less its module path
_ALPHA_SUFFIX = re.compile(r"(_lora|\.lora_linear_layer|\.lora)?(\.down\.weight)?\.alpha$")
_KOHYA_ATTENTION = re.compile(r"self_attn\.to_(q|k|v|out)$")  # diffusers' old names of CLIP's


@dataclass(frozen=True)
class Lora:
    """One LoRA file, read and renamed to diffusers' keys (`unet.…`, `text_encoder.…`)."""

    path: Path
    scale: float
    sha256: str
    state: Mapping[str, torch.Tensor]
    alphas: Mapping[str, float] | None  # kohya's per-layer alpha; None: alpha = rank
    layers: Mapping[str, int]  # component → how many of its layers the file changes
    keys: str  # the key layout diffusers reads it with: a LORA_KEYS entry

    def manifest_entry(self) -> dict[str, Any]:
        """What manifest.json records of a fused LoRA."""
        return {"file": self.path.name, "sha256": self.sha256, "scale": self.scale}


def pair_scales(paths: Sequence[Path], scales: Sequence[float]) -> list[tuple[Path, float]]:
    """`--lora` files with their `--lora-scale` in order; a file without one gets 1.0."""
    if len(scales) > len(paths):
        raise InputError(f"{len(scales)} --lora-scale values for {len(paths)} --lora files; "
                         "give at most one scale per LoRA, in the same order")
    return [(Path(path), float(scales[i]) if i < len(scales) else 1.0)
            for i, path in enumerate(paths)]


def read_loras(loras: Sequence[tuple[Path, float]], *, unet_config: Mapping[str, Any],
               keys: str) -> list[Lora]:
    """Read and check each (file, scale) before anything is exported; one-line errors."""
    if loras and importlib.util.find_spec("peft") is None:
        raise ModuleNotFoundError("fusing a LoRA needs peft", name="peft")
    return [read_lora(Path(path), scale, unet_config=unet_config, keys=keys)
            for path, scale in loras]


def read_lora(path: Path, scale: float, *, unet_config: Mapping[str, Any], keys: str) -> Lora:
    """One LoRA file: a safetensors file whose LoRA keys all name a part of this model (`keys`:
    the architecture's key layout, "sd" or "sdxl")."""
    if path.suffix.lower() != ".safetensors":
        raise InputError(f"LoRA '{path.name}' is not a .safetensors file (pickle LoRAs can run "
                         "code when loaded and are not read)")
    if not path.is_file():
        raise InputError(f"LoRA file '{path}' does not exist")
    if not math.isfinite(scale):
        raise InputError(f"--lora-scale for '{path.name}' must be a finite number, got {scale}")
    raw = _load_tensors(path)
    if not any(_ANY_LORA_KEY.search(key) for key in raw):
        raise ExportError(f"LoRA '{path.name}' holds no LoRA weights (no lora_down/lora_up or "
                          "lora_A/lora_B keys)")
    state, alphas = _renamed(path, raw, unet_config, keys)
    parts = LORA_KEYS[keys][1]
    stray = sorted(key for key in state if not key.startswith(tuple(f"{p}." for p in parts)))
    if stray:
        raise ExportError(f"LoRA '{path.name}' has weights for no part of this model, e.g. "
                          f"'{stray[0]}' (parts: {', '.join(parts)})")
    layers = {part: sum(1 for key in state if key.startswith(f"{part}.") and _DOWN_KEY.search(key))
              for part in parts}
    logger.info("LoRA %s: %s layers", path.name,
                ", ".join(f"{count} {part}" for part, count in layers.items() if count))
    return Lora(path, scale, sha256_file(path), state, alphas, layers, keys)


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise ExportError(f"LoRA '{path.name}' is not a readable .safetensors file: "
                          f"{first_line(exc)}") from exc


def _renamed(path: Path, raw: dict[str, torch.Tensor], unet_config: Mapping[str, Any],
             keys: str) -> tuple[dict[str, torch.Tensor], dict[str, float] | None]:
    """diffusers' reading of the keys (kohya → diffusers names, SDXL's SGM block numbers)."""
    from diffusers.configuration_utils import FrozenDict

    with _lora_errors(path, "its keys"):
        state, alphas = _loader(keys).lora_state_dict(raw, unet_config=FrozenDict(unet_config))
    return state, alphas


def fuse_loras(model: torch.nn.Module, component: str, loras: Sequence[Lora]) -> None:
    """Fuse each LoRA's layers for `component` into `model` at its scale, in order, then drop
    the LoRA layers so the model exports as a plain one."""
    from diffusers.loaders.lora_base import fuse_text_encoder_lora
    from diffusers.utils import recurse_remove_peft_layers

    for index, lora in enumerate(loras):
        wanted = lora.layers.get(component, 0)
        if not wanted:
            continue
        adapter = f"sdrt_lora_{index}"
        _load_into(model, component, lora, adapter)
        found = _lora_layers(model)
        if found != wanted:
            raise ExportError(f"LoRA '{lora.path.name}': {wanted - found} of its {wanted} "
                              f"{component} layers match no layer of this model")
        if component == "unet":
            model.fuse_lora(lora_scale=lora.scale, adapter_names=[adapter])
            model.unload_lora()
        else:
            fuse_text_encoder_lora(model, lora_scale=lora.scale, adapter_names=[adapter])
            recurse_remove_peft_layers(model)
        logger.info("%s: fused %d layers of LoRA %s at scale %g", component, wanted,
                    lora.path.name, lora.scale)


def _load_into(model: torch.nn.Module, component: str, lora: Lora, adapter: str) -> None:
    loader = _loader(lora.keys)
    # copies: diffusers may pop keys from what it is given, and every component reads them
    state, alphas = dict(lora.state), None if lora.alphas is None else dict(lora.alphas)
    if alphas is not None and component != "unet":
        alphas = _text_encoder_alphas(alphas, component, model)
    with _lora_errors(lora.path, f"its {component} layers"):
        if component == "unet":
            loader.load_lora_into_unet(state, alphas, unet=model, adapter_name=adapter)
        else:
            loader.load_lora_into_text_encoder(state, alphas, text_encoder=model,
                                               prefix=component, adapter_name=adapter)


def _text_encoder_alphas(alphas: dict[str, float], component: str,
                         model: torch.nn.Module) -> dict[str, float]:
    """Kohya's per-layer text-encoder alphas keyed `<component>.<module path>.alpha`, the one
    form diffusers' loader finds the layer by: from the names its renaming leaves
    (`…self_attn.to_q_lora.down.weight.alpha` it reads as `self_attn`, and for transformers 5's
    CLIP, which has no `text_model` level, a `text_model.` path it does not strip), every layer
    whose alpha differs from the file's most common one would be fused with that one instead."""
    flat = not hasattr(model, "text_model")
    renamed = {}
    for key, alpha in alphas.items():
        if key.startswith(f"{component}."):
            path = _ALPHA_SUFFIX.sub("", key.removeprefix(f"{component}."))
            path = _KOHYA_ATTENTION.sub(r"self_attn.\1_proj", path)
            key = f"{component}.{path.removeprefix('text_model.') if flat else path}.alpha"
        renamed[key] = alpha
    return renamed


def _lora_layers(model: torch.nn.Module) -> int:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return sum(isinstance(module, BaseTunerLayer) for module in model.modules())


def _loader(keys: str) -> Any:
    import diffusers.loaders

    return getattr(diffusers.loaders, LORA_KEYS[keys][0])


@contextlib.contextmanager
def _lora_errors(path: Path, what: str) -> Iterator[None]:
    """diffusers'/peft's errors on a LoRA that does not fit, as one-line ExportErrors."""
    try:
        yield
    except (ValueError, KeyError, RuntimeError) as exc:
        raise ExportError(f"LoRA '{path.name}': diffusers cannot apply {what} to this model: "
                          f"{_reason(exc)}") from exc


def _reason(exc: BaseException) -> str:
    """An exception's first line, with the next one when it only introduces it (torch's
    "Error(s) in loading state_dict for …:" then "size mismatch for …")."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return " ".join(lines[:2]) if len(lines) > 1 and lines[0].endswith(":") else first_line(exc)
