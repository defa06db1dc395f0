"""Export a tiny autoencoder (TAESD architecture, diffusers `AutoencoderTiny`) for `--vae`.

Source: a diffusers model folder (config.json with `_class_name` AutoencoderTiny and
diffusion_pytorch_model.safetensors, as madebyollin/taesd and taesdxl ship), local, from the hub
cache or by hub id (sdrt.export.sources). Output: vae_decoder/ (`latent_sample → sample`, the
latents as the UNet sees them → pixels in [-1, 1]) and vae_encoder/ (`sample → latent_sample`),
each model.onnx + config.json, and a manifest.json of format `sdrt-tiny-vae`
(sdrt.runtime.vae.tiny), checked against torch in ONNX Runtime like every sdrt export.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sdrt.export.components import GraphDef, Inputs, VaeDecoderGraph, load_tiny_vae
from sdrt.export.validate import check_graph, reference_outputs
from sdrt.runtime.errors import ModelError
from sdrt.runtime.model.manifest import ComponentSpec, scan_files, sha256_file
from sdrt.runtime.vae.tiny import DECODER, ENCODER, TinyVaeManifest

logger = logging.getLogger("sdrt.export")

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
_TRACE_LATENT = (9, 11)  # any side works (nearest ×2 upsampling, stride-2 convs): odd ones
_CHECKS = ((2, (32, 32)), (1, (25, 39)))  # a batch at a square side, one image at odd sides


@dataclass(frozen=True)
class TinyVaeSource:
    """A checked AutoencoderTiny folder: its config and the numbers the manifest records."""

    folder: Path
    config: dict[str, Any]

    @property
    def latent_channels(self) -> int:
        return int(self.config.get("latent_channels", 4))

    @property
    def vae_scale_factor(self) -> int:
        """Upsampling factor per decoder block boundary, to the power of the boundaries."""
        blocks = len(self.config["decoder_block_out_channels"])
        return int(self.config.get("upsampling_scaling_factor", 2)) ** (blocks - 1)


def read_tiny_source(folder: Path) -> TinyVaeSource:
    """Check the folder's config and weights (safetensors only); ModelError if unfit."""
    config = json.loads((folder / "config.json").read_text("utf-8"))
    for key in ("decoder_block_out_channels", "encoder_block_out_channels"):
        if not isinstance(config.get(key), list) or not config[key]:
            raise ModelError(f"'{folder.name}/config.json' has no {key} list")
    if not (folder / WEIGHTS_NAME).is_file():
        raise ModelError(f"'{folder.name}' has no {WEIGHTS_NAME}")
    return TinyVaeSource(folder, config)


class TinyEncoderGraph(torch.nn.Module):
    """AutoencoderTiny.encode: pixels in [-1, 1] → UNet-scale latents (no Gaussian)."""

    def __init__(self, vae: torch.nn.Module) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, sample: torch.Tensor) -> torch.Tensor:
        return self.vae.encode(sample, return_dict=False)[0]


def _latents(src: TinyVaeSource, batch: int, hw: tuple[int, int]) -> Inputs:
    gen = torch.Generator().manual_seed(0)  # fixed: checks must be reproducible
    return {"latent_sample": torch.randn(batch, src.latent_channels, *hw, generator=gen)}


def _pixels(src: TinyVaeSource, batch: int, hw: tuple[int, int]) -> Inputs:
    gen = torch.Generator().manual_seed(0)
    side = [n * src.vae_scale_factor for n in hw]
    return {"sample": torch.rand(batch, 3, *side, generator=gen) * 2 - 1}  # [-1, 1]


def tiny_graphs() -> dict[str, GraphDef]:
    """Both graphs, with optimum's VAE axes; the encoder returns a latent, not mean‖logvar."""
    latent_axes = {0: "batch_size", 2: "height_latent", 3: "width_latent"}
    pixel_axes = {0: "batch_size", 2: "height", 3: "width"}
    return {
        DECODER: GraphDef(
            DECODER, ("latent_sample",), ("sample",),
            {"latent_sample": latent_axes, "sample": pixel_axes},
            lambda s: _latents(s, 2, _TRACE_LATENT),
            lambda s: [_latents(s, b, hw) for b, hw in _CHECKS], VaeDecoderGraph),
        ENCODER: GraphDef(
            ENCODER, ("sample",), ("latent_sample",),
            {"sample": pixel_axes, "latent_sample": latent_axes},
            lambda s: _pixels(s, 2, _TRACE_LATENT),
            lambda s: [_pixels(s, b, hw) for b, hw in _CHECKS], TinyEncoderGraph),
    }


def write_tiny_vae(folder: Path, work: Path, *, opset: int, check: bool, threshold: int,
                   origin: Mapping[str, Any] | None, versions: dict[str, str]) -> None:
    """Export both graphs of the AutoencoderTiny in `folder` into `work`, with the manifest."""
    from sdrt.export.onnx_export import ONNX_WEIGHTS_NAME
    from sdrt.export.onnx_files import export_graph, graph_io

    src = read_tiny_source(folder)
    model = load_tiny_vae(folder)
    specs = {}
    for name, graph in tiny_graphs().items():
        module = graph.wrap(model).eval()
        path = work / name / ONNX_WEIGHTS_NAME
        export_graph(module, graph, graph.trace_inputs(src), path, opset=opset,
                     external_data_threshold=threshold)
        model.save_config(work / name)
        extra: dict[str, Any] = {}
        if check:  # the model is small: no need to free it before ONNX Runtime loads the graph
            cases = graph.check_inputs(src)
            extra["validation"] = check_graph(graph, path, cases,
                                              reference_outputs(module, graph, cases))
        inputs, outputs = graph_io(path)
        specs[name] = ComponentSpec(file=ONNX_WEIGHTS_NAME, inputs=inputs, outputs=outputs,
                                    extra=extra)
    source = dict(origin) if origin is not None else {"path": str(folder)}
    source["weights_sha256"] = sha256_file(folder / WEIGHTS_NAME)  # A1111's VAE hash source
    TinyVaeManifest(
        source=source, latent_channels=src.latent_channels,
        vae_scale_factor=src.vae_scale_factor,
        scaling_factor=float(src.config.get("scaling_factor", 1.0)),
        shift_factor=float(src.config.get("shift_factor") or 0.0), opset=opset,
        versions=versions, components=specs, files=scan_files(work),
    ).save(work)
