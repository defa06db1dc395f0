"""This machine's CPU as kernels see it: model name, the flags that pick int8/bf16 kernels, cores.

One place for the facts `sdrt bench` reports and for the key that step times recorded in a
model's manifest are filed under (runtime/model/speed.py): a time measured on another CPU says
nothing about this one.
"""

from __future__ import annotations

import hashlib
import os
import platform
from functools import cache
from pathlib import Path

# CPU features that decide which kernels run (AVX-512 VNNI/BF16 int8 and bf16 dot products, AVX2
# VNNI on newer cores, AMX tiles on Intel Sapphire Rapids and later).
CPU_FLAGS = ("avx2", "avx_vnni", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile",
             "amx_bf16", "amx_int8")


@cache
def cpu_facts() -> dict:
    """{"cpu": model name, "cpu_flags": [CPU_FLAGS present], "cores": usable cores}."""
    cpuinfo = Path("/proc/cpuinfo")
    text = cpuinfo.read_text() if cpuinfo.exists() else ""
    fields = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip(), value.strip())
    flags = set(fields.get("flags", "").split())
    cores = (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
             else os.cpu_count() or 1)
    return {"cpu": fields.get("model name") or platform.processor() or platform.machine(),
            "cpu_flags": [flag for flag in CPU_FLAGS if flag in flags], "cores": cores}


def machine_id() -> str:
    """A short stable key for this CPU model, its kernel-picking flags and its core count."""
    facts = cpu_facts()
    text = f"{facts['cpu']}|{','.join(facts['cpu_flags'])}|{facts['cores']}"
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def has_native_bf16() -> bool:
    """Whether the CPU has bf16 dot products (AVX-512 BF16 or AMX), as OpenVINO's bf16 needs."""
    return bool({"avx512_bf16", "amx_bf16"} & set(cpu_facts()["cpu_flags"]))


def has_int8_dot_products() -> bool:
    """Whether the CPU has int8 dot products (AVX-512 or AVX VNNI, AMX), where OpenVINO's int8
    MatMuls run at about twice its bf16 ones; without them (AVX2) they run no faster than
    float."""
    return bool({"avx512_vnni", "avx_vnni", "amx_int8"} & set(cpu_facts()["cpu_flags"]))
