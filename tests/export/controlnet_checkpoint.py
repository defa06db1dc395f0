"""Test helpers: a tiny ControlNet made from a tiny UNet, and its A1111 single-file layout.

`tiny_controlnet` is diffusers' ControlNetModel.from_unet on a tiny model's UNet (its encoder's
weights copied, as the paper initialises a ControlNet), with the zero convolutions given small
random weights: a fresh ControlNet's residuals are all zero, which would test nothing.

`write_a1111_controlnet` writes it as A1111's ControlNet extension reads a `.safetensors` file
(lllyasviel's `cldm` layout under `control_model.`). diffusers only converts that layout to its
own (`single_file_utils.convert_controlnet_checkpoint`); using its table backwards would test it
against itself, so the map is written out here from the `cldm` module layout:

- the UNet encoder as in an SD single file (tests/export/ldm_checkpoint.py): `time_embed.0/2`,
  `input_blocks.k`, `middle_block.0/1/2` (SDXL's added embedding: `label_emb.0.0/2`);
- `input_hint_block.2i` the conditioning embedding's convolutions (diffusers'
  `controlnet_cond_embedding.conv_in`, `blocks.i`, `conv_out`; SiLUs at the odd indices);
- `zero_convs.i.0` diffusers' `controlnet_down_blocks.i`, `middle_block_out.0` its
  `controlnet_mid_block`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tests.export.ldm_checkpoint import _unet_key

ZERO_CONVS = ("controlnet_down_blocks.", "controlnet_mid_block.",
              "controlnet_cond_embedding.conv_out.")
ZERO_CONV_STD = 0.1  # small residuals next to the skip samples, as a trained ControlNet's
CONTROL_PREFIX = "control_model."
# The conditioning embedding's widths: 2 (one stride-2 conv) makes the control image 2× the
# latent, as the tiny models' VAE; A1111's layout has 4 (three stride-2 convs, SD's 8×).
TINY_COND_CHANNELS = (16, 32)
A1111_COND_CHANNELS = (8, 16, 16, 32)


def tiny_controlnet(unet_dir: Path, out: Path, *, seed: int = 0,
                    cond_channels: tuple[int, ...] = TINY_COND_CHANNELS) -> Path:
    """A diffusers ControlNetModel folder (config.json + safetensors) made from `unet_dir`."""
    from diffusers import ControlNetModel, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(unet_dir)
    torch.manual_seed(seed)  # the conditioning embedding's own initialisation
    net = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=cond_channels)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in net.named_parameters():
            if name.startswith(ZERO_CONVS):
                param.copy_(torch.randn(param.shape, generator=gen) * ZERO_CONV_STD)
    net.save_pretrained(out)
    return out


def write_a1111_controlnet(folder: Path, path: Path) -> Path:
    """Write the diffusers ControlNet in `folder` as one `control_model.`-prefixed file."""
    config = json.loads((folder / "config.json").read_text())
    weights = load_file(str(folder / "diffusion_pytorch_model.safetensors"))
    state = {CONTROL_PREFIX + a1111_key(key, config): value.contiguous()
             for key, value in weights.items()}
    save_file(state, str(path))
    return path


def a1111_key(key: str, config: dict) -> str:
    """The `cldm` name of one diffusers ControlNetModel weight."""
    head, param = key.rsplit(".", 1)
    blocks = 2 * (len(config["conditioning_embedding_out_channels"]) - 1)
    if head == "controlnet_cond_embedding.conv_in":
        return f"input_hint_block.0.{param}"
    if head == "controlnet_cond_embedding.conv_out":
        return f"input_hint_block.{2 * (blocks + 1)}.{param}"
    if match := re.fullmatch(r"controlnet_cond_embedding\.blocks\.(\d+)", head):
        return f"input_hint_block.{2 * (int(match[1]) + 1)}.{param}"
    if match := re.fullmatch(r"controlnet_down_blocks\.(\d+)", head):
        return f"zero_convs.{match[1]}.0.{param}"
    if head == "controlnet_mid_block":
        return f"middle_block_out.0.{param}"
    return _unet_key(key, config)
