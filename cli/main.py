"""The `sdrt` command line (click).

Heavy modules are imported inside the command that needs them, so `sdrt --help` is instant and
`sdrt generate` never imports torch. Errors of sdrt's own types print as one line and exit 1;
`--verbose` shows the traceback too.
"""

from __future__ import annotations

import functools
import logging
import sys
from pathlib import Path

import click

from sdrt.cli.memory_options import MemoryOptions, memory_options
from sdrt.runtime.errors import SdrtError
from sdrt.runtime.model.families import FAMILIES
from sdrt.runtime.model.folder import EMBEDDED_MODEL
from sdrt.runtime.model.variants import PRECISIONS
from sdrt.runtime.server import settings as serve_defaults

log = logging.getLogger("sdrt")
SIZE_HELP = "Pixels; default: the model's native size (768 for SD 2.x 768-v, else 512)."


def family_defaults(field: str) -> str:
    """Help text listing each model family's default for one generation field."""
    return ", ".join(f"{family.title} {getattr(family, field):g}" for family in FAMILIES.values())


def output_paths(output: Path, count: int) -> list[Path]:
    """Where `count` images go: `-o x.png` (x-1.png, x-2.png, … if several) or a numbered folder."""
    if output.suffix.lower() == ".png":
        output.parent.mkdir(parents=True, exist_ok=True)
        if count == 1:
            return [output]
        return [output.with_name(f"{output.stem}-{i + 1}.png") for i in range(count)]
    if output.exists() and not output.is_dir():
        raise click.BadParameter(f"'{output}' exists and is not a folder", param_hint="-o")
    output.mkdir(parents=True, exist_ok=True)
    taken = [int(p.stem) for p in output.glob("*.png") if p.stem.isdigit()]
    start = max(taken, default=0) + 1  # never overwrite earlier work in the folder
    return [output / f"{start + i:05d}.png" for i in range(count)]


class StepProgress:
    """A tqdm bar fed by the pipeline's step callback."""

    def __init__(self, total: int | None) -> None:
        from tqdm import tqdm

        self._bar = tqdm(total=total, unit="step", leave=False, disable=None)

    def __enter__(self) -> StepProgress:
        return self

    def __exit__(self, *exc) -> None:
        self._bar.close()

    def update(self, step: int, total: int, latents) -> None:
        self._bar.total = total
        self._bar.update(step + 1 - self._bar.n)


def _reports_errors(command):
    """Turn SdrtError (and a missing optional dependency) into `error: ...` and exit 1."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        verbose = click.get_current_context().find_root().params.get("verbose", False)
        try:
            return command(*args, **kwargs)
        except (SdrtError, ModuleNotFoundError) as exc:
            if verbose:
                raise
            message = str(exc)
            if isinstance(exc, ModuleNotFoundError):
                message = _missing_package(exc.name or "")
            click.echo(f"error: {message}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)

    return wrapper


# The pyproject extra that installs each optional package a command may import.
_EXTRA_OF = {"openvino": "openvino", "nncf": "openvino", "onnx": "quantize",
             "ray": "ray", "grpc": "ray",  # grpc: ray:// addresses (Ray Client)
             **dict.fromkeys(("fastapi", "starlette", "uvicorn", "prometheus_client"), "serve")}


def _missing_package(module: str) -> str:
    """What to install when an optional dependency is missing."""
    package = module.split(".")[0]
    extra = _EXTRA_OF.get(package, "export")
    torch_first = "torch==2.13.0 " if extra == "export" else ""
    return (f"this command needs the '{package}' package; install the extra: "
            f"pip install {torch_first}'sdrt[{extra}]'")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Log details and show tracebacks on errors.")
@click.version_option(package_name="sdrt")
def main(verbose: bool) -> None:
    """sdrt: Stable Diffusion on CPUs and small GPUs, from exported ONNX/OpenVINO graphs.

    \b
    Typical use:
      sdrt export ./stable-diffusion-v1-5 ./sd15-onnx     # once, needs the export extra
      sdrt generate "a lighthouse at dusk" --model ./sd15-onnx
    """
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")


@main.command()
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
@_reports_errors
def export(source: str, out_dir: Path, opset: int, force: bool, family: str | None,
           config: str | None, allow_pickle: bool, revision: str | None,
           cache_dir: Path | None, loras: tuple[Path, ...], lora_scales: tuple[float, ...],
           default_steps: int | None, default_guidance: float | None,
           default_sampler: str | None, attention: str) -> None:
    """Export SOURCE to ONNX (optimum's layout) in OUT_DIR.

    SOURCE is a diffusers SD 1.x/2.x/XL or LCM folder, an A1111/civitai single-file checkpoint
    (.safetensors; .ckpt with --allow-pickle), or a Hugging Face hub id ORG/NAME, taken from the
    cache when HF_HUB_OFFLINE is set.
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


VAE_HELP = ("A tiny autoencoder folder (TAESD; `sdrt export` of an AutoencoderTiny) that decodes "
            "(and encodes) in the model's VAE's place: much faster, approximate.")


def _generation_options(sized: bool | None):
    """The options every generating command shares: -W/-H unless `sized` is None; True says in
    their help how an input image is sized."""
    size_help = SIZE_HELP if not sized else (
        "Pixels; default: IMAGE's size rounded down to a multiple of 8 (with one of -W/-H the "
        "other keeps IMAGE's aspect ratio); IMAGE is resized (Lanczos) to the output size.")
    options = [
        click.option("--model", "model_dir", default=EMBEDDED_MODEL,
                     type=click.Path(path_type=Path),
                     help="Exported model folder (see `sdrt export`); default: sdrt's embedded "
                          "64×64 shapes model (models/embedded/)."),
        click.option("-n", "--negative-prompt", default="",
                     help="What the image should not show."),
        click.option("--steps", type=int, default=None,
                     help="Sampler steps; default: the model family's "
                          f"({family_defaults('steps')})."),
        click.option("--guidance-scale", "--cfg-scale", "guidance_scale", type=float,
                     default=None,
                     help="Classifier-free guidance (≤ 1 runs the UNet once per step), or an "
                          "LCM UNet's guidance input (always one call per step); default: the "
                          f"model family's ({family_defaults('guidance_scale')})."),
        click.option("--sampler", default=None,
                     help="ddim, pndm, euler, euler_a, dpmpp_2m, dpmpp_2m_karras, lcm (A1111 "
                          "names too); default: the model family's, else the model folder's own "
                          "scheduler."),
        click.option("--seed", type=int, default=None,
                     help="Seed of the first image; image i uses seed+i."),
        *([click.option("-W", "--width", type=int, default=None, help=size_help),
           click.option("-H", "--height", type=int, default=None, help=size_help)]
          if sized is not None else []),
        click.option("--num-images", default=1, show_default=True, help="Images to make."),
        click.option("--backend", default="ort", show_default=True, help="ort or openvino."),
        click.option("--precision", default="fp32", show_default=True,
                     help=f"{', '.join(PRECISIONS)}: a variant `sdrt quantize` listed for this "
                          "backend."),
        click.option("--generator", default="torch", show_default=True,
                     help="torch (same starting noise as diffusers on CPU) or numpy."),
        click.option("--threads", type=int, default=None,
                     help="Backend threads (default: all cores)."),
        click.option("--vae", type=click.Path(path_type=Path), default=None,
                     help=VAE_HELP),
        click.option("-o", "--output", type=click.Path(path_type=Path),
                     default=Path("outputs"), show_default=True,
                     help="A .png file, or a folder to number images in."),
    ]

    def apply(command):
        for option in reversed(options):
            command = option(command)
        return command

    return apply


def _save_all(paths: list[Path], results) -> None:
    from sdrt.runtime.metadata import save_png

    for path, result in zip(paths, results, strict=True):
        save_png(result.image, path, result.info)
        click.echo(f"saved {path}  (seed {result.info.seed})")


@main.command()
@click.argument("prompt")
@_generation_options(sized=False)
@memory_options
@click.option("--refiner", "refiner_dir", type=click.Path(path_type=Path), default=None,
              help="An exported SDXL refiner folder: the base model stops at --refiner-start "
                   "of the schedule and the refiner finishes and decodes (diffusers' "
                   "denoising_end / denoising_start).")
@click.option("--refiner-start", type=float, default=None,
              help="Fraction of the schedule the base model denoises before the refiner, in "
                   "(0, 1); default 0.8.")
@click.option("--skip-layers", default=None,
              help="SD 3: skip-layer guidance over these joint blocks, e.g. 7,8,9 (an extra "
                   "conditional pass on the steps between 1% and 20% of the run).")
@click.option("--skip-layer-scale", type=float, default=None,
              help="SD 3: skip-layer guidance scale; default 2.8 (diffusers').")
@click.option("--deepcache", type=int, default=None,
              help="DeepCache interval N: the full UNet on every N-th call, only its shallow "
                   "branch on a cached deep feature between (make the graphs with `python -m "
                   "sdrt.export.deepcache MODEL`).")
@_reports_errors
def generate(prompt: str, model_dir: Path, output: Path, threads: int | None, backend: str,
             precision: str, memory: MemoryOptions, refiner_dir: Path | None,
             refiner_start: float | None, skip_layers: str | None,
             skip_layer_scale: float | None, deepcache: int | None, **options) -> None:
    """Generate images from PROMPT; each PNG carries A1111 `parameters` metadata."""
    from sdrt.cli.memory_options import describe, plan_generation
    from sdrt.runtime.errors import InputError
    from sdrt.runtime.pipeline import GenerationRequest, Pipeline
    from sdrt.runtime.refiner import DEFAULT_REFINER_START, check_refiner_start, refine

    if refiner_start is not None and refiner_dir is None:
        raise InputError("--refiner-start needs --refiner (an SDXL refiner folder)")
    if deepcache is not None and refiner_dir is not None:
        raise InputError("--deepcache does not combine with --refiner")
    refiner_start = check_refiner_start(
        DEFAULT_REFINER_START if refiner_start is None else refiner_start)
    if skip_layers is not None:
        options["skip_layers"] = _int_list(skip_layers, "--skip-layers")
    if skip_layer_scale is not None:
        options["skip_layer_scale"] = skip_layer_scale
    vae = options.pop("vae")
    request = GenerationRequest(prompt=prompt, deepcache=deepcache, **options)
    paths = output_paths(output, request.num_images)  # fail on a bad -o before loading a model
    plan = plan_generation(model_dir, backend, precision, request, memory)
    if memory.dry_run:
        click.echo(describe(plan))
        return
    if plan.low_memory and not memory.low_memory:
        click.echo(f"switching to --low-memory: {plan.reason}", err=True)
    load = {"backend": backend, "threads": threads, "precision": precision,
            "low_memory": plan.low_memory, "device": memory.device,
            "vram_limit": memory.vram_limit, "vae": vae}
    pipe = Pipeline.load(model_dir, **load, deepcache=deepcache is not None)
    refiner = None if refiner_dir is None else Pipeline.load(refiner_dir, **load)
    with StepProgress(request.steps) as progress:
        results = pipe.run(request, callback=progress.update) if refiner is None \
            else refine(pipe, refiner, request, refiner_start, callback=progress.update)
    _save_all(paths, results)


def _int_list(text: str, option: str) -> tuple[int, ...]:
    from sdrt.runtime.errors import InputError

    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise InputError(f"{option} must be comma-separated integers, got {text!r}") from None


STRENGTH_HELP = ("Denoising strength in [0, 1]: the run makes the last int(steps × strength) of "
                 "--steps steps from IMAGE's latents noised to that level; 0 returns IMAGE "
                 "unchanged, 1 generates afresh.")
MASK_BLUR_HELP = "Feather the mask by a Gaussian of this many pixels (A1111's mask blur)."


def _image_command(image: Path, mask: Path | None, prompt: str, model_dir: Path, output: Path,
                   threads: int | None, backend: str, precision: str, width: int | None,
                   height: int | None, input_options: dict, options: dict) -> None:
    """img2img and inpaint: read the inputs and check -o before loading the model, then run."""
    from sdrt.runtime.images import read_image, read_mask
    from sdrt.runtime.pipeline import Pipeline

    picture = read_image(image)
    drawn = None if mask is None else read_mask(mask)
    paths = output_paths(output, options["num_images"])
    pipe = Pipeline.load(model_dir, backend=backend, threads=threads, precision=precision,
                         vae=options.pop("vae"))
    init = pipe.image_input(picture, drawn, width=width, height=height, **input_options)
    request = pipe.request_for(init, prompt, **options)
    with StepProgress(request.steps) as progress:
        results = pipe.run(request, callback=progress.update, init=init)
    _save_all(paths, results)


@main.command()
@click.argument("image", type=click.Path(path_type=Path))
@click.argument("prompt")
@click.option("--strength", type=float, default=0.75, show_default=True, help=STRENGTH_HELP)
@_generation_options(sized=True)
@_reports_errors
def img2img(image: Path, prompt: str, strength: float, model_dir: Path, output: Path,
            threads: int | None, backend: str, precision: str, width: int | None,
            height: int | None, **options) -> None:
    """Repaint IMAGE after PROMPT (image-to-image, diffusers' StableDiffusionImg2ImgPipeline).

    IMAGE is read with its EXIF orientation, transparency flattened onto white, and sized as
    -W/-H say; sides must end up between 8 and 2048 pixels.
    """
    _image_command(image, None, prompt, model_dir, output, threads, backend, precision, width,
                   height, {"strength": strength}, options)


@main.command()
@click.argument("image", type=click.Path(path_type=Path))
@click.argument("mask", type=click.Path(path_type=Path))
@click.argument("prompt")
@click.option("--strength", type=float, default=1.0, show_default=True, help=STRENGTH_HELP)
@click.option("--mask-blur", type=float, default=4, show_default=True, help=MASK_BLUR_HELP)
@click.option("--paste-back/--no-paste-back", default=True, show_default=True,
              help="Put IMAGE's own pixels back outside the feathered mask (A1111's overlay).")
@_generation_options(sized=True)
@_reports_errors
def inpaint(image: Path, mask: Path, prompt: str, strength: float, mask_blur: float,
            paste_back: bool, model_dir: Path, output: Path, threads: int | None, backend: str,
            precision: str, width: int | None, height: int | None, **options) -> None:
    """Repaint IMAGE where MASK is white after PROMPT (inpainting).

    MASK must be IMAGE's size (transparent counts as black = keep). Inpainting models (9-channel
    UNet) get the mask and masked image as inputs; other models blend the original back into
    the latents outside the mask after every step, as diffusers does.
    """
    _image_command(image, mask, prompt, model_dir, output, threads, backend, precision, width,
                   height, {"strength": strength, "mask_blur": mask_blur,
                            "paste_back": paste_back}, options)


@main.command()
@click.argument("image", type=click.Path(path_type=Path))
@click.argument("prompt")
@click.option("--left", type=int, default=0, show_default=True, help="Pixels to add on the left.")
@click.option("--right", type=int, default=0, show_default=True, help="Pixels to add on the right.")
@click.option("--top", type=int, default=0, show_default=True, help="Pixels to add on top.")
@click.option("--bottom", type=int, default=0, show_default=True, help="Pixels to add below.")
@click.option("--strength", type=float, default=1.0, show_default=True,
              help="Denoising strength of the new area (below 1 it starts from the pre-fill).")
@click.option("--mask-blur", type=float, default=4, show_default=True, help=MASK_BLUR_HELP)
@click.option("--fill", type=click.Choice(["edge", "mirror"]), default="edge", show_default=True,
              help="Pre-fill of the new area: IMAGE's edge pixels stretched, or mirrored; "
                   "blurred.")
@_generation_options(sized=None)
@_reports_errors
def outpaint(image: Path, prompt: str, left: int, right: int, top: int, bottom: int,
             strength: float, mask_blur: float, fill: str, model_dir: Path, output: Path,
             threads: int | None, backend: str, precision: str, **options) -> None:
    """Extend IMAGE's canvas and paint the new area after PROMPT (outpainting).

    Canvases larger than the model's native size are painted in overlapping windows of that
    size; the seam with IMAGE is repainted and feathered.
    """
    from sdrt.runtime.images import read_image
    from sdrt.runtime.outpaint import Extension
    from sdrt.runtime.outpaint import outpaint as outpaint_image
    from sdrt.runtime.pipeline import Pipeline

    picture = read_image(image)
    paths = output_paths(output, options["num_images"])
    pipe = Pipeline.load(model_dir, backend=backend, threads=threads, precision=precision,
                         vae=options.pop("vae"))
    with StepProgress(None) as progress:
        results = outpaint_image(pipe, picture, prompt, Extension(left, right, top, bottom),
                                 strength=strength, mask_blur=mask_blur, fill=fill,
                                 callback=progress.update, **options)
    _save_all(paths, results)


@main.command()
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.option("--precision", required=True,
              help="fp16 (weights), bf16 (OpenVINO execution, no new files), int8, int8-hybrid "
                   "(OpenVINO: UNet activations too), int4 (OpenVINO, group-wise weights).")
@click.option("--backend", default=None,
              help="ort or openvino; default: ort where it makes the precision, else openvino.")
@click.option("--components", default=None,
              help="Comma-separated graphs, e.g. unet,text_encoder; default: the text encoder(s) "
                   "and the UNet (the VAE decoder stays fp32 unless named here and gated).")
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
@_reports_errors
def quantize(model_dir: Path, precision: str, backend: str | None, components: str | None,
             prompt_set: str, steps: int | None, size: int | None, adherence: int | None,
             force: bool) -> None:
    """Make a PRECISION variant of MODEL_DIR's graphs, gate it against fp32, list it if it passes.

    A variant that fails its gate is removed and not listed; the command then exits 1.
    """
    from sdrt.quantize.stage import QuantizeOptions, quantize_model

    options = QuantizeOptions(
        precision=precision, backend=backend, prompt_set=prompt_set, steps=steps, size=size,
        adherence=adherence, force=force,
        components=tuple(components.split(",")) if components else None)
    entry = quantize_model(model_dir, options)
    click.echo(f"listed {entry['precision']} ({entry['backend']}) in {model_dir / 'manifest.json'}"
               f": {entry['gate']['summary']}")


@main.command()
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
@_reports_errors
def bench(model_dir: Path, backend: str, precision: str, steps: int | None, width: int | None,
          height: int | None, threads: int | None, num_runs: int, scenarios: str | None,
          json_path: Path | None, plot: Path | None, vae: Path | None,
          deepcache: int | None) -> None:
    """Time each stage of MODEL_DIR: text encoder, UNet at batch 1 and 2, VAE decode and
    encode, end to end; each in a fresh process (its own peak RSS), first run apart from the
    steady-state median and p90."""
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
                                                                 err=True))
    click.echo(bench_module.table(report))
    machine = report["machine"]
    click.echo(f"{machine['cpu']} ({', '.join(machine['cpu_flags'])}), {machine['cores']} cores; "
               f"{backend} {precision}; commit {machine['git_commit']}")
    if json_path:
        json_path.write_text(json.dumps(report, indent=2) + "\n", "utf-8")
    if plot:
        from sdrt.benchmarks.chart import bar_chart

        bar_chart([(row["scenario"], row["median_s"]) for row in report["scenarios"]], plot,
                  title=f"sdrt bench {model_dir.name}: {backend} {precision} (median)", unit="s")


@main.command()
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.option("--backend", type=click.Choice(["ort", "openvino"]), default="ort",
              show_default=True,
              help="The backend whose version limits the ONNX graphs are checked against "
                   "(OpenVINO IR is always checked against OpenVINO).")
@click.option("--quick", is_flag=True,
              help="Skip the sha256 of every file against manifest.json (sizes still count).")
@_reports_errors
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


@main.command()
@click.option("--model", "model_dir", default=EMBEDDED_MODEL, type=click.Path(path_type=Path),
              help="Exported model folder; default: sdrt's embedded 64×64 shapes model.")
@click.option("--host", default=serve_defaults.DEFAULT_HOST, show_default=True,
              help="Address to listen on; any but loopback needs --token.")
@click.option("--port", default=serve_defaults.DEFAULT_PORT, show_default=True,
              help="TCP port (A1111's by default).")
@click.option("--token", envvar="SDRT_TOKEN", default=None,
              help="Require this token (Authorization: Bearer TOKEN, or HTTP Basic with it as "
                   "password) on every API call; env SDRT_TOKEN keeps it out of `ps`.")
@click.option("--max-queue", default=serve_defaults.DEFAULT_MAX_QUEUE, show_default=True,
              help="Jobs admitted at once (running + waiting); more get 429 + Retry-After.")
@click.option("--max-pixels", default=serve_defaults.DEFAULT_MAX_PIXELS, show_default=True,
              help="Largest width × height of one image.")
@click.option("--max-steps", default=serve_defaults.DEFAULT_MAX_STEPS, show_default=True,
              help="Most sampler steps a job may ask.")
@click.option("--max-batch", default=serve_defaults.DEFAULT_MAX_BATCH, show_default=True,
              help="Most images per request (batch_size × n_iter).")
@click.option("--max-body-bytes", default=serve_defaults.DEFAULT_MAX_BODY_BYTES, show_default=True,
              help="Largest request body; larger ones get 413.")
@click.option("--workers", default=1, show_default=True,
              help="Jobs generated at once (each its own thread; CPU cores are shared).")
@click.option("--cors-origin", "cors_origins", multiple=True,
              help="A web origin allowed to call the API from a browser (repeatable); "
                   "default: none (CORS off).")
@click.option("--backend", default="ort", show_default=True, help="ort or openvino.")
@click.option("--precision", default="fp32", show_default=True,
              help="A variant the model's manifest lists (sdrt quantize).")
@click.option("--threads", type=int, default=None, help="Backend threads (default: all cores).")
@click.option("--vae", type=click.Path(path_type=Path), default=None, help=VAE_HELP)
@_reports_errors
def serve(model_dir: Path, backend: str, precision: str, threads: int | None,
          cors_origins: tuple[str, ...], vae: Path | None, **limits) -> None:
    """Serve AUTOMATIC1111's HTTP API (/sdapi/v1/txt2img, img2img, progress, ...) and a
    kiosk web page at / (needs the serve extra: pip install 'sdrt[serve]').

    Binds loopback unless --host says otherwise, which then needs --token. Access log: one
    JSON line per request on stderr.
    """
    from sdrt.runtime.server.app import serve as serve_app
    from sdrt.runtime.server.settings import ServerSettings

    settings = ServerSettings(cors_origins=cors_origins, **limits)
    settings.validate()  # before loading a model: a refused bind costs nothing
    from sdrt.runtime.pipeline import Pipeline

    pipe = Pipeline.load(model_dir, backend=backend, threads=threads, precision=precision,
                         vae=vae)
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    for name in ("sdrt.access", "uvicorn.error"):
        logging.getLogger(name).setLevel(logging.INFO)
        logging.getLogger(name).addHandler(handler)
        logging.getLogger(name).propagate = False
    serve_app(pipe, settings)


@main.command()
@click.argument("jobs", type=click.Path(path_type=Path))
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path),
              help="Folder for the PNGs (JOB_ID.png) and results.jsonl; a re-run skips jobs "
                   "whose PNG is there and verifies.")
@click.option("--engine", default="local", show_default=True,
              help="local (threads in this process) or ray (actors on a Ray cluster; needs "
                   "pip install 'sdrt[ray]').")
@click.option("--ray-address", default=None,
              help="Ray cluster to join: host:port, auto, or ray://host:10001 (Ray Client); "
                   "default: RAY_ADDRESS, else a local cluster started for this batch.")
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True,
              help="Jobs generated at once: threads (local) or Ray actors, each loading its "
                   "models once.")
@click.option("--threads-per-worker", type=click.IntRange(min=1), default=None,
              help="Backend threads (and Ray CPUs) per worker; default: this machine's cores "
                   "/ --workers.")
@_reports_errors
def batch(jobs: Path, out_dir: Path, engine: str, ray_address: str | None, workers: int,
          threads_per_worker: int | None) -> None:
    """Generate one PNG per line of JOBS, a JSONL file of jobs, into --out.

    \b
    Each line is a JSON object; every field but prompt is optional:
      {"id": "cat-1", "prompt": "a cat", "negative_prompt": "blurry", "seed": 42,
       "size": "512x512" (or "width"/"height"), "steps": 20, "guidance_scale": 7.5,
       "sampler": "euler_a", "generator": "torch", "model": "./sd15-onnx",
       "backend": "ort", "precision": "fp32"}

    The id (default: the line number, 00001) names the PNG. A bad line is reported with its
    number and skipped; every finished job appends a line to results.jsonl (id, file, seed,
    timings, worker). Exits 1 when a line was bad or a job failed, after running the others.
    """
    from sdrt.runtime.batch.runner import run_batch

    def show(record: dict) -> None:
        status, where = record["status"], f"line {record['line']}"
        if status == "invalid":
            click.echo(f"{where}: skipped: {record['error']}", err=True)
        elif status == "failed":
            click.echo(f"{where} (job {record['id']}): failed: {record['error']}", err=True)
        elif status == "skipped":
            click.echo(f"kept {out_dir / record['file']}  (exists and verifies)")
        else:
            click.echo(f"saved {out_dir / record['file']}  (seed {record['seed']}, "
                       f"{record['timings']['generate_s']:.2f} s on {record['worker']})")

    report = run_batch(jobs, out_dir, engine=engine, workers=workers,
                       threads_per_worker=threads_per_worker, ray_address=ray_address,
                       on_result=show)
    counts = report.counts
    click.echo(f"{counts['done']} done, {counts['skipped']} kept, {counts['failed']} failed, "
               f"{counts['invalid']} bad lines; results: {report.results_file}")
    if not report.ok:
        sys.exit(1)
