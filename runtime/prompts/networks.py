"""AUTOMATIC1111's extra-network tags, `<kind:name:arg:...>`, taken out of a prompt.

As A1111's `extra_networks.parse_prompt`: every `<(\\w+):([^>]+)>` is removed from the text and
its arguments split on `:`; an argument `key=value` (one `=`) is named, any other positional.
For `lora` and `lyco` (A1111's LoRA networks): the first positional is the name, then the text
encoder weight (default 1), then the UNet weight (default: the text encoder's); named `te=` and
`unet=` override those; `dyn=` (a rank cut) is accepted and ignored. Other kinds (hypernetworks,
…) are removed too, as A1111 skips a network it does not know, and logged.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass

from sdrt.runtime.errors import InputError

log = logging.getLogger(__name__)

LORA_KINDS = ("lora", "lyco")
_TAG = re.compile(r"<(\w+):([^>]+)>")


@dataclass(frozen=True)
class NetworkTag:
    """One `<lora:...>` tag: the network's name and its text-encoder and UNet weights."""

    kind: str
    name: str
    te: float
    unet: float


def extract_networks(text: str) -> tuple[str, list[NetworkTag]]:
    """The prompt without its network tags, and its LoRA tags in order (module docstring)."""
    tags: list[NetworkTag] = []

    def take(match: re.Match) -> str:
        kind, args = match.group(1), match.group(2)
        if kind in LORA_KINDS:
            tags.append(_lora_tag(kind, args))
        else:
            log.warning("prompt tag <%s:...>: sdrt has no %r networks; removed", kind, kind)
        return ""

    return _TAG.sub(take, text), tags


def _lora_tag(kind: str, args: str) -> NetworkTag:
    positional, named = [], {}
    for item in args.split(":"):
        parts = item.split("=")
        if len(parts) == 2:
            named[parts[0]] = parts[1]
        else:
            positional.append(item)
    if not positional or not positional[0]:
        raise InputError(f"<{kind}:{args}>: the tag names no network")
    te = _tag_weight(kind, args, positional[1]) if len(positional) > 1 else 1.0
    te = _tag_weight(kind, args, named["te"]) if "te" in named else te
    unet = _tag_weight(kind, args, positional[2]) if len(positional) > 2 else te
    unet = _tag_weight(kind, args, named["unet"]) if "unet" in named else unet
    return NetworkTag(kind, positional[0], te, unet)


def _tag_weight(kind: str, args: str, value: str) -> float:
    try:
        weight = float(value)
    except ValueError:
        weight = math.nan
    if not math.isfinite(weight):
        raise InputError(f"<{kind}:{args}>: weight {value!r} is not a number")
    return weight
