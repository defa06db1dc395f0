"""A model folder opened once: checked, its facts, scheduler and precision variant read, its
architecture's strategy found, "auto" backend and precision resolved (model/auto.py). The memory
planner (memory/plan.py) and `Pipeline.load` both take one, so a folder is read once per run and
what it can do is decided in one place.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sdrt.runtime.architectures import architecture_for
from sdrt.runtime.architectures.base import Architecture, refusal
from sdrt.runtime.deepcache import missing_graphs, uncut_variant
from sdrt.runtime.errors import InputError
from sdrt.runtime.model.auto import AUTO, Choice, choose
from sdrt.runtime.model.check import check_on_load
from sdrt.runtime.model.folder import ModelFacts, read_facts
from sdrt.runtime.model.variants import Variant, resolve_variant
from sdrt.runtime.schedules import SchedulerConfig
from sdrt.runtime.session import BACKENDS


@dataclass(frozen=True)
class OpenedModel:
    """What a run needs to know about a model folder before any graph loads."""

    folder: Path
    backend: str
    variant: Variant  # the precision that runs (model/variants.py)
    facts: ModelFacts
    scheduler: SchedulerConfig
    architecture: Architecture
    choice: Choice | None = None  # what "auto" resolved to and why (None: both were given)

    @classmethod
    def open(cls, folder: str | Path, backend: str = AUTO, precision: str | Variant = AUTO, *,
             keeps_unet: bool = False, deepcache: int | None = None) -> OpenedModel:
        """Check `folder` (model/check.py's one-line refusals), then read what it is. `backend`
        ort, openvino or auto; `precision` auto, or names a variant manifest.json lists for this
        backend (quantize's gate passes a Variant it has not listed yet). `keeps_unet`: the run
        needs the fp32 denoiser graph (LoRAs), so auto picks no variant with its own;
        `deepcache`: the DeepCache interval the run uses (0: not known yet), so auto picks no
        variant with a UNet of its own but one cut and gated for it (model/auto.py)."""
        folder = Path(folder)
        if backend not in (*BACKENDS, AUTO):
            raise InputError(f"unknown backend '{backend}'; choose one of: "
                             f"{', '.join((AUTO, *BACKENDS))}")
        check_on_load(folder)  # model_index.json, paths, file heads and sizes
        choice = None
        if AUTO in (backend, precision):
            choice = choose(folder, backend, precision, keeps_unet=keeps_unet,
                            deepcache=deepcache)
            backend, precision = choice.backend, choice.precision
        variant = resolve_variant(folder, precision, backend)
        facts = read_facts(folder)
        scheduler = SchedulerConfig.from_file(folder / "scheduler" / "scheduler_config.json")
        scheduler.validate()
        return cls(folder, backend, variant, facts, scheduler, architecture_for(facts.family),
                   choice)

    @property
    def precision(self) -> str:
        return self.variant.precision

    def deepcache_refusal(self, low_memory: str | None = None) -> str | None:
        """Why this model cannot run DeepCache (None: it can), `low_memory` being the reason of
        a low-memory plan it runs in. The one place that decides: the planner refuses before
        loading, Pipeline.load at load, each request at its start."""
        unsupported = refusal(self.architecture, "deepcache")
        if unsupported:
            return unsupported
        if low_memory is not None:
            return (f"--deepcache does not combine with low-memory mode ({low_memory}); drop "
                    f"--deepcache, or raise --max-memory")
        if uncut_variant(self.folder, self.variant):
            return missing_graphs(self.folder, self.variant)
        return None
