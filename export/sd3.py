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
the plain forward pass. The runtime also reads optimum's graphs, without that input.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from sdrt.export import components as comp
from sdrt.export.source import (
    COMPONENTS,
    SourceModel,
    _check_present,
    _check_tokenizer,
    _read_json,
    check_component_classes,
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


def read_sd3_source(root: Path, index: dict[str, Any], family: str | None) -> SourceModel:
    """Check an SD 3 diffusers folder's model_index.json and configs; ModelError if unfit.
    T5 is optional: model_index.json names text_encoder_3 null (diffusers runs without it)."""
    t5 = index.get("text_encoder_3") not in (None, [None, None])
    wanted = {**SD3_COMPONENTS, **(T5_COMPONENTS if t5 else {})}
    _check_present(root, wanted)
    configs = {name: _read_json(root, f"{name}/config.json")
               for name in ("transformer", "vae", "text_encoder", "text_encoder_2")}
    scheduler = _read_json(root, "scheduler/scheduler_config.json")
    t5_config = _read_json(root, "text_encoder_3/config.json") if t5 else None
    detected = detect_sd3_family(configs["transformer"], configs["vae"],
                                 configs["text_encoder"], configs["text_encoder_2"], t5_config,
                                 scheduler)
    check_component_classes(index, wanted)
    for tokenizer in ("tokenizer", "tokenizer_2"):
        _check_tokenizer(root, tokenizer)
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
    """sha256 over SD 3's config files (names and bytes), as source._config_hash does for SD."""
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

# Check sizes (latent sides, multiples of the patch size 2): a batch of 2 at the trace size's
# neighbour and one image at unequal odd patch counts (13 × 19 patches), so the dynamic axes and
# the cropped position grid are both exercised; (text length) 77 CLIP + 256 T5 and a shorter one.
CHECK_LATENTS = ((2, (32, 32)), (1, (26, 38)))
TRACE_LATENT = (24, 20)
CHECK_TEXT = (77 + T5_MAX_LENGTH, 100)


def _gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)  # fixed: checks must be reproducible


def _transformer_inputs(src: SourceModel, batch: int, hw: tuple[int, int], length: int,
                        t: float, skipped: tuple[int, ...]) -> comp.Inputs:
    config, gen = src.transformer, _gen()
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


def _transformer_graph() -> comp.GraphDef:
    inputs = ("hidden_states", "timestep", "encoder_hidden_states", "pooled_projections",
              SKIP_LAYERS)
    spatial = {0: "batch_size", 2: "height", 3: "width"}
    return comp.GraphDef(
        "transformer", inputs, (TRANSFORMER_OUTPUT,),
        {"hidden_states": spatial, "timestep": {0: "batch_size"},
         "encoder_hidden_states": {0: "batch_size", 1: "sequence_length"},
         "pooled_projections": {0: "batch_size"}, TRANSFORMER_OUTPUT: spatial},
        lambda s: _transformer_inputs(s, 2, TRACE_LATENT, CHECK_TEXT[1], 500.0, ()),
        lambda s: [_transformer_inputs(s, 2, CHECK_LATENTS[0][1], CHECK_TEXT[0], 1000.0, ()),
                   _transformer_inputs(s, 1, CHECK_LATENTS[1][1], CHECK_TEXT[1], 28.5,
                                       (int(s.transformer["num_layers"]) - 1,))],
        TransformerGraph)


def _t5_ids(config: dict[str, Any], batch: int, length: int) -> comp.Inputs:
    """T5-like ids: random pieces, `</s>` (id 1), then `<pad>` (id 0) padding."""
    ids = torch.randint(3, int(config["vocab_size"]), (batch, length), generator=_gen())
    for row in range(batch):
        end = min(length // 3 + row * 5, length - 1)
        ids[row, end] = 1
        ids[row, end + 1:] = 0
    return {"input_ids": ids}  # (B, L) int64


def _t5_graph() -> comp.GraphDef:
    return comp.GraphDef(
        "text_encoder_3", ("input_ids",), ("last_hidden_state",),
        {"input_ids": {0: "batch_size", 1: "sequence_length"},
         "last_hidden_state": {0: "batch_size", 1: "sequence_length"}},
        lambda s: _t5_ids(s.text_encoder_3, 2, T5_MAX_LENGTH),
        lambda s: [_t5_ids(s.text_encoder_3, 2, T5_MAX_LENGTH), _t5_ids(s.text_encoder_3, 1, 16)],
        lambda model: comp.TextEncoderGraph(model, ("last_hidden_state",)))


def _vae_graphs(src: SourceModel) -> dict[str, comp.GraphDef]:
    """SD's VAE graphs at the transformer's latent sizes (any side the VAE takes)."""
    def latents(batch: int, hw: tuple[int, int]) -> comp.Inputs:
        return {"latent_sample": torch.randn(batch, src.latent_channels, *hw, generator=_gen())}

    def pixels(batch: int, hw: tuple[int, int]) -> comp.Inputs:
        side = tuple(n * src.vae_scale_factor for n in hw)
        return {"sample": torch.rand(batch, 3, *side, generator=_gen()) * 2 - 1}  # [-1, 1]

    base = comp.GRAPHS
    return {
        "vae_encoder": _with_inputs(base["vae_encoder"], lambda s: pixels(2, TRACE_LATENT),
                                    lambda s: [pixels(b, hw) for b, hw in CHECK_LATENTS]),
        "vae_decoder": _with_inputs(base["vae_decoder"], lambda s: latents(2, TRACE_LATENT),
                                    lambda s: [latents(b, hw) for b, hw in CHECK_LATENTS]),
    }


def _with_inputs(graph: comp.GraphDef, trace: Callable, check: Callable) -> comp.GraphDef:
    return comp.GraphDef(graph.name, graph.inputs, graph.outputs, graph.dynamic_axes, trace,
                         check, graph.wrap)


def sd3_graphs(src: SourceModel) -> dict[str, comp.GraphDef]:
    """SD 3's graphs: two CLIP encoders with projection, T5 when present, MMDiT, VAE."""
    def clip(name: str) -> comp.GraphDef:
        config = getattr(src, name)
        return comp._text_graph(name, lambda s: getattr(s, name),
                               ("text_embeds", "last_hidden_state",
                                penultimate_output(config)))

    t5 = {"text_encoder_3": _t5_graph()} if src.text_encoder_3 is not None else {}
    return {"text_encoder": clip("text_encoder"), "text_encoder_2": clip("text_encoder_2"), **t5,
            "transformer": _transformer_graph(), **_vae_graphs(src)}


# ---------------------------------------------------------------- loading


def load_clip(folder: Path) -> torch.nn.Module:
    """A CLIPTextModelWithProjection in float32, failing on any mismatched weight."""
    from transformers import CLIPTextModelWithProjection

    return comp._load(CLIPTextModelWithProjection, folder, folder.name)


def load_t5(folder: Path) -> torch.nn.Module:
    """SD 3's T5EncoderModel in float32, failing on any mismatched weight."""
    from transformers import T5EncoderModel

    return comp._load(T5EncoderModel, folder, folder.name)


def load_transformer(folder: Path) -> torch.nn.Module:
    """SD3Transformer2DModel in float32, failing on any mismatched weight."""
    from diffusers import SD3Transformer2DModel

    return comp._load(SD3Transformer2DModel, folder, folder.name)


Step = tuple[str, Callable[[Path], torch.nn.Module], list[str]]


def export_plan(src: SourceModel) -> tuple[tuple[str, ...], list[Step]]:
    """(folders copied as they are, (source folder, loader, graphs) in export order)."""
    t5 = src.text_encoder_3 is not None
    copied = ("tokenizer", "tokenizer_2", *(("tokenizer_3",) if t5 else ()), "scheduler")
    steps: list[Step] = [
        ("text_encoder", load_clip, ["text_encoder"]),
        ("text_encoder_2", load_clip, ["text_encoder_2"]),
        *([("text_encoder_3", load_t5, ["text_encoder_3"])] if t5 else []),
        ("transformer", load_transformer, ["transformer"]),
        ("vae", comp.load_vae, ["vae_encoder", "vae_decoder"]),
    ]
    return copied, steps
