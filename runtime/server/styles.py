"""Prompt styles in AUTOMATIC1111's `styles.csv` format (`sdrt serve --styles FILE`).

The file is CSV with a header row naming `name`, `prompt` and `negative_prompt` (A1111 writes
them in that order; other columns are ignored). A request's `styles` apply in the order given,
as A1111 applies them: a style text holding "{prompt}" has it replaced by the prompt so far;
otherwise the style text is appended after ", " (an empty side adds nothing).
"""

from __future__ import annotations

import csv
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from sdrt.runtime.errors import InputError

PLACEHOLDER = "{prompt}"
COLUMNS = ("name", "prompt", "negative_prompt")
MAX_STYLES_BYTES = 4 * 1024 * 1024  # a styles file is text a person wrote; more is a mistake


@dataclass(frozen=True)
class PromptStyle:
    """One row of styles.csv (A1111's PromptStyleItem)."""

    name: str
    prompt: str = ""
    negative_prompt: str = ""


def read_styles(path: Path) -> tuple[PromptStyle, ...]:
    """The styles of an A1111 styles.csv; a one-line InputError naming the file's problem."""
    try:
        if path.stat().st_size > MAX_STYLES_BYTES:
            raise InputError(f"--styles {path.name}: over {MAX_STYLES_BYTES:,} bytes")
        text = path.read_text("utf-8-sig")  # A1111 writes a BOM-less file; Excel adds one
    except FileNotFoundError:
        raise InputError(f"--styles {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"--styles {path.name}: cannot read it ({type(exc).__name__})") from None
    rows = csv.DictReader(text.splitlines())
    if rows.fieldnames is None or "name" not in rows.fieldnames:
        raise InputError(f"--styles {path.name}: the header must name the columns "
                         f"{', '.join(COLUMNS)}")
    styles = [PromptStyle(row["name"].strip(), (row.get("prompt") or "").strip(),
                          (row.get("negative_prompt") or "").strip())
              for row in rows if (row.get("name") or "").strip()]
    names = [style.name for style in styles]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise InputError(f"--styles {path.name}: style names repeat: {', '.join(repeated)}")
    return tuple(styles)


def apply_styles(prompt: str, negative: str, names: Sequence[str],
                 styles: Iterable[PromptStyle]) -> tuple[str, str]:
    """(prompt, negative prompt) with the named styles applied in order (A1111's rule)."""
    known = {style.name: style for style in styles}
    unknown = [name for name in names if name not in known]
    if unknown:
        listed = ", ".join(known) or "none (start the server with --styles FILE)"
        raise InputError(f"unknown style(s) {', '.join(repr(n[:40]) for n in unknown)}; "
                         f"this server's styles: {listed}")
    for name in names:
        prompt = _merge(prompt, known[name].prompt)
        negative = _merge(negative, known[name].negative_prompt)
    return prompt, negative


def _merge(text: str, style: str) -> str:
    if PLACEHOLDER in style:
        return style.replace(PLACEHOLDER, text)
    return ", ".join(part for part in (text.strip(), style.strip()) if part)
