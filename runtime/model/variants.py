"""Precision variants of a model folder: which graph file, and which OpenVINO execution precision,
each component runs with when the user asks for fp16, bf16, int8, int8-hybrid or int4.

`sdrt quantize` makes a variant, gates it on fidelity against fp32 and only then lists it in
manifest.json's `variants` (see model/manifest.py for the entry's keys). Its graph files live in
`variants/<precision>-<backend>/<component>/` (ONNX `model.onnx`, or OpenVINO IR
`openvino_model.xml` + `.bin`), a tree that optimum, diffusers and optimum-intel do not look in, so
no other loader mistakes a quantized graph for the fp32 one. Components a variant does not name,
and every component at fp32, run the folder's own fp32 graphs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from sdrt.runtime.errors import InputError, ModelError
from sdrt.runtime.model.folder import graph_file
from sdrt.runtime.model.manifest import MANIFEST_NAME, Manifest
from sdrt.runtime.session import BACKENDS

REFERENCE = "fp32"
PRECISIONS = (REFERENCE, "fp16", "bf16", "int8", "int8-hybrid", "int4")
VARIANTS_DIR = "variants"
# OpenVINO INFERENCE_PRECISION_HINT values a variant may ask for (f32 is the reference).
EXECUTION_PRECISIONS = ("f32", "bf16")


@dataclass(frozen=True)
class ComponentVariant:
    """How one component runs in a variant: its graph (None: the fp32 one) and OpenVINO hint."""

    file: str | None = None  # relative to the model folder
    execution: str = "f32"

    def to_json(self) -> dict[str, str]:
        return {**({"file": self.file} if self.file else {}), "execution": self.execution}


@dataclass(frozen=True)
class Variant:
    """A precision variant for one backend; `components` lists only what differs from fp32."""

    precision: str
    backend: str
    components: Mapping[str, ComponentVariant] = field(default_factory=dict)

    @property
    def key(self) -> str:
        """`<precision>-<backend>`, also the name of its folder under variants/."""
        return f"{self.precision}-{self.backend}"

    @property
    def files(self) -> list[str]:
        """The graph files this variant names (each also listed in the manifest's `files`)."""
        return [c.file for c in self.components.values() if c.file]

    def graph_path(self, folder: Path, component: str) -> Path:
        """The graph one component loads from (the fp32 graph where the variant names none)."""
        choice = self.components.get(component)
        if choice and choice.file:
            return folder / choice.file
        return graph_file(folder, component, self.backend)

    def execution(self, component: str) -> str:
        """OpenVINO's INFERENCE_PRECISION_HINT for one component (f32 unless the variant says)."""
        choice = self.components.get(component)
        return choice.execution if choice else "f32"

    @classmethod
    def from_json(cls, data: Any) -> Variant:
        """Read a manifest `variants` entry; ModelError names the malformed field."""
        where = f"{MANIFEST_NAME} variant"
        if not isinstance(data, dict) or not isinstance(data.get("components"), dict):
            raise ModelError(f"{where} entries must be objects with 'components'")
        components = {}
        for name, entry in data["components"].items():
            if not isinstance(entry, dict):
                raise ModelError(f"{where} component '{name}' must be an object")
            components[name] = ComponentVariant(entry.get("file"), entry.get("execution", "f32"))
        return cls(data.get("precision"), data.get("backend"), components).validate()

    def validate(self, manifest: Manifest | None = None) -> Variant:
        """Check names and paths (and, given the manifest, that its files are listed there)."""
        where = f"{MANIFEST_NAME} variant {self.precision}-{self.backend}"
        if self.precision not in PRECISIONS[1:] or self.backend not in BACKENDS:
            raise ModelError(f"{where}: precision must be one of {', '.join(PRECISIONS[1:])} "
                             f"and backend one of {', '.join(BACKENDS)}")
        for name, choice in self.components.items():
            if choice.execution not in EXECUTION_PRECISIONS:
                raise ModelError(f"{where}: {name} execution must be one of "
                                 f"{', '.join(EXECUTION_PRECISIONS)}, got {choice.execution!r}")
            if choice.execution != "f32" and self.backend != "openvino":
                raise ModelError(f"{where}: {name} execution {choice.execution} needs OpenVINO")
            if choice.file is not None and not _inside_variants(choice.file):
                raise ModelError(f"{where}: {name} file must be a path under {VARIANTS_DIR}/, "
                                 f"got {choice.file!r}")
        unlisted = [f for f in self.files if manifest is not None and f not in manifest.files]
        if unlisted:
            raise ModelError(f"{where}: '{unlisted[0]}' is not listed in 'files'")
        return self


def resolve_variant(folder: Path, precision: str | Variant, backend: str) -> Variant:
    """`precision` as a Variant: looked up by name (select_variant), or a given one checked."""
    if not isinstance(precision, Variant):
        return select_variant(folder, precision, backend)
    if precision.backend != backend:
        raise InputError(f"the {precision.key} variant runs on {precision.backend}, not {backend}")
    return precision.validate()


def select_variant(folder: Path, precision: str, backend: str) -> Variant:
    """The variant `precision` names for `backend`: fp32, or one manifest.json lists.

    InputError for an unknown precision; ModelError naming what the folder lists when it has
    no such variant for this backend, or when a variant's files are missing or truncated.
    """
    if precision not in PRECISIONS:
        raise InputError(f"unknown precision '{precision}'; choose one of: "
                         f"{', '.join(PRECISIONS)}")
    if precision == REFERENCE:
        return Variant(REFERENCE, backend)
    if not (folder / MANIFEST_NAME).is_file():
        raise ModelError(f"'{folder.name}' has no {MANIFEST_NAME}, so no {precision} variant; "
                         f"make one with `sdrt quantize {folder.name} --precision {precision}`")
    manifest = Manifest.load(folder)
    listed = [Variant.from_json(entry) for entry in manifest.variants]
    for variant in listed:
        if (variant.precision, variant.backend) == (precision, backend):
            variant.validate(manifest)
            prefix = f"{VARIANTS_DIR}/{variant.key}/"
            manifest.verify_files(folder, hashes=False,
                                  only=[f for f in manifest.files if f.startswith(prefix)])
            return variant
    others = [v.backend for v in listed if v.precision == precision]
    if others:
        raise ModelError(f"'{folder.name}' has its {precision} variant for the {others[0]} "
                         f"backend, not {backend}: use --backend {others[0]}")
    have = ", ".join(v.key for v in listed) or "none"
    raise ModelError(f"'{folder.name}' lists no {precision} variant (variants: {have}); make one "
                     f"with `sdrt quantize {folder.name} --precision {precision}`")


def _inside_variants(path: str) -> bool:
    parts = PurePosixPath(path).parts
    return (len(parts) > 1 and parts[0] == VARIANTS_DIR and ".." not in parts
            and "\\" not in path and ":" not in path)
