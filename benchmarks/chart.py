"""Horizontal bar charts as PNG, drawn with Pillow.

Pillow is already the runtime's image library; a plotting library (matplotlib is ~40 MB
installed) would be a dependency for one kind of chart, so the few lines of layout live here.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

WIDTH = 900
BAR_HEIGHT = 26
GAP = 10
MARGIN = 16
LABEL_WIDTH = 300  # pixels kept for each bar's name on the left
VALUE_WIDTH = 110  # and for its value on the right
BAR_COLOUR = (52, 101, 164)
TEXT_COLOUR = (20, 20, 20)


def bar_chart(bars: list[tuple[str, float]], path: Path, *, title: str, unit: str) -> Path:
    """One bar per (label, value), longest for the largest value; written to `path`."""
    if not bars:
        raise ValueError("a bar chart needs at least one bar")
    font = ImageFont.load_default(size=15)
    top = MARGIN * 2 + 20
    height = top + len(bars) * (BAR_HEIGHT + GAP) + MARGIN
    image = Image.new("RGB", (WIDTH, height), "white")
    draw = ImageDraw.Draw(image)
    draw.text((MARGIN, MARGIN), title, fill=TEXT_COLOUR, font=font)
    span = WIDTH - LABEL_WIDTH - VALUE_WIDTH - 2 * MARGIN
    peak = max(value for _, value in bars) or 1.0
    for i, (label, value) in enumerate(bars):
        y = top + i * (BAR_HEIGHT + GAP)
        x0 = MARGIN + LABEL_WIDTH
        draw.text((MARGIN, y + 5), label, fill=TEXT_COLOUR, font=font)
        draw.rectangle((x0, y, x0 + max(1, round(span * value / peak)), y + BAR_HEIGHT),
                       fill=BAR_COLOUR)
        draw.text((x0 + span + 8, y + 5), f"{value:.3g} {unit}", fill=TEXT_COLOUR, font=font)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path
