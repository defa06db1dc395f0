"""Opening control folders for a pipeline: resolving a unit's `model` (a folder, or a name in the
control dir: runtime/control/library.py), choosing the graph variant, checking that the
ControlNet fits the model, and keeping each opened ControlNet for the pipeline's next requests.

A control folder runs the variant whose (precision, backend) are the pipeline's when its
manifest lists one (its files checked, without hashes), else its fp32 graph: a folder without
variants works at every precision. The fit check compares the ControlNet's architecture and
cross-attention width with the model's, and its residuals' channels with the UNet's residual
inputs, so a mismatch is one line before any step runs instead of a shape error mid-way.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from sdrt.runtime.components import CONTROL_REFUSAL
from sdrt.runtime.control.controlnet import ControlNet
from sdrt.runtime.control.library import ControlLibrary
from sdrt.runtime.control.manifest import CONTROLNET, ControlManifest, is_control_export
from sdrt.runtime.errors import InputError, ModelError
from sdrt.runtime.model.manifest import file_problem
from sdrt.runtime.model.variants import REFERENCE, VARIANTS_DIR, Variant
from sdrt.runtime.session import Session

if TYPE_CHECKING:
    from sdrt.runtime.architectures.base import DenoiserGraph

TITLES = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL"}
COMPRESSED = ("int8", "int8-hybrid", "int4")  # precisions whose graphs hold packed weights
# (graph path, OpenVINO execution hint) → the session, as the pipeline opens its graphs
ControlOpener = Callable[[Path, str], Session]


@dataclass(frozen=True)
class ModelFit:
    """What a ControlNet must match in the model it steers."""

    architecture: str  # the model family's architecture (sd1, sd2, sdxl, …)
    context_width: int | None  # the UNet's cross-attention width (None: not fixed in the graph)
    residual_channels: tuple[int, ...]  # the UNet's residual inputs' channels; () if none


def model_fit(denoiser: DenoiserGraph, architecture: str) -> ModelFit:
    """What a ControlNet must match in a model of this architecture with this denoiser."""
    context = denoiser.session.inputs.get("encoder_hidden_states")
    width = context.shape[2] if context is not None and len(context.shape) == 3 else None
    return ModelFit(architecture, width, tuple(getattr(denoiser, "residual_channels", ())))


@dataclass(frozen=True)
class OpenedControl:
    """A control folder opened for a pipeline: its manifest, graph and the variant running."""

    folder: Path
    manifest: ControlManifest
    net: ControlNet
    variant: Variant

    @property
    def title(self) -> str:
        """The extension's model title (`control_title`)."""
        return control_title(self.folder, self.manifest)


def control_title(folder: Path, manifest: ControlManifest) -> str:
    """The extension's model title: the folder's name (as the control dir names it) and the
    model hash, "name [hash]"."""
    return f"{folder.name} [{manifest.hash}]"


def control_variant(folder: Path, manifest: ControlManifest, precision: str,
                    backend: str) -> Variant:
    """The listed variant of this precision and backend (files checked), else fp32's."""
    for entry in manifest.variants:
        variant = Variant.from_json(entry)
        if (variant.precision, variant.backend) != (precision, backend):
            continue
        prefix = f"{VARIANTS_DIR}/{variant.key}/"
        for rel, listed in sorted(manifest.files.items()):
            problem = rel.startswith(prefix) and file_problem(folder, rel, listed, hashes=False)
            if problem:
                raise ModelError(problem)
        return variant
    return Variant(REFERENCE, backend)


def check_fit(name: str, manifest: ControlManifest, fit: ModelFit) -> None:
    """InputError in one line when the ControlNet does not fit the model (module docstring)."""
    if not fit.residual_channels:
        raise InputError(CONTROL_REFUSAL)
    width = fit.context_width
    if manifest.architecture != fit.architecture or width not in (None,
                                                                   manifest.cross_attention_dim):
        model = TITLES.get(fit.architecture, fit.architecture)
        raise InputError(f"control folder '{name}' is a ControlNet for "
                         f"{TITLES[manifest.architecture]} (cross-attention "
                         f"{manifest.cross_attention_dim}); this model is {model}"
                         f"{f' ({width})' if width else ''}")
    if tuple(manifest.residual_channels) != tuple(fit.residual_channels):
        raise InputError(f"control folder '{name}' returns residuals of channels "
                         f"{list(manifest.residual_channels)}, this model's UNet takes "
                         f"{list(fit.residual_channels)}")


def resolve_control(model: str | os.PathLike[str], library: ControlLibrary | None) -> Path:
    """The control folder a unit's `model` names: a folder path, or a name or title in the
    control dir; InputError when it is neither."""
    path = Path(model).expanduser()
    if path.is_dir():
        if not is_control_export(path):
            raise InputError(f"'{model}' is not an exported ControlNet folder (export one with "
                             f"`sdrt export`)")
        return path.resolve()
    if library is not None and isinstance(model, str):
        return library.find(model).folder
    where = "" if library is not None else " (and no ControlNet dir is set)"
    raise InputError(f"ControlNet model '{model}' is not a folder{where}")


def control_graph(folder: Path, precision: str, backend: str) -> tuple[Path, bool]:
    """The graph a pipeline at this precision and backend runs from a control folder, and
    whether its weights are int8/int4-compressed (the memory estimate's question)."""
    variant = control_variant(folder, ControlManifest.load(folder), precision, backend)
    compressed = variant.precision in COMPRESSED and bool(variant.files)
    return variant.graph_path(folder, CONTROLNET), compressed


class ControlNets:
    """A pipeline's opened ControlNets, keyed by resolved folder and variant; thread-safe."""

    def __init__(self, open_graph: ControlOpener, fit: ModelFit, *, backend: str,
                 precision: str | Variant, library: ControlLibrary | None = None,
                 rows: int | None = None) -> None:
        self.open_graph = open_graph
        self.fit = fit
        self.backend = backend
        self.precision = precision  # the pipeline's, or a Variant every open runs (a gate's)
        self.library = library
        self.rows = rows  # low-memory mode's rows per ControlNet call
        self._opened: dict[tuple[Path, str], OpenedControl] = {}
        self._lock = threading.Lock()

    def resolve(self, model: str | os.PathLike[str]) -> Path:
        """The control folder a unit's `model` names (`resolve_control`)."""
        return resolve_control(model, self.library)

    def title(self, model: str | os.PathLike[str]) -> str:
        """The extension's title of the control folder `model` names (without opening it)."""
        folder = self.resolve(model)
        return control_title(folder, ControlManifest.load(folder, check_files=False))

    def open(self, model: str | os.PathLike[str],
             precision: str | Variant | None = None) -> OpenedControl:
        """The opened ControlNet `model` names (checked against the model), at the pipeline's
        precision or the given one (quantize's gate forces a variant)."""
        folder = self.resolve(model)
        manifest = ControlManifest.load(folder)
        check_fit(folder.name, manifest, self.fit)
        precision = precision or self.precision
        variant = precision if isinstance(precision, Variant) else \
            control_variant(folder, manifest, precision, self.backend)
        key = (folder, variant.key)
        with self._lock:
            if key not in self._opened:
                session = self.open_graph(variant.graph_path(folder, CONTROLNET),
                                           variant.execution(CONTROLNET))
                self._opened[key] = OpenedControl(folder, manifest,
                                                  ControlNet(session, rows=self.rows), variant)
            return self._opened[key]
