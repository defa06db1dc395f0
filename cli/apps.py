"""The long-running apps over one or many generations: `sdrt serve` (A1111's HTTP API,
runtime/server/) and `sdrt batch` (a JSONL file of jobs, runtime/batch/).

Both take the shared run options: serve loads its one pipeline with them, planned for one image
at the model's native size; batch gives its backend, precision and generator to jobs that name
none, plans memory for each job's size and loads every worker's pipelines as that plan says.
The prompt and LoRA options (--lora, --prompt-syntax, --emphasis) apply to every request serve
answers, and are the defaults of batch jobs that name none.
"""

from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path

import click
from click.core import ParameterSource

from sdrt.cli.errors import reports_errors
from sdrt.cli.options import DEFAULT_GENERATOR, RunOptions, model_option, run_options
from sdrt.cli.prompt_options import prompt_options
from sdrt.runtime.server import settings as serve_defaults


@click.command()
@model_option()
@click.option("--host", default=serve_defaults.DEFAULT_HOST, show_default=True,
              help="Address to listen on; any but loopback needs --token.")
@click.option("--port", default=serve_defaults.DEFAULT_PORT, show_default=True,
              help="TCP port (A1111's by default).")
@click.option("--token", envvar="SDRT_TOKEN", default=None,
              help="Require this token (Authorization: Bearer TOKEN, or HTTP Basic with it as "
                   "password) on every API call; env SDRT_TOKEN keeps it out of `ps`.")
@click.option("--api-auth", envvar="SDRT_API_AUTH", default=None, metavar="USER:PASS[,...]",
              help="Require HTTP Basic credentials on every API call, as A1111's --api-auth "
                   "(besides --token, if given); env SDRT_API_AUTH keeps them out of `ps`.")
@click.option("--max-queue", default=serve_defaults.DEFAULT_MAX_QUEUE, show_default=True,
              type=click.IntRange(min=0),
              help="Requests that may wait for a worker, served in arrival order (A1111 "
                   "queues without bound); more get 429 + Retry-After.")
@click.option("--styles", "styles_file", type=click.Path(path_type=Path), default=None,
              help="Prompt styles in A1111's styles.csv format (name,prompt,negative_prompt), "
                   "listed by /sdapi/v1/prompt-styles and applied by a request's `styles`.")
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
@click.option("--models-dir", type=click.Path(path_type=Path), default=None,
              help="Folder of exported models (one per subfolder, or NAME/onnx/) that clients "
                   "list and switch between (sd_model_checkpoint); one is loaded at a time. "
                   "--model then names the first (default: the first by name).")
@click.option("--controlnet-dir", type=click.Path(path_type=Path), default=None,
              help="Folder of exported ControlNets (one per subfolder) that requests' "
                   "alwayson_scripts.controlnet units name, titled \"name [hash]\" as the A1111 "
                   "ControlNet extension lists them (/controlnet/model_list).")
@run_options
@prompt_options
@reports_errors
def serve(model_dir: Path, models_dir: Path | None, controlnet_dir: Path | None,
          run: RunOptions, cors_origins: tuple[str, ...], api_auth: str | None,
          styles_file: Path | None, **limits) -> None:
    """Serve AUTOMATIC1111's HTTP API (/sdapi/v1/txt2img, img2img, progress, ...) and a
    kiosk web page at / (needs the serve extra: pip install 'sdrt[serve]').

    Binds loopback unless --host says otherwise, which then needs --token. Access log: one
    JSON line per request on stderr. The memory plan (--max-memory, --dry-run) is for one
    image at the model's native size.
    """
    from sdrt.cli.running import load_pipeline
    from sdrt.runtime.control.library import ControlLibrary
    from sdrt.runtime.errors import InputError
    from sdrt.runtime.model.opened import OpenedModel
    from sdrt.runtime.pipeline import GenerationRequest
    from sdrt.runtime.server.app import serve as serve_app
    from sdrt.runtime.server.models import ModelHost, first_model
    from sdrt.runtime.server.settings import ServerSettings, parse_api_auth
    from sdrt.runtime.server.styles import read_styles

    run.refuse_deepcache("serve", "the API has no DeepCache field")
    if run.generator != DEFAULT_GENERATOR:
        raise InputError(f"--generator {run.generator} does not apply to serve: the API's noise "
                         f"is {DEFAULT_GENERATOR}'s (A1111's CPU RNG)")
    settings = ServerSettings(cors_origins=cors_origins, api_auth=parse_api_auth(api_auth),
                              styles=read_styles(styles_file) if styles_file else (),
                              **limits)
    settings.validate()  # before loading a model: a refused bind costs nothing
    controls = ControlLibrary.open(controlnet_dir) if controlnet_dir is not None else None
    if models_dir is not None:
        given = click.get_current_context().get_parameter_source("model_dir")
        model_dir = first_model(models_dir, None if given is ParameterSource.DEFAULT
                                else model_dir)
    model = OpenedModel.open(model_dir, run.backend, run.precision,
                             **run.needs(limits.get("loras", ())))
    every = GenerationRequest(prompt="", **settings.request_fields())
    pipe = load_pipeline(model, run, every)
    if pipe is None:  # --dry-run
        return
    if pipe.adapters is not None:  # --lora files read and checked before listening
        pipe.adapters.uses(every)
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    warnings.showwarning = _log_warning
    for name in ("sdrt.access", "sdrt.runtime.server.jobs", "uvicorn.error"):
        logging.getLogger(name).setLevel(logging.INFO)
        logging.getLogger(name).addHandler(handler)
        logging.getLogger(name).propagate = False
    host = ModelHost(pipe, models_dir, lambda folder: load_pipeline(  # the same run options
        OpenedModel.open(folder, run.backend, run.precision,
                         **run.needs(limits.get("loras", ()))), run, every))
    del pipe, model  # the host alone holds the model: a switch can release it
    serve_app(host, settings, controls)


def _log_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings go to the server log as their kind and text, without the source path and
    line Python's default format adds (a path in a log is a path an operator may publish)."""
    logging.getLogger("uvicorn.error").warning("%s: %s", category.__name__, message)


@click.command()
@click.argument("jobs", type=click.Path(path_type=Path))
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path),
              help="Folder for the PNGs (JOB_ID.png) and results.jsonl; a re-run skips jobs "
                   "whose PNG is there and verifies.")
@model_option("Model folder of the jobs that name none (default: sdrt's embedded 64×64 shapes "
              "model).", default=None)
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
                   "/ --workers. --threads says the same.")
@run_options
@prompt_options
@reports_errors
def batch(jobs: Path, out_dir: Path, model_dir: Path | None, engine: str,
          ray_address: str | None, workers: int, threads_per_worker: int | None,
          run: RunOptions, **prompt_fields) -> None:
    """Generate one PNG per line of JOBS, a JSONL file of jobs, into --out.

    \b
    Each line is a JSON object; every field but prompt is optional:
      {"id": "cat-1", "prompt": "a cat", "negative_prompt": "blurry", "seed": 42,
       "size": "512x512" (or "width"/"height"), "steps": 20, "guidance_scale": 7.5,
       "sampler": "euler_a", "generator": "torch", "model": "./sd15-onnx",
       "backend": "ort", "precision": "fp32", "loras": [["style", 0.8]],
       "prompt_syntax": "a1111", "emphasis": "original"}

    The id (default: the line number, 00001) names the PNG. A bad line is reported with its
    number and skipped; every finished job appends a line to results.jsonl (id, file, seed,
    timings, worker). Exits 1 when a line was bad or a job failed, after running the others.
    --model, --backend, --precision, --generator, --lora, --prompt-syntax and --emphasis are
    the defaults of jobs that name none; a job's LoRA names are looked up in --lora-dir. The
    memory plan is made for each job's size before any runs (--dry-run prints it).
    """
    from sdrt.runtime.batch.runner import run_batch
    from sdrt.runtime.errors import InputError

    run.refuse_deepcache("batch", "a job has no DeepCache field")
    if threads_per_worker is not None and run.threads not in (None, threads_per_worker):
        raise InputError("--threads and --threads-per-worker say the same; give one")
    defaults = {"backend": run.backend, "precision": run.precision, "generator": run.generator,
                **({} if model_dir is None else {"model": str(model_dir)}), **prompt_fields}
    if "loras" in defaults:  # as a job writes them
        defaults["loras"] = [[lora.name, lora.te, lora.unet] for lora in defaults["loras"]]
    low_memory = _plan_batch(jobs, defaults, run)
    if low_memory is None:  # --dry-run
        return

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
                       threads_per_worker=threads_per_worker or run.threads,
                       ray_address=ray_address, on_result=show, defaults=defaults,
                       load=run.device_options(low_memory))
    counts = report.counts
    click.echo(f"{counts['done']} done, {counts['skipped']} kept, {counts['failed']} failed, "
               f"{counts['invalid']} bad lines; results: {report.results_file}")
    if not report.ok:
        sys.exit(1)


def _plan_batch(jobs: Path, defaults: dict, run: RunOptions) -> bool | None:
    """Whether the workers load in low-memory mode, from the memory plan of each job's model and
    size (one `error:` line when a job cannot fit the budget); None after printing the plans for
    --dry-run. Bad lines are left to the run, which reports each."""
    from sdrt.runtime.batch.runner import read_jobs
    from sdrt.runtime.errors import InputError
    from sdrt.runtime.memory.plan import describe, plan_generation
    from sdrt.runtime.model.opened import OpenedModel

    checked, _ = read_jobs(jobs, defaults, run.adapter_options())
    shapes: dict[tuple, list] = {}  # jobs alike for the estimate share one plan
    for job in checked:
        req = job.request
        shapes.setdefault((*job.key[:3], req.width, req.height, req.guidance_scale),
                          []).append(job)
    switched = None
    for (model, backend, precision, width, height, _), alike in shapes.items():
        first = alike[0]
        try:
            plan = plan_generation(OpenedModel.open(Path(model), backend, precision),
                                   first.request, low_memory=run.memory.low_memory,
                                   budget=run.memory.budget())
        except InputError as exc:
            raise InputError(f"job {first.id} (line {first.line}): {exc}") from None
        if run.memory.dry_run:
            ids = ", ".join(job.id for job in alike)
            why = f"; {first.choice}" if first.choice else ""
            click.echo(f"{model} ({backend} {precision}{why}) {width}×{height}: jobs {ids}\n"
                       f"{describe(plan)}")
        elif plan.low_memory and switched is None:
            switched = plan.reason
    if run.memory.dry_run:
        return None
    if switched is not None and not run.memory.low_memory:
        click.echo(f"switching to --low-memory: {switched}", err=True)
    return run.memory.low_memory or switched is not None
