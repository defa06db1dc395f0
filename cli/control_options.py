"""The ControlNet options of `sdrt generate`, `sdrt img2img` and `sdrt inpaint`: --controlnet DIR
(an exported control folder; repeatable, one ControlNet each) and its settings --control-image,
--control-scale, --control-start, --control-end, --control-mode, --control-resize,
--control-module, --control-threshold-a/-b, --control-processor-res, --control-pixel-perfect;
--preprocessor-dir adds network preprocessors (runtime/control/preprocess.py) to the modules.

Several ControlNets: a setting given once applies to every --controlnet; given as many times as
--controlnet, the i-th goes to the i-th; any other count is a one-line error (so is a setting
without --controlnet). Control images are read here, before any model loads. The command gets
the request field `controls` (a tuple of ControlUnit) when --controlnet is given. Without
--control-image, img2img and inpaint give each ControlNet their input picture (as the A1111
extension does); generate needs one.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from pathlib import Path

import click

from sdrt.cli.errors import reports_errors
from sdrt.runtime.errors import InputError

CONTROLNET_HELP = ("An exported ControlNet folder (`sdrt export` of a diffusers ControlNetModel "
                   "folder, an A1111 single-file ControlNet or a hub id); repeatable: the "
                   "ControlNets' residuals add up. Each --control-* setting is given once (for "
                   "all) or once per --controlnet, in order.")
IMAGE_HELP = ("The control image (a ready map with --control-module none, else the picture the "
              "module makes one of); img2img and inpaint default to their input picture.")
SCALE_HELP = "ControlNet weight (conditioning scale); default 1."
START_HELP = "Fraction of the steps after which the ControlNet starts acting, 0 to 1; default 0."
END_HELP = "Fraction of the steps after which it stops, 0 to 1; default 1."
MODE_HELP = ("balanced (default), prompt (A1111's \"My prompt is more important\": deep "
             "residuals weighed up, shallow down) or control (\"ControlNet is more important\": "
             "diffusers' guess mode, control on the conditional pass only).")
RESIZE_HELP = ("How the control image takes the output size (A1111's resize modes): crop "
               "(default; scaled to cover, centre-cropped), resize (stretched) or fill (scaled to "
               "fit, the rest filled with its border colour).")
MODULE_HELP = ("Preprocessor that makes the map from the control image: none (default: it is the "
               "map), canny (edges, OpenCV), invert (a black-on-white drawing to white-on-black), "
               "or a network module from --preprocessor-dir.")
THRESHOLD_A_HELP = "The module's first setting (canny: low threshold, default 100)."
THRESHOLD_B_HELP = "The module's second setting (canny: high threshold, default 200)."
PROCESSOR_RES_HELP = "Resolution (short side) the module works at; default 512."
PIXEL_PERFECT_HELP = ("Every module works at the resolution that maps its picture onto the "
                      "output size one to one (A1111's Pixel Perfect; overrides "
                      "--control-processor-res).")
PREPROCESSOR_DIR_HELP = ("Folder of network preprocessors (a subfolder each: preprocessor.json and "
                         "model.onnx) that --control-module can name.")
MODES = ("balanced", "prompt", "control")
RESIZES = ("crop", "resize", "fill")


def _number(text: str, option: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise InputError(f"{option} must be a number, got {text!r}") from None
    if not math.isfinite(value):
        raise InputError(f"{option} must be a finite number, got {text!r}")
    return value


def _integer(text: str, option: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise InputError(f"{option} must be an integer, got {text!r}") from None


def _choice(choices: tuple[str, ...]) -> Callable[[str, str], str]:
    def parse(text: str, option: str) -> str:
        if text.lower() not in choices:
            raise InputError(f"{option} must be one of {', '.join(choices)}, got {text!r}")
        return text.lower()

    return parse


def _text(text: str, option: str) -> str:
    return text


# click parameter → (option, ControlUnit field, parser, help, metavar)
SETTINGS = {
    "control_image": ("--control-image", "image", _text, IMAGE_HELP, "IMAGE"),
    "control_scale": ("--control-scale", "scale", _number, SCALE_HELP, "S"),
    "control_start": ("--control-start", "start", _number, START_HELP, "A"),
    "control_end": ("--control-end", "end", _number, END_HELP, "B"),
    "control_mode": ("--control-mode", "mode", _choice(MODES), MODE_HELP, "|".join(MODES)),
    "control_resize": ("--control-resize", "resize", _choice(RESIZES), RESIZE_HELP,
                       "|".join(RESIZES)),
    "control_module": ("--control-module", "module", _text, MODULE_HELP, "NAME"),
    "control_threshold_a": ("--control-threshold-a", "threshold_a", _number, THRESHOLD_A_HELP,
                            "A"),
    "control_threshold_b": ("--control-threshold-b", "threshold_b", _number, THRESHOLD_B_HELP,
                            "B"),
    "control_processor_res": ("--control-processor-res", "processor_res", _integer,
                              PROCESSOR_RES_HELP, "N"),
}


def control_options(needs_image: bool):
    """The options above for a click command (attached below run_options); it receives
    `controls=` when --controlnet is given (a bad value is a one-line error). `needs_image`:
    the command has no input picture to stand in for --control-image."""
    return functools.partial(_attach, needs_image=needs_image)


def _attach(command, needs_image: bool):
    options = [
        click.option("--controlnet", "controlnets", multiple=True, metavar="DIR",
                     help=CONTROLNET_HELP),
        *(click.option(option, param, multiple=True, metavar=metavar, help=help_text)
          for param, (option, _, _, help_text, metavar) in SETTINGS.items()),
        click.option("--control-pixel-perfect", is_flag=True, default=False,
                     help=PIXEL_PERFECT_HELP),
        click.option("--preprocessor-dir", type=click.Path(path_type=Path), default=None,
                     help=PREPROCESSOR_DIR_HELP),
    ]

    @functools.wraps(command)
    @reports_errors  # the wrapper itself parses the values, outside the command's own handler
    def wrapper(*args, controlnets, control_pixel_perfect, preprocessor_dir, **kwargs):
        from sdrt.runtime.control.preprocess import register_network_preprocessors

        given = {param: kwargs.pop(param) for param in SETTINGS}
        if preprocessor_dir is not None:  # attached below run_options: `run` is there
            register_network_preprocessors(preprocessor_dir, kwargs["run"].backend)
        units = control_units(controlnets, given, control_pixel_perfect, needs_image)
        return command(*args, **kwargs, **({"controls": units} if units else {}))

    for option in reversed(options):
        wrapper = option(wrapper)
    return wrapper


def control_units(controlnets: tuple[str, ...], given: dict[str, tuple[str, ...]],
                  pixel_perfect: bool, needs_image: bool = True) -> tuple:
    """One ControlUnit per --controlnet from the settings given (module docstring's rule)."""
    from sdrt.runtime.control.unit import ControlUnit

    count = len(controlnets)
    if count == 0:
        stray = [SETTINGS[param][0] for param, values in given.items() if values]
        if stray or pixel_perfect:
            raise InputError(f"{(stray or ['--control-pixel-perfect'])[0]} needs --controlnet "
                             "DIR (an exported ControlNet folder)")
        return ()
    if needs_image and not given["control_image"]:
        raise InputError("--controlnet needs --control-image IMAGE")
    fields: list[dict] = [{} for _ in range(count)]
    for param, values in given.items():
        option, field, parse, _, _ = SETTINGS[param]
        if values and len(values) not in (1, count):
            raise InputError(f"{option} is given {len(values)} times for {count} --controlnet: "
                             "give it once (for all) or once per --controlnet")
        parsed = [parse(value, option) for value in values]
        for i, unit in enumerate(fields):
            if parsed:
                unit[field] = parsed[i if len(parsed) == count else 0]
    pictures = _read_images({unit["image"] for unit in fields if "image" in unit})
    units = []
    for i, (folder, unit) in enumerate(zip(controlnets, fields, strict=True)):
        if "image" in unit:
            unit["image"] = pictures[unit["image"]]
        units.append(ControlUnit(model=_control_folder(folder), pixel_perfect=pixel_perfect,
                                 **unit).validate(i))
    return tuple(units)


def _read_images(paths: set[str]) -> dict:
    """Each control image read once (a bad file fails before any model loads)."""
    from sdrt.runtime.images import read_image

    return {path: read_image(Path(path), "--control-image") for path in paths}


def _control_folder(text: str) -> Path:
    """An exported control folder, checked to be one."""
    from sdrt.runtime.control.manifest import is_control_export

    folder = Path(text)
    if not folder.is_dir():
        raise InputError(f"--controlnet '{text}' is not a folder")
    if not is_control_export(folder):
        raise InputError(f"--controlnet '{text}' is not an exported ControlNet folder; make one "
                         "with `sdrt export SOURCE OUT_DIR`")
    return folder
