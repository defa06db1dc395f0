"""The prompt and LoRA options of the generating commands: --lora FILE[:W] (repeatable),
--prompt-syntax, --emphasis; they reach the command as the GenerationRequest fields `loras`,
`prompt_syntax` and `emphasis` (only those given; the request's defaults otherwise). The
folders that names and trigger words are looked up in, --lora-dir and --embeddings-dir, are
load options (cli/options.py's RunOptions).
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import click

from sdrt.cli.errors import reports_errors
from sdrt.runtime.errors import InputError

LORA_HELP = ("A LoRA file (.safetensors: kohya/A1111 or diffusers/PEFT) applied at weight W "
             "(default 1, negative too), or its name in --lora-dir; repeatable. The prompt's "
             "<lora:NAME:W> tags add to these.")
LORA_DIR_HELP = ("Folder of LoRA files (subfolders too): <lora:NAME> tags and --lora NAME name "
                 "a file's stem (or its kohya ss_output_name).")
EMBEDDINGS_DIR_HELP = ("Folder of textual-inversion embeddings (.safetensors, A1111 or "
                       "diffusers): a file's stem in a prompt stands for its vectors.")
SYNTAX_HELP = ("a1111 (default): (x:1.2) weights, [x], BREAK, <lora:…> tags and prompts "
               "beyond 75 tokens in chunks, as AUTOMATIC1111 reads them; plain: literal text "
               "cut at 77 tokens, as diffusers reads it.")
EMPHASIS_HELP = ("How (x:1.2) weights apply (A1111's Emphasis mode): original (default: scale, "
                 "then restore the chunk's mean), no-norm (scale only), none (ignore weights).")
PATH_SEPARATORS = ("/", "\\")


def parse_lora(spec: str) -> tuple[str, float]:
    """`FILE[:W]` as (file or name, weight). The weight is what follows the last `:` when it
    reads as a number, so a Windows path (`C:\\loras\\x.safetensors`) keeps its drive letter;
    an existing file is taken whole, whatever its name holds."""
    name, weight = spec, 1.0
    head, colon, tail = spec.rpartition(":")
    if colon and not Path(spec).is_file():
        try:
            name, weight = head, float(tail)
        except ValueError:
            if not any(mark in tail for mark in PATH_SEPARATORS):
                raise InputError(f"--lora {spec!r}: the weight after the last ':' must be a "
                                 f"number, got {tail!r}") from None
    if not name:
        raise InputError(f"--lora {spec!r}: give a LoRA file or name before the ':'")
    if not math.isfinite(weight):
        raise InputError(f"--lora {spec!r}: the weight must be a finite number, got {tail!r}")
    return name, weight


def prompt_options(command):
    """Add --lora, --prompt-syntax and --emphasis to a click command; it receives the request
    fields they set as keyword arguments (a bad --lora is a one-line error)."""
    options = [
        click.option("--lora", "lora_specs", multiple=True, metavar="FILE[:W]", help=LORA_HELP),
        click.option("--prompt-syntax", default=None, metavar="a1111|plain", help=SYNTAX_HELP),
        click.option("--emphasis", default=None, metavar="original|no-norm|none",
                     help=EMPHASIS_HELP),
    ]

    @functools.wraps(command)
    @reports_errors  # the wrapper itself parses --lora, outside the command's own handler
    def wrapper(*args, lora_specs, prompt_syntax, emphasis, **kwargs):
        from sdrt.runtime.adapters.adapted import LoraRequest

        fields = {"loras": tuple(LoraRequest(name, weight, weight)
                                 for name, weight in map(parse_lora, lora_specs)),
                  "prompt_syntax": prompt_syntax, "emphasis": emphasis}
        return command(*args, **kwargs, **{key: value for key, value in fields.items()
                                          if value not in (None, ())})

    for option in reversed(options):
        wrapper = option(wrapper)
    return wrapper
