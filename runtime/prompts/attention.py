"""AUTOMATIC1111's prompt emphasis syntax: text → (piece, weight) runs.

The grammar of A1111's `parse_prompt_attention`: `(x)` multiplies x's weight by 1.1, `[x]`
divides it by 1.1, `(x:1.4)` multiplies it by 1.4; brackets nest, and each closing bracket
multiplies every piece opened since its bracket, innermost first (so the float results are
A1111's to the last bit); `\\(`, `\\)`, `\\[`, `\\]` and `\\\\` are the literal characters and a
lone backslash is dropped; a closing bracket with none open, or a `:` outside a weight, is
literal text; brackets left open at the end close there. Runs of equal weight merge; an empty
prompt is one empty piece. The whole word `BREAK` (case-sensitive) is a chunk break, returned as
`("BREAK", -1.0)`.

One deliberate difference: A1111 multiplies a BREAK inside brackets like any piece, which turns
it into the literal word "BREAK" with weight -1.1 (encoded with a negative weight); here a BREAK
is never weighted nor merged, so it always breaks.
"""

from __future__ import annotations

import re

from sdrt.runtime.errors import InputError

BREAK = "BREAK"
BREAK_WEIGHT = -1.0  # A1111's marker weight of a BREAK piece
ROUND_MULTIPLIER = 1.1
SQUARE_MULTIPLIER = 1 / 1.1

_TOKEN = re.compile(
    r"""\\(?P<escaped>[()\[\]\\])?          # an escaped bracket or backslash; lone: dropped
      | (?P<open>[(\[])
      | :\s*(?P<weight>[+-]?[.\d]+)\s*\)    # `:1.4)` closes a round bracket with that weight
      | (?P<close>[)\]])
      | (?P<text>[^\\()\[\]:]+|:)""",
    re.VERBOSE,
)
_BREAK = re.compile(r"\s*\bBREAK\b\s*")


def parse_attention(text: str) -> list[tuple[str, float]]:
    """A1111's `parse_prompt_attention`: the prompt's pieces and their weights (module doc)."""
    pieces: list[list] = []  # [text, weight, is_break]
    opened: dict[str, list[int]] = {"(": [], "[": []}  # where each open bracket's range starts

    def multiply(start: int, factor: float) -> None:
        for piece in pieces[start:]:
            if not piece[2]:
                piece[1] *= factor

    for match in _TOKEN.finditer(text):
        token = match.group(0)
        if token.startswith("\\"):
            pieces.append([match.group("escaped") or "", 1.0, False])
        elif match.group("open"):
            opened[token].append(len(pieces))
        elif match.group("weight") is not None and opened["("]:
            multiply(opened["("].pop(), _weight(match.group("weight")))
        elif token == ")" and opened["("]:
            multiply(opened["("].pop(), ROUND_MULTIPLIER)
        elif token == "]" and opened["["]:
            multiply(opened["["].pop(), SQUARE_MULTIPLIER)
        else:
            for i, part in enumerate(_BREAK.split(token)):
                if i:
                    pieces.append([BREAK, BREAK_WEIGHT, True])
                pieces.append([part, 1.0, False])
    # Unclosed brackets close at the end, round ones first (A1111's order).
    for start in opened["("]:
        multiply(start, ROUND_MULTIPLIER)
    for start in opened["["]:
        multiply(start, SQUARE_MULTIPLIER)
    return _merged(pieces) or [("", 1.0)]


def _weight(value: str) -> float:
    try:
        return float(value)
    except ValueError:  # the pattern admits "1.2.3" and "."
        raise InputError(f"prompt weight {value!r} is not a number") from None


def _merged(pieces: list[list]) -> list[tuple[str, float]]:
    """Adjacent pieces of equal weight joined (breaks stay apart)."""
    out: list[list] = []
    for piece in pieces:
        if out and not piece[2] and not out[-1][2] and out[-1][1] == piece[1]:
            out[-1][0] += piece[0]
        else:
            out.append(piece)
    return [(text, weight) for text, weight, _ in out]
