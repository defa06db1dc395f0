"""manifest.json: what sdrt's export stage wrote into a model folder in optimum's ONNX layout.

The manifest carries every number the runtime would otherwise hard-code (VAE `scaling_factor`,
latent channels, VAE scale factor, UNet `sample_size`, prediction type), each graph's I/O
(name → shape with `None` for dynamic axes, dtype), and the size and sha256 of every file, so a
truncated or swapped file is caught before a graph is loaded. Stdlib only (the runtime reads it),
but for asking a family's architecture (runtime/architectures/) which components it needs.

Keys (format_version 1): format, format_version, family (a name in sdrt.runtime.model.families),
source {path, hub_id?, revision?, config_sha256}, prediction_type, sample_size, latent_channels,
vae_scale_factor, scaling_factor, opset, versions {package: version}, components {name: {file
(relative to the `name/` folder), inputs, outputs, validation?, external_data?}}, files
{relative path: {sha256, bytes}}, variants [objects the quantize stage adds], loras? [{file,
sha256, scale}: LoRAs fused into the weights at export, kept in `extra`], defaults? {steps?,
guidance_scale?, sampler?: this model's generation defaults, over its family's}, shift_factor?
(SD 3's VAE latent shift; absent means 0). Unknown keys are
kept (top level in `extra`, per component in `ComponentSpec.extra`) and written back by `save`,
so a newer writer's additions survive an older reader that rewrites the file.

A `variants` entry (written by `sdrt quantize` only after the variant passed its gate; read by
sdrt.runtime.model.variants): precision (fp16, bf16, int8, int8-hybrid, int4), backend (ort or
openvino), components {name: {file? (relative to the model folder, under
`variants/<precision>-<backend>/<name>/`; absent: the fp32 graph), execution (OpenVINO
INFERENCE_PRECISION_HINT, f32 or bf16)}}, method (how the graphs were made), bytes {name:
{variant, fp32}}, gate {figures, thresholds, prompts, seeds, steps}, command (what made it),
versions {package: version}, speed? {step_s, reference_step_s, ratio, machine} (its guided step
against fp32's on this backend: quantize/speed_record.py). Every variant file is also in
`files`, so `verify_files` covers it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from sdrt.runtime.errors import ModelError, first_line

MANIFEST_NAME = "manifest.json"
FORMAT = "sdrt-manifest"
FORMAT_VERSION = 1
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "flow_prediction")  # flow: SD 3
DTYPES = ("float32", "float16", "bfloat16", "int64", "int32", "int8", "uint8", "bool")
REQUIRED_COMPONENTS = ("text_encoder", "unet", "vae_decoder")  # SD's; each family's: _required
_SHA256 = re.compile(r"[0-9a-f]{64}")
_KNOWN_KEYS = frozenset({
    "format", "format_version", "family", "source", "components", "scaling_factor",
    "latent_channels", "vae_scale_factor", "sample_size", "prediction_type", "opset",
    "versions", "files", "variants", "defaults", "shift_factor",
})
DEFAULT_KEYS = ("steps", "guidance_scale", "sampler")  # what `defaults` may set


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output: shape (`None` marks a dynamic axis) and NumPy dtype name."""

    shape: tuple[int | None, ...]
    dtype: str

    def to_json(self) -> dict[str, Any]:
        return {"shape": list(self.shape), "dtype": self.dtype}

    @classmethod
    def from_json(cls, data: Any, where: str) -> TensorSpec:
        _expect(isinstance(data, dict), f"{where} must be an object")
        shape = data.get("shape")
        _expect(isinstance(shape, list), f"{where}.shape must be a list")
        return cls(shape=tuple(shape), dtype=data.get("dtype"))


@dataclass(frozen=True)
class ComponentSpec:
    """One graph of the folder: its file (relative to the component folder) and its I/O."""

    file: str
    inputs: dict[str, TensorSpec]
    outputs: dict[str, TensorSpec]
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "inputs": {name: spec.to_json() for name, spec in self.inputs.items()},
            "outputs": {name: spec.to_json() for name, spec in self.outputs.items()},
            **self.extra,
        }

    @classmethod
    def from_json(cls, data: Any, where: str) -> ComponentSpec:
        _expect(isinstance(data, dict), f"{where} must be an object")
        tensors = {}
        for kind in ("inputs", "outputs"):
            entries = data.get(kind)
            _expect(isinstance(entries, dict), f"{where}.{kind} must be an object")
            tensors[kind] = {name: TensorSpec.from_json(spec, f"{where}.{kind}.{name}")
                             for name, spec in entries.items()}
        extra = {k: v for k, v in data.items() if k not in ("file", "inputs", "outputs")}
        return cls(file=data.get("file"), extra=extra, **tensors)


@dataclass(frozen=True)
class FileEntry:
    """Size and sha256 of one file, keyed in `Manifest.files` by its folder-relative POSIX path."""

    sha256: str
    bytes: int

    def to_json(self) -> dict[str, Any]:
        return {"sha256": self.sha256, "bytes": self.bytes}


def read_manifest_json(folder: str | os.PathLike[str], missing: str = "") -> Any:
    """`folder/manifest.json` parsed; a one-line ModelError if it is absent (with `missing`
    appended, e.g. how to make one) or not JSON."""
    path = Path(folder) / MANIFEST_NAME
    try:
        return json.loads(path.read_text("utf-8"))
    except FileNotFoundError as exc:
        raise ModelError(f"'{Path(folder).name}' has no {MANIFEST_NAME}{missing}") from exc
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise ModelError(f"{MANIFEST_NAME} in '{Path(folder).name}' is not valid JSON: "
                         f"{first_line(exc)}") from exc


@dataclass(frozen=True)
class Manifest:
    """The contents of manifest.json (format version 1)."""

    family: str
    source: dict[str, Any]
    components: dict[str, ComponentSpec]
    scaling_factor: float
    latent_channels: int
    vae_scale_factor: int
    sample_size: int
    prediction_type: str
    opset: int
    versions: dict[str, str]
    files: dict[str, FileEntry]
    variants: list[dict[str, Any]] = field(default_factory=list)
    defaults: dict[str, Any] = field(default_factory=dict)
    shift_factor: float = 0.0  # SD 3's VAE: latents = (z - shift_factor) · scaling_factor
    format_version: int = FORMAT_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def default_size(self) -> int:
        """Native image side in pixels (diffusers: unet sample_size × VAE scale factor)."""
        return self.sample_size * self.vae_scale_factor

    @classmethod
    def load(cls, folder: str | os.PathLike[str]) -> Manifest:
        """Read and validate `folder/manifest.json`."""
        return cls.from_json(read_manifest_json(folder))

    @classmethod
    def from_json(cls, data: Any) -> Manifest:
        """Build from parsed JSON; raises ModelError on a malformed or too-new manifest."""
        _expect(isinstance(data, dict), "the top level must be an object")
        _expect(data.get("format", FORMAT) == FORMAT,
                f"'format' is {data.get('format')!r}, not {FORMAT!r}")
        version = data.get("format_version")
        _expect(_is_int(version), "'format_version' must be an integer")
        if version > FORMAT_VERSION:
            raise ModelError(f"{MANIFEST_NAME} format_version {version} is newer than this sdrt "
                             f"reads ({FORMAT_VERSION}); upgrade sdrt")
        missing = sorted(_KNOWN_KEYS - {"format", "variants", "defaults", "shift_factor"}
                         - data.keys())
        _expect(not missing, f"missing key '{missing[0]}'" if missing else "")
        components, files = data["components"], data["files"]
        _expect(isinstance(components, dict), "'components' must be an object")
        _expect(isinstance(files, dict), "'files' must be an object")
        manifest = cls(
            family=data["family"], source=data["source"], scaling_factor=data["scaling_factor"],
            latent_channels=data["latent_channels"], vae_scale_factor=data["vae_scale_factor"],
            sample_size=data["sample_size"], prediction_type=data["prediction_type"],
            opset=data["opset"], versions=data["versions"], variants=data.get("variants", []),
            defaults=data.get("defaults", {}), shift_factor=data.get("shift_factor", 0.0),
            format_version=version,
            components={name: ComponentSpec.from_json(spec, f"components.{name}")
                        for name, spec in components.items()},
            files={path: _file_entry(entry, path) for path, entry in files.items()},
            extra={k: v for k, v in data.items() if k not in _KNOWN_KEYS},
        )
        return manifest.validate()

    def to_json(self) -> dict[str, Any]:
        """The JSON object `save` writes (known keys first, then preserved unknown ones)."""
        return {
            "format": FORMAT, "format_version": self.format_version, "family": self.family,
            "source": self.source, "prediction_type": self.prediction_type,
            "sample_size": self.sample_size, "latent_channels": self.latent_channels,
            "vae_scale_factor": self.vae_scale_factor, "scaling_factor": self.scaling_factor,
            **({"shift_factor": self.shift_factor} if self.shift_factor else {}),
            "opset": self.opset, "versions": self.versions,
            "components": {name: spec.to_json() for name, spec in self.components.items()},
            "files": {path: entry.to_json() for path, entry in sorted(self.files.items())},
            "variants": self.variants, **({"defaults": self.defaults} if self.defaults else {}),
            **self.extra,
        }

    def save(self, folder: str | os.PathLike[str]) -> Path:
        """Validate, then write `folder/manifest.json` via a temporary file and os.replace."""
        self.validate()
        return write_manifest_json(folder, self.to_json())

    def validate(self) -> Manifest:
        """Check types, ranges and paths; returns self, raises a one-line ModelError."""
        _expect(isinstance(self.family, str) and self.family != "", "'family' must be a name")
        _expect(isinstance(self.source, dict), "'source' must be an object")
        _expect(isinstance(self.versions, dict), "'versions' must be an object")
        _expect(self.prediction_type in PREDICTION_TYPES,
                f"'prediction_type' must be one of {', '.join(PREDICTION_TYPES)}, "
                f"got {self.prediction_type!r}")
        _expect(isinstance(self.scaling_factor, (int, float)) and not _is_bool(self.scaling_factor)
                and math.isfinite(self.scaling_factor) and self.scaling_factor > 0,
                f"'scaling_factor' must be a positive number, got {self.scaling_factor!r}")
        _expect(isinstance(self.shift_factor, (int, float)) and not _is_bool(self.shift_factor)
                and math.isfinite(self.shift_factor),
                f"'shift_factor' must be a number, got {self.shift_factor!r}")
        for key in ("latent_channels", "vae_scale_factor", "sample_size", "opset"):
            value = getattr(self, key)
            _expect(_is_int(value) and value > 0,
                    f"'{key}' must be a positive integer, got {value!r}")
        _expect(self.vae_scale_factor & (self.vae_scale_factor - 1) == 0,
                f"'vae_scale_factor' must be a power of two, got {self.vae_scale_factor}")
        _expect(isinstance(self.variants, list) and all(isinstance(v, dict)
                                                        for v in self.variants),
                "'variants' must be a list of objects")
        self._validate_defaults()
        for path, entry in self.files.items():
            _check_relative(path, f"files key {path!r}")
            _file_entry(entry.to_json(), path)
        self._validate_components()
        return self

    def _validate_defaults(self) -> None:
        _expect(isinstance(self.defaults, dict), "'defaults' must be an object")
        unknown = sorted(set(self.defaults) - set(DEFAULT_KEYS))
        _expect(not unknown, f"'defaults' may set {', '.join(DEFAULT_KEYS)}, not "
                f"'{unknown[0]}'" if unknown else "")
        steps, scale = self.defaults.get("steps", 1), self.defaults.get("guidance_scale", 1.0)
        _expect(_is_int(steps) and steps > 0, f"'defaults.steps' must be a positive integer, "
                f"got {steps!r}")
        _expect(isinstance(scale, (int, float)) and not _is_bool(scale) and math.isfinite(scale)
                and scale >= 0, f"'defaults.guidance_scale' must be a number ≥ 0, got {scale!r}")
        _expect(isinstance(self.defaults.get("sampler", ""), str),
                "'defaults.sampler' must be a sampler name")

    def _validate_components(self) -> None:
        missing = [name for name in _required(self.family) if name not in self.components]
        _expect(not missing, f"component '{missing[0]}' is missing" if missing else "")
        for name, spec in self.components.items():
            where = f"components.{name}"
            _expect(isinstance(spec.file, str), f"{where}.file must be a file name")
            _check_relative(spec.file, f"{where}.file")
            _expect(f"{name}/{spec.file}" in self.files,
                    f"{where}.file '{name}/{spec.file}' is not listed in 'files'")
            _expect(bool(spec.inputs) and bool(spec.outputs),
                    f"{where} must list its inputs and outputs")
            for kind, tensors in (("inputs", spec.inputs), ("outputs", spec.outputs)):
                for tensor, tspec in tensors.items():
                    _check_tensor(tspec, f"{where}.{kind}.{tensor}")

    def component_path(self, folder: str | os.PathLike[str], name: str) -> Path:
        """Path of one component's graph file inside `folder`."""
        if name not in self.components:
            raise ModelError(f"{MANIFEST_NAME} lists no component '{name}'")
        return Path(folder) / name / self.components[name].file

    def verify_files(self, folder: str | os.PathLike[str], *, hashes: bool = True,
                     only: Iterable[str] | None = None) -> None:
        """Check every listed file (or those in `only`) exists with its size (and sha256 unless
        hashes=False)."""
        root = Path(folder)
        wanted = None if only is None else set(only)
        for rel, entry in sorted(self.files.items()):
            if wanted is not None and rel not in wanted:
                continue
            problem = file_problem(root, rel, entry, hashes=hashes)
            if problem:
                raise ModelError(problem)


def _required(family: str) -> tuple[str, ...]:
    """The components a manifest of `family` must list: its architecture's graphs
    (runtime/architectures/), SD's for a family this sdrt does not know (read_facts refuses
    that by name)."""
    # imported here: the strategies read model folders, and model/folder.py imports this module
    from sdrt.runtime.architectures import ARCHITECTURES
    from sdrt.runtime.model.families import FAMILIES

    strategy = ARCHITECTURES.get(FAMILIES[family].architecture) if family in FAMILIES else None
    return strategy.required if strategy is not None else REQUIRED_COMPONENTS


def file_problem(root: Path, rel: str, entry: FileEntry, *, hashes: bool = True) -> str | None:
    """What is wrong with one listed file (missing, other size, other sha256), or None."""
    path = root / rel
    if not path.is_file():
        return f"'{root.name}' is incomplete: '{rel}' is missing"
    size = path.stat().st_size
    if size != entry.bytes:
        return (f"'{rel}' in '{root.name}' has {size} bytes, the manifest says {entry.bytes} "
                "(truncated or replaced file)")
    if hashes and sha256_file(path) != entry.sha256:
        return (f"'{rel}' in '{root.name}' does not match its sha256 in {MANIFEST_NAME} "
                "(corrupted or replaced file)")
    return None


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks so multi-GB graphs need no memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def scan_files(folder: str | os.PathLike[str]) -> dict[str, FileEntry]:
    """FileEntry for every regular file under `folder` except manifest.json, by relative path."""
    root = Path(folder)
    entries = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_file() and rel != MANIFEST_NAME:
            entries[rel] = FileEntry(sha256=sha256_file(path), bytes=path.stat().st_size)
    return entries


def _file_entry(data: Any, path: str) -> FileEntry:
    _expect(isinstance(data, dict), f"files entry {path!r} must be an object")
    sha, size = data.get("sha256"), data.get("bytes")
    _expect(isinstance(sha, str) and _SHA256.fullmatch(sha) is not None,
            f"files entry {path!r} needs a 64-digit lowercase hex 'sha256'")
    _expect(_is_int(size) and size >= 0, f"files entry {path!r} needs a byte count 'bytes'")
    return FileEntry(sha256=sha, bytes=size)


def _check_tensor(spec: TensorSpec, where: str) -> None:
    _expect(spec.dtype in DTYPES, f"{where}.dtype must be one of {', '.join(DTYPES)}, "
            f"got {spec.dtype!r}")
    _expect(all(dim is None or (_is_int(dim) and dim >= 0) for dim in spec.shape),
            f"{where}.shape entries must be non-negative integers or null, got {list(spec.shape)}")


def _check_relative(path: str, where: str) -> None:
    # Every path a model file names must stay inside the model folder: a hostile manifest must not
    # make the runtime read or hash files elsewhere.
    parts = PurePosixPath(path).parts
    _expect(path != "" and "\\" not in path and not PurePosixPath(path).is_absolute()
            and ".." not in parts and ":" not in path,
            f"{where} must be a relative path inside the model folder, got {path!r}")


def _is_bool(value: Any) -> bool:
    return isinstance(value, bool)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _expect(condition: bool, message: str) -> None:
    if not condition:
        raise ModelError(f"{MANIFEST_NAME}: {message}")


def write_manifest_json(folder: str | os.PathLike[str], data: dict[str, Any]) -> Path:
    """Write `folder/manifest.json` via a temporary file and os.replace (never half-written)."""
    path = Path(folder) / MANIFEST_NAME
    tmp = path.with_name(f".{MANIFEST_NAME}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2) + "\n", "utf-8")
    os.replace(tmp, path)
    return path
