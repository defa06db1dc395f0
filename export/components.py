"""The graphs of optimum's SD/SDXL ONNX layout: torch wrappers, I/O names, example inputs.

I/O names and meanings follow optimum's exporter (research/users.md §3.2, peers.md §1):
text_encoder `input_ids → last_hidden_state, pooler_output`; unet `sample, timestep (rank-0
float), encoder_hidden_states → out_sample`; vae_encoder `sample → latent_parameters` (mean ‖
logvar, the caller samples); vae_decoder `latent_sample → sample` (post_quant_conv included).

SDXL adds text_encoder_2 `input_ids → text_embeds, last_hidden_state` and the UNet inputs
`text_embeds` (B, projection_dim) and `time_ids` (B, 6); an LCM UNet (time_cond_proj_dim) adds
`timestep_cond` (B, time_cond_proj_dim), the guidance-scale embedding. optimum exports every
`hidden_states.N` of both encoders; SDXL reads only the penultimate one (`hidden_states[-2]`,
index num_hidden_layers − 1), so sdrt exports that one alone under optimum's name: 33 outputs
of OpenCLIP bigG would only add graph outputs nobody reads. The SDXL refiner has no text_encoder
and its `time_ids` are (B, 5): size, crop and aesthetic score (optimum's refiner export).
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

from sdrt.export.source import SourceModel
from sdrt.runtime.components import GUIDANCE_INPUT
from sdrt.runtime.conditioning import HIDDEN_STATES, penultimate_output
from sdrt.runtime.errors import ModelError, first_line

logger = logging.getLogger("sdrt.export")
Inputs = dict[str, torch.Tensor]
# Old checkpoints carry non-persistent buffers (CLIP's position_ids) that newer code rebuilds.
_IGNORED_UNEXPECTED = ("position_ids",)


SD_TEXT_OUTPUTS = ("last_hidden_state", "pooler_output")
SDXL_UNET_INPUTS = ("text_embeds", "time_ids")
REFINER_AESTHETIC_SCORE = 6.0  # diffusers' default aesthetic_score, for the example time ids


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
    by name: SDXL's text_embeds and time_ids, LCM's timestep_cond."""

    def __init__(self, model: torch.nn.Module, conditions: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.model = model
        self.conditions = conditions

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor,
                encoder_hidden_states: torch.Tensor, *conditions: torch.Tensor) -> torch.Tensor:
        named = dict(zip(self.conditions, conditions, strict=True))
        added = {key: named[key] for key in SDXL_UNET_INPUTS if key in named} or None
        return self.model(sample, timestep, encoder_hidden_states,
                          timestep_cond=named.get(GUIDANCE_INPUT), added_cond_kwargs=added,
                          return_dict=False)[0]


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


def _gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)  # fixed: checks must be reproducible


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


def _max_length(config: dict[str, Any]) -> int:
    return int(config.get("max_position_embeddings", 77))


def _odd_latent(src: SourceModel) -> tuple[int, int]:
    # Tracing at latent sides that are not multiples of the UNet's downsampling factor makes
    # diffusers take its general upsample path (interpolate to the skip connection's size), so
    # one graph serves every size, e.g. 520 px → latent 65 on SD 1.5 (as diffusers torch does).
    factor = src.unet_up_factor
    return 2 * factor + 1, 2 * factor + 3


def _unet_inputs(src: SourceModel, batch: int, hw: tuple[int, int], t: float,
                 gen: torch.Generator) -> Inputs:
    channels, dim = src.unet["in_channels"], src.unet["cross_attention_dim"]
    feeds = {
        "sample": torch.randn(batch, channels, *hw, generator=gen),  # (B, 4, h, w)
        "timestep": torch.tensor(t, dtype=torch.float32),  # rank 0, as optimum exports it
        "encoder_hidden_states": torch.randn(
            batch, _max_length(src.text_encoder or src.text_encoder_2), dim, generator=gen),
    }
    if src.text_encoder_2 is not None:
        pixels = [side * src.vae_scale_factor for side in hw]
        feeds["text_embeds"] = torch.randn(batch, src.text_encoder_2["projection_dim"],
                                           generator=gen)  # (B, P)
        # (B, 6): original size, crop top-left, target size, as diffusers' _get_add_time_ids;
        # the refiner's (B, 5) end with an aesthetic score instead of the target size.
        last = [REFINER_AESTHETIC_SCORE] if src.text_encoder is None else pixels
        feeds["time_ids"] = torch.tensor([[*pixels, 0.0, 0.0, *last]] * batch)
    if src.unet.get("time_cond_proj_dim") is not None:
        feeds[GUIDANCE_INPUT] = torch.randn(batch, src.unet["time_cond_proj_dim"],
                                            generator=gen)  # (B, time_cond_proj_dim)
    return feeds


def _latents(src: SourceModel, batch: int, hw: tuple[int, int], gen: torch.Generator) -> Inputs:
    return {"latent_sample": torch.randn(batch, src.latent_channels, *hw, generator=gen)}


def _pixels(src: SourceModel, batch: int, hw: tuple[int, int], gen: torch.Generator) -> Inputs:
    side = tuple(n * src.vae_scale_factor for n in hw)
    channels = src.vae.get("in_channels", 3)
    return {"sample": torch.rand(batch, channels, *side, generator=gen) * 2 - 1}  # [-1, 1]


# Check sizes (latent): a square batch of 2, and batch 1 at odd sides (25×39 latent; 50×78 px on
# the tiny model, 200×312 px on SD 1.5), so dynamic axes and the general upsample path are both
# exercised; small enough that checking a full SD 1.5 UNet takes seconds, not minutes.
CHECK_LATENTS = ((2, (32, 32)), (1, (25, 39)))

def _text_graph(name: str, config_of: Callable[[SourceModel], dict[str, Any]],
                outputs: tuple[str, ...]) -> GraphDef:
    def ids(src: SourceModel, batch: int, length: int) -> Inputs:
        return _text_ids(config_of(src), batch, length, _gen())

    def full(src: SourceModel) -> int:
        return _max_length(config_of(src))

    axes = {out: {0: "batch_size"} if out in ("pooler_output", "text_embeds")
            else {0: "batch_size", 1: "sequence_length"} for out in outputs}
    return GraphDef(
        name, ("input_ids",), outputs,
        {"input_ids": {0: "batch_size", 1: "sequence_length"}, **axes},
        lambda s: ids(s, 2, full(s)),
        lambda s: [ids(s, 2, full(s)), ids(s, 1, min(16, full(s)))],
        lambda model: TextEncoderGraph(model, outputs))


def _unet_graph(extra: tuple[str, ...] = ()) -> GraphDef:
    return GraphDef(
        "unet", ("sample", "timestep", "encoder_hidden_states", *extra), ("out_sample",),
        {"sample": {0: "batch_size", 2: "height", 3: "width"},
         "encoder_hidden_states": {0: "batch_size", 1: "sequence_length"},
         **{name: {0: "batch_size"} for name in extra},
         "out_sample": {0: "batch_size", 2: "height", 3: "width"}},
        lambda s: _unet_inputs(s, 2, _odd_latent(s), 999.0, _gen()),
        lambda s: [_unet_inputs(s, b, hw, t, _gen())
                   for (b, hw), t in zip(CHECK_LATENTS, (981.0, 1.0), strict=True)],
        lambda model: UNetGraph(model, extra))


GRAPHS: dict[str, GraphDef] = {
    "text_encoder": _text_graph("text_encoder", lambda s: s.text_encoder, SD_TEXT_OUTPUTS),
    "unet": _unet_graph(),
    "vae_encoder": GraphDef(
        "vae_encoder", ("sample",), ("latent_parameters",),
        {"sample": {0: "batch_size", 2: "height", 3: "width"},
         "latent_parameters": {0: "batch_size", 2: "height_latent", 3: "width_latent"}},
        lambda s: _pixels(s, 2, _odd_latent(s), _gen()),
        lambda s: [_pixels(s, b, hw, _gen()) for b, hw in CHECK_LATENTS],
        VaeEncoderGraph),
    "vae_decoder": GraphDef(
        "vae_decoder", ("latent_sample",), ("sample",),
        {"latent_sample": {0: "batch_size", 2: "height_latent", 3: "width_latent"},
         "sample": {0: "batch_size", 2: "height", 3: "width"}},
        lambda s: _latents(s, 2, _odd_latent(s), _gen()),
        lambda s: [_latents(s, b, hw, _gen()) for b, hw in CHECK_LATENTS],
        VaeDecoderGraph),
}


def graphs_for(src: SourceModel) -> dict[str, GraphDef]:
    """The graphs to export for `src`: SD's four, or SDXL's five with the added conditions (the
    refiner's four: no first text encoder); a UNet with time_cond_proj_dim (LCM) takes
    `timestep_cond` last, as optimum orders it."""
    if src.transformer is not None:  # SD 3: sdrt.export.sd3
        from sdrt.export.sd3 import sd3_graphs

        return sd3_graphs(src)
    guidance = (GUIDANCE_INPUT,) if src.unet.get("time_cond_proj_dim") is not None else ()
    if src.text_encoder_2 is None:
        return {**GRAPHS, "unet": _unet_graph(guidance)} if guidance else GRAPHS
    second = _text_graph("text_encoder_2", lambda s: s.text_encoder_2,
                         ("text_embeds", "last_hidden_state",
                          penultimate_output(src.text_encoder_2)))
    if src.text_encoder is None:  # the SDXL refiner: the second encoder alone
        rest = {name: graph for name, graph in GRAPHS.items() if name != "text_encoder"}
        return {"text_encoder_2": second, **rest, "unet": _unet_graph(SDXL_UNET_INPUTS)}
    return {
        **GRAPHS,
        "text_encoder": _text_graph("text_encoder", lambda s: s.text_encoder,
                                    (*SD_TEXT_OUTPUTS, penultimate_output(src.text_encoder))),
        "text_encoder_2": second,
        "unet": _unet_graph((*SDXL_UNET_INPUTS, *guidance)),
    }


def load_text_encoder(folder: Path) -> torch.nn.Module:
    """CLIPTextModel in float32, failing on any missing, unexpected or mismatched weight."""
    from transformers import CLIPTextModel

    return _load(CLIPTextModel, folder, "text_encoder")


def load_text_encoder_2(folder: Path) -> torch.nn.Module:
    """SDXL's CLIPTextModelWithProjection in float32, failing on any mismatched weight."""
    from transformers import CLIPTextModelWithProjection

    return _load(CLIPTextModelWithProjection, folder, "text_encoder_2")


def load_unet(folder: Path) -> torch.nn.Module:
    """UNet2DConditionModel in float32, failing on any missing, unexpected or mismatched weight."""
    from diffusers import UNet2DConditionModel

    return _load(UNet2DConditionModel, folder, "unet")


def load_vae(folder: Path) -> torch.nn.Module:
    """AutoencoderKL in float32, failing on any missing, unexpected or mismatched weight."""
    from diffusers import AutoencoderKL

    return _load(AutoencoderKL, folder, "vae")


def load_tiny_vae(folder: Path) -> torch.nn.Module:
    """AutoencoderTiny (TAESD) in float32, failing on any missing, unexpected or mismatched
    weight."""
    from diffusers import AutoencoderTiny

    return _load(AutoencoderTiny, folder, "tiny VAE")


def _load(cls: Any, folder: Path, name: str) -> torch.nn.Module:
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
    """Fail loudly where a library would silently re-initialise weights (DESIGN.md pitfall)."""
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
