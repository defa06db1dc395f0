"""The hires fix and variation seed options of `sdrt generate`: --hires-scale, --hires-upscaler,
--hires-steps, --hires-denoise, --hires-sampler (any of them turns the hires fix on:
runtime/hires.py), --subseed, --subseed-strength and --seed-resize-from (runtime/variation.py).
They reach the command as the GenerationRequest fields `hires`, `subseed`, `subseed_strength`
and `seed_resize_from` (only those given); the request checks the values' ranges.
"""

from __future__ import annotations

import functools

import click

from sdrt.cli.errors import reports_errors
from sdrt.runtime.errors import InputError

SCALE_HELP = "Hires fix (A1111's two passes): upscale the first pass by F (1 to 4; default 2)."
UPSCALER_HELP = ("Hires fix upscaler: Latent (default), Latent (antialiased), Latent (bicubic), "
                 "Latent (bicubic antialiased), Latent (nearest), Latent (nearest-exact), or "
                 "on the decoded picture None, Lanczos, Nearest.")
STEPS_HELP = "Hires fix: steps of the second pass (default 0: the first pass's)."
DENOISE_HELP = "Hires fix: denoising strength of the second pass, 0 to 1 (default 0.7)."
SAMPLER_HELP = "Hires fix: the second pass's sampler (default: the first pass's)."
SUBSEED_HELP = "Variation seed: image i mixes in the noise of N + i (default: random)."
STRENGTH_HELP = "How much of the variation seed's noise, 0 (none) to 1 (all of it)."
RESIZE_HELP = ("Seed resize from WxH: draw the seed's noise at that size, centred in this one "
               "(A1111's; keeps a composition found at another size).")


def hires_options(command):
    """Add the options above to a click command; it receives the request fields they set as
    keyword arguments (a bad value is a one-line error)."""
    options = [
        click.option("--hires-scale", metavar="F", help=SCALE_HELP),
        click.option("--hires-upscaler", metavar="NAME", help=UPSCALER_HELP),
        click.option("--hires-steps", metavar="N", help=STEPS_HELP),
        click.option("--hires-denoise", metavar="F", help=DENOISE_HELP),
        click.option("--hires-sampler", metavar="NAME", help=SAMPLER_HELP),
        click.option("--subseed", metavar="N", help=SUBSEED_HELP),
        click.option("--subseed-strength", metavar="F", help=STRENGTH_HELP),
        click.option("--seed-resize-from", metavar="WxH", help=RESIZE_HELP),
    ]

    @functools.wraps(command)
    @reports_errors  # the wrapper itself parses the values, outside the command's own handler
    def wrapper(*args, hires_scale, hires_upscaler, hires_steps, hires_denoise, hires_sampler,
                subseed, subseed_strength, seed_resize_from, **kwargs):
        from sdrt.runtime.hires import HiresFix

        settings = {"scale": _number(hires_scale, "--hires-scale"),
                    "upscaler": hires_upscaler, "steps": _integer(hires_steps, "--hires-steps"),
                    "denoise": _number(hires_denoise, "--hires-denoise"),
                    "sampler": hires_sampler}
        given = {key: value for key, value in settings.items() if value is not None}
        fields = {"hires": HiresFix(**given) if given else None,
                  "subseed": _integer(subseed, "--subseed"),
                  "subseed_strength": _number(subseed_strength, "--subseed-strength"),
                  "seed_resize_from": _size(seed_resize_from, "--seed-resize-from")}
        return command(*args, **kwargs,
                       **{key: value for key, value in fields.items() if value is not None})

    for option in reversed(options):
        wrapper = option(wrapper)
    return wrapper


def _number(text: str | None, option: str) -> float | None:
    if text is None:
        return None
    try:
        return float(text)
    except ValueError:
        raise InputError(f"{option} must be a number, got {text!r}") from None


def _integer(text: str | None, option: str) -> int | None:
    if text is None:
        return None
    try:
        return int(text)
    except ValueError:
        raise InputError(f"{option} must be an integer, got {text!r}") from None


def _size(text: str | None, option: str) -> tuple[int, int] | None:
    if text is None:
        return None
    width, _, height = text.lower().partition("x")
    try:
        return int(width), int(height)
    except ValueError:
        raise InputError(f"{option} must be WIDTHxHEIGHT, e.g. 512x512, got {text!r}") from None
