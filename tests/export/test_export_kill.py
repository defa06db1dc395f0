"""Killing `sdrt export` at any moment never leaves a folder that `sdrt check` accepts.

The export writes a hidden `.<OUT_DIR>.partial-<pid>-<hex>` folder and renames it to OUT_DIR
only when complete (export/onnx_export.py), so after a SIGKILL (no cleanup runs) OUT_DIR either
does not exist or is the complete export. One uninterrupted export first times the writing (from
the partial folder's appearance to the process's exit); each killed run then gets SIGKILL at a
random moment of that window, seeded so a failure can be replayed.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.cli.test_cli import assert_one_line_error, run

KILLS = 3
SEED = int(os.environ.get("SDRT_KILL_SEED", "20261126"))
# Kill within the first 80% of the measured write window: the rename is the export's last act,
# and a killed run may go faster than the timed one.
WINDOW_FRACTION = 0.8
START_TIMEOUT_S = 300  # interpreter start and torch/diffusers imports, on a loaded 2-core box
POLL_S = 0.02


def _start(source: Path, out: Path) -> subprocess.Popen:
    sdrt = Path(sys.executable).with_name("sdrt")
    return subprocess.Popen([str(sdrt), "export", str(source), str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _partials(out: Path) -> list[Path]:
    return sorted(out.parent.glob(f".{out.name}.partial-*"))


def _wait_for_partial(process: subprocess.Popen, out: Path) -> float:
    """Seconds until the partial folder appears (the export has started writing)."""
    started = time.monotonic()
    while not _partials(out):
        if process.poll() is not None:
            pytest.fail(f"sdrt export exited early: {process.stderr.read().decode()}")
        if time.monotonic() - started > START_TIMEOUT_S:
            process.kill()
            pytest.fail("sdrt export never started writing")
        time.sleep(POLL_S)
    return time.monotonic()


def test_a_killed_export_leaves_nothing_check_accepts(tiny_sd_dir, tmp_path):
    full = tmp_path / "full" / "tiny-onnx"
    process = _start(tiny_sd_dir, full)
    writing = _wait_for_partial(process, full)
    assert process.wait() == 0, process.stderr.read().decode()
    window = time.monotonic() - writing
    assert run("check", full).exit_code == 0  # the complete export passes
    assert not _partials(full)  # and left no partial folder

    rng = random.Random(SEED)
    interrupted = 0
    for attempt in range(KILLS):
        out = tmp_path / f"killed-{attempt}" / "tiny-onnx"
        process = _start(tiny_sd_dir, out)
        _wait_for_partial(process, out)
        time.sleep(rng.uniform(0.0, WINDOW_FRACTION * window))
        process.send_signal(signal.SIGKILL)
        process.wait()
        if out.exists():  # killed after the rename: the export is whole
            assert run("check", out).exit_code == 0
            continue
        interrupted += 1
        assert_one_line_error(run("check", out), "does not exist")
        for leftover in _partials(out):
            assert_one_line_error(run("check", leftover), "interrupted `sdrt export`")
    assert interrupted, f"every kill came after the rename (seed {SEED}); nothing was tested"


def test_the_next_export_removes_partials_of_killed_exports_only(tiny_sd_dir, tmp_path):
    out = tmp_path / "tiny-onnx"
    process = _start(tiny_sd_dir, out)
    _wait_for_partial(process, out)
    process.send_signal(signal.SIGKILL)
    process.wait()
    (abandoned,) = _partials(out)
    live = out.parent / f".{out.name}.partial-{os.getpid()}-0123abcd"  # this process is alive
    live.mkdir()
    assert run("export", tiny_sd_dir, out).exit_code == 0
    assert not abandoned.exists() and live.is_dir()
