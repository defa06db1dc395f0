"""Vetting one graph file before a backend opens it, so a bad or hostile file fails on one line.

What a download or a hostile folder can put where a graph belongs, and what is checked, cheaply,
on every load (`vet_graph`, called by `session.open_session`):

- a git-lfs pointer or a saved HTML page instead of the file (`sniff`: its first bytes);
- ONNX external data (`TensorProto.external_data`, onnx/onnx#3991, CVE-2022-25882,
  CVE-2024-27318) or an IR's `.bin` that resolves outside the graph's own folder, by its name
  (absolute, `..`, a drive) or through a symlink; the Hugging Face cache's layout, a snapshot of
  symlinks into the repository's `blobs/`, is accepted (`confinement_roots`);
- weights that are not all there: an external-data range or an IR constant past the end of its
  file, a protobuf field past the end of the `.onnx` (a truncated download);
- version stamps the installed backend does not read: an ONNX IR version or opset newer than
  ONNX Runtime's, an IR `version` OpenVINO does not know. The backend itself is asked, with a
  stub model carrying the same stamps (cached per set of stamps), so no table goes stale. That
  costs a session creation, so loads ask only when the backend has refused the real graph
  (`version_refusal`, to say why in one line); `sdrt check` always asks.

No weight is read: the `.onnx` is walked field header by field header (model/onnx_proto.py), an
IR's XML is scanned with a regular expression (no XML parser, so no entity expansion).
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Iterable
from pathlib import Path, PurePosixPath

from sdrt.runtime.errors import ModelError, first_line
from sdrt.runtime.model.onnx_proto import ExternalRef, ProtoError, read_stamps, stub_model

LFS_POINTER = b"version https://git-lfs.github.com/spec/"
SNIFF_BYTES = 512  # a git-lfs pointer is ~130 bytes; an HTML page says so in its first line
_HTML = re.compile(rb"\s*(<!--.*?-->\s*)*<(!doctype\s+html|html)[\s>]", re.I | re.S)
_BOM = b"\xef\xbb\xbf"
HUB_BLOBS, HUB_SNAPSHOTS = "blobs", "snapshots"  # huggingface_hub's cache layout
# IR: `<net name=".." version="11">`, and each constant's `<data ... offset=".." size=".."/>`.
_IR_NET = re.compile(rb"<net\b[^>]*?\bversion\s*=\s*\"([^\"]*)\"")
_IR_DATA = re.compile(rb"<data\b[^>]*>")
_IR_OFFSET = re.compile(rb"\boffset\s*=\s*\"(\d+)\"")
_IR_SIZE = re.compile(rb"\bsize\s*=\s*\"(\d+)\"")
_IR_DOCTYPE = re.compile(rb"<!(DOCTYPE|ENTITY)", re.I)
# What ONNX Runtime 1.32 says when it refuses, to turn it into one line; a text that matches
# neither is quoted as it is.
_ORT_MAX_IR = re.compile(r"max supported IR version: (\d+)")
_ORT_MAX_OPSET = re.compile(r"support for domain (\S+) is till opset (\d+)")


def label(path: Path) -> str:
    """`component/file`, how messages name a graph file."""
    return f"{path.parent.name}/{path.name}"


def sniff(path: Path) -> str | None:
    """What is wrong with a weights/graph/config file's first bytes, or None."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(SNIFF_BYTES)
    except OSError as exc:
        return f"cannot be read: {first_line(exc)}"
    if not head:
        return "is empty (0 bytes)"
    if head.startswith(LFS_POINTER):
        return ("is a git-lfs pointer, not the file itself: fetch the weights "
                "(`git lfs pull` in the repository it came from) or download them again")
    if _HTML.match(head.removeprefix(_BOM)):
        return ("is an HTML page, not the file itself (a browser or a login page saved in its "
                "place): download it again")
    return None


def hub_blobs(path: Path) -> Path | None:
    """`<repo>/blobs` when `path` lies in a huggingface_hub snapshot `<repo>/snapshots/<rev>/`."""
    absolute = Path(os.path.abspath(path))
    for folder in (absolute, *absolute.parents):
        if folder.parent.name == HUB_SNAPSHOTS and (folder.parent.parent / HUB_BLOBS).is_dir():
            return (folder.parent.parent / HUB_BLOBS).resolve()
    return None


def confinement_roots(folder: Path) -> tuple[Path, ...]:
    """Where files of `folder` may resolve to: inside it, or its hub cache's blobs."""
    blobs = hub_blobs(folder)
    return (folder.resolve(),) if blobs is None else (folder.resolve(), blobs)


def escapes(path: Path, roots: Iterable[Path]) -> bool:
    """True when `path`, symlinks followed, lies outside every one of `roots`."""
    real = path.resolve()
    return not any(real == root or root in real.parents for root in roots)


def vet_graph(path: Path, backend: str, *, versions: bool = True) -> None:
    """Refuse a graph file the backend must not, or cannot, open (module docstring); with
    `versions`, also one whose version stamps the installed backend does not read."""
    problem = sniff(path)
    if problem:
        raise ModelError(f"{label(path)} {problem}")
    ask = _vet_ir(path) if path.suffix == ".xml" else _vet_onnx(path, backend)
    refusal = ask() if versions else None
    if refusal:
        raise ModelError(f"{label(path)}: {refusal}")


def version_refusal(path: Path, backend: str) -> str | None:
    """Why the installed backend refuses this graph's version stamps, or None (also when the
    file cannot be read: vet_graph says what is wrong then)."""
    try:
        ask = _vet_ir(path) if path.suffix == ".xml" else _vet_onnx(path, backend)
        return ask()
    except (ModelError, OSError):
        return None


def external_bytes(graph: Path, tensor) -> bytes:
    """The bytes of one ONNX tensor (`onnx.TensorProto`) stored in a file beside `graph`, after
    the checks `vet_graph` makes. onnx's own loader (1.23) refuses a data file with more than one
    hard link, and sdrt hard-links a UNet's weights where two graphs share them (DeepCache)."""
    entries = {entry.key: entry.value for entry in tensor.external_data}
    ref = ExternalRef(tensor.name, entries.get("location"), entries.get("offset"),
                      entries.get("length"))
    data = _external_file(graph, ref, confinement_roots(graph.parent))
    _check_range(graph, ref, data.stat().st_size)
    with open(data, "rb") as handle:
        handle.seek(int(ref.offset or 0))
        return handle.read(-1 if ref.length is None else int(ref.length))


def _read(path: Path):
    try:
        return read_stamps(path)
    except ProtoError as exc:
        raise ModelError(f"{label(path)} is truncated or not an ONNX model: {exc}") from None


def _vet_onnx(path: Path, backend: str):
    """Check the names and ranges of the external data; returns the (costlier) version ask."""
    stamps = _read(path)
    roots = confinement_roots(path.parent)
    checked: dict[Path, int] = {}
    for ref in stamps.external:
        data = _external_file(path, ref, roots)
        if data not in checked:
            problem = sniff(data)
            if problem:
                raise ModelError(f"{path.parent.name}/{ref.location} {problem}")
            checked[data] = data.stat().st_size
        _check_range(path, ref, checked[data])
    return lambda: _onnx_refusal(backend, stamps.ir_version,
                                 tuple(sorted(stamps.opsets.items())))


def _external_file(graph: Path, ref: ExternalRef, roots: tuple[Path, ...]) -> Path:
    """The file one tensor's external data names, after checking that name (onnx PR#7686)."""
    where = f"{label(graph)}: tensor '{ref.tensor}'"
    location = ref.location
    if not location:
        raise ModelError(f"{where} is stored outside the file but names no location")
    parts = PurePosixPath(location).parts
    if ("\0" in location or "\\" in location or ":" in location or location.startswith("/")
            or ".." in parts):
        raise ModelError(f"{where} names external data {location!r}, a path outside the "
                         f"graph's folder")
    data = graph.parent / location
    if data.is_symlink() or data.exists():
        if escapes(data, roots):
            raise ModelError(f"{where}: its external data {location!r} is a symlink that "
                             "resolves outside the model folder")
    if not data.is_file():
        raise ModelError(f"{where}: its external data file '{graph.parent.name}/{location}' "
                         "is missing")
    return data


def _check_range(graph: Path, ref: ExternalRef, size: int) -> None:
    try:
        offset = int(ref.offset or 0)
        length = None if ref.length is None else int(ref.length)
    except ValueError:
        raise ModelError(f"{label(graph)}: tensor '{ref.tensor}' has a malformed external-data "
                         f"offset {ref.offset!r} or length {ref.length!r}") from None
    end = offset + (length or 0)
    if offset < 0 or (length is not None and length < 0) or end > size:
        raise ModelError(f"{graph.parent.name}/{ref.location} is truncated: tensor "
                         f"'{ref.tensor}' needs bytes {offset}–{end}, the file has {size}")


def _vet_ir(path: Path):
    """Check the IR's weights file; returns the (costlier) version ask."""
    text = path.read_bytes()
    head = text[: text.find(b"<net")] if b"<net" in text else text
    if _IR_DOCTYPE.search(head):
        raise ModelError(f"{label(path)} declares a DOCTYPE or entities, which OpenVINO IR "
                         "never does: refused")
    version = _IR_NET.search(text)
    if version is None:
        raise ModelError(f"{label(path)} is not OpenVINO IR (no <net version=...>), or is "
                         "truncated")
    end = max((int(o.group(1)) + int(s.group(1)) for tag in _IR_DATA.finditer(text)
               if (o := _IR_OFFSET.search(tag.group())) and (s := _IR_SIZE.search(tag.group()))),
              default=0)
    weights = path.with_suffix(".bin")
    if end:
        if weights.is_symlink() or weights.exists():
            if escapes(weights, confinement_roots(path.parent)):
                raise ModelError(f"{label(weights)} is a symlink that resolves outside the model "
                                 "folder")
        if not weights.is_file():
            raise ModelError(f"{label(weights)} is missing (the weights of {label(path)})")
        problem = sniff(weights)
        if problem:
            raise ModelError(f"{label(weights)} {problem}")
        size = weights.stat().st_size
        if size < end:
            raise ModelError(f"{label(weights)} is truncated: {label(path)} needs {end} bytes, "
                             f"the file has {size}")
    stamp = version.group(1).decode("ascii", "replace")
    if not stamp.isdigit() or len(stamp) >= 10:
        return lambda: f"its OpenVINO IR version {stamp!r} is not a number"
    return lambda: _ir_refusal(stamp)


@functools.lru_cache(maxsize=64)
def _onnx_refusal(backend: str, ir_version: int, opsets: tuple[tuple[str, int], ...]) -> str | None:
    """Why the installed backend refuses these stamps (None: it accepts them)."""
    stub = stub_model(ir_version, dict(opsets))
    stamped = (f"IR version {ir_version}, opsets "
               + ", ".join(f"{domain} {version}" for domain, version in opsets))
    if backend == "openvino":
        import numpy as np
        import openvino as ov

        try:
            ov.Core().read_model(stub, ov.Tensor(np.zeros(0, np.uint8)))
        except Exception as exc:  # OpenVINO raises RuntimeError subclasses
            return f"OpenVINO {ov.__version__} cannot read its {stamped}: {first_line(exc)}"
        return None
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        ort.InferenceSession(stub, options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own exception types
        return _explain_ort(str(exc), ir_version, dict(opsets), ort.__version__)
    return None


def _explain_ort(text: str, ir_version: int, opsets: dict[str, int], version: str) -> str:
    runtime = f"ONNX Runtime {version}"
    if match := _ORT_MAX_IR.search(text):
        return (f"its ONNX IR version {ir_version} is newer than {runtime} reads (up to "
                f"{match.group(1)}): re-export with an older onnx, or upgrade onnxruntime")
    if match := _ORT_MAX_OPSET.search(text):
        domain, limit = match.group(1), match.group(2)
        return (f"its opset {opsets.get(domain, '?')} for domain {domain} is newer than "
                f"{runtime} supports (up to {limit}): export with --opset {limit} or lower, "
                "or upgrade onnxruntime")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return f"{runtime} refuses its version stamps: {lines[-1] if lines else 'no reason given'}"


@functools.lru_cache(maxsize=8)
def _ir_refusal(version: str) -> str | None:
    """Why the installed OpenVINO cannot read IR of this `version` (None: it can, or it is not
    installed, in which case the openvino backend is unavailable anyway)."""
    try:
        import numpy as np
        import openvino as ov
    except ModuleNotFoundError:
        return None
    try:
        ov.Core().read_model(_ir_stub(version), ov.Tensor(np.zeros(0, np.uint8)))
    except Exception:  # OpenVINO's message here names no version ("Unable to read the model")
        return (f"its OpenVINO IR version {version!r} is not one OpenVINO {ov.__version__} "
                "reads: convert it again with this OpenVINO, or upgrade openvino")
    return None


def _ir_stub(version: str) -> bytes:
    """A Parameter → Result IR with this net version."""
    port = '<port id="0" precision="FP32"><dim>1</dim></port>'
    return (f'<?xml version="1.0"?><net name="stub" version="{version}"><layers>'
            f'<layer id="0" name="x" type="Parameter" version="opset1"><data shape="1" '
            f'element_type="f32"/><output>{port}</output></layer>'
            f'<layer id="1" name="y" type="Result" version="opset1"><input>{port}</input></layer>'
            '</layers><edges><edge from-layer="0" from-port="0" to-layer="1" to-port="0"/>'
            '</edges></net>').encode()
