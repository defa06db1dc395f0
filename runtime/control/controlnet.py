"""The ControlNet graph as a component (Zhang et al. 2023): latents, timestep, text context and
the control image → the residuals the UNet adds to its skip connections and mid block.

A control folder's graph `controlnet` (runtime/control/manifest.py) takes `sample (B, 4, h, w),
timestep (rank 0, or [B] as the UNet's may), encoder_hidden_states (B, L, D), controlnet_cond
(B, 3, H, W)` in [0, 1] and, for SDXL, `text_embeds, time_ids`; it returns
`residual_names(n)` at conditioning scale 1 without guess mode: scales, guess mode and global
pooling are runtime/control/apply.py's, in NumPy. `rows` splits the batch into calls of that
many rows (low-memory mode's batch-1 calls), with the same result.
"""

from __future__ import annotations

import numpy as np

from sdrt.runtime.components import ADDED_CONDITIONS
from sdrt.runtime.control.residuals import DOWN_RESIDUAL, MID_RESIDUAL, residual_names
from sdrt.runtime.errors import ModelError
from sdrt.runtime.session import Session

INPUTS = ("sample", "timestep", "encoder_hidden_states", "controlnet_cond")
COND_INPUT = "controlnet_cond"


class ControlNet:
    """A ControlNet session driven by name; a call returns name → residual, downs then mid."""

    def __init__(self, session: Session, graph: str = "controlnet",
                 rows: int | None = None) -> None:
        inputs, outputs = set(session.inputs), set(session.outputs)
        downs = sum(1 for name in outputs if name.startswith(DOWN_RESIDUAL.format("")))
        self.residuals = residual_names(downs)
        extra = inputs - set(INPUTS)
        if not set(INPUTS) <= inputs or extra - ADDED_CONDITIONS or downs == 0 \
                or not set(self.residuals) <= outputs:
            raise ModelError(
                f"{graph}: expected inputs {list(INPUTS)} (and SDXL's {sorted(ADDED_CONDITIONS)}) "
                f"and outputs {DOWN_RESIDUAL.format('0')}… and {MID_RESIDUAL}, the graph has "
                f"inputs {sorted(inputs)} and outputs {sorted(outputs)}")
        self.session = session
        self.graph = graph
        self.added = frozenset(extra)
        self.rows = rows
        self.channels = tuple(session.outputs[name].shape[1] for name in self.residuals)
        self.context_width = session.inputs["encoder_hidden_states"].shape[2]
        self._timestep_rank = len(session.inputs["timestep"].shape)

    def __call__(self, sample: np.ndarray, t: float, context: np.ndarray, cond: np.ndarray,
                 added: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        """The residuals for these rows (cond: one control image per row, (B, 3, H, W))."""
        added = added or {}
        if set(added) != self.added:
            raise ModelError(f"{self.graph}: the graph takes added conditions "
                             f"{sorted(self.added)}, the model's text conditioning gives "
                             f"{sorted(added)}")
        step = self.rows or len(sample)
        parts = [self._run(sample[i:i + step], t, context[i:i + step], cond[i:i + step],
                           {name: value[i:i + step] for name, value in added.items()})
                 for i in range(0, len(sample), step)]
        if len(parts) == 1:
            return parts[0]
        return {name: np.concatenate([part[name] for part in parts]) for name in self.residuals}

    def _run(self, sample: np.ndarray, t: float, context: np.ndarray, cond: np.ndarray,
             added: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        timestep = np.array(t) if self._timestep_rank == 0 else np.full(sample.shape[0], t)
        out = self.session.run({"sample": sample, "timestep": timestep,
                                "encoder_hidden_states": context, COND_INPUT: cond, **added})
        return {name: out[name] for name in self.residuals}
