"""Calibration data for static quantization: graph inputs recorded from real fp32 pipeline runs.

Static int8 quantization (Jacob et al. 2018) fixes each activation's range ahead of time, so the
ranges must come from the inputs the graph really sees: the UNet's latents at every noise level,
its timesteps and text conditioning over a prompt set; the VAE decoder's, the final latents of
the same runs, unscaled as the decoder receives them (one call per image). They are recorded by
wrapping the component's Session (capture is a decorator around a Session, so the sampler loop
stays as it runs in production).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np

from sdrt.runtime.components import UNet, VaeDecoder
from sdrt.runtime.pipeline import Pipeline
from sdrt.runtime.request import GenerationRequest
from sdrt.runtime.session import Session

log = logging.getLogger(__name__)

Feeds = dict[str, np.ndarray]
# Components whose calibration inputs `record_inputs` can capture (the graphs the sampler loop
# and the decoder drive); text encoders are quantized dynamically and need none.
RECORDABLE = ("unet", "vae_decoder")


class RecordingSession:
    """A Session that keeps a copy of every feed, cast to the graph's dtypes, then runs it."""

    def __init__(self, inner: Session) -> None:
        self.inner = inner
        self.inputs = inner.inputs
        self.outputs = inner.outputs
        self.feeds: list[Feeds] = []

    def run(self, feeds: Feeds) -> dict[str, np.ndarray]:
        self.feeds.append({name: np.array(value, dtype=self.inputs[name].dtype)
                           for name, value in feeds.items()})
        return self.inner.run(feeds)


def record_inputs(folder: Path, backend: str, components: tuple[str, ...], prompts: list[str], *,
                  steps: int | None = None, size: int | None = None, seed: int = 0,
                  guidance_factors: tuple[float, ...] = (1.0,)) -> dict[str, list[Feeds]]:
    """Every feed the fp32 pipeline gives each of `components` while generating `prompts`
    (image i with seed seed+i, the family's sampler, and guidance_factors[i % n] × the model's
    guidance scale; `size`² pixels or native). Several factors record the UNet under the
    guidance scales users set: its activations change with the scale as with the timestep
    (Q-Diffusion, Li et al. 2023, calibrates over the whole trajectory for that reason)."""
    unknown = sorted(set(components) - set(RECORDABLE))
    if unknown:
        raise ValueError(f"cannot record calibration inputs of {unknown}")
    pipe = Pipeline.load(folder, backend)
    recorders = {name: RecordingSession(getattr(pipe, name).session) for name in components}
    if "unet" in recorders:
        pipe = dataclasses.replace(pipe, denoiser=UNet(recorders["unet"],
                                                       pipe.denoiser.residual_levels))
    if "vae_decoder" in recorders:
        pipe = dataclasses.replace(pipe, vae_decoder=VaeDecoder(recorders["vae_decoder"]))
    scale = GenerationRequest("").resolve(pipe.facts, pipe.scheduler).guidance_scale
    for i, prompt in enumerate(prompts):
        pipe.generate(prompt, seed=seed + i, steps=steps, width=size, height=size,
                      guidance_scale=scale * guidance_factors[i % len(guidance_factors)])
    recorded = {name: recorder.feeds for name, recorder in recorders.items()}
    log.info("calibration: %s", ", ".join(f"{len(v)} {k} calls" for k, v in recorded.items()))
    return recorded
