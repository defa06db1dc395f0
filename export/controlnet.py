"""Export a ControlNet (Zhang et al. 2023, "Adding Conditional Control to Text-to-Image Diffusion
Models"; diffusers `ControlNetModel`) to a control folder for SD 1.x/2.x and SDXL models.

Source: a diffusers model folder (config.json with `_class_name` ControlNetModel and
diffusion_pytorch_model.safetensors, as lllyasviel/control_v11p_sd15_canny ships), local, from
the hub cache or by hub id, or an A1111 single file converted first (export/controlnet_file.py).
Output: controlnet/model.onnx (+ model.onnx_data when large) and config.json, and a manifest.json
of format `sdrt-controlnet` (sdrt.runtime.control.manifest). The graph `controlnet` takes
`sample (B, 4, h, w), timestep (rank-0 float), encoder_hidden_states (B, L, D), controlnet_cond
(B, 3, H, W) in [0, 1] [, text_embeds, time_ids]` (SDXL's added conditions) and returns the
residuals the UNet graph takes (`down_block_residual_0 …`, `mid_block_residual`) at
conditioning_scale 1, guess_mode False and without global pooling: scales, guess mode and the
pooling of `global_pool_conditions` ControlNets (shuffle) are the runtime's, in NumPy. Checked
against torch in ONNX Runtime like every sdrt export.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sdrt.export.components import GraphDef, Inputs, generator, load, residual_axes
from sdrt.export.shapes import Side, unet_sizes
from sdrt.export.validate import check_graph, reference_outputs
from sdrt.runtime.control.manifest import (
    CONTROLNET,
    ControlManifest,
    control_architecture,
    control_hash,
)
from sdrt.runtime.control.residuals import (
    residual_channels,
    residual_levels,
    residual_names,
)
from sdrt.runtime.errors import ModelError
from sdrt.runtime.model.manifest import ComponentSpec, scan_files, sha256_file

logger = logging.getLogger("sdrt.export")

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
ADDED_CONDITIONS = ("text_embeds", "time_ids")  # SDXL's added_cond_kwargs, in this order
TIME_IDS = 6  # SDXL's time ids: original size, crop top-left, target size
CONTEXT_LENGTH = 77  # CLIP's prompt length: the checks' context (its axis stays dynamic)
# The UNet sizes' helper reads a native latent side; ControlNet configs carry none. 32 is what it
# caps the square check at, so every family is checked at 32 (or its downsampling multiple).
_SAMPLE_SIDE = 32
_UNET_TIMESTEPS = (999.0, (981.0, 1.0))  # trace, checks: both ends of the schedule
_REQUIRED = ("down_block_types", "block_out_channels", "cross_attention_dim")


@dataclass(frozen=True)
class ControlNetSource:
    """A checked ControlNetModel folder: its config and the numbers the manifest records."""

    folder: Path
    config: dict[str, Any]

    @property
    def architecture(self) -> str:
        return control_architecture(self.config)

    @property
    def added(self) -> tuple[str, ...]:
        """The added conditions the graph takes (SDXL's), else ()."""
        return ADDED_CONDITIONS if self.architecture == "sdxl" else ()

    @property
    def cond_scale_factor(self) -> int:
        """Control image pixels per latent: the conditioning embedding's stride-2 convs."""
        channels = self.config.get("conditioning_embedding_out_channels", (16, 32, 96, 256))
        return 2 ** (len(channels) - 1)

    @property
    def text_embeds_dim(self) -> int:
        """SDXL's pooled text width: the added embedding's input less the time ids' part."""
        return (int(self.config["projection_class_embeddings_input_dim"])
                - TIME_IDS * int(self.config["addition_time_embed_dim"]))


def read_controlnet_source(folder: Path) -> ControlNetSource:
    """Check the folder's config and weights (safetensors only); ModelError if unfit."""
    try:
        config = json.loads((folder / "config.json").read_text("utf-8"))
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise ModelError(f"'{folder.name}/config.json' is not readable JSON") from exc
    missing = [key for key in _REQUIRED if key not in config]
    if missing:
        raise ModelError(f"'{folder.name}/config.json' has no {missing[0]}: not a ControlNet "
                         "config")
    if not (folder / WEIGHTS_NAME).is_file():
        raise ModelError(f"'{folder.name}' has no {WEIGHTS_NAME}")
    if config.get("addition_embed_type") not in (None, "text_time"):
        raise ModelError(f"'{folder.name}': ControlNets with addition_embed_type "
                         f"{config['addition_embed_type']!r} are not supported")
    return ControlNetSource(folder, config)


def load_controlnet(folder: Path) -> torch.nn.Module:
    """ControlNetModel in float32, failing on any missing, unexpected or mismatched weight."""
    from diffusers import ControlNetModel

    return load(ControlNetModel, folder, "ControlNet")


class ControlNetGraph(torch.nn.Module):
    """ControlNetModel → its residuals (downs, then mid) at conditioning scale 1, no guess mode;
    `added` names the inputs given to added_cond_kwargs (SDXL's text_embeds, time_ids)."""

    def __init__(self, model: torch.nn.Module, added: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.model = model
        self.added = added

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor,
                encoder_hidden_states: torch.Tensor, controlnet_cond: torch.Tensor,
                *added: torch.Tensor) -> tuple[torch.Tensor, ...]:
        kwargs = dict(zip(self.added, added, strict=True)) or None
        downs, mid = self.model(sample, timestep, encoder_hidden_states, controlnet_cond,
                                conditioning_scale=1.0, added_cond_kwargs=kwargs,
                                guess_mode=False, return_dict=False)
        return (*downs, mid)


def controlnet_graph(src: ControlNetSource) -> GraphDef:
    """The `controlnet` graph: inputs, residual outputs, axes, trace and check inputs."""
    levels = residual_levels(src.config)
    outputs = residual_names(len(levels) - 1)
    sizes = unet_sizes({**src.config, "sample_size": _SAMPLE_SIDE})
    spatial = {0: "batch_size", 2: "height", 3: "width"}
    trace_t, check_t = _UNET_TIMESTEPS
    return GraphDef(
        CONTROLNET, ("sample", "timestep", "encoder_hidden_states", "controlnet_cond",
                     *src.added), outputs,
        {"sample": spatial, "encoder_hidden_states": {0: "batch_size", 1: "sequence_length"},
         "controlnet_cond": {0: "batch_size", 2: "image_height", 3: "image_width"},
         **{name: {0: "batch_size"} for name in src.added},
         **{name: residual_axes(level) for name, level in zip(outputs, levels, strict=True)}},
        lambda s: control_inputs(s, 2, sizes.trace, trace_t),
        lambda s: [control_inputs(s, b, hw, t)
                   for (b, hw), t in zip(sizes.checks, check_t, strict=True)],
        lambda model: ControlNetGraph(model, src.added))


def control_inputs(src: ControlNetSource, batch: int, hw: Side, t: float) -> Inputs:
    """Random inputs at latent side `hw`: the control image at the pixels it maps to."""
    gen = generator()
    pixels = [side * src.cond_scale_factor for side in hw]
    inputs = {
        "sample": torch.randn(batch, int(src.config.get("in_channels", 4)), *hw, generator=gen),
        "timestep": torch.tensor(t, dtype=torch.float32),  # rank 0, as the UNet graph's
        "encoder_hidden_states": torch.randn(batch, CONTEXT_LENGTH,
                                             int(src.config["cross_attention_dim"]),
                                             generator=gen),
        "controlnet_cond": torch.rand(
            batch, int(src.config.get("conditioning_channels", 3)), *pixels, generator=gen),
    }
    if src.added:
        inputs["text_embeds"] = torch.randn(batch, src.text_embeds_dim, generator=gen)
        inputs["time_ids"] = torch.tensor([[*pixels, 0.0, 0.0, *pixels]] * batch,
                                          dtype=torch.float32)
    return inputs


def write_controlnet(folder: Path, work: Path, *, opset: int, check: bool, threshold: int,
                     origin: Mapping[str, Any] | None, versions: dict[str, str]) -> None:
    """Export the ControlNetModel in `folder` into `work`: its graph, config and manifest."""
    from sdrt.export.onnx_export import ONNX_WEIGHTS_NAME
    from sdrt.export.onnx_files import export_graph, graph_io

    src = read_controlnet_source(folder)
    model = load_controlnet(folder)
    if src.config.get("global_pool_conditions"):
        model.register_to_config(global_pool_conditions=False)  # pooled by the runtime
    graph = controlnet_graph(src)
    module = graph.wrap(model).eval()
    path = work / CONTROLNET / ONNX_WEIGHTS_NAME
    export_graph(module, graph, graph.trace_inputs(src), path, opset=opset,
                 external_data_threshold=threshold)
    config = {key: value for key, value in src.config.items() if key != "_name_or_path"}
    (path.parent / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n",
                                             "utf-8")
    extra: dict[str, Any] = {}
    if check:
        cases = graph.check_inputs(src)
        expected = reference_outputs(module, graph, cases)
        del module, model  # weights freed before ONNX Runtime loads the graph
        extra["validation"] = check_graph(graph, path, cases, expected)
    if path.with_name(path.name + "_data").exists():
        extra["external_data"] = path.name + "_data"
    inputs, outputs = graph_io(path)
    spec = ComponentSpec(file=ONNX_WEIGHTS_NAME, inputs=inputs, outputs=outputs, extra=extra)
    _manifest(src, spec, work, opset=opset, origin=origin, versions=versions).save(work)


def _manifest(src: ControlNetSource, spec: ComponentSpec, work: Path, *, opset: int,
              origin: Mapping[str, Any] | None, versions: dict[str, str]) -> ControlManifest:
    """The control folder's manifest; `origin` may carry a single file's name, sha256, hash."""
    origin = dict(origin) if origin is not None else {"path": str(src.folder)}
    weights = src.folder / WEIGHTS_NAME
    short = origin.pop("hash", None) or control_hash(weights)
    origin.setdefault("weights_sha256", origin.get("sha256") or sha256_file(weights))
    name = (Path(origin["file"]).stem if "file" in origin
            else str(origin["hub_id"]).rsplit("/", 1)[-1] if "hub_id" in origin
            else src.folder.name)
    return ControlManifest(
        name=name, architecture=src.architecture,
        cross_attention_dim=int(src.config["cross_attention_dim"]),
        conditioning_channels=int(src.config.get("conditioning_channels", 3)),
        global_pool_conditions=bool(src.config.get("global_pool_conditions", False)),
        residual_channels=residual_channels(src.config), source=origin, hash=short, opset=opset,
        versions=versions, components={CONTROLNET: spec}, files=scan_files(work),
    )
