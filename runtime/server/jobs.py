"""A bounded job queue in front of one shared Pipeline: worker threads, progress, interrupt.

A1111 serialises generation with one lock (`queue_lock`), so requests wait their turn in
arrival order; here `workers` threads take admitted jobs in that order (a FIFO executor), each
with its own request, generators and sampler state (`Pipeline.run` keeps all per-call state
local), so concurrent jobs cannot disturb each other. Unlike A1111 the waiting list is bounded
(`max_queue`): a job beyond it is refused and the HTTP layer answers 429. A job whose client
went away is dropped from the queue, or stopped at its next step, and nothing keeps its latents
or images.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from sdrt.runtime.errors import GenerationError
from sdrt.runtime.img2img import ImageInput
from sdrt.runtime.img2img_batch import run_images
from sdrt.runtime.pipeline import GeneratedImage, GenerationRequest, Pipeline
from sdrt.runtime.server.codec import encode_png
from sdrt.runtime.server.models import ModelHost

log = logging.getLogger(__name__)

PREVIEW_MIN_SECONDS = 1.0  # a preview is a full VAE decode: at most one per job per second
DURATION_HISTORY = 20  # recent job durations averaged for Retry-After

FinishHook = Callable[[str, float], None]  # (outcome, seconds) when a job leaves the queue


@dataclass(eq=False)
class Job:
    """One generation request on its way through the queue (fields written by one worker)."""

    request: GenerationRequest  # resolved: sizes, steps, seed filled
    init: ImageInput | None = None  # img2img / inpainting input
    checkpoint: str | None = None  # override_settings.sd_model_checkpoint; None: the selected
    more_inits: tuple[ImageInput, ...] = ()  # A1111's batch over several init_images
    id: str = field(default_factory=lambda: f"task({secrets.token_hex(8)})")
    created: float = field(default_factory=time.time)
    state: str = "queued"  # queued → running → finished
    step: int = 0  # model calls done
    total: int = 0  # model calls of the run (known from the first step)
    started: float | None = None  # time.monotonic() when a worker took it
    interrupted: bool = False  # /interrupt: stop and return what there is (A1111)
    skipped: bool = False  # /skip: the same for this job alone (A1111's state.skipped)
    cancelled: bool = False  # the client went away: stop and return nothing
    latents: np.ndarray | None = None  # (1, C, h, w): the first image's latents, for previews
    preview: tuple[int, float, str] | None = None  # (step, monotonic time, base64 PNG)
    future: Future | None = None

    def on_step(self, i: int, n: int, latents: np.ndarray) -> bool:
        """The pipeline's step callback: record progress; True stops the run."""
        self.step, self.total = i + 1, n
        self.latents = latents[:1].copy()  # (1, C, h, w): the sampler may reuse its buffer
        return self.interrupted or self.skipped or self.cancelled

    @property
    def progress(self) -> float:
        return self.step / self.total if self.total else 0.0


class JobQueue:
    """`workers` jobs running and at most `max_queue` waiting, run in arrival order."""

    def __init__(self, host: ModelHost, max_queue: int, workers: int,
                 on_finish: FinishHook) -> None:
        self.host, self.workers = host, workers
        self.capacity = max_queue + workers  # jobs admitted at once
        self._on_finish = on_finish
        self._executor = ThreadPoolExecutor(workers, thread_name_prefix="sdrt-generate")
        self._lock = threading.Lock()
        self._jobs: dict[str, Job] = {}  # admitted and not finished, in arrival order
        self._durations: deque[float] = deque(maxlen=DURATION_HISTORY)

    def admit(self, job: Job) -> bool:
        """Take `job` if a slot is free (and its id is not in use); False when full."""
        with self._lock:
            if len(self._jobs) >= self.capacity or job.id in self._jobs:
                return False
            self._jobs[job.id] = job
            return True

    def full(self) -> bool:
        with self._lock:
            return len(self._jobs) >= self.capacity

    def submit(self, job: Job) -> asyncio.Future:
        """Start an admitted job; the awaitable gives its images, or None if cancelled."""
        job.future = self._executor.submit(self._work, job)
        return asyncio.wrap_future(job.future)

    def counts(self) -> tuple[int, int]:
        """(queued, running) jobs."""
        with self._lock:
            running = sum(job.state == "running" for job in self._jobs.values())
            return len(self._jobs) - running, running

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            return self._jobs.get(job_id)

    def current(self) -> Job | None:
        """The oldest running job, else the oldest waiting one (A1111's "current job")."""
        with self._lock:
            jobs = list(self._jobs.values())
        return next((job for job in jobs if job.state == "running"), jobs[0] if jobs else None)

    def ahead_of(self, job: Job) -> int:
        """Jobs admitted before `job` and not finished (running or waiting)."""
        with self._lock:
            order = list(self._jobs.values())
        return order.index(job) if job in order else 0

    def retry_after(self) -> int:
        """Seconds until a slot is likely free: the queue's work at the recent mean job time."""
        with self._lock:
            mean = sum(self._durations) / len(self._durations) if self._durations else 1.0
            return max(1, math.ceil(mean * len(self._jobs) / self.workers))

    def interrupt(self, job_id: str | None = None) -> int:
        """Stop the running jobs (or the one named) at their next step; how many were told."""
        with self._lock:
            jobs = [self._jobs[job_id]] if job_id in self._jobs else [] if job_id else [
                job for job in self._jobs.values() if job.state == "running"]
            for job in jobs:
                job.interrupted = True
            return len(jobs)

    def skip(self) -> bool:
        """Stop the current job (the oldest running) at its next step; it returns what there
        is (A1111's /skip). False when none runs."""
        job = self.current()
        with self._lock:
            if job is None or job.state != "running":
                return False
            job.skipped = True
            return True

    def cancel(self, job: Job) -> None:
        """Forget a job whose client is gone: its slot frees now if it had not started."""
        with self._lock:
            job.cancelled = True
            if job.state != "queued":
                return  # running: on_step stops it and _work frees the slot
            self._jobs.pop(job.id, None)
            job.state, job.init, job.more_inits = "finished", None, ()
        if job.future is not None:
            job.future.cancel()
        self._on_finish("cancelled", 0.0)

    def preview(self, job: Job) -> str | None:
        """The job's current latents decoded, as base64 PNG (cached per step and second)."""
        latents, cached, now = job.latents, job.preview, time.monotonic()
        if latents is None:
            return None
        if cached and (cached[0] == job.step or now - cached[1] < PREVIEW_MIN_SECONDS):
            return cached[2]
        try:
            image = self.host.pipe.decode(latents)  # the pipeline's own VAE step, one image
        except GenerationError:  # early latents may not decode to finite pixels
            return cached[2] if cached else None
        job.preview = (job.step, now, encode_png(image))
        return job.preview[2]

    def shutdown(self) -> None:
        """Stop every job and the workers (server shutdown)."""
        with self._lock:
            for job in self._jobs.values():
                job.cancelled = True
        self._executor.shutdown(wait=True, cancel_futures=True)

    def _work(self, job: Job) -> list[GeneratedImage] | None:
        with self._lock:
            if job.cancelled:
                return None
            job.state, job.started = "running", time.monotonic()
        log.info(json.dumps({"job": job.id, "event": "started",
                             "waited_s": round(time.time() - job.created, 3)}))
        outcome = "error"
        try:
            with self.host.use(job.checkpoint) as pipe:  # may switch models first
                results = _run(pipe, job)
            outcome = ("cancelled" if job.cancelled else
                       "interrupted" if job.interrupted or job.skipped else "done")
            return None if job.cancelled else results
        finally:
            elapsed = time.monotonic() - job.started
            with self._lock:
                self._jobs.pop(job.id, None)
                job.state, job.init, job.latents, job.preview = "finished", None, None, None
                job.more_inits = ()
                if outcome == "done":
                    self._durations.append(elapsed)
            self._on_finish(outcome, elapsed)


def _run(pipe: Pipeline, job: Job) -> list[GeneratedImage]:
    """The job's images: one init image (or none) through the pipeline, several as a batch
    where image i starts from init i mod n (A1111's img2img over several init_images)."""
    if not job.more_inits:
        return pipe.run(job.request, callback=job.on_step, init=job.init)
    return run_images(pipe, job.request, [job.init, *job.more_inits], job.on_step)
