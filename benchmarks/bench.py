"""`sdrt bench`: time each stage of one model folder on one backend and precision.

Scenarios (one row each): the text encoder(s) on one prompt with CFG's empty prompt,
one UNet call at batch 1 (guidance off) and batch 2 (one guided step), the VAE decoder and the
VAE encoder on one image, and end to end (one `generate` at the asked steps). Each scenario runs
in a fresh process, so its peak RSS is its own; there the first run (model load plus the first
call, when OpenVINO compiles the shape) is reported apart from the steady state (median and p90
of `runs` further calls), and so is the start-up cost: the first run less the median, that is
load plus compile (OpenVINO imports compiled blobs from runtime/compile_cache.py's folder when
they are there). Machine facts and versions go with every report.

Usage: sdrt bench MODEL [--backend ort] [--precision fp32] [--steps N] [--width W --height H]
       [--threads N] [--num-runs 5] [--scenarios unet_b2,end_to_end] [--json F] [--plot F.png]
       [--vae TINY_VAE_DIR]  (a tiny autoencoder in the VAE's place: vae_* and end_to_end)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path

import numpy as np

from sdrt.runtime.components import VaeEncoder
from sdrt.runtime.errors import GenerationError, InputError, SdrtError
from sdrt.runtime.guidance import guidance_embedding
from sdrt.runtime.model.folder import check_folder
from sdrt.runtime.model.variants import resolve_variant
from sdrt.runtime.pipeline import Pipeline
from sdrt.runtime.session import BACKENDS, open_session

SCENARIOS = ("text_encoder", "unet_b1", "unet_b2", "vae_decode", "vae_encode", "end_to_end")
PROMPT = "a photograph of an astronaut riding a horse"
# CPU features that decide which kernels run (AVX-512 VNNI/BF16 int8 and bf16 dot products,
# AMX tiles on Intel Sapphire Rapids and later).
CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")
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


def _prepare(name: str, pipe: Pipeline, opts: BenchOptions) -> Callable[[], object]:
    """The call that scenario `name` times, its inputs made once."""
    req_width = opts.width or pipe.facts.default_size
    req_height = opts.height or pipe.facts.default_size
    latent = (pipe.facts.latent_channels, req_height // pipe.facts.vae_scale_factor,
              req_width // pipe.facts.vae_scale_factor)
    rng = np.random.default_rng(0)
    if name == "text_encoder":
        return lambda: pipe.conditioner(PROMPT, "", guided=True, width=req_width,
                                        height=req_height)
    if name in ("unet_b1", "unet_b2"):
        guided = name == "unet_b2"
        cond = pipe.conditioner(PROMPT, "", guided=guided, width=req_width, height=req_height)
        batch = len(cond.context)
        sample = rng.standard_normal((batch, pipe.unet.in_channels, *latent[1:]),
                                     dtype=np.float32)
        embedded = None
        if pipe.unet.guidance_dim is not None:
            embedded = np.repeat(guidance_embedding(7.5, pipe.unet.guidance_dim)[None], batch, 0)
        return lambda: pipe.unet(sample, 999.0, cond.context, cond.added, embedded)
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
    call = _prepare(name, pipe, opts)
    load_s = time.perf_counter() - start
    with _counting_runs(pipe.unet.session) as unet_calls:
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
    }


def _estimate_mb(name: str, opts: BenchOptions) -> float | None:
    from sdrt.benchmarks.low_memory import scenario_estimate

    found = scenario_estimate(name, opts.model, opts.backend, opts.precision, opts.width,
                              opts.height, opts.deepcache)
    return None if found is None else found / 2**20


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
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    fields = dict(line.split(":", 1) for line in cpuinfo.splitlines() if ":" in line)
    flags = set(fields.get("flags\t\t", fields.get("flags", "")).split())
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
        "cpu": fields.get("model name\t", platform.processor()).strip(),
        "cpu_flags": [flag for flag in CPU_FLAGS if flag in flags],
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
        else os.cpu_count(),
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
          progress: Callable[[str], None] = lambda name: None) -> dict:
    """Every scenario, each in its own process; the report (options, machine, rows)."""
    rows = []
    for name in scenarios:
        progress(name)
        rows.append(run_in_fresh_process(name, opts))
    return {"options": asdict(opts), "machine": machine_facts(), "scenarios": rows}


def table(report: dict) -> str:
    """The report's rows as a fixed-width table."""
    head = (f"{'scenario':<13}{'first run':>11}{'start-up':>10}{'median':>10}{'p90':>10}"
            f"{'peak RSS':>11}{'estimate':>11}")
    lines = [head, "-" * len(head)]
    for row in report["scenarios"]:
        lines.append(f"{row['scenario']:<13}{row['first_run_s']:>10.3f}s{row['startup_s']:>9.3f}s"
                     f"{row['median_s']:>9.3f}s{row['p90_s']:>9.3f}s"
                     f"{row['peak_rss_mb']:>8.0f} MB"
                     + (f"{row['estimate_mb']:>8.0f} MB" if row.get("estimate_mb") else ""))
    return "\n".join(lines)


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
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = vars(parser.parse_args())
    worker = args.pop("worker")
    opts = BenchOptions(**args)
    if worker:  # one scenario, reported as one JSON line on stdout
        try:
            print(json.dumps(run_scenario(worker, opts)))
        except SdrtError as exc:
            sys.exit(f"error: {exc}")
        return
    report = bench(opts)
    print(table(report))
    print(json.dumps(report["machine"]))


if __name__ == "__main__":
    main()
