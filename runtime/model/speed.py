"""Denoiser step times measured on this machine, filed in manifest.json per machine and variant.

`sdrt quantize` (after a variant passes its gate) and `sdrt bench` record what they measured, so
precision "auto" (runtime/model/auto.py) can run a gated variant only where it was measured
faster here. Manifest key `speed` (kept as an unknown key by older readers):
{machine id (runtime/machine.py): {variant key ("fp32-ort", "int8-hybrid-openvino", …):
{"step_s": seconds per denoiser call, "shape": [batch, height, width], "by": what measured it,
"date": ISO date}}}. Times compare only at the same shape on the same machine.
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sdrt.runtime.errors import ModelError
from sdrt.runtime.machine import machine_id
from sdrt.runtime.model.manifest import read_manifest_json, write_manifest_json

log = logging.getLogger(__name__)

SPEED_KEY = "speed"
# A variant replaces the reference only when measured at most this fraction of its step time:
# on a shared machine the same graph timed 0.91x and 1.07x of itself in two runs.
MAX_STEP_RATIO = 0.9


@dataclass(frozen=True)
class StepTime:
    """One recorded denoiser step time."""

    step_s: float
    shape: tuple[int, int, int]  # batch, height, width (pixels)
    by: str

    def to_json(self) -> dict:
        return {"step_s": round(self.step_s, 4), "shape": list(self.shape), "by": self.by,
                "date": datetime.date.today().isoformat()}


def recorded_times(folder: str | Path) -> dict[str, StepTime]:
    """This machine's recorded step times by variant key ({} when none, or unreadable)."""
    try:
        data = read_manifest_json(folder)
    except ModelError:  # no manifest, or not JSON: nothing recorded
        return {}
    records = data.get(SPEED_KEY, {}).get(machine_id(), {}) if isinstance(data, dict) else {}
    times = {}
    for key, entry in records.items() if isinstance(records, dict) else ():
        try:
            times[key] = StepTime(float(entry["step_s"]), tuple(int(v) for v in entry["shape"]),
                                  str(entry.get("by", "")))
        except (KeyError, TypeError, ValueError):
            log.debug("ignoring a malformed speed record for %s", key)
    return times


def record_time(folder: str | Path, variant_key: str, time: StepTime) -> bool:
    """File `time` for `variant_key` on this machine in folder/manifest.json; False (and a log
    line) where the manifest cannot be written, e.g. a read-only model folder."""
    return record_times(folder, {variant_key: time})


def record_times(folder: str | Path, times: dict[str, StepTime],
                 edit: Callable[[dict], None] | None = None) -> bool:
    """File each variant key's time on this machine in folder/manifest.json, and apply `edit` to
    the manifest's data, in one read and one write; False (and a log line) where it cannot be
    written."""
    try:
        data = read_manifest_json(folder)
        records = data.setdefault(SPEED_KEY, {}).setdefault(machine_id(), {})
        records.update({key: time.to_json() for key, time in times.items()})
        if edit is not None:
            edit(data)
        write_manifest_json(folder, data)
    except (OSError, ModelError) as exc:
        log.info("step times of %s not recorded in '%s': %s", ", ".join(times),
                 Path(folder).name, exc)
        return False
    return True


def faster_than(times: dict[str, StepTime], reference: str, candidates: list[str]) -> str | None:
    """The candidate recorded fastest, if it was measured at most MAX_STEP_RATIO × `reference`'s
    step at the same shape on this machine; None otherwise."""
    base = times.get(reference)
    if base is None:
        return None
    timed = [(times[key].step_s, key) for key in candidates
             if key in times and times[key].shape == base.shape and key != reference]
    best = min(timed, default=None)
    return best[1] if best and best[0] <= MAX_STEP_RATIO * base.step_s else None
