"""Model folder checks: `sdrt check MODEL_DIR` in full, and their cheap part on every load.

`check_model` (the command) lists every problem it finds, at most one per file or component, so a
user fixes a folder in one pass: a missing component, an unknown layout (PyTorch weights where a
graph belongs), a truncated file, a git-lfs pointer or HTML page saved in place of a file, a
sha256 that differs from manifest.json, a version stamp the backend does not read, ONNX external
data or IR weights that resolve outside the folder (symlinks too), class or library names in
model_index.json outside the allow-lists, and what an interrupted `sdrt export` left behind.
Checks that read files already found broken (family detection, tokenizer, scheduler) run only on
an otherwise clean folder, so one fault gives one line.

An exported tiny VAE folder (`--vae`: manifest.json of format sdrt-tiny-vae, runtime/vae/tiny.py)
gets the checks that apply to it: paths and file heads, its manifest, each file's size and sha256,
each graph vetted for the backend. Source folders (diffusers pipelines, a lone AutoencoderTiny)
are refused with the `sdrt export` command that converts them.

`check_on_load` (Pipeline.load) is the part that reads no weights: the folder and model_index.json
(model_folder.check_folder), every path confined to the folder, the first bytes of every file the
fp32 graphs and tokenizers need, and the sizes manifest.json lists; each graph's own checks
(graph_files.vet_graph) run in session.open_session. sha256 of gigabytes of weights is the
command's alone.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from sdrt.runtime.errors import ModelError, SdrtError
from sdrt.runtime.model.folder import (
    COMPONENTS,
    REFINER_COMPONENTS,
    SD3_COMPONENTS,
    check_folder,
    check_index,
    folder_parts,
    is_refiner_index,
    is_sd3_index,
    read_facts,
    read_json,
)
from sdrt.runtime.model.graph_files import confinement_roots, escapes, sniff, vet_graph
from sdrt.runtime.model.manifest import MANIFEST_NAME, FileEntry, Manifest, file_problem
from sdrt.runtime.model.variants import VARIANTS_DIR, Variant
from sdrt.runtime.schedules import SchedulerConfig
from sdrt.runtime.tokenizer import ClipTokenizer
from sdrt.runtime.vae.tiny import TinyVaeManifest, is_tiny_vae_export, is_tiny_vae_folder

GRAPH_NAMES = ("model.onnx", "openvino_model.xml")
# SDXL's second encoder; image inputs only; SD 3's T5
OPTIONAL_GRAPHS = ("text_encoder_2", "vae_encoder", "text_encoder_3")
# Weights of a diffusers (PyTorch) folder: a source for `sdrt export`, not a folder to run.
TORCH_WEIGHTS = (".safetensors", ".bin", ".ckpt", ".pt", ".pth")
# export/onnx_export.py writes OUT_DIR as `.<name>.partial-<pid>-<8 hex>` and renames it at the
# end; a folder so named is an export that did not finish.
PARTIAL_EXPORT = re.compile(r"\..+\.partial-\d+-[0-9a-f]{8}")


@dataclass
class CheckReport:
    """What `check_model` found: problems (one line each), else a summary of the folder."""

    folder: Path
    problems: list[str] = field(default_factory=list)
    family: str | None = None
    layout: str | None = None
    components: dict[str, int] = field(default_factory=dict)  # name → bytes of its graph files
    variants: list[str] | None = field(default_factory=list)  # None: a tiny VAE has none
    hashed: int = 0  # files whose sha256 matched manifest.json
    sized: int = 0  # files whose size matched manifest.json (all that --quick checks)
    backends: set[str] = field(default_factory=set)  # whose version checks the graphs passed

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> list[str]:
        """A few lines for a folder that passed."""
        total = sum(self.components.values())
        parts = ", ".join(f"{name} {_size(size)}" for name, size in self.components.items())
        hashes = (f"{self.hashed} files match their sha256 in {MANIFEST_NAME}" if self.hashed
                  else f"{self.sized} files match their sizes in {MANIFEST_NAME} (sha256 not "
                       "checked: --quick)" if self.sized
                  else f"no {MANIFEST_NAME}: sizes and hashes not checked")
        variants = [] if self.variants is None else [
            f"  variants: {', '.join(self.variants) or 'none'}"]
        return [f"ok: {self.folder.name}: {self.family} ({self.layout}), {_size(total)}",
                f"  components: {parts}", *variants,
                f"  {hashes}; graph versions accepted by {', '.join(sorted(self.backends))}"]


class _Findings:
    """Problems keyed by the file or component they concern, first one per key kept; with
    `fail_fast` the first raises."""

    def __init__(self, fail_fast: bool) -> None:
        self.fail_fast = fail_fast
        self.items: dict[str, str] = {}

    def add(self, key: str, message: str) -> None:
        if self.fail_fast:
            raise ModelError(message)
        self.items.setdefault(key, message)

    def touches(self, prefix: str) -> bool:
        return any(key == prefix or key.startswith(prefix + "/") for key in self.items)


def check_on_load(folder: Path) -> None:
    """The cheap checks (module docstring); raises ModelError on the first problem."""
    _refuse_partial_export(folder)
    check_folder(folder)
    found = _Findings(fail_fast=True)
    _walk(folder, found, sniff_files=lambda rel: not rel.startswith(VARIANTS_DIR + "/"))
    if (folder / MANIFEST_NAME).is_file():
        manifest = Manifest.load(folder)
        for rel, entry in sorted(manifest.files.items()):
            if not rel.startswith(VARIANTS_DIR + "/"):  # select_variant checks the chosen one's
                problem = file_problem(folder, rel, entry, hashes=False)
                if problem:
                    found.add(rel, problem)


def check_model(folder: str | os.PathLike[str], *, backend: str = "ort",
                hashes: bool = True) -> CheckReport:
    """Every check on a model folder (module docstring); ModelError only when `folder` is not
    a model folder at all, otherwise the problems are in the report."""
    folder = Path(folder)
    if folder.is_dir() and is_tiny_vae_export(folder):
        return _check_tiny_vae(folder, backend, hashes)
    report = CheckReport(folder)
    _check_is_model_folder(folder)
    found = _Findings(fail_fast=False)
    index: dict = {}
    try:
        index = read_json(folder / "model_index.json")
        check_index(index)
    except ModelError as exc:  # malformed, or a class outside the allow-lists
        found.add("model_index.json", str(exc))
    for name in folder_parts(index):
        if not (folder / name).is_dir():
            found.add(name, f"model folder '{folder.name}' is incomplete: '{name}/' is missing")
    _walk(folder, found, sniff_files=lambda rel: True)
    manifest = _check_manifest(folder, found, report, hashes)
    graphs = _graphs(folder, found, report, manifest)
    for path in graphs:
        rel = path.relative_to(folder).as_posix()
        if not found.touches(rel.rsplit("/", 1)[0]):
            _vet(path, rel, backend, found, report)
    if not found.items:
        _check_configs(folder, found, report)
    report.problems = list(found.items.values())
    return report


def _check_tiny_vae(folder: Path, backend: str, hashes: bool) -> CheckReport:
    """The model folder's checks that apply to an exported tiny VAE (module docstring)."""
    _refuse_partial_export(folder)
    report = CheckReport(folder, layout="sdrt tiny-VAE export", variants=None)
    found = _Findings(fail_fast=False)
    _walk(folder, found, sniff_files=lambda rel: True)
    try:
        manifest = TinyVaeManifest.load(folder)
    except ModelError as exc:
        report.problems = [*found.items.values(), str(exc)]
        return report
    for rel, entry in sorted(manifest.files.items()):
        if not found.touches(rel):
            _count_file(folder, rel, entry, hashes, found, report)
    for name, spec in manifest.components.items():
        rel = f"{name}/{spec.file}"
        if not found.touches(rel):
            _vet(folder / rel, rel, backend, found, report)
            report.components[name] = _graph_bytes(folder / name)
    report.family = (f"tiny VAE '{manifest.name}' for {manifest.latent_channels}-channel "
                     f"latents, ×{manifest.vae_scale_factor}")
    report.problems = list(found.items.values())
    return report


def _count_file(folder: Path, rel: str, entry: FileEntry, hashes: bool, found: _Findings,
                report: CheckReport) -> None:
    """One file against its manifest entry: a problem, else one more sized (and hashed)."""
    problem = file_problem(folder, rel, entry, hashes=hashes)
    if problem:
        found.add(rel, problem)
        return
    report.sized += 1
    if hashes:
        report.hashed += 1


def _vet(path: Path, rel: str, backend: str, found: _Findings, report: CheckReport) -> None:
    """vet_graph for `backend` (OpenVINO IR always for OpenVINO), its refusal as a problem."""
    reader = "openvino" if path.suffix == ".xml" else backend
    try:
        vet_graph(path, reader)
        report.backends.add(reader)
    except ModelError as exc:
        found.add(rel, str(exc))
    except ModuleNotFoundError as exc:  # --backend openvino, OpenVINO not installed
        found.add(rel, f"{rel} needs the '{exc.name}' package to be checked: "
                       "pip install 'sdrt[openvino]'")


def _check_is_model_folder(folder: Path) -> None:
    if not folder.is_dir():
        hint = (": a single-file checkpoint; convert it with `sdrt export`"
                if folder.suffix in TORCH_WEIGHTS else "")
        raise ModelError(f"model folder '{folder}' does not exist or is not a folder{hint}")
    _refuse_partial_export(folder)
    if is_tiny_vae_folder(folder):
        raise ModelError(f"unknown layout: '{folder.name}' is a diffusers AutoencoderTiny (tiny "
                         f"VAE) folder, not an exported one: convert it with `sdrt export "
                         f"{folder.name} OUT_DIR`, then pass OUT_DIR to --vae")
    if not (folder / "model_index.json").is_file():
        weights = sorted(p.name for p in folder.iterdir() if p.suffix in TORCH_WEIGHTS)
        hint = (f" ({weights[0]} is a single-file checkpoint: convert it with `sdrt export`)"
                if weights else "")
        raise ModelError(f"'{folder}' is not a model folder: model_index.json is missing{hint}")
    files = [p for p in folder.rglob("*") if p.is_file()]
    if not any(p.suffix in (".onnx", ".xml") for p in files) \
            and any(p.suffix in TORCH_WEIGHTS for p in files):
        raise ModelError(f"unknown layout: '{folder.name}' is a diffusers (PyTorch) folder, not "
                         f"an exported one: convert it with `sdrt export {folder.name} OUT_DIR`")


def _refuse_partial_export(folder: Path) -> None:
    if PARTIAL_EXPORT.fullmatch(Path(os.path.abspath(folder)).name):
        raise ModelError(f"'{folder.name}' is what an interrupted `sdrt export` left behind, "
                         "not a model folder: delete it and export again")


def _walk(folder: Path, found: _Findings, sniff_files) -> None:
    """Every entry must resolve inside the folder (or its hub cache blobs); files that are
    read must not be git-lfs pointers, HTML pages or empty."""
    roots = confinement_roots(folder)
    seen: set[Path] = set()
    for top, dirs, files in os.walk(folder, followlinks=True):
        here = Path(top)
        if here.resolve() in seen:  # a symlink loop
            dirs[:] = []
            continue
        seen.add(here.resolve())
        for name in sorted(dirs):
            path = here / name
            if path.is_symlink() and escapes(path, roots):
                found.add(_rel(folder, path), f"'{_rel(folder, path)}/' is a symlink to a "
                          "folder outside the model folder")
                dirs.remove(name)
        for name in sorted(files):
            path = here / name
            rel = _rel(folder, path)
            if path.is_symlink() and not path.exists():
                found.add(rel, f"'{rel}' is a symlink to a missing file (a git-annex or hub "
                          "cache file that was never fetched?)")
            elif path.is_symlink() and escapes(path, roots):
                found.add(rel, f"'{rel}' is a symlink that resolves outside the model folder")
            elif sniff_files(rel) and path.is_file() and (problem := sniff(path)):
                found.add(rel, f"'{rel}' {problem}")


def _check_manifest(folder: Path, found: _Findings, report: CheckReport,
                    hashes: bool) -> Manifest | None:
    if not (folder / MANIFEST_NAME).is_file():
        return None
    try:
        manifest = Manifest.load(folder)
    except ModelError as exc:
        found.add(MANIFEST_NAME, str(exc))
        return None
    for rel, entry in sorted(manifest.files.items()):
        if found.touches(rel) or found.touches(rel.split("/")[0]):
            continue
        _count_file(folder, rel, entry, hashes, found, report)
    for entry in manifest.variants:
        try:
            variant = Variant.from_json(entry).validate(manifest)
        except ModelError as exc:
            found.add(f"{MANIFEST_NAME}#variant", str(exc))
            continue
        report.variants.append(variant.key)
    return manifest


def _graphs(folder: Path, found: _Findings, report: CheckReport,
            manifest: Manifest | None) -> list[Path]:
    """Every graph file to vet: each component's, and each listed variant's."""
    index = read_json(folder / "model_index.json") if not found.touches("model_index.json") \
        else {}
    graphs_needed = SD3_COMPONENTS if is_sd3_index(index) \
        else REFINER_COMPONENTS if is_refiner_index(index) else COMPONENTS
    wanted = [*graphs_needed, *(name for name in OPTIONAL_GRAPHS if name not in graphs_needed
                                and ((folder / name).is_dir()
                                     or index.get(name) not in (None, [None, None])))]
    graphs = []
    for name in wanted:
        part = folder / name
        if found.touches(name):
            continue
        if not part.is_dir():
            found.add(name, f"model folder '{folder.name}' is incomplete: '{name}/' is missing")
            continue
        present = [part / graph for graph in GRAPH_NAMES if (part / graph).is_file()]
        if not present:
            found.add(name, _unknown_layout(part))
            continue
        graphs += present
        report.components[name] = _graph_bytes(part)
    if manifest is not None:
        graphs += [folder / rel for rel in manifest.files if rel.startswith(VARIANTS_DIR + "/")
                   and rel.endswith((".onnx", ".xml")) and (folder / rel).is_file()]
    report.layout = _layout(folder, manifest, graphs)
    return graphs


def _graph_bytes(part: Path) -> int:
    """Bytes of a component folder's graph and weight files (its configs left out)."""
    return sum(p.stat().st_size for p in part.iterdir() if p.is_file() and p.suffix != ".json")


def _unknown_layout(part: Path) -> str:
    names = sorted(p.name for p in part.iterdir())
    torch_files = [name for name in names if name.endswith(TORCH_WEIGHTS)]
    if torch_files:
        return (f"unknown layout: {part.name}/ holds PyTorch weights ({torch_files[0]}), not an "
                "ONNX or OpenVINO graph: this is a diffusers folder; convert it with "
                "`sdrt export`")
    shown = ", ".join(names[:4]) + (", …" if len(names) > 4 else "") or "nothing"
    return (f"unknown layout: {part.name}/ holds no {' or '.join(GRAPH_NAMES)} "
            f"(it holds {shown})")


def _layout(folder: Path, manifest: Manifest | None, graphs: list[Path]) -> str:
    if manifest is not None:
        return "sdrt ONNX export"
    if any(path.suffix == ".xml" for path in graphs):
        return "optimum-intel OpenVINO IR"
    if (folder / "unet" / "config.json").is_file():
        return "optimum ONNX"
    return "diffusers legacy ONNX"


def _check_configs(folder: Path, found: _Findings, report: CheckReport) -> None:
    """What the loader derives from the files: family, scheduler, tokenizers."""
    try:
        report.family = read_facts(folder).family.name
        SchedulerConfig.from_file(folder / "scheduler" / "scheduler_config.json").validate()
        first = "tokenizer_2" if is_refiner_index(read_json(folder / "model_index.json")) \
            else "tokenizer"
        for name in ("tokenizer", "tokenizer_2"):
            if name == first or (folder / name).is_dir():
                ClipTokenizer.from_dir(folder / name)
    except SdrtError as exc:
        found.add("configs", str(exc))


def _rel(folder: Path, path: Path) -> str:
    return path.relative_to(folder).as_posix()


def _size(count: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= scale:
            return f"{count / scale:.1f} {unit}"
    return f"{count} B"
