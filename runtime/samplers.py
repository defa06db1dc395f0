"""NumPy samplers over a `Schedule` (k-diffusion's split), each matching a diffusers scheduler.

Every sampler has one signature, `run(denoise, x, schedule, *, noise, callback) -> x`, works on
x = x0 + sigma * eps and sits in `SAMPLERS`, so the pipeline never branches on the sampler. A
sampler calls `x = callback(i, x, denoised)` after each model call, goes on from the x it gets
back (inpainting replaces the latents outside the mask there) and returns `denoised` at once
when it gets None. `sample()` turns x into diffusers' own latents for callers.

The schedule (`schedule_types.SCHEDULES`: automatic, karras, …) is chosen apart from the
sampler, as k-diffusion and A1111's "Schedule type" do; a name that ends in one
("dpmpp_2m_karras", A1111's "DPM++ 2M Karras") stands for that pair. The registry also holds
k_samplers' Heun, LMS and DPM2, unipc's UniPC and sde_samplers' stochastic samplers.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

import numpy as np

from sdrt.runtime.errors import InputError
from sdrt.runtime.flow_match import (
    FlowDenoiser,
    flow_match_schedule,
    is_flow_matching,
    sample_flow_euler,
)
from sdrt.runtime.guidance import Denoiser, ModelFn
from sdrt.runtime.k_samplers import (
    dpm2_ladder_schedule,
    heun_ladder_schedule,
    heun_schedule,
    lms_ladder_schedule,
    lms_schedule,
    sample_dpm2,
    sample_heun,
    sample_lms,
)
from sdrt.runtime.sampler_spec import NoiseFn, SamplerSpec, StepFn
from sdrt.runtime.schedule_types import AUTOMATIC, SCHEDULES, resolve_schedule
from sdrt.runtime.schedules import (
    ConsistencySchedule,
    Schedule,
    SchedulerConfig,
    ddim_schedule,
    dpm_ladder_schedule,
    dpm_schedule,
    euler_ladder_schedule,
    euler_schedule,
    lcm_schedule,
    pndm_schedule,
    rescale_vp,
)
from sdrt.runtime.sde_samplers import SDE_SAMPLERS
from sdrt.runtime.unipc import sample_unipc, unipc_ladder_schedule, unipc_schedule

log = logging.getLogger(__name__)
UserCallback = Callable[[int, int, np.ndarray], bool | None]  # (i, n, latents) -> stop?
DEFAULT_SAMPLER = "euler"  # for scheduler classes we do not know: first order, any schedule
# Adams–Bashforth weights on the newest-first model outputs, and their divisor.
_ADAMS_BASHFORTH = {1: ((1,), 1), 2: ((3, -1), 2), 3: ((23, -16, 5), 12),
                    4: ((55, -59, 37, -9), 24)}


def sample_euler(denoise: Denoiser, x: np.ndarray, sched: Schedule, *, noise: NoiseFn | None,
                 callback: StepFn) -> np.ndarray:
    """Euler's method on dx/dsigma = eps (Karras et al. 2022, alg. 1); on diffusers' DDIM tables
    this is DDIM with eta = 0 (Song et al. 2020)."""
    for i in range(len(sched)):
        denoised, eps = denoise(x, sched.sigmas[i], sched.timesteps[i])
        x = sched.relabel(x + (sched.sigmas_to[i] - sched.sigmas[i]) * eps, i)
        x = callback(i, x, denoised)
        if x is None:
            return denoised
    return x


def sample_euler_ancestral(denoise: Denoiser, x: np.ndarray, sched: Schedule, *,
                           noise: NoiseFn | None, callback: StepFn) -> np.ndarray:
    """Ancestral Euler (k-diffusion; Ho et al. 2020): Euler to sigma_down, then fresh noise of
    std sigma_up, drawn every step (the last too, as diffusers does) after the Euler move."""
    if noise is None:
        raise InputError("sampler 'euler_a' draws noise every step; pass step_noise")
    for i in range(len(sched)):
        sigma, sigma_next = sched.sigmas[i], sched.sigmas[i + 1]
        denoised, eps = denoise(x, sigma, sched.timesteps[i])
        sigma_up = sigma_next * math.sqrt(sigma**2 - sigma_next**2) / sigma
        sigma_down = sigma_next**2 / sigma  # = sqrt(sigma_next² - sigma_up²)
        x = x + (sigma_down - sigma) * eps
        x = x + np.asarray(noise(x.shape), dtype=np.float32) * sigma_up
        x = callback(i, x, denoised)
        if x is None:
            return denoised
    return x


def sample_plms(denoise: Denoiser, x: np.ndarray, sched: Schedule, *, noise: NoiseFn | None,
                callback: StepFn) -> np.ndarray:
    """PLMS (Liu et al. 2022) as diffusers' PNDM with skip_prk_steps: a trial DDIM step, a
    Heun-like restart from the first latents with the mean output, then Adams–Bashforth (order
    ≤ 4) on raw model outputs, each a DDIM step with the combined output."""
    first, history = x, []  # history: raw outputs newest last; call 1's output is not kept
    for i in range(len(sched)):
        out = denoise.output(x, sched.sigmas[i], sched.timesteps[i])
        if i == 1:
            out = (out + history[0]) / 2
            x = rescale_vp(first, sched.sigmas[0], sched.sigmas[1])
        else:
            history = [*history[-3:], out]
            weights, divisor = _ADAMS_BASHFORTH[len(history)]
            out = sum(w * h for w, h in zip(weights, reversed(history), strict=False)) / divisor
        denoised, eps = denoise.split(out, x, sched.sigmas[i])
        x = sched.relabel(denoised + sched.sigmas_to[i] * eps, i)
        x = callback(i, x, denoised)
        if x is None:
            return denoised
    return x


def sample_dpmpp_2m(denoise: Denoiser, x: np.ndarray, sched: Schedule, *, noise: NoiseFn | None,
                    callback: StepFn) -> np.ndarray:
    """DPM-Solver++(2M) (Lu et al. 2022), midpoint form: first order on the first step, and the
    step to sigma 0 returns the denoised estimate (diffusers' lower_order_final)."""
    previous = None
    for i in range(len(sched)):
        sigma, sigma_next = sched.sigmas[i], sched.sigmas[i + 1]
        denoised, _ = denoise(x, sigma, sched.timesteps[i])
        if sigma_next == 0:
            x = denoised
        else:
            estimate = denoised
            # second order needs two real steps: r = h_{i-1} / h_i, h = log-SNR step length
            if previous is not None and sched.sigmas[i - 1] > sigma > sigma_next:
                r = math.log(sched.sigmas[i - 1] / sigma) / math.log(sigma / sigma_next)
                estimate = denoised + (denoised - previous) * (0.5 / r)
            x = x * (sigma_next / sigma) + estimate * (1.0 - sigma_next / sigma)
        previous = denoised
        x = callback(i, x, denoised)
        if x is None:
            return denoised
    return x


def sample_lcm(denoise: Denoiser, x: np.ndarray, sched: ConsistencySchedule, *,
               noise: NoiseFn | None, callback: StepFn) -> np.ndarray:
    """Multistep latent consistency sampling (Luo et al. 2023; Song et al. 2023, alg. 1): each
    step's boundary-conditioned estimate is noised afresh to the next level, the last returned.
    On a UNet distilled without the guidance input (LCM-LoRA) it is the same loop."""
    if noise is None:
        raise InputError("sampler 'lcm' draws noise between steps; pass step_noise")
    for i in range(len(sched)):
        sigma_next = sched.sigmas[i + 1]
        denoised, _ = denoise(x, sched.sigmas[i], sched.timesteps[i])
        denoised = sched.c_skip[i] * sched.latents(x, i) + sched.c_out[i] * denoised
        x = denoised
        if sigma_next > 0:  # every step but the last, as diffusers draws it
            x = denoised + np.asarray(noise(x.shape), dtype=np.float32) * sigma_next
        x = callback(i, x, denoised)
        if x is None:
            return denoised
    return x


SAMPLERS: Mapping[str, SamplerSpec] = MappingProxyType({
    "ddim": SamplerSpec(sample_euler, ddim_schedule, "DDIM", "DDIMScheduler"),
    "pndm": SamplerSpec(sample_plms, pndm_schedule, "PLMS", "PNDMScheduler"),
    "euler": SamplerSpec(sample_euler, euler_schedule, "Euler", "EulerDiscreteScheduler",
                         euler_ladder_schedule),
    "euler_a": SamplerSpec(sample_euler_ancestral, euler_schedule, "Euler a",
                           "EulerAncestralDiscreteScheduler", euler_ladder_schedule),
    "dpmpp_2m": SamplerSpec(sample_dpmpp_2m, dpm_schedule, "DPM++ 2M",
                            "DPMSolverMultistepScheduler", dpm_ladder_schedule),
    "lcm": SamplerSpec(sample_lcm, lcm_schedule, "LCM", "LCMScheduler"),
    "flow_euler": SamplerSpec(sample_flow_euler, flow_match_schedule, "Flow Euler",
                              "FlowMatchEulerDiscreteScheduler", flow=True),
    # A1111's k-diffusion and UniPC samplers; "Automatic" is A1111's meaning of each name
    "unipc": SamplerSpec(sample_unipc, unipc_schedule, "UniPC", "UniPCMultistepScheduler",
                         unipc_ladder_schedule),
    "heun": SamplerSpec(sample_heun, heun_schedule, "Heun", "HeunDiscreteScheduler",
                        heun_ladder_schedule, second_order=True),
    "lms": SamplerSpec(sample_lms, lms_schedule, "LMS", "LMSDiscreteScheduler",
                       lms_ladder_schedule),
    "dpm2": SamplerSpec(sample_dpm2, None, "DPM2", "KDPM2DiscreteScheduler",
                        dpm2_ladder_schedule, second_order=True, automatic="karras",
                        discard_penultimate=True),
    **SDE_SAMPLERS,
})
# Names that bound a schedule to a sampler before the two were chosen apart (sdrt's own, and
# A1111's before 1.9), listed with the sampler names; any "<sampler> <schedule>" works as well.
PAIR_NAMES: Mapping[str, tuple[str, str]] = MappingProxyType({
    "dpmpp_2m_karras": ("dpmpp_2m", "karras"),
})


def _names() -> dict[str, tuple[str, str]]:
    """Every accepted spelling, lower case → (sampler, schedule): the canonical, A1111 and
    diffusers class names, each also followed by a schedule's name or label (A1111's
    `get_sampler_and_scheduler` splits such names)."""
    alone = {name: name for name in SAMPLERS} | {"plms": "pndm"}
    for name, spec in SAMPLERS.items():  # a class several samplers run on names the first
        for alias in (spec.display, spec.diffusers_class):
            if alias is not None:
                alone.setdefault(alias.lower(), name)
    names = {alias: (name, AUTOMATIC) for alias, name in alone.items()}
    for schedule, row in SCHEDULES.items():
        if row.ladder is not None:
            for alias, name in alone.items():
                names |= {f"{alias}{sep}{suffix}": (name, schedule) for sep in " _"
                          for suffix in (schedule, row.label.lower())}
    return names | dict(PAIR_NAMES)


_NAMES: Mapping[str, tuple[str, str]] = MappingProxyType(_names())


def sampler_names() -> list[str]:
    """The sampler names to offer: each sampler, followed by its `PAIR_NAMES`."""
    return [named for name in SAMPLERS
            for named in (name, *(pair for pair, (base, _) in PAIR_NAMES.items()
                                  if base == name))]


def resolve_pair(sampler: str, schedule: str | None = None) -> tuple[str, str]:
    """(sampler, schedule) keys for a sampler name (canonical, A1111 or diffusers class, any
    case, perhaps ending in a schedule) and a schedule name or A1111 label; an automatic or
    absent schedule leaves the one the name gives."""
    pair = _NAMES.get(str(sampler).strip().lower())
    if pair is None:
        raise InputError(f"unknown sampler {sampler!r}; choose one of: "
                         f"{', '.join(spec.display for spec in SAMPLERS.values())}")
    name, named = pair
    chosen = resolve_schedule(schedule)
    if AUTOMATIC not in (chosen, named) and chosen != named:
        raise InputError(f"sampler {sampler!r} names schedule '{named}', not '{chosen}'")
    chosen = named if chosen == AUTOMATIC else chosen
    if chosen != AUTOMATIC and SAMPLERS[name].ladder is None:
        takers = [spec.display for spec in SAMPLERS.values() if spec.ladder is not None]
        raise InputError(f"sampler '{name}' runs on its own timesteps only (schedule "
                         f"automatic); schedule '{chosen}' takes: {', '.join(takers)}")
    return name, chosen


def schedules_for(sampler: str) -> list[str]:
    """The `SCHEDULES` a sampler runs on: every one, or automatic alone (its own timesteps)."""
    takes_any = SAMPLERS[resolve_pair(sampler)[0]].ladder is not None
    return [name for name, row in SCHEDULES.items() if takes_any or row.ladder is None]


def resolve_sampler(name: str) -> str:
    """Canonical name for a sampler name (canonical, A1111 or diffusers class, any case):
    the sampler's, or "<sampler>_<schedule>" where the name binds a schedule."""
    sampler, schedule = resolve_pair(name)
    return sampler if schedule == AUTOMATIC else f"{sampler}_{schedule}"


def make_schedule(config: SchedulerConfig, sampler: str, steps: int, start: int = 0,
                  schedule: str | None = None) -> Schedule:
    """A run's tables from step `start` on: the sampler's own, or its tables on the schedule's
    sigma ladder (the one A1111's "Automatic" means for it where it names one), made for
    steps + 1 without the last sigma where the sampler discards it (A1111's DPM2)."""
    name, schedule = resolve_pair(sampler, schedule)
    spec = SAMPLERS[name]
    first = first_call(name, start)
    ladder = SCHEDULES[spec.automatic if schedule == AUTOMATIC and spec.automatic
                       else schedule].ladder
    if ladder is None:
        return spec.schedule(config, steps, first)
    extra = 1 if spec.discard_penultimate else 0
    return spec.ladder(config, ladder(config, steps + extra)[:steps], first)


def default_sampler(config: SchedulerConfig) -> str:
    """The sampler of the model folder's own scheduler class; DEFAULT_SAMPLER for other classes.

    EulerDiscreteScheduler maps to "euler" even with use_karras_sigmas, as before schedules
    were chosen apart (schedule "karras" asks for its Karras sigmas); only
    DPMSolverMultistepScheduler's flag selects "dpmpp_2m_karras" (dpmpp_2m on karras).
    """
    name, _ = _NAMES.get(str(config.class_name or "").lower(), (None, AUTOMATIC))
    if name is None:
        log.info("no sampler for scheduler class %r; using %s", config.class_name, DEFAULT_SAMPLER)
        return DEFAULT_SAMPLER
    if name == "dpmpp_2m" and config.use_karras_sigmas:
        return "dpmpp_2m_karras"
    return name


def display_name(sampler: str) -> str:
    """A1111's name for a sampler ("Euler a", "PLMS", ...), with the schedule's label when the
    name binds one ("DPM++ 2M Karras", as A1111 named it before 1.9)."""
    name, schedule = resolve_pair(sampler)
    shown = SAMPLERS[name].display
    return shown if schedule == AUTOMATIC else f"{shown} {SCHEDULES[schedule].label}"


def num_model_calls(sampler: str, steps: int, start_step: int = 0) -> int:
    """Model calls of a run from step `start_step` on: `steps`, but PNDM's PLMS makes
    steps + 1 when steps ≥ 2, and second-order samplers two a step but the last (Euler's)."""
    name = resolve_pair(sampler)[0]
    if SAMPLERS[name].second_order:
        return 2 * (steps - start_step) - 1
    calls = steps + 1 if name == "pndm" and steps > 1 else steps
    return calls - start_step


def first_call(sampler: str, start_step: int) -> int:
    """The model call step `start_step` begins with (diffusers' t_start · scheduler order)."""
    return 2 * start_step if SAMPLERS[resolve_pair(sampler)[0]].second_order else start_step


def start_step_for_strength(steps: int, strength: float) -> int:
    """First step of an image-to-image run, as diffusers' img2img pipeline picks it."""
    return steps - min(int(steps * strength), steps)


@dataclass(frozen=True)
class KeepOutside:
    """Inpainting with an ordinary (4-channel) UNet, as diffusers' StableDiffusionInpaintPipeline
    does it: after every step the latents where `mask` is 0 become the original's, noised with
    the run's starting noise to the level of the next step (left clean after the last one)."""

    mask: np.ndarray  # (B, 1, h, w): 1 where the sampler generates, 0 where the original stays
    latents: np.ndarray  # (B, C, h, w): the original image's scaled VAE latents
    noise: np.ndarray  # (B, C, h, w): the noise the run started from

    def apply(self, sched: Schedule, j: int, x: np.ndarray) -> np.ndarray:
        """x at sigmas[j] with the original put back outside the mask (in diffusers' latents)."""
        latents = sched.latents(x, j)
        original = self.latents
        if j < len(sched):  # diffusers' add_noise(original, noise, timesteps[j])
            level = sched.noised[j]
            original = self.latents + self.noise * np.float32(level)
            if sched.vp_latents:
                original = original / np.float32(math.hypot(1.0, level))
        blended = (1 - self.mask) * original + self.mask * latents
        return blended * math.hypot(1.0, sched.sigmas[j]) if sched.vp_latents else blended


def sample(model: ModelFn, noise: np.ndarray, *, config: SchedulerConfig,
           sampler: str = "euler_a", steps: int = 20, step_noise: NoiseFn | None = None,
           callback: UserCallback | None = None, start_step: int = 0,
           init_latents: np.ndarray | None = None,
           keep: KeepOutside | None = None, end_step: int | None = None,
           add_noise: bool = True, schedule: str | None = None) -> np.ndarray:
    """Run a sampler from noise (or, for image-to-image, from init_latents noised to the level of
    step `start_step`) and return float32 latents as diffusers hands them to the VAE; `keep`
    puts an original back outside a mask after every step (4-channel inpainting).

    diffusers' denoising_end/denoising_start (SDXL base → refiner): `end_step` stops the run
    after model call `end_step` - 1 and returns the latents there, still noisy; `add_noise=False`
    takes init_latents as such latents, already at step `start_step`'s level (no noise added).
    `start_step` counts steps; a second-order sampler starts at model call 2·start_step, as
    diffusers' img2img takes t_start · order (`first_call`), and `end_step` counts calls.

    `callback(i, n, latents)` runs after every model call (n = calls of this run); when it
    returns True the run stops and the current denoised estimate is returned. `schedule` (a
    `SCHEDULES` name or A1111 label) replaces the sampler's own sigmas where it takes others.
    """
    config.validate()
    name, schedule = resolve_pair(sampler, schedule)
    _check_run(config, name, steps, start_step, noise, init_latents, keep)
    _check_flow(config, name, init_latents, keep)
    first = first_call(name, start_step)
    _check_handover(num_model_calls(name, steps), first, end_step, add_noise, init_latents)
    spec = SAMPLERS[name]
    sched = make_schedule(config, name, steps, start_step, schedule)
    stopped, handed = False, None

    def on_step(i: int, x: np.ndarray, denoised: np.ndarray) -> np.ndarray | None:
        nonlocal stopped, handed
        if keep is not None:
            x = keep.apply(sched, i + 1, x)
        if callback is not None and callback(i, len(sched), sched.latents(x, i + 1)):
            stopped = True
            return None
        if end_step is not None and first + i + 1 == end_step:
            handed = sched.latents(x, i + 1)
            return None
        return x

    start = sched.initial(noise, init_latents) if add_noise \
        else sched.from_latents(init_latents, 0)
    denoiser = FlowDenoiser(model) if spec.flow else Denoiser(model, config.prediction_type)
    x = spec.run(denoiser, start, sched, noise=step_noise, callback=on_step)
    if handed is not None:
        return handed
    return x if stopped else sched.latents(x, len(sched))


def _check_flow(config: SchedulerConfig, name: str, init_latents: np.ndarray | None,
                keep: KeepOutside | None) -> None:
    """Flow samplers need a flow-matching config, and the others refuse one; flow matching here
    runs text-to-image only."""
    flow = SAMPLERS[name].flow
    if flow != is_flow_matching(config):
        wanted = "a flow-matching (SD 3)" if flow else "a diffusion (SD 1.x/2.x/XL)"
        fits = [n for n, spec in SAMPLERS.items() if spec.flow != flow]
        raise InputError(f"sampler '{name}' needs {wanted} model; this model's scheduler "
                         f"{config.class_name} takes: {', '.join(fits)}")
    if flow and (init_latents is not None or keep is not None):
        raise InputError(f"sampler '{name}' runs text-to-image only here (no image input)")


def _check_handover(calls: int, start_step: int, end_step: int | None, add_noise: bool,
                    init_latents: np.ndarray | None) -> None:
    if end_step is not None and (isinstance(end_step, bool) or not isinstance(end_step, int)
                                 or not start_step < end_step <= calls):
        raise InputError(f"end_step must be an integer in {start_step + 1}..{calls}, "
                         f"got {end_step!r}")
    if not add_noise and init_latents is None:
        raise InputError("add_noise=False needs init_latents (the latents to go on from)")


def _check_run(config: SchedulerConfig, name: str, steps: int, start_step: int,
               noise: np.ndarray, init_latents: np.ndarray | None,
               keep: KeepOutside | None) -> None:
    limit = config.num_train_timesteps
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= limit:
        raise InputError(f"steps must be an integer in 1..{limit}, got {steps!r}")
    # a run may start at any step that leaves a model call
    starts = steps if SAMPLERS[name].second_order else num_model_calls(name, steps)
    if isinstance(start_step, bool) or not isinstance(start_step, int) \
            or not 0 <= start_step < starts:
        raise InputError(f"start_step must be an integer in 0..{starts - 1}, got {start_step!r}")
    if start_step and init_latents is None:
        raise InputError("start_step > 0 needs init_latents to start from")
    if init_latents is not None and np.shape(init_latents) != np.shape(noise):
        raise InputError(f"init_latents must have the noise's shape {np.shape(noise)}, "
                         f"got {np.shape(init_latents)}")
    if keep is not None and (keep.latents.shape != np.shape(noise)
                             or keep.noise.shape != np.shape(noise)
                             or keep.mask.shape != (noise.shape[0], 1, *noise.shape[2:])):
        raise InputError(f"keep's latents, noise and mask must fit the noise's shape "
                         f"{np.shape(noise)}, got {keep.latents.shape}, {keep.noise.shape} and "
                         f"{keep.mask.shape}")
