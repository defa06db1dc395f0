"""`sdrt quantize CONTROL_DIR --base MODEL_DIR`: a precision variant of a ControlNet folder's graph
(Zhang et al. 2023), gated with the control applied.

The graph is made as a model folder's UNet is (ort.py, openvino.py): fp16 weights (ORT, OpenVINO),
bf16 execution (OpenVINO, CPUs with native bf16 only), int8 (ORT: static QDQ calibrated on the
ControlNet's inputs recorded while the base model generates with the control; OpenVINO:
weight-only). Its files go to `variants/<precision>-<backend>/controlnet/` and its entry, with a
model variant's keys, to the control folder's manifest.json `variants`, so the runtime reads it
with sdrt.runtime.model.variants and runs it where the pipeline's precision and backend match.

The gate: the base model, fp32 on the variant's backend, generates the gate prompts × seeds with
a fixed synthetic edge map as the control image (module "none", scale 1, balanced), once with
the control folder's fp32 graph and once with the variant. Decoded images and final latents are
compared by PSNR against gates.MIN_IMAGE_PSNR_DB (NaN/Inf or black images fail), so the figures
are the ControlNet's own error, not the base model's.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from sdrt.quantize import gates, prompts
from sdrt.quantize.calibration import Feeds, RecordingSession
from sdrt.quantize.stage import (
    CALIBRATION_PROMPT_COUNT,
    QuantizeOptions,
    gate_settings,
    make_and_list,
    make_graph,
    maker_for,
    native_bf16,
)
from sdrt.runtime.control.folder import ControlNets, ControlOpener
from sdrt.runtime.control.manifest import CONTROLNET, ControlManifest
from sdrt.runtime.control.unit import ControlUnit
from sdrt.runtime.errors import InputError, QuantizeError
from sdrt.runtime.model.folder import check_folder, read_facts
from sdrt.runtime.model.variants import REFERENCE, ComponentVariant, Variant
from sdrt.runtime.pipeline import Pipeline
from sdrt.runtime.session import open_session

log = logging.getLogger(__name__)

CONTROL_PRECISIONS = ("fp16", "bf16", "int8")
# Seeds of the synthetic control maps: the gate never measures on the map calibration saw.
GATE_MAP_SEED, CALIBRATION_MAP_SEED = 0, 1
MAP_SHAPES = 6  # outlined rectangles, ellipses and lines per map
LINE_FRACTION = 64  # line width = side / this (≥ 1 pixel), about a Canny edge at 512²


def quantize_control(folder: Path, options: QuantizeOptions, backend: str) -> dict:
    """Make, gate and list one variant of a ControlNet folder; its manifest entry."""
    if options.precision not in CONTROL_PRECISIONS:
        raise InputError(f"a ControlNet folder takes {', '.join(CONTROL_PRECISIONS)} variants, "
                         f"not {options.precision}")
    if options.base is None:
        raise InputError(f"'{folder.name}' is a ControlNet folder: name the model its gate "
                         "generates with, --base MODEL_DIR")
    if options.components is not None or options.adherence:
        raise InputError("--components and --adherence are for model folders; a ControlNet "
                         "folder has one graph, gated on images")
    base = Path(options.base)
    check_folder(base)
    manifest = ControlManifest.load(folder)
    settings = gate_settings(dataclasses.replace(options, adherence=0))

    def build(manifest: ControlManifest, out: Path) -> tuple[Variant, str, dict]:
        variant, method = _make_variant(folder, manifest, base, options, backend, out)
        return variant, method, run_gate(folder, base, variant, settings)

    return make_and_list(folder, manifest, Variant(options.precision, backend).key,
                         options.force, options.command(folder, backend, None), build)


def control_map(size: int, seed: int = GATE_MAP_SEED) -> Image.Image:
    """A fixed `size`² edge map as `canny` draws one (white outlines on black): rectangles,
    ellipses and lines placed by a generator seeded with `seed`."""
    rng = np.random.default_rng(seed)
    image = Image.new("RGB", (size, size))
    draw = ImageDraw.Draw(image)
    width = max(1, size // LINE_FRACTION)
    for kind in rng.integers(0, 3, MAP_SHAPES):
        x0, x1 = sorted(int(x) for x in rng.integers(0, size, 2))
        y0, y1 = sorted(int(y) for y in rng.integers(0, size, 2))
        if kind == 0:
            draw.rectangle((x0, y0, x1, y1), outline="white", width=width)
        elif kind == 1:
            draw.ellipse((x0, y0, x1, y1), outline="white", width=width)
        else:
            draw.line((x0, y0, x1, y1), fill="white", width=width)
    return image


def run_gate(folder: Path, base: Path, variant: Variant, settings: gates.GateSettings) -> dict:
    """The base model fp32 with the control folder's fp32 graph, then with `variant`; the gate
    record, or QuantizeError naming why it failed."""
    size = settings.size or read_facts(base).default_size
    unit = ControlUnit(model=folder, image=control_map(size))
    settings = dataclasses.replace(settings, size=size, controls=(unit,))
    pipe = gates.load_pipeline(base, variant.backend, REFERENCE, settings)
    try:
        reference = gates.render(pipe, settings)  # an fp32 pipeline runs the fp32 ControlNet
    except gates.UnusableOutput as exc:
        raise QuantizeError(f"fp32 itself gives unusable output with this control ({exc}): no "
                            f"gate can pass; {variant.key} is not listed") from exc
    candidate = _with_controlnets(pipe, pipe.controlnets.open_graph, variant)
    try:
        figures = gates.compare(reference, gates.render(candidate, settings))
    except gates.UnusableOutput as exc:
        raise QuantizeError(f"{variant.key} failed its gate ({exc}); its files were removed "
                            "and it is not listed") from exc
    summary = gates.summary(figures)
    log.info("%s gate: %s", variant.key, summary)
    reasons = gates.failures(variant.precision, figures)
    if reasons:
        raise QuantizeError(f"{variant.key} failed its gate: {'; '.join(reasons)} ({summary}); "
                            "its files were removed and it is not listed")
    return {
        "figures": figures, "summary": summary,
        "thresholds": {"min_image_psnr_db": gates.MIN_IMAGE_PSNR_DB[variant.precision]},
        "base": base.name, "base_precision": REFERENCE,
        "control": {"image": f"control_map({size}, seed={GATE_MAP_SEED})", "module": unit.module,
                    "scale": unit.scale, "mode": unit.mode},
        "prompts": list(settings.prompts), "seeds": list(settings.seeds),
        "steps": settings.steps or pipe.facts.family.steps, "size": size,
    }


def _make_variant(folder: Path, manifest: ControlManifest, base: Path, options: QuantizeOptions,
                  backend: str, out: Path) -> tuple[Variant, str]:
    """Write the ControlNet graph's variant into `out` (none for bf16); the Variant and method."""
    maker = maker_for(backend)
    if options.precision == "bf16":
        native_bf16(maker)
        return (Variant("bf16", backend, {CONTROLNET: ComponentVariant(execution="bf16")}),
                maker.METHODS["bf16"])
    src = manifest.graph_path(folder)
    feeds = None
    if maker.needs_calibration(options.precision, CONTROLNET, src):
        feeds = record_inputs(folder, base, backend, options)
    chosen = make_graph(maker, options.precision, CONTROLNET, src, folder, out, feeds)
    return (Variant(options.precision, backend, {CONTROLNET: chosen}),
            maker.METHODS[options.precision])


def record_inputs(folder: Path, base: Path, backend: str, options: QuantizeOptions) -> list[Feeds]:
    """Every feed the fp32 ControlNet gets while the base model, fp32, generates the calibration
    prompts (image i with seed i) with the calibration control map (not the gate's)."""
    size = options.size or read_facts(base).default_size
    recorders: list[RecordingSession] = []

    def opener(path: Path, execution: str) -> RecordingSession:
        recorders.append(RecordingSession(open_session(path, backend, execution=execution)))
        return recorders[-1]

    pipe = Pipeline.load(base, backend)
    pipe = _with_controlnets(pipe, opener, REFERENCE)
    unit = ControlUnit(model=folder, image=control_map(size, CALIBRATION_MAP_SEED))
    texts = prompts.calibration_prompts(options.prompt_set, CALIBRATION_PROMPT_COUNT)
    for i, prompt in enumerate(texts):
        pipe.generate(prompt, seed=i, steps=options.steps, width=size, height=size,
                      controls=[unit])
    feeds = [feed for recorder in recorders for feed in recorder.feeds]
    log.info("calibration: %d %s calls", len(feeds), CONTROLNET)
    return feeds


def _with_controlnets(pipe: Pipeline, opener: ControlOpener, precision: str | Variant) -> Pipeline:
    """`pipe` opening its ControlNets with `opener`, every one at `precision` (a Variant: that
    graph, listed or not)."""
    nets = pipe.controlnets
    return dataclasses.replace(pipe, controlnets=ControlNets(
        opener, nets.fit, backend=nets.backend, precision=precision, rows=nets.rows))
