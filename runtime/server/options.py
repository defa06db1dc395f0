"""A1111's settings API: `GET/POST /sdapi/v1/options`, and the model routes around it
(`sd-models`, `sd-vae`, `refresh-checkpoints`, `refresh-vae`).

GET returns A1111's options dict: the keys clients read, at A1111's defaults, with the model's
(`sd_model_checkpoint`, its title; `sd_checkpoint_hash`, its sha256; `sd_vae`) filled from what
runs. POST stores any keys, as A1111 does (bounded in count and size), refusing a whole body
with one line when a value is invalid. Honoured: `sd_model_checkpoint` switches model (waiting
for running jobs; ModelHost), `CLIP_stop_at_last_layers` 1 (sdrt's text encoder graphs give
their last layer only, so 2+ is refused rather than ignored), `sd_vae` (the VAE chosen at start
with --vae, or the model's: other names are refused), `samples_format` with `jpeg_quality` and
`webp_lossless` (the format of the response's images: codec.encode_image).
`eta_noise_seed_delta` is checked and stored: sdrt's ancestral noise does not add it.
"""

from __future__ import annotations

import json
import threading
from typing import Any

from fastapi import APIRouter, Body
from starlette.concurrency import run_in_threadpool

from sdrt.runtime.errors import InputError
from sdrt.runtime.server.models import ModelHost
from sdrt.runtime.server.schemas import SDModelItem, SDVaeItem

MAX_KEYS = 1000  # stored options (A1111 has ~400); more is a client gone wrong
MAX_KEY_CHARS = 200
MAX_VALUE_BYTES = 16_384  # one option's JSON; A1111's longest are prompt-sized strings
AUTOMATIC_VAE = "Automatic"  # A1111: the VAE that comes with the checkpoint
NO_VAE = "None"
SAMPLE_FORMATS = ("png", "jpg", "jpeg", "webp")
# A1111 1.10's defaults of the options clients commonly read or set (modules/shared_options.py
# names them); the model's keys are filled in from what runs.
DEFAULTS: dict[str, Any] = {
    "samples_save": True, "samples_format": "png", "jpeg_quality": 80, "webp_lossless": False,
    "enable_pnginfo": True, "save_txt": False, "outdir_samples": "",
    "sd_checkpoints_limit": 1, "sd_checkpoints_keep_in_cpu": True, "sd_checkpoint_cache": 0,
    "sd_unet": "Automatic", "sd_vae_checkpoint_cache": 0,
    "sd_vae_overrides_per_model_preferences": True, "CLIP_stop_at_last_layers": 1,
    "eta_noise_seed_delta": 0, "randn_source": "CPU", "emphasis": "Original",
    "comma_padding_backtrack": 20, "eta_ancestral": 1.0, "eta_ddim": 0.0, "s_churn": 0.0,
    "s_tmin": 0.0, "s_tmax": 0.0, "s_noise": 1.0, "k_sched_type": "Automatic",
    "always_discard_next_to_last_sigma": False, "uni_pc_variant": "bh1", "uni_pc_order": 3,
    "img2img_fix_steps": False, "initial_noise_multiplier": 1.0, "live_previews_enable": True,
    "show_progress_every_n_steps": 10, "face_restoration": False, "upscaler_for_img2img": None,
    "sd_model_checkpoint": None, "sd_checkpoint_hash": None, "sd_vae": AUTOMATIC_VAE,
}


class Options:
    """The options a client set (A1111's `shared.opts`), over DEFAULTS and the loaded model."""

    def __init__(self, host: ModelHost) -> None:
        self.host = host
        self._stored: dict[str, Any] = {}
        self._lock = threading.Lock()

    def get(self) -> dict[str, Any]:
        selected = self.host.selected
        with self._lock:
            options = {**DEFAULTS, **self._stored}
        options.update(sd_model_checkpoint=selected.title, sd_checkpoint_hash=selected.sha256,
                       sd_vae=options["sd_vae"])
        return options

    def check(self, body: dict[str, Any]) -> dict[str, Any]:
        """`body`'s options checked (the checkpoint found), ready to store; InputError, one
        line, for the first bad one."""
        with self._lock:
            new = set(body) - set(self._stored) - set(DEFAULTS)
            if len(self._stored) + len(new) > MAX_KEYS:
                raise InputError(f"at most {MAX_KEYS} options can be stored on this server")
        for key, value in body.items():
            self._check(key, value)
        return dict(body)

    def set(self, body: dict[str, Any]) -> None:
        """Store checked options; a checkpoint switch happens first (blocking: a thread's job),
        and when it fails nothing is stored."""
        name = body.get("sd_model_checkpoint")
        if name is not None:
            self.host.switch(name)
        with self._lock:
            self._stored.update({k: v for k, v in body.items()
                                 if k not in ("sd_model_checkpoint", "sd_checkpoint_hash")})

    def _check(self, key: str, value: Any) -> None:
        if len(key) > MAX_KEY_CHARS:
            raise InputError(f"option names are at most {MAX_KEY_CHARS} characters")
        if len(json.dumps(value)) > MAX_VALUE_BYTES:
            raise InputError(f"{key}: a value is at most {MAX_VALUE_BYTES:,} bytes of JSON")
        default = DEFAULTS.get(key)
        if default is not None and not _same_type(value, default):
            raise InputError(f"{key} must be {type(default).__name__}, got {_json_type(value)}")
        if key == "sd_model_checkpoint":
            if not isinstance(value, str):
                raise InputError(f"sd_model_checkpoint must be a string, got {_json_type(value)}")
            self.host.find(value)
        elif key == "sd_checkpoint_hash" and value not in (None, self.host.selected.sha256):
            raise InputError("sd_checkpoint_hash follows the model: set sd_model_checkpoint")
        elif key == "CLIP_stop_at_last_layers" and value != 1:
            raise InputError(f"CLIP_stop_at_last_layers {value} is not supported: sdrt's text "
                             "encoders give their last layer only (1)")
        elif key == "jpeg_quality" and not 1 <= value <= 100:
            raise InputError(f"jpeg_quality must be between 1 and 100, got {value}")
        elif key == "eta_noise_seed_delta" and value < 0:
            raise InputError(f"eta_noise_seed_delta must be at least 0, got {value}")
        elif key == "samples_format" and value.lower() not in SAMPLE_FORMATS:
            raise InputError(f"samples_format {value!r} is not one of: {', '.join(SAMPLE_FORMATS)}")
        elif key == "sd_vae" and value not in self.vae_choices():
            raise InputError(f"sd_vae {value!r} is not one of: {', '.join(self.vae_choices())} "
                             "(sdrt's VAE is chosen at start with --vae)")

    def encoding(self, overrides: dict[str, Any] | None) -> dict[str, Any]:
        """codec.encode_image's format options for a response: samples_format, jpeg_quality and
        webp_lossless, a request's override_settings over the stored ones."""
        options = {**self.get(), **(overrides or {})}
        return {"fmt": options["samples_format"].lower(), "quality": options["jpeg_quality"],
                "lossless": options["webp_lossless"]}

    def vae_choices(self) -> tuple[str, ...]:
        """The sd_vae values that describe what runs: the --vae tiny VAE, else the model's."""
        tiny = self.host.pipe.tiny_vae
        return (AUTOMATIC_VAE, tiny.manifest.name) if tiny else (AUTOMATIC_VAE, NO_VAE)


def override_checkpoint(options: Options, overrides: dict[str, Any] | None) -> str | None:
    """A request's `override_settings` checked as POST /options checks them; the checkpoint it
    names (the job runs on that model; the next job without one goes back), if any."""
    if not overrides:
        return None
    options.check(overrides)
    return overrides.get("sd_model_checkpoint")


def add_model_routes(api: APIRouter, options: Options) -> None:
    host = options.host

    @api.get("/sdapi/v1/options")
    async def get_options() -> dict[str, Any]:
        """A1111's options: the model's, those a client set, and A1111's defaults."""
        return options.get()

    @api.post("/sdapi/v1/options")
    async def set_options(body: dict[str, Any] = Body(...)) -> None:  # noqa: B008
        """Store options (A1111 answers null); sd_model_checkpoint switches model."""
        await run_in_threadpool(options.set, options.check(body))

    @api.get("/sdapi/v1/sd-models", response_model=list[SDModelItem])
    async def sd_models() -> list[SDModelItem]:
        """Every model of --models-dir (and the loaded one), by name, never by path."""
        return [SDModelItem(title=c.title, model_name=c.name, hash=c.hash, sha256=c.sha256,
                            filename=c.name) for c in host.checkpoints()]

    @api.post("/sdapi/v1/refresh-checkpoints")
    async def refresh_checkpoints() -> None:
        """Scan --models-dir again (A1111 answers null)."""
        await run_in_threadpool(host.refresh)

    @api.post("/sdapi/v1/unload-checkpoint")
    async def unload_checkpoint() -> None:
        """Release the loaded model (A1111); the next job loads it again."""
        await run_in_threadpool(host.unload)

    @api.post("/sdapi/v1/reload-checkpoint")
    async def reload_checkpoint() -> None:
        """Load the selected model afresh (A1111)."""
        await run_in_threadpool(host.reload)

    @api.get("/sdapi/v1/sd-vae", response_model=list[SDVaeItem])
    async def sd_vae() -> list[SDVaeItem]:
        """The tiny VAE loaded with --vae, if any (its name, never its path)."""
        tiny = host.pipe.tiny_vae
        return [] if tiny is None else [SDVaeItem(model_name=tiny.manifest.name,
                                                  filename=tiny.manifest.name)]

    @api.post("/sdapi/v1/refresh-vae")
    async def refresh_vae() -> None:
        """A1111 re-reads its VAE folder; sdrt's one VAE is chosen at start (null, as A1111)."""


def _same_type(value: Any, default: Any) -> bool:
    """JSON's types as A1111's defaults have them: an int is a number, a bool is not."""
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(value, bool) and isinstance(default, bool)
    if isinstance(default, float):
        return isinstance(value, int | float)
    return isinstance(value, type(default))


def _json_type(value: Any) -> str:
    return {bool: "a boolean", int: "a number", float: "a number", str: "a string",
            list: "a list", dict: "an object", type(None): "null"}.get(type(value), "a value")
