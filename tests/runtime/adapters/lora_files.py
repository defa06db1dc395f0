"""LoRA files for the tests: random factors for named layers of the tiny models, in kohya's
layout (diffusers naming on SD, SGM naming on SDXL, both text encoders) and in PEFT's."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

RANK = 4

ATTN_PATH = "down_blocks.0.attentions.0.transformer_blocks.0"
ATTN = ATTN_PATH.replace(".", "_")
TE_LAYER = [(f"self_attn_{name}", 32, 32, None) for name in ("q_proj", "k_proj", "v_proj",
                                                              "out_proj")]
TE_LAYER += [("mlp_fc1", 37, 32, None), ("mlp_fc2", 32, 37, None)]
# tiny_sd layers a kohya LoRA (diffusers naming) changes: (name, out, in, conv kernel)
SD_KOHYA = [
    *[(f"lora_unet_{ATTN}_{name}", out, inp, None) for name, out, inp in (
        ("attn1_to_q", 32, 32), ("attn2_to_k", 32, 32), ("attn1_to_out_0", 32, 32),
        ("ff_net_0_proj", 256, 32), ("ff_net_2", 32, 128))],
    ("lora_unet_down_blocks_0_resnets_0_conv1", 32, 32, 3),  # LoCon: 3×3 down, 1×1 up
    ("lora_unet_down_blocks_0_resnets_1_time_emb_proj", 32, 128, None),
    ("lora_unet_up_blocks_1_resnets_0_conv_shortcut", 32, 96, 1),
    ("lora_unet_down_blocks_0_downsamplers_0_conv", 32, 32, 3),
    *[(f"lora_te_text_model_encoder_layers_0_{name}", *rest) for name, *rest in TE_LAYER],
]
# tiny_sdxl layers a kohya SDXL LoRA (SGM naming) changes
SDXL_SGM = [
    ("lora_unet_input_blocks_0_0", 32, 4, 3), ("lora_unet_time_embed_0", 128, 32, None),
    ("lora_unet_label_emb_0_0", 128, 80, None), ("lora_unet_label_emb_0_2", 128, 128, None),
    ("lora_unet_input_blocks_1_0_in_layers_2", 32, 32, 3),
    ("lora_unet_input_blocks_2_0_emb_layers_1", 32, 128, None),
    ("lora_unet_input_blocks_3_0_op", 32, 32, 3),
    ("lora_unet_input_blocks_4_0_skip_connection", 64, 32, 1),
    ("lora_unet_input_blocks_4_1_proj_in", 64, 64, None),
    ("lora_unet_input_blocks_5_1_transformer_blocks_1_attn2_to_k", 64, 64, None),
    ("lora_unet_middle_block_1_transformer_blocks_0_ff_net_2", 64, 256, None),
    ("lora_unet_middle_block_2_out_layers_3", 64, 64, 3),
    ("lora_unet_output_blocks_2_1_transformer_blocks_0_attn1_to_out_0", 64, 64, None),
    ("lora_unet_output_blocks_2_2_conv", 64, 64, 3),
    ("lora_unet_output_blocks_5_0_in_layers_2", 32, 64, 3), ("lora_unet_out_2", 4, 32, 3),
    *[(f"lora_te1_text_model_encoder_layers_0_{name}", *rest) for name, *rest in TE_LAYER],
    *[(f"lora_te2_text_model_encoder_layers_1_{name}", *rest) for name, *rest in TE_LAYER],
]
# tiny_sd layers a PEFT LoRA changes (diffusers reads PEFT text-encoder keys beside attention)
SD_PEFT = [
    *[(f"unet.{ATTN_PATH}.{name}", 32, 32, None)
      for name in ("attn2.to_k", "attn2.to_v", "attn1.to_out.0")],
    *[(f"text_encoder.text_model.encoder.layers.1.{name}", *rest)
      for name, *rest in (("self_attn.q_proj", 32, 32, None), ("mlp.fc1", 37, 32, None))],
]


def write_lora(path: Path, layers: list, *, peft: bool = False, seed: int = 0) -> Path:
    """Random factors for `layers`; kohya files carry an alpha of 2 (factor 1/2)."""
    rng = np.random.default_rng(seed)
    tensors = {}
    for name, out, inp, kernel in layers:
        down = (RANK, inp) if kernel is None else (RANK, inp, kernel, kernel)
        up = (out, RANK) if kernel is None else (out, RANK, 1, 1)
        down, up = (0.3 * rng.standard_normal(shape).astype(np.float32) for shape in (down, up))
        if peft:
            tensors |= {f"{name}.lora_A.weight": down, f"{name}.lora_B.weight": up}
        else:
            tensors |= {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up,
                        f"{name}.alpha": np.array(2.0, np.float32)}
    save_file(tensors, str(path))
    return path
