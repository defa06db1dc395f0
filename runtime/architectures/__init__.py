"""One strategy per architecture (base.Architecture): sd (SD 1.x/2.x), sdxl, sdxl_refiner, sd3.

A model family (model/families.py) names its architecture; `ARCHITECTURES` maps that name to
the strategy the pipeline, the memory planner and the manifest check ask. A new architecture is
a module here and a row in `ARCHITECTURES`.
"""

from __future__ import annotations

from sdrt.runtime.architectures.base import Architecture
from sdrt.runtime.architectures.sd import SD1, SD2
from sdrt.runtime.architectures.sd3 import SD3
from sdrt.runtime.architectures.sdxl import SDXL
from sdrt.runtime.architectures.sdxl_refiner import SDXL_REFINER
from sdrt.runtime.errors import ModelError
from sdrt.runtime.model.families import Family

ARCHITECTURES: dict[str, Architecture] = {
    strategy.name: strategy for strategy in (SD1, SD2, SDXL, SDXL_REFINER, SD3)}


def architecture_for(family: Family) -> Architecture:
    """The strategy of `family`'s architecture; ModelError for one this sdrt cannot run."""
    if family.architecture not in ARCHITECTURES:
        raise ModelError(f"the {family.title} family's architecture {family.architecture!r} "
                         f"has no runtime strategy; known: {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[family.architecture]
