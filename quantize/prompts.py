"""The prompts calibration and gates run: general subjects, or sdrt's simple-scenes captions.

Calibration and gate prompts never overlap, so a gate does not measure on the very inputs a
static quantizer fitted its activation ranges to.
"""

from __future__ import annotations

from sdrt.runtime.errors import InputError

PROMPT_SETS = ("general", "scenes")
# Varied subjects, styles and lighting, so activation ranges cover more than one kind of picture.
GENERAL_PROMPTS = (
    "a lighthouse on a cliff at dusk, oil painting",
    "portrait of an old fisherman, dramatic lighting, photograph",
    "a bowl of fruit on a wooden table, still life",
    "a futuristic city street at night, neon signs, rain",
    "a red fox in a snowy forest, wildlife photography",
    "an astronaut riding a horse on the moon, digital art",
    "a cozy reading room with bookshelves and a fireplace",
    "a watercolor of mountains above a misty lake",
    "a plate of sushi, close-up, studio light",
    "a cat sleeping on a windowsill in the sun",
    "a medieval castle on a hill, fantasy illustration",
    "a sailing boat on a stormy sea, black and white",
)
CALIBRATION_GENERAL = GENERAL_PROMPTS[:8]
GATE_GENERAL = GENERAL_PROMPTS[8:]
# Seeds of shapes.seen_captions for each use, so the two caption lists differ.
CALIBRATION_SEED, GATE_SEED = 1, 2


def calibration_prompts(prompt_set: str, count: int) -> list[str]:
    """`count` prompts to record calibration inputs from."""
    return _prompts(prompt_set, count, CALIBRATION_GENERAL, CALIBRATION_SEED)


def gate_prompts(prompt_set: str, count: int) -> list[str]:
    """`count` fixed prompts the fidelity gate compares fp32 and the variant on."""
    return _prompts(prompt_set, count, GATE_GENERAL, GATE_SEED)


def _prompts(prompt_set: str, count: int, general: tuple[str, ...], seed: int) -> list[str]:
    if prompt_set == "general":
        return [general[i % len(general)] for i in range(count)]
    if prompt_set == "scenes":
        from sdrt.evaluation.scenes import seen_captions

        return seen_captions(count, seed)
    raise InputError(f"unknown prompt set '{prompt_set}'; choose one of: {', '.join(PROMPT_SETS)}")
