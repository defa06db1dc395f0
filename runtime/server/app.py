"""The FastAPI app: AUTOMATIC1111's `/sdapi/v1` txt2img, img2img (generation.py), progress,
interrupt, samplers, schedulers; skip, memory, cmd-flags, png-info, upscalers, prompt-styles and
other small ones (a1111_extras.py); loras, refresh-loras and embeddings (networks.py); options,
sd-models, sd-vae and their refreshes (options.py, over models.py's ModelHost); the ControlNet
extension's units and `/controlnet/*` routes (controlnet.py); `/health`,
`/metrics` (Prometheus text), `/sdrt/v1/config`; the kiosk page at `/`.

Every error is JSON `{"error", "detail"}` with a 4xx status (or a bare 500 "internal error",
the traceback going to the server log only); nothing in a response names a filesystem path.
"""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import asynccontextmanager
from datetime import datetime
from http import HTTPStatus
from pathlib import Path

import anyio
from fastapi import APIRouter, FastAPI, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from PIL import Image
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from sdrt.runtime.control.library import ControlLibrary
from sdrt.runtime.control.unit import ControlUnit
from sdrt.runtime.errors import InputError, SdrtError, first_line
from sdrt.runtime.model.manifest import Manifest
from sdrt.runtime.pipeline import GeneratedImage, Pipeline
from sdrt.runtime.samplers import SAMPLERS, resolve_pair, schedules_for
from sdrt.runtime.schedules import SCHEDULES
from sdrt.runtime.server.a1111_extras import add_extra_routes
from sdrt.runtime.server.controlnet import (
    ControlModels,
    add_controlnet_routes,
    control_units,
    controlnet_args,
    input_limit,
)
from sdrt.runtime.server.generation import (
    build_request,
    image_inputs,
    image_response,
    server_version,
)
from sdrt.runtime.server.jobs import Job, JobQueue
from sdrt.runtime.server.middleware import (
    BASIC,
    BEARER,
    CLIENT_CLOSED,
    AccessLog,
    AuthGate,
    BodyLimit,
    Metrics,
    error_body,
)
from sdrt.runtime.server.models import ModelHost
from sdrt.runtime.server.networks import add_network_routes
from sdrt.runtime.server.options import Options, add_model_routes, override_checkpoint
from sdrt.runtime.server.postprocess import add_postprocess_routes
from sdrt.runtime.server.schemas import (
    ErrorBody,
    Health,
    ImageResponse,
    Img2ImgRequest,
    InterruptResponse,
    ProgressResponse,
    ProgressState,
    SamplerItem,
    SchedulerItem,
    ServerConfig,
    Txt2ImgRequest,
)
from sdrt.runtime.server.settings import ServerSettings

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
DISCONNECT_POLL_S = 0.5  # how often a waiting request checks that its client is still there
GRACEFUL_SHUTDOWN_S = 5  # open requests get this long to finish; then running jobs are stopped
MAX_EXAMPLE_CHARS = 300  # a placeholder line, not a document
DECODES_AT_ONCE = 2  # img2img bodies decoded in parallel: each may briefly hold a large photo
ERRORS = {status: {"model": ErrorBody} for status in (401, 413, 422, 429)}


class QueueFull(Exception):
    def __init__(self, retry_after: int) -> None:
        self.retry_after = retry_after


def create_app(pipe: Pipeline | ModelHost, settings: ServerSettings,
               controls: ControlLibrary | None = None) -> FastAPI:
    """The server's ASGI app around a loaded pipeline, or a ModelHost of several models, with
    the control folders of `controls` (`--controlnet-dir`) for ControlNet units."""
    host = pipe if isinstance(pipe, ModelHost) else ModelHost(pipe)
    control_models = ControlModels(controls)
    options = Options(host)
    metrics = Metrics()
    queue = JobQueue(host, settings.max_queue, settings.workers, metrics.finished)
    metrics.watch(queue.counts)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        yield
        queue.shutdown()

    app = FastAPI(title="sdrt", version=server_version(), lifespan=lifespan, docs_url=None,
                  redoc_url=None,  # their pages load scripts from a CDN; /openapi.json stays
                  description="AUTOMATIC1111-compatible Stable Diffusion API on CPUs.")
    # the schemes, for /openapi.json (AuthGate checks them)
    auth = ([Security(BEARER)] if settings.token else []) + (
        [Security(BASIC)] if settings.token or settings.api_auth else [])
    api = APIRouter(dependencies=auth, responses=ERRORS)
    _add_generation_routes(api, options, settings, queue, metrics, control_models)
    _add_info_routes(api, host, settings, metrics)
    add_model_routes(api, options)
    add_network_routes(api, host)
    add_extra_routes(api, queue, settings)
    add_postprocess_routes(api, settings)
    add_controlnet_routes(api, control_models, settings)
    app.include_router(api)
    _add_public_routes(app, queue, settings)
    _add_error_handlers(app)
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)
    if settings.token or settings.api_auth:  # outside BodyLimit: no body read without them
        app.add_middleware(AuthGate, token=settings.token, credentials=settings.api_auth)
    if settings.cors_origins:  # off unless asked: browsers then refuse other sites' calls
        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins),
                           allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])
    app.add_middleware(AccessLog, metrics=metrics)
    return app


def _add_generation_routes(api: APIRouter, options: Options, settings: ServerSettings,
                           queue: JobQueue, metrics: Metrics, models: ControlModels) -> None:
    host = options.host
    decoding = anyio.CapacityLimiter(DECODES_AT_ONCE)

    async def controls(body: Txt2ImgRequest, init: Image.Image | None = None
                       ) -> tuple[ControlUnit, ...]:
        """The body's ControlNet units, their images decoded off the event loop."""
        if not controlnet_args(body.alwayson_scripts):
            return ()
        return await anyio.to_thread.run_sync(control_units, body.alwayson_scripts, models,
                                              input_limit(settings), init, limiter=decoding)

    def refuse() -> QueueFull:
        metrics.rejected.inc()
        return QueueFull(queue.retry_after())

    async def run(request: Request, body: Txt2ImgRequest, job: Job) -> Response:
        if body.force_task_id:
            if queue.get(body.force_task_id):
                raise InputError(f"force_task_id {body.force_task_id!r} is already in use")
            job.id = body.force_task_id
        if not queue.admit(job):
            raise refuse()
        results = await _wait(request, queue, job)
        if results is None:  # the client went away; nobody reads this
            return Response(status_code=CLIENT_CLOSED)
        # PNG encoding takes a while for large images: off the event loop
        response = await run_in_threadpool(image_response, body, results, job,
                                           **options.encoding(body.override_settings))
        return JSONResponse(response.model_dump())

    @api.post("/sdapi/v1/txt2img", response_model=ImageResponse)
    async def txt2img(body: Txt2ImgRequest, request: Request) -> Response:
        """Text to image (A1111's body; unknown fields are ignored)."""
        checkpoint = override_checkpoint(options, body.override_settings)
        if queue.full() and controlnet_args(body.alwayson_scripts):
            raise refuse()  # before decoding control images for a job that cannot be admitted
        units = await controls(body)
        return await run(request, body, Job(build_request(host, settings, body,
                                                          checkpoint=checkpoint, controls=units),
                                            checkpoint=checkpoint))

    @api.post("/sdapi/v1/img2img", response_model=ImageResponse)
    async def img2img(body: Img2ImgRequest, request: Request) -> Response:
        """Image to image, or inpainting with `mask` (white = repaint)."""
        if queue.full():  # refuse before decoding images for a job that cannot be admitted
            raise refuse()
        checkpoint = override_checkpoint(options, body.override_settings)
        inits = await anyio.to_thread.run_sync(image_inputs, host.pipe, settings, body,
                                               limiter=decoding)
        units = await controls(body, inits[0].image)
        job = Job(build_request(host, settings, body, inits, checkpoint, units), init=inits[0],
                  checkpoint=checkpoint, more_inits=tuple(inits[1:]))
        return await run(request, body, job)

    @api.post("/sdapi/v1/interrupt", response_model=InterruptResponse)
    async def interrupt(id_task: str | None = None) -> InterruptResponse:
        """Stop the running job(s), or the one named (running or waiting), at the next step;
        they return the picture as it stands. Answers {} as A1111 does."""
        queue.interrupt(id_task)
        return InterruptResponse()

    @api.get("/sdapi/v1/progress", response_model=ProgressResponse)
    async def progress(skip_current_image: bool = False,
                       id_task: str | None = None) -> ProgressResponse:
        """The current job's progress and preview (A1111); `id_task` (the body's
        force_task_id) follows one job in sdrt's queue."""
        job = queue.get(id_task) if id_task else queue.current()
        if job is None:
            return ProgressResponse(progress=0.0, eta_relative=0.0, state=ProgressState(),
                                    textinfo="no such job (finished or unknown)" if id_task
                                    else None)
        preview = None
        if not skip_current_image and job.state == "running":
            preview = await run_in_threadpool(queue.preview, job)
        return _progress(job, queue, preview)


def _add_info_routes(api: APIRouter, host: ModelHost, settings: ServerSettings,
                     metrics: Metrics) -> None:
    @api.get("/sdapi/v1/samplers", response_model=list[SamplerItem])
    async def samplers() -> list[SamplerItem]:
        """The samplers by A1111 name; aliases are sdrt's name and the diffusers class, where
        that class means this sampler (DPM++ 2M SDE runs on DPM++ 2M's; 2S a has none)."""
        return [SamplerItem(name=spec.display,
                            aliases=[key, *(name for name in [spec.diffusers_class]
                                            if name and resolve_pair(name)[0] == key)],
                            options={"schedules": schedules_for(key)})
                for key, spec in SAMPLERS.items()]

    @api.get("/sdapi/v1/schedulers", response_model=list[SchedulerItem])
    async def schedulers() -> list[SchedulerItem]:
        """The schedule types (the `scheduler` of txt2img/img2img), by name and A1111 label."""
        # need_inner_model is False throughout: each ladder reads only the model's sigma range
        return [SchedulerItem(name=key, label=row.label,
                              default_rho=-1.0 if row.rho is None else row.rho,
                              need_inner_model=False)
                for key, row in SCHEDULES.items()]

    @api.get("/sdrt/v1/config", response_model=ServerConfig)
    async def config() -> ServerConfig:
        """Defaults and limits, for the web page's form, and a prompt the model knows."""
        facts = host.facts(None)[0]  # the selected model's
        example = await run_in_threadpool(example_prompt, host.selected.folder)
        return ServerConfig(model=facts.name, example_prompt=example,
                            default_width=facts.default_size,
                            default_height=facts.default_size, default_steps=facts.family.steps,
                            max_pixels=settings.max_pixels, max_steps=settings.max_steps,
                            max_batch=settings.max_batch,
                            size_multiple=max(8, facts.vae_scale_factor))

    @api.get("/metrics", response_class=Response)
    async def prometheus() -> Response:
        """Prometheus text format: requests, queue, jobs, process memory."""
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)


def _add_public_routes(app: FastAPI, queue: JobQueue, settings: ServerSettings) -> None:
    @app.get("/health", response_model=Health)
    async def health() -> Health:
        """Liveness, answered by the event loop whatever the workers are doing."""
        queued, running = queue.counts()
        return Health(status="ok", queued=queued, running=running, capacity=queue.capacity)

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(InputError)
    async def bad_input(_: Request, exc: InputError) -> JSONResponse:
        return JSONResponse(error_body("InputError", first_line(exc)), 422)

    @app.exception_handler(SdrtError)
    async def failed(_: Request, exc: SdrtError) -> JSONResponse:
        log.error("generation failed: %s", first_line(exc))
        return JSONResponse(error_body(type(exc).__name__, first_line(exc)), 500)

    @app.exception_handler(QueueFull)
    async def full(_: Request, exc: QueueFull) -> JSONResponse:
        return JSONResponse(error_body("QueueFull", "the job queue is full; retry later"), 429,
                            headers={"Retry-After": str(exc.retry_after)})

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        # every problem in one line; the offending input itself is not echoed
        problems = "; ".join(f"{'.'.join(str(p) for p in error['loc'])}: {error['msg']}"
                             for error in exc.errors())
        return JSONResponse(error_body("ValidationError", problems), 422)

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, exc: HTTPException) -> JSONResponse:
        return JSONResponse(error_body(HTTPStatus(exc.status_code).phrase.replace(" ", ""),
                                       str(exc.detail)), exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def internal(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error")
        return JSONResponse(error_body("InternalError", "internal error; see the server log"),
                            500)


async def _wait(request: Request, queue: JobQueue, job: Job) -> list[GeneratedImage] | None:
    """The job's images, or None when the client disconnects first (the job is dropped)."""
    future = queue.submit(job)
    try:
        while True:
            done, _ = await asyncio.wait({future}, timeout=DISCONNECT_POLL_S)
            if done:
                return future.result()
            if await request.is_disconnected():
                queue.cancel(job)
                return None
    except asyncio.CancelledError:  # server shutdown
        queue.cancel(job)
        raise


def _progress(job: Job, queue: JobQueue, preview: str | None) -> ProgressResponse:
    ahead = queue.ahead_of(job) if job.state == "queued" else None
    progress = job.progress
    eta = 0.0
    if job.started is not None and progress > 0:
        elapsed = time.monotonic() - job.started
        eta = elapsed / progress - elapsed
    stopped = " (interrupted)" if job.interrupted else " (skipped)" if job.skipped else ""
    text = (f"Queued: {ahead} job(s) ahead" if ahead is not None
            else f"Step {job.step}/{job.total}{stopped}")
    return ProgressResponse(
        progress=progress, eta_relative=eta, current_image=preview, textinfo=text,
        state=ProgressState(interrupted=job.interrupted, skipped=job.skipped, job=job.id,
                            job_count=1, queued=ahead is not None,
                            job_timestamp=datetime.fromtimestamp(job.created)
                            .strftime("%Y%m%d%H%M%S"),
                            sampling_step=job.step, sampling_steps=job.total,
                            queue_position=ahead))


def example_prompt(folder: Path) -> str | None:
    """The prompt a model's manifest.json suggests (`example_prompt`), if it names one."""
    try:
        text = Manifest.load(folder).extra.get("example_prompt")
    except SdrtError:  # a model folder without sdrt's manifest (optimum's export)
        return None
    return text[:MAX_EXAMPLE_CHARS] if isinstance(text, str) else None


def serve(pipe: Pipeline | ModelHost, settings: ServerSettings,
          controls: ControlLibrary | None = None) -> None:
    """Listen until interrupted (Ctrl-C / SIGTERM: running jobs stop, then the workers)."""
    import uvicorn

    settings.validate()
    config = uvicorn.Config(create_app(pipe, settings, controls), host=settings.host,
                            port=settings.port, log_config=None, access_log=False,
                            server_header=False, proxy_headers=False,
                            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S)
    uvicorn.Server(config).run()
