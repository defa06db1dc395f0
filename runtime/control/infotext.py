"""The infotext the A1111 ControlNet extension (Mikubill/sd-webui-controlnet, API version 3)
writes for each enabled unit: `ControlNet 0: "Module: canny, Model: name [hash], Weight: 1.0,
Resize Mode: Crop and Resize, Processor Res: 512, Threshold A: 100, Threshold B: 200, Guidance
Start: 0.0, Guidance End: 1.0, Pixel Perfect: False, Control Mode: Balanced"`.

The text is its `ControlNetUnit.serialize()`: the eleven fields of `infotext_fields()` in that
order, each as Python's `str()` of the unit's value, joined by ", "; A1111 quotes it because it
holds commas (sdrt.runtime.metadata does the same). A processor resolution or threshold the
request left out shows the preprocessor slider's default as the extension stores it (an integer
where the slider's default is one, 0.5 for a slider the preprocessor hides); one the request gave
shows as given (thresholds as floats). A value holding "," or ":" makes the extension write an
empty text, and so does this.
"""

from __future__ import annotations

from collections.abc import Sequence

from sdrt.runtime.control.preprocess import PREPROCESSORS, Slider
from sdrt.runtime.control.unit import ControlUnit

PREFIX = "ControlNet {}"
RESIZE_LABELS = {"resize": "Just Resize", "crop": "Crop and Resize", "fill": "Resize and Fill"}
MODE_LABELS = {"balanced": "Balanced", "prompt": "My prompt is more important",
               "control": "ControlNet is more important"}
HIDDEN_SLIDER_VALUE = 0.5  # the extension's PreprocessorParameter default, for hidden sliders


def control_infotext(units: Sequence[ControlUnit], titles: Sequence[str]) -> dict[str, str]:
    """"ControlNet i" → unit i's text, for the units that ran (`titles`: one per unit)."""
    return {PREFIX.format(i): unit_text(unit, title)
            for i, (unit, title) in enumerate(zip(units, titles, strict=True))}


def unit_text(unit: ControlUnit, title: str) -> str:
    """One unit's text, as the extension's ControlNetUnit.serialize() writes it."""
    spec = PREPROCESSORS[unit.module]
    fields = {
        "Module": unit.module,
        "Model": title,
        "Weight": float(unit.scale),
        "Resize Mode": RESIZE_LABELS[unit.resize],
        "Processor Res": _shown(unit.processor_res, spec.resolution, int),
        "Threshold A": _shown(unit.threshold_a, spec.threshold_a, float),
        "Threshold B": _shown(unit.threshold_b, spec.threshold_b, float),
        "Guidance Start": float(unit.start),
        "Guidance End": float(unit.end),
        "Pixel Perfect": bool(unit.pixel_perfect),
        "Control Mode": MODE_LABELS[unit.mode],
    }
    texts = {key: str(value) for key, value in fields.items()}
    if any("," in text or ":" in text for text in texts.values()):
        return ""
    return ", ".join(f"{key}: {text}" for key, text in texts.items())


def _shown(value: float | None, slider: Slider | None, kind: type) -> float | int:
    """A slider field as the extension holds it: the given value, else the slider's default."""
    if value is not None:
        return kind(value)
    default = HIDDEN_SLIDER_VALUE if slider is None else slider.value
    return int(default) if float(default).is_integer() else default
