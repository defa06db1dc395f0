"""Convert a single-file ControlNet (A1111/civitai `.safetensors`, or `.pth` with --allow-pickle)
into a diffusers ControlNetModel folder for export/controlnet.py.

Two layouts are read: lllyasviel's `cldm` one, which A1111's ControlNet extension loads (SD 1.x
and 2.x: the UNet encoder as in an SD checkpoint under `control_model.` — or unprefixed, as some
SD 2.x files — plus `input_hint_block.*` for the conditioning embedding, `zero_convs.i.0` and
`middle_block_out.0`), renamed by diffusers' own `single_file_utils.convert_controlnet_checkpoint`
(SDXL's `label_emb` by its table for the added embedding); and diffusers' key names in one file
(most SDXL ControlNets), kept as they are. The config is read from the weights' shapes (widths,
layers, attention depth, cross-attention width, linear projections, conditioning embedding,
SDXL's added embedding) and, for global pooling, the extension's YAML beside the file; what
shapes cannot show (attention heads, SDXL's time-id embedding width) comes from the shipped UNet
config of the same widths (models/configs/), so nothing is fetched. Every tensor of the
ControlNet must land in the model: the loader refuses missing or unexpected weights
(sdrt.export.components.check_loading_info).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sdrt.export.controlnet import WEIGHTS_NAME
from sdrt.export.single_file import BASE_CONFIGS, Checkpoint, Tensors
from sdrt.models import SHIPPED_CONFIGS
from sdrt.runtime.control.manifest import CONTROLNET_CLASS
from sdrt.runtime.errors import ModelError

logger = logging.getLogger("sdrt.export")

CLDM_PREFIX = "control_model."  # diffusers' LDM_CONTROLNET_KEY
CLDM_KEYS = ("input_hint_block.0.weight", f"{CLDM_PREFIX}input_hint_block.0.weight")
DIFFUSERS_KEY = "controlnet_cond_embedding.conv_in.weight"
# Config entries the weights cannot show, taken from the shipped UNet config of the same widths.
_FROM_BASE = ("attention_head_dim", "num_attention_heads", "addition_time_embed_dim",
              "upcast_attention", "act_fn", "norm_num_groups", "norm_eps", "flip_sin_to_cos",
              "freq_shift", "downsample_padding", "mid_block_scale_factor",
              "resnet_time_scale_shift", "only_cross_attention")
Shapes = Mapping[str, tuple[int, ...]]


def is_controlnet_checkpoint(shapes: Shapes) -> bool:
    """A single file holding a ControlNet: `cldm` hint-block keys or diffusers' names."""
    return any(key in shapes for key in (*CLDM_KEYS, DIFFUSERS_KEY))


def global_pool_beside(path: Path) -> bool:
    """Whether the `cldm` YAML beside a ControlNet file (the extension reads `NAME.yaml`) asks
    for global average pooling of the residuals (`global_average_pooling: True`: shuffle)."""
    try:
        text = path.with_suffix(".yaml").read_text("utf-8")
    except (OSError, UnicodeDecodeError):
        return False
    return re.search(r"^\s*global_average_pooling:\s*true\b", text, re.I | re.M) is not None


def convert_controlnet_file(checkpoint: Checkpoint, out_dir: Path, *,
                            global_pool: bool = False) -> dict[str, Any]:
    """Write `checkpoint`'s ControlNet as a diffusers folder at `out_dir`; returns its config
    (`global_pool`: its residuals are pooled, diffusers' global_pool_conditions)."""
    from safetensors.torch import save_file

    cldm = any(key in checkpoint.shapes for key in CLDM_KEYS)
    # an old full file also holds the SD model beside the `control_model.` tensors
    prefixed = CLDM_KEYS[1] in checkpoint.shapes
    keys = [key for key in checkpoint.shapes if not prefixed or key.startswith(CLDM_PREFIX)]
    state = _renamed(checkpoint.read(keys), checkpoint.shapes) if cldm else checkpoint.read(keys)
    config = controlnet_config({key: tuple(value.shape) for key, value in state.items()},
                               checkpoint.name)
    if global_pool:
        config["global_pool_conditions"] = True
    out_dir.mkdir(parents=True)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n",
                                         "utf-8")
    save_file({key: value.contiguous() for key, value in state.items()},
              str(out_dir / WEIGHTS_NAME))
    logger.info("%s: converted a %s ControlNet", checkpoint.name,
                "cldm (A1111)" if cldm else "diffusers-named")
    return config


def _renamed(state: Tensors, shapes: Shapes) -> Tensors:
    """`cldm` keys → diffusers' (its converter; every tensor must be placed)."""
    from diffusers.loaders.single_file_utils import (
        DIFFUSERS_TO_LDM_MAPPING,
        convert_controlnet_checkpoint,
    )

    plain = {key.removeprefix(CLDM_PREFIX): value for key, value in state.items()}
    layers = _cldm_layers_per_block(plain)
    converted = convert_controlnet_checkpoint(plain, {"layers_per_block": layers})
    for ours, theirs in DIFFUSERS_TO_LDM_MAPPING["controlnet"]["addition_embed_type"].items():
        if theirs in plain:  # SDXL's added embedding, which the converter leaves out
            converted[ours] = plain[theirs]
    converted = {key: value for key, value in converted.items() if value is not None}
    if len(converted) != len(plain):
        raise ModelError(f"ControlNet file: {len(plain)} tensors but {len(converted)} placed "
                         "by diffusers' converter (a layout it does not know)")
    return converted


def _cldm_layers_per_block(plain: Tensors) -> int:
    """Resnets per level: the first downsampler (`input_blocks.k.0.op`) sits at k = layers + 1."""
    ops = [int(m[1]) for key in plain if (m := re.fullmatch(r"input_blocks\.(\d+)\.0\.op\.weight",
                                                             key))]
    if not ops:
        raise ModelError("ControlNet file: no downsampler ('input_blocks.N.0.op.weight') in its "
                         "cldm keys: not a ControlNet layout sdrt reads")
    return min(ops) - 1


def controlnet_config(shapes: Shapes, name: str) -> dict[str, Any]:
    """A ControlNetModel config for diffusers-named weights of these shapes."""
    try:
        levels = 1 + max(int(m[1]) for key in shapes
                         if (m := re.match(r"down_blocks\.(\d+)\.", key)))
        widths = [shapes[f"down_blocks.{b}.resnets.0.conv1.weight"][0] for b in range(levels)]
        config = {
            "_class_name": CONTROLNET_CLASS,
            "in_channels": shapes["conv_in.weight"][1],
            "conditioning_channels": shapes[DIFFUSERS_KEY][1],
            "conditioning_embedding_out_channels": _hint_widths(shapes),
            "block_out_channels": widths,
            "layers_per_block": _count(shapes, r"down_blocks\.0\.resnets\.(\d+)\."),
            "down_block_types": [_down_type(shapes, b) for b in range(levels)],
            "transformer_layers_per_block": [
                _count(shapes, rf"down_blocks\.{b}\.attentions\.0\.transformer_blocks\.(\d+)\.")
                or 1 for b in range(levels)],
            "mid_block_type": ("UNetMidBlock2DCrossAttn" if _has(shapes, "mid_block.attentions.")
                               else "UNetMidBlock2D"),
            "cross_attention_dim": next(shape[1] for key, shape in shapes.items()
                                        if key.endswith("attn2.to_k.weight")),
            "use_linear_projection": any(len(shape) == 2 for key, shape in shapes.items()
                                         if key.endswith(".proj_in.weight")),
        }
    except (KeyError, StopIteration, ValueError) as exc:
        raise ModelError(f"'{name}': its ControlNet weights lack {exc}: not a ControlNet layout "
                         "sdrt reads") from exc
    if "add_embedding.linear_1.weight" in shapes:  # SDXL's pooled text + time ids
        config["addition_embed_type"] = "text_time"
        config["projection_class_embeddings_input_dim"] = shapes[
            "add_embedding.linear_1.weight"][1]
    base = _base_unet(config, name)
    return {**{key: base[key] for key in _FROM_BASE if key in base}, **config}


def _hint_widths(shapes: Shapes) -> list[int]:
    """The conditioning embedding's widths: conv_in's, then each stride-2 block's output."""
    blocks = _count(shapes, r"controlnet_cond_embedding\.blocks\.(\d+)\.")
    return [shapes[DIFFUSERS_KEY][0], *(
        shapes[f"controlnet_cond_embedding.blocks.{2 * i + 1}.weight"][0]
        for i in range(blocks // 2))]


def _down_type(shapes: Shapes, level: int) -> str:
    return ("CrossAttnDownBlock2D" if _has(shapes, f"down_blocks.{level}.attentions.")
            else "DownBlock2D")


def _has(shapes: Shapes, prefix: str) -> bool:
    return any(key.startswith(prefix) for key in shapes)


def _count(shapes: Shapes, pattern: str) -> int:
    """How many distinct indices the pattern's group takes among the keys."""
    return len({m[1] for key in shapes if (m := re.match(pattern, key))})


def _base_unet(config: dict[str, Any], name: str) -> dict[str, Any]:
    """The shipped UNet config of the ControlNet's widths and context (base models first)."""
    found = {}
    for folder in sorted(SHIPPED_CONFIGS.glob("*/unet/config.json")):
        unet = json.loads(folder.read_text("utf-8"))
        if (list(unet.get("block_out_channels", ())) == config["block_out_channels"]
                and unet.get("cross_attention_dim") == config["cross_attention_dim"]
                and (unet.get("addition_embed_type") == "text_time")
                == ("addition_embed_type" in config)):
            found[folder.parent.parent.name] = unet
    if not found:
        raise ModelError(f"'{name}': no shipped UNet config (models/configs/) has this "
                         f"ControlNet's widths {config['block_out_channels']} and cross-attention "
                         f"{config['cross_attention_dim']}, so its attention heads are unknown")
    order = sorted(found, key=lambda n: (BASE_CONFIGS.index(n) if n in BASE_CONFIGS
                                         else len(BASE_CONFIGS), n))
    return found[order[0]]
