"""Sessions: one exported graph behind a backend (ONNX Runtime or OpenVINO), checked at one edge.

A `Session` reads its input/output specs once at load, checks every feed's name, rank and static
dimensions against them, casts feeds to the graph's dtypes, and returns float32 outputs.
Backend-specific knobs live in each backend's constructor.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Mapping
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from sdrt.runtime import compile_cache, devices
from sdrt.runtime.errors import InputError, ModelError
from sdrt.runtime.model.graph_files import version_refusal, vet_graph

log = logging.getLogger(__name__)

BACKENDS = ("ort", "openvino")

# ONNX / OpenVINO element type names → NumPy dtypes.
_DTYPES = {
    "tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
    "tensor(int64)": np.int64, "tensor(int32)": np.int32,
    "f32": np.float32, "f16": np.float16, "f64": np.float64, "i64": np.int64, "i32": np.int32,
}


@dataclass(frozen=True)
class TensorSpec:
    """A graph input or output: static dims as ints, dynamic dims as None."""

    name: str
    shape: tuple[int | None, ...]
    dtype: type

    def check(self, value: np.ndarray, graph: str) -> None:
        """Raise ModelError naming the tensor if `value` cannot feed this input."""
        ok = value.ndim == len(self.shape) and all(
            want is None or want == got for want, got in zip(self.shape, value.shape, strict=False)
        )
        if not ok:
            want = tuple("?" if d is None else d for d in self.shape)
            raise ModelError(
                f"{graph}: expected shape {want} for '{self.name}', got {tuple(value.shape)}"
            )


class Session(Protocol):
    """What components need from a loaded graph."""

    inputs: dict[str, TensorSpec]
    outputs: dict[str, TensorSpec]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...


class CheckedSession:
    """Shared boundary: name/shape checks and dtype casts around a backend's `_infer`."""

    inputs: dict[str, TensorSpec]
    outputs: dict[str, TensorSpec]
    label: str
    path: Path  # the graph file it was loaded from

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        missing = set(self.inputs) - set(feeds)
        unknown = set(feeds) - set(self.inputs)
        if missing or unknown:
            raise ModelError(
                f"{self.label}: graph inputs are {sorted(self.inputs)}, "
                f"runtime fed {sorted(feeds)}"
            )
        cast = {}
        for name, value in feeds.items():
            spec = self.inputs[name]
            spec.check(value, self.label)
            cast[name] = np.asarray(value, dtype=spec.dtype, order="C")  # keeps rank 0
        try:
            results = self._infer(cast)
        except Exception as exc:  # backends raise their own types; the user needs one line
            shapes = ", ".join(f"{k}{tuple(v.shape)}" for k, v in cast.items())
            raise ModelError(f"{self.label} failed on {shapes}: {_first_line(exc)}") from exc
        return {name: np.asarray(value, dtype=np.float32) for name, value in results.items()}

    def _infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise NotImplementedError


class OrtSession(CheckedSession):
    """ONNX Runtime CPU session (`CPUExecutionProvider` unless other providers are given)."""

    def __init__(self, path: Path, *, threads: int | None = None,
                 providers: tuple | list = ("CPUExecutionProvider",),
                 low_memory: bool = False,
                 weights: Mapping[str, np.ndarray] | None = None) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # No memory pattern: ORT plans one block for a graph's activations from its first run
        # and allocates it on the second beside what the arena kept from the first. SD 1.5 fp32
        # at 512² peaked at 9.74 GiB from its second step on with it, 7.56 GiB without, and its
        # steps were no slower (8.5-8.7 s against 8.7-9.6 s; benchmarks/RESULTS.md).
        options.enable_mem_pattern = False
        if low_memory:  # free each activation when done instead of keeping arena peaks; weights
            options.enable_cpu_mem_arena = False  # used from the mapped file as they are, not
            options.add_session_config_entry("session.disable_prepacking", "1")  # pre-packed
        if threads:
            options.intra_op_num_threads = threads
        options.log_severity_level = 3  # warnings about unused initialisers are noise here
        self._weights = _override_initializers(ort, options, path, weights or {})
        self.path = path
        self.label = f"{path.parent.name}/{path.name}"
        try:
            self._session = ort.InferenceSession(str(path), options, providers=list(providers))
        except Exception as exc:  # ORT raises its own types for corrupt or unsupported graphs
            reason = (version_refusal(path, "ort")
                      or f"ONNX Runtime cannot load it: {_first_line(exc)}")
            raise ModelError(f"{self.label}: {reason}") from exc
        self.inputs = {i.name: _spec(i.name, i.shape, i.type) for i in self._session.get_inputs()}
        self.outputs = {o.name: _spec(o.name, o.shape, o.type) for o in self._session.get_outputs()}
        self._output_names = list(self.outputs)

    def _infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        values = self._session.run(self._output_names, feeds)
        return dict(zip(self._output_names, values, strict=True))


def _override_initializers(ort, options, path: Path, weights: Mapping[str, np.ndarray]) -> list:
    """Give ONNX Runtime `weights` in place of the graph's initializers of those names (LoRA-
    patched weights, a longer token table); returns what must outlive the session (neither ORT
    nor an OrtValue keeps the NumPy buffers alive).

    Externally stored ones go in as external data, read with the graph before any optimisation.
    Inline ones can only be swapped in after the optimisers ran, and ORT's NCHWc layout pass
    (level ALL) has by then copied each conv weight it reorders from the file, so a swapped conv
    weight would be silently ignored (checked on the tiny UNet); a graph with inline 4-D
    overrides is optimised one level lower (EXTENDED), which has no layout pass.
    """
    if not weights:
        return []
    from sdrt.runtime.model.onnx_tensors import WeightReader

    arrays = {name: np.ascontiguousarray(value) for name, value in weights.items()}
    values = {name: ort.OrtValue.ortvalue_from_numpy(value) for name, value in arrays.items()}
    external = WeightReader(path).external(arrays)
    if external:
        options.add_external_initializers(list(external), [values[n] for n in external])
    inline = [name for name in arrays if name not in external]
    for name in inline:
        options.add_initializer(name, values[name])
    if any(arrays[name].ndim == 4 for name in inline):
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    return [arrays, values]


# Compiled models an OpenVINO session keeps, one per distinct set of input shapes, least recently
# used dropped first: each holds its own memory (a compiled SD 1.5 UNet, hundreds of MB), so a
# server seeing many image sizes would otherwise grow without bound. 8 covers a batch-1/batch-2
# pair at four sizes.
MAX_COMPILED_SHAPES = 8


# OpenVINO switches the whole process to the C locale while it writes or reads a compiled blob
# and switches back after; two such compiles at once (runtime/compile_ahead.py's threads) can
# each restore the other's "C", leaving it set (seen in the tests: Python then decoded text as
# ASCII). So compiles with the blob cache on run one at a time; without it they overlap.
_BLOB_COMPILES = threading.Lock()


class _Compiled:
    """One compiled model and its idle infer requests (a request serves one caller at a time)."""

    def __init__(self, compiled) -> None:
        self.compiled = compiled
        self.idle: list = []


class OpenVinoSession(CheckedSession):
    """OpenVINO session: reads `.onnx` or `.xml`, compiles once per input shape (static reshape).

    OpenVINO runs static shapes much faster than dynamic ones, so each distinct set of input
    shapes gets its own compiled model (the MAX_COMPILED_SHAPES most recent are kept). A request
    is not safe to share, so each call takes an idle one from that model's pool, or makes one,
    and returns it after: as many requests as callers ran at once, freed with their model.
    """

    def __init__(self, path: Path, *, device: str = "CPU", precision_hint: str = "f32",
                 cache_dir: Path | None = None, threads: int | None = None,
                 vram_limit: int | None = None,
                 weights: Mapping[str, np.ndarray] | None = None,
                 quantized_blobs: bool = True) -> None:
        import openvino as ov

        self.path = path
        self.label = f"{path.parent.name}/{path.name}"
        self._core = ov.Core()
        # OpenVINO picks bf16 by itself on AMX CPUs; fp32 must be asked for explicitly.
        self._config: dict[str, str] = {"INFERENCE_PRECISION_HINT": precision_hint}
        if threads:
            self._config["INFERENCE_NUM_THREADS"] = str(threads)
        if weights:  # one blob per weight set would only fill the cache; IR copies may rename
            cache_dir = None  # or fold the constants that the overrides name
        self._device = devices.openvino_device(self._core, device.lower(), vram_limit)
        try:
            self._model = _read_ov_model(self._core, path, cache_dir, precision_hint)
            # the replacement constants share these arrays' memory: kept for the model's life
            self._weights = _replace_constants(self._model, weights or {}, self.label)
        except ModelError:
            raise
        except Exception as exc:  # OpenVINO raises RuntimeError subclasses with long texts
            reason = (version_refusal(path, "openvino")
                      or f"OpenVINO cannot read it: {_first_line(exc)}")
            raise ModelError(f"{self.label}: {reason}") from exc
        # sdrt's quantized variants are IR; scanning an ONNX graph's ops (~0.07 s for SD 1.5's
        # UNet) would only find none. An imported blob stays in memory (+0.8 GiB peak RSS for
        # SD 1.5's int8-hybrid UNet), so low-memory mode (`quantized_blobs` False) compiles.
        quantized = (quantized_blobs and cache_dir is not None and path.suffix == ".xml"
                     and compile_cache.is_quantized(self._model))
        self._config.update(compile_cache.options(cache_dir, device, quantized=quantized))
        self.inputs = {p.any_name: _ov_spec(p) for p in self._model.inputs}
        self.outputs = {p.any_name: _ov_spec(p) for p in self._model.outputs}
        self._output_names = list(self.outputs)
        self._compiled: OrderedDict[tuple, _Compiled] = OrderedDict()
        self._lock = threading.Lock()

    def prepare(self, shapes: dict[str, tuple[int, ...]]) -> None:
        """Compile for these input shapes now (nothing to do where that is done), so a caller
        can compile on another thread while it does other work: a `run` with these shapes waits
        for that compile instead of starting its own."""
        with self._lock:
            self._entry(shapes)

    def _entry(self, shapes: dict[str, tuple[int, ...]]) -> _Compiled:
        """The compiled model for these input shapes, compiled now if new; the lock is held."""
        key = tuple(sorted(shapes.items()))
        entry = self._compiled.get(key)
        if entry is None:
            model = self._model.clone()
            model.reshape({name: list(shape) for name, shape in shapes.items()})
            with _BLOB_COMPILES if "CACHE_DIR" in self._config else nullcontext():
                entry = _Compiled(self._core.compile_model(model, self._device, self._config))
                if "CACHE_DIR" in self._config:
                    compile_cache.prune_blobs(Path(self._config["CACHE_DIR"]))
            self._compiled[key] = entry
            while len(self._compiled) > MAX_COMPILED_SHAPES:
                self._compiled.popitem(last=False)  # callers still running keep theirs
        self._compiled.move_to_end(key)
        return entry

    def _infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with self._lock:
            entry = self._entry({name: value.shape for name, value in feeds.items()})
            request = entry.idle.pop() if entry.idle else None
        if request is None:
            request = entry.compiled.create_infer_request()
        try:
            results = request.infer(feeds)
            # By position: compiling can merge an output's name with inner tensors' names, and
            # any_name then returns one of those (seen on torch.onnx exports of CLIP).
            return {name: results[i].copy() for i, name in enumerate(self._output_names)}
        finally:
            with self._lock:
                entry.idle.append(request)


def _read_ov_model(core, path: Path, cache_dir: Path | None, execution: str):
    """read_model, from the cache's IR copy of the graph for this execution precision where
    there is one, made by this read otherwise (runtime/compile_cache.py)."""
    half = compile_cache.half_weights(path, execution)
    converted = compile_cache.converted_graph(cache_dir, path, half)
    if converted is not None and converted.exists():
        try:
            return core.read_model(str(converted))
        except Exception as exc:  # a damaged cache entry: read the source and write it anew
            log.warning("cached IR of %s unreadable (%s); reading the ONNX file", path,
                        _first_line(exc))
            shutil.rmtree(converted.parent, ignore_errors=True)
    model = _read_ov_source(core, path)
    if converted is not None and compile_cache.save_converted(model, converted, half):
        return core.read_model(str(converted))  # the weights every later run will read
    return model


def _replace_constants(model, weights: Mapping[str, np.ndarray], label: str) -> list:
    """Swap the Constant nodes named as `weights`' keys (ONNX initializer names: OpenVINO's
    ONNX reader keeps them as the constants' friendly names) for the given values, cast to each
    constant's own element type, in place; returns the arrays the new constants share (copying
    a full-size UNet's weights into them took 3 s)."""
    import openvino as ov

    if not weights:
        return []
    constants = {op.get_friendly_name(): op for op in model.get_ops()
                 if op.get_type_name() == "Constant" and op.get_friendly_name() in weights}
    missing = sorted(set(weights) - set(constants))
    if missing:
        raise ModelError(f"{label}: the graph has no weight {missing[0]!r} to replace"
                         + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    shared = []
    for name, old in constants.items():
        dtype = old.get_output_element_type(0).to_dtype()
        shared.append(np.ascontiguousarray(weights[name], dtype=dtype))
        new = ov.op.Constant(shared[-1], shared_memory=True)
        new.set_friendly_name(name)
        old.output(0).replace(new.output(0))
    model.validate_nodes_and_infer_types()  # a longer embedding table changes shapes
    return shared


def _read_ov_source(core, path: Path):
    """read_model; an ONNX graph in a folder of symlinks (the hub cache) is staged first.

    OpenVINO refuses ONNX external data whose real path lies outside the model's folder, which
    is every file of a hub cache snapshot (symlinks into `blobs/`). So the component folder's
    files are hard-linked (or, across filesystems, copied) into one private folder, read from
    there, and the folder is removed: OpenVINO has the weights in memory or mapped by then.
    """
    folder = path.parent
    if path.suffix != ".onnx" or not any(item.is_symlink() for item in folder.iterdir()):
        return core.read_model(str(path))
    with tempfile.TemporaryDirectory(prefix="sdrt-ov-") as staging:
        for item in folder.iterdir():
            if item.is_file():
                _link_or_copy(item.resolve(), Path(staging) / item.name)
        return core.read_model(str(Path(staging) / path.name))


def _link_or_copy(source: Path, dest: Path) -> None:
    try:
        os.link(source, dest)
    except OSError:  # another filesystem, or links not allowed there
        log.warning("copying %s (%d bytes) to load it with OpenVINO", source.name,
                    source.stat().st_size)
        shutil.copyfile(source, dest)


def open_session(path: Path, backend: str, *, threads: int | None = None,
                 execution: str = "f32", device: str = "cpu", vram_limit: int | None = None,
                 low_memory: bool = False,
                 weights: Mapping[str, np.ndarray] | None = None) -> Session:
    """Load one graph file with the named backend, after vetting it (graph_files.vet_graph);
    `execution` is OpenVINO's precision hint; `device` "gpu" runs on CUDA (ORT) or an Intel GPU
    (OpenVINO) where present, capped at `vram_limit` bytes (runtime/devices.py). `weights`
    replace the graph's initializers of those names (runtime/adapters/: LoRA-patched weights).
    `low_memory`: ONNX Runtime frees activations as it goes; OpenVINO compiles quantized graphs
    instead of importing their blobs (runtime/compile_cache.py)."""
    if backend in BACKENDS:  # version stamps are asked about only if the backend refuses
        vet_graph(path, backend, versions=False)
    if backend == "ort":
        if execution != "f32":
            raise InputError(f"execution precision {execution} needs the openvino backend")
        return OrtSession(path, threads=threads, low_memory=low_memory, weights=weights,
                          providers=devices.ort_providers(device, vram_limit))
    if backend == "openvino":
        return OpenVinoSession(path, threads=threads, precision_hint=execution,
                               cache_dir=compile_cache.cache_dir(),
                               device=device.upper(), vram_limit=vram_limit,
                               weights=weights, quantized_blobs=not low_memory)
    raise InputError(f"unknown backend '{backend}'; choose one of: {', '.join(BACKENDS)}")


def _spec(name: str, shape: list, type_name: str) -> TensorSpec:
    dims = tuple(d if isinstance(d, int) and d > 0 else None for d in shape)
    if type_name not in _DTYPES:
        raise ModelError(f"input/output '{name}' has unsupported type {type_name}")
    return TensorSpec(name, dims, _DTYPES[type_name])


def _ov_spec(port) -> TensorSpec:
    shape = port.get_partial_shape()
    dims = tuple(d.get_length() if d.is_static else None for d in shape)
    return _spec(port.any_name, list(dims), port.get_element_type().get_type_name())


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
