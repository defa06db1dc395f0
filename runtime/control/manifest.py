"""manifest.json of an exported ControlNet folder (format `sdrt-controlnet`, read here).

`sdrt export` of a diffusers ControlNetModel (a folder, a hub id, or an A1111 single file) writes
`controlnet/model.onnx` (+ `model.onnx_data` when large) with the model's `config.json`, and this
manifest. Keys (format_version 1): format, format_version, name (the source's stem), architecture
("sd1" | "sd2" | "sdxl"), cross_attention_dim, conditioning_channels, global_pool_conditions,
residual_channels (the graph outputs' channels, downs then mid), source {path | hub_id,
revision?, weights_sha256}, hash (the ControlNet extension's model hash: the first 8 hex digits of
the sha256 of the 64 KiB at offset 1 MiB of the source weights file, A1111's old `model_hash`;
titles read "name [hash]"), opset, versions, components {"controlnet": ComponentSpec}, files,
variants (as a model folder's, see sdrt.runtime.model.manifest; `sdrt quantize` adds them, fp32
is implicit). Unknown keys are kept in `extra` and written back. Stdlib only.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sdrt.runtime.errors import ModelError
from sdrt.runtime.model.manifest import (
    MANIFEST_NAME,
    ComponentSpec,
    FileEntry,
    file_problem,
    read_manifest_json,
    write_manifest_json,
)

CONTROL_FORMAT = "sdrt-controlnet"
CONTROL_FORMAT_VERSION = 1
CONTROLNET = "controlnet"  # the one component (graph folder) of a control folder
ARCHITECTURES = ("sd1", "sd2", "sdxl")
CONTROLNET_CLASS = "ControlNetModel"  # diffusers' class name in a source folder's config.json
_HASH_OFFSET, _HASH_BYTES, _HASH_CHARS = 0x100000, 0x10000, 8  # A1111's old model_hash
_KNOWN = ("name", "architecture", "cross_attention_dim", "conditioning_channels",
          "global_pool_conditions", "residual_channels", "source", "hash", "opset", "versions",
          "components", "files")


def is_controlnet_folder(folder: str | os.PathLike[str]) -> bool:
    """A diffusers model folder whose config.json names ControlNetModel (export's source)."""
    try:
        config = json.loads((Path(folder) / "config.json").read_text("utf-8"))
    except (OSError, ValueError, UnicodeDecodeError, RecursionError):
        return False
    return isinstance(config, dict) and config.get("_class_name") == CONTROLNET_CLASS


def is_control_export(folder: str | os.PathLike[str]) -> bool:
    """A folder whose manifest.json says it is an exported ControlNet."""
    try:
        manifest = json.loads((Path(folder) / MANIFEST_NAME).read_text("utf-8"))
    except (OSError, ValueError, UnicodeDecodeError, RecursionError):
        return False
    return isinstance(manifest, dict) and manifest.get("format") == CONTROL_FORMAT


def control_hash(path: str | os.PathLike[str]) -> str:
    """The ControlNet extension's model hash of a weights file (A1111's old `model_hash`)."""
    try:
        with open(path, "rb") as handle:
            handle.seek(_HASH_OFFSET)
            return hashlib.sha256(handle.read(_HASH_BYTES)).hexdigest()[:_HASH_CHARS]
    except OSError as exc:
        raise ModelError(f"cannot hash {path}: {exc.strerror or exc}") from None


def control_architecture(config: dict[str, Any]) -> str:
    """sd1, sd2 or sdxl from a diffusers ControlNetModel config (SDXL's adds text_time)."""
    if config.get("addition_embed_type") == "text_time":
        return "sdxl"
    return "sd2" if config.get("cross_attention_dim") == 1024 else "sd1"


@dataclass(frozen=True)
class ControlManifest:
    """manifest.json of an exported ControlNet folder."""

    name: str
    architecture: str
    cross_attention_dim: int
    conditioning_channels: int
    global_pool_conditions: bool
    residual_channels: tuple[int, ...]
    source: dict[str, Any]
    hash: str
    opset: int
    versions: dict[str, str]
    components: dict[str, ComponentSpec]
    files: dict[str, FileEntry]
    variants: list[dict[str, Any]] = field(default_factory=list)
    format_version: int = CONTROL_FORMAT_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def title(self) -> str:
        """The ControlNet extension's model title: "name [hash]"."""
        return f"{self.name} [{self.hash}]"

    def graph_path(self, folder: str | os.PathLike[str]) -> Path:
        """The fp32 ControlNet graph inside `folder`."""
        return Path(folder) / CONTROLNET / self.components[CONTROLNET].file

    def to_json(self) -> dict[str, Any]:
        return {
            "format": CONTROL_FORMAT, "format_version": self.format_version, "name": self.name,
            "architecture": self.architecture, "cross_attention_dim": self.cross_attention_dim,
            "conditioning_channels": self.conditioning_channels,
            "global_pool_conditions": self.global_pool_conditions,
            "residual_channels": list(self.residual_channels), "source": self.source,
            "hash": self.hash, "opset": self.opset, "versions": self.versions,
            "components": {name: spec.to_json() for name, spec in self.components.items()},
            "files": {path: entry.to_json() for path, entry in sorted(self.files.items())},
            "variants": self.variants, **self.extra,
        }

    def save(self, folder: str | os.PathLike[str]) -> Path:
        """Validate, then write `folder/manifest.json` via a temporary file and os.replace."""
        self.validate()
        return write_manifest_json(folder, self.to_json())

    @classmethod
    def load(cls, folder: str | os.PathLike[str], *, check_files: bool = True) -> ControlManifest:
        """Read and validate `folder/manifest.json` (and, unless told not to, that every listed
        file is there at its size); ModelError in one line if it is not a control folder."""
        data = read_manifest_json(folder, ": export a ControlNet with `sdrt export` first")
        if not isinstance(data, dict) or data.get("format") != CONTROL_FORMAT:
            found = data.get("format") if isinstance(data, dict) else None
            raise ModelError(f"'{Path(folder).name}' is not a ControlNet folder "
                             f"(manifest format {found!r}, expected {CONTROL_FORMAT!r})")
        manifest = cls.from_json(data)
        if check_files:
            manifest.verify_files(folder, hashes=False)
        return manifest

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ControlManifest:
        missing = [key for key in _KNOWN if key not in data]
        _expect(not missing, f"missing key '{missing[0]}'" if missing else "")
        _expect(isinstance(data["components"], dict) and isinstance(data["files"], dict),
                "'components' and 'files' must be objects")
        _expect(isinstance(data["residual_channels"], list), "'residual_channels' must be a list")
        version = data.get("format_version")
        _expect(isinstance(version, int) and version <= CONTROL_FORMAT_VERSION,
                f"format_version {version!r} is not one this sdrt reads")
        files = {}
        for rel, entry in data["files"].items():
            _expect(isinstance(entry, dict) and isinstance(entry.get("sha256"), str)
                    and _is_int(entry.get("bytes")), f"files entry {rel!r} needs sha256 and bytes")
            files[rel] = FileEntry(sha256=entry["sha256"], bytes=entry["bytes"])
        plain = ("components", "files", "residual_channels")
        return cls(
            **{key: data[key] for key in _KNOWN if key not in plain},
            residual_channels=tuple(data["residual_channels"]),
            components={name: ComponentSpec.from_json(spec, f"components.{name}")
                        for name, spec in data["components"].items()},
            files=files, variants=data.get("variants", []), format_version=version,
            extra={k: v for k, v in data.items()
                   if k not in (*_KNOWN, "format", "format_version", "variants")},
        ).validate()

    def validate(self) -> ControlManifest:
        """Check what the runtime relies on; returns self, raises a one-line ModelError."""
        _expect(isinstance(self.name, str) and self.name != "", "'name' must be a name")
        _expect(self.architecture in ARCHITECTURES, f"'architecture' must be one of "
                f"{', '.join(ARCHITECTURES)}, got {self.architecture!r}")
        for key in ("cross_attention_dim", "conditioning_channels", "opset"):
            value = getattr(self, key)
            _expect(_is_int(value) and value > 0,
                    f"'{key}' must be a positive integer, got {value!r}")
        _expect(isinstance(self.global_pool_conditions, bool),
                "'global_pool_conditions' must be true or false")
        _expect(len(self.residual_channels) > 1
                and all(_is_int(c) and c > 0 for c in self.residual_channels),
                "'residual_channels' must list the residuals' channel counts")
        _expect(isinstance(self.source, dict)
                and isinstance(self.source.get("weights_sha256"), str),
                "'source' must be an object with the weights' 'weights_sha256'")
        _expect(isinstance(self.hash, str) and len(self.hash) == _HASH_CHARS,
                f"'hash' must be {_HASH_CHARS} hex digits, got {self.hash!r}")
        _expect(isinstance(self.versions, dict), "'versions' must be an object")
        _expect(isinstance(self.variants, list) and all(isinstance(v, dict)
                                                        for v in self.variants),
                "'variants' must be a list of objects")
        _expect(set(self.components) == {CONTROLNET},
                f"'components' must list '{CONTROLNET}' only, got {sorted(self.components)}")
        spec = self.components[CONTROLNET]
        _expect(isinstance(spec.file, str) and "/" not in spec.file and ".." not in spec.file,
                f"components.{CONTROLNET}.file must be a file name in {CONTROLNET}/")
        _expect(f"{CONTROLNET}/{spec.file}" in self.files,
                f"components.{CONTROLNET}.file '{CONTROLNET}/{spec.file}' is not listed in "
                "'files'")
        for rel in self.files:
            parts = Path(rel).parts
            _expect(rel != "" and not rel.startswith("/") and ".." not in parts
                    and "\\" not in rel and ":" not in rel,
                    f"files key {rel!r} must be a relative path inside the folder")
        return self

    def verify_files(self, folder: str | os.PathLike[str], *, hashes: bool = True) -> None:
        """Check every listed file exists with its size (and sha256 unless hashes=False)."""
        root = Path(folder)
        for rel, entry in sorted(self.files.items()):
            problem = file_problem(root, rel, entry, hashes=hashes)
            if problem:
                raise ModelError(problem)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _expect(condition: bool, message: str) -> None:
    if not condition:
        raise ModelError(f"ControlNet {MANIFEST_NAME}: {message}")
