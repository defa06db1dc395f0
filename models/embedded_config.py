"""The embedded model's architecture and noise schedule: the diffusers and transformers configs of
its VAE, UNet and CLIP text encoder (latent diffusion, Rombach et al. 2022, at 64×64 with 4×16×16
latents) and of its DDIM scheduler, and the fresh models built from them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel

MAX_LENGTH = 77  # CLIP's positions, as SD's text encoder has them
IMAGE_SIZE = 64

VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 3,
    "up_block_types": ("UpDecoderBlock2D",) * 3,
    "block_out_channels": (16, 32, 64),  # three blocks: 64×64 -> 16×16 latents
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 8,  # ≥ 2 channels a group, so a flat colour is not normalised away
    "sample_size": IMAGE_SIZE,
    "mid_block_add_attention": False,  # a 4× slower step for nothing these scenes need
}
UNET_CONFIG: dict[str, Any] = {
    "sample_size": IMAGE_SIZE // 4,
    "in_channels": 4,
    "out_channels": 4,
    # Cross-attention at 8×8 and 4×4 (and the mid block) only: self-attention over 16×16 tokens
    # was most of the step time, and positions on a 3×3 grid need no finer map.
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "block_out_channels": (32, 64, 64),
    "layers_per_block": 1,
    "cross_attention_dim": 64,
    "attention_head_dim": 4,  # diffusers' name for the number of heads
    "norm_num_groups": 16,
}
TEXT_CONFIG: dict[str, Any] = {
    "vocab_size": 49408,  # the real CLIP BPE vocabulary, so sdrt's tokenizer ids fit
    "hidden_size": 64,
    "intermediate_size": 256,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "max_position_embeddings": MAX_LENGTH,
    "hidden_act": "quick_gelu",
    "projection_dim": 64,
    "bos_token_id": 49406,
    "eos_token_id": 49407,
    "pad_token_id": 49407,
}
# DDPM's linear betas (Ho et al. 2020) end at alpha_bar ≈ 4e-5: at 16×16 latents SD's
# scaled_linear schedule would leave the mean colour visible at t = 999 (Lin et al. 2024), which
# the sampler's pure noise lacks. "trailing" spacing starts sampling at t = 999.
SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "prediction_type": "v_prediction",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,  # only "leading" spacing reads it; StableDiffusionPipeline wants 1
    "timestep_spacing": "trailing",
}
BETAS = {"linear": (0.0001, 0.02), "scaled_linear": (0.00085, 0.012)}  # DDPM's and SD's


def scheduler_config(beta_schedule: str, prediction_type: str) -> dict[str, Any]:
    """The shipped DDIM config with DDPM's linear or SD's scaled_linear betas."""
    start, end = BETAS[beta_schedule]
    return {**SCHEDULER_CONFIG, "beta_schedule": beta_schedule, "beta_start": start,
            "beta_end": end, "prediction_type": prediction_type}


def build_models(unet_channels: Sequence[int]) -> tuple[AutoencoderKL, UNet2DConditionModel]:
    """Fresh VAE and UNet from the module's configs (the text encoder is built in phase 3)."""
    vae = AutoencoderKL(**VAE_CONFIG)
    unet = UNet2DConditionModel(**{**UNET_CONFIG, "block_out_channels": tuple(unet_channels)})
    return vae, unet


def parameter_count(module: torch.nn.Module) -> int:
    """Number of parameters."""
    return sum(p.numel() for p in module.parameters())
