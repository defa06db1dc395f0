"""A model folder on disk: which graph files it holds and the numbers the pipeline needs.

The numbers and the model family come from `manifest.json` when sdrt exported the folder, else
from the component `config.json` files that optimum writes (diffusers layout, research/users.md
§3.1–3.2).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from sdrt.runtime.errors import ModelError
from sdrt.runtime.families import Family, detect_family, get_family
from sdrt.runtime.manifest import MANIFEST_NAME, Manifest

COMPONENTS = ("text_encoder", "unet", "vae_decoder")
GRAPH_FILES = {"ort": ("model.onnx",), "openvino": ("openvino_model.xml", "model.onnx")}


@dataclass(frozen=True)
class ModelFacts:
    """What the pipeline must know about a model besides its graphs."""

    name: str
    family: Family
    scaling_factor: float
    latent_channels: int
    vae_scale_factor: int
    sample_size: int
    unet_sha256: str | None

    @property
    def default_size(self) -> int:
        """Native image side in pixels (diffusers: unet sample_size × VAE scale factor)."""
        return self.sample_size * self.vae_scale_factor


def check_folder(folder: Path) -> None:
    """Refuse a path that is not a model folder, naming what is missing."""
    if not folder.is_dir():
        raise ModelError(f"model folder '{folder}' does not exist or is not a folder")
    if not (folder / "model_index.json").is_file():
        raise ModelError(f"'{folder}' is not a model folder: model_index.json is missing")
    for name in (*COMPONENTS, "tokenizer", "scheduler"):
        if not (folder / name).is_dir():
            raise ModelError(f"model folder '{folder.name}' is incomplete: '{name}/' is missing")


def graph_file(folder: Path, component: str, backend: str) -> Path:
    """The graph file of one component the backend can read (OpenVINO IR preferred there)."""
    for name in GRAPH_FILES[backend]:
        path = folder / component / name
        if path.is_file():
            return path
    wanted = " or ".join(GRAPH_FILES[backend])
    raise ModelError(f"model folder '{folder.name}' is incomplete: {component}/{wanted} is missing")


def read_facts(folder: Path) -> ModelFacts:
    """Facts from manifest.json, or from the component configs when there is no manifest."""
    if (folder / MANIFEST_NAME).is_file():
        manifest = Manifest.load(folder)
        unet_file = manifest.files.get("unet/model.onnx")
        return ModelFacts(
            name=folder.resolve().name,
            family=get_family(manifest.family),
            scaling_factor=manifest.scaling_factor,
            latent_channels=manifest.latent_channels,
            vae_scale_factor=manifest.vae_scale_factor,
            sample_size=manifest.sample_size,
            unet_sha256=unet_file.sha256 if unet_file else None,
        )
    vae = _read_json(folder / "vae_decoder" / "config.json")
    unet = _read_json(folder / "unet" / "config.json")
    family = detect_family(_read_json(folder / "model_index.json"), unet, vae,
                           _read_json(folder / "text_encoder" / "config.json"),
                           _read_json(folder / "scheduler" / "scheduler_config.json"))
    return ModelFacts(
        name=folder.resolve().name,
        family=get_family(family),
        scaling_factor=float(vae.get("scaling_factor", 0.18215)),
        latent_channels=int(vae.get("latent_channels", 4)),
        vae_scale_factor=2 ** (len(vae.get("block_out_channels", [0] * 4)) - 1),
        sample_size=int(unet.get("sample_size", 64)),
        unet_sha256=None,
    )


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text("utf-8"))
    except FileNotFoundError as exc:
        raise ModelError(f"'{path.parent.name}/{path.name}' is missing") from exc
    except (ValueError, UnicodeDecodeError) as exc:
        raise ModelError(f"'{path.parent.name}/{path.name}' is not valid JSON: {exc}") from exc
