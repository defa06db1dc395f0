"""What every generating command does around the pipeline: plan memory before loading, load,
show progress, and save the images with their metadata."""

from __future__ import annotations

from pathlib import Path

import click

from sdrt.cli.options import RunOptions


def plan_run(model, run: RunOptions, request):
    """The memory plan for `request` on an opened model folder (runtime/memory/plan.py), or None
    after printing it for --dry-run; says so on stderr when the plan switches to low-memory."""
    from sdrt.runtime.memory.plan import describe, plan_generation

    check_loras(run, request.loras)
    plan = plan_generation(model, request, low_memory=run.memory.low_memory,
                           budget=run.memory.budget())
    if run.memory.dry_run:
        click.echo(f"{choice_line(model)}\n{describe(plan)}")
        return None
    if plan.low_memory and not run.memory.low_memory:
        click.echo(f"switching to --low-memory: {plan.reason}", err=True)
    return plan


def choice_line(model) -> str:
    """What runs an opened model, and why where "auto" chose it (the --dry-run line)."""
    why = f" ({model.choice.reason})" if model.choice is not None else ""
    return f"runs on: {model.backend} {model.precision}{why}"


def check_loras(run: RunOptions, loras) -> None:
    """Each --lora found (a file, or a name in --lora-dir) before a model loads; the pipeline
    reads the files themselves when it runs them."""
    from sdrt.runtime.adapters.library import LoraLibrary

    if not loras:
        return
    library = LoraLibrary(run.lora_dir)
    for lora in loras:
        library.resolve(lora.name)


def load_pipeline(model, run: RunOptions, request):
    """The pipeline `request` runs on, from an opened model folder (runtime/model/opened.py)
    loaded as its memory plan says; None for --dry-run."""
    from sdrt.runtime.pipeline import Pipeline

    plan = plan_run(model, run, request)
    if plan is None:
        return None
    return Pipeline.load(model, **run.load_options(plan.low_memory),
                         deepcache=run.deepcache is not None)


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


def save_all(paths: list[Path], results) -> None:
    """Write each result's PNG with its A1111 `parameters` metadata."""
    from sdrt.runtime.metadata import save_png

    for path, result in zip(paths, results, strict=True):
        save_png(result.image, path, result.info)
        click.echo(f"saved {path}  (seed {result.info.seed})")
