"""One export strategy per architecture, keyed by the runtime families' `architecture` names.

Each module says what its architecture exports: sd (SD 1.x/2.x, with inpainting, LCM and Turbo),
sdxl, sdxl_refiner, sd3. The family comes from the source's configs
(sdrt.runtime.model.families); `architecture_of` finds its strategy, which sdrt.export.onnx_export
runs. A new architecture is one module here, listed below, beside its runtime module; a new
pipeline class whose source folder differs from a UNet pipeline's also names its reader in
SOURCE_READERS.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from sdrt.export.architectures.base import Architecture, Step
from sdrt.export.architectures.sd import StableDiffusion
from sdrt.export.architectures.sd3 import StableDiffusion3, read_sd3_source
from sdrt.export.architectures.sdxl import StableDiffusionXL
from sdrt.export.architectures.sdxl_refiner import SDXLRefiner
from sdrt.export.source import SourceModel
from sdrt.runtime.errors import ExportError
from sdrt.runtime.model.families import get_family
from sdrt.runtime.model.folder import is_sd3_index

__all__ = ["ARCHITECTURES", "SOURCE_READERS", "Architecture", "Step", "architecture_of",
           "source_reader"]

ARCHITECTURES: dict[str, Architecture] = {
    name: strategy
    for strategy in (StableDiffusion(), StableDiffusionXL(), SDXLRefiner(), StableDiffusion3())
    for name in strategy.names
}

Reader = Callable[[Path, dict[str, Any], str | None], SourceModel]
# model_index.json → the reader of a pipeline that is not a UNet pipeline (whose folders and
# configs sdrt.export.source reads for every UNet architecture alike).
SOURCE_READERS: tuple[tuple[Callable[[dict[str, Any]], bool], Reader], ...] = (
    (is_sd3_index, read_sd3_source),
)


def architecture_of(source: SourceModel) -> Architecture:
    """The export strategy of `source`'s family's architecture."""
    name = get_family(source.family).architecture
    if name not in ARCHITECTURES:
        raise ExportError(f"this sdrt cannot export the {name!r} architecture; it exports "
                          f"{', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[name]


def source_reader(index: dict[str, Any]) -> Reader | None:
    """The reader for a pipeline with its own layout (SD 3's MMDiT folder), else None."""
    return next((read for names, read in SOURCE_READERS if names(index)), None)
