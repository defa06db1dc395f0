"""Attention one head at a time, so an exported UNet never holds every head's score tensor.

diffusers' default processors compute softmax(QKᵀ/√d) for all heads in one (B·heads, N, N)
tensor: at 512×512 the SD 1.5 UNet's first blocks have N = 4096 tokens and 8 heads, 537 MB per
image. `HeadChunkedAttention` loops over heads, whose count is fixed in the graph, so the export
stays dynamic in batch and resolution and each step holds one (B, N, N) score tensor, 1/heads of
it. (diffusers' SlicedAttnProcessor slices over batch·heads with a Python loop that tracing would
fix to the export's batch size.) Numerically it is the same attention, head by head.
"""

from __future__ import annotations

import torch

ATTENTION_MODES = ("full", "sliced")  # `sdrt export --attention`; the manifest records "sliced"


class HeadChunkedAttention:
    """diffusers attention processor (set with `unet.set_attn_processor`): heads one by one."""

    def __call__(self, attn, hidden_states: torch.Tensor,
                 encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 *args, **kwargs) -> torch.Tensor:
        if attention_mask is not None or attn.spatial_norm is not None:
            raise ValueError("sliced attention covers the SD UNets' attention (no mask, no "
                             "spatial norm)")
        residual = hidden_states
        four_d = hidden_states.ndim == 4
        if four_d:  # (B, C, H, W) → (B, HW, C)
            batch, channels, height, width = hidden_states.shape
            hidden_states = hidden_states.flatten(2).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        if encoder_hidden_states is not None and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        query, key, value = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
        width_per_head = query.shape[-1] // attn.heads
        outputs = []
        for head in range(attn.heads):  # (B, N, d) each; one (B, N, M) score tensor at a time
            cut = slice(head * width_per_head, (head + 1) * width_per_head)
            scores = torch.matmul(query[..., cut], key[..., cut].transpose(1, 2)) * attn.scale
            outputs.append(torch.matmul(scores.softmax(dim=-1), value[..., cut]))
        hidden_states = attn.to_out[1](attn.to_out[0](torch.cat(outputs, dim=-1)))
        if four_d:
            hidden_states = hidden_states.transpose(1, 2).reshape(batch, channels, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor
