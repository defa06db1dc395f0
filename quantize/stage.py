"""`sdrt quantize`: make one precision variant of a model folder, gate it, list it if it passes.

Steps: check the request against what each backend makes (SUPPORTED); record calibration inputs
from fp32 pipeline runs where a recipe needs them; write the variant's graphs under
`variants/<precision>-<backend>/` (with DeepCache graphs cut from an OpenVINO UNet where the
folder has fp32 ones, deepcache_ir.py); run the fidelity gate (quantize/gates.py); then list the
variant in manifest.json with its files' sha256, sizes, gate figures and the command, or remove
its files and raise QuantizeError with the reason; last, time a listed variant's denoiser step
against fp32's on its backend (speed_record.py). A ControlNet folder (`sdrt export` of a
ControlNet) gets the same but the timing, gated with its --base model and the control applied
(control.py).
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from sdrt.quantize import gates, prompts
from sdrt.quantize.speed_record import record_speed
from sdrt.runtime.control.manifest import is_control_export
from sdrt.runtime.errors import InputError, ModelError, QuantizeError, first_line
from sdrt.runtime.model.folder import check_folder
from sdrt.runtime.model.manifest import MANIFEST_NAME, Manifest, scan_files
from sdrt.runtime.model.variants import PRECISIONS, VARIANTS_DIR, ComponentVariant, Variant

log = logging.getLogger(__name__)

# Which backends make each precision, the first being the default.
SUPPORTED = {
    "fp16": ("ort", "openvino"),
    "bf16": ("openvino",),
    "int8": ("ort", "openvino"),
    "int8-hybrid": ("openvino",),
    "int4": ("openvino",),
}
# Graphs a variant may replace. The VAE decoder only when named (it stays fp32 unless a gate proves
# otherwise: fp16 VAEs are known to give NaN or black images); the VAE encoder never, since the
# text-to-image gate cannot test it.
# SD 3's MMDiT (`transformer`) and optional T5 (`text_encoder_3`) as the UNet and CLIP.
QUANTIZABLE = ("text_encoder", "text_encoder_2", "text_encoder_3", "unet", "transformer",
               "vae_decoder")
DEFAULT_COMPONENTS = ("text_encoder", "text_encoder_2", "text_encoder_3", "unet", "transformer")
# What a precision makes when --components is not given, where that differs from
# DEFAULT_COMPONENTS. bf16 adds the VAE decoder: it keeps fp32's range (no fp16-style overflow),
# and the gate decodes with it. int8-hybrid makes the UNet alone: on the embedded model its int8
# UNet kept adherence within 1 point of fp32, but with the int8 VAE decoder (decoder_int8.py,
# which alone lost none) the pair lost 4 points, and 4.5 with the text encoder's int8 weights
# too, which buy no speed; `--components unet,vae_decoder` still makes the pair, gated.
DEFAULTS = {"bf16": (*DEFAULT_COMPONENTS, "vae_decoder"), "int8-hybrid": ("unet", "transformer")}
# int8-hybrid on a CPU with native bf16 runs these graphs, when it does not quantize them, in
# bf16 (no file): the hybrid UNet's float ops run in bf16 there already (quantize/openvino.py),
# and an fp32 decoder beside it would take twice the bf16 one's time (a 512² decode is 2.5
# TFLOP). The variant's gate generates with them, so it gates the whole set.
BF16_REMAINDER = ("text_encoder", "text_encoder_2", "text_encoder_3", "vae_decoder")
CALIBRATION_PROMPT_COUNT = 16  # × steps UNet calls: 320 samples at 20 steps
# Prompt i is recorded at CALIBRATION_GUIDANCE[i % 4] × the model's guidance scale
# (calibration.record_inputs): on the embedded model, 16 prompts over these scales left the int8
# UNet 0.0034 relative error against 0.0044 for 8 prompts at the model's scale alone.
CALIBRATION_GUIDANCE = (0.5, 1.0, 1.5, 2.5)
GATE_PROMPT_COUNT = 4  # × gates.GATE_SEEDS images compared by PSNR
SCENES_ADHERENCE_CAPTIONS = 200  # the adherence benchmark's default sample


@dataclass(frozen=True)
class QuantizeOptions:
    """One `sdrt quantize` request; None fields take the defaults described on each."""

    precision: str
    backend: str | None = None  # None: SUPPORTED's first for the precision
    components: tuple[str, ...] | None = None  # None: DEFAULT_COMPONENTS the folder has
    prompt_set: str = "general"  # prompts.PROMPT_SETS
    steps: int | None = None  # None: the model family's
    size: int | None = None  # square side of calibration and gate images; None: native size
    adherence: int | None = None  # captions; None: SCENES_ADHERENCE_CAPTIONS for scenes, else 0
    force: bool = False
    base: str | Path | None = None  # a ControlNet folder's base model (quantize/control.py)

    def command(self, folder: Path, backend: str, components: tuple[str, ...] | None) -> str:
        """The `sdrt quantize` line that makes this variant (folders by name, never a path);
        components None: a ControlNet folder, made with its --base."""
        parts = [f"sdrt quantize {folder.name} --precision {self.precision} --backend {backend}",
                 f"--components {','.join(components)}" if components is not None
                 else f"--base {Path(self.base or '').name}", f"--prompts {self.prompt_set}"]
        if self.steps:
            parts.append(f"--steps {self.steps}")
        if self.size:
            parts.append(f"--size {self.size}")
        if self.adherence is not None:
            parts.append(f"--adherence {self.adherence}")
        return " ".join(parts)


def quantize_model(folder: str | Path, options: QuantizeOptions) -> dict:
    """Make, gate and list one variant; returns its manifest entry (QuantizeError if it fails)."""
    folder = Path(folder)
    backend = backend_for(options.precision, options.backend)
    if is_control_export(folder):
        from sdrt.quantize.control import quantize_control

        return quantize_control(folder, options, backend)
    if options.base is not None:
        raise InputError(f"--base is for ControlNet folders; '{folder.name}' is a model folder")
    check_folder(folder)
    if not (folder / MANIFEST_NAME).is_file():
        raise ModelError(f"'{folder.name}' has no {MANIFEST_NAME}: quantize works on folders "
                         "`sdrt export` wrote")
    manifest = Manifest.load(folder)
    components = _components(manifest, options.components, options.precision)
    settings = gate_settings(options)

    def build(manifest: Manifest, out: Path) -> tuple[Variant, str, dict]:
        variant, method = _make_variant(folder, manifest, options, backend, components, out)
        return variant, method, gates.run_gate(folder, variant, settings)

    entry = make_and_list(folder, manifest, Variant(options.precision, backend).key,
                          options.force, options.command(folder, backend, components), build)
    return record_speed(folder, entry)  # its step and fp32's, timed and recorded


def make_and_list(folder: Path, manifest: Manifest, key: str, force: bool, command: str,
                  build: Callable[[Manifest, Path], tuple[Variant, str, dict]]) -> dict:
    """Make variant `key` with `build(manifest, out)` (the variant, its method and gate record)
    and list it; a listed one is replaced only with `force`; on failure its files are removed
    and nothing is listed. `manifest` is a model folder's or a ControlNet folder's."""
    if any(Variant.from_json(v).key == key for v in manifest.variants):
        if not force:
            raise QuantizeError(f"'{folder.name}' already lists {key}; pass --force to replace it")
        manifest = unlist_variant(folder, manifest, key)  # if the new one fails, neither is listed
    out = folder / VARIANTS_DIR / key
    shutil.rmtree(out, ignore_errors=True)  # a replaced variant's, or an interrupted run's
    try:
        variant, method, gate = build(manifest, out)
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise
    entry = variant_entry(folder, manifest, variant, method, gate, command)
    list_variant(folder, manifest, variant, entry)
    return entry


def backend_for(precision: str, backend: str | None) -> str:
    """The backend that makes `precision`: the one asked for, else SUPPORTED's first."""
    if precision not in SUPPORTED:
        raise InputError(f"unknown precision '{precision}' for quantize; choose one of: "
                         f"{', '.join(p for p in PRECISIONS if p in SUPPORTED)}")
    makers = SUPPORTED[precision]
    if backend is None:
        return makers[0]
    if backend not in makers:
        raise InputError(f"{precision} is made for the {' and '.join(makers)} backend"
                         f"{'s' if len(makers) > 1 else ''}, not '{backend}'")
    return backend


def _components(manifest: Manifest, asked: tuple[str, ...] | None,
                precision: str) -> tuple[str, ...]:
    if asked is None:
        return tuple(c for c in DEFAULTS.get(precision, DEFAULT_COMPONENTS)
                     if c in manifest.components)
    for name in asked:
        if name not in QUANTIZABLE:
            raise InputError(f"component '{name}' cannot be quantized; choose from: "
                             f"{', '.join(QUANTIZABLE)}")
        if name not in manifest.components:
            raise InputError(f"component '{name}' is not in this model folder")
    if not asked:
        raise InputError(f"--components needs at least one of: {', '.join(QUANTIZABLE)}")
    return tuple(dict.fromkeys(asked))


def gate_settings(options: QuantizeOptions) -> gates.GateSettings:
    """What the gate generates for these options (InputError on a bad --steps/--size/...)."""
    count = options.adherence
    if count is None:
        count = SCENES_ADHERENCE_CAPTIONS if options.prompt_set == "scenes" else 0
    if count < 0:
        raise InputError(f"--adherence must be ≥ 0, got {count}")
    if options.steps is not None and options.steps < 1:
        raise InputError(f"--steps must be ≥ 1, got {options.steps}")
    if options.size is not None and options.size < 1:
        raise InputError(f"--size must be ≥ 1 pixel, got {options.size}")
    captions: list[str] = []
    if count:
        from sdrt.evaluation.scenes import held_out_captions

        captions = held_out_captions(count, 0)  # the adherence benchmark's default split
    return gates.GateSettings(
        prompts=tuple(prompts.gate_prompts(options.prompt_set, GATE_PROMPT_COUNT)),
        steps=options.steps, size=options.size, adherence_captions=tuple(captions))


def maker_for(backend: str) -> ModuleType:
    """The module that makes `backend`'s graphs (quantize/ort.py or quantize/openvino.py)."""
    if backend == "ort":
        from sdrt.quantize import ort

        return ort
    from sdrt.quantize import openvino

    return openvino


def _make_variant(folder: Path, manifest: Manifest, options: QuantizeOptions, backend: str,
                  components: tuple[str, ...], out: Path) -> tuple[Variant, str]:
    """Write the variant's graphs into `out` (none for bf16); the Variant and its method."""
    maker = maker_for(backend)
    if options.precision == "bf16":
        native_bf16(maker)
        chosen = {name: ComponentVariant(execution="bf16") for name in components}
        return Variant("bf16", backend, chosen), maker.METHODS["bf16"]
    calibrated = tuple(c for c in components if maker.needs_calibration(
        options.precision, c, manifest.component_path(folder, c)))
    feeds = {}
    if calibrated:
        from sdrt.quantize.calibration import record_inputs

        feeds = record_inputs(folder, backend, calibrated,
                              prompts.calibration_prompts(options.prompt_set,
                                                          CALIBRATION_PROMPT_COUNT),
                              steps=options.steps, size=options.size,
                              guidance_factors=CALIBRATION_GUIDANCE)
    chosen = {name: make_graph(maker, options.precision, name,
                               manifest.component_path(folder, name), folder, out, feeds.get(name))
              for name in components}
    method = maker.METHODS[options.precision]
    remainder = _bf16_remainder(maker, options.precision, manifest, chosen)
    if remainder:
        chosen.update(remainder)
        method += f"; {', '.join(remainder)} in bf16 (their fp32 graphs)"
    if backend == "openvino" and "unet" in chosen and chosen["unet"].file:
        from sdrt.quantize.deepcache_ir import make_deepcache_ir

        if make_deepcache_ir(folder, folder / chosen["unet"].file):
            method += "; DeepCache graphs cut from this UNet (deepcache_ir.py)"
    return Variant(options.precision, backend, chosen), method


def _bf16_remainder(maker: ModuleType, precision: str, manifest: Manifest,
                    chosen: dict[str, ComponentVariant]) -> dict[str, ComponentVariant]:
    """For int8-hybrid on a CPU with native bf16: the float graphs it leaves unquantized
    (BF16_REMAINDER), run in bf16 as the bf16 variant runs them; nothing elsewhere."""
    if precision != "int8-hybrid" or not maker.bf16_supported():
        return {}
    return {name: ComponentVariant(execution="bf16") for name in BF16_REMAINDER
            if name in manifest.components and name not in chosen}


def native_bf16(maker: ModuleType) -> None:
    """QuantizeError unless this CPU runs bf16 natively (else a bf16 variant runs as fp32)."""
    if not maker.bf16_supported():
        raise QuantizeError("this CPU has no native bf16 (OpenVINO's "
                            "OPTIMIZATION_CAPABILITIES lacks BF16): bf16 would run as fp32")


def make_graph(maker: ModuleType, precision: str, name: str, src: Path, folder: Path, out: Path,
               feeds: list | None) -> ComponentVariant:
    """Write component `name`'s variant of graph `src` under `out`/`name`; QuantizeError in one
    line when the library fails."""
    (out / name).mkdir(parents=True)
    try:
        path = maker.make_graph(precision, name, src, out / name, feeds)
    except ModuleNotFoundError:
        raise  # the CLI names the extra to install
    except Exception as exc:  # the libraries raise many types; the user needs one line
        raise QuantizeError(f"making the {precision} {name} failed: "
                            f"{type(exc).__name__}: {first_line(exc)}") from exc
    return ComponentVariant(file=path.relative_to(folder).as_posix(),
                            execution=maker.execution(precision, name))


def variant_entry(folder: Path, manifest: Manifest, variant: Variant, method: str, gate: dict,
           command: str) -> dict:
    """The manifest `variants` entry (see runtime/model/manifest.py for its keys); `manifest`
    is a model folder's or a ControlNet folder's, both keep `files` and `variants`."""
    sizes = {}
    for name in variant.components:
        fp32 = sum(e.bytes for p, e in manifest.files.items()
                   if p.startswith(f"{name}/") and p != f"{name}/config.json")
        made = folder / VARIANTS_DIR / variant.key / name
        sizes[name] = {"variant": sum(f.stat().st_size for f in made.rglob("*") if f.is_file())
                       if made.is_dir() else fp32, "fp32": fp32}
    return {
        "precision": variant.precision, "backend": variant.backend,
        "components": {name: c.to_json() for name, c in variant.components.items()},
        "method": method, "bytes": sizes, "gate": gate, "command": command,
        "versions": _versions(variant.backend),
    }


def list_variant(folder: Path, manifest: Manifest, variant: Variant, entry: dict) -> None:
    """Add the variant's files and entry to manifest.json."""
    prefix = f"{VARIANTS_DIR}/{variant.key}/"
    made = folder / VARIANTS_DIR / variant.key
    files = dict(manifest.files)
    if made.is_dir():
        files.update({prefix + rel: e for rel, e in scan_files(made).items()})
    updated = dataclasses.replace(manifest, files=files, variants=[*manifest.variants, entry])
    variant.validate(updated)
    updated.save(folder)


def unlist_variant(folder: Path, manifest: Manifest, key: str) -> Manifest:
    """manifest.json without variant `key` and its files' entries, saved; the files stay."""
    prefix = f"{VARIANTS_DIR}/{key}/"
    updated = dataclasses.replace(
        manifest, files={p: e for p, e in manifest.files.items() if not p.startswith(prefix)},
        variants=[v for v in manifest.variants if Variant.from_json(v).key != key])
    updated.save(folder)
    return updated


def _versions(backend: str) -> dict[str, str]:
    names = ("onnxruntime", "onnx") if backend == "ort" else ("openvino", "nncf")
    found = {}
    for name in names:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return found
