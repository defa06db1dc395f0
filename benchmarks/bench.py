"""`sdrt bench`: time each stage of one model folder on one backend and precision.

Scenarios (one row each): the text encoder(s) on one prompt with CFG's empty prompt,
one UNet call at batch 1 (guidance off) and batch 2 (one guided step), the VAE decoder and the
VAE encoder on one image, and end to end (one `generate` at the asked steps). Each scenario runs
in a fresh process, so its peak RSS is its own; there the first run (model load plus the first
call, when OpenVINO compiles the shape) is reported apart from the steady state (median and p90
of `runs` further calls), and so is the start-up cost: the first run less the median, that is
load plus compile (OpenVINO imports compiled blobs from runtime/compile_cache.py's folder when
they are there). Machine facts and versions go with every report.

Each row also has its FLOPs per call, counted from the graphs at the shapes the first call fed
them (benchmarks/flops.py), the GFLOP/s achieved (FLOPs ÷ median) and their fraction of this
machine's matrix-product ceiling at the precision each graph ran (benchmarks/matmul_peak.py,
measured once per machine and cached; `remeasure` measures again): a regression, or headroom,
shows at a glance. The unet_b2 median (one guided step) is filed in the model's manifest.json
for precision "auto" (runtime/model/speed.py), unless `threads` or `deepcache` changed it.

Usage: sdrt bench MODEL [--backend ort] [--precision fp32] [--steps N] [--width W --height H]
       [--threads N] [--num-runs 5] [--scenarios unet_b2,end_to_end] [--json F] [--plot F.png]
       [--vae TINY_VAE_DIR]  (a tiny autoencoder in the VAE's place: vae_* and end_to_end)
       [--remeasure-ceilings]
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path

import numpy as np

from sdrt.benchmarks import flops, matmul_peak
from sdrt.quantize.speed_record import PROMPT, denoiser_call
from sdrt.runtime.components import VaeEncoder
from sdrt.runtime.errors import GenerationError, InputError, SdrtError
from sdrt.runtime.machine import cpu_facts, machine_id
from sdrt.runtime.model.folder import check_folder
from sdrt.runtime.model.speed import StepTime, record_time
from sdrt.runtime.model.variants import resolve_variant
from sdrt.runtime.pipeline import Pipeline
from sdrt.runtime.session import BACKENDS, CheckedSession, open_session

log = logging.getLogger(__name__)

SCENARIOS = ("text_encoder", "unet_b1", "unet_b2", "vae_decode", "vae_encode", "end_to_end")
RECORDED = "unet_b2"  # one guided step: the time precision "auto" compares
PACKAGES = ("sdrt", "numpy", "onnxruntime", "openvino", "pillow")


@dataclass(frozen=True)
class BenchOptions:
    """One `sdrt bench` request; None takes the model family's default."""

    model: str
    backend: str = "ort"
    precision: str = "fp32"
    steps: int | None = None
    width: int | None = None
    height: int | None = None
    threads: int | None = None
    runs: int = 5
    sampler: str | None = None  # end to end only; None: the model's own
    guidance: float | None = None  # end to end only; None: the family's default
    vae: str | None = None  # a tiny autoencoder folder in the model's VAE's place
    deepcache: int | None = None  # end to end only: DeepCache interval N (runtime/deepcache.py)

    def argv(self) -> list[str]:
        """The options as this module's command-line arguments."""
        args = ["--backend", self.backend, "--precision", self.precision,
                "--num-runs", str(self.runs)]
        for name in ("steps", "width", "height", "threads", "sampler", "guidance", "vae",
                     "deepcache"):
            value = getattr(self, name)
            if value is not None:
                args += [f"--{name}", str(value)]
        return [self.model, *args]


def _prepare(name: str, pipe: Pipeline, opts: BenchOptions, req_width: int,
             req_height: int) -> Callable[[], object]:
    """The call that scenario `name` times, its inputs made once."""
    latent = (pipe.facts.latent_channels, req_height // pipe.facts.vae_scale_factor,
              req_width // pipe.facts.vae_scale_factor)
    rng = np.random.default_rng(0)
    if name == "text_encoder":
        return lambda: pipe.conditioner(PROMPT, "", guided=True, width=req_width,
                                        height=req_height)
    if name in ("unet_b1", "unet_b2"):
        return denoiser_call(pipe, req_width, req_height, guided=name == "unet_b2")[0]
    if name == "vae_decode":
        latents = rng.standard_normal((1, *latent), dtype=np.float32)
        return lambda: pipe.vae_decoder(latents)
    if name == "vae_encode" and opts.vae is not None:  # the tiny VAE's encoder
        encoder = pipe.vae_encoder()
        images = rng.uniform(-1, 1, (1, 3, req_height, req_width)).astype(np.float32)
        return lambda: encoder(images)
    if name == "vae_encode":
        variant = resolve_variant(pipe.folder, opts.precision, opts.backend)
        encoder = VaeEncoder(open_session(variant.graph_path(pipe.folder, "vae_encoder"),
                                          opts.backend, threads=opts.threads,
                                          execution=variant.execution("vae_encoder")))
        images = rng.uniform(-1, 1, (1, 3, req_height, req_width)).astype(np.float32)
        return lambda: encoder(images)
    if name == "end_to_end":
        chosen = {"sampler": opts.sampler, "guidance_scale": opts.guidance,
                  "deepcache": opts.deepcache}
        return lambda: pipe.generate(PROMPT, steps=opts.steps, width=req_width,
                                     height=req_height, seed=0,
                                     **{k: v for k, v in chosen.items() if v is not None})
    raise ValueError(f"unknown scenario '{name}'; choose from {', '.join(SCENARIOS)}")


def run_scenario(name: str, opts: BenchOptions) -> dict:
    """Time one scenario in this process: load, first call, then `opts.runs` steady calls."""
    start = time.perf_counter()
    pipe = Pipeline.load(opts.model, opts.backend, threads=opts.threads,
                         precision=opts.precision, vae=opts.vae,
                         deepcache=opts.deepcache is not None)
    width = opts.width or pipe.facts.default_size
    height = opts.height or pipe.facts.default_size
    call = _prepare(name, pipe, opts, width, height)
    load_s = time.perf_counter() - start
    with _recording_calls() as graph_calls, _counting_runs(pipe.unet.session) as unet_calls:
        start = time.perf_counter()
        call()
        first_call_s = time.perf_counter() - start
    times = []
    for _ in range(opts.runs):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return {
        "scenario": name, "load_s": load_s, "first_call_s": first_call_s,
        "first_run_s": load_s + first_call_s, "times_s": times,
        "median_s": statistics.median(times),
        "startup_s": load_s + first_call_s - statistics.median(times),  # load + compile
        "p90_s": float(np.percentile(times, 90)),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "estimate_mb": _estimate_mb(name, opts),  # runtime/memory/estimate.py, before loading
        "unet_calls": len(unet_calls),  # UNet graph runs in one call (PNDM: steps + 1)
        "width": width, "height": height,
        "calls": [{"graph": graph, "shapes": json.loads(shapes), "count": count}
                  for (graph, shapes), count in Counter(graph_calls).items()],
    }


def _estimate_mb(name: str, opts: BenchOptions) -> float | None:
    from sdrt.benchmarks.low_memory import scenario_estimate

    found = scenario_estimate(name, opts.model, opts.backend, opts.precision, opts.width,
                              opts.height, opts.deepcache)
    return None if found is None else found / 2**20


@contextmanager
def _recording_calls() -> Iterator[list[tuple[str, str]]]:
    """A list of (graph file, input shapes as JSON), one per graph run inside the block."""
    calls: list[tuple[str, str]] = []
    original = CheckedSession.run

    def recording_run(session, feeds):
        shapes = {name: list(np.shape(value)) for name, value in feeds.items()}
        calls.append((str(session.path), json.dumps(shapes, sort_keys=True)))
        return original(session, feeds)

    CheckedSession.run = recording_run
    try:
        yield calls
    finally:
        CheckedSession.run = original


@contextmanager
def _counting_runs(session) -> Iterator[list[None]]:
    """A list that grows by one per `session.run` call inside the block."""
    calls: list[None] = []
    original = session.run

    def counting_run(feeds):
        calls.append(None)
        return original(feeds)

    session.run = counting_run
    try:
        yield calls
    finally:
        del session.run  # the class's method again


def check_request(folder: Path, backend: str, precision: str,
                  scenarios: str | None) -> tuple[str, ...]:
    """The scenarios asked for; InputError/ModelError before any process starts."""
    chosen = tuple(scenarios.split(",")) if scenarios else SCENARIOS
    unknown = [name for name in chosen if name not in SCENARIOS]
    if unknown:
        raise InputError(f"unknown scenario '{unknown[0]}'; choose from {', '.join(SCENARIOS)}")
    if backend not in BACKENDS:
        raise InputError(f"unknown backend '{backend}'; choose one of: {', '.join(BACKENDS)}")
    check_folder(folder)
    resolve_variant(folder, precision, backend)
    return chosen


def run_in_fresh_process(name: str, opts: BenchOptions) -> dict:
    """`run_scenario` in a new interpreter, so the peak RSS is this scenario's alone."""
    argv = [sys.executable, "-m", "sdrt.benchmarks.bench", *opts.argv(), "--worker", name]
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode != 0:
        lines = (done.stderr.strip() or done.stdout.strip() or "no output").splitlines()
        raise GenerationError(f"bench scenario {name} failed: {lines[-1]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def machine_facts() -> dict:
    """CPU model and the flags that pick kernels, cores, memory, versions, git commit."""
    meminfo = Path("/proc/meminfo").read_text() if Path("/proc/meminfo").exists() else ""
    mem_kib = next((int(line.split()[1]) for line in meminfo.splitlines()
                    if line.startswith("MemTotal:")), None)
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return {
        **cpu_facts(), "machine_id": machine_id(),
        "memory_gb": round(mem_kib / 1024**2, 1) if mem_kib else None,
        "python": platform.python_version(), "versions": versions, "git_commit": _git_commit(),
    }


def _git_commit() -> str | None:
    try:
        done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, cwd=Path(__file__).resolve().parent, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() or None if done.returncode == 0 else None


def bench(opts: BenchOptions, scenarios: tuple[str, ...] = SCENARIOS,
          progress: Callable[[str], None] = lambda name: None,
          remeasure: bool = False) -> dict:
    """Every scenario, each in its own process, with its FLOPs and ceiling fraction; the report
    (options, machine, ceilings, rows, the step time recorded in the manifest)."""
    rows = []
    for name in scenarios:
        progress(name)
        rows.append(run_in_fresh_process(name, opts))
    path = matmul_peak.cache_path(opts.threads)
    if remeasure or path is None or not path.is_file():
        progress("matmul ceilings")
    ceilings = _ceilings(opts.threads, remeasure)
    folder = Path(opts.model)
    variant = resolve_variant(folder, opts.precision, opts.backend)
    for row in rows:
        by_precision = flops.stage_flops(row["calls"], folder, variant)
        row.update(flops.ceiling_figures(by_precision, row["median_s"], ceilings),
                   ceiling_precision="+".join(sorted(by_precision)) or None)
    return {"options": asdict(opts), "machine": machine_facts(), "ceilings": ceilings,
            "scenarios": rows, "recorded": _record_step(rows, opts, variant.key)}


def _ceilings(threads: int | None, remeasure: bool) -> dict[str, float | None]:
    try:
        return matmul_peak.ceilings(threads, refresh=remeasure)
    except ModuleNotFoundError:  # the ceilings are measured through OpenVINO
        log.warning("no matmul ceilings: OpenVINO is not installed")
        return dict.fromkeys(matmul_peak.PRECISIONS)


def _record_step(rows: list[dict], opts: BenchOptions, key: str) -> dict | None:
    """The unet_b2 median filed in the manifest for `key` (runtime/model/speed.py), or None
    where there is none, threads or DeepCache changed it, or the folder is read-only."""
    row = next((row for row in rows if row["scenario"] == RECORDED), None)
    if row is None or opts.threads is not None or opts.deepcache is not None:
        return None
    step = StepTime(row["median_s"], (2, row["height"], row["width"]), "sdrt bench")
    if not record_time(Path(opts.model), key, step):
        return None
    return {"variant": key, "step_s": step.step_s, "shape": list(step.shape)}


def table(report: dict) -> str:
    """The report's rows as a fixed-width table."""
    head = (f"{'scenario':<13}{'first run':>11}{'start-up':>10}{'median':>10}{'p90':>10}"
            f"{'GFLOP/s':>9}  {'% ceiling':<16}{'peak RSS':>9}{'estimate':>11}")
    lines = [head, "-" * len(head)]
    for row in report["scenarios"]:
        lines.append(f"{row['scenario']:<13}{row['first_run_s']:>10.3f}s{row['startup_s']:>9.3f}s"
                     f"{row['median_s']:>9.3f}s{row['p90_s']:>9.3f}s{_ceiling_cells(row)}"
                     f"{row['peak_rss_mb']:>8.0f} MB"
                     + (f"{row['estimate_mb']:>8.0f} MB" if row.get("estimate_mb") else ""))
    return "\n".join(lines)


def _ceiling_cells(row: dict) -> str:
    """GFLOP/s and '% ceiling' (with the precision it is of), '-' where unknown."""
    achieved = row.get("gflops_per_s")
    fraction = row.get("ceiling_fraction")
    share = f"{fraction:>6.1%} {row['ceiling_precision']}" if fraction is not None else "-"
    return (f"{achieved:>9.1f}" if achieved is not None else f"{'-':>9}") + f"  {share:<16}"


def ceilings_line(report: dict) -> str:
    """The ceilings the fractions are of, as one line."""
    known = [f"{p} {g:.0f}" for p, g in report["ceilings"].items() if g]
    return ("matmul ceilings (GFLOP/s, benchmarks/matmul_peak.py): "
            + (", ".join(known) if known else "not measured"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--backend", default="ort")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--num-runs", dest="runs", type=int, default=5)
    for name in ("steps", "width", "height", "threads"):
        parser.add_argument(f"--{name}", type=int, default=None)
    parser.add_argument("--sampler", default=None)
    parser.add_argument("--guidance", type=float, default=None)
    parser.add_argument("--vae", default=None)
    parser.add_argument("--deepcache", type=int, default=None)
    parser.add_argument("--remeasure-ceilings", dest="remeasure", action="store_true")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = vars(parser.parse_args())
    worker = args.pop("worker")
    remeasure = args.pop("remeasure")
    opts = BenchOptions(**args)
    if worker:  # one scenario, reported as one JSON line on stdout
        try:
            print(json.dumps(run_scenario(worker, opts)))
        except SdrtError as exc:
            sys.exit(f"error: {exc}")
        return
    report = bench(opts, remeasure=remeasure)
    print(table(report))
    print(ceilings_line(report))
    print(json.dumps(report["machine"]))


if __name__ == "__main__":
    main()
