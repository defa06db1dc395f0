"""Planning a generation's memory before anything loads, for any app (CLI, server, batch, gates):
the estimate of the request on an opened model folder, the plan a budget allows (memory/
low_memory.py), what the request asks refused where the model cannot run it, and the
--dry-run text."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from sdrt.runtime.architectures.base import check_request
from sdrt.runtime.control.folder import control_graph, resolve_control
from sdrt.runtime.control.library import ControlLibrary
from sdrt.runtime.errors import InputError
from sdrt.runtime.hires import planned_size
from sdrt.runtime.memory import estimate as memory
from sdrt.runtime.memory.low_memory import Plan, estimate_for, plan_for
from sdrt.runtime.model.opened import OpenedModel
from sdrt.runtime.model.variants import Variant
from sdrt.runtime.vae.tiled import DEFAULT_TILE

if TYPE_CHECKING:
    from sdrt.runtime.pipeline import GenerationRequest


def plan_model(model: OpenedModel, request: GenerationRequest, *, mode: str,
               budget: int | None, library: ControlLibrary | None = None) -> Plan:
    """The plan (low_memory.plan_for's modes) for a request on an opened model folder, its
    ControlNets included (`library`: the control dir their names are looked up in)."""
    req = request.resolve(model.facts, model.scheduler)
    check_request(model.architecture, req)
    width, height = planned_size(req, model.facts)  # a hires fix's larger pass
    controls = tuple(control_graph(resolve_control(unit.model, library), model.precision,
                                   model.backend) for unit in req.controls)
    found = estimate_for(model.folder, model.variant, width=width, height=height,
                         images=req.num_images, guided=req.guidance_scale > 1.0,
                         vae_scale_factor=model.facts.vae_scale_factor, tile=DEFAULT_TILE,
                         components=model.architecture.graphs(model.folder),
                         deepcache=req.deepcache is not None, controls=controls)
    return plan_for(found, mode, budget)


def plan_request(folder: Path, backend: str, precision: str | Variant,
                 request: GenerationRequest, *, mode: str, budget: int | None) -> Plan:
    """`plan_model` on `folder`, opened here."""
    return plan_model(OpenedModel.open(folder, backend, precision), request, mode=mode,
                      budget=budget)


def plan_generation(model: OpenedModel, request: GenerationRequest, *, low_memory: bool,
                    budget: int | None) -> Plan:
    """The plan for one request: low-memory when asked or when the budget (None: unlimited)
    needs it; InputError when the budget cannot hold it, or when DeepCache is asked of a model
    or plan that cannot run it (said before loading, not after)."""
    plan = plan_model(model, request, mode="low" if low_memory else "auto", budget=budget)
    if request.deepcache is not None:
        refused = model.deepcache_refusal(plan.reason if plan.low_memory else None)
        if refused:
            raise InputError(refused)
    return plan


def describe(plan: Plan) -> str:
    """The --dry-run text: the estimate table and the plan."""
    budget = "none" if plan.budget is None else memory.format_size(plan.budget)
    kind = "low-memory" if plan.low_memory else "default"
    return (f"{plan.estimate.table()}\nbudget: {budget}; plan: {kind} ({plan.reason}), "
            f"estimated peak {memory.format_size(plan.peak)}")
