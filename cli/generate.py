"""`sdrt generate`: text to image, optionally in A1111's two hires passes or finished by an
SDXL refiner."""

from __future__ import annotations

from pathlib import Path

import click

from sdrt.cli.control_options import control_options
from sdrt.cli.errors import reports_errors
from sdrt.cli.hires_options import hires_options
from sdrt.cli.options import RunOptions, request_options, run_options
from sdrt.cli.prompt_options import prompt_options
from sdrt.cli.running import StepProgress, output_paths, plan_run, save_all


@click.command()
@click.argument("prompt")
@request_options(sized=False)
@run_options
@prompt_options
@hires_options
@control_options(needs_image=True)
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
@reports_errors
def generate(prompt: str, model_dir: Path, output: Path, run: RunOptions,
             refiner_dir: Path | None, refiner_start: float | None, skip_layers: str | None,
             skip_layer_scale: float | None, **options) -> None:
    """Generate images from PROMPT; each PNG carries A1111 `parameters` metadata."""
    from sdrt.runtime.errors import InputError
    from sdrt.runtime.model.opened import OpenedModel
    from sdrt.runtime.pipeline import GenerationRequest, Pipeline
    from sdrt.runtime.refiner import DEFAULT_REFINER_START, check_refiner_start, refine

    if refiner_start is not None and refiner_dir is None:
        raise InputError("--refiner-start needs --refiner (an SDXL refiner folder)")
    if run.deepcache is not None and refiner_dir is not None:
        raise InputError("--deepcache does not combine with --refiner")
    if "hires" in options and refiner_dir is not None:
        raise InputError("the hires fix (--hires-*) does not combine with --refiner")
    if "controls" in options and refiner_dir is not None:
        raise InputError("--controlnet does not combine with --refiner")
    refiner_start = check_refiner_start(
        DEFAULT_REFINER_START if refiner_start is None else refiner_start)
    if skip_layers is not None:
        options["skip_layers"] = _int_list(skip_layers, "--skip-layers")
    if skip_layer_scale is not None:
        options["skip_layer_scale"] = skip_layer_scale
    request = GenerationRequest(prompt=prompt, deepcache=run.deepcache, generator=run.generator,
                                **options)
    paths = output_paths(output, request.num_images)  # fail on a bad -o before loading a model
    model = OpenedModel.open(model_dir, run.backend, run.precision,  # read once, here
                             **run.needs(request.loras))
    plan = plan_run(model, run, request)
    if plan is None:  # --dry-run
        return
    load = run.load_options(plan.low_memory)
    pipe = Pipeline.load(model, **load, deepcache=run.deepcache is not None)
    refiner = None if refiner_dir is None else Pipeline.load(refiner_dir, **load)
    with StepProgress(request.steps) as progress:
        results = pipe.run(request, callback=progress.update) if refiner is None \
            else refine(pipe, refiner, request, refiner_start, callback=progress.update)
    save_all(paths, results)


def _int_list(text: str, option: str) -> tuple[int, ...]:
    from sdrt.runtime.errors import InputError

    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise InputError(f"{option} must be comma-separated integers, got {text!r}") from None
