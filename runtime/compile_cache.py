"""What OpenVINO keeps between runs: converted graphs and compiled models.

Converted graphs: an ONNX file that holds its weights inline is parsed whole by every read
(0.8–0.9 s for SD 1.5's 492 MB text encoder, 0.3 s for its VAE decoder), while OpenVINO's own
IR maps its weights file (0.03 s). So the first read of such a graph saves it as IR (the
graph as read, no transformations) under `graphs/`, keyed by the ONNX file's path, size and
modification time; later runs read the IR. Graphs with external weights (the UNet's
`model.onnx_data`) read in 0.1–0.4 s already and are not copied at fp32. On for every device:
SD 1.5's start-up in bf16 (load + compile + first call less a steady call) went from 4.6–5.1 s
to 3.7–3.8 s, for 0.66 GB of IR (benchmarks/RESULTS.md).

For bf16 and f16 execution the graphs with external weights are copied too, weights and all,
saved as `ovc` saves a model: OpenVINO's offline ("MOC") transformations applied and float
weights stored as float16. SD 1.5's UNet then reads, reshapes and compiles in 1.9 s against
2.7 s from its ONNX files (the transformations are done once; half the bytes to map and
convert), its steps as fast; 1.7 GB of cache, and a bf16 generation's peak RSS fell from 7.1
to 5.0 GiB (the mapped weights are half as large). Weights pass through float16 on their way to
the bfloat16 OpenVINO runs them in, so results differ from the ONNX graph's only where rounding
twice differs from rounding once (one UNet call: 51 dB); every run, the first included, reads
the copy, so a seed gives one image. Inline-weight graphs keep the as-read copy: the text
encoder compiled 0.1–0.7 s slower from a float16 one.

Compiled models: OpenVINO's model cache (`CACHE_DIR`). Its blobs are written by default for GPU
devices only, where compiling kernels is what that cache is for. On the CPU they bought
nothing for float graphs: with the IR copies, 4.3–4.5 s with warm blobs against 3.7–3.8 s
without; there they are written only when `SDRT_CACHE_DIR` names a folder. Quantized graphs
(FakeQuantize nodes: sdrt's int8 and int8-hybrid variants) are the exception: compiling one
runs OpenVINO's low-precision transformations, which a blob holding its weights skips. SD 1.5's
int8-hybrid UNet (512², batch 2, 2-core AVX2 EPYC) compiled in 6.8–9.4 s and imported its
826 MB blob in 3.6–4.1 s, alternating in fresh processes; a weightless blob imported no faster
than compiling. So such graphs keep full blobs on the CPU too, pruned oldest first past
`MAX_BLOB_BYTES`. The default folder is `$XDG_CACHE_HOME/sdrt`, else `~/.cache/sdrt`;
`SDRT_CACHE_DIR=off` turns both off.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

from sdrt.runtime.model.onnx_proto import ProtoError, read_stamps

log = logging.getLogger(__name__)

ENV_VAR = "SDRT_CACHE_DIR"
OFF = "off"
# "OPTIMIZE_SIZE" stores blobs without their weights, which OpenVINO reads again from the
# graph's own files on import: a few MB per shape instead of a copy of the weights (3.3 GB for
# the SD 1.5 UNet in fp32); on the CPU its import took as long as the full blob's (~2 s).
CACHE_MODE = "OPTIMIZE_SIZE"
# Quantized graphs' blobs keep their weights: only those import faster than compiling (module
# docstring). One per graph and shape (~0.8 GB for SD 1.5's int8-hybrid UNet), so the folder's
# blobs are pruned, oldest first, past MAX_BLOB_BYTES: five such shapes.
QUANTIZED_CACHE_MODE = "OPTIMIZE_SPEED"
MAX_BLOB_BYTES = 4 * 2**30
BLOB_SUFFIX = ".blob"


# An .onnx file at least this large keeps its weights inside it (sdrt's and optimum's exports
# put weights in `model.onnx_data` only past protobuf's 2 GB limit; a graph alone is a few MB).
INLINE_WEIGHTS_MIN_BYTES = 16 * 2**20
# Execution precisions (OpenVINO's INFERENCE_PRECISION_HINT) at which weights are rounded to
# 16 bits anyway, so a copy may keep them as float16 (module docstring).
HALF_WEIGHT_EXECUTIONS = ("bf16", "f16")


def cache_dir() -> Path | None:
    """The folder for this OpenVINO version's cached files, made if missing; None when off or when
    it cannot be made (then every run reads and compiles afresh, warned)."""
    chosen = os.environ.get(ENV_VAR, "")
    if chosen.strip().lower() == OFF:
        return None
    if chosen:
        base = Path(chosen).expanduser()
    else:
        xdg = os.environ.get("XDG_CACHE_HOME")
        base = (Path(xdg) if xdg else Path.home() / ".cache") / "sdrt"
    import openvino as ov

    version = re.sub(r"[^\w.-]", "_", ov.get_version())  # "2026.4.1-22982-…/2026/4"
    folder = base / f"openvino-{version}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        log.warning("compile cache off: cannot make %s (%s)", folder, exc.strerror)
        return None
    return folder


def options(folder: Path | None, device: str = "cpu", quantized: bool = False) -> dict[str, str]:
    """OpenVINO compile options that keep compiled blobs in `folder`: for GPU devices, for
    `quantized` graphs (with their weights), and on the CPU when `SDRT_CACHE_DIR` names the
    folder; none for None (module docstring)."""
    if folder is None:
        return {}
    if quantized:
        return {"CACHE_DIR": str(folder), "CACHE_MODE": QUANTIZED_CACHE_MODE}
    if device.lower() == "cpu" and not os.environ.get(ENV_VAR):
        return {}
    return {"CACHE_DIR": str(folder), "CACHE_MODE": CACHE_MODE}


def is_quantized(model) -> bool:
    """Whether an OpenVINO model holds FakeQuantize nodes (NNCF's static int8)."""
    return any(op.get_type_name() == "FakeQuantize" for op in model.get_ops())


def prune_blobs(folder: Path, limit: int = MAX_BLOB_BYTES) -> None:
    """Delete `folder`'s compiled blobs, oldest written first, until they total at most
    `limit` bytes; the newest is always kept. A blob another process removes first is skipped."""
    blobs = []
    for path in folder.glob(f"*{BLOB_SUFFIX}"):
        try:
            stat = path.stat()
        except OSError:
            continue
        blobs.append((stat.st_mtime_ns, stat.st_size, path))
    blobs.sort()
    total = sum(size for _, size, _ in blobs)
    for _, size, path in blobs[:-1]:
        if total <= limit:
            break
        path.unlink(missing_ok=True)
        total -= size
        log.info("compile cache: removed %s (%d MB) to stay under %d MB", path.name,
                 size // 2**20, limit // 2**20)


def half_weights(graph: Path, execution: str) -> bool:
    """Whether the cache's copy of `graph` is the transformed float16 one (module docstring)."""
    return (execution in HALF_WEIGHT_EXECUTIONS and graph.suffix == ".onnx"
            and bool(_external_files(graph)))


def converted_graph(folder: Path | None, graph: Path, half: bool = False) -> Path | None:
    """Where the IR copy of ONNX `graph` is (or would be) kept, the float16 one if `half`;
    None when the cache is off or the graph is not worth converting (module docstring). The
    key changes whenever the graph or a weights file it names is replaced."""
    if folder is None or graph.suffix != ".onnx":
        return None
    files = [graph.resolve()] + (_external_files(graph) if half else [])
    stats = [path.stat() for path in files]
    if sum(stat.st_size for stat in stats) < INLINE_WEIGHTS_MIN_BYTES:
        return None
    text = "\0".join((["f16-moc"] if half else [])  # as-read keys: as before float16 copies
                     + [f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}"
                        for path, stat in zip(files, stats, strict=True)])
    key = hashlib.sha256(text.encode()).hexdigest()
    return folder / "graphs" / key[:32] / "model.xml"


def _external_files(graph: Path) -> list[Path]:
    """The weights files an ONNX graph names; none for a file that is not a readable graph
    (runtime/model/graph_files.py refuses it in one line when it is opened)."""
    try:
        locations = {ref.location for ref in read_stamps(graph).external}
    except (ProtoError, OSError):
        return []
    return [(graph.parent / location).resolve() for location in sorted(locations)]


def save_converted(model, target: Path, half: bool = False) -> bool:
    """Write `model` as IR at `target`, whole or not at all (a second process may race us), as
    read or, if `half`, transformed with float16 weights (this changes `model`); whether the
    copy is there now."""
    import openvino as ov

    try:
        target.parent.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".partial-", dir=target.parent.parent))
        try:
            if half:
                # What `ovc` and optimum-intel apply before saving; the API is underscored but
                # is how OpenVINO's own converters reach it.
                from openvino._offline_transformations import apply_moc_transformations

                apply_moc_transformations(model, cf=False)
            ov.save_model(model, str(staging / target.name), compress_to_fp16=half)
            staging.rename(target.parent)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    except OSError as exc:  # full disk, a read-only cache, or the other process won the race
        if not target.exists():
            log.warning("could not keep %s's IR in the cache (%s)", target.parent.name,
                        exc.strerror)
    return target.exists()
