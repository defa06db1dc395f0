"""Backend "auto" and precision "auto": the fastest configuration a model folder passed its
gates in, decided from facts (what is installed, the CPU, the manifest, step times recorded
on this machine), never from a guess.

Backend: OpenVINO where it is installed, ONNX Runtime otherwise, except for small denoisers,
where OpenVINO's compile at the first call costs more than its faster steps save. Measured on
the embedded model (7 MB UNet; `sdrt generate` at its defaults, 20 steps, fresh processes,
2-core AMD EPYC, warm compile cache, median of 5): ONNX Runtime 3.8 s, OpenVINO fp32 7.3 s
(cold cache 7.0 s). In one process OpenVINO's steady image took 0.9 s against ONNX Runtime's
1.4 s, but its first took 5.0-6.4 s: the ~4.5 s of compiling is the same as SD 1.5's (first
image less the median, 179.4 - 174.7 s), while ONNX Runtime's load grows with the graph (1.5 s
here, 11.9 s for SD 1.5's 3.4 GB UNet, whose 20 steps OpenVINO ran 12 s faster at fp32).
A straight line between the two crosses zero near 0.5 GB of denoiser: `SMALL_DENOISER_BYTES`.

Precision: the reference is bf16 on OpenVINO where the CPU has native bf16
(machine.has_native_bf16) and the manifest lists the bf16 variant (its gate passed), else fp32;
a listed variant on the same backend replaces it only where a step time recorded on this
machine (model/speed.py) says it is faster at the same shape. Explicit values are kept as given.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

from sdrt.runtime.deepcache import gate_record, uncut_variant
from sdrt.runtime.errors import ModelError
from sdrt.runtime.machine import has_native_bf16
from sdrt.runtime.model.folder import IR_FILE, is_sd3_index
from sdrt.runtime.model.manifest import MANIFEST_NAME, Manifest
from sdrt.runtime.model.speed import faster_than, recorded_times
from sdrt.runtime.model.variants import REFERENCE, Variant

AUTO = "auto"
# Denoiser folders under this many bytes run on ONNX Runtime: OpenVINO's first-call compile
# (~4.5 s, about the same for 7 MB and 3.4 GB) outweighs what its steps save (module docstring).
SMALL_DENOISER_BYTES = 512 * 2**20


@dataclass(frozen=True)
class Choice:
    """The backend and precision a run uses, and one line saying why."""

    backend: str
    precision: str
    reason: str  # "" when both were given
    asked: tuple[str, str] = (AUTO, AUTO)  # backend and precision as given, "auto" included


def choose(folder: str | Path, backend: str = AUTO, precision: str = AUTO, *,
           keeps_unet: bool = False, deepcache: int | None = None) -> Choice:
    """Resolve "auto" backend and precision for `folder`; `keeps_unet`: the run patches the
    fp32 denoiser (LoRAs), so no variant with a denoiser graph of its own; `deepcache`: the
    DeepCache interval N the run uses (0: not known yet), so no such variant unless DeepCache
    graphs were cut from it and its gate at N passed (runtime/deepcache.py)."""
    folder, asked = Path(folder), (backend, precision)
    if AUTO not in asked:
        return Choice(backend, precision, "", asked)
    denoiser = folder / _denoiser_name(folder)
    why_backend = why_precision = ""
    if backend == AUTO:
        backend, why_backend = _backend(denoiser)
    if precision == AUTO:
        listed, extra = _listed(folder)
        usable = [variant for variant in listed
                  if _usable(folder, variant, denoiser.name, extra, keeps_unet, deepcache)]
        precision, why_precision = _precision(folder, backend, usable)
        if deepcache is not None and not keeps_unet and len(usable) < len(listed):
            why_precision += (f" among the variants cut and gated for DeepCache"
                              f"{f' N={deepcache}' if deepcache else ''}")
    return Choice(backend, precision,
                  f"auto: {'; '.join(w for w in (why_backend, why_precision) if w)}", asked)


def openvino_installed() -> bool:
    """Whether the openvino package is installed (its metadata read, not the package imported:
    that takes 0.2-0.4 s)."""
    try:
        distribution("openvino")
    except PackageNotFoundError:
        return False
    return True


def _denoiser_name(folder: Path) -> str:
    """The denoiser's component folder: SD 3's `transformer`, else `unet`."""
    try:
        index = json.loads((folder / "model_index.json").read_text("utf-8"))
    except (OSError, ValueError):  # OpenedModel's check names what is wrong with the folder
        return "unet"
    return "transformer" if isinstance(index, dict) and is_sd3_index(index) else "unet"


def _backend(denoiser: Path) -> tuple[str, str]:
    """(backend, why) for backend auto."""
    if not openvino_installed():
        return "ort", "ort (openvino not installed)"
    if (denoiser / IR_FILE).is_file():
        return "openvino", "openvino (the denoiser is OpenVINO IR)"
    size = _bytes(denoiser)
    if size < SMALL_DENOISER_BYTES:
        return "ort", (f"ort (a {size / 2**20:.0f} MB denoiser: ort starts faster than openvino "
                       f"compiles)")
    return "openvino", "openvino (installed)"


def _bytes(folder: Path) -> int:
    """The bytes of the files in `folder` (a graph and its weights; symlinks followed)."""
    return sum(path.stat().st_size for path in folder.iterdir() if path.is_file()) \
        if folder.is_dir() else 0


def _precision(folder: Path, backend: str, usable: list[Variant]) -> tuple[str, str]:
    """(precision, why) for precision auto on `backend`, among the variants the run can use."""
    listed = {variant.key: variant for variant in usable
              if variant.backend == backend
              and (variant.precision != "bf16" or has_native_bf16())}
    reference = Variant("bf16" if f"bf16-{backend}" in listed else REFERENCE, backend)
    times = recorded_times(folder)
    faster = faster_than(times, reference.key, list(listed))
    if faster is None:
        return reference.precision, (f"{reference.precision} (no faster gated variant recorded "
                                     f"on this machine)")
    chosen = listed[faster].precision
    ratio = times[faster].step_s / times[reference.key].step_s
    return chosen, f"{chosen} gated and measured {ratio:.2f}× {reference.precision}'s step here"


def _usable(folder: Path, variant: Variant, denoiser: str, extra: dict, keeps_unet: bool,
            deepcache: int | None) -> bool:
    """Whether a run can use `variant`: one with a denoiser graph of its own cannot take LoRAs
    (they patch the fp32 graph), nor DeepCache at N unless its graph was cut too and that pair
    passed DeepCache's gate at N (manifest `extra`): the losses of both add up."""
    choice = variant.components.get(denoiser)
    if choice is None or choice.file is None:  # it runs the fp32 denoiser graph
        return True
    if keeps_unet:
        return False
    if deepcache is None:
        return True
    return (deepcache > 0 and not uncut_variant(folder, variant)
            and gate_record(extra, variant.precision, variant.backend, deepcache) is not None)


def _listed(folder: Path) -> tuple[list[Variant], dict]:
    """The variants manifest.json lists (their gates passed) and its other keys (`extra`);
    nothing without a manifest."""
    if not (folder / MANIFEST_NAME).is_file():
        return [], {}
    try:
        manifest = Manifest.load(folder)
        return [Variant.from_json(entry) for entry in manifest.variants], manifest.extra
    except ModelError:  # OpenedModel's variant check reports a malformed manifest
        return [], {}
