"""SD 3 (Esser et al., 2024, "Scaling Rectified Flow Transformers") in optimum's SD 3 ONNX layout.

Graphs, with optimum's names: text_encoder (CLIP ViT-L) and text_encoder_2 (OpenCLIP bigG), both
CLIPTextModelWithProjection, `input_ids → text_embeds, last_hidden_state, hidden_states.{N-1}`
(SD 3 reads the penultimate state and the pooled projection, as SDXL does); text_encoder_3, the
optional T5 v1.1 encoder, `input_ids → last_hidden_state`; transformer (the MMDiT)
`hidden_states (B, C, h, w), timestep (B,) float, encoder_hidden_states (B, L,
joint_attention_dim), pooled_projections (B, P) → out_hidden_states` (the velocity); vae_encoder
and vae_decoder as SD's (SD 3's VAE has no quant convs; its shift_factor goes to the manifest).

sdrt's transformer graph takes one input more than optimum's: `skip_layers` (num_layers,) float,
1 where a joint block is skipped, so skip-layer guidance (diffusers' `skip_guidance_layers`)
runs from the same graph; each block's outputs are chosen per layer, and a mask of zeros gives
the plain forward pass. The runtime also reads optimum's graphs, without that input. Latent
sizes stay within the transformer's pos_embed_max_size (sdrt.export.shapes).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch

from sdrt.export.architectures.base import VAE_STEP, Architecture, Step
from sdrt.export.components import (
    GraphDef,
    Inputs,
    TextEncoderGraph,
    generator,
    load,
    load_clip_with_projection,
    text_graph,
    vae_graphs,
)
from sdrt.export.shapes import Side, Sizes, text_lengths, transformer_sizes
from sdrt.export.source import (
    COMPONENTS,
    SourceModel,
    check_component_classes,
    check_present,
    check_tokenizer,
    read_json,
)
from sdrt.runtime.conditioning import penultimate_output
from sdrt.runtime.errors import ModelError
from sdrt.runtime.model.families import check_override, detect_sd3_family
from sdrt.runtime.sd3 import SKIP_LAYERS, T5_MAX_LENGTH

# component → (library, allowed classes), as model_index.json names them
SD3_COMPONENTS: dict[str, tuple[str, frozenset[str]]] = {
    "transformer": ("diffusers", frozenset({"SD3Transformer2DModel"})),
    "vae": COMPONENTS["vae"],
    "text_encoder": ("transformers", frozenset({"CLIPTextModelWithProjection"})),
    "text_encoder_2": ("transformers", frozenset({"CLIPTextModelWithProjection"})),
    "tokenizer": COMPONENTS["tokenizer"],
    "tokenizer_2": COMPONENTS["tokenizer"],
}
T5_COMPONENTS: dict[str, tuple[str, frozenset[str]]] = {
    "text_encoder_3": ("transformers", frozenset({"T5EncoderModel"})),
    "tokenizer_3": ("transformers", frozenset({"T5TokenizerFast", "T5Tokenizer"})),
}
CONFIG_FILES = ("model_index.json", "transformer/config.json", "vae/config.json",
                "text_encoder/config.json", "text_encoder_2/config.json",
                "scheduler/scheduler_config.json")
TRANSFORMER_OUTPUT = "out_hidden_states"
FLOW_PREDICTION = "flow_prediction"  # SD 3's velocity (diffusers' name for it)
_CLIP_OUTPUTS = ("text_embeds", "last_hidden_state")  # then the penultimate state
_TIMESTEPS = (500.0, (1000.0, 28.5))  # trace, checks: both ends of the flow's schedule


def read_sd3_source(root: Path, index: dict[str, Any], family: str | None) -> SourceModel:
    """Check an SD 3 diffusers folder's model_index.json and configs; ModelError if unfit.
    T5 is optional: model_index.json names text_encoder_3 null (diffusers runs without it)."""
    t5 = index.get("text_encoder_3") not in (None, [None, None])
    wanted = {**SD3_COMPONENTS, **(T5_COMPONENTS if t5 else {})}
    check_present(root, wanted)
    configs = {name: read_json(root, f"{name}/config.json")
               for name in ("transformer", "vae", "text_encoder", "text_encoder_2")}
    scheduler = read_json(root, "scheduler/scheduler_config.json")
    t5_config = read_json(root, "text_encoder_3/config.json") if t5 else None
    detected = detect_sd3_family(configs["transformer"], configs["vae"],
                                 configs["text_encoder"], configs["text_encoder_2"], t5_config,
                                 scheduler)
    check_component_classes(index, wanted)
    for tokenizer in ("tokenizer", "tokenizer_2"):
        check_tokenizer(root, tokenizer)
    if t5 and not (root / "tokenizer_3" / "tokenizer.json").is_file():
        raise ModelError(f"model folder '{root.name}' is incomplete: tokenizer_3/tokenizer.json "
                         "(T5's fast tokenizer) is missing")
    return SourceModel(
        folder=root, model_index=index, unet={}, vae=configs["vae"],
        text_encoder=configs["text_encoder"], scheduler=scheduler,
        family=detected if family is None else check_override(detected, family),
        config_sha256=config_hash(root, t5), text_encoder_2=configs["text_encoder_2"],
        transformer=configs["transformer"], text_encoder_3=t5_config)


def config_hash(root: Path, t5: bool) -> str:
    """sha256 over SD 3's config files (names and bytes), as sdrt.export.source does for SD."""
    digest = hashlib.sha256()
    for rel in (*CONFIG_FILES, *(("text_encoder_3/config.json",) if t5 else ())):
        digest.update(rel.encode() + b"\0" + (root / rel).read_bytes() + b"\0")
    return digest.hexdigest()


# ---------------------------------------------------------------- torch modules


class _SkipMask:
    """Holds the traced `skip_layers` tensor while the graph's forward runs."""

    mask: torch.Tensor | None = None


class _SkippableBlock(torch.nn.Module):
    """A JointTransformerBlock whose outputs are its inputs where skip_layers[index] is 1."""

    def __init__(self, block: torch.nn.Module, index: int, holder: _SkipMask) -> None:
        super().__init__()
        self.block, self.index, self.holder = block, index, holder

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                temb: torch.Tensor, joint_attention_kwargs: Any = None):
        context, hidden = self.block(hidden_states=hidden_states,
                                     encoder_hidden_states=encoder_hidden_states, temb=temb,
                                     joint_attention_kwargs=joint_attention_kwargs)
        skip = self.holder.mask[self.index] > 0.5  # rank-0 bool
        hidden = torch.where(skip, hidden_states, hidden)
        if context is not None:  # the last block (context_pre_only) returns no context
            context = torch.where(skip, encoder_hidden_states, context)
        return context, hidden


class TransformerGraph(torch.nn.Module):
    """SD3Transformer2DModel → out_hidden_states, its joint blocks skippable by a mask input."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.holder = _SkipMask()
        model.transformer_blocks = torch.nn.ModuleList(
            _SkippableBlock(block, i, self.holder) for i, block in
            enumerate(model.transformer_blocks))
        self.model = model

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor,
                encoder_hidden_states: torch.Tensor, pooled_projections: torch.Tensor,
                skip_layers: torch.Tensor) -> torch.Tensor:
        self.holder.mask = skip_layers
        try:
            return self.model(hidden_states=hidden_states, timestep=timestep,
                              encoder_hidden_states=encoder_hidden_states,
                              pooled_projections=pooled_projections, return_dict=False)[0]
        finally:
            self.holder.mask = None


# ---------------------------------------------------------------- graph definitions


def _context_lengths(src: SourceModel) -> tuple[int, int]:
    """(full, short) joint context lengths: CLIP's tokens then T5's 256 (zeros without T5, as
    the runtime feeds them), and a shorter one."""
    clip = text_lengths(src.text_encoder)[0]
    return clip + T5_MAX_LENGTH, min(100, clip + T5_MAX_LENGTH)


def _transformer_inputs(src: SourceModel, batch: int, hw: Side, length: int,
                        t: float, skipped: tuple[int, ...]) -> Inputs:
    config, gen = src.transformer, generator()
    skip = torch.zeros(int(config["num_layers"]))
    skip[list(skipped)] = 1.0
    return {
        "hidden_states": torch.randn(batch, config["in_channels"], *hw, generator=gen),
        "timestep": torch.full((batch,), t),  # (B,) float, as optimum exports it
        "encoder_hidden_states": torch.randn(batch, length, config["joint_attention_dim"],
                                             generator=gen),
        "pooled_projections": torch.randn(batch, config["pooled_projection_dim"], generator=gen),
        SKIP_LAYERS: skip,  # (num_layers,)
    }


def _transformer_graph(sizes: Sizes) -> GraphDef:
    """Traced at a short context; checked at the full one (batch 2, no skips) and at an odd
    patch grid with the last joint block skipped (batch 1)."""
    def checks(s: SourceModel) -> list[Inputs]:
        (big, square), (one, odd) = sizes.checks
        full, short = _context_lengths(s)
        last = int(s.transformer["num_layers"]) - 1
        return [_transformer_inputs(s, big, square, full, check_t[0], ()),
                _transformer_inputs(s, one, odd, short, check_t[1], (last,))]

    trace_t, check_t = _TIMESTEPS
    inputs = ("hidden_states", "timestep", "encoder_hidden_states", "pooled_projections",
              SKIP_LAYERS)
    spatial = {0: "batch_size", 2: "height", 3: "width"}
    return GraphDef(
        "transformer", inputs, (TRANSFORMER_OUTPUT,),
        {"hidden_states": spatial, "timestep": {0: "batch_size"},
         "encoder_hidden_states": {0: "batch_size", 1: "sequence_length"},
         "pooled_projections": {0: "batch_size"}, TRANSFORMER_OUTPUT: spatial},
        lambda s: _transformer_inputs(s, 2, sizes.trace, _context_lengths(s)[1], trace_t, ()),
        checks, TransformerGraph)


def _t5_ids(config: dict[str, Any], batch: int, length: int) -> Inputs:
    """T5-like ids: random pieces, `</s>` (id 1), then `<pad>` (id 0) padding."""
    ids = torch.randint(3, int(config["vocab_size"]), (batch, length), generator=generator())
    for row in range(batch):
        end = min(length // 3 + row * 5, length - 1)
        ids[row, end] = 1
        ids[row, end + 1:] = 0
    return {"input_ids": ids}  # (B, L) int64


def _t5_graph() -> GraphDef:
    """T5 at the runtime's 256 tokens (it has relative positions: no length limit) and 16."""
    return GraphDef(
        "text_encoder_3", ("input_ids",), ("last_hidden_state",),
        {"input_ids": {0: "batch_size", 1: "sequence_length"},
         "last_hidden_state": {0: "batch_size", 1: "sequence_length"}},
        lambda s: _t5_ids(s.text_encoder_3, 2, T5_MAX_LENGTH),
        lambda s: [_t5_ids(s.text_encoder_3, 2, T5_MAX_LENGTH), _t5_ids(s.text_encoder_3, 1, 16)],
        lambda model: TextEncoderGraph(model, ("last_hidden_state",)))


# ---------------------------------------------------------------- loading


def load_t5(folder: Path) -> torch.nn.Module:
    """SD 3's T5EncoderModel in float32, failing on any mismatched weight."""
    from transformers import T5EncoderModel

    return load(T5EncoderModel, folder, folder.name)


def load_transformer(folder: Path) -> torch.nn.Module:
    """SD3Transformer2DModel in float32, failing on any mismatched weight."""
    from diffusers import SD3Transformer2DModel

    return load(SD3Transformer2DModel, folder, folder.name)


class StableDiffusion3(Architecture):
    """SD 3: two CLIP encoders with projection, T5 when the folder has it, the MMDiT, the VAE."""

    names = ("sd3",)
    denoiser = "transformer"

    def copied(self, src: SourceModel) -> tuple[str, ...]:
        t5 = src.text_encoder_3 is not None
        return ("tokenizer", "tokenizer_2", *(("tokenizer_3",) if t5 else ()), "scheduler")

    def steps(self, src: SourceModel) -> tuple[Step, ...]:
        t5 = src.text_encoder_3 is not None
        return (Step("text_encoder", load_clip_with_projection, ("text_encoder",)),
                Step("text_encoder_2", load_clip_with_projection, ("text_encoder_2",)),
                *((Step("text_encoder_3", load_t5, ("text_encoder_3",)),) if t5 else ()),
                Step("transformer", load_transformer, ("transformer",)), VAE_STEP)

    def graphs(self, src: SourceModel) -> dict[str, GraphDef]:
        sizes = transformer_sizes(src.transformer)
        clip = {name: text_graph(name, (*_CLIP_OUTPUTS, penultimate_output(getattr(src, name))))
                for name in ("text_encoder", "text_encoder_2")}
        t5 = {"text_encoder_3": _t5_graph()} if src.text_encoder_3 is not None else {}
        return {**clip, **t5, "transformer": _transformer_graph(sizes),
                **vae_graphs(src, sizes)}

    def prediction_type(self, src: SourceModel) -> str:
        return FLOW_PREDICTION
