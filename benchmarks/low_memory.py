"""Low-memory mode figures: peak RSS of `sdrt generate` in a fresh process beside the estimate,
and the PSNR of a tiled against an untiled VAE decode.

Usage:
  python -m sdrt.benchmarks.low_memory generate MODEL [--precision int8] [--size 512]
      [--steps 1] [--low-memory] [--backend ort]     # one row: measured peak, estimate, ratio
  python -m sdrt.benchmarks.low_memory tiled-psnr MODEL [--size 1024] [--tile 48 --overlap 16]
      [--passes 3 | --statistics-downsample 2]   # split decoder: tail passes, or pooled stats
      [--no-stages]   # the split decoder's estimated statistics though stage graphs exist
  python -m sdrt.benchmarks.low_memory decode MODEL [--size 1024] [--decoder untiled]
      [--no-stages]   # peak RSS and time of one decode in a fresh process
  python -m sdrt.benchmarks.low_memory generate MODEL --unet-graph variants/X/unet/model.onnx
      --low-memory   # a UNet graph not (yet) gated and listed, measured all the same
  python -m sdrt.benchmarks.low_memory generate MODEL --deepcache 3   # DeepCache's two graphs
  python -m sdrt.benchmarks.low_memory regate MODEL --precision int8 --backend ort
      # a listed variant's gate again after its graphs were rewritten (slice_attention.py)

The peak is the child process's own ru_maxrss (os.wait4), as GNU time reports it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from sdrt.runtime.errors import SdrtError
from sdrt.runtime.memory import estimate as memory
from sdrt.runtime.memory.low_memory import map_large_allocations
from sdrt.runtime.memory.plan import plan_request
from sdrt.runtime.pipeline import GenerationRequest
from sdrt.runtime.vae.pooled_norm import SHARED_PASSES

PROMPT = "a lighthouse at dusk"
# `sdrt bench` scenario → the component it calls and its batch rows.
BENCH_CALLS = {"text_encoder": ("text_encoder", 2), "unet_b1": ("unet", 1),
               "unet_b2": ("unet", 2), "vae_decode": ("vae_decoder", 1)}


def peak_rss_of(argv: list[str]) -> tuple[int, float, str]:
    """Run argv; its peak RSS in bytes, wall seconds and the tail of its output."""
    start = time.perf_counter()
    child = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = child.stdout.read() if child.stdout else ""
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode:
        sys.exit(f"error: {' '.join(argv)} failed: {output.strip().splitlines()[-1:]}")
    return usage.ru_maxrss * 1024, time.perf_counter() - start, output.strip()[-300:]


def unlisted_variant(args: argparse.Namespace):
    """--unet-graph: a Variant whose UNet is that graph (under variants/, not listed, not gated:
    for measuring memory only), else the precision's name."""
    from sdrt.runtime.model.variants import ComponentVariant, Variant

    if not args.unet_graph:
        return args.precision
    return Variant(args.precision, args.backend, {"unet": ComponentVariant(args.unet_graph)})


def run_variant(args: argparse.Namespace) -> dict:
    """One generation in this process with an unlisted variant (the child of generate_row)."""
    from sdrt.runtime.pipeline import Pipeline

    pipe = Pipeline.load(args.model, args.backend, precision=unlisted_variant(args),
                         low_memory=args.low_memory)
    [image] = pipe.generate(PROMPT, steps=args.steps, seed=0, width=args.size, height=args.size)
    image.save(Path(args.output) / f"{Path(args.model).name}-{args.size}-variant.png")
    return {"done": True}


def generate_row(args: argparse.Namespace) -> dict:
    """Measured and estimated peak of one `sdrt generate` run (or of run_variant's)."""
    request = GenerationRequest(prompt=PROMPT, steps=args.steps, seed=0, width=args.size,
                                height=args.size, deepcache=args.deepcache)
    plan = plan_request(Path(args.model), args.backend, unlisted_variant(args), request,
                        mode="low" if args.low_memory else "default", budget=None)
    if args.unet_graph:
        peak, wall, _ = peak_rss_of([sys.executable, "-m", "sdrt.benchmarks.low_memory",
                                     "run-variant", *sys.argv[2:]])
        return _row(args, peak, wall, plan.peak)
    out = Path(args.output) / f"{Path(args.model).name}-{args.size}-lm{int(args.low_memory)}.png"
    argv = [str(Path(sys.executable).parent / "sdrt"), "generate", PROMPT, "--model", args.model,
            "--backend", args.backend, "--precision", args.precision, "--steps",
            str(args.steps), "--seed", "0", "-W", str(args.size), "-H", str(args.size),
            "--max-memory", "1T", "-o", str(out), *(["--low-memory"] if args.low_memory else []),
            *(["--deepcache", str(args.deepcache)] if args.deepcache else [])]
    peak, wall, _ = peak_rss_of(argv)
    return _row(args, peak, wall, plan.peak)


def _row(args: argparse.Namespace, peak: int, wall: float, estimate: int) -> dict:
    return {"model": Path(args.model).name, "size": args.size, "precision": args.precision,
            "unet_graph": args.unet_graph, "backend": args.backend,
            "low_memory": args.low_memory, "deepcache": args.deepcache, "steps": args.steps,
            "peak_rss_bytes": peak,
            "estimate_bytes": estimate, "estimate_over_measured": round(estimate / peak, 3),
            "within_tolerance": abs(estimate / peak - 1) <= memory.ESTIMATE_TOLERANCE,
            "wall_s": round(wall, 1)}


def scenario_estimate(name: str, model: str, backend: str, precision: str,
                      width: int | None, height: int | None,
                      deepcache: int | None = None) -> int | None:
    """The estimated peak of one `sdrt bench` scenario (its process loads the whole pipeline,
    then times one component, or generates end to end, with DeepCache's shallow graph where
    `deepcache` is set); None for the VAE encoder's."""
    from sdrt.runtime.memory.low_memory import sliced_attention
    from sdrt.runtime.model.folder import read_facts

    folder = Path(model)
    facts = read_facts(folder)
    width, height = width or facts.default_size, height or facts.default_size
    request = GenerationRequest(PROMPT, width=width, height=height,
                                deepcache=deepcache if name == "end_to_end" else None)
    found = plan_request(folder, backend, precision, request, mode="default",
                         budget=None).estimate
    if name == "end_to_end":
        return found.default_peak
    component, rows = BENCH_CALLS.get(name, (None, 0))
    if component is None:
        return None
    unet = memory.unet_shape(folder, *sliced_attention(folder))
    shapes = memory.Shapes(width, height, rows, facts.vae_scale_factor)
    return (found.base + sum(c.resident for c in found.components)
            + memory.working_bytes(component, shapes, unet))


def tiled_psnr(args: argparse.Namespace) -> dict:
    """PSNR (dB, images in [-1, 1]) of the tiled decode of seeded latents against the untiled."""
    from sdrt.runtime.components import VaeEncoder
    from sdrt.runtime.model.folder import read_facts
    from sdrt.runtime.session import open_session

    folder = Path(args.model)
    facts = read_facts(folder)
    map_large_allocations()  # the untiled 1024×1024 decode needs gigabytes: keep them bounded
    decoder, tiled_decoder, stages, split = _decoders(args)
    if args.picture:  # the latents of a seeded picture of shapes, through the folder's encoder
        encoder = VaeEncoder(open_session(folder / "vae_encoder" / "model.onnx", "ort",
                                          low_memory=True))
        latents = encoder(_shapes_picture(args.size))
    else:
        latents = _smooth_latents(facts, args.size)
    start = time.perf_counter()
    tiled = tiled_decoder(latents)
    tiled_s = time.perf_counter() - start
    start = time.perf_counter()
    full = decoder(latents)
    full_s = time.perf_counter() - start
    mse = float(np.mean((np.clip(tiled, -1, 1) - np.clip(full, -1, 1)) ** 2))
    return {"model": folder.name, "size": args.size, "tile": args.tile, "overlap": args.overlap,
            "latents": "picture" if args.picture else "smooth field",
            "statistics": ("exact (stage graphs)" if stages else "per window" if not split else
                           f"split graphs, pooled ÷{args.statistics_downsample}"
                           if args.statistics_downsample else
                           f"split graphs, {args.passes} pass(es)"),
            "psnr_db": round(10 * np.log10(4.0 / mse), 2), "tiled_s": round(tiled_s, 1),
            "untiled_s": round(full_s, 1)}


def _smooth_latents(facts, size: int) -> np.ndarray:
    """Smooth latents: a seeded field on a grid 8× coarser, upsampled bilinearly."""
    side = size // facts.vae_scale_factor
    coarse = np.random.default_rng(0).standard_normal(
        (1, facts.latent_channels, side // 8 + 1, side // 8 + 1)) / facts.scaling_factor
    return _upsample(_upsample(coarse, side, axis=2), side, axis=3).astype(np.float32)


def _decoders(args: argparse.Namespace):
    """The untiled decoder, the tiled one `args` asks for (`--no-stages`: the split decoder's
    estimated statistics even where stage graphs exist), and whether stage or split graphs
    are used; every session on ONNX Runtime, opened as the low-memory plan opens them (one
    resident at a time: runtime/low_memory.Residency)."""
    from sdrt.runtime.components import VaeDecoder
    from sdrt.runtime.memory.low_memory import Residency
    from sdrt.runtime.model.folder import read_facts
    from sdrt.runtime.vae.exact_tiled import stage_plan
    from sdrt.runtime.vae.pooled_norm import split_graphs, tiled_decoder
    from sdrt.runtime.vae.tiled import Tiling

    folder = Path(args.model)
    graph = folder / "vae_decoder" / "model.onnx"
    residency = Residency()
    opener = lambda path: residency.open_session(path, "ort")  # noqa: E731
    decoder = VaeDecoder(opener(graph))
    plan = None if args.no_stages else stage_plan(folder, graph)
    split = None if plan else split_graphs(folder, graph)
    tiled = tiled_decoder(decoder, split and tuple(opener(path) for path in split),
                          Tiling(args.tile, args.overlap), read_facts(folder).vae_scale_factor,
                          args.passes, args.statistics_downsample,
                          stages=plan and plan.open(opener))
    return decoder, tiled, plan is not None, split is not None


def decode_row(args: argparse.Namespace) -> dict:
    """Peak RSS and wall time of one decode (`--decoder`) of smooth latents in a fresh process
    (the child runs decode_run): the decode's sessions, maps and working memory."""
    peak, wall, output = peak_rss_of([sys.executable, "-m", "sdrt.benchmarks.low_memory",
                                      "decode-run", *sys.argv[2:]])
    row = json.loads(output.splitlines()[-1])
    return row | {"peak_rss_bytes": peak, "process_s": round(wall, 1)}


def decode_run(args: argparse.Namespace) -> dict:
    from sdrt.runtime.model.folder import read_facts

    map_large_allocations()
    decoder, tiled, stages, split = _decoders(args)
    run = decoder if args.decoder == "untiled" else tiled
    latents = _smooth_latents(read_facts(Path(args.model)), args.size)
    start = time.perf_counter()
    image = run(latents)
    return {"model": Path(args.model).name, "size": args.size, "decoder": args.decoder,
            "path": type(run).__name__, "stages": stages, "split": split,
            "decode_s": round(time.perf_counter() - start, 1), "shape": list(image.shape)}


def regate(args: argparse.Namespace) -> dict:
    """Gate a listed variant again, with its recorded prompts, seeds, steps and size, after its
    graphs were rewritten (export/slice_attention.py --query-chunks); its new record replaces
    the old one, or it is unlisted if it fails (QuantizeError)."""
    from dataclasses import replace

    from sdrt.quantize import gates
    from sdrt.runtime.model.manifest import Manifest
    from sdrt.runtime.model.variants import Variant

    folder = Path(args.model)
    manifest = Manifest.load(folder)
    entries = [entry for entry in manifest.variants
               if (entry["precision"], entry["backend"]) == (args.precision, args.backend)]
    if not entries:
        sys.exit(f"error: {folder.name} lists no {args.precision}-{args.backend} variant")
    old = entries[0]["gate"]
    settings = gates.GateSettings(prompts=tuple(old["prompts"]), seeds=tuple(old["seeds"]),
                                  steps=old["steps"], size=old["size"])
    try:
        record = gates.run_gate(folder, Variant.from_json(entries[0]), settings,
                                budget=memory.parse_size(args.max_memory) if args.max_memory
                                else None)
    except SdrtError:
        replace(manifest, variants=[e for e in manifest.variants if e is not entries[0]]
                ).save(folder)
        raise
    entries[0]["gate"] = record
    manifest.save(folder)
    return {"model": folder.name, "variant": f"{args.precision}-{args.backend}",
            "gate": record["summary"], "before": old["summary"]}


def _shapes_picture(size: int) -> np.ndarray:
    """(1, 3, size, size) in [-1, 1]: 40 seeded circles and squares on a blue ground."""
    from PIL import Image, ImageDraw

    picture = Image.new("RGB", (size, size), (40, 60, 160))
    draw = ImageDraw.Draw(picture)
    rng = np.random.default_rng(0)
    for i in range(40):
        x, y = rng.integers(0, size, 2).tolist()
        r = int(rng.integers(size // 50, size // 8))
        shape = draw.ellipse if i % 2 == 0 else draw.rectangle
        shape((x - r, y - r, x + r, y + r), fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    return (np.asarray(picture, np.float32) / 127.5 - 1).transpose(2, 0, 1)[None]


def _upsample(x: np.ndarray, size: int, axis: int) -> np.ndarray:
    """Linear interpolation of `x` to `size` samples along `axis` (ends kept)."""
    where = np.linspace(0, x.shape[axis] - 1, size)
    lo = np.minimum(np.floor(where).astype(int), x.shape[axis] - 2)
    shape = [1] * x.ndim
    shape[axis] = size
    weight = (where - lo).reshape(shape)
    return np.take(x, lo, axis=axis) * (1 - weight) + np.take(x, lo + 1, axis=axis) * weight


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("generate", "tiled-psnr", "decode", "regate",
                                         "run-variant", "decode-run"))
    parser.add_argument("model")
    parser.add_argument("--backend", default="ort")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--low-memory", action="store_true")
    parser.add_argument("--tile", type=int, default=48)
    parser.add_argument("--overlap", type=int, default=16)
    parser.add_argument("--statistics-downsample", type=int, default=0,
                        help="tiled-psnr: GroupNorm statistics from one untiled tail pass over "
                             "the head's features pooled by this factor (runtime/split_vae)")
    parser.add_argument("--passes", type=int, default=SHARED_PASSES,
                        help="tiled-psnr: tail passes over the split decoder (runtime/split_vae)")
    parser.add_argument("--no-stages", action="store_true",
                        help="tiled-psnr, decode: the split decoder's estimated statistics even "
                             "where the folder has stage graphs (runtime/staged_vae)")
    parser.add_argument("--decoder", choices=("tiled", "untiled"), default="tiled",
                        help="decode: the tiled decoder tiled-psnr measures, or the untiled one")
    parser.add_argument("--output", default="/tmp")
    parser.add_argument("--picture", action="store_true",
                        help="tiled-psnr: latents of a picture of shapes, not a smooth field")
    parser.add_argument("--max-memory", default=None, help="regate: the gate's memory budget")
    parser.add_argument("--unet-graph", default=None,
                        help="generate with this UNet graph (a path under variants/, unlisted)")
    parser.add_argument("--deepcache", type=int, default=None,
                        help="generate with DeepCache at this interval N (its two UNet graphs)")
    args = parser.parse_args()
    row = {"generate": generate_row, "tiled-psnr": tiled_psnr, "regate": regate,
           "run-variant": run_variant, "decode": decode_row,
           "decode-run": decode_run}[args.what](args)
    if "peak_rss_bytes" in row:
        row["peak"] = memory.format_size(row["peak_rss_bytes"])
    if "estimate_bytes" in row:
        row["estimate"] = memory.format_size(row["estimate_bytes"])
    print(json.dumps(row))


if __name__ == "__main__":
    main()
