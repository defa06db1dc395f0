"""Test helper: write a diffusers SD folder as an A1111/civitai single-file checkpoint.

The reverse of what sdrt reads (LDM/CompVis key layout, as A1111 and civitai files hold it).
diffusers only converts LDM → diffusers (`single_file_utils`), and using its mapping backwards
would test it against itself, so this mapping is written out here from the LDM module layout:

- UNet (`model.diffusion_model.`): `time_embed.0/2`, SDXL's added size/crop/pooled-text
  embedding `label_emb.0.0/2` (diffusers' `add_embedding.linear_1/2`); `input_blocks.k` holds
  level b's resnet j at k = 1 + b(L+1) + j (`.0`, its attention `.1`) and the level's
  downsampler at j = L (`.0.op`); `output_blocks.k` likewise with L+1 resnets per level and
  the upsampler in the last slot (`.1.conv`, or `.2.conv` after an attention);
  `middle_block.0/1/2` = resnet, attention, resnet. Resnets name their layers `in_layers.0/2`,
  `emb_layers.1`, `out_layers.0/3`, `skip_connection`.
- VAE (`first_stage_model.`): `down.i.block.j`, `up.(n-1-i).block.j` (LDM counts up blocks from
  the bottom), `mid.block_1/2`, `mid.attn_1` with q/k/v/proj_out as 1×1 convolutions,
  `norm_out`, `nin_shortcut`.
- Text encoder: OpenAI CLIP under `cond_stage_model.transformer.text_model.` (SD 1.x, with its
  position_ids buffer), or OpenCLIP under `cond_stage_model.model.` (SD 2.x: q/k/v stacked in
  `attn.in_proj_*`, `ln_1/2`, `mlp.c_fc/c_proj`, `ln_final`, `positional_embedding`, plus the
  `text_projection` and `logit_scale` that SD does not use).
- SDXL (Stability's `sgm` layout, when the folder has a text_encoder_2): the first encoder as
  OpenAI CLIP under `conditioner.embedders.0.transformer.text_model.`, the second as OpenCLIP
  under `conditioner.embedders.1.model.` (the layout above), whose `text_projection` is
  CLIPTextModelWithProjection's `text_projection.weight` transposed: OpenCLIP multiplies
  `x @ text_projection`, a Linear layer `x @ weight.T`.

Beside the models it writes two of the extra tensors real checkpoints carry (a schedule buffer:
LDM's `alphas_cumprod`, or sgm's `denoiser.sigmas` for SDXL; the EMA decay), which a reader must
recognise and leave out.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

_UNET_LAYERS = {"time_embedding.linear_1": "time_embed.0",
                "time_embedding.linear_2": "time_embed.2",
                "add_embedding.linear_1": "label_emb.0.0",
                "add_embedding.linear_2": "label_emb.0.2", "conv_in": "input_blocks.0.0",
                "conv_norm_out": "out.0", "conv_out": "out.2"}
_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
           "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v",
                  "to_out.0": "proj_out"}
_OPEN_CLIP = {"embeddings.token_embedding.weight": "token_embedding.weight",
              "embeddings.position_embedding.weight": "positional_embedding",
              "final_layer_norm.weight": "ln_final.weight",
              "final_layer_norm.bias": "ln_final.bias"}
CLIP_PREFIX = "cond_stage_model.transformer."
OPEN_CLIP_PREFIX = "cond_stage_model.model."
SDXL_CLIP_PREFIX = "conditioner.embedders.0.transformer."
SDXL_OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."
_OPEN_CLIP_LAYER = {"self_attn.out_proj": "attn.out_proj", "layer_norm1": "ln_1",
                    "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}


def write_ldm_checkpoint(folder: Path, path: Path) -> Path:
    """Write diffusers `folder` as one LDM-layout file: .safetensors, else a torch pickle."""
    parts = ("unet", "vae", "text_encoder")
    if (folder / "text_encoder_2").is_dir():
        parts += ("text_encoder_2",)
    state = ldm_state({name: _weights(folder / name) for name in parts},
                      {name: _config(folder / name) for name in parts})
    if path.suffix == ".safetensors":
        save_file({key: value.contiguous() for key, value in state.items()}, str(path))
    else:  # as PyTorch Lightning saves them
        torch.save({"state_dict": state, "global_step": 470000}, path)
    return path


def ldm_state(weights: dict[str, dict], configs: dict[str, dict]) -> dict[str, torch.Tensor]:
    """The single-file state of a model's weights and configs (by component: unet, vae, ...)."""
    state = {f"model.diffusion_model.{_unet_key(key, configs['unet'])}": value
             for key, value in weights["unet"].items()}
    for key, value in weights["vae"].items():
        state[f"first_stage_model.{_vae_key(key, configs['vae'])}"] = _vae_value(key, value)
    text = _unprefixed(weights["text_encoder"])
    if "text_encoder_2" in weights:  # SDXL
        state.update(_clip(text, configs["text_encoder"], SDXL_CLIP_PREFIX))
        text_2 = _unprefixed(weights["text_encoder_2"])
        projection = text_2.pop("text_projection.weight").T
        state.update(_open_clip(text_2, configs["text_encoder_2"], SDXL_OPEN_CLIP_PREFIX,
                                projection))
        state["denoiser.sigmas"] = torch.linspace(0.03, 14.6, 1000)
    else:
        # SD 2.x's OpenCLIP uses plain gelu; OpenAI CLIP (SD 1.x) quick_gelu.
        if configs["text_encoder"]["hidden_act"] == "gelu":
            hidden = configs["text_encoder"]["hidden_size"]  # SD 2.x reads no projection
            state.update(_open_clip(text, configs["text_encoder"], OPEN_CLIP_PREFIX,
                                    torch.randn(hidden, hidden)))
        else:
            state.update(_clip(text, configs["text_encoder"], CLIP_PREFIX))
        state["alphas_cumprod"] = torch.linspace(0.999, 0.005, 1000)
    state["model_ema.decay"] = torch.tensor(0.9999)
    return state


def _unprefixed(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CLIP keys without `text_model.` (SD folders keep it; transformers ≥ 5.6 may not)."""
    return {key.removeprefix("text_model."): value for key, value in weights.items()}


def _unet_key(key: str, config: dict) -> str:
    head, param = key.rsplit(".", 1)
    if head in _UNET_LAYERS:
        return f"{_UNET_LAYERS[head]}.{param}"
    slots = config["layers_per_block"] + 1  # LDM slots per level: resnets + down/upsampler
    if match := re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d)\.(.+)", key):
        kind, index, rest = match.groups()
        slot = 1 if kind == "attentions" else 2 * int(index)
        return f"middle_block.{slot}.{_resnet(rest) if kind == 'resnets' else rest}"
    match = re.fullmatch(r"(down|up)_blocks\.(\d+)\.(\w+)\.(\d+)\.(.+)", key)
    side, level, kind, index, rest = match.groups()
    first = 1 + int(level) * slots if side == "down" else int(level) * slots
    blocks = "input_blocks" if side == "down" else "output_blocks"
    if kind == "resnets":
        return f"{blocks}.{first + int(index)}.0.{_resnet(rest)}"
    if kind == "attentions":
        return f"{blocks}.{first + int(index)}.1.{rest}"
    if kind == "downsamplers":
        return f"input_blocks.{first + slots - 1}.0.op.{rest.removeprefix('conv.')}"
    after_attention = "CrossAttn" in config["up_block_types"][int(level)]
    return f"output_blocks.{first + slots - 1}.{2 if after_attention else 1}.{rest}"


def _resnet(rest: str) -> str:
    layer, param = rest.rsplit(".", 1)
    return f"{_RESNET[layer]}.{param}"


def _vae_key(key: str, config: dict) -> str:
    top = len(config["up_block_types"]) - 1  # LDM numbers the decoder's levels from the bottom
    key = re.sub(r"^encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", key)
    key = re.sub(r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.",
                 key)
    key = re.sub(r"^decoder\.up_blocks\.(\d+)\.(resnets|upsamplers\.0)\.",
                 lambda m: f"decoder.up.{top - int(m[1])}."
                           f"{'block' if m[2] == 'resnets' else 'upsample'}.", key)
    key = re.sub(r"\.mid_block\.resnets\.(\d)\.", lambda m: f".mid.block_{int(m[1]) + 1}.", key)
    key = re.sub(r"\.mid_block\.attentions\.0\.(\w+(?:\.0)?)\.",
                 lambda m: f".mid.attn_1.{_VAE_ATTENTION[m[1]]}.", key)
    return key.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")


def _vae_value(key: str, value: torch.Tensor) -> torch.Tensor:
    """LDM's VAE attention projections are 1×1 convolutions: (C, C) → (C, C, 1, 1)."""
    if "mid_block.attentions" in key and value.ndim == 2:
        return value[:, :, None, None]
    return value


def _clip(weights: dict[str, torch.Tensor], config: dict, prefix: str) -> dict[str, torch.Tensor]:
    state = {f"{prefix}text_model.{key}": value for key, value in weights.items()}
    positions = torch.arange(config["max_position_embeddings"])[None]  # (1, 77), a buffer
    state[f"{prefix}text_model.embeddings.position_ids"] = positions
    return state


def _open_clip(weights: dict[str, torch.Tensor], config: dict, prefix: str,
               projection: torch.Tensor) -> dict[str, torch.Tensor]:
    """OpenCLIP's text tower; `projection` as OpenCLIP stores it, (hidden, projection_dim)."""
    state = {prefix + name: weights[key] for key, name in _OPEN_CLIP.items()}
    for layer in range(config["num_hidden_layers"]):
        src, dst = f"encoder.layers.{layer}.", f"{prefix}transformer.resblocks.{layer}."
        for param in ("weight", "bias"):  # q, k, v stacked, as torch's MultiheadAttention has
            state[f"{dst}attn.in_proj_{param}"] = torch.cat(
                [weights[f"{src}self_attn.{p}_proj.{param}"] for p in "qkv"])
            for name, ldm in _OPEN_CLIP_LAYER.items():
                state[f"{dst}{ldm}.{param}"] = weights[f"{src}{name}.{param}"]
    state[prefix + "text_projection"] = projection
    state[prefix + "logit_scale"] = torch.tensor(4.6052)  # log(100), CLIP's trained value
    return state


def _weights(component: Path) -> dict[str, torch.Tensor]:
    (path,) = component.glob("*.safetensors")
    return load_file(str(path))


def _config(component: Path) -> dict:
    return json.loads((component / "config.json").read_text())
