"""ControlNet (Zhang et al. 2023) at full size: step time and peak RSS with and without control,
low-memory mode with control, and what the UNet's residual inputs cost a request without control.

The model is SD 1.5's architecture with seeded random weights (models/build_random_sd.py) and a
ControlNet made from its UNet as diffusers' `ControlNetModel.from_unet` makes one, its zero
convolutions given random weights so that control changes the latents; both are exported by
`sdrt export` into a cache folder outside the repository and reused from there by later runs.

Rows, per backend, each in a fresh process so that its peak RSS (ru_maxrss) is its own:
- `plain`: a guided generation (batch 2 with CFG) of `--steps` steps, no control: the UNet is
  fed zero residuals;
- `control`: the same with one ControlNet (module none, a random map, balanced mode: the
  ControlNet runs on both CFG rows every step);
- `low-memory`, `low-memory-control`: `plain` and `control` under `low_memory=True` (one graph,
  or the UNet and its ControlNets, resident at a time; the CFG rows as batch-1 calls);
- `residual-cost`: the guided model call three ways, alternating `--runs` times in one process
  so that the machine's drift falls on all alike: the UNet graph with the residual inputs and
  their Adds taken out (an ONNX edit beside the exported one, reading the same weights file:
  the graph an export without residuals gives), the exported UNet fed zero residuals (a request
  without control), and the ControlNet followed by the UNet fed its residuals (one net).
A step is the seconds between consecutive step callbacks after the first (OpenVINO compiles
during the first; Euler, one model call a step); each row shows the median, and the memory
estimate (runtime/memory/estimate.py) beside the measured peak. The ControlNet's
multiply-accumulates against the UNet's are counted from the two graphs at the step's shapes
(Conv, ConvTranspose, MatMul, Gemm after ONNX Runtime's symbolic shape inference), the cost the
control's extra time is set beside.

Usage: python -m sdrt.benchmarks.controlnet_step --cache DIR [--arch sd15]
       [--backends ort,openvino] [--rows plain,control,low-memory-control,residual-cost]
       [--steps 4] [--runs 3] [--size 512] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from sdrt.benchmarks.flops import graph_macs
from sdrt.runtime.control.residuals import (
    DOWN_RESIDUAL,
    MID_RESIDUAL,
    residual_channels,
    residual_levels,
    residual_names,
    residual_shapes,
    zero_residuals,
)

ROOT = Path(__file__).resolve().parents[1]
ROWS = ("plain", "control", "low-memory", "low-memory-control", "residual-cost")
PROMPT = "a lighthouse at dusk"
GUIDANCE = 7.5  # > 1: the UNet (and the ControlNet) run on the uncond and cond rows together
SAMPLER = "euler"  # one model call a step (the folder's PNDM makes steps + 1)
ZERO_CONV_STD = 0.02  # non-zero "zero convolutions": control changes the latents, stays finite
SEED = 0
NO_RESIDUALS = "no_residuals.onnx"  # the UNet graph without residual inputs, beside model.onnx
EMBEDDING_WIDTHS = (16, 32, 96, 256)  # diffusers' ControlNet conditioning embedding, SD's
logger = logging.getLogger("sdrt.benchmarks.controlnet_step")


# --- The cache: random weights, exported -------------------------------------------------

def prepare(cache: Path, arch: str) -> dict[str, Path]:
    """The exported model and control folders in `cache` (built and exported when missing), the
    UNet graph without residual inputs beside them, and a control map."""
    if cache.resolve().is_relative_to(ROOT):
        raise SystemExit(f"error: --cache {cache} is inside the repository; give a folder outside")
    cache.mkdir(parents=True, exist_ok=True)
    source, net = cache / f"{arch}-diffusers", cache / f"{arch}-controlnet-diffusers"
    model, control = cache / f"{arch}-onnx", cache / f"{arch}-controlnet-onnx"
    if not (source / "model_index.json").is_file():
        _run([sys.executable, str(ROOT / "models" / "build_random_sd.py"), arch, str(source)])
    if not (net / "config.json").is_file():
        vae = json.loads((source / "vae" / "config.json").read_text())
        build_random_controlnet(source / "unet", net, downsamplings=len(
            vae["block_out_channels"]) - 1, seed=SEED)
    for src, out in ((source, model), (net, control)):
        if not (out / "manifest.json").is_file():
            _run([str(Path(sys.executable).parent / "sdrt"), "export", str(src), str(out)])
    plain = model / "unet" / NO_RESIDUALS
    if not plain.is_file():
        without_residuals(model / "unet" / "model.onnx", NO_RESIDUALS)
    image = cache / f"{arch}-control-map.png"
    if not image.is_file():
        from sdrt.runtime.model.folder import read_facts

        _random_map(read_facts(model).default_size).save(image)
    return {"model": model, "control": control, "plain_unet": plain, "image": image}


def _run(argv: list[str]) -> None:
    logger.info("running %s", " ".join(argv))
    subprocess.run(argv, check=True, stdout=sys.stderr)  # stdout is the JSON line


def build_random_controlnet(unet_folder: Path, out: Path, *, downsamplings: int,
                            seed: int) -> Path:
    """diffusers' ControlNetModel.from_unet on the UNet in `unet_folder`, its conditioning
    embedding halving the control image `downsamplings` times (the VAE's: 3 for SD, as diffusers'
    default widths 16, 32, 96, 256 do), its zero convolutions (the residual projections and the
    embedding's last conv) given seeded normal weights; saved as a diffusers folder."""
    import torch
    from diffusers import ControlNetModel, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(unet_folder)
    torch.manual_seed(seed)
    net = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=EMBEDDING_WIDTHS[
        : downsamplings + 1])
    del unet
    zero_convs = [*net.controlnet_down_blocks, net.controlnet_mid_block,
                  net.controlnet_cond_embedding.conv_out]
    with torch.no_grad():
        for conv in zero_convs:
            torch.nn.init.normal_(conv.weight, std=ZERO_CONV_STD)
            torch.nn.init.normal_(conv.bias, std=ZERO_CONV_STD)
    net.save_pretrained(out)
    return out


def _random_map(size: int):
    """A seeded random RGB control map, `size` pixels square."""
    from PIL import Image

    pixels = np.random.default_rng(SEED).integers(0, 256, (size, size, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def without_residuals(graph: Path, name: str) -> Path:
    """`graph` with its residual inputs taken out, each Add they fed replaced by its other
    operand; written as `name` beside it, reading the same weights file (onnx refuses external
    data reached through a hard link)."""
    import onnx

    model = onnx.load(str(graph), load_external_data=False)
    residuals = {i.name for i in model.graph.input
                 if i.name == MID_RESIDUAL or i.name.startswith(DOWN_RESIDUAL.format(""))}
    if not residuals:
        raise SystemExit(f"error: {graph} takes no residual inputs: export it with this sdrt")
    renamed, kept = {}, []
    for node in model.graph.node:
        fed = residuals.intersection(node.input)
        if not fed:
            kept.append(node)
            continue
        if node.op_type != "Add" or len(node.input) != 2:
            raise SystemExit(f"error: {graph}: residual {sorted(fed)} feeds a {node.op_type}, "
                             "not an Add")
        [other] = [value for value in node.input if value not in residuals]
        renamed[node.output[0]] = renamed.get(other, other)
    for node in kept:
        node.input[:] = [renamed.get(value, value) for value in node.input]
    del model.graph.node[:]
    model.graph.node.extend(kept)
    kept_inputs = [i for i in model.graph.input if i.name not in residuals]
    del model.graph.input[:]
    model.graph.input.extend(kept_inputs)
    onnx.save(model, str(graph.parent / name))
    return graph.parent / name


# --- Multiply-accumulates per call, from the graphs --------------------------------------

def step_macs(folders: dict[str, Path], size: int) -> dict:
    """The UNet's and the ControlNet's multiply-accumulates at one guided step (batch 2)."""
    from sdrt.runtime.model.folder import read_facts

    config = json.loads((folders["model"] / "unet" / "config.json").read_text())
    side = size // read_facts(folders["model"]).vae_scale_factor
    base = {"sample": (2, int(config["in_channels"]), side, side), "timestep": (),
            "encoder_hidden_states": (2, 77, int(config["cross_attention_dim"]))}
    residuals = residual_shapes(residual_levels(config), residual_channels(config), 2,
                                (side, side))
    unet = graph_macs(folders["model"] / "unet" / "model.onnx", base | residuals)
    control = graph_macs(folders["control"] / "controlnet" / "model.onnx",
                         base | {"controlnet_cond": (2, 3, size, size)})
    return {"unet_macs": unet, "controlnet_macs": control, "controlnet_over_unet": control / unet}


# --- One row, in this process ------------------------------------------------------------

def generate_row(args: argparse.Namespace, folders: dict[str, Path]) -> dict:
    """A guided generation of `args.steps` steps: load seconds, each step's seconds after the
    first (between step callbacks) and their median."""
    from sdrt.runtime.control.unit import ControlUnit
    from sdrt.runtime.memory.plan import plan_request
    from sdrt.runtime.pipeline import GenerationRequest, Pipeline

    low_memory = args.child.startswith("low-memory")
    controls = () if not args.child.endswith("control") else (
        ControlUnit(model=folders["control"], image=folders["image"], module="none"),)
    request = GenerationRequest(PROMPT, steps=args.steps, seed=SEED, width=args.size,
                                height=args.size, guidance_scale=GUIDANCE, sampler=SAMPLER,
                                controls=controls)
    estimate = plan_request(folders["model"], args.backend, "fp32", request,
                            mode="low" if low_memory else "default", budget=None).peak
    start = time.perf_counter()
    pipe = Pipeline.load(folders["model"], args.backend, low_memory=low_memory)
    load_s = time.perf_counter() - start
    stamps: list[float] = []
    start = time.perf_counter()
    pipe.run(request, callback=lambda i, n, x: stamps.append(time.perf_counter()))
    steps = np.diff(stamps).tolist()
    return {"load_s": load_s, "generate_s": time.perf_counter() - start,
            "to_first_step_s": stamps[0] - start, "step_s": steps,
            "step_median_s": statistics.median(steps), "estimate_gib": estimate / 2**30}


def residual_cost_row(args: argparse.Namespace, folders: dict[str, Path]) -> dict:
    """The guided model call three ways, alternating `args.runs` times (each call once before,
    untimed: OpenVINO compiles then): the UNet graph without residual inputs, the exported one
    fed zero residuals, and the ControlNet then that UNet fed its residuals."""
    from sdrt.runtime.model.folder import read_facts
    from sdrt.runtime.session import open_session

    config = json.loads((folders["model"] / "unet" / "config.json").read_text())
    levels = residual_levels(config)
    side = args.size // read_facts(folders["model"]).vae_scale_factor
    with_inputs = open_session(folders["model"] / "unet" / "model.onnx", args.backend)
    without = open_session(folders["plain_unet"], args.backend)
    channels = [with_inputs.inputs[name].shape[1] for name in residual_names(len(levels) - 1)]
    net = open_session(folders["control"] / "controlnet" / "model.onnx", args.backend)
    feeds = _unet_feeds(with_inputs, (2, int(config["in_channels"]), side, side))
    cond = np.random.default_rng(SEED).random((2, 3, args.size, args.size), dtype=np.float32)

    def zeros_fed() -> float:  # as the runtime feeds a request without control
        begin = time.perf_counter()
        with_inputs.run(feeds | zero_residuals(levels, channels, 2, (side, side)))
        return time.perf_counter() - begin

    def plain() -> float:
        begin = time.perf_counter()
        without.run(feeds)
        return time.perf_counter() - begin

    def controlled() -> float:  # as the runtime runs a step with one ControlNet
        begin = time.perf_counter()
        with_inputs.run(feeds | net.run(feeds | {"controlnet_cond": cond}))
        return time.perf_counter() - begin

    first = (plain(), zeros_fed(), controlled())
    runs = [(plain(), zeros_fed(), controlled()) for _ in range(args.runs)]
    without_s, with_s, control_s = (statistics.median(column) for column in zip(*runs, strict=True))
    return {"first_s": first, "runs": runs, "without_inputs_s": without_s,
            "zeros_fed_s": with_s, "ratio": with_s / without_s, "controlled_s": control_s,
            "control_ratio": control_s / with_s}


def _unet_feeds(session, shape: tuple[int, ...]) -> dict[str, np.ndarray]:
    """Seeded sample and text states for a call at `shape`, timestep 999 at the graph's rank."""
    rng = np.random.default_rng(SEED)
    width = session.inputs["encoder_hidden_states"].shape[-1]
    rank = len(session.inputs["timestep"].shape)
    return {"sample": rng.standard_normal(shape, dtype=np.float32),
            "timestep": np.full((shape[0],) * rank, 999.0, np.float32),
            "encoder_hidden_states": rng.standard_normal((shape[0], 77, width),
                                                         dtype=np.float32)}


def child(args: argparse.Namespace) -> dict:
    """One row for one backend in this process, with its peak RSS; or (`prepare`) the cache
    made ready and the step's multiply-accumulates counted."""
    folders = prepare(args.cache, args.arch)
    if args.child == "prepare":
        return step_macs(folders, args.size)
    measure = residual_cost_row if args.child == "residual-cost" else generate_row
    row = {"row": args.child, "backend": args.backend, "steps": args.steps, "size": args.size}
    row |= measure(args, folders)
    return row | {"peak_rss_gib": _peak_gib(), "load_average": os.getloadavg()[0]}


def run_child(args: argparse.Namespace, row: str, backend: str) -> dict:
    """`row` in a fresh process; its JSON line. Everything heavy, the cache's building
    included, runs in children: a child's ru_maxrss starts from this process's peak (Linux
    carries it across fork and exec), which stays that of a bare interpreter."""
    argv = [sys.executable, "-m", "sdrt.benchmarks.controlnet_step", "--cache", str(args.cache),
            "--arch", args.arch, "--child", row, "--backend", backend, "--steps",
            str(args.steps), "--runs", str(args.runs), "--size", str(args.size)]
    out = subprocess.run(argv, check=True, stdout=subprocess.PIPE, text=True).stdout
    print(out.strip().splitlines()[-1], flush=True)
    return json.loads(out.strip().splitlines()[-1])


def _peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


# --- The report ---------------------------------------------------------------------------

def table(rows: list[dict], macs: dict) -> str:
    """The rows as Markdown: generation rows against the plain one, the residual-cost rows."""
    plain = {(r["backend"], r["row"].startswith("low-memory")): r["step_median_s"]
             for r in rows if not r["row"].endswith(("control", "cost"))}
    ratio = macs["controlnet_over_unet"]
    lines = [f"ControlNet/UNet multiply-accumulates per step: {ratio:.3f} "
             f"({macs['controlnet_macs'] / 1e12:.2f} / {macs['unet_macs'] / 1e12:.2f} T)", "",
             "| backend | row | step (median) | × its plan's plain step | extra ÷ MAC ratio | "
             "peak RSS | estimate |", "|---|---|---:|---:|---:|---:|---:|"]
    for r in (r for r in rows if r["row"] != "residual-cost"):
        base = plain.get((r["backend"], r["row"].startswith("low-memory")), math.nan)
        times = r["step_median_s"] / base
        lines.append(f"| {r['backend']} | {r['row']} | {r['step_median_s']:.2f} s | "
                     f"{times:.3f} | {(times - 1) / ratio:.2f} | {r['peak_rss_gib']:.2f} GiB | "
                     f"{r['estimate_gib']:.2f} GiB |")
    lines += ["", "| backend | UNet, no residual inputs | UNet fed zeros | ratio | "
              "ControlNet + UNet | × zeros fed | extra ÷ MAC ratio |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for r in (r for r in rows if r["row"] == "residual-cost"):
        lines.append(f"| {r['backend']} | {r['without_inputs_s']:.2f} s | "
                     f"{r['zeros_fed_s']:.2f} s | {r['ratio']:.3f} | {r['controlled_s']:.2f} s | "
                     f"{r['control_ratio']:.3f} | {(r['control_ratio'] - 1) / ratio:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, required=True,
                        help="built and exported folders, reused (outside the repository)")
    parser.add_argument("--arch", default="sd15", help="a folder of models/configs/")
    parser.add_argument("--backends", default="ort,openvino")
    parser.add_argument("--rows", default=",".join(ROWS))
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--runs", type=int, default=3, help="residual-cost: pairs of calls")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--child", choices=("prepare", *ROWS), help=argparse.SUPPRESS)
    parser.add_argument("--backend", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
        print(json.dumps(child(args)))
        return
    macs = run_child(args, "prepare", "")
    rows = [run_child(args, row, backend) for backend in args.backends.split(",")
            for row in args.rows.split(",")]
    print(table(rows, macs))
    if args.json:
        from sdrt.benchmarks.bench import machine_facts

        report = {"machine": machine_facts(), "options": vars(args) | {"cache": str(args.cache)},
                  "parent_peak_rss_gib": _peak_gib(), "macs": macs, "rows": rows}
        args.json.write_text(json.dumps(report, indent=2, default=str) + "\n", "utf-8")


if __name__ == "__main__":
    main()
