"""One step count over several sampler runs (a refiner's handover, the hires fix's two passes):
the caller's `callback(i, n, latents)` sees the model calls of all of them, and a stop asked
in one run stops the rest."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

StepCallback = Callable[[int, int, np.ndarray], bool | None]


class Progress:
    """The caller's step callback over several runs: one count of model calls, one stop flag."""

    def __init__(self, callback: StepCallback | None, total: int) -> None:
        self.callback, self.total, self.stopped = callback, total, False

    def relay(self, offset: int) -> StepCallback | None:
        """The callback of the run whose first model call is call `offset` of all of them."""
        if self.callback is None:
            return None

        def on_step(i: int, n: int, latents: np.ndarray) -> bool:
            self.stopped = bool(self.callback(offset + i, self.total, latents))
            return self.stopped

        return on_step
