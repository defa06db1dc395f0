"""sdrt against its peers on the same weights, in one run, so ratios hold on a noisy machine.

Every configuration makes one image end to end (prompt to decoded image) with the same size,
steps, guidance, sampler, prompt and seed, in a fresh process so that its peak RSS is its own:

- sdrt on ONNX Runtime and OpenVINO at fp32, plus every variant the ONNX folder's manifest lists
  (e.g. int8-openvino), through `sdrt bench`'s end-to-end scenario
  (`Pipeline.load(...).generate(...)`);
- diffusers on torch (fp32, bf16 autocast), optimum's ONNX Runtime pipeline (fp32), optimum-intel's
  OpenVINO pipeline and OpenVINO GenAI's Text2ImagePipeline (fp32, bf16): the `run_*.py` scripts
  beside this file, each run by the Python of the venv its pins need.

The sampler is set explicitly on every side (DDIM by default: one UNet call per step, where the
folders' PNDM makes 20 steps 21 calls), and each row reports the UNet calls it counted. A peer
whose venv or model folder is missing is reported as skipped with the reason, one that crashes
as failed with its last error line; neither stops the run. The report: a Markdown table with each
configuration's median against the fastest peer's and diffusers fp32's, JSON with machine facts
and versions, and a bar chart.

Usage, from the repository root (benchmarks/peers/README.md makes the venvs and model folders):
  python -m sdrt.benchmarks.peers --diffusers-model models/generated/sd15-random \\
      --onnx-model models/generated/sd15-random-onnx --ov-model models/generated/sd15-random-ov \\
      --steps 20 --guidance 7.5 --size 512 --runs 2 --json F.json --plot F.png --markdown F.md
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from sdrt.benchmarks import bench
from sdrt.runtime.deepcache import gate_record, uncut_variant
from sdrt.runtime.errors import SdrtError
from sdrt.runtime.model.manifest import MANIFEST_NAME, Manifest
from sdrt.runtime.model.variants import REFERENCE, Variant, resolve_variant

HERE = Path(__file__).resolve().parent
SAMPLERS = ("ddim", "euler")  # one UNet call per step on every side (_runner.SCHEDULERS)
BACKEND_NAMES = {"ort": "ONNX Runtime", "openvino": "OpenVINO"}
REFERENCE_CONFIG = "diffusers-fp32"


@dataclass(frozen=True)
class Peer:
    """One peer runner: its script, the venv and model-folder options it needs, and what it
    must be able to import there."""

    key: str
    label: str
    script: str
    venv: str  # the CompareOptions field naming its venv (None: this Python)
    model: str  # the CompareOptions field naming its model folder
    precisions: tuple[str, ...]
    modules: tuple[str, ...]


PEERS = (
    Peer("diffusers", "diffusers torch", "run_diffusers.py", "diffusers_venv", "diffusers_model",
         ("fp32", "bf16"), ("torch", "diffusers")),
    Peer("optimum-ort", "optimum ONNX Runtime", "run_optimum_ort.py", "optimum_venv",
         "onnx_model", ("fp32",), ("optimum.onnxruntime", "diffusers")),
    Peer("optimum-openvino", "optimum-intel OpenVINO", "run_optimum_openvino.py",
         "optimum_intel_venv", "ov_model", ("fp32", "bf16"), ("optimum.intel", "diffusers")),
    Peer("openvino-genai", "OpenVINO GenAI", "run_openvino_genai.py", "genai_venv", "ov_model",
         ("fp32", "bf16"), ("openvino_genai",)),
)


@dataclass(frozen=True)
class CompareOptions:
    """One comparison: the model folders (one weights, three layouts), the request, the venvs."""

    diffusers_model: Path | None = None  # diffusers layout (torch peers)
    onnx_model: Path | None = None  # optimum ONNX layout (`sdrt export`): sdrt, optimum ORT
    ov_model: Path | None = None  # optimum-intel IR (optimum-cli export openvino): OV peers
    width: int = 512
    height: int = 512
    steps: int = 20
    guidance: float = 7.5
    sampler: str = "ddim"
    runs: int = 3
    threads: int | None = None
    diffusers_venv: Path | None = None  # None: this Python (the main venv has torch, diffusers)
    optimum_venv: Path | None = Path(".venv-optimum")
    optimum_intel_venv: Path | None = Path(".venv-optimum-intel")
    genai_venv: Path | None = Path(".venv-optimum-intel")
    only: tuple[str, ...] = ()  # config keys or key prefixes; empty: all
    deepcache: tuple[int, ...] = ()  # DeepCache intervals: sdrt rows with each (runtime/deepcache)
    timeout: float | None = None  # seconds per peer process


@dataclass(frozen=True)
class Config:
    """One row: sdrt on a backend and variant, or a peer at a precision."""

    key: str  # e.g. sdrt-ort-fp32, optimum-openvino-bf16
    label: str
    engine: str  # "sdrt" or a Peer key
    precision: str
    model: Path | None
    backend: str | None = None  # sdrt only
    peer: Peer | None = field(default=None, repr=False)
    deepcache: int | None = None  # sdrt only: DeepCache interval N


def sdrt_configs(folder: Path | None, deepcache: tuple[int, ...] = ()) -> list[Config]:
    """sdrt at fp32 on both backends, then each variant the folder's manifest lists; then with
    each DeepCache interval, those that have DeepCache graphs (the fp32 UNet's, or a variant's
    own UNet's, runtime/deepcache.py)."""
    pairs = [(REFERENCE, "ort"), (REFERENCE, "openvino")]
    uncut = set()
    if folder is not None and (folder / MANIFEST_NAME).is_file():
        listed = [Variant.from_json(entry) for entry in Manifest.load(folder).variants]
        pairs += sorted((v.precision, v.backend) for v in listed)
        uncut = {(v.precision, v.backend) for v in listed if uncut_variant(folder, v)}
    configs = [Config(f"sdrt-{backend}-{precision}",
                      f"sdrt {BACKEND_NAMES[backend]} {precision}", "sdrt", precision, folder,
                      backend=backend) for precision, backend in pairs]
    return configs + [replace(c, key=f"{c.key}-deepcache{n}", label=f"{c.label} DeepCache N={n}",
                              deepcache=n)
                      for n in deepcache for c in configs
                      if (c.precision, c.backend) not in uncut]


def peer_configs(opts: CompareOptions) -> list[Config]:
    """Every peer at each precision it runs."""
    return [Config(f"{peer.key}-{precision}",
                   f"{peer.label} {precision}" + (" autocast" if peer.key == "diffusers"
                                                  and precision == "bf16" else ""),
                   peer.key, precision, getattr(opts, peer.model), peer=peer)
            for peer in PEERS for precision in peer.precisions]


def chosen_configs(opts: CompareOptions) -> list[Config]:
    """The configurations `opts.only` selects (by key or key prefix), sdrt's first."""
    configs = sdrt_configs(opts.onnx_model, opts.deepcache) + peer_configs(opts)
    if not opts.only:
        return configs
    return [c for c in configs if any(c.key == o or c.key.startswith(f"{o}-") or o == c.engine
                                      for o in opts.only)]


def venv_python(venv: Path | None) -> Path:
    """The venv's interpreter (this one for None)."""
    if venv is None:
        return Path(sys.executable)
    for candidate in (venv / "bin" / "python", venv / "Scripts" / "python.exe"):
        if candidate.exists():
            return candidate
    return venv / "bin" / "python"


# Prints the modules (argv) that the interpreter cannot find, without importing heavy packages.
# A peer's output is decoded as UTF-8 whatever this process's locale says: in one CI run the
# test process's preferred encoding was ASCII and a peer's warning text (UTF-8) failed its row.
CHILD_TEXT = {"encoding": "utf-8", "errors": "replace"}


_FIND_MODULES = """
import importlib.util, sys
def missing(name):
    try:
        return importlib.util.find_spec(name) is None
    except ImportError:
        return True
print(" ".join(n for n in sys.argv[1:] if missing(n)))
"""


def why_not(config: Config, opts: CompareOptions) -> str | None:
    """Why `config` cannot run here (a missing model folder, venv or package), or None."""
    if config.model is None:
        option = "onnx_model" if config.peer is None else config.peer.model
        return f"no --{option.replace('_', '-')} given"
    if not config.model.is_dir():
        return f"model folder {config.model} not found"
    if config.peer is None:
        if config.backend == "openvino" and importlib.util.find_spec("openvino") is None:
            return "openvino is not installed in this Python (pip install 'sdrt[openvino]')"
        return None
    venv = getattr(opts, config.peer.venv)
    python = venv_python(venv)
    if not python.exists():
        return f"venv {venv} not found (benchmarks/peers/README.md makes it)"
    done = subprocess.run([str(python), "-c", _FIND_MODULES, *config.peer.modules],
                          capture_output=True, timeout=120, **CHILD_TEXT)
    missing = done.stdout.strip()
    if done.returncode != 0 or missing:
        return f"{venv or python} lacks {missing or config.peer.modules[0]}"
    return None


def run_sdrt(config: Config, opts: CompareOptions) -> dict:
    """sdrt's end-to-end bench scenario for one backend and variant, in a fresh process."""
    bench.check_request(config.model, config.backend, config.precision, "end_to_end")
    bench_opts = bench.BenchOptions(
        str(config.model), config.backend, config.precision, opts.steps, opts.width,
        opts.height, opts.threads, opts.runs, sampler=opts.sampler, guidance=opts.guidance,
        deepcache=config.deepcache)
    row = bench.run_in_fresh_process("end_to_end", bench_opts)
    facts = bench.machine_facts()["versions"]
    library = "onnxruntime" if config.backend == "ort" else "openvino"
    row["versions"] = {name: facts[name] for name in ("sdrt", library, "numpy") if name in facts}
    variant = resolve_variant(config.model, config.precision, config.backend)
    parts = [f"{name} {c.file or 'fp32 graph'}"
             + (f" at {c.execution}" if config.backend == "openvino" else "")
             for name, c in variant.components.items()]
    if config.deepcache is not None:
        gated = gate_record(Manifest.load(config.model).extra, config.precision, config.backend,
                            config.deepcache)
        parts.append(f"DeepCache N={config.deepcache} ("
                     + (f"gated: {gated['figures']}" if gated else "not gated here") + ")")
    row["notes"] = "; ".join([f"{config.backend} backend, {variant.key} variant", *parts,
                              *(["other components fp32 at f32; static shapes"]
                                if config.backend == "openvino" else [])])
    return row


def run_peer(config: Config, opts: CompareOptions) -> dict:
    """A peer's runner script under its venv's Python; its JSON line (or `skipped`)."""
    argv = [str(venv_python(getattr(opts, config.peer.venv))), str(HERE / config.peer.script),
            "--model", str(config.model), "--width", str(opts.width),
            "--height", str(opts.height), "--steps", str(opts.steps),
            "--guidance", str(opts.guidance), "--runs", str(opts.runs),
            "--sampler", opts.sampler, "--precision", config.precision,
            "--prompt", bench.PROMPT, "--seed", "0"]
    if opts.threads:
        argv += ["--threads", str(opts.threads)]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["HF_HUB_OFFLINE"] = "1"  # local folders only: never reach the hub
    done = subprocess.run(argv, capture_output=True, env=env, timeout=opts.timeout, **CHILD_TEXT)
    if done.returncode != 0:
        lines = (done.stderr.strip() or done.stdout.strip() or "no output").splitlines()
        raise RuntimeError(f"{config.peer.script} exited {done.returncode}: {lines[-1]}")
    reports = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if not reports:
        raise RuntimeError(f"{config.peer.script} printed no JSON report")
    return json.loads(reports[-1])


def run_config(config: Config, opts: CompareOptions) -> dict:
    """One row: the timings, or status skipped/failed with the reason."""
    row = {"config": config.key, "label": config.label, "engine": config.engine,
           "precision": config.precision, "model": str(config.model)}
    reason = why_not(config, opts)
    if reason:
        return {**row, "status": "skipped", "reason": reason}
    try:
        result = (run_sdrt if config.peer is None else run_peer)(config, opts)
    except (SdrtError, RuntimeError, ValueError, OSError, subprocess.TimeoutExpired) as exc:
        return {**row, "status": "failed", "reason": str(exc).splitlines()[-1]}
    if "skipped" in result:
        return {**row, "status": "skipped", "reason": result["skipped"]}
    return {**row, "status": "ok", **result}


def add_ratios(rows: list[dict]) -> None:
    """Each finished row's median over the fastest peer's and over diffusers fp32's."""
    done = [row for row in rows if row["status"] == "ok"]
    peers = [row for row in done if row["engine"] != "sdrt"]
    fastest = min(peers, key=lambda row: row["median_s"], default=None)
    reference = next((row for row in done if row["config"] == REFERENCE_CONFIG), None)
    for row in done:
        row["vs_fastest_peer"] = row["median_s"] / fastest["median_s"] if fastest else None
        row["fastest_peer"] = fastest["config"] if fastest else None
        row["vs_diffusers_fp32"] = (row["median_s"] / reference["median_s"]
                                    if reference else None)


def compare(opts: CompareOptions, progress: Callable[[str], None] = lambda line: None) -> dict:
    """Run every chosen configuration in turn; the report (options, machine, rows)."""
    rows = []
    for config in chosen_configs(opts):
        progress(f"running {config.key} ...")
        start = time.perf_counter()
        rows.append(run_config(config, opts))
        status = rows[-1]["status"]
        detail = rows[-1].get("reason") or f"median {rows[-1]['median_s']:.3f} s"
        progress(f"  {status} in {time.perf_counter() - start:.0f} s: {detail}")
    add_ratios(rows)
    options = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(opts).items()}
    return {"options": options, "machine": bench.machine_facts(),
            "date": time.strftime("%Y-%m-%d %H:%M %Z"), "rows": rows}


def _seconds(value: float) -> str:
    return f"{value:.3f}" if value < 1 else f"{value:.2f}"


def _ratio(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}×"


def markdown(report: dict, command: str | None = None) -> str:
    """The report as Markdown: setting, machine, the table, what each row ran, what was left."""
    opts, machine = report["options"], report["machine"]
    rows = report["rows"]
    done = [row for row in rows if row["status"] == "ok"]
    lines = [
        f"End to end, {opts['width']}×{opts['height']}, {opts['steps']} steps "
        f"({opts['sampler']} on every side), guidance {opts['guidance']}, one image, "
        f"median of {opts['runs']} after a first generation; each configuration in a fresh "
        "process.",
        "",
        f"{report['date']}: {machine['cpu']} ({', '.join(machine['cpu_flags']) or 'no flags'}), "
        f"{machine['cores']} cores, {machine['memory_gb']} GB; sdrt commit "
        f"{machine['git_commit']}, Python {machine['python']}.",
        "",
        "| configuration | UNet calls | load (s) | first image (s) | median (s) | p90 (s) "
        "| peak RSS (MB) | ÷ fastest peer | ÷ diffusers fp32 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in done:
        calls = "?" if row.get("unet_calls") is None else str(row["unet_calls"])
        lines.append(
            f"| {row['label']} | {calls} | {_seconds(row['load_s'])} "
            f"| {_seconds(row['first_call_s'])} | {_seconds(row['median_s'])} "
            f"| {_seconds(row['p90_s'])} | {row['peak_rss_mb']:.0f} "
            f"| {_ratio(row['vs_fastest_peer'])} | {_ratio(row['vs_diffusers_fp32'])} |")
    fastest = next((row["label"] for row in done if row["config"] == done[0]["fastest_peer"]),
                   None) if done else None
    lines += ["", "Ratios are median time over the reference's median: below 1× is faster"
              + (f"; the fastest peer here is {fastest}." if fastest else ".")]
    lines += ["", "What each row ran:", ""]
    for row in done:
        versions = ", ".join(f"{k} {v}" for k, v in row.get("versions", {}).items())
        lines.append(f"- {row['label']}: {row.get('notes', '')}; {versions}; `{row['model']}`")
    left = [row for row in rows if row["status"] != "ok"]
    if left:
        lines += ["", "Not run:", ""]
        lines += [f"- {row['label']}: {row['status']}: {row['reason']}" for row in left]
    if command:
        lines += ["", "Command:", "", f"```bash\n{command}\n```"]
    return "\n".join(lines) + "\n"


def chart(report: dict, path: Path) -> Path:
    """The medians as a bar chart (PNG)."""
    from sdrt.benchmarks.chart import bar_chart

    opts = report["options"]
    bars = [(row["label"], row["median_s"]) for row in report["rows"] if row["status"] == "ok"]
    if not bars:
        raise ValueError("no configuration finished, so there is nothing to chart")
    title = (f"End to end {opts['width']}x{opts['height']}, {opts['steps']} {opts['sampler']} "
             f"steps, guidance {opts['guidance']}: median seconds (lower is faster)")
    return bar_chart(bars, path, title=title, unit="s")


def parse_args(argv: list[str] | None = None) -> tuple[CompareOptions, argparse.Namespace]:
    parser = argparse.ArgumentParser(
        prog="python -m sdrt.benchmarks.peers", description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.splitlines()[1:]))
    default = CompareOptions()
    parser.add_argument("--diffusers-model", type=Path, help="diffusers folder (torch peers)")
    parser.add_argument("--onnx-model", type=Path,
                        help="optimum ONNX folder from `sdrt export` (sdrt, optimum ORT)")
    parser.add_argument("--ov-model", type=Path,
                        help="optimum-intel IR folder (optimum-intel, OpenVINO GenAI)")
    parser.add_argument("--size", type=int, default=512, help="width and height")
    parser.add_argument("--width", type=int, default=None, help="default: --size")
    parser.add_argument("--height", type=int, default=None, help="default: --size")
    parser.add_argument("--steps", type=int, default=default.steps)
    parser.add_argument("--guidance", type=float, default=default.guidance)
    parser.add_argument("--sampler", choices=SAMPLERS, default=default.sampler)
    parser.add_argument("--runs", type=int, default=default.runs,
                        help="steady-state generations after the first")
    parser.add_argument("--threads", type=int, default=None,
                        help="threads for every engine (default: each one's own)")
    for name in ("diffusers_venv", "optimum_venv", "optimum_intel_venv", "genai_venv"):
        value = getattr(default, name)
        parser.add_argument(f"--{name.replace('_', '-')}", type=Path, default=value,
                            help=f"default: {value or 'this Python'}")
    parser.add_argument("--only", default="",
                        help="comma-separated config keys or prefixes (sdrt, diffusers-bf16, "
                             "openvino-genai, ...); default: all")
    parser.add_argument("--timeout", type=float, default=None, help="seconds per peer process")
    parser.add_argument("--deepcache", default="",
                        help="comma-separated DeepCache intervals: sdrt rows with each, e.g. 3,4 "
                             "(needs `python -m sdrt.export.deepcache` on --onnx-model)")
    parser.add_argument("--json", type=Path, help="write the report as JSON")
    parser.add_argument("--plot", type=Path, help="write a bar chart of the medians (PNG)")
    parser.add_argument("--markdown", type=Path, help="write the table as Markdown")
    args = parser.parse_args(argv)
    opts = replace(default, diffusers_model=args.diffusers_model, onnx_model=args.onnx_model,
                   ov_model=args.ov_model, width=args.width or args.size,
                   height=args.height or args.size, steps=args.steps, guidance=args.guidance,
                   sampler=args.sampler, runs=args.runs, threads=args.threads,
                   diffusers_venv=args.diffusers_venv, optimum_venv=args.optimum_venv,
                   optimum_intel_venv=args.optimum_intel_venv, genai_venv=args.genai_venv,
                   only=tuple(item for item in args.only.split(",") if item),
                   timeout=args.timeout)
    items = [item.strip() for item in args.deepcache.split(",") if item.strip()]
    if not all(item.isdigit() and int(item) >= 1 for item in items):
        parser.error(f"--deepcache must be intervals ≥ 1 separated by commas, got "
                     f"{args.deepcache!r}")
    return replace(opts, deepcache=tuple(int(item) for item in items)), args


def main(argv: list[str] | None = None) -> dict:
    """Run the comparison, print the Markdown table, write the files asked for."""
    argv = sys.argv[1:] if argv is None else argv
    opts, args = parse_args(argv)
    report = compare(opts, progress=lambda line: print(line, file=sys.stderr, flush=True))
    command = "python -m sdrt.benchmarks.peers " + shlex.join(argv)
    report["command"] = command
    text = markdown(report, command)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n", "utf-8")
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(text, "utf-8")
    if args.plot and any(row["status"] == "ok" for row in report["rows"]):
        chart(report, args.plot)
    return report
