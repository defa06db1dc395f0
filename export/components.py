"""The graphs every architecture shares: torch wrappers, I/O names, dummy inputs, loaders.

I/O names and meanings follow optimum's ONNX exporter: text_encoder `input_ids →
last_hidden_state, pooler_output`; unet `sample, timestep (rank-0 float), encoder_hidden_states
[, conditions] → out_sample`; vae_encoder `sample → latent_parameters` (mean ‖ logvar, the caller
samples); vae_decoder `latent_sample → sample` (post_quant_conv included). Which graphs a model
has, and the conditions its UNet takes, are its architecture's (sdrt.export.architectures); an
LCM UNet (time_cond_proj_dim) takes `timestep_cond` (B, time_cond_proj_dim) last, the
guidance-scale embedding, as optimum orders it. SD 1.x/2.x and SDXL UNets also take a
ControlNet's residuals last (`down_block_residual_0 … _{n-1}`, `mid_block_residual`: see
sdrt.runtime.control.residuals), added to the skip connections and the mid block's output as
diffusers' down_block_additional_residuals / mid_block_additional_residual; zeros without control.
Dummy sizes come from sdrt.export.shapes.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sdrt.export.shapes import Side, Sizes, text_lengths
from sdrt.export.source import SourceModel
from sdrt.runtime.components import GUIDANCE_INPUT
from sdrt.runtime.conditioning import HIDDEN_STATES
from sdrt.runtime.control.residuals import (
    residual_channels,
    residual_levels,
    residual_names,
    residual_shapes,
)
from sdrt.runtime.errors import ModelError, first_line

logger = logging.getLogger("sdrt.export")
Inputs = dict[str, torch.Tensor]
# Old checkpoints carry non-persistent buffers (CLIP's position_ids) that newer code rebuilds.
_IGNORED_UNEXPECTED = ("position_ids",)

SD_TEXT_OUTPUTS = ("last_hidden_state", "pooler_output")
UNET_INPUTS = ("sample", "timestep", "encoder_hidden_states")
_UNET_TIMESTEPS = (999.0, (981.0, 1.0))  # trace, checks: both ends of the schedule
# Dummy residuals' scale: a ControlNet's residuals are small next to the skip samples they are
# added to; non-zero so the checks prove the add path, small so the UNet's output stays in range.
RESIDUAL_SCALE = 0.1
# A UNet graph's extra inputs for (source, batch, latent side, generator), by name.
ConditionInputs = Callable[[SourceModel, int, Side, torch.Generator], Inputs]


class TextEncoderGraph(torch.nn.Module):
    """CLIPTextModel(WithProjection) → the named outputs (`hidden_states.N`: layer N's input)."""

    def __init__(self, model: torch.nn.Module,
                 outputs: tuple[str, ...] = SD_TEXT_OUTPUTS) -> None:
        super().__init__()
        self.model = model
        self.outputs = outputs

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
        hidden = any(name.startswith(HIDDEN_STATES) for name in self.outputs)
        out = self.model(input_ids=input_ids, output_hidden_states=hidden, return_dict=True)
        return tuple(out.hidden_states[int(name.removeprefix(HIDDEN_STATES))]
                     if name.startswith(HIDDEN_STATES) else getattr(out, name)
                     for name in self.outputs)


class UNetGraph(torch.nn.Module):
    """UNet2DConditionModel → out_sample (the noise/v prediction), fed the graph's extra inputs
    by name: those in `added` go to diffusers' added_cond_kwargs (SDXL's), `timestep_cond` to
    timestep_cond (LCM's); the last `residuals` inputs are a ControlNet's (downs, then mid)."""

    def __init__(self, model: torch.nn.Module, conditions: tuple[str, ...] = (),
                 added: tuple[str, ...] = (), residuals: int = 0) -> None:
        super().__init__()
        self.model = model
        self.conditions = conditions
        self.added = added
        self.residuals = residuals

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor,
                encoder_hidden_states: torch.Tensor, *conditions: torch.Tensor) -> torch.Tensor:
        split = len(conditions) - self.residuals
        named = dict(zip(self.conditions, conditions[:split], strict=True))
        added = {key: named[key] for key in self.added if key in named} or None
        control = {}
        if self.residuals:
            *downs, mid = conditions[split:]
            control = {"down_block_additional_residuals": tuple(downs),
                       "mid_block_additional_residual": mid}
        return self.model(sample, timestep, encoder_hidden_states,
                          timestep_cond=named.get(GUIDANCE_INPUT), added_cond_kwargs=added,
                          return_dict=False, **control)[0]


class VaeEncoderGraph(torch.nn.Module):
    """AutoencoderKL.encode → latent_parameters (the diagonal Gaussian's mean ‖ logvar)."""

    def __init__(self, vae: torch.nn.Module) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, sample: torch.Tensor) -> torch.Tensor:
        return self.vae.encode(sample).latent_dist.parameters


class VaeDecoderGraph(torch.nn.Module):
    """The VAE's decode → sample in [-1, 1] scale: AutoencoderKL's post_quant_conv + decoder,
    AutoencoderTiny's decoder on the UNet's latents as they are (export/tiny_vae.py)."""

    def __init__(self, vae: torch.nn.Module) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, latent_sample: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latent_sample, return_dict=False)[0]


@dataclass(frozen=True)
class GraphDef:
    """One exported graph: folder name, I/O names, dynamic axes and example-input makers."""

    name: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    dynamic_axes: dict[str, dict[int, str]]
    trace_inputs: Callable[[SourceModel], Inputs]
    check_inputs: Callable[[SourceModel], list[Inputs]]
    wrap: Callable[[torch.nn.Module], torch.nn.Module]  # the loaded model → the traced module



def generator() -> torch.Generator:
    return torch.Generator().manual_seed(0)  # fixed: checks must be reproducible


def with_inputs(graph: GraphDef, trace: Callable[[SourceModel], Inputs],
                check: Callable[[SourceModel], list[Inputs]]) -> GraphDef:
    """`graph` with other dummy inputs (the same names, axes and wrapper)."""
    return GraphDef(graph.name, graph.inputs, graph.outputs, graph.dynamic_axes, trace, check,
                    graph.wrap)


def _text_ids(config: dict[str, Any], batch: int, length: int, gen: torch.Generator) -> Inputs:
    """CLIP-like ids: bos, random tokens, eos, then eos padding, as SD 1.x's tokenizer writes."""
    # CLIP's vocabulary ends with <|startoftext|>, <|endoftext|>; SD 1.x configs often carry
    # legacy bos/eos ids (0, 2), so take the real ids from the vocabulary size instead.
    vocab = int(config["vocab_size"])
    bos, eos = vocab - 2, vocab - 1
    ids = torch.randint(0, bos, (batch, length), generator=gen)
    ids[:, 0] = bos
    for row in range(batch):
        end = min(1 + row * 3 + length // 3, length - 1)
        ids[row, end:] = eos
    return {"input_ids": ids}  # (B, L) int64


def text_graph(name: str, outputs: tuple[str, ...] = SD_TEXT_OUTPUTS) -> GraphDef:
    """A CLIP text encoder's graph (the source's config of the same name) → `outputs`, traced
    at its full length, checked at full length (batch 2) and a short prompt (batch 1)."""
    def ids(src: SourceModel, batch: int, full: bool) -> Inputs:
        config = getattr(src, name)
        lengths = text_lengths(config)
        return _text_ids(config, batch, lengths[0] if full else lengths[1], generator())

    axes = {out: {0: "batch_size"} if out in ("pooler_output", "text_embeds")
            else {0: "batch_size", 1: "sequence_length"} for out in outputs}
    return GraphDef(
        name, ("input_ids",), outputs,
        {"input_ids": {0: "batch_size", 1: "sequence_length"}, **axes},
        lambda s: ids(s, 2, True), lambda s: [ids(s, 2, True), ids(s, 1, False)],
        lambda model: TextEncoderGraph(model, outputs))


def guidance_inputs(src: SourceModel) -> tuple[str, ...]:
    """(`timestep_cond`,) for a UNet that takes the guidance scale as an input (LCM), else ()."""
    return (GUIDANCE_INPUT,) if src.unet.get("time_cond_proj_dim") is not None else ()


def unet_graph(sizes: Sizes, conditions: tuple[str, ...] = (),
               added: tuple[str, ...] = (),
               condition_inputs: ConditionInputs | None = None,
               levels: tuple[int, ...] = ()) -> GraphDef:
    """The UNet's graph: SD's three inputs, then `conditions` by name (`added` ones, made by
    `condition_inputs`, go to added_cond_kwargs; `timestep_cond` is LCM's), then, given the
    residuals' `levels` (control_levels), a ControlNet's residual inputs."""
    control = residual_names(len(levels) - 1) if levels else ()

    def feeds(s: SourceModel, batch: int, hw: Side, t: float) -> Inputs:
        gen = generator()
        text = s.text_encoder or s.text_encoder_2  # the SDXL refiner has the second alone
        inputs = {
            "sample": torch.randn(batch, s.unet["in_channels"], *hw, generator=gen),  # (B, C, h, w)
            "timestep": torch.tensor(t, dtype=torch.float32),  # rank 0, as optimum exports it
            "encoder_hidden_states": torch.randn(batch, text_lengths(text)[0],
                                                 s.unet["cross_attention_dim"], generator=gen),
        }
        if condition_inputs is not None:
            inputs.update(condition_inputs(s, batch, hw, gen))
        if GUIDANCE_INPUT in conditions:
            inputs[GUIDANCE_INPUT] = torch.randn(batch, s.unet["time_cond_proj_dim"],
                                                 generator=gen)  # (B, time_cond_proj_dim)
        if control:
            shapes = residual_shapes(levels, residual_channels(s.unet), batch, hw)
            inputs.update({name: torch.randn(*shape, generator=gen) * RESIDUAL_SCALE
                           for name, shape in shapes.items()})
        return inputs

    trace_t, check_t = _UNET_TIMESTEPS
    spatial = {0: "batch_size", 2: "height", 3: "width"}
    return GraphDef(
        "unet", (*UNET_INPUTS, *conditions, *control), ("out_sample",),
        {"sample": spatial, "encoder_hidden_states": {0: "batch_size", 1: "sequence_length"},
         **{name: {0: "batch_size"} for name in conditions},
         **{name: residual_axes(level) for name, level in zip(control, levels, strict=True)},
         "out_sample": spatial},
        lambda s: feeds(s, 2, sizes.trace, trace_t),
        lambda s: [feeds(s, b, hw, t) for (b, hw), t in zip(sizes.checks, check_t, strict=True)],
        lambda model: UNetGraph(model, conditions, added, len(control)))


def control_levels(src: SourceModel) -> tuple[int, ...]:
    """The levels of the ControlNet residuals `src`'s UNet takes (runtime.control.residuals)."""
    return residual_levels(src.unet)


def residual_axes(level: int) -> dict[int, str]:
    """A residual's dynamic axes: batch, and the latent sides halved `level` times."""
    if level == 0:
        return {0: "batch_size", 2: "height", 3: "width"}
    return {0: "batch_size", 2: f"height_{level}", 3: f"width_{level}"}


def vae_graphs(src: SourceModel, sizes: Sizes) -> dict[str, GraphDef]:
    """AutoencoderKL's encoder and decoder graphs, at the denoiser's latent sizes."""
    def latents(s: SourceModel, batch: int, hw: Side) -> Inputs:
        return {"latent_sample": torch.randn(batch, s.latent_channels, *hw,
                                             generator=generator())}

    def pixels(s: SourceModel, batch: int, hw: Side) -> Inputs:
        side = tuple(n * s.vae_scale_factor for n in hw)
        channels = s.vae.get("in_channels", 3)
        return {"sample": torch.rand(batch, channels, *side,
                                     generator=generator()) * 2 - 1}  # [-1, 1]

    pixel_axes = {0: "batch_size", 2: "height", 3: "width"}
    latent_axes = {0: "batch_size", 2: "height_latent", 3: "width_latent"}
    return {
        "vae_encoder": GraphDef(
            "vae_encoder", ("sample",), ("latent_parameters",),
            {"sample": pixel_axes, "latent_parameters": latent_axes},
            lambda s: pixels(s, 2, sizes.trace),
            lambda s: [pixels(s, b, hw) for b, hw in sizes.checks], VaeEncoderGraph),
        "vae_decoder": GraphDef(
            "vae_decoder", ("latent_sample",), ("sample",),
            {"latent_sample": latent_axes, "sample": pixel_axes},
            lambda s: latents(s, 2, sizes.trace),
            lambda s: [latents(s, b, hw) for b, hw in sizes.checks], VaeDecoderGraph),
    }


def load_text_encoder(folder: Path) -> torch.nn.Module:
    """CLIPTextModel in float32, failing on any missing, unexpected or mismatched weight."""
    from transformers import CLIPTextModel

    return load(CLIPTextModel, folder, folder.name)


def load_clip_with_projection(folder: Path) -> torch.nn.Module:
    """CLIPTextModelWithProjection (SDXL's and SD 3's encoders) in float32, failing on any
    mismatched weight."""
    from transformers import CLIPTextModelWithProjection

    return load(CLIPTextModelWithProjection, folder, folder.name)


def load_unet(folder: Path) -> torch.nn.Module:
    """UNet2DConditionModel in float32, failing on any missing, unexpected or mismatched weight."""
    from diffusers import UNet2DConditionModel

    return load(UNet2DConditionModel, folder, "unet")


def load_vae(folder: Path) -> torch.nn.Module:
    """AutoencoderKL in float32, failing on any missing, unexpected or mismatched weight."""
    from diffusers import AutoencoderKL

    return load(AutoencoderKL, folder, "vae")


def load_tiny_vae(folder: Path) -> torch.nn.Module:
    """AutoencoderTiny (TAESD) in float32, failing on any missing, unexpected or mismatched
    weight."""
    from diffusers import AutoencoderTiny

    return load(AutoencoderTiny, folder, "tiny VAE")


def load(cls: Any, folder: Path, name: str) -> torch.nn.Module:
    """`cls.from_pretrained(folder)` in float32, eval mode, no gradients; ModelError where a
    weight is missing, unexpected or mismatched."""
    kwargs: dict[str, Any] = {"torch_dtype": torch.float32, "output_loading_info": True}
    if cls.__module__.startswith("diffusers"):
        # diffusers' memory-saving load needs accelerate; say so up front instead of letting it
        # print a fallback notice (without it, loading briefly holds the weights twice).
        kwargs["low_cpu_mem_usage"] = importlib.util.find_spec("accelerate") is not None
    try:
        with _no_progress_bars():
            model, info = cls.from_pretrained(folder, **kwargs)
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise ModelError(f"cannot load {name}/ weights: {first_line(exc)}") from exc
    check_loading_info(info, name)
    return model.eval().requires_grad_(False)


@contextlib.contextmanager
def _no_progress_bars() -> Iterator[None]:
    """Silence transformers' weight-loading bar for one call; progress is the CLI's job."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def check_loading_info(info: dict[str, Any], name: str) -> None:
    """Fail loudly where a library would silently re-initialise weights (a missing weight is
    otherwise filled with random values and the export would look fine)."""
    problems = {
        "missing": sorted(info.get("missing_keys") or ()),
        "unexpected": sorted(key for key in info.get("unexpected_keys") or ()
                             if not key.endswith(_IGNORED_UNEXPECTED)),
        "mismatched": sorted(str(item[0] if isinstance(item, tuple) else item)
                             for item in info.get("mismatched_keys") or ()),
    }
    found = [f"{len(keys)} {kind} (e.g. '{keys[0]}')" for kind, keys in problems.items() if keys]
    if found:
        raise ModelError(f"{name}/ weights do not match its config: {', '.join(found)}; "
                         "refusing to export re-initialised weights")
    logger.debug("%s: all weights loaded", name)
