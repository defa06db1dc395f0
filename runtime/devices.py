"""GPU devices for the two backends, with a VRAM cap and a fallback to the CPU.

- ONNX Runtime: `CUDAExecutionProvider` (onnxruntime-gpu) with `gpu_mem_limit` (the cap, bytes)
  and `arena_extend_strategy=kSameAsRequested` (the arena grows by what each allocation asks,
  not by doubling, so it stays near the real peak under the cap), the CPU provider behind it for
  any node CUDA does not run.
- OpenVINO: the "GPU" device (Intel GPUs through OpenCL). Its plugin has no settable memory
  limit, so the cap is checked against the memory estimate before compiling
  (runtime/memory/estimate.py) and against the device's own `GPU_DEVICE_TOTAL_MEM_SIZE`.

When the asked GPU is absent (no onnxruntime-gpu or no CUDA device; no OpenVINO GPU plugin or
device), the session runs on the CPU and says so once in a warning, rather than failing.
"""

from __future__ import annotations

import logging

from sdrt.runtime.errors import InputError

log = logging.getLogger(__name__)

DEVICES = ("cpu", "gpu")
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
_warned: set[str] = set()


def check_device(device: str) -> str:
    if device not in DEVICES:
        raise InputError(f"unknown device '{device}'; choose one of: {', '.join(DEVICES)}")
    return device


def _fallback(backend: str, why: str) -> None:
    """Warn once per backend that the GPU was asked for and the CPU runs instead."""
    if backend not in _warned:
        _warned.add(backend)
        log.warning("no GPU for %s (%s); running on the CPU", backend, why)


def ort_providers(device: str, vram_limit: int | None = None,
                  available: list[str] | None = None) -> list:
    """ONNX Runtime providers for `device`: CUDA (capped at `vram_limit` bytes) then CPU, or the
    CPU alone when CUDA is not available (`available`: ort.get_available_providers())."""
    if check_device(device) == "cpu":
        return [CPU]
    if available is None:
        import onnxruntime as ort

        available = ort.get_available_providers()
    if CUDA not in available:
        _fallback("ONNX Runtime", "CUDAExecutionProvider is not available: install "
                                  "onnxruntime-gpu and a CUDA driver")
        return [CPU]
    options = {"device_id": "0", "arena_extend_strategy": "kSameAsRequested"}
    if vram_limit is not None:
        options["gpu_mem_limit"] = str(int(vram_limit))
    return [(CUDA, options), CPU]


def openvino_device(core, device: str, vram_limit: int | None = None) -> str:
    """OpenVINO's device name for `device`: "GPU" when the core lists one, else "CPU".
    InputError when the GPU's own memory is below the cap asked for."""
    if check_device(device) == "cpu":
        return "CPU"
    if not any(name.startswith("GPU") for name in core.available_devices):
        _fallback("OpenVINO", "no GPU device is listed by OpenVINO")
        return "CPU"
    total = int(core.get_property("GPU", "GPU_DEVICE_TOTAL_MEM_SIZE"))
    if vram_limit is not None and vram_limit > total:
        raise InputError(f"--max-vram {vram_limit / 2**30:.2f} GB is more than the GPU has "
                         f"({total / 2**30:.2f} GB)")
    return "GPU"
