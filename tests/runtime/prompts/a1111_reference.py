"""The test oracle: AUTOMATIC1111's prompt weighting written out plainly on transformers'
CLIPTokenizer and the torch CLIP text encoders, independent of sdrt's runtime/prompts code.

- `parse`: a character scanner for A1111's emphasis grammar ((x) ×1.1, [x] ÷1.1, (x:w), the
  escapes, literal unmatched closers, brackets closed at the end, equal runs merged, BREAK);
- `chunks`: A1111's `tokenize_line` (75-token chunks, comma backtracking of 20, BREAK) and its
  SD 2.x padding rule (the pad id after the first EOS);
- `encode`: each chunk through the torch encoder, "Original" emphasis (weight, then restore the
  mean), chunks joined along the sequence axis, the pooled output of the first chunk.
"""

from __future__ import annotations

import re

import numpy as np

CHUNK = 75
BACKTRACK = 20
_NUMBER = re.compile(r":\s*([+-]?[.\d]+)\s*\)")
_BREAK = re.compile(r"\s*\bBREAK\b\s*")


def parse(text: str) -> list[tuple[str, float]]:
    """A1111's (piece, weight) list for `text`; BREAK as ("BREAK", -1.0)."""
    out: list[list] = []
    rounds: list[int] = []
    squares: list[int] = []
    run = ""  # plain characters not yet emitted

    def flush() -> None:
        nonlocal run
        if run:
            parts = _BREAK.split(run)
            out.append([parts[0], 1.0])
            for part in parts[1:]:
                out.append(["BREAK", -1.0])
                out.append([part, 1.0])
            run = ""

    def scale(start: int, factor: float) -> None:
        for item in out[start:]:
            item[1] *= factor

    i = 0
    while i < len(text):
        char = text[i]
        number = _NUMBER.match(text, i) if char == ":" else None
        if char == "\\":
            flush()
            escaped = text[i + 1] if i + 1 < len(text) and text[i + 1] in "()[]\\" else ""
            out.append([escaped, 1.0])
            i += 1 + len(escaped)
            continue
        if char in "([":
            flush()
            (rounds if char == "(" else squares).append(len(out))
        elif number and rounds:
            flush()
            scale(rounds.pop(), float(number.group(1)))
            i = number.end()
            continue
        elif char == ")" and rounds:
            flush()
            scale(rounds.pop(), 1.1)
        elif char == "]" and squares:
            flush()
            scale(squares.pop(), 1 / 1.1)
        elif number:  # a weight with no bracket open: literal, as one run
            flush()
            out.append([number.group(0), 1.0])
            i = number.end()
            continue
        elif char in ")]:":
            flush()
            out.append([char, 1.0])
        else:
            run += char
        i += 1
    flush()
    for start in rounds:
        scale(start, 1.1)
    for start in squares:
        scale(start, 1 / 1.1)
    merged: list[list] = []
    for item in out:
        if merged and merged[-1][1] == item[1]:
            merged[-1][0] += item[0]
        else:
            merged.append(item)
    return [(t, w) for t, w in merged] or [("", 1.0)]


def chunks(text: str, tokenizer, embeddings: dict[tuple[int, ...], list[int]] | None = None,
           ) -> tuple[np.ndarray, np.ndarray]:
    """tokenize_line: ids (C, 77) and multipliers (C, 77); `embeddings` maps a trigger's token
    ids to the ids standing for its vectors."""
    comma = tokenizer.get_vocab().get(",</w>")
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    done: list[tuple[list[int], list[float]]] = []
    ids: list[int] = []
    mults: list[float] = []
    comma_at = -1

    def close() -> None:
        nonlocal ids, mults, comma_at
        fill = CHUNK - len(ids)
        row = [bos, *ids, *[eos] * fill, eos]
        if pad != eos:
            first = row.index(eos)
            row = row[: first + 1] + [pad] * (len(row) - first - 1)
        done.append((row, [1.0, *mults, *[1.0] * fill, 1.0]))
        ids, mults, comma_at = [], [], -1

    for piece, weight in parse(text):
        if piece == "BREAK" and weight == -1.0:
            close()
            continue
        tokens = tokenizer(piece, add_special_tokens=False, truncation=False)["input_ids"]
        k = 0
        while k < len(tokens):
            if tokens[k] == comma:
                comma_at = len(ids)
            elif len(ids) == CHUNK and comma_at != -1 and CHUNK - comma_at <= BACKTRACK:
                keep_ids, keep_mults = ids[comma_at + 1 :], mults[comma_at + 1 :]
                ids, mults = ids[: comma_at + 1], mults[: comma_at + 1]
                close()
                ids, mults = keep_ids, keep_mults
            if len(ids) == CHUNK:
                close()
            found = next(((trigger, v) for trigger, v in (embeddings or {}).items()
                          if tuple(tokens[k : k + len(trigger)]) == trigger), None)
            if found is None:
                ids.append(tokens[k])
                mults.append(weight)
                k += 1
                continue
            trigger, vectors = found
            if len(ids) + len(vectors) > CHUNK:
                close()
            ids += vectors
            mults += [weight] * len(vectors)
            k += len(trigger)
    if ids or not done:
        close()
    return (np.array([row for row, _ in done], np.int64),
            np.array([m for _, m in done], np.float32))


def encode(model, ids: np.ndarray, multipliers: np.ndarray, *, layer: int | None = None,
           emphasis: str = "original") -> tuple[np.ndarray, np.ndarray | None]:
    """Context (1, 77·C, D) and the first chunk's pooled output (`text_embeds` of a
    projection model), hidden state `layer` (None: last_hidden_state)."""
    import torch

    zs, pooled = [], None
    with torch.no_grad():
        for row, mult in zip(ids, multipliers, strict=True):
            out = model(torch.tensor(row[None]), output_hidden_states=True)
            z = out.last_hidden_state if layer is None else out.hidden_states[layer]
            if pooled is None and hasattr(out, "text_embeds"):
                pooled = out.text_embeds.numpy()
            # All weights 1: z·1 rescaled by mean/mean is z. Skipping it also avoids 0/0 where a
            # tiny random encoder's chunk has a mean of exactly 0 (seen on an AMX Xeon).
            if emphasis != "none" and not np.all(mult == 1.0):
                before = z.mean()
                z = z * torch.tensor(mult).reshape(1, -1, 1)
                if emphasis == "original":
                    z = z * (before / z.mean())
            zs.append(z)
    return torch.cat(zs, dim=1).numpy(), pooled
