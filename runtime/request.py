"""One generation request: what a caller asks for, its defaults filled from the model's family
and every field checked with a one-line error naming it (an HTTP client may send anything)."""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass, replace

from sdrt.runtime import variation
from sdrt.runtime.adapters.adapted import LoraRequest
from sdrt.runtime.control.unit import ControlUnit, control_units
from sdrt.runtime.errors import InputError
from sdrt.runtime.hires import HiresFix
from sdrt.runtime.model.folder import ModelFacts
from sdrt.runtime.prompts import PromptStyle, extract_networks
from sdrt.runtime.rng import GENERATORS
from sdrt.runtime.samplers import default_sampler, resolve_pair
from sdrt.runtime.schedules import SchedulerConfig
from sdrt.runtime.sd3 import SLG_SCALE

MAX_SIDE = 2048  # pixels; beyond this one UNet call needs more memory than the machines we target
MAX_IMAGES = 16  # per call; larger batches belong to `sdrt batch`
MAX_STEPS = 1000  # the training schedule has 1000 timesteps; more steps repeat them
MAX_SEED = 2**32 - 1  # torch's manual_seed range that A1111 and diffusers users pass around



@dataclass(frozen=True)
class GenerationRequest:
    """One text-to-image call; None fields take the model family's defaults in `resolve`."""

    prompt: str
    negative_prompt: str = ""
    steps: int | None = None
    guidance_scale: float | None = None
    sampler: str | None = None
    schedule: str | None = None  # runtime/schedules.py SCHEDULES name or A1111 label; None: auto
    seed: int | None = None
    width: int | None = None
    height: int | None = None
    num_images: int = 1
    generator: str = "torch"
    # SD 3 only: skip-layer guidance's joint blocks (none: off) and scale (runtime/sd3.py)
    skip_layers: tuple[int, ...] = ()
    skip_layer_scale: float = SLG_SCALE
    deepcache: int | None = None  # DeepCache interval N (runtime/deepcache.py); None: off
    # LoRAs applied for this request only (runtime/adapters/), beside the prompt's <lora:…> tags
    loras: tuple[LoraRequest, ...] = ()
    prompt_syntax: str = "a1111"  # A1111's emphasis, BREAK, <lora:…> and long prompts; "plain"
    emphasis: str = "original"  # how A1111 weights apply (runtime/prompts/emphasis.py)
    hires: HiresFix | None = None  # A1111's hires fix: a second, larger pass (runtime/hires.py)
    # A1111's variation seeds (runtime/variation.py); image i uses subseed + i
    subseed: int | None = None  # None: random when subseed_strength > 0
    subseed_strength: float = 0.0
    seed_resize_from: tuple[int, int] | None = None  # (width, height); None or (0, 0): off
    # ControlNets (runtime/control/): ControlUnits, or dicts of their fields, checked in resolve
    controls: tuple[ControlUnit, ...] = ()

    @property
    def encoded_prompt(self) -> str:
        """The prompt as the text encoder reads it: A1111's `<kind:…>` tags taken out (plain
        syntax keeps them as words)."""
        return self.prompt if self.prompt_syntax == "plain" else extract_networks(self.prompt)[0]

    def resolve(self, facts: ModelFacts, scheduler: SchedulerConfig) -> GenerationRequest:
        """Fill defaults from the model and its family, then check each field (errors name it)."""
        family = facts.family
        if not isinstance(self.loras, tuple | list):
            raise InputError(f"loras must be a list of LoRAs, got {type(self.loras).__name__}")
        sampler, schedule = resolve_pair(self.sampler or family.sampler
                                         or default_sampler(scheduler), self.schedule)
        if self.hires is not None and not isinstance(self.hires, HiresFix):
            raise InputError(f"hires must be a HiresFix, got {type(self.hires).__name__}")
        subseed, strength, resize = variation.checked(self.subseed, self.subseed_strength,
                                                      self.seed_resize_from, MAX_SIDE)
        filled = replace(
            self, hires=self.hires and self.hires.checked(MAX_SIDE), subseed=subseed,
            subseed_strength=strength, seed_resize_from=resize,
            loras=tuple(lora_request(item) for item in self.loras),
            controls=control_units(self.controls),
            steps=family.steps if self.steps is None else self.steps,
            guidance_scale=family.guidance_scale if self.guidance_scale is None
            else self.guidance_scale,
            sampler=sampler, schedule=schedule,
            seed=secrets.randbelow(MAX_SEED + 1) if self.seed is None else self.seed,
            width=facts.default_size if self.width is None else self.width,
            height=facts.default_size if self.height is None else self.height,
        )
        filled.validate(facts.vae_scale_factor * facts.patch_size)
        return filled

    def validate(self, vae_scale_factor: int) -> None:
        for name in ("prompt", "negative_prompt"):
            if not isinstance(getattr(self, name), str):
                raise InputError(f"{name} must be a str, got {type(getattr(self, name)).__name__}")
        for name in ("steps", "num_images", "seed"):  # as an HTTP client may send anything
            if isinstance(getattr(self, name), bool) or not isinstance(getattr(self, name), int):
                raise InputError(f"{name} must be an integer, got "
                                 f"{type(getattr(self, name)).__name__}")
        if isinstance(self.guidance_scale, bool) or not isinstance(self.guidance_scale,
                                                                   int | float):
            raise InputError(f"guidance scale must be a number, got "
                             f"{type(self.guidance_scale).__name__}")
        multiple = max(8, vae_scale_factor)
        for name, side in (("width", self.width), ("height", self.height)):
            if not isinstance(side, int) or side <= 0 or side > MAX_SIDE or side % multiple:
                raise InputError(
                    f"{name} must be a multiple of {multiple} between {multiple} and "
                    f"{MAX_SIDE}, got {side}"
                )
        if not 1 <= self.steps <= MAX_STEPS:
            raise InputError(f"steps must be between 1 and {MAX_STEPS}, got {self.steps}")
        if not 1 <= self.num_images <= MAX_IMAGES:
            raise InputError(
                f"num_images must be between 1 and {MAX_IMAGES}, got {self.num_images}"
            )
        if self.deepcache is not None and (isinstance(self.deepcache, bool) or not isinstance(
                self.deepcache, int) or not 1 <= self.deepcache <= MAX_STEPS):
            raise InputError(f"deepcache must be an interval between 1 and {MAX_STEPS}, got "
                             f"{str(self.deepcache)[:20]}")
        if not 0 <= self.seed <= MAX_SEED:
            raise InputError(f"seed must be between 0 and {MAX_SEED}, got {self.seed}")
        try:
            scale = float(self.guidance_scale)
        except OverflowError:  # an int beyond float's range (10**400)
            scale = math.inf
        if not 0 <= scale < math.inf:  # NaN fails too
            raise InputError(f"guidance scale must be finite and ≥ 0, got "
                             f"{str(self.guidance_scale)[:20]}")
        PromptStyle(self.prompt_syntax, self.emphasis)  # refuses an unknown syntax or emphasis
        if self.generator not in GENERATORS:
            raise InputError(
                f"unknown generator '{self.generator}'; choose one of: {', '.join(GENERATORS)}"
            )




def lora_request(item: LoraRequest | tuple | str) -> LoraRequest:
    """A LoRA as `Pipeline.generate(loras=[...])` takes it: a LoraRequest, a name or path, or
    (name, weight) / (name, te weight, unet weight)."""
    if isinstance(item, LoraRequest):
        return item
    if isinstance(item, str):
        return LoraRequest(item)
    if isinstance(item, tuple | list) and len(item) in (2, 3) and isinstance(item[0], str):
        weights = [_weight(item[0], value) for value in item[1:]]
        return LoraRequest(item[0], weights[0], weights[-1])
    raise InputError(f"a LoRA is a name or path with optional weights, e.g. ('name', 0.8); got "
                     f"{str(item)[:40]}")


def _weight(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InputError(f"LoRA '{name}': its weight must be a finite number, got "
                         f"{str(value)[:20]}")
    return float(value)
