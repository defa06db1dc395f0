"""Noise schedules from `scheduler_config.json` as immutable tables (k-diffusion's split).

Vocabulary: `t` training timestep, `sigma` noise level of x = x0 + sigma * eps (the "VE" form of
Karras et al. 2022; diffusers' DDIM/PNDM/DPM latents are x / sqrt(sigma² + 1)), `i` step index.
The tables copy diffusers' dtype choices (float32 betas and alphas_cumprod, float32 sigma tables,
float32 Euler timesteps) so that trajectories agree with diffusers' schedulers to ~1e-6.

The schedule types a sampler may run on apart from its own timesteps (A1111's "Schedule type":
Karras, Exponential, Uniform, SGM Uniform) are in `schedule_types`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from sdrt.runtime.errors import InputError, ModelError

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "v_prediction")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
KARRAS_RHO = 7.0  # Karras et al. 2022, eq. 5
CONSISTENCY_SIGMA_DATA = 0.5  # Song et al. 2023's sigma_data, which LCM keeps (Luo et al. 2023)
_UNSUPPORTED_FLAGS = {  # config flags whose diffusers behaviour the runtime does not implement
    "clip_sample": "clips latents to [-1, 1]",
    "thresholding": "dynamic thresholding is for pixel-space models",
    "rescale_betas_zero_snr": "zero terminal SNR needs an infinite sigma",
    # FlowMatchEulerDiscreteScheduler's options beyond SD 3's static shift
    "use_dynamic_shifting": "resolution-dependent mu is not implemented",
    "invert_sigmas": "inverted flow sigmas are not implemented",
    "stochastic_sampling": "stochastic flow sampling is not implemented",
    "use_exponential_sigmas": "exponential sigmas are not implemented",
    "use_beta_sigmas": "beta sigmas are not implemented",
}


@dataclass(frozen=True)
class SchedulerConfig:
    """The fields of diffusers' `scheduler_config.json` that shape a sampling run.

    `timestep_spacing` and `set_alpha_to_one` may be None (absent from the file): each sampler
    then uses the default of its diffusers class, as `Scheduler.from_config` does. `clip_sample`
    defaults to False here although DDIMScheduler's default is True: no latent model relies on it.
    `original_inference_steps` and `timestep_scaling` are LCMScheduler's (its defaults when the
    folder's scheduler is another class, as LCMScheduler.from_config gives them).
    """

    class_name: str | None = None
    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    trained_betas: tuple[float, ...] | None = None
    prediction_type: str = "epsilon"
    timestep_spacing: str | None = None
    steps_offset: int = 0
    set_alpha_to_one: bool | None = None
    use_karras_sigmas: bool = False
    clip_sample: bool = False
    thresholding: bool = False
    rescale_betas_zero_snr: bool = False
    original_inference_steps: int = 50
    timestep_scaling: float = 10.0
    shift: float = 1.0  # FlowMatchEulerDiscreteScheduler's timestep shift (sdrt.runtime.flow_match)
    use_dynamic_shifting: bool = False
    invert_sigmas: bool = False
    stochastic_sampling: bool = False
    use_exponential_sigmas: bool = False
    use_beta_sigmas: bool = False

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SchedulerConfig:
        """Keep the known keys of a diffusers scheduler config; `_class_name` becomes class_name."""
        known = {f.name for f in fields(cls)} - {"class_name"}
        kwargs = {key: value for key, value in data.items() if key in known}
        if isinstance(kwargs.get("trained_betas"), list):
            kwargs["trained_betas"] = tuple(kwargs["trained_betas"])
        return cls(class_name=data.get("_class_name"), **kwargs)

    @classmethod
    def from_file(cls, path: str | Path) -> SchedulerConfig:
        """Read `scheduler_config.json`; unreadable or non-object JSON is a ModelError."""
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ModelError(f"cannot read scheduler config {path}: {exc}") from None
        if not isinstance(data, dict):
            raise ModelError(f"scheduler config {path} must hold a JSON object")
        return cls.from_dict(data)

    def validate(self) -> None:
        """Raise ModelError with a one-line message on values the runtime cannot sample with."""
        problem = self._problem()
        if problem:
            raise ModelError(f"scheduler config: {problem}")

    def _problem(self) -> str | None:
        if not _is_int(self.num_train_timesteps) or self.num_train_timesteps < 2:
            return f"num_train_timesteps must be an integer ≥ 2, got {self.num_train_timesteps!r}"
        if self.prediction_type not in PREDICTION_TYPES:
            return (f"prediction_type {self.prediction_type!r} is not supported; "
                    f"expected one of {', '.join(PREDICTION_TYPES)}")
        for flag in ("set_alpha_to_one", "use_karras_sigmas", *_UNSUPPORTED_FLAGS):
            if not isinstance(getattr(self, flag), bool | None):
                return f"{flag} must be true or false, got {getattr(self, flag)!r}"
        if self.timestep_spacing not in (None, *TIMESTEP_SPACINGS):
            return (f"timestep_spacing {self.timestep_spacing!r} is not supported; "
                    f"expected one of {', '.join(TIMESTEP_SPACINGS)}")
        if not _is_int(self.steps_offset) or self.steps_offset < 0:
            return f"steps_offset must be an integer ≥ 0, got {self.steps_offset!r}"
        for flag, why in _UNSUPPORTED_FLAGS.items():
            if getattr(self, flag) is True:
                return f"{flag}=true is not supported ({why})"
        if not _is_int(self.original_inference_steps) \
                or not 1 <= self.original_inference_steps <= self.num_train_timesteps:
            return (f"original_inference_steps must be an integer in 1..{self.num_train_timesteps}"
                    f", got {self.original_inference_steps!r}")
        if not _is_number(self.timestep_scaling) or not 0 < self.timestep_scaling < math.inf:
            return f"timestep_scaling must be a positive number, got {self.timestep_scaling!r}"
        if not _is_number(self.shift) or not 0 < self.shift < math.inf:
            return f"shift must be a positive number, got {self.shift!r}"
        return self._beta_problem()

    def _beta_problem(self) -> str | None:
        if self.trained_betas is not None:
            try:
                betas = np.asarray(self.trained_betas, dtype=np.float64)
            except (TypeError, ValueError):
                return "trained_betas must be a list of numbers"
            if betas.shape != (self.num_train_timesteps,) or not ((betas > 0) & (betas < 1)).all():
                return (f"trained_betas must hold {self.num_train_timesteps} values in (0, 1), "
                        f"got {betas.size}")
            return None
        if self.beta_schedule not in BETA_SCHEDULES:
            return (f"beta_schedule {self.beta_schedule!r} is not supported; "
                    f"expected one of {', '.join(BETA_SCHEDULES)}")
        if self.beta_schedule != "squaredcos_cap_v2" and not (
            _is_number(self.beta_start) and _is_number(self.beta_end)
            and 0 < self.beta_start <= self.beta_end < 1
        ):
            return ("beta_start and beta_end must satisfy 0 < beta_start ≤ beta_end < 1, "
                    f"got {self.beta_start!r} and {self.beta_end!r}")
        return None


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# ---- training tables -------------------------------------------------------------------------


def _linspace_f32(start: float, end: float, n: int) -> np.ndarray:
    """torch.linspace(start, end, n, dtype=float32) on CPU: two-sided, each value one fused
    multiply-add rounded to float32 (float64 holds the float32 product exactly)."""
    lo, hi = float(np.float32(start)), float(np.float32(end))
    step = float(np.float32(np.float32(hi - lo) / np.float32(n - 1))) if n > 1 else 0.0
    idx = np.arange(n, dtype=np.float64)
    values = np.where(idx < n // 2, lo + step * idx, hi - step * (n - 1 - idx))
    return values.astype(np.float32)


def _cosine_betas(n: int, max_beta: float = 0.999) -> np.ndarray:
    """squaredcos_cap_v2: betas from alpha_bar(s) = cos²((s + 0.008) / 1.008 · π/2) (Nichol &
    Dhariwal 2021), each capped at max_beta."""
    def alpha_bar(s: np.ndarray) -> np.ndarray:
        return np.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

    s = np.arange(n, dtype=np.float64) / n
    betas = np.minimum(1 - alpha_bar(s + 1 / n) / alpha_bar(s), max_beta)
    return betas.astype(np.float32)


def betas(config: SchedulerConfig) -> np.ndarray:
    """Per-timestep betas (T,) in float32, as diffusers builds them."""
    n = config.num_train_timesteps
    if config.trained_betas is not None:
        return np.asarray(config.trained_betas, dtype=np.float32)
    if config.beta_schedule == "linear":
        return _linspace_f32(config.beta_start, config.beta_end, n)
    if config.beta_schedule == "scaled_linear":
        return _linspace_f32(config.beta_start**0.5, config.beta_end**0.5, n) ** 2
    return _cosine_betas(n)


def alphas_cumprod(config: SchedulerConfig) -> np.ndarray:
    """Cumulative product of 1 - beta (T,): float32 factors, accumulated in float64 as torch does
    for float32 cumprod, rounded to float32."""
    alphas = np.float32(1) - betas(config)  # (T,) float32
    return np.cumprod(alphas.astype(np.float64)).astype(np.float32)


def vp_to_sigma(alpha_cumprod: np.ndarray | float) -> np.ndarray:
    """Noise level of x = x0 + sigma * eps for a VP marginal with that alpha_cumprod, float64."""
    alpha = np.asarray(alpha_cumprod, dtype=np.float64)
    return np.sqrt((1 - alpha) / alpha)


def sigma_table(config: SchedulerConfig) -> np.ndarray:
    """sigma(t) for every training timestep t (T,), float32 like diffusers' Euler/DPM tables."""
    return vp_to_sigma(alphas_cumprod(config)).astype(np.float32)


def sigma_to_t(sigmas: np.ndarray, table: np.ndarray) -> np.ndarray:
    """Fractional training timestep of each sigma, interpolating linearly in log sigma."""
    log_table = np.log(table)  # (T,) float32, ascending
    log_sigma = np.log(np.maximum(np.asarray(sigmas, dtype=np.float64), 1e-10))
    low = np.clip(np.searchsorted(log_table, log_sigma, side="right") - 1, 0, len(table) - 2)
    w = np.clip((log_table[low] - log_sigma) / (log_table[low] - log_table[low + 1]), 0, 1)
    return (1 - w) * low + w * (low + 1)  # diffusers' rounding, which t = n + ½ cases meet


def karras_sigmas(sigma_min: float, sigma_max: float, n: int) -> np.ndarray:
    """n sigmas from sigma_max down to sigma_min, evenly spaced in sigma^(1/rho) (Karras et al.
    2022, eq. 5)."""
    ramp = np.linspace(0, 1, n)
    lo, hi = sigma_min ** (1 / KARRAS_RHO), sigma_max ** (1 / KARRAS_RHO)
    return (hi + ramp * (lo - hi)) ** KARRAS_RHO


def exponential_sigmas(sigma_min: float, sigma_max: float, n: int) -> np.ndarray:
    """n sigmas from sigma_max down to sigma_min, evenly spaced in log sigma (k-diffusion's
    get_sigmas_exponential)."""
    return np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), n))


def training_timesteps(config: SchedulerConfig, steps: int, spacing: str,
                       round_linspace: bool = True) -> np.ndarray:
    """Descending training timesteps (steps,) float64 for diffusers' `timestep_spacing` rule
    (Lin et al. 2023, table 2); `steps_offset` shifts only "leading"."""
    n_train = config.num_train_timesteps
    if spacing == "linspace":
        ts = np.linspace(0, n_train - 1, steps)
        return (ts.round() if round_linspace else ts)[::-1]
    if spacing == "leading":
        return (np.arange(steps) * (n_train // steps))[::-1] + float(config.steps_offset)
    return np.round(np.arange(n_train, 0, -n_train / steps)) - 1


# ---- per-run schedules -----------------------------------------------------------------------


@dataclass(frozen=True)
class Schedule:
    """One run's tables: step i calls the model at `timesteps[i]` on x at noise level `sigmas[i]`.

    Step i lands on `sigmas_to[i]`; only diffusers' DDIM and PNDM land elsewhere than
    `sigmas[i + 1]` (they step to t - T // steps whatever the spacing, then read the same
    x / sqrt(sigma² + 1) at the next listed timestep), and `relabel` makes that move.
    `noised[i]` is the level diffusers' `add_noise(x0, eps, timesteps[i])` noises to (inpainting
    with a 4-channel UNet re-noises the original to it): `sigmas[i]`, except where PNDM reads x
    at another timestep than the one it lists.
    """

    timesteps: tuple[float, ...]
    sigmas: tuple[float, ...]
    sigmas_to: tuple[float, ...]
    noised: tuple[float, ...]
    init_sigma: float  # txt2img starts at noise * init_sigma (diffusers' init_noise_sigma, as VE)
    vp_latents: bool  # diffusers hands out x / sqrt(sigma² + 1) (DDIM, PNDM, DPM), not x (Euler)

    def __len__(self) -> int:
        return len(self.timesteps)

    def initial(self, noise: np.ndarray, init_latents: np.ndarray | None) -> np.ndarray:
        """Starting x: scaled noise, or init_latents noised to sigmas[0] (diffusers' add_noise)."""
        noise = np.asarray(noise, dtype=np.float32)
        if init_latents is None:
            return noise * self.init_sigma
        return np.asarray(init_latents, dtype=np.float32) + noise * self.sigmas[0]

    def latents(self, x: np.ndarray, i: int) -> np.ndarray:
        """x at sigmas[i] in the form diffusers carries its latents (and hands to the VAE)."""
        return x / math.hypot(1.0, self.sigmas[i]) if self.vp_latents else x

    def from_latents(self, latents: np.ndarray, i: int) -> np.ndarray:
        """x at sigmas[i] from diffusers' latents there (the inverse of `latents`)."""
        latents = np.asarray(latents, dtype=np.float32)
        return latents * np.float32(math.hypot(1.0, self.sigmas[i])) if self.vp_latents \
            else latents

    def relabel(self, x: np.ndarray, i: int) -> np.ndarray:
        """x landed on sigmas_to[i], re-read at sigmas[i + 1] keeping x / sqrt(sigma² + 1)."""
        return rescale_vp(x, self.sigmas_to[i], self.sigmas[i + 1])


def rescale_vp(x: np.ndarray, sigma_from: float, sigma_to: float) -> np.ndarray:
    """Re-read x from noise level sigma_from at sigma_to, keeping x / sqrt(sigma² + 1) fixed."""
    if sigma_from == sigma_to:
        return x
    return x * (math.hypot(1.0, sigma_to) / math.hypot(1.0, sigma_from))


def _make(timesteps: np.ndarray, sigmas: np.ndarray, sigmas_to: np.ndarray, init_sigma: float,
          vp_latents: bool, start: int, noised: np.ndarray | None = None) -> Schedule:
    """Schedule from full tables from step `start` on (diffusers img2img's timesteps[start:])."""
    n = len(timesteps)
    noised = sigmas[:n] if noised is None else noised
    return Schedule(tuple(float(t) for t in timesteps[start:]),
                    tuple(float(s) for s in sigmas[start:]),
                    tuple(float(s) for s in sigmas_to[start:]),
                    tuple(float(s) for s in noised[start:]), init_sigma, vp_latents)


def _final_alpha(config: SchedulerConfig, default_one: bool, alphas: np.ndarray) -> float:
    one = default_one if config.set_alpha_to_one is None else config.set_alpha_to_one
    return 1.0 if one else float(alphas[0])


def _sigma_at(alphas: np.ndarray, ts: np.ndarray, final_alpha: float) -> np.ndarray:
    """sigma at integer timesteps; t < 0 reads final_alpha (diffusers' DDIM/PNDM rule) and t ≥ T
    (only "leading" with steps_offset and steps = T) the last entry."""
    clipped = alphas[np.clip(ts, 0, len(alphas) - 1)]
    return vp_to_sigma(np.where(ts >= 0, clipped, final_alpha))


def ddim_schedule(config: SchedulerConfig, steps: int, start: int = 0) -> Schedule:
    """DDIMScheduler's run (Song et al. 2020): t_i by the spacing rule, each step to t_i - T//n."""
    alphas = alphas_cumprod(config)
    ts = training_timesteps(config, steps, config.timestep_spacing or "leading").astype(np.int64)
    final = _final_alpha(config, True, alphas)
    sigmas_to = _sigma_at(alphas, ts - config.num_train_timesteps // steps, final)
    sigmas = np.append(_sigma_at(alphas, ts, final), sigmas_to[-1])
    return _make(ts, sigmas, sigmas_to, math.hypot(1.0, sigmas[start]), True, start)


def pndm_schedule(config: SchedulerConfig, steps: int, start: int = 0) -> Schedule:
    """PNDMScheduler's PLMS run with skip_prk_steps (Liu et al. 2022): steps + 1 model calls.

    The second timestep is listed twice; the call at its first copy (relative call 1) restarts
    from the first latents read at t + T//n and lands on t (a Heun-like first step).
    """
    alphas = alphas_cumprod(config)
    ratio = config.num_train_timesteps // steps
    asc = training_timesteps(config, steps, config.timestep_spacing or "leading")[::-1]
    ts = np.concatenate([asc[:-1], asc[-2:-1], asc[-1:]])[::-1][start:].astype(np.int64)
    read, land = ts.copy(), ts - ratio
    if len(ts) > 1:
        read[1], land[1] = ts[1] + ratio, ts[1]
    final = _final_alpha(config, False, alphas)
    sigmas_to = _sigma_at(alphas, land, final)
    sigmas = np.append(_sigma_at(alphas, read, final), sigmas_to[-1])
    return _make(ts, sigmas, sigmas_to, math.hypot(1.0, sigmas[0]), True, 0,
                 noised=_sigma_at(alphas, ts, final))


def euler_schedule(config: SchedulerConfig, steps: int, start: int = 0) -> Schedule:
    """Euler(-ancestral)DiscreteScheduler's run: float32 timesteps, sigmas interpolated in t.

    init_noise_sigma is sqrt(sigma_max² + 1) for "leading" spacing but sigma_max otherwise.
    """
    ts = training_timesteps(config, steps, config.timestep_spacing or "linspace",
                            round_linspace=False).astype(np.float32)
    table = sigma_table(config)
    sigmas = np.append(np.interp(ts, np.arange(len(table)), table), 0.0).astype(np.float32)
    return _make(ts, sigmas, sigmas[1:], _euler_init_sigma(config, float(sigmas[0])), False,
                 start)


def euler_ladder_schedule(config: SchedulerConfig, sigmas: np.ndarray,
                          start: int = 0) -> Schedule:
    """Euler(-ancestral) tables on another schedule's sigmas: each called at its fractional
    timestep, as EulerDiscreteScheduler does with use_karras_sigmas / use_exponential_sigmas."""
    ts = sigma_to_t(sigmas, sigma_table(config)).astype(np.float32)
    sigmas = np.append(sigmas, 0.0).astype(np.float32)
    return _make(ts, sigmas, sigmas[1:], _euler_init_sigma(config, float(sigmas[0])), False,
                 start)


def _euler_init_sigma(config: SchedulerConfig, sigma_max: float) -> float:
    """Euler's init_noise_sigma: sqrt(sigma_max² + 1) for "leading" spacing, else sigma_max."""
    leading = (config.timestep_spacing or "linspace") == "leading"
    return math.hypot(1.0, sigma_max) if leading else sigma_max


def dpm_schedule(config: SchedulerConfig, steps: int, start: int = 0) -> Schedule:
    """DPMSolverMultistepScheduler's run: its own n + 1 point spacing, final sigma 0."""
    table = sigma_table(config)
    spacing = config.timestep_spacing or "linspace"
    ts = (training_timesteps(config, steps, spacing) if spacing == "trailing"
          else training_timesteps(config, steps + 1, spacing)[:-1])
    return _dpm_tables(ts, np.interp(ts, np.arange(len(table)), table), start)


def dpm_ladder_schedule(config: SchedulerConfig, sigmas: np.ndarray,
                        start: int = 0) -> Schedule:
    """DPMSolverMultistepScheduler's run on another schedule's sigmas (its use_karras_sigmas for
    Karras's): each sigma called at the nearest training timestep."""
    ts = sigma_to_t(sigmas, sigma_table(config))
    # diffusers rounds, except for squaredcos_cap_v2 where its int64 cast truncates
    ts = np.trunc(ts) if config.beta_schedule == "squaredcos_cap_v2" else np.round(ts)
    return _dpm_tables(ts, sigmas, start)


def _dpm_tables(ts: np.ndarray, sigmas: np.ndarray, start: int) -> Schedule:
    sigmas = np.append(sigmas, 0.0).astype(np.float32)
    return _make(ts, sigmas, sigmas[1:], math.hypot(1.0, float(sigmas[start])), True, start)


@dataclass(frozen=True)
class ConsistencySchedule(Schedule):
    """A Schedule with each step's consistency-model boundary scalings (Song et al. 2023, §3):
    a step's estimate is c_skip · (x's VP latents) + c_out · D(x), which is x itself at t = 0."""

    c_skip: tuple[float, ...]
    c_out: tuple[float, ...]


def lcm_schedule(config: SchedulerConfig, steps: int, start: int = 0) -> ConsistencySchedule:
    """LCMScheduler's run (Luo et al. 2023): `steps` timesteps taken evenly by index from the
    skipping-step schedule t = k·j − 1 (j = original_inference_steps … 1, k = T // that one),
    boundary scalings at t · timestep_scaling; the last step lands on sigma 0."""
    original = config.original_inference_steps
    if steps > original:
        raise InputError(f"sampler 'lcm' takes at most original_inference_steps ({original}) "
                         f"steps, got {steps}")
    skipping = np.arange(original, 0, -1) * (config.num_train_timesteps // original) - 1
    ts = skipping[np.floor(np.linspace(0, original, steps, endpoint=False)).astype(np.int64)]
    sigmas = np.append(vp_to_sigma(alphas_cumprod(config)[ts]), 0.0)
    scaled = ts * float(config.timestep_scaling)
    c_skip = CONSISTENCY_SIGMA_DATA**2 / (scaled**2 + CONSISTENCY_SIGMA_DATA**2)
    c_out = scaled / np.sqrt(scaled**2 + CONSISTENCY_SIGMA_DATA**2)
    base = _make(ts, sigmas, sigmas[1:], math.hypot(1.0, sigmas[start]), True, start)
    return ConsistencySchedule(**vars(base), c_skip=tuple(float(c) for c in c_skip[start:]),
                               c_out=tuple(float(c) for c in c_out[start:]))


# ---- schedule types ----------------------------------------------------------------------------

# The schedule types (A1111's "Schedule type") live in schedule_types.py, which builds on this
# module; these names stay importable from here, read from there on first use (no import cycle).
_SCHEDULE_TYPE_NAMES = ("AUTOMATIC", "SCHEDULES", "ScheduleType", "karras_ladder",
                        "exponential_ladder", "resolve_schedule", "schedule_infotext")


def __getattr__(name: str) -> Any:
    if name in _SCHEDULE_TYPE_NAMES:
        from sdrt.runtime import schedule_types

        return getattr(schedule_types, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
