"""The four Stable Diffusion graphs as thin classes that own their I/O names.

Names follow optimum's ONNX export (text encoder `input_ids → last_hidden_state`; UNet
`sample, timestep, encoder_hidden_states → out_sample`; VAE decoder `latent_sample → sample`;
VAE encoder `sample → latent_parameters`), and what varies between exporters (timestep rank
and dtype, id dtype, the encoder's output, a UNet's ControlNet residual inputs) is read from
the graph itself.
"""

from __future__ import annotations

import numpy as np

from sdrt.runtime.control.residuals import (
    DOWN_RESIDUAL,
    MID_RESIDUAL,
    level_size,
    residual_names,
    zero_residuals,
)
from sdrt.runtime.errors import ModelError
from sdrt.runtime.session import Session


def _require(session: Session, graph: str, inputs: set[str], outputs: set[str]) -> None:
    """Refuse a graph whose I/O names are not the ones this component drives."""
    if not inputs <= set(session.inputs) or not outputs & set(session.outputs):
        raise ModelError(
            f"{graph}: expected inputs {sorted(inputs)} and outputs among {sorted(outputs)}, "
            f"the graph has inputs {sorted(session.inputs)} and outputs {sorted(session.outputs)}"
        )


class TextEncoder:
    """CLIP text encoder: token ids (B, 77) → hidden states (B, 77, D), or named outputs."""

    def __init__(self, session: Session, graph: str = "text_encoder") -> None:
        _require(session, graph, {"input_ids"}, {"last_hidden_state"})
        self.session = session
        self.graph = graph

    def __call__(self, input_ids: np.ndarray) -> np.ndarray:
        return self.session.run({"input_ids": input_ids})["last_hidden_state"]

    def outputs(self, input_ids: np.ndarray, names: tuple[str, ...]) -> list[np.ndarray]:
        """The named outputs (SDXL: `hidden_states.N`, `text_embeds`); ModelError if absent."""
        missing = [name for name in names if name not in self.session.outputs]
        if missing:
            raise ModelError(f"{self.graph}: the graph has no output {missing[0]!r} (outputs: "
                             f"{', '.join(sorted(self.session.outputs))})")
        out = self.session.run({"input_ids": input_ids})
        return [out[name] for name in names]


# UNet inputs beyond sample/timestep/context that sdrt can feed: SDXL's added conditions, and
# LCM's guidance-scale embedding (optimum's name for it).
ADDED_CONDITIONS = frozenset({"text_embeds", "time_ids"})
GUIDANCE_INPUT = "timestep_cond"


class UNet:
    """Noise-prediction UNet; the timestep is fed as a scalar or as [batch], as the graph wants.

    `added` names the graph's extra conditioning inputs (SDXL: text_embeds, time_ids), which
    each call must feed, row-aligned with the context. `guidance_dim` is the width of an LCM
    UNet's `timestep_cond` (its time_cond_proj_dim), None for a UNet without that input.
    `residuals` names the ControlNet residual inputs the graph takes (runtime/control/
    residuals.py; () for an export without them); a call without control feeds them zeros,
    shaped from `residual_levels` (from unet/config.json: Pipeline.load passes them) and the
    graph's channel dims.
    """

    def __init__(self, session: Session, residual_levels: tuple[int, ...] = ()) -> None:
        _require(session, "unet", {"sample", "timestep", "encoder_hidden_states"}, {"out_sample"})
        self.session = session
        extra = set(session.inputs) - {"sample", "timestep", "encoder_hidden_states"}
        self.residuals = _residual_inputs(extra)
        unknown = extra - ADDED_CONDITIONS - {GUIDANCE_INPUT} - set(self.residuals)
        if unknown:
            raise ModelError(f"unet: inputs {sorted(unknown)} are not supported")
        self.added = frozenset(extra & ADDED_CONDITIONS)
        self.guidance_dim = _guidance_dim(session) if GUIDANCE_INPUT in extra else None
        self._timestep_rank = len(session.inputs["timestep"].shape)
        self.in_channels = session.inputs["sample"].shape[1]
        self.residual_levels = tuple(residual_levels) if self.residuals else ()
        self.residual_channels = tuple(session.inputs[name].shape[1] for name in self.residuals)

    def __call__(self, sample: np.ndarray, t: float, context: np.ndarray,
                 added: dict[str, np.ndarray] | None = None,
                 timestep_cond: np.ndarray | None = None,
                 residuals: dict[str, np.ndarray] | None = None) -> np.ndarray:
        return self.session.run(self.feeds(sample, t, context, added, timestep_cond,
                                           residuals))["out_sample"]

    def feeds(self, sample: np.ndarray, t: float, context: np.ndarray,
              added: dict[str, np.ndarray] | None = None,
              timestep_cond: np.ndarray | None = None,
              residuals: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        """The graph's inputs for one call, checked against what the graph takes; `residuals`
        (a ControlNet's, summed over nets) or zeros where the graph takes them."""
        added = added or {}
        if set(added) != self.added:
            raise ModelError(f"unet: the graph takes added conditions {sorted(self.added)}, "
                             f"the model's text conditioning gives {sorted(added)}")
        if (timestep_cond is None) != (self.guidance_dim is None):
            raise ModelError(f"unet: the graph {'takes' if self.guidance_dim else 'has no'} "
                             f"input {GUIDANCE_INPUT!r} (the guidance-scale embedding of LCM)")
        # optimum exports a rank-0 timestep; diffusers' legacy export a [batch] one.
        timestep = np.array(t) if self._timestep_rank == 0 else np.full(sample.shape[0], t)
        feeds = {"sample": sample, "timestep": timestep, "encoder_hidden_states": context,
                 **added}
        if timestep_cond is not None:
            feeds[GUIDANCE_INPUT] = timestep_cond
        if residuals is not None and not self.residuals:
            raise ModelError(CONTROL_REFUSAL)
        if self.residuals:
            feeds.update(residuals if residuals is not None
                         else self.zero_residuals(len(sample), sample.shape[2:]))
        return feeds

    def zero_residuals(self, batch: int, latent_hw: tuple[int, int]) -> dict[str, np.ndarray]:
        """The zeros a call without control feeds the residual inputs."""
        if len(self.residual_levels) != len(self.residuals):
            raise ModelError("unet: the graph takes ControlNet residuals but their levels are "
                             "unknown (unet/config.json is missing from the model folder)")
        return zero_residuals(self.residual_levels, self.residual_channels, batch,
                              tuple(latent_hw))

    def feed_shapes(self, batch: int, latent_size: tuple[int, int],
                    context_length: int) -> dict[str, tuple[int, ...]] | None:
        """The input shapes `feeds` gives a call at this batch, latent (h, w) and context length,
        read from the graph's fixed dims; None where another dim is left dynamic."""
        free = {"sample": {2: latent_size[0], 3: latent_size[1]},
                "encoder_hidden_states": {1: context_length}}
        if len(self.residual_levels) != len(self.residuals):
            return None
        for name, level in zip(self.residuals, self.residual_levels, strict=True):
            free[name] = {2: level_size(latent_size[0], level),
                          3: level_size(latent_size[1], level)}
        shapes = {}
        for name, spec in self.session.inputs.items():
            if name == "timestep":
                shapes[name] = () if self._timestep_rank == 0 else (batch,)
                continue
            dims = [batch, *spec.shape[1:]]
            for axis, size in free.get(name, {}).items():
                dims[axis] = size
            if None in dims:
                return None
            shapes[name] = tuple(dims)
        return shapes


CONTROL_REFUSAL = ("this model's UNet graph takes no ControlNet residuals; export it again "
                   "with this sdrt")


def _residual_inputs(names: set[str]) -> tuple[str, ...]:
    """The ControlNet residual inputs among a UNet graph's, downs in order then mid; () if none,
    ModelError where the downs are not numbered 0..n-1 or the mid one is missing."""
    downs = sorted(name for name in names if name.startswith(DOWN_RESIDUAL.format("")))
    if not downs and MID_RESIDUAL not in names:
        return ()
    expected = residual_names(len(downs))
    found = {*downs, *(names & {MID_RESIDUAL})}
    if not downs or set(expected) != found:
        raise ModelError(f"unet: ControlNet residual inputs must be {DOWN_RESIDUAL.format(0)}, "
                         f"{DOWN_RESIDUAL.format(1)}, … and {MID_RESIDUAL}; the graph has "
                         f"{', '.join(sorted(found))}")
    return expected


def _guidance_dim(session: Session) -> int:
    shape = session.inputs[GUIDANCE_INPUT].shape
    if len(shape) != 2 or not isinstance(shape[1], int) or shape[1] < 4:
        raise ModelError(f"unet: {GUIDANCE_INPUT!r} must be (batch, time_cond_proj_dim ≥ 4) "
                         f"with a fixed width, the graph has {list(shape)}")
    return shape[1]


class VaeDecoder:
    """VAE decoder: unscaled latents (B, 4, h, w) → images (B, 3, H, W) in [-1, 1]."""

    def __init__(self, session: Session) -> None:
        _require(session, "vae_decoder", {"latent_sample"}, {"sample"})
        self.session = session

    def __call__(self, latents: np.ndarray) -> np.ndarray:
        return self.session.run({"latent_sample": latents})["sample"]


class VaeEncoder:
    """VAE encoder: images (B, 3, H, W) in [-1, 1] → the latent mean (B, 4, h, w).

    optimum's graph returns mean‖logvar (`latent_parameters`); the legacy diffusers export
    returns an already sampled `latent_sample`. Both are accepted.
    """

    def __init__(self, session: Session) -> None:
        _require(session, "vae_encoder", {"sample"}, {"latent_parameters", "latent_sample"})
        self.session = session

    def __call__(self, images: np.ndarray) -> np.ndarray:
        return self.posterior(images)[0]

    def posterior(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(mean, std) of the latent Gaussian, both (B, C, h, w), as diffusers'
        DiagonalGaussianDistribution reads them (log-variance clamped to [-30, 20]); a graph
        that returns an already sampled `latent_sample` gives std 0."""
        out = self.session.run({"sample": images})
        if "latent_parameters" not in out:
            return out["latent_sample"], np.zeros_like(out["latent_sample"])
        mean, logvar = np.split(out["latent_parameters"], 2, axis=1)  # (B, 2C, h, w) → 2 × C
        return mean, np.exp(np.float32(0.5) * np.clip(logvar, -30.0, 20.0))
