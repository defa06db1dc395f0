"""Where OpenVINO keeps compiled models between runs: its model cache (`CACHE_DIR`).

Compiling a graph for one input shape costs seconds (the SD 1.5 UNet: 4–10 s here); with a warm
cache OpenVINO imports the compiled blob instead. Its cache key hashes the graph with its
weights, the device and the compile options, so a re-exported or requantized model never meets
a stale blob. Blobs are kept per OpenVINO version (a folder each), so an upgrade starts afresh
and the old folder can be deleted whole.

The cache is on by default under `$SDRT_CACHE_DIR`, else `$XDG_CACHE_HOME/sdrt`, else
`~/.cache/sdrt`; `SDRT_CACHE_DIR=off` turns it off.
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
# the SD 1.5 UNet in fp32), for a slightly slower import (benchmarks/RESULTS.md, first run).
CACHE_MODE = "OPTIMIZE_SIZE"


def cache_dir() -> Path | None:
    """The folder for this OpenVINO version's compiled blobs, made if missing; None when off
    or when it cannot be made (then every run compiles, with a warning)."""
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


def options(folder: Path | None) -> dict[str, str]:
    """OpenVINO compile options that use `folder` as the model cache (none for None)."""
    if folder is None:
        return {}
    return {"CACHE_DIR": str(folder), "CACHE_MODE": CACHE_MODE}
