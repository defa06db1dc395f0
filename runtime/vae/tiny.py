"""A tiny autoencoder (TAESD architecture, diffusers `AutoencoderTiny`) in place of a model's VAE.

TAESD (madebyollin/taesd) is a few plain conv blocks: its decoder reads the latents exactly as the
UNet sees them and returns images in [-1, 1]; its encoder writes such latents (config
`scaling_factor` 1.0, `shift_factor` 0), at a few GFLOPs per 512² image instead of the
full decoder's ~1.2 TMAC. `sdrt export` of an AutoencoderTiny folder writes `vae_decoder/`
(`latent_sample → sample`), `vae_encoder/` (`sample → latent_sample`: a latent, no Gaussian)
and a manifest.json of format `sdrt-tiny-vae` (keys: format, format_version, source {path or hub_id,
revision?, weights_sha256}, latent_channels, vae_scale_factor, scaling_factor, shift_factor,
opset, versions, components, files), read here. Stdlib and the runtime's sessions only.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sdrt.runtime.components import VaeDecoder
from sdrt.runtime.errors import ModelError
from sdrt.runtime.metadata import AUTOV2_HEX_CHARS
from sdrt.runtime.model.manifest import (
    MANIFEST_NAME,
    ComponentSpec,
    FileEntry,
    file_problem,
    read_manifest_json,
)
from sdrt.runtime.session import Session

TINY_VAE_FORMAT = "sdrt-tiny-vae"
TINY_VAE_FORMAT_VERSION = 1
DECODER, ENCODER = "vae_decoder", "vae_encoder"  # the encoder is optional
TINY_VAE_CLASS = "AutoencoderTiny"  # diffusers' class name in a source folder's config.json


def is_tiny_vae_folder(folder: Path) -> bool:
    """A diffusers model folder whose config.json names AutoencoderTiny (export's source)."""
    config = _json_or_none(folder / "config.json")
    return isinstance(config, dict) and config.get("_class_name") == TINY_VAE_CLASS


def is_tiny_vae_export(folder: Path) -> bool:
    """A folder whose manifest.json says it is an exported tiny autoencoder."""
    manifest = _json_or_none(folder / MANIFEST_NAME)
    return isinstance(manifest, dict) and manifest.get("format") == TINY_VAE_FORMAT


def _json_or_none(path: Path) -> Any:
    try:
        return json.loads(path.read_text("utf-8"))
    except (OSError, ValueError, UnicodeDecodeError, RecursionError):
        return None


@dataclass(frozen=True)
class TinyVaeManifest:
    """manifest.json of an exported tiny autoencoder folder."""

    source: dict[str, Any]
    latent_channels: int
    vae_scale_factor: int
    scaling_factor: float
    shift_factor: float
    opset: int
    versions: dict[str, str]
    components: dict[str, ComponentSpec]
    files: dict[str, FileEntry]
    format_version: int = TINY_VAE_FORMAT_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        """What A1111's `VAE` key shows: the hub id, else the source folder's name."""
        return str(self.source.get("hub_id") or Path(str(self.source.get("path", "vae"))).name)

    @property
    def autov2_hash(self) -> str:
        """A1111's `VAE hash` (AutoV2): 10 hex digits of the source weights' sha256."""
        return str(self.source["weights_sha256"])[:AUTOV2_HEX_CHARS]

    def to_json(self) -> dict[str, Any]:
        return {
            "format": TINY_VAE_FORMAT, "format_version": self.format_version,
            "source": self.source, "latent_channels": self.latent_channels,
            "vae_scale_factor": self.vae_scale_factor, "scaling_factor": self.scaling_factor,
            "shift_factor": self.shift_factor, "opset": self.opset, "versions": self.versions,
            "components": {name: spec.to_json() for name, spec in self.components.items()},
            "files": {path: entry.to_json() for path, entry in sorted(self.files.items())},
            **self.extra,
        }

    def save(self, folder: str | os.PathLike[str]) -> Path:
        """Validate, then write `folder/manifest.json`."""
        self.validate()
        path = Path(folder) / MANIFEST_NAME
        path.write_text(json.dumps(self.to_json(), indent=2) + "\n", "utf-8")
        return path

    @classmethod
    def load(cls, folder: str | os.PathLike[str]) -> TinyVaeManifest:
        """Read and validate `folder/manifest.json`; ModelError if it is not a tiny VAE's."""
        data = read_manifest_json(folder, ": export an AutoencoderTiny folder with `sdrt "
                                          "export` first")
        if not isinstance(data, dict) or data.get("format") != TINY_VAE_FORMAT:
            found = data.get("format") if isinstance(data, dict) else None
            raise ModelError(f"'{Path(folder).name}' is not a tiny autoencoder folder "
                             f"(manifest format {found!r}, expected {TINY_VAE_FORMAT!r})")
        return cls.from_json(data)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TinyVaeManifest:
        known = ("source", "latent_channels", "vae_scale_factor", "scaling_factor",
                 "shift_factor", "opset", "versions", "components", "files")
        missing = [key for key in known if key not in data]
        _expect(not missing, f"missing key '{missing[0]}'" if missing else "")
        _expect(isinstance(data["components"], dict) and isinstance(data["files"], dict),
                "'components' and 'files' must be objects")
        _expect(isinstance(data.get("format_version"), int)
                and data["format_version"] <= TINY_VAE_FORMAT_VERSION,
                f"format_version {data.get('format_version')!r} is not one this sdrt reads")
        return cls(
            **{key: data[key] for key in known if key not in ("components", "files")},
            components={name: ComponentSpec.from_json(spec, f"components.{name}")
                        for name, spec in data["components"].items()},
            files={rel: FileEntry(sha256=entry["sha256"], bytes=entry["bytes"])
                   for rel, entry in data["files"].items()},
            format_version=data["format_version"],
            extra={k: v for k, v in data.items() if k not in (*known, "format", "format_version")},
        ).validate()

    def validate(self) -> TinyVaeManifest:
        """Check what the runtime relies on; returns self, raises a one-line ModelError."""
        for key in ("latent_channels", "vae_scale_factor", "opset"):
            value = getattr(self, key)
            _expect(isinstance(value, int) and not isinstance(value, bool) and value > 0,
                    f"'{key}' must be a positive integer, got {value!r}")
        for key in ("scaling_factor", "shift_factor"):
            value = getattr(self, key)
            _expect(isinstance(value, int | float) and math.isfinite(value),
                    f"'{key}' must be a number, got {value!r}")
        _expect(isinstance(self.source, dict) and isinstance(self.source.get("weights_sha256"),
                                                             str),
                "'source' must be an object with the weights' 'weights_sha256'")
        _expect(DECODER in self.components, f"component '{DECODER}' is missing")
        unknown = sorted(set(self.components) - {DECODER, ENCODER})
        _expect(not unknown, f"unknown component '{unknown[0]}'" if unknown else "")
        for name, spec in self.components.items():
            rel = f"{name}/{spec.file}"
            _expect(isinstance(spec.file, str) and "/" not in spec.file and ".." not in spec.file,
                    f"components.{name}.file must be a file name in {name}/")
            _expect(rel in self.files, f"components.{name}.file '{rel}' is not listed in 'files'")
        return self


def _expect(condition: bool, message: str) -> None:
    if not condition:
        raise ModelError(f"tiny VAE {MANIFEST_NAME}: {message}")


@dataclass(frozen=True)
class TinyVae:
    """An opened tiny autoencoder: its decoder, and its encoder's opener where it has one."""

    folder: Path
    manifest: TinyVaeManifest
    decoder: VaeDecoder
    open_encoder: Callable[[], Session] | None  # the pipeline opens it on first use

    @property
    def scaling_factor(self) -> float:
        """UNet latents ÷ this, + shift_factor, are what the decoder reads (1 and 0 for TAESD)."""
        return float(self.manifest.scaling_factor)

    @property
    def shift_factor(self) -> float:
        return float(self.manifest.shift_factor)


def open_tiny_vae(folder: str | os.PathLike[str], session: Callable[[Path], Session], *,
                  latent_channels: int, vae_scale_factor: int) -> TinyVae:
    """Open an exported tiny autoencoder for a model with these latents; `session(path)` opens
    one graph. A latent or scale mismatch is a one-line ModelError."""
    root = Path(folder)
    if not root.is_dir():
        raise ModelError(f"VAE folder '{root}' does not exist or is not a folder")
    manifest = TinyVaeManifest.load(root)
    if manifest.latent_channels != latent_channels:
        raise ModelError(f"VAE '{manifest.name}' reads {manifest.latent_channels} latent "
                         f"channels, the model's UNet makes {latent_channels}")
    if manifest.vae_scale_factor != vae_scale_factor:
        raise ModelError(f"VAE '{manifest.name}' scales latents by {manifest.vae_scale_factor}, "
                         f"the model's VAE by {vae_scale_factor}")
    for rel, entry in manifest.files.items():  # sizes only: hashing is `sdrt check`'s job
        problem = file_problem(root, rel, entry, hashes=False)
        if problem:
            raise ModelError(problem)
    decoder = VaeDecoder(session(root / DECODER / manifest.components[DECODER].file))
    encoder = manifest.components.get(ENCODER)
    open_encoder = None if encoder is None else (
        lambda: session(root / ENCODER / encoder.file))
    return TinyVae(root, manifest, decoder, open_encoder)
