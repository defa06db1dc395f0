"""ControlNet preprocessors (Zhang et al. 2023, §4's "annotators"): the map a ControlNet reads,
made from a picture, as the A1111 ControlNet extension's modules make it.

Shipped (no network): `none` (the picture is the map), `invert` (255 − pixel: a white-background
line drawing as the black-background map line ControlNets expect; the extension's "invert (from
white bg & black line)"; no resizing) and `canny` (OpenCV's `cv2.Canny` on the RGB uint8 picture,
threshold_a = low threshold (default 100), threshold_b = high (default 200), the one-channel edges
repeated to three). A module that takes a resolution first scales the picture so its short side is
`processor_res` (default 512; cv2's INTER_CUBIC up, INTER_AREA down, sides rounded), pads it with
its edge pixels to multiples of 64, runs, and crops the padding off: the extension's rule, so the
map comes out at that resolution, not the output size (control_image resizes it).

Network preprocessors (depth, pose, …) are graphs exported like any other, in a folder per
module: `preprocessor.json` (`format: "sdrt-preprocessor"`, `format_version: 1`, `name`,
optional `label` and `resolution` default) beside `model.onnx` (or `openvino_model.xml`). The
graph takes `image` (1, 3, h, w) float32 RGB in [0, 1] at the module's resolution (sides padded
to multiples of 64) and returns `map` (1, 1 or 3, h, w) float32 in [0, 1].
`register_network_preprocessors(folder)` adds every such module under a folder to PREPROCESSORS,
so the CLI's --control-module and the server's module_list see it; its graph loads on first use.
"""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from sdrt.runtime.errors import InputError, ModelError
from sdrt.runtime.images import MAX_INPUT_PIXELS, ImageSource, read_image
from sdrt.runtime.session import Session, open_session

PAD_MULTIPLE = 64  # the extension pads a module's input to multiples of 64 (its networks' stride)
NETWORK_FORMAT = "sdrt-preprocessor"
NETWORK_FORMAT_VERSION = 1
NETWORK_JSON = "preprocessor.json"
NETWORK_INPUT, NETWORK_OUTPUT = "image", "map"
GRAPH_FILES = ("model.onnx", "openvino_model.xml")

# (pixels (H, W, 3) uint8, resolution, threshold_a, threshold_b) -> map (h, w, 3) uint8
Detector = Callable[[np.ndarray, int, float, float], np.ndarray]


@dataclass(frozen=True)
class Slider:
    """One of a module's settings as the extension's module_detail lists it."""

    label: str
    value: float
    minimum: float
    maximum: float
    step: float


# The extension's resolution slider: 128 to 2048 in steps of 8, default 512.
RESOLUTION = Slider("Resolution", 512, 128, 2048, 8)


@dataclass(frozen=True)
class Preprocessor:
    """A module: its name, UI label, settings (None: not used) and the function that runs it."""

    name: str
    label: str
    detector: Detector = field(repr=False)
    resolution: Slider | None = None
    threshold_a: Slider | None = None
    threshold_b: Slider | None = None


def _none(pixels: np.ndarray, resolution: int, low: float, high: float) -> np.ndarray:
    return pixels


def _invert(pixels: np.ndarray, resolution: int, low: float, high: float) -> np.ndarray:
    return 255 - pixels


def _canny(pixels: np.ndarray, resolution: int, low: float, high: float) -> np.ndarray:
    import cv2

    padded, (height, width) = at_resolution(pixels, resolution)
    # the extension passes the thresholds as whole numbers
    edges = cv2.Canny(padded, int(low), int(high))[:height, :width]  # (h, w)
    return np.repeat(edges[:, :, None], 3, axis=2)


# In the extension's list order. `none` shows the resolution slider there (its infotext says
# "Processor Res: 512") though nothing uses it; `invert` hides it.
PREPROCESSORS: dict[str, Preprocessor] = {
    "none": Preprocessor("none", "none", _none, RESOLUTION),
    "canny": Preprocessor("canny", "canny", _canny, RESOLUTION,
                          Slider("Low Threshold", 100, 0, 256, 1),
                          Slider("High Threshold", 200, 0, 256, 1)),
    "invert": Preprocessor("invert", "invert (from white bg & black line)", _invert),
}
BUILT_IN = tuple(PREPROCESSORS)


def preprocessor(module: str) -> Preprocessor:
    """The registered module of that name (InputError listing the known ones)."""
    found = PREPROCESSORS.get(module)
    if found is None:
        raise InputError(f"unknown ControlNet preprocessor {module!r}; choose one of: "
                         f"{', '.join(PREPROCESSORS)}")
    return found


def detect(module: str, image: ImageSource, *, processor_res: int | None = None,
           threshold_a: float | None = None, threshold_b: float | None = None) -> Image.Image:
    """The map `module` makes of `image` (RGB); None settings take the module's defaults."""
    spec = preprocessor(module)
    resolution = _resolution(spec, processor_res)
    low = _threshold(spec.threshold_a, threshold_a, "threshold_a")
    high = _threshold(spec.threshold_b, threshold_b, "threshold_b")
    pixels = np.asarray(read_image(image, "control image"))  # (H, W, 3) uint8
    return Image.fromarray(np.ascontiguousarray(spec.detector(pixels, resolution, low, high)))


def _resolution(spec: Preprocessor, processor_res: int | None) -> int:
    if spec.resolution is None:
        return 0  # the module works at the picture's own size
    if processor_res is None:
        return int(spec.resolution.value)
    if isinstance(processor_res, bool) or not isinstance(processor_res, int | np.integer) \
            or processor_res < 1:
        raise InputError(f"processor_res must be a positive integer, got {processor_res!r}")
    return int(processor_res)


def _threshold(slider: Slider | None, value: float | None, name: str) -> float:
    if slider is None:
        return 0.0
    if value is None:
        return float(slider.value)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) \
            or value < 0:
        raise InputError(f"{name} ({slider.label}) must be a number ≥ 0, got {value!r}")
    return float(value)


def at_resolution(pixels: np.ndarray, resolution: int) -> tuple[np.ndarray, tuple[int, int]]:
    """`pixels` with the short side scaled to `resolution` and edge-padded to multiples of 64,
    and the scaled (height, width) to crop the module's output back to (the extension's rule)."""
    import cv2

    height, width = pixels.shape[:2]
    k = resolution / min(height, width)
    size = (round(width * k), round(height * k))
    if size[0] * size[1] > MAX_INPUT_PIXELS:
        raise InputError(f"processor_res {resolution} makes a {size[0]}×{size[1]} map from a "
                         f"{width}×{height} picture: more than {MAX_INPUT_PIXELS:,} pixels")
    scaled = cv2.resize(pixels, size, interpolation=cv2.INTER_CUBIC if k > 1 else cv2.INTER_AREA)
    pad = ((0, -size[1] % PAD_MULTIPLE), (0, -size[0] % PAD_MULTIPLE), (0, 0))
    return np.pad(scaled, pad, mode="edge"), (size[1], size[0])


class NetworkPreprocessor:
    """A module exported as a graph: `image` (1, 3, h, w) RGB in [0, 1] → `map` (1, 1 or 3,
    h, w) in [0, 1], run at the module's resolution; the graph loads on first use."""

    def __init__(self, graph: Path, backend: str = "ort",
                 opener: Callable[[Path, str], Session] = open_session) -> None:
        self.graph, self.backend = graph, backend
        self._opener = opener
        self._session: Session | None = None
        self._lock = threading.Lock()

    def session(self) -> Session:
        """The graph's session, opened once and its names checked."""
        with self._lock:
            if self._session is None:
                session = self._opener(self.graph, self.backend)
                if NETWORK_INPUT not in session.inputs or NETWORK_OUTPUT not in session.outputs:
                    raise ModelError(f"preprocessor graph '{self.graph}' must take "
                                     f"'{NETWORK_INPUT}' and return '{NETWORK_OUTPUT}'; it takes "
                                     f"{sorted(session.inputs)} and returns "
                                     f"{sorted(session.outputs)}")
                self._session = session
            return self._session

    def __call__(self, pixels: np.ndarray, resolution: int, low: float, high: float
                 ) -> np.ndarray:
        padded, (height, width) = at_resolution(pixels, resolution)
        feed = (padded.astype(np.float32) / np.float32(255.0)).transpose(2, 0, 1)[None]
        out = self.session().run({NETWORK_INPUT: feed})[NETWORK_OUTPUT]  # (1, C, h', w')
        if out.ndim != 4 or out.shape[:2] not in ((1, 1), (1, 3)) \
                or out.shape[2:] != padded.shape[:2]:
            raise ModelError(f"preprocessor graph '{self.graph}' returned '{NETWORK_OUTPUT}' of "
                             f"shape {out.shape}; expected (1, 1 or 3, {padded.shape[0]}, "
                             f"{padded.shape[1]})")
        values = np.clip(np.nan_to_num(out[0]), 0.0, 1.0) * 255.0 + 0.5
        rgb = np.broadcast_to(values.astype(np.uint8), (3, *out.shape[2:]))
        return rgb.transpose(1, 2, 0)[:height, :width]


def network_preprocessors(folder: Path, backend: str = "ort") -> dict[str, Preprocessor]:
    """Every module folder under `folder` (its preprocessor.json and graph), by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"preprocessor folder '{folder}' does not exist")
    found: dict[str, Preprocessor] = {}
    for described in sorted(folder.rglob(NETWORK_JSON)):
        spec = _network_module(described, backend)
        if spec.name in found:
            raise ModelError(f"two preprocessor folders under '{folder}' are named {spec.name!r}")
        found[spec.name] = spec
    return found


def _network_module(described: Path, backend: str) -> Preprocessor:
    try:
        info = json.loads(described.read_text("utf-8"))
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise ModelError(f"'{described}' is not readable JSON: {exc}") from None
    if not isinstance(info, dict) or info.get("format") != NETWORK_FORMAT \
            or info.get("format_version") != NETWORK_FORMAT_VERSION:
        raise ModelError(f"'{described}' is not an {NETWORK_FORMAT} v{NETWORK_FORMAT_VERSION} "
                         "description")
    name, resolution = info.get("name"), info.get("resolution", RESOLUTION.value)
    if not isinstance(name, str) or not name or not isinstance(resolution, int) \
            or resolution < 1:
        raise ModelError(f"'{described}' needs a 'name' and a positive integer 'resolution'")
    graphs = [path for path in (described.parent / file for file in GRAPH_FILES)
              if path.is_file()]
    if not graphs:
        raise ModelError(f"preprocessor {name!r}: no {' or '.join(GRAPH_FILES)} beside "
                         f"'{described}'")
    slider = Slider(RESOLUTION.label, resolution, RESOLUTION.minimum, RESOLUTION.maximum,
                    RESOLUTION.step)
    return Preprocessor(name, str(info.get("label", name)),
                        NetworkPreprocessor(graphs[0], backend), slider)


def register_network_preprocessors(folder: Path, backend: str = "ort") -> tuple[str, ...]:
    """Add the network modules under `folder` to PREPROCESSORS; their names."""
    found = network_preprocessors(folder, backend)
    clash = sorted(set(found) & set(BUILT_IN))
    if clash:
        raise ModelError(f"preprocessor folder '{folder}' names built-in modules: "
                         f"{', '.join(clash)}")
    PREPROCESSORS.update(found)
    return tuple(found)
