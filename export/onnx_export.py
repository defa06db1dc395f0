"""Export a diffusers SD pipeline folder to optimum's ONNX layout plus sdrt's manifest.json.

Output (optimum's ONNX layout): model_index.json, one folder per graph (model.onnx
[+ model.onnx_data] and config.json; the UNet's and text encoders' also lora_map.json, where a
run-time LoRA's layers sit: sdrt.export.lora_map), the tokenizer and scheduler folders,
manifest.json. Which graphs, folders and manifest numbers is the model's architecture's strategy
(sdrt.export.architectures; SD 1.x: text_encoder/ unet/ vae_encoder/ vae_decoder/ tokenizer/
scheduler/), run here the same way for every architecture. LoRA files given to the export are
fused into the weights first and named in the manifest's `loras`. The folder is written under a
hidden sibling name and renamed into place only when complete, so an interrupted export never
leaves a loadable OUT_DIR behind. One component's weights are in memory at a time, and only once:
torch's outputs for the check are computed before the torch model is freed and ONNX Runtime loads
the graph (benchmarks/RESULTS.md: peak RSS 1.10× the SD 1.5 weights).
"""

from __future__ import annotations

import gc
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sdrt.export.architectures import Architecture, architecture_of
from sdrt.export.chunked_attention import ATTENTION_MODES, HeadChunkedAttention
from sdrt.export.components import GraphDef, Inputs
from sdrt.export.controlnet import write_controlnet
from sdrt.export.lora import LORA_COMPONENTS, Lora, fuse_loras, read_loras
from sdrt.export.lora_map import fingerprints, write_lora_map
from sdrt.export.onnx_files import (
    EXTERNAL_DATA_THRESHOLD,
    TORCHSCRIPT_OPSETS,
    export_graph,
    graph_io,
)
from sdrt.export.source import SourceModel, read_source, source_info
from sdrt.export.tiny_vae import write_tiny_vae
from sdrt.export.validate import check_graph, reference_outputs
from sdrt.runtime.control.manifest import is_controlnet_folder
from sdrt.runtime.errors import ExportError, InputError
from sdrt.runtime.model.families import get_family
from sdrt.runtime.model.manifest import DEFAULT_KEYS, ComponentSpec, Manifest, scan_files
from sdrt.runtime.samplers import resolve_sampler
from sdrt.runtime.vae.tiny import is_tiny_vae_folder

logger = logging.getLogger("sdrt.export")

ONNX_WEIGHTS_NAME = "model.onnx"  # optimum's constant
EXPORTER = "torch.onnx TorchScript exporter (dynamo=False)"
# optimum's ONNX export carries no safety checker (optimum#1970); these entries become null.
_DROPPED_COMPONENTS = ("safety_checker", "feature_extractor", "image_encoder")


def export_pipeline(src_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str], *,
                    opset: int = 18, force: bool = False, check: bool = True,
                    external_data_threshold: int = EXTERNAL_DATA_THRESHOLD,
                    origin: Mapping[str, Any] | None = None, family: str | None = None,
                    loras: Sequence[tuple[str | os.PathLike[str], float]] = (),
                    defaults: Mapping[str, Any] | None = None, attention: str = "full") -> Path:
    """Export a diffusers SD folder to an optimum-layout ONNX folder; returns OUT_DIR.

    `check` compares every graph with torch in ONNX Runtime before the folder is accepted;
    `external_data_threshold` (bytes of weights) moves weights to model.onnx_data above it;
    `origin` names the source in the manifest when `src_dir` stands in for it (a hub id and
    revision, a converted checkpoint's name and sha256: sdrt.export.sources); `family`
    overrides the family detected from the configs (sdrt.runtime.model.families); `loras` are
    (LoRA .safetensors file, scale) pairs fused into the weights in order (sdrt.export.lora);
    `defaults` (steps, guidance_scale, sampler) are this model's generation defaults, recorded in
    the manifest over its family's; `attention` "sliced" exports the UNet's attention one head at
    a time (sdrt.export.chunked_attention), bounding its score tensor, and says so in the manifest.
    A lone AutoencoderTiny folder (TAESD) becomes a tiny VAE folder for `--vae`
    (sdrt.export.tiny_vae), a ControlNetModel folder a control folder (sdrt.export.controlnet).
    """
    if attention not in ATTENTION_MODES:
        raise InputError(f"attention must be one of {', '.join(ATTENTION_MODES)}, "
                         f"got {attention!r}")
    src, out = Path(src_dir), Path(out_dir)
    if opset not in TORCHSCRIPT_OPSETS:
        raise ExportError(f"opset {opset} is not supported: use {TORCHSCRIPT_OPSETS.start}–"
                          f"{TORCHSCRIPT_OPSETS.stop - 1} (18 is optimum's default)")
    defaults = _model_defaults(defaults or {})
    if is_controlnet_folder(src):
        if loras or attention != "full" or family is not None or defaults:
            raise InputError("--family, --lora, --attention and generation defaults apply to "
                             "pipelines, not to a ControlNet")
        return _export_folder(src, out, force, lambda work: write_controlnet(
            src, work, opset=opset, check=check, threshold=external_data_threshold,
            origin=origin, versions=_versions()))
    if is_tiny_vae_folder(src):
        if loras or attention != "full" or family is not None or defaults:
            raise InputError("--family, --lora, --attention and generation defaults apply to "
                             "pipelines, not to a tiny autoencoder (AutoencoderTiny)")
        return _export_folder(src, out, force, lambda work: write_tiny_vae(
            src, work, opset=opset, check=check, threshold=external_data_threshold,
            origin=origin, versions=_versions()))
    source = read_source(src, family)
    arch = architecture_of(source)
    if (loras and arch.lora_keys is None) or (attention != "full" and not arch.sliced_attention):
        raise InputError("--lora and --attention sliced apply to UNet models, not to "
                         f"{get_family(source.family).title}")
    fused = read_loras([(Path(path), scale) for path, scale in loras], unet_config=source.unet,
                       keys=arch.lora_keys) if arch.lora_keys else []
    return _export_folder(src, out, force, lambda work: _write_folder(
        source, arch, work, opset=opset, check=check, origin=origin,
        threshold=external_data_threshold, loras=fused, defaults=defaults, attention=attention))


def _export_folder(src: Path, out: Path, force: bool, write: Callable[[Path], None]) -> Path:
    """Run `write` into a hidden sibling of OUT_DIR, then rename it into place."""
    _check_destination(src, out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned_partials(out)
    work = out.parent / f".{out.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    work.mkdir()
    started = time.perf_counter()
    try:
        write(work)
        _commit(work, out, force)
    except BaseException:  # KeyboardInterrupt too: never leave a half-written folder
        shutil.rmtree(work, ignore_errors=True)
        raise
    logger.info("exported %s → %s in %.1f s", src, out, time.perf_counter() - started)
    return out


def _remove_abandoned_partials(out: Path) -> None:
    """Delete OUT_DIR's partial folders whose export process is gone (killed with SIGKILL, or by
    the OOM killer: no cleanup ran), which can hold gigabytes; a live export's is left alone."""
    for partial in out.parent.glob(f".{out.name}.partial-*"):
        pid = partial.name.rsplit(".partial-", 1)[1].split("-", 1)[0]
        if pid.isdigit() and not _process_alive(int(pid)):
            logger.info("removing %s, left by an export that was killed", partial)
            shutil.rmtree(partial, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _check_destination(src: Path, out: Path, force: bool) -> None:
    src_real, out_real = src.resolve(), out.resolve()
    if out_real == src_real or out_real in src_real.parents:
        raise ExportError(f"OUT_DIR '{out}' would contain or replace MODEL_DIR '{src}'; "
                          "choose another folder")
    if out.exists() or out.is_symlink():
        if not out.is_dir():
            raise ExportError(f"OUT_DIR '{out}' exists and is not a folder")
        if not force:
            raise ExportError(f"OUT_DIR '{out}' already exists; pass force=True (--force) "
                              "to replace it")


def _commit(work: Path, out: Path, force: bool) -> None:
    """Rename the finished folder into place; an old OUT_DIR goes only after that succeeds."""
    old = None
    if out.exists():
        _check_destination(work, out, force)  # re-check: it may have appeared meanwhile
        old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(out, old)
    try:
        os.replace(work, out)
    except OSError:
        if old is not None:
            os.replace(old, out)
        raise
    if old is not None and old.is_symlink():  # OUT_DIR was a link: drop the link, not its target
        old.unlink()
    elif old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _write_folder(source: SourceModel, arch: Architecture, work: Path, *, opset: int,
                  check: bool, origin: Mapping[str, Any] | None, threshold: int,
                  loras: list[Lora], defaults: dict[str, Any], attention: str = "full") -> None:
    _write_index(source, work)
    for name in arch.copied(source):
        shutil.copytree(source.folder / name, work / name)
    specs: dict[str, ComponentSpec] = {}
    for step in arch.steps(source):
        model = step.load(source.folder / step.folder)
        if loras and step.folder in LORA_COMPONENTS:
            fuse_loras(model, step.folder, loras)
        if step.folder == arch.denoiser and attention == "sliced":
            model.set_attn_processor(HeadChunkedAttention())
        checks = {name: _export_component(model, name, source, work, arch=arch, opset=opset,
                                          check=check, threshold=threshold)
                  for name in step.graphs}
        _write_config(model, *(work / name for name in step.graphs))
        # where a run-time LoRA's layers sit in the graphs (sdrt.export.lora_map): weights
        # hashed now, matched to the graph's after the torch model is freed
        mapped = {name: fingerprints(model) for name in step.graphs
                  if arch.lora_keys is not None and name in LORA_COMPONENTS}
        del model
        gc.collect()  # free the torch weights before ONNX Runtime loads the graphs to check
        for name, pending in checks.items():
            specs[name] = _finish_component(work / name, pending)
        for name, prints in mapped.items():
            write_lora_map(work / name, ONNX_WEIGHTS_NAME, prints)
    _manifest(source, arch, specs, work, opset=opset, origin=origin, loras=loras,
              defaults=defaults, attention=attention).save(work)


@dataclass
class _Pending:
    """An exported graph awaiting its ONNX Runtime check (torch's outputs already computed)."""

    graph: GraphDef
    cases: list[Inputs]
    expected: list[tuple[np.ndarray, ...]] | None  # None: --no-check


def _export_component(model: torch.nn.Module, name: str, source: SourceModel, work: Path, *,
                      arch: Architecture, opset: int, check: bool, threshold: int) -> _Pending:
    """Export one graph into `work/name/` and compute torch's outputs for its check."""
    started = time.perf_counter()
    graph = arch.graphs(source)[name]
    module = graph.wrap(model).eval()
    export_graph(module, graph, graph.trace_inputs(source), work / name / ONNX_WEIGHTS_NAME,
                 opset=opset, external_data_threshold=threshold)
    cases = graph.check_inputs(source) if check else []
    expected = reference_outputs(module, graph, cases) if check else None
    logger.info("%s: exported in %.1f s", name, time.perf_counter() - started)
    return _Pending(graph, cases, expected)


def _finish_component(folder: Path, pending: _Pending) -> ComponentSpec:
    """Check the graph in ONNX Runtime (when asked) and describe it for the manifest."""
    path = folder / ONNX_WEIGHTS_NAME
    extra: dict[str, Any] = {}
    if pending.expected is not None:
        extra["validation"] = check_graph(pending.graph, path, pending.cases, pending.expected)
    if path.with_name(path.name + "_data").exists():
        extra["external_data"] = path.name + "_data"
    inputs, outputs = graph_io(path)
    return ComponentSpec(file=ONNX_WEIGHTS_NAME, inputs=inputs, outputs=outputs, extra=extra)


def _write_config(model: Any, *folders: Path) -> None:
    """The component's config.json as its library writes it (vae_* carry scaling_factor)."""
    first = folders[0]
    if hasattr(model, "save_config"):  # diffusers ModelMixin
        model.save_config(first)
    else:  # transformers PreTrainedModel
        model.config.save_pretrained(first)
    path = first / "config.json"
    config = json.loads(path.read_text("utf-8"))
    if config.pop("_name_or_path", None) is not None:  # a build-machine path: not for sharing
        path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", "utf-8")
    for other in folders[1:]:  # vae_encoder and vae_decoder share the VAE's config
        shutil.copyfile(path, other / "config.json")


def _write_index(source: SourceModel, work: Path) -> None:
    """model_index.json as optimum's export writes it: the pipeline's, safety checker nulled."""
    index = dict(source.model_index)
    for key in _DROPPED_COMPONENTS:
        if key in index:
            index[key] = [None, None]
    if "requires_safety_checker" in index:
        index["requires_safety_checker"] = False
    (work / "model_index.json").write_text(json.dumps(index, indent=2) + "\n", "utf-8")


def _manifest(source: SourceModel, arch: Architecture, specs: dict[str, ComponentSpec],
              work: Path, *, opset: int, origin: Mapping[str, Any] | None, loras: list[Lora],
              defaults: dict[str, Any], attention: str = "full") -> Manifest:
    extra: dict[str, Any] = {"exporter": EXPORTER}
    if attention != "full":  # memory/estimate.py reads it: the UNet's attention peak is bounded
        extra["attention"] = attention
    if loras:  # the weights are no longer the source's alone
        extra["loras"] = [lora.manifest_entry() for lora in loras]
    return Manifest(
        family=source.family, source=source_info(source, origin), components=specs,
        **arch.manifest_fields(source), opset=opset, versions=_versions(),
        files=scan_files(work), variants=[], defaults=defaults, extra=extra,
    )


def _model_defaults(defaults: Mapping[str, Any]) -> dict[str, Any]:
    """The manifest's `defaults`: unset ones dropped, a sampler by its canonical name."""
    chosen = {key: value for key, value in defaults.items() if value is not None}
    unknown = sorted(set(chosen) - set(DEFAULT_KEYS))
    if unknown:
        raise InputError(f"unknown generation default '{unknown[0]}'; choose from "
                         f"{', '.join(DEFAULT_KEYS)}")
    if "sampler" in chosen:
        chosen["sampler"] = resolve_sampler(chosen["sampler"])
    return chosen


def _versions() -> dict[str, str]:
    found = {}
    for name in ("sdrt", "torch", "diffusers", "transformers", "onnx", "onnxruntime"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "unknown"
    return found
