"""Where OpenVINO keeps compiled models between runs: its model cache (`CACHE_DIR`).

With a warm cache OpenVINO imports a compiled blob instead of compiling the graph for its input
shape. Its cache key hashes the graph with its weights, the device and the compile options, so a
re-exported or requantized model never meets a stale blob; blobs are kept per OpenVINO version
(a folder each), so an upgrade starts afresh and the old folder can be deleted whole.

On by default for GPU devices only, where compiling kernels is what OpenVINO's cache is for. On
the CPU it was measured and bought nothing: SD 1.5 in bf16, load + compile + first call less a
steady call, 5.1–5.3 s with a cold or warm cache against 4.8–5.2 s without (benchmarks/
RESULTS.md); there it is used only when `SDRT_CACHE_DIR` names a folder. The default folder is
`$XDG_CACHE_HOME/sdrt`, else `~/.cache/sdrt`; `SDRT_CACHE_DIR=off` turns the cache off.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

log = logging.getLogger(__name__)

ENV_VAR = "SDRT_CACHE_DIR"
OFF = "off"
# "OPTIMIZE_SIZE" stores blobs without their weights, which OpenVINO reads again from the
# graph's own files on import: a few MB per shape instead of a copy of the weights (3.3 GB for
# the SD 1.5 UNet in fp32); on the CPU its import took as long as the full blob's (~2 s).
CACHE_MODE = "OPTIMIZE_SIZE"


def cache_dir(device: str = "cpu") -> Path | None:
    """The folder for this OpenVINO version's compiled blobs on `device`, made if missing; None
    when off (the CPU's default) or when it cannot be made (then every run compiles, warned)."""
    chosen = os.environ.get(ENV_VAR, "")
    if chosen.strip().lower() == OFF or (not chosen and device.lower() == "cpu"):
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


def options(folder: Path | None) -> dict[str, str]:
    """OpenVINO compile options that use `folder` as the model cache (none for None)."""
    if folder is None:
        return {}
    return {"CACHE_DIR": str(folder), "CACHE_MODE": CACHE_MODE}
