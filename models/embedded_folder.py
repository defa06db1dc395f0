"""The embedded model saved as a diffusers StableDiffusionPipeline folder (fp16 safetensors, fp32
configs, SD's key layout) and reloaded to check that every key and weight survived."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import diffusers
import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextModel

from sdrt.models import CLIP_TOKENIZER
from sdrt.models.build_random_sd import save_text_encoder
from sdrt.models.training_kit import to_fp16_file

TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json")


def save_folder(out: Path, scheduler: dict[str, Any], vae: AutoencoderKL,
                text_encoder: CLIPTextModel, unet: UNet2DConditionModel) -> None:
    """Write the diffusers StableDiffusionPipeline folder, weights in fp16 safetensors."""
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": diffusers.__version__,
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", "DDIMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    DDIMScheduler(**scheduler).save_pretrained(out / "scheduler")
    (out / "tokenizer").mkdir()
    for name in TOKENIZER_FILES:
        shutil.copy(CLIP_TOKENIZER / name, out / "tokenizer" / name)
    unet.save_pretrained(out / "unet")
    vae.save_pretrained(out / "vae")
    # transformers 5 loads a folder in its weights' dtype unless the config names one: fp16
    # weights must still load as the fp32 model that sdrt's exporter expects.
    text_encoder.config.dtype = torch.float32
    text_encoder.config.architectures = ["CLIPTextModel"]
    save_text_encoder(text_encoder, out / "text_encoder")
    for path in out.glob("*/*.safetensors"):
        to_fp16_file(path)


def verify_folder(out: Path, components: dict[str, torch.nn.Module]) -> StableDiffusionPipeline:
    """Reload the folder in fp32, fail on any missing or unexpected key or changed weight."""
    _, info = CLIPTextModel.from_pretrained(out / "text_encoder", output_loading_info=True)
    _check_info("text_encoder", info)
    for name, cls in (("unet", UNet2DConditionModel), ("vae", AutoencoderKL)):
        _, info = cls.from_pretrained(out / name, output_loading_info=True)
        _check_info(name, info)
    pipe = StableDiffusionPipeline.from_pretrained(out, torch_dtype=torch.float32)
    for name, module in components.items():
        loaded = getattr(pipe, name).state_dict()
        for key, value in module.state_dict().items():
            if not torch.equal(loaded[key], value):
                raise RuntimeError(f"{name}: weight {key} differs after reloading {out}")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _check_info(name: str, info: dict[str, Any]) -> None:
    """Raise if a from_pretrained loading report lists any missing or unexpected key."""
    bad = {k: list(v) for k, v in info.items()
           if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if bad:
        raise RuntimeError(f"{name} does not load cleanly: {bad}")


def folder_bytes(out: Path) -> dict[str, int]:
    """Bytes of safetensors weights per component folder."""
    return {p.parent.name: p.stat().st_size for p in sorted(out.glob("*/*.safetensors"))}
