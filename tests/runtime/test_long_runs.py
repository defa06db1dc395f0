"""Long runs: memory stays flat over many generations, and a generation that ends early
(cancelled by its callback, interrupted, failed in the callback or in the backend) frees every
array it held, by reference counting alone (the garbage collector is off while it runs, so a
reference cycle that would keep latents alive until some later collection fails the test).

The soak here is the short version of `python -m sdrt.benchmarks.soak --runs 500`
(benchmarks/RESULTS.md), on the same embedded model with fewer steps per generation.
"""

from __future__ import annotations

import gc
import weakref

import numpy as np
import pytest

from sdrt.benchmarks.soak import MAX_DRIFT_MB, soak
from sdrt.runtime.errors import GenerationError, ModelError
from sdrt.runtime.pipeline import GenerationRequest, Pipeline

SOAK_RUNS, SOAK_WARMUP, SOAK_STEPS = 60, 10, 4


@pytest.fixture(scope="module")
def embedded() -> Pipeline:
    return Pipeline.load()  # models/embedded/onnx


def _cancel(step, total, latents):
    return True


def _interrupt(step, total, latents):
    raise KeyboardInterrupt


def _fail(step, total, latents):
    raise GenerationError("stopped by the test")


ENDINGS = {"completed": None, "cancelled": _cancel, "interrupted": _interrupt,
           "failed": _fail, "backend-error": None}


@pytest.mark.parametrize("ending", sorted(ENDINGS))
def test_a_generation_frees_what_it_held_however_it_ends(embedded, ending, monkeypatch):
    held: list[weakref.ref] = []
    calls = 0
    original = embedded.unet.session.run

    def recording_run(feeds):
        nonlocal calls
        calls += 1
        out = original(feeds)
        held.extend(weakref.ref(value) for value in (*feeds.values(), *out.values())
                    if isinstance(value, np.ndarray))
        if ending == "backend-error" and calls == 2:
            raise ModelError("unet: the backend failed (raised by the test)")
        return out

    def callback(step, total, latents):
        held.append(weakref.ref(latents))
        return ENDINGS[ending](step, total, latents) if ENDINGS[ending] else None

    monkeypatch.setattr(embedded.unet.session, "run", recording_run)
    request = GenerationRequest(prompt="a red circle", steps=3, seed=1, num_images=2)
    gc.collect()
    gc.disable()
    try:
        try:
            results = embedded.run(request, callback=callback)
            assert ending in ("completed", "cancelled")
            assert len(results) == 2
            del results
        except (KeyboardInterrupt, GenerationError, ModelError):
            assert ending in ("interrupted", "failed", "backend-error")
        alive = sum(ref() is not None for ref in held)
    finally:
        gc.enable()
    assert held and alive == 0, f"{alive} of {len(held)} arrays outlived the generation"


def test_memory_stays_flat_over_many_generations(embedded):
    result = soak(embedded, SOAK_RUNS, warmup=SOAK_WARMUP, steps=SOAK_STEPS,
                  cancel_every=10, fail_every=10)
    assert (result.completed, result.cancelled, result.failed) == (48, 6, 6)
    assert result.drift_mb <= MAX_DRIFT_MB, result.to_json()
