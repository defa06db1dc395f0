"""After a variant passes its gate: one guided denoiser step timed with the variant and with fp32
on the same backend, filed in manifest.json (runtime/model/speed.py) so that precision "auto"
runs the variant only where it was measured faster on this machine.

The step is the denoiser at batch 2 (classifier-free guidance's pair) at the model's native
size: WARMUP calls (OpenVINO compiles the shape on the first), then the median of CALLS. Both
times go under this machine's key; the variant's manifest entry gets `speed`: {"step_s",
"reference_step_s", "ratio", "machine"}. A variant that leaves the denoiser fp32 (e.g. only the
VAE decoder) is not timed: its step is fp32's.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from sdrt.runtime.errors import SdrtError
from sdrt.runtime.guidance import guidance_embedding
from sdrt.runtime.machine import machine_id
from sdrt.runtime.model.speed import StepTime, record_times
from sdrt.runtime.model.variants import REFERENCE, Variant
from sdrt.runtime.pipeline import Pipeline

log = logging.getLogger(__name__)

BY = "sdrt quantize"
WARMUP = 1
CALLS = 3
DENOISERS = ("unet", "transformer")
PROMPT = "a photograph of an astronaut riding a horse"
GUIDANCE = 7.5  # for denoisers that take the guidance scale as an input (guidance-distilled)


def denoiser_call(pipe: Pipeline, width: int, height: int,
                  guided: bool = True) -> tuple[Callable[[], object], int]:
    """One denoiser call at this size (batch 2 when `guided`), its inputs made once; and its
    batch."""
    cond = pipe.conditioner(PROMPT, "", guided=guided, width=width, height=height)
    batch = len(cond.context)
    scale = pipe.facts.vae_scale_factor
    sample = np.random.default_rng(0).standard_normal(
        (batch, pipe.unet.in_channels, height // scale, width // scale), dtype=np.float32)
    embedded = None
    if pipe.unet.guidance_dim is not None:
        embedded = np.repeat(guidance_embedding(GUIDANCE, pipe.unet.guidance_dim)[None], batch, 0)
    return lambda: pipe.unet(sample, 999.0, cond.context, cond.added, embedded), batch


def step_time(folder: Path, backend: str, precision: str | Variant) -> StepTime:
    """The median guided step of `precision`'s denoiser on `backend` at the model's native
    size."""
    pipe = Pipeline.load(folder, backend, precision=precision)
    size = pipe.facts.default_size
    call, batch = denoiser_call(pipe, size, size)
    for _ in range(WARMUP):
        call()
    times = []
    for _ in range(CALLS):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return StepTime(statistics.median(times), (batch, size, size), BY)


def record_speed(folder: Path, entry: dict) -> dict:
    """Time and record a listed variant's step and fp32's (module docstring); `entry` with its
    `speed`, or as it was where the denoiser is fp32 or the timing failed (logged)."""
    variant = Variant.from_json(entry)
    if not any(name in variant.components for name in DENOISERS):
        return entry
    reference = Variant(REFERENCE, variant.backend).key
    try:
        times = {reference: step_time(folder, variant.backend, REFERENCE),
                 variant.key: step_time(folder, variant.backend, variant)}
    except SdrtError as exc:  # the variant is listed and gated; only its speed is unknown
        log.warning("the %s step was not timed: %s", variant.key, exc)
        return entry
    step, base = times[variant.key].step_s, times[reference].step_s
    speed = {"step_s": round(step, 4), "reference_step_s": round(base, 4),
             "ratio": round(step / base, 3), "machine": machine_id()}
    log.info("%s step %.3f s, %.2f× %s's", variant.key, step, step / base, reference)

    def add_speed(data: dict) -> None:
        for listed in data.get("variants", []):
            if Variant.from_json(listed).key == variant.key:
                listed["speed"] = speed

    if not record_times(folder, times, add_speed):
        return entry
    return {**entry, "speed": speed}
