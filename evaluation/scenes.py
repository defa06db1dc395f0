"""Procedural "simple scenes" data set: coloured shapes on coloured backgrounds, with captions.

A scene is one or two shapes (circle, square, triangle) in a named colour, at one of nine named
positions and one of two sizes, on a background of another named colour. `render` draws it
(anti-aliased: drawn at 4× and box-downsampled), `caption` describes it in varied English, and
`parse_caption` inverts every phrasing `caption` produces. A fixed, deterministic set of
(shape colour, shape kind, background colour) triples is held out of training (`is_held_out`) and
used only for evaluation (`held_out_captions`), so the benchmark measures whether a model composes
attributes it has seen separately, not whether it memorised the training pairs.

Geometry is chosen so that the pixel evaluator (`sdrt.evaluation.adherence`) is unambiguous by
construction: each named position puts the shape's area centroid at 0.2 / 0.5 / 0.8 of the
image (± a small jitter), far from the 1/3 and 2/3 region borders; shapes stay inside the image;
small and large differ by 1.6× in extent; the two shapes of a two-shape scene sit two regions
apart on at least one axis, so they never touch.
"""

from __future__ import annotations

import hashlib
import itertools
import re
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

# Named colours (sRGB). Picked so that every pair is at least ~40 CIELAB ΔE apart, i.e. clearly
# different to a person and to the nearest-colour classifier, even after blur or a colour cast.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (250, 140, 20),
    "yellow": (250, 225, 40),
    "green": (40, 170, 60),
    "cyan": (40, 210, 220),
    "blue": (30, 80, 230),
    "purple": (130, 30, 140),
    "pink": (250, 130, 200),
    "white": (245, 245, 245),
    "gray": (128, 128, 128),
    "black": (20, 20, 20),
}
SHAPE_COLOURS: tuple[str, ...] = tuple(COLOURS)
BACKGROUND_COLOURS: tuple[str, ...] = tuple(COLOURS)
KINDS: tuple[str, ...] = ("circle", "square", "triangle")
SIZES: tuple[str, ...] = ("small", "large")

# Position name -> (column, row) in the 3×3 grid of regions.
POSITIONS: dict[str, tuple[int, int]] = {
    "top left": (0, 0),
    "top": (1, 0),
    "top right": (2, 0),
    "left": (0, 1),
    "centre": (1, 1),
    "right": (2, 1),
    "bottom left": (0, 2),
    "bottom": (1, 2),
    "bottom right": (2, 2),
}
GRID_TO_POSITION: dict[tuple[int, int], str] = {cr: name for name, cr in POSITIONS.items()}
_POSITION_INDEX = {name: i for i, name in enumerate(POSITIONS)}

# Placement, as fractions of the image side. Centroids sit at 0.2 / 0.5 / 0.8, not at the region
# centres 1/6 / 5/6, so a large shape in a corner still fits inside the image.
GRID_CENTRES: tuple[float, ...] = (0.2, 0.5, 0.8)
POSITION_JITTER = 0.025
# Shape extent (bounding-box side) per size; the evaluator splits them at SIZE_THRESHOLD.
SIZE_EXTENT: dict[str, float] = {"small": 0.18, "large": 0.30}
SIZE_JITTER = 0.02
SIZE_THRESHOLD = 0.24
EDGE_MARGIN = 0.02
COLOUR_JITTER = 6  # ± per channel, per image: a little variety without blurring the names
SUPERSAMPLE = 4

# Fraction of (colour, background) pairs that lose one shape kind to the held-out set: with one
# kind of three, about 12% of the single-shape (colour, kind, background) triples.
HELD_OUT_PAIR_FRACTION = 0.36

# --- caption vocabulary -------------------------------------------------------------------------

SIZE_WORDS: dict[str, tuple[str, ...]] = {
    "small": ("small", "little", "tiny"),
    "large": ("large", "big"),
}
COLOUR_WORDS: dict[str, tuple[str, ...]] = {name: (name,) for name in COLOURS}
COLOUR_WORDS["gray"] = ("gray", "grey")
KIND_WORDS: dict[str, tuple[str, ...]] = {kind: (kind,) for kind in KINDS}
VERTICAL_WORDS: dict[str, tuple[str, ...]] = {
    "top": ("top", "upper"),
    "bottom": ("bottom", "lower"),
}
CENTRE_WORDS: tuple[str, ...] = ("centre", "center", "middle")

_SIZE_OF = {w: size for size, words in SIZE_WORDS.items() for w in words}
_COLOUR_OF = {w: colour for colour, words in COLOUR_WORDS.items() for w in words}
_KIND_OF = {w: kind for kind, words in KIND_WORDS.items() for w in words}
_VERTICAL_OF = {w: v for v, words in VERTICAL_WORDS.items() for w in words}
_HORIZONTAL = ("left", "right")
_CENTRE_OF = {w: "centre" for w in (*CENTRE_WORDS, "centred", "centered")}

_PREFIXES = ("", "", "", "a picture of ", "an image of ", "a drawing of ", "a simple image of ")


@dataclass(frozen=True)
class Shape:
    """One shape's named attributes (None only in a parsed caption that does not say)."""

    kind: str
    colour: str
    position: str | None
    size: str | None


@dataclass(frozen=True)
class Scene:
    """A background colour and one or two shapes (never the background's colour).

    Shapes are kept in position order, so two scenes that name the same shapes compare equal
    whatever order a caption lists them in. `background` is None only in a parsed caption that
    does not name one.
    """

    background: str | None
    shapes: tuple[Shape, ...]

    def __post_init__(self) -> None:
        ordered = tuple(sorted(self.shapes, key=lambda s: _POSITION_INDEX.get(s.position, 99)))
        object.__setattr__(self, "shapes", ordered)
        for shape in self.shapes:
            if shape.colour == self.background:
                raise ValueError(f"shape colour equals background colour '{self.background}'")


# --- scenes -------------------------------------------------------------------------------------


def _choice(rng: np.random.Generator, options: tuple[str, ...] | list[str]) -> str:
    """One element of `options`, uniformly."""
    return options[int(rng.integers(len(options)))]


def _apart(a: str, b: str) -> bool:
    """Whether two positions are two regions apart on some axis (so their shapes cannot touch)."""
    (ca, ra), (cb, rb) = POSITIONS[a], POSITIONS[b]
    return abs(ca - cb) == 2 or abs(ra - rb) == 2


POSITION_PAIRS: tuple[tuple[str, str], ...] = tuple(
    (a, b) for a, b in itertools.combinations(POSITIONS, 2) if _apart(a, b)
)


def random_scene(rng: np.random.Generator, two_shapes_prob: float = 0.3) -> Scene:
    """A uniformly drawn scene; two shapes (in different colours) with `two_shapes_prob`."""
    background = _choice(rng, BACKGROUND_COLOURS)
    colours = [c for c in SHAPE_COLOURS if c != background]
    if rng.random() >= two_shapes_prob:
        positions: tuple[str, ...] = (_choice(rng, tuple(POSITIONS)),)
        picked = [_choice(rng, colours)]
    else:
        positions = POSITION_PAIRS[int(rng.integers(len(POSITION_PAIRS)))]
        picked = [str(c) for c in rng.choice(colours, size=2, replace=False)]
    shapes = tuple(
        Shape(_choice(rng, KINDS), colour, position, _choice(rng, SIZES))
        for colour, position in zip(picked, positions, strict=True)
    )
    return Scene(background, shapes)


def _stable_hash(text: str) -> int:
    """A hash that does not change between runs or Python versions (unlike `hash`)."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")


def _held_out_triples() -> frozenset[tuple[str, str, str]]:
    """(shape colour, kind, background) triples reserved for evaluation; at most one kind per
    (colour, background) pair, so every pair of attributes still occurs in training."""
    held = set()
    for colour in SHAPE_COLOURS:
        for background in BACKGROUND_COLOURS:
            if colour == background:
                continue
            h = _stable_hash(f"sdrt-shapes|{colour}|{background}")
            if (h % 10_000) / 10_000 < HELD_OUT_PAIR_FRACTION:
                held.add((colour, KINDS[(h // 10_000) % len(KINDS)], background))
    return frozenset(held)


HELD_OUT: frozenset[tuple[str, str, str]] = _held_out_triples()


def is_held_out(scene: Scene) -> bool:
    """Whether any shape of `scene` uses a held-out (colour, kind, background) triple."""
    return any((s.colour, s.kind, scene.background) in HELD_OUT for s in scene.shapes)


def held_out_scenes(n: int, seed: int = 0) -> list[Scene]:
    """`n` single-shape held-out scenes: all of them shuffled by `seed`, cycled if `n` is larger."""
    everything = [
        Scene(background, (Shape(kind, colour, position, size),))
        for colour, kind, background in sorted(HELD_OUT)
        for position in POSITIONS
        for size in SIZES
    ]
    order = np.random.default_rng(seed).permutation(len(everything))
    return [everything[order[i % len(everything)]] for i in range(n)]


def held_out_captions(n: int, seed: int = 0) -> list[str]:
    """A fixed evaluation set: captions of `n` held-out single-shape scenes."""
    rng = np.random.default_rng([seed, 1])
    return [caption(scene, rng) for scene in held_out_scenes(n, seed)]


def seen_captions(n: int, seed: int = 0, two_shapes_prob: float = 0.3) -> list[str]:
    """Captions of `n` random scenes that are not held out (an in-distribution comparison set).

    Drawn from a stream apart from `training_samples`' (for equal seeds), though scenes repeat:
    the attribute space is small.
    """
    rng = np.random.default_rng([seed, 3])
    captions = []
    while len(captions) < n:
        scene = random_scene(rng, two_shapes_prob)
        if not is_held_out(scene):
            captions.append(caption(scene, rng))
    return captions


def training_samples(n: int | None, seed: int = 0, size: int = 64,
                     two_shapes_prob: float = 0.3) -> Iterator[tuple[np.ndarray, str]]:
    """Yield `n` (image, caption) pairs of non-held-out scenes (forever if `n` is None)."""
    rng = np.random.default_rng(seed)
    count = 0
    while n is None or count < n:
        scene = random_scene(rng, two_shapes_prob)
        if is_held_out(scene):
            continue
        yield render(scene, size, rng), caption(scene, rng)
        count += 1


# --- rendering ----------------------------------------------------------------------------------


def _triangle_box(cx: float, cy: float, extent: float) -> tuple[float, float, float, float]:
    """Bounding box (x0, y0, x1, y1) of an apex-up triangle with area centroid (cx, cy)."""
    # The centroid of a triangle is a third of the height above its base.
    return cx - extent / 2, cy - 2 * extent / 3, cx + extent / 2, cy + extent / 3


def _box(kind: str, cx: float, cy: float, extent: float) -> tuple[float, float, float, float]:
    """Bounding box of a shape whose area centroid is (cx, cy)."""
    if kind == "triangle":
        return _triangle_box(cx, cy, extent)
    half = extent / 2
    return cx - half, cy - half, cx + half, cy + half


def placement(shape: Shape, rng: np.random.Generator | None = None) -> tuple[float, float, float]:
    """(cx, cy, extent) as fractions of the image side: centroid and bounding-box side."""
    if shape.position is None or shape.size is None:
        raise ValueError(f"cannot place a shape without a position and size: {shape}")
    column, row = POSITIONS[shape.position]
    cx, cy, extent = GRID_CENTRES[column], GRID_CENTRES[row], SIZE_EXTENT[shape.size]
    if rng is not None:
        cx += rng.uniform(-POSITION_JITTER, POSITION_JITTER)
        cy += rng.uniform(-POSITION_JITTER, POSITION_JITTER)
        extent += rng.uniform(-SIZE_JITTER, SIZE_JITTER)
    # Keep the whole shape inside the image, so its border pixels stay background.
    x0, y0, x1, y1 = _box(shape.kind, cx, cy, extent)
    cx += max(0.0, EDGE_MARGIN - x0) - max(0.0, x1 - (1 - EDGE_MARGIN))
    cy += max(0.0, EDGE_MARGIN - y0) - max(0.0, y1 - (1 - EDGE_MARGIN))
    return cx, cy, extent


def _inside(kind: str, x: np.ndarray, y: np.ndarray, cx: float, cy: float,
            extent: float) -> np.ndarray:
    """Whether points (x, y) lie in the shape with area centroid (cx, cy) and side `extent`."""
    if kind == "circle":
        return (x - cx) ** 2 + (y - cy) ** 2 <= (extent / 2) ** 2
    if kind == "square":
        return (np.abs(x - cx) <= extent / 2) & (np.abs(y - cy) <= extent / 2)
    if kind == "triangle":
        x0, y0, x1, y1 = _triangle_box(cx, cy, extent)
        half_width = (y - y0) / (y1 - y0) * extent / 2
        return (y >= y0) & (y <= y1) & (np.abs(x - cx) <= half_width)
    raise ValueError(f"unknown shape kind '{kind}'")


def coverage(kind: str, cx: float, cy: float, extent: float, shape: tuple[int, int],
             origin: tuple[int, int] = (0, 0), supersample: int = SUPERSAMPLE) -> np.ndarray:
    """Fraction of each pixel the shape covers, on a `shape` (rows, cols) window at `origin`
    (row, col); centroid and extent in pixels. The renderer's and evaluator's one geometry."""
    rows, cols = shape
    step = 1.0 / supersample
    y = origin[0] + (np.arange(rows * supersample) + 0.5) * step
    x = origin[1] + (np.arange(cols * supersample) + 0.5) * step
    inside = _inside(kind, x[None, :], y[:, None], cx, cy, extent)
    return inside.reshape(rows, supersample, cols, supersample).mean(axis=(1, 3))


def _jittered(colour: str, rng: np.random.Generator | None) -> np.ndarray:
    """The named colour's RGB, nudged by a few levels when `rng` is given."""
    rgb = np.array(COLOURS[colour], dtype=np.float64)
    if rng is not None:
        rgb += rng.integers(-COLOUR_JITTER, COLOUR_JITTER + 1, size=3)
    return np.clip(rgb, 0, 255)


def render(scene: Scene, size: int = 64, rng: np.random.Generator | None = None) -> np.ndarray:
    """Draw `scene` as a (size, size, 3) uint8 image; `rng` adds position/size/colour jitter."""
    if scene.background is None:
        raise ValueError("cannot render a scene without a background colour")
    canvas = np.empty((size, size, 3), dtype=np.float64)
    canvas[:] = _jittered(scene.background, rng)
    for shape in scene.shapes:
        cx, cy, extent = placement(shape, rng)
        alpha = coverage(shape.kind, cx * size, cy * size, extent * size, (size, size))[..., None]
        canvas = canvas * (1 - alpha) + _jittered(shape.colour, rng) * alpha
    return np.clip(np.rint(canvas), 0, 255).astype(np.uint8)


# --- captions -----------------------------------------------------------------------------------


def _article(next_word: str) -> str:
    """'a' or 'an' before `next_word`."""
    return "an" if next_word[0] in "aeiou" else "a"


def _position_phrase(position: str, rng: np.random.Generator) -> str:
    """A phrase naming `position`, e.g. 'in the upper left corner', 'on the right'."""
    if position == "centre":
        word = _choice(rng, CENTRE_WORDS)
        return _choice(rng, (f"in the {word}", f"at the {word}"))
    parts = position.split()
    if len(parts) == 2:
        vertical = _choice(rng, VERTICAL_WORDS[parts[0]])
        corner = f"{vertical} {parts[1]}"
        return _choice(rng, (f"in the {corner}", f"at the {corner}", f"in the {corner} corner",
                             f"in the {vertical}-{parts[1]} corner", corner))
    if position in _HORIZONTAL:
        return _choice(rng, (f"on the {position}", f"at the {position}",
                             f"on the {position} side", f"to the {position}"))
    word = _choice(rng, VERTICAL_WORDS[position])
    if word == "upper" or word == "lower":
        return f"in the {word} part"
    return _choice(rng, (f"at the {word}", f"near the {word}", f"along the {word}"))


def _noun_phrase(shape: Shape, rng: np.random.Generator) -> str:
    """'a small red circle', 'a big orange square', ..."""
    words = (_choice(rng, SIZE_WORDS[shape.size]), _choice(rng, COLOUR_WORDS[shape.colour]),
             _choice(rng, KIND_WORDS[shape.kind]))
    return f"{_article(words[0])} {' '.join(words)}"


def _background_words(background: str, rng: np.random.Generator) -> str:
    """The background's colour word (with its spelling variants)."""
    return _choice(rng, COLOUR_WORDS[background])


def caption(scene: Scene, rng: np.random.Generator) -> str:
    """A varied English caption for `scene` (every attribute set) that `parse_caption` inverts."""
    listed = [scene.shapes[i] for i in rng.permutation(len(scene.shapes))]
    parts = [f"{_noun_phrase(s, rng)} {_position_phrase(s.position, rng)}" for s in listed]
    things = " and ".join(parts)
    bg = _background_words(scene.background, rng)
    templates = [
        f"{things} on {_article(bg)} {bg} background",
        f"{things}, on {_article(bg)} {bg} background",
        f"{bg} background, {things}",
        f"{things}, on {bg}",
        f"{_article(bg)} {bg} background with {things}",
        f"{things} against {_article(bg)} {bg} background",
    ]
    if len(scene.shapes) == 1:
        # Position phrase moved after the background: "a small red circle on blue, top left".
        shape = scene.shapes[0]
        templates.append(f"{_noun_phrase(shape, rng)} on {_article(bg)} {bg} background, "
                         f"{_position_phrase(shape.position, rng)}")
    else:
        templates.append(f"two shapes on {_article(bg)} {bg} background: {things}")
    return _choice(rng, _PREFIXES) + _choice(rng, templates)


# --- parsing ------------------------------------------------------------------------------------


def _tokens(text: str) -> list[str]:
    """Lower-case words; punctuation and hyphens separate words."""
    return re.findall(r"[a-z]+", text.lower())


def _position_of(words: list[str]) -> str | None:
    """The position named by `words` ('upper', 'left', 'corner' -> 'top left'), or None."""
    vertical = next((_VERTICAL_OF[w] for w in words if w in _VERTICAL_OF), None)
    horizontal = next((w for w in words if w in _HORIZONTAL), None)
    if vertical and horizontal:
        return f"{vertical} {horizontal}"
    if vertical or horizontal:
        return vertical or horizontal
    return "centre" if any(w in _CENTRE_OF for w in words) else None


def parse_caption(text: str) -> Scene:
    """Attributes named by a caption: the inverse of `caption`, and tolerant of hand-written ones.

    A shape is a kind word; its colour is the colour word right before it (required) and its
    size the size word before that. Any other colour word names the background. A shape's
    position words are those after it, up to the next shape's noun phrase (with one shape: all
    position words in the caption). Size, position and background are None where not said.
    """
    words = _tokens(text)
    kinds = [i for i, w in enumerate(words) if w in _KIND_OF]
    if not kinds:
        raise ValueError(f"no shape (circle, square, triangle) in caption: {text!r}")
    shape_colour_at = {i - 1 for i in kinds}
    backgrounds = [_COLOUR_OF[w] for i, w in enumerate(words)
                   if w in _COLOUR_OF and i not in shape_colour_at]
    shapes = []
    for n, k in enumerate(kinds):
        colour = _COLOUR_OF.get(words[k - 1]) if k >= 1 else None
        if colour is None:
            raise ValueError(f"no colour right before shape {n + 1} in caption: {text!r}")
        size = _SIZE_OF.get(words[k - 2]) if k >= 2 else None
        if len(kinds) == 1:
            position = _position_of(words)
        else:
            end = kinds[n + 1] - 2 if n + 1 < len(kinds) else len(words)
            position = _position_of(words[k + 1:end])
        shapes.append(Shape(_KIND_OF[words[k]], colour, position, size))
    return Scene(backgrounds[0] if backgrounds else None, tuple(shapes))
