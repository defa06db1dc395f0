"""The FastAPI app: AUTOMATIC1111's `/sdapi/v1` txt2img, img2img, progress, interrupt, samplers,
schedulers, sd-models and sd-vae, loras, refresh-loras and embeddings (networks.py); `/health`,
`/metrics` (Prometheus text), `/sdrt/v1/config`; the kiosk page at `/`.

Every error is JSON `{"error", "detail"}` with a 4xx status (or a bare 500 "internal error",
the traceback going to the server log only); nothing in a response names a filesystem path.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from contextlib import asynccontextmanager
from datetime import datetime
from http import HTTPStatus
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import anyio
from fastapi import APIRouter, FastAPI, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from PIL import ImageOps
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from sdrt.runtime.errors import InputError, SdrtError, first_line
from sdrt.runtime.images import MAX_INPUT_PIXELS, read_image, read_mask
from sdrt.runtime.metadata import format_parameters
from sdrt.runtime.pipeline import GeneratedImage, GenerationRequest, Pipeline
from sdrt.runtime.samplers import SAMPLERS, schedules_for
from sdrt.runtime.schedules import SCHEDULES
from sdrt.runtime.server.codec import decode_image, encode_png
from sdrt.runtime.server.jobs import Job, JobQueue
from sdrt.runtime.server.middleware import (
    BEARER,
    AccessLog,
    BodyLimit,
    Metrics,
    TokenGate,
    error_body,
)
from sdrt.runtime.server.networks import add_network_routes
from sdrt.runtime.server.schemas import (
    ErrorBody,
    Health,
    ImageResponse,
    Img2ImgRequest,
    ProgressResponse,
    ProgressState,
    SamplerItem,
    SchedulerItem,
    SDModelItem,
    SDVaeItem,
    ServerConfig,
    Txt2ImgRequest,
)
from sdrt.runtime.server.settings import ServerSettings

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
DISCONNECT_POLL_S = 0.5  # how often a waiting request checks that its client is still there
# An input photo may be this many times the largest output: it is resized down; beyond that,
# decoding it would cost more memory than generating.
INPUT_PIXELS_FACTOR = 16
GRACEFUL_SHUTDOWN_S = 5  # open requests get this long to finish; then running jobs are stopped
CLIENT_CLOSED = 499  # nginx's "client closed request": logged, never seen by anyone
ERRORS = {status: {"model": ErrorBody} for status in (401, 413, 422, 429)}


class QueueFull(Exception):
    def __init__(self, retry_after: int) -> None:
        self.retry_after = retry_after


def create_app(pipe: Pipeline, settings: ServerSettings) -> FastAPI:
    """The server's ASGI app around a loaded pipeline."""
    metrics = Metrics()
    queue = JobQueue(pipe, settings.max_queue, settings.workers, metrics.finished)
    metrics.watch(queue.counts)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        yield
        queue.shutdown()

    app = FastAPI(title="sdrt", version=_version(), lifespan=lifespan, docs_url=None,
                  redoc_url=None,  # their pages load scripts from a CDN; /openapi.json stays
                  description="AUTOMATIC1111-compatible Stable Diffusion API on CPUs.")
    auth = [Security(BEARER)] if settings.token else []  # the scheme, for /openapi.json
    api = APIRouter(dependencies=auth, responses=ERRORS)
    _add_generation_routes(api, pipe, settings, queue, metrics)
    _add_info_routes(api, pipe, settings, metrics)
    add_network_routes(api, pipe)
    app.include_router(api)
    _add_public_routes(app, queue, settings)
    _add_error_handlers(app)
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)
    if settings.token:  # outside BodyLimit: no body is read for a request without the token
        app.add_middleware(TokenGate, token=settings.token)
    if settings.cors_origins:  # off unless asked: browsers then refuse other sites' calls
        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins),
                           allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])
    app.add_middleware(AccessLog, metrics=metrics)
    return app


def _add_generation_routes(api: APIRouter, pipe: Pipeline, settings: ServerSettings,
                           queue: JobQueue, metrics: Metrics) -> None:
    decoding = anyio.CapacityLimiter(settings.max_queue)  # img2img inputs decoded at once

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
        response = await run_in_threadpool(_image_response, body, results, job)
        return JSONResponse(response.model_dump())

    @api.post("/sdapi/v1/txt2img", response_model=ImageResponse)
    async def txt2img(body: Txt2ImgRequest, request: Request) -> Response:
        """Text to image (A1111's body; unknown fields are ignored)."""
        return await run(request, body, Job(_request(pipe, settings, body)))

    @api.post("/sdapi/v1/img2img", response_model=ImageResponse)
    async def img2img(body: Img2ImgRequest, request: Request) -> Response:
        """Image to image, or inpainting with `mask` (white = repaint)."""
        if queue.full():  # refuse before decoding images for a job that cannot be admitted
            raise refuse()
        init = await anyio.to_thread.run_sync(_image_input, pipe, settings, body,
                                              limiter=decoding)
        return await run(request, body, Job(_request(pipe, settings, body, init), init))

    @api.post("/sdapi/v1/interrupt")
    async def interrupt(id_task: str | None = None) -> dict[str, int]:
        """Stop the running job(s), or the one named, at the next step; they return the
        picture as it stands (A1111)."""
        return {"interrupted": queue.interrupt(id_task)}

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


def _add_info_routes(api: APIRouter, pipe: Pipeline, settings: ServerSettings,
                     metrics: Metrics) -> None:
    @api.get("/sdapi/v1/samplers", response_model=list[SamplerItem])
    async def samplers() -> list[SamplerItem]:
        """The samplers by A1111 name; aliases are sdrt's and diffusers' names."""
        return [SamplerItem(name=spec.display, aliases=[key, spec.diffusers_class],
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

    @api.get("/sdapi/v1/sd-models", response_model=list[SDModelItem])
    async def sd_models() -> list[SDModelItem]:
        """The one loaded model (its name, never its path)."""
        facts = pipe.facts
        short = facts.unet_sha256[:10] if facts.unet_sha256 else None
        return [SDModelItem(title=f"{facts.name} [{short}]" if short else facts.name,
                            model_name=facts.name, hash=short, sha256=facts.unet_sha256,
                            filename=facts.name)]

    @api.get("/sdapi/v1/sd-vae", response_model=list[SDVaeItem])
    async def sd_vae() -> list[SDVaeItem]:
        """The tiny VAE loaded with --vae, if any (its name, never its path)."""
        tiny = pipe.tiny_vae
        return [] if tiny is None else [SDVaeItem(model_name=tiny.manifest.name,
                                                  filename=tiny.manifest.name)]

    @api.get("/sdrt/v1/config", response_model=ServerConfig)
    async def config() -> ServerConfig:
        """Defaults and limits, for the web page's form."""
        facts = pipe.facts
        return ServerConfig(model=facts.name, default_width=facts.default_size,
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
        return Health(status="ok", queued=queued, running=running, capacity=settings.max_queue)

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


def _request(pipe: Pipeline, settings: ServerSettings, body: Txt2ImgRequest,
             init=None) -> GenerationRequest:
    """The request's generation parameters, resolved and checked against the server's caps."""
    if body.unsupported():
        raise InputError(f"not supported by sdrt: {', '.join(body.unsupported())} "
                         "(leave them at A1111's defaults)")
    if body.batch_size < 1 or body.n_iter < 1:
        raise InputError(f"batch_size and n_iter must be at least 1, got {body.batch_size} "
                         f"and {body.n_iter}")
    options = {"negative_prompt": body.negative_prompt or "", "steps": body.steps,
               "guidance_scale": body.cfg_scale,
               "sampler": body.sampler_name or body.sampler_index or None,
               "schedule": body.scheduler or None,
               "seed": None if body.seed == -1 else body.seed,
               "num_images": body.batch_size * body.n_iter, **settings.request_fields()}
    prompt = body.prompt or ""
    request = (pipe.request_for(init, prompt, **options) if init is not None else
               GenerationRequest(prompt=prompt, width=body.width, height=body.height, **options))
    request = request.resolve(pipe.facts, pipe.scheduler)
    if request.width * request.height > settings.max_pixels:
        raise InputError(f"{request.width}×{request.height} is more than {settings.max_pixels:,} "
                         "pixels, this server's limit per image")
    if request.steps > settings.max_steps:
        raise InputError(f"steps must be at most {settings.max_steps} on this server, "
                         f"got {request.steps}")
    if request.num_images > settings.max_batch:
        raise InputError(f"batch_size × n_iter must be at most {settings.max_batch} on this "
                         f"server, got {request.num_images}")
    return request


def _image_input(pipe: Pipeline, settings: ServerSettings, body: Img2ImgRequest):
    """The init image (and mask) decoded and sized for the model (a worker thread's job)."""
    limit = min(MAX_INPUT_PIXELS, INPUT_PIXELS_FACTOR * settings.max_pixels)
    picture = read_image(decode_image(body.init_images[0], "init_images[0]", limit))
    mask = None
    if body.mask:
        mask = read_mask(decode_image(body.mask, "mask", limit))
        if body.inpainting_mask_invert:  # A1111: 1 repaints where the mask is black
            mask = ImageOps.invert(mask)
    return pipe.image_input(picture, mask, strength=body.denoising_strength,
                            width=body.width, height=body.height,
                            mask_blur=4 if body.mask_blur is None else body.mask_blur)


def _image_response(body: Txt2ImgRequest, results: list[GeneratedImage], job: Job
                    ) -> ImageResponse:
    """A1111's response: base64 PNGs, the request read back, and `info` as JSON text."""
    infos = [result.info for result in results]
    first = infos[0]
    info = {
        "prompt": first.prompt, "all_prompts": [i.prompt for i in infos],
        "negative_prompt": first.negative_prompt,
        "all_negative_prompts": [i.negative_prompt for i in infos],
        "seed": first.seed, "all_seeds": [i.seed for i in infos],
        "subseed": -1, "all_subseeds": [-1] * len(infos), "subseed_strength": 0,
        "width": first.width, "height": first.height, "sampler_name": first.sampler,
        "cfg_scale": first.cfg_scale, "steps": first.steps, "batch_size": body.batch_size,
        "n_iter": body.n_iter, "restore_faces": False, "sd_model_name": first.model_name,
        "sd_model_hash": first.model_hash, "sd_vae_name": first.extra.get("VAE"),
        "sd_vae_hash": first.extra.get("VAE hash"), "denoising_strength": first.denoising_strength,
        "extra_generation_params": dict(first.extra), "index_of_first_image": 0,
        "infotexts": [format_parameters(i) for i in infos], "styles": [],
        "job_timestamp": datetime.fromtimestamp(job.created).strftime("%Y%m%d%H%M%S"),
        "interrupted": job.interrupted, "task_id": job.id, "version": _version(),
    }
    parameters = body.model_dump()
    if isinstance(body, Img2ImgRequest) and not body.include_init_images:
        parameters["init_images"], parameters["mask"] = None, None  # as A1111 does
    return ImageResponse(images=[encode_png(r.image, r.info) for r in results],
                         parameters=parameters, info=json.dumps(info))


def _progress(job: Job, queue: JobQueue, preview: str | None) -> ProgressResponse:
    ahead = queue.ahead_of(job) if job.state == "queued" else None
    progress = job.progress
    eta = 0.0
    if job.started is not None and progress > 0:
        elapsed = time.monotonic() - job.started
        eta = elapsed / progress - elapsed
    text = (f"Waiting: {ahead} job(s) ahead" if ahead is not None
            else f"Step {job.step}/{job.total}" + (" (interrupted)" if job.interrupted else ""))
    return ProgressResponse(
        progress=progress, eta_relative=eta, current_image=preview, textinfo=text,
        state=ProgressState(interrupted=job.interrupted, job=job.id, job_count=1,
                            job_timestamp=datetime.fromtimestamp(job.created)
                            .strftime("%Y%m%d%H%M%S"),
                            sampling_step=job.step, sampling_steps=job.total,
                            queue_position=ahead))


def _version() -> str:
    try:
        return version("sdrt")
    except PackageNotFoundError:
        return "unknown"


def serve(pipe: Pipeline, settings: ServerSettings) -> None:
    """Listen until interrupted (Ctrl-C / SIGTERM: running jobs stop, then the workers)."""
    import uvicorn

    settings.validate()
    config = uvicorn.Config(create_app(pipe, settings), host=settings.host, port=settings.port,
                            log_config=None, access_log=False, server_header=False,
                            proxy_headers=False, timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S)
    uvicorn.Server(config).run()
