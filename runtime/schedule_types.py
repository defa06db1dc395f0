"""Schedule types: sigma ladders a sampler may run on apart from its own timesteps (A1111's
"Schedule type", k-diffusion's `get_sigmas_*`), each `steps` descending sigmas of the model's
noise range, the final 0 left to the sampler's tables.

Automatic is each sampler's own (`samplers.SamplerSpec`); Uniform and SGM Uniform read the
model's discrete sigma table at evenly spaced training timesteps, interpolating log sigma as
k-diffusion's `DiscreteSchedule.t_to_sigma` does; Karras and Exponential span the table's range
(Karras et al. 2022, eq. 5; log-linear).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

import numpy as np

from sdrt.runtime.errors import InputError
from sdrt.runtime.schedules import (
    KARRAS_RHO,
    SchedulerConfig,
    exponential_sigmas,
    karras_sigmas,
    sigma_table,
)


def t_to_sigma(ts: np.ndarray, table: np.ndarray) -> np.ndarray:
    """sigma at fractional training timesteps, log sigma interpolated linearly between the
    table's integer timesteps (k-diffusion's t_to_sigma; `schedules.sigma_to_t` inverts it)."""
    ts = np.asarray(ts, dtype=np.float64)
    low = np.clip(np.floor(ts).astype(np.int64), 0, len(table) - 1)
    high = np.clip(np.ceil(ts).astype(np.int64), 0, len(table) - 1)
    log_table = np.log(table.astype(np.float64))
    return np.exp((1 - (ts - low)) * log_table[low] + (ts - low) * log_table[high])


def karras_ladder(config: SchedulerConfig, steps: int) -> np.ndarray:
    """Karras sigmas (rho 7) between the model's sigma_max and sigma_min, as diffusers'
    use_karras_sigmas=True and A1111's "Karras"."""
    table = sigma_table(config)
    return karras_sigmas(float(table[0]), float(table[-1]), steps)


def exponential_ladder(config: SchedulerConfig, steps: int) -> np.ndarray:
    """Log-linear sigmas between the model's sigma_max and sigma_min, as diffusers'
    use_exponential_sigmas=True and A1111's "Exponential"."""
    table = sigma_table(config)
    return exponential_sigmas(float(table[0]), float(table[-1]), steps)


def uniform_ladder(config: SchedulerConfig, steps: int) -> np.ndarray:
    """A1111's "Uniform" (k-diffusion's DiscreteSchedule.get_sigmas): the table at `steps`
    timesteps evenly spaced from T − 1 down to 0, both ends included."""
    table = sigma_table(config)
    return t_to_sigma(np.linspace(len(table) - 1, 0, steps), table)


def sgm_uniform_ladder(config: SchedulerConfig, steps: int) -> np.ndarray:
    """A1111's "SGM Uniform" (Stability's generative-models discretisation): `steps + 1`
    timesteps evenly spaced from t(sigma_max) = T − 1 to t(sigma_min) = 0, the last dropped, so
    the run ends by stepping from above t = 0 straight to sigma 0."""
    table = sigma_table(config)
    return t_to_sigma(np.linspace(len(table) - 1, 0, steps + 1)[:-1], table)


@dataclass(frozen=True)
class ScheduleType:
    """A row of `SCHEDULES`: A1111's label (the infotext's "Schedule type") and the ladder,
    (config, steps) -> `steps` descending sigmas, that samplers taking any schedule run on."""

    label: str
    ladder: Callable[[SchedulerConfig, int], np.ndarray] | None  # None: the sampler's own
    rho: float | None = None  # A1111's default_rho


AUTOMATIC = "automatic"  # each sampler's own timesteps (or the schedule A1111 picks for it)
SCHEDULES: Mapping[str, ScheduleType] = MappingProxyType({
    AUTOMATIC: ScheduleType("Automatic", None),
    "karras": ScheduleType("Karras", karras_ladder, KARRAS_RHO),
    "exponential": ScheduleType("Exponential", exponential_ladder),
    "uniform": ScheduleType("Uniform", uniform_ladder),
    "sgm_uniform": ScheduleType("SGM Uniform", sgm_uniform_ladder),
})
_ALIASES = {"sgmuniform": "sgm_uniform"}  # A1111's alias "SGMUniform"


def resolve_schedule(name: str | None) -> str:
    """The `SCHEDULES` key for a schedule's name or A1111 label (any case); None: automatic."""
    if name is None:
        return AUTOMATIC
    key = name.strip().lower() if isinstance(name, str) else None
    key = _ALIASES.get(key, key)
    for schedule, row in SCHEDULES.items():
        if key in (schedule, row.label.lower()):
            return schedule
    labels = ", ".join(row.label for row in SCHEDULES.values())
    raise InputError(f"unknown schedule {name!r}; choose one of: {labels}")


def schedule_infotext(schedule: str) -> dict[str, str]:
    """A1111's infotext entry for a schedule: "Schedule type" with its label, none for
    Automatic (A1111's `get_sigmas` adds it for a chosen schedule; its parser reads a missing
    one as Automatic, so both read back the same)."""
    return {} if schedule == AUTOMATIC else {"Schedule type": SCHEDULES[schedule].label}

