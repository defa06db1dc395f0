"""LoRA module names → the diffusers/transformers module paths of a model.

Files name the layer a LoRA changes in one of three ways:

- diffusers/PEFT: the module path itself, dotted (`down_blocks.0.attentions.0.proj_in`);
- kohya/A1111 in diffusers naming (SD 1.x/2.x LoRAs from sd-scripts): the same path with every
  `.` written `_` (`down_blocks_0_attentions_0_proj_in`), so `_` inside names (`to_q`,
  `time_emb_proj`) cannot be told from a separator;
- kohya/A1111 in LDM/SGM naming (SDXL LoRAs): the original Stable Diffusion UNet's layout
  (`input_blocks_4_1_proj_in`, `middle_block_1_…`, `output_blocks_…`; resnets' `in_layers_2`,
  `out_layers_3`, `emb_layers_1`, `skip_connection`).

Rather than parse underscores, every path the model knows is written in each form and looked up,
as A1111 matches kohya names against the loaded model's layers. The SGM form follows from the
UNet's own structure, which the known paths show: per down block its resnets (`layers_per_block`),
attentions and downsampler, per up block its resnets (`layers_per_block + 1`), attentions and
upsampler. SGM numbers `input_blocks` 1, 2, … over the down blocks' (resnet, attention) pairs and
downsamplers (0 is `conv_in`), `output_blocks` 0, 1, … over the up blocks' pairs, with an up
block's upsampler inside its last output block (after the attention, when there is one), and
`middle_block` 0/1/2 as resnet, attention, resnet.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable, Mapping

# CLIP's layers sit under `text_model.` in transformers 4 and SD checkpoints, not in transformers 5.
TEXT_MODEL = "text_model."
# Whole modules named otherwise in SGM (diffusers path → SGM path).
_SGM_MODULES = {
    "conv_in": "input_blocks.0.0", "conv_out": "out.2",
    "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
}
# A resnet's layers (diffusers ResnetBlock2D → SGM ResBlock: index in its Sequential).
_SGM_RESNET = {"conv1": "in_layers.2", "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1",
               "conv_shortcut": "skip_connection"}
# Layers inside a block part named otherwise: SGM's Downsample calls its conv `op`.
_SGM_INNER = {"resnets": _SGM_RESNET, "downsamplers": {"conv": "op"}}
_BLOCK_PART = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions|downsamplers|"
                         r"upsamplers)\.(\d+)$")
_MID_PART = {"mid_block.resnets.0": "middle_block.0", "mid_block.attentions.0": "middle_block.1",
             "mid_block.resnets.1": "middle_block.2"}


def module_paths(names: Iterable[str], known: Collection[str]) -> dict[str, str | None]:
    """Each LoRA module name (dotted, kohya's underscored, or SGM's) → the known module path it
    names, or None when the model has no such layer."""
    table = _lookup(known)
    return {name: table.get(_short(name)) for name in names}


def _short(name: str) -> str:
    """A name without CLIP's `text_model` level, in either spelling."""
    return name.removeprefix(TEXT_MODEL).removeprefix(TEXT_MODEL.replace(".", "_"))


def _lookup(known: Collection[str]) -> dict[str, str]:
    """Every spelling of every known path → the path."""
    sgm = sgm_prefixes(known)
    table = {}
    for path in known:
        short = _short(path)
        table[short] = path
        table[short.replace(".", "_")] = path
        sgm_path = _sgm_path(path, sgm)
        if sgm_path is not None:
            table[sgm_path.replace(".", "_")] = path
    return table


def _sgm_path(path: str, prefixes: Mapping[str, str]) -> str | None:
    if path in _SGM_MODULES:
        return _SGM_MODULES[path]
    parts = path.split(".")
    for size in (4, 3):  # `down_blocks.1.resnets.0…` or `mid_block.resnets.0…`
        head, rest = ".".join(parts[:size]), parts[size:]
        if head in prefixes:
            renames = _SGM_INNER.get(parts[size - 2], {})
            if rest:
                rest = [renames.get(rest[0], rest[0]), *rest[1:]]
            return ".".join([prefixes[head], *rest])
    return None


def sgm_prefixes(known: Iterable[str]) -> dict[str, str]:
    """diffusers block part (`down_blocks.1.attentions.0`, `up_blocks.0.upsamplers.0`) → its
    SGM name (`input_blocks.4.1`, `output_blocks.2.2`), from the parts `known` shows."""
    blocks: dict[tuple[str, int], dict[str, int]] = {}
    for path in known:
        match = _BLOCK_PART.match(".".join(path.split(".")[:4]))
        if match:
            kind, block, part, index = match.groups()
            counts = blocks.setdefault((kind, int(block)), {})
            counts[part] = max(counts.get(part, 0), int(index) + 1)
    prefixes = dict(_MID_PART)
    number = 1  # input_blocks.0 is conv_in
    for (kind, block), counts in sorted(blocks.items()):
        if kind != "down_blocks":
            continue
        for j in range(counts.get("resnets", 0)):
            prefixes[f"down_blocks.{block}.resnets.{j}"] = f"input_blocks.{number}.0"
            if counts.get("attentions"):
                prefixes[f"down_blocks.{block}.attentions.{j}"] = f"input_blocks.{number}.1"
            number += 1
        if counts.get("downsamplers"):
            prefixes[f"down_blocks.{block}.downsamplers.0"] = f"input_blocks.{number}.0"
            number += 1
    number = 0
    for (kind, block), counts in sorted(blocks.items()):
        if kind != "up_blocks":
            continue
        for j in range(counts.get("resnets", 0)):
            prefixes[f"up_blocks.{block}.resnets.{j}"] = f"output_blocks.{number}.0"
            if counts.get("attentions"):
                prefixes[f"up_blocks.{block}.attentions.{j}"] = f"output_blocks.{number}.1"
            number += 1
        if counts.get("upsamplers"):
            slot = 2 if counts.get("attentions") else 1
            prefixes[f"up_blocks.{block}.upsamplers.0"] = f"output_blocks.{number - 1}.{slot}"
    return prefixes
