"""The commands of the other stages: `sdrt export` (export/), `sdrt quantize` (quantize/),
`sdrt check` (a model folder's soundness) and `sdrt bench` (benchmarks/)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from sdrt.cli.errors import reports_errors
from sdrt.cli.options import VAE_HELP
from sdrt.runtime.model.families import FAMILIES


@click.command()
@click.argument("source")
@click.argument("out_dir", type=click.Path(path_type=Path))
@click.option("--opset", default=18, show_default=True, help="ONNX opset to export with.")
@click.option("--force", is_flag=True, help="Replace OUT_DIR if it exists.")
@click.option("--family", type=click.Choice(list(FAMILIES)), default=None,
              help="Record this model family instead of the one detected from the configs "
                   "(same architecture only, e.g. sd-turbo for SD-Turbo weights whose scheduler "
                   "config lacks trailing spacing, lcm-lora for SD 1.x with LCM-LoRA fused).")
@click.option("--config", default=None,
              help="For a single-file checkpoint whose weights fit several shipped configs "
                   "(models/configs/NAME, e.g. sd21 or sd_turbo; sdxl_turbo, where sdxl is "
                   "the default): the one to use.")
@click.option("--allow-pickle", is_flag=True,
              help="Read pickle weights (.ckpt/.pt/.pth/.bin) with torch.load(weights_only=True). "
                   "Pickle can run code: only for files you trust.")
@click.option("--revision", default=None,
              help="Hub branch, tag or commit (hub ids only; ORG/NAME@REV works too).")
@click.option("--cache-dir", type=click.Path(path_type=Path), default=None,
              help="Hugging Face cache folder (default: HF_HUB_CACHE, ~/.cache/huggingface/hub).")
@click.option("--lora", "loras", multiple=True, type=click.Path(path_type=Path),
              help="A LoRA .safetensors file (kohya or diffusers/peft keys) to fuse into the UNet "
                   "and text encoder(s) before export; repeatable, fused in order.")
@click.option("--lora-scale", "lora_scales", multiple=True, type=float,
              help="Strength of each --lora, in the same order (default 1).")
@click.option("--default-steps", type=click.IntRange(min=1), default=None,
              help="Record this model's default steps (default: its family's).")
@click.option("--default-guidance", type=click.FloatRange(min=0), default=None,
              help="Record this model's default guidance scale (default: its family's).")
@click.option("--default-sampler", default=None,
              help="Record this model's default sampler (default: its family's, else its "
                   "scheduler's).")
@click.option("--attention", type=click.Choice(["full", "sliced"]), default="full",
              show_default=True,
              help="sliced: the UNet's attention one head at a time, so no step holds every "
                   "head's score tensor (lower peak memory, for --low-memory).")
@reports_errors
def export(source: str, out_dir: Path, opset: int, force: bool, family: str | None,
           config: str | None, allow_pickle: bool, revision: str | None,
           cache_dir: Path | None, loras: tuple[Path, ...], lora_scales: tuple[float, ...],
           default_steps: int | None, default_guidance: float | None,
           default_sampler: str | None, attention: str) -> None:
    """Export SOURCE to ONNX (optimum's layout) in OUT_DIR.

    SOURCE is a diffusers SD 1.x/2.x/XL or LCM folder, an A1111/civitai single-file checkpoint
    (.safetensors; .ckpt with --allow-pickle), or a Hugging Face hub id ORG/NAME, taken from the
    cache when HF_HUB_OFFLINE is set. A ControlNet (a diffusers ControlNetModel folder or hub id,
    or an A1111 ControlNet .safetensors) becomes a control folder for --control.
    """
    from sdrt.export.lora import pair_scales
    from sdrt.export.onnx_export import export_pipeline
    from sdrt.export.sources import resolve_source

    fused = pair_scales(loras, lora_scales)  # a bad pairing fails before any download
    with resolve_source(source, allow_pickle=allow_pickle, cache_dir=cache_dir,
                        revision=revision, config=config, scratch=out_dir.parent) as (src, origin):
        done = export_pipeline(src, out_dir, opset=opset, force=force, family=family,
                               origin=origin, loras=fused, defaults={
                                   "steps": default_steps, "guidance_scale": default_guidance,
                                   "sampler": default_sampler}, attention=attention)
    click.echo(f"exported {source} → {done}")


@click.command()
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.option("--precision", required=True,
              help="fp16 (weights), bf16 (OpenVINO execution, no new files), int8, int8-hybrid "
                   "(OpenVINO: UNet activations too), int4 (OpenVINO, group-wise weights).")
@click.option("--backend", default=None,
              help="ort or openvino; default: ort where it makes the precision, else openvino.")
@click.option("--components", default=None,
              help="Comma-separated graphs, e.g. unet,text_encoder; default: the text encoder(s) "
                   "and the UNet (int8-hybrid: the UNet alone; bf16: the VAE decoder too, "
                   "which otherwise stays fp32 unless named here and gated).")
@click.option("--prompts", "prompt_set", default="general", show_default=True,
              help="Calibration and gate prompts: general, or scenes (sdrt's simple-scenes "
                   "captions, for the embedded model).")
@click.option("--steps", type=int, default=None,
              help="Sampler steps for calibration and gate runs; default: the family's.")
@click.option("--size", type=int, default=None,
              help="Square image side in pixels for calibration and gate runs; default: the "
                   "model's native size (a smaller one makes full-size models quick to gate).")
@click.option("--adherence", type=int, default=None,
              help="Gate prompt adherence on this many held-out simple-scenes captions; "
                   "default: 200 with --prompts scenes, else 0 (off).")
@click.option("--force", is_flag=True,
              help="Replace a variant the manifest already lists (unlisted first: if the new "
                   "one fails its gate, neither is listed).")
@click.option("--base", type=click.Path(path_type=Path), default=None,
              help="When MODEL_DIR is a ControlNet folder (fp16, bf16 or int8): the model folder "
                   "its gate generates with, fp32, the control applied.")
@reports_errors
def quantize(model_dir: Path, precision: str, backend: str | None, components: str | None,
             prompt_set: str, steps: int | None, size: int | None, adherence: int | None,
             force: bool, base: Path | None) -> None:
    """Make a PRECISION variant of MODEL_DIR's graphs, gate it against fp32, list it if it passes.

    MODEL_DIR may be a ControlNet folder (`sdrt export` of a ControlNet): its graph's variant is
    gated by generating with --base and the control applied, the control graph fp32 and then
    the variant. A variant that fails its gate is removed and not listed; the command then
    exits 1.
    """
    from sdrt.quantize.stage import QuantizeOptions, quantize_model

    options = QuantizeOptions(
        precision=precision, backend=backend, prompt_set=prompt_set, steps=steps, size=size,
        adherence=adherence, force=force, base=base,
        components=tuple(components.split(",")) if components else None)
    entry = quantize_model(model_dir, options)
    click.echo(f"listed {entry['precision']} ({entry['backend']}) in {model_dir / 'manifest.json'}"
               f": {entry['gate']['summary']}")


@click.command()
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.option("--backend", default="ort", show_default=True, help="ort or openvino.")
@click.option("--precision", default="fp32", show_default=True,
              help="A variant the folder's manifest lists (sdrt quantize).")
@click.option("--steps", type=int, default=None, help="End-to-end steps; default: the family's.")
@click.option("--width", type=int, default=None, help="Default: the model's native size.")
@click.option("--height", type=int, default=None)
@click.option("--threads", type=int, default=None, help="Backend threads (default: all cores).")
@click.option("--num-runs", type=click.IntRange(1), default=5, show_default=True,
              help="Steady-state runs per scenario, after the first run.")
@click.option("--scenarios", default=None,
              help="Comma-separated subset of: text_encoder, unet_b1, unet_b2, vae_decode, "
                   "vae_encode, end_to_end (default: all).")
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=None,
              help="Write the whole report (rows, options, machine facts) as JSON.")
@click.option("--plot", type=click.Path(path_type=Path), default=None,
              help="Write a bar chart of the steady-state medians as PNG.")
@click.option("--vae", type=click.Path(path_type=Path), default=None, help=VAE_HELP)
@click.option("--deepcache", type=click.IntRange(1), default=None,
              help="end_to_end with DeepCache at this interval N (sdrt generate --deepcache).")
@click.option("--remeasure-ceilings", is_flag=True,
              help="Measure this machine's matmul ceilings again (else measured once and "
                   "cached).")
@reports_errors
def bench(model_dir: Path, backend: str, precision: str, steps: int | None, width: int | None,
          height: int | None, threads: int | None, num_runs: int, scenarios: str | None,
          json_path: Path | None, plot: Path | None, vae: Path | None,
          deepcache: int | None, remeasure_ceilings: bool) -> None:
    """Time each stage of MODEL_DIR: text encoder, UNet at batch 1 and 2, VAE decode and
    encode, end to end; each in a fresh process (its own peak RSS), first run apart from the
    steady-state median and p90; GFLOP/s and the fraction of this machine's matmul ceiling.
    Files the unet_b2 median (a guided step) in MODEL_DIR's manifest.json for --precision
    auto."""
    import json

    from sdrt.benchmarks import bench as bench_module
    chosen = bench_module.check_request(model_dir, backend, precision, scenarios)
    if vae is not None:  # a folder that is no tiny VAE fails here, before any process starts
        from sdrt.runtime.vae.tiny import TinyVaeManifest

        TinyVaeManifest.load(vae)
    opts = bench_module.BenchOptions(str(model_dir), backend, precision, steps, width, height,
                                     threads, num_runs, vae=None if vae is None else str(vae),
                                     deepcache=deepcache)
    report = bench_module.bench(opts, chosen,
                                progress=lambda name: click.echo(f"running {name} ...",
                                                                 err=True),
                                remeasure=remeasure_ceilings)
    click.echo(bench_module.table(report))
    click.echo(bench_module.ceilings_line(report))
    machine = report["machine"]
    click.echo(f"{machine['cpu']} ({', '.join(machine['cpu_flags'])}), {machine['cores']} cores; "
               f"{backend} {precision}; commit {machine['git_commit']}")
    if report["recorded"]:
        recorded = report["recorded"]
        click.echo(f"recorded the {recorded['variant']} step ({recorded['step_s']:.3f} s at "
                   f"{'×'.join(map(str, recorded['shape']))}) in manifest.json", err=True)
    if json_path:
        json_path.write_text(json.dumps(report, indent=2) + "\n", "utf-8")
    if plot:
        from sdrt.benchmarks.chart import bar_chart

        bar_chart([(row["scenario"], row["median_s"]) for row in report["scenarios"]], plot,
                  title=f"sdrt bench {model_dir.name}: {backend} {precision} (median)", unit="s")


@click.command()
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.option("--backend", type=click.Choice(["ort", "openvino"]), default="ort",
              show_default=True,
              help="The backend whose version limits the ONNX graphs are checked against "
                   "(OpenVINO IR is always checked against OpenVINO).")
@click.option("--quick", is_flag=True,
              help="Skip the sha256 of every file against manifest.json (sizes still count).")
@reports_errors
def check(model_dir: Path, backend: str, quick: bool) -> None:
    """Check MODEL_DIR before use: components, layout, truncated or substituted files
    (git-lfs pointers, HTML pages), sha256 against manifest.json, graph versions the backend
    reads, weight paths inside the folder (symlinks too), model_index.json's class names. An
    exported tiny VAE folder (for --vae) gets the same checks where they apply.

    Prints a summary and exits 0 when the folder is sound; otherwise prints every problem found
    as one `error: ...` line (at most one per file or component) and exits 1.
    """
    from sdrt.runtime.model.check import check_model

    report = check_model(model_dir, backend=backend, hashes=not quick)
    for problem in report.problems:
        click.echo(f"error: {problem}", err=True)
    if not report.ok:
        sys.exit(1)
    for line in report.summary():
        click.echo(line)
