"""Batch generation: a JSONL file of jobs → one PNG per job and `results.jsonl`; resumable.

Each line of the jobs file is a JSON object with the fields in `JOB_FIELDS`. This process, the
driver, reads and checks every job first, with its model's defaults filled in, so a bad line is
reported with its number (and skipped) before anything runs. Jobs whose PNG already exists and
verifies (`verify`) are skipped; the others go to an engine: `local` (threads in this process
sharing one Pipeline per model) or `ray` (runtime/batch/ray_engine.py: one actor per worker on a Ray
cluster). Workers return pixels and metadata and only the driver writes files, so each job's PNG
is written once, atomically, in one place, wherever the workers ran.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image

from sdrt.runtime.batch.job_loras import JobLoras
from sdrt.runtime.errors import InputError, SdrtError, first_line
from sdrt.runtime.metadata import AUTOV2_HEX_CHARS, GenerationInfo, load_info, save_png
from sdrt.runtime.model.auto import AUTO, Choice, choose
from sdrt.runtime.model.folder import EMBEDDED_MODEL, ModelFacts, check_folder, read_facts
from sdrt.runtime.model.variants import select_variant
from sdrt.runtime.pipeline import GenerationRequest, Pipeline
from sdrt.runtime.samplers import display_name
from sdrt.runtime.schedules import SchedulerConfig, schedule_infotext
from sdrt.runtime.session import BACKENDS

log = logging.getLogger(__name__)

ENGINES = ("local", "ray")
RESULTS_FILE = "results.jsonl"
# A job's fields; absent or null takes the default (generation settings: the model family's;
# schedule: the sampler's own).
JOB_FIELDS = ("id", "prompt", "negative_prompt", "seed", "width", "height", "size", "steps",
              "guidance_scale", "sampler", "generator", "model", "backend", "precision",
              "schedule", "loras", "prompt_syntax", "emphasis")
STRING_FIELDS = ("id", "prompt", "negative_prompt", "sampler", "generator", "model", "backend",
                 "precision", "schedule", "prompt_syntax", "emphasis")
PROMPT_FIELDS = ("prompt_syntax", "emphasis")  # GenerationRequest's, taken as they are
# A job id names its PNG: portable file-name characters, no leading dot (hidden files, "..").
JOB_ID = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")
# 100 characters + ".png" stays under every filesystem's 255-byte name limit.
MAX_JOB_ID_CHARS = 100
# Loaded pipelines a worker keeps, least recently used dropped first: a full-size SD pipeline
# holds 2-7 GB, and jobs reach workers grouped by model, so keeping more rarely helps.
MAX_PIPELINES_PER_WORKER = 2


@dataclass(frozen=True)
class Job:
    """One checked job: its request with every default filled, and what runs it."""

    id: str
    line: int  # in the jobs file (1-based); for a list of dicts, its position
    model: str  # absolute model folder path, as the workers open it
    backend: str
    precision: str
    request: GenerationRequest
    expected: Mapping[str, Any]  # metadata its PNG must carry (`verify`)
    load: tuple[tuple[str, Any], ...] = ()  # Pipeline.load options: low_memory, device, vae, …
    choice: str = ""  # why "auto" chose backend and precision ("" when the job named both)

    @property
    def key(self) -> tuple[str, str, str, tuple[tuple[str, Any], ...]]:
        """What a worker caches one pipeline for."""
        return self.model, self.backend, self.precision, self.load

    @property
    def file(self) -> str:
        return f"{self.id}.png"


@dataclass(frozen=True)
class JobOutput:
    """What a worker returns for a job: the picture, its metadata, where the time went."""

    pixels: np.ndarray  # (H, W, 3) uint8
    info: GenerationInfo
    load_s: float  # 0 when the worker had the pipeline loaded already
    generate_s: float
    worker: str


# An engine calls this once per job with its output, or a one-line failure, and its attempts.
Done = Callable[[Job, JobOutput | str, int], None]


class Engine(Protocol):
    def run(self, jobs: list[Job], done: Done) -> None: ...


@dataclass(frozen=True)
class BatchReport:
    """The results records of one run (the lines it added to results.jsonl), in order."""

    records: list[dict[str, Any]]
    results_file: Path

    @property
    def counts(self) -> Counter:
        """Records per status: done, skipped, failed, invalid."""
        return Counter(record["status"] for record in self.records)

    @property
    def ok(self) -> bool:
        """True when no job failed and no line was invalid."""
        return not (self.counts["failed"] or self.counts["invalid"])


def run_batch(jobs: str | Path | Iterable[Mapping[str, Any]], out: str | Path, *,
              engine: str = "local", workers: int = 1, threads_per_worker: int | None = None,
              ray_address: str | None = None,
              on_result: Callable[[dict[str, Any]], None] | None = None,
              defaults: Mapping[str, Any] | None = None,
              load: Mapping[str, Any] | None = None) -> BatchReport:
    """Run every job of `jobs` (a JSONL file, or dicts with its fields) whose PNG in `out` is
    missing or does not verify; `on_result(record)` sees each results record as it is written.
    `threads_per_worker` defaults to this machine's cores / `workers`. `defaults` fills the job
    fields a job leaves out; `load` are the Pipeline.load options every worker loads with."""
    runner = make_engine(engine, workers, threads_per_worker, ray_address)
    checked, invalid = read_jobs(jobs, defaults, load)
    out = _output_folder(Path(out))
    with _Results(out, on_result) as results:
        for record in invalid:
            results.write(record)
        pending = []
        for job in checked:
            info = verify(out / job.file, job)
            if info is None:
                pending.append(job)
            else:
                results.write({"id": job.id, "line": job.line, "status": "skipped",
                               "file": job.file, "seed": info.seed})
        if pending:  # grouped by model, so a worker rarely switches pipelines
            runner.run(sorted(pending, key=lambda job: job.key), results.done)
        return BatchReport(results.records, out / RESULTS_FILE)


def make_engine(name: str, workers: int, threads_per_worker: int | None,
                ray_address: str | None) -> Engine:
    """The engine `name` with `workers` workers of `threads_per_worker` backend threads each."""
    if name not in ENGINES:
        raise InputError(f"unknown engine '{name}'; choose one of: {', '.join(ENGINES)}")
    threads_given = 1 if threads_per_worker is None else threads_per_worker
    for label, value in (("workers", workers), ("threads per worker", threads_given)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InputError(f"{label} must be a whole number ≥ 1, got {value!r}")
    threads = threads_per_worker or max(1, (os.cpu_count() or 1) // workers)
    if name == "local":
        if ray_address:
            raise InputError("a Ray address needs the ray engine (--engine ray)")
        return LocalEngine(workers, threads)
    from sdrt.runtime.batch.ray_engine import RayEngine  # ray is imported only by this engine

    return RayEngine(workers, threads, ray_address)


def _output_folder(out: Path) -> Path:
    if out.exists() and not out.is_dir():
        raise InputError(f"output folder '{out}' exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    return out


# ------------------------------------------------------------------------------ reading jobs

def read_jobs(source: str | Path | Iterable[Mapping[str, Any]],
              defaults: Mapping[str, Any] | None = None, load: Mapping[str, Any] | None = None
              ) -> tuple[list[Job], list[dict[str, Any]]]:
    """The checked jobs, and an `invalid` results record (line and message) per bad one
    (`defaults`, `load`: as `run_batch` takes them)."""
    models, loras = _Models(), JobLoras(load)
    jobs: list[Job] = []
    invalid: list[dict[str, Any]] = []
    first_seen: dict[str, int] = {}  # casefolded id → its line: file names may ignore case
    for line, data in _numbered(source):
        try:
            if isinstance(data, SdrtError):
                raise data
            job = parse_job(data, line, models, defaults=defaults, load=load, loras=loras)
            if job.id.casefold() in first_seen:
                raise InputError(f"id '{job.id}' is taken by line {first_seen[job.id.casefold()]}")
        except (SdrtError, TypeError, ValueError, OverflowError) as exc:  # what odd values raise
            invalid.append({"line": line, "status": "invalid", "error": failure_message(exc)})
            continue
        first_seen[job.id.casefold()] = line
        jobs.append(job)
    return jobs, invalid


def _numbered(source: str | Path | Iterable[Mapping[str, Any]]
              ) -> Iterator[tuple[int, object]]:
    """(line number, decoded JSON or the InputError saying why not); blank lines left out."""
    if not isinstance(source, str | Path):
        yield from enumerate(source, 1)
        return
    try:
        with open(source, "rb") as lines:
            for number, raw in enumerate(lines, 1):
                if raw.strip():
                    yield number, _decode(raw)
    except FileNotFoundError:
        raise InputError(f"jobs file '{source}' does not exist") from None
    except OSError as exc:
        raise InputError(f"cannot read jobs file '{source}': {exc.strerror or exc}") from None


def _decode(raw: bytes) -> object:
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        return InputError("the line is not UTF-8 text")
    except json.JSONDecodeError as exc:
        return InputError(f"not valid JSON: {exc.msg} at column {exc.colno}")


def parse_job(data: object, line: int, models: _Models, *,
              defaults: Mapping[str, Any] | None = None,
              load: Mapping[str, Any] | None = None, loras: JobLoras | None = None) -> Job:
    """A job from one decoded line, resolved against its model (errors name the field);
    `loras` finds its LoRAs (default: in `load`'s lora_dir)."""
    if not isinstance(data, Mapping):
        raise InputError(f"a job must be a JSON object, got {type(data).__name__}")
    unknown = sorted(set(data) - set(JOB_FIELDS))
    if unknown:
        raise InputError(f"unknown field '{unknown[0]}'; fields: {', '.join(JOB_FIELDS)}")
    data = {**(defaults or {}), **{name: value for name, value in data.items()
                                   if value is not None}}
    for name in STRING_FIELDS:
        if data.get(name) is not None and not isinstance(data[name], str):
            raise InputError(f"{name} must be a string, got {type(data[name]).__name__}")
    if data.get("prompt") is None:
        raise InputError("prompt is missing")
    job_id = data.get("id") or f"{line:05d}"
    if not JOB_ID.fullmatch(job_id) or len(job_id) > MAX_JOB_ID_CHARS:
        raise InputError(f"id must be 1-{MAX_JOB_ID_CHARS} letters, digits, '.', '_' or '-', "
                         f"not starting with '.', got {job_id!r}")
    backend = data.get("backend") or AUTO
    if backend not in (*BACKENDS, AUTO):
        raise InputError(f"unknown backend '{backend}'; choose one of: "
                         f"{', '.join((AUTO, *BACKENDS))}")
    folder = Path(data.get("model") or EMBEDDED_MODEL).expanduser().absolute()
    keeps_unet = bool(data.get("loras")) or (load or {}).get("lora_dir") is not None
    facts, scheduler, choice = models.get(folder, backend, data.get("precision") or AUTO,
                                          keeps_unet)
    backend, precision = choice.backend, choice.precision
    width, height = _size(data)
    loras = loras or JobLoras(load)
    request = GenerationRequest(
        prompt=data["prompt"], negative_prompt=data.get("negative_prompt") or "",
        steps=data.get("steps"), guidance_scale=data.get("guidance_scale"),
        sampler=data.get("sampler"), schedule=data.get("schedule"), seed=data.get("seed"),
        width=width, height=height,
        generator=data.get("generator") or "torch", loras=loras.parse(data.get("loras", [])),
        **{name: data[name] for name in PROMPT_FIELDS if name in data},
    ).resolve(facts, scheduler)
    expected = {**_expected(request, facts, backend, precision, seed=data.get("seed") is not None),
                **loras.expected(request)}
    return Job(job_id, line, str(folder), backend, precision, request, expected,
               tuple(sorted((load or {}).items())), choice.reason)


def _size(data: Mapping[str, Any]) -> tuple[Any, Any]:
    """(width, height) from `width`/`height`, or from `size`: pixels (square) or "WxH"."""
    size = data.get("size")
    if size is None:
        return data.get("width"), data.get("height")
    if data.get("width") is not None or data.get("height") is not None:
        raise InputError("give size or width/height, not both")
    if isinstance(size, int) and not isinstance(size, bool):
        return size, size
    match = re.fullmatch(r"(\d+)x(\d+)", size) if isinstance(size, str) else None
    if match is None:
        raise InputError(f"size must be a number of pixels or 'WxH', got {size!r}")
    return int(match[1]), int(match[2])


def _expected(request: GenerationRequest, facts: ModelFacts, backend: str, precision: str, *,
              seed: bool) -> dict[str, Any]:
    """The metadata `Pipeline.run` writes for this request (a random seed matches any seed)."""
    expected = {
        "prompt": request.prompt, "negative_prompt": request.negative_prompt,
        "steps": request.steps, "sampler": display_name(request.sampler),
        "cfg_scale": request.guidance_scale, "width": request.width, "height": request.height,
        "model_name": facts.name,
        "model_hash": facts.unet_sha256[:AUTOV2_HEX_CHARS] if facts.unet_sha256 else None,
        "denoising_strength": None, "Backend": backend, "Precision": precision,
        "RNG": "CPU" if request.generator == "torch" else "NumPy",  # A1111's names
        # an automatic schedule writes none: a PNG with one is another job's
        "Schedule type": schedule_infotext(request.schedule).get("Schedule type"),
    }
    return {**expected, "seed": request.seed} if seed else expected


class _Models:
    """Each model's facts and scheduler, and what "auto" chose, read once per (folder, backend,
    precision, keeps_unet); a bad model's error is remembered too, so each of its lines fails
    fast with the same message."""

    def __init__(self) -> None:
        self._seen: dict[tuple, tuple[ModelFacts, SchedulerConfig, Choice] | SdrtError] = {}

    def get(self, folder: Path, backend: str, precision: str, keeps_unet: bool = False
            ) -> tuple[ModelFacts, SchedulerConfig, Choice]:
        key = (folder, backend, precision, keeps_unet)
        if key not in self._seen:
            try:
                check_folder(folder)
                choice = choose(folder, backend, precision, keeps_unet=keeps_unet)
                select_variant(folder, choice.precision, choice.backend)  # it is listed
                scheduler = SchedulerConfig.from_file(folder / "scheduler" /
                                                      "scheduler_config.json")
                scheduler.validate()
                self._seen[key] = (read_facts(folder), scheduler, choice)
            except SdrtError as exc:
                self._seen[key] = exc
        found = self._seen[key]
        if isinstance(found, SdrtError):
            raise found
        return found


# ------------------------------------------------------------------------- verifying outputs

def verify(path: Path, job: Job) -> GenerationInfo | None:
    """The metadata of `path` when it is a whole PNG of `job`, else None.

    A PNG verifies when it decodes to the end (a truncated or corrupt file does not), is the
    job's size, and its `sdrt` metadata has the job's prompt, negative prompt, steps, sampler,
    guidance scale, size, model name and hash, backend, precision, RNG, LoRA hashes (none
    without LoRAs) and, when the job gives one, seed.
    """
    if not path.is_file():
        return None
    try:
        with Image.open(path) as image:
            image.load()
            info = load_info(image)
            size = image.size
    except (OSError, SyntaxError, ValueError) as exc:  # what Pillow raises for a broken file
        log.info("%s is unreadable (%s): generating it again", path, first_line(exc))
        return None
    if info is None or size != (job.request.width, job.request.height):
        log.info("%s has no sdrt metadata or the wrong size: generating it again", path)
        return None
    actual = {**info.to_dict(), **info.extra}
    for key, want in job.expected.items():
        if actual.get(key) != want:
            log.info("%s has %s %r, job %s wants %r: generating it again", path, key,
                     actual.get(key), job.id, want)
            return None
    return info


# ---------------------------------------------------------------------- workers and engines

class Worker:
    """Runs jobs in one process, loading each (model, backend, precision) pipeline once;
    safe to share between threads."""

    def __init__(self, threads: int | None) -> None:
        self._threads = threads
        self._pipelines: OrderedDict[tuple, Pipeline] = OrderedDict()
        self._lock = threading.Lock()

    def run(self, job: Job) -> JobOutput:
        pipe, load_s = self._pipeline(job.key)
        start = time.perf_counter()
        [result] = pipe.run(job.request)
        info = replace(result.info, choice=job.choice) if job.choice else result.info
        return JobOutput(np.asarray(result.image), info, load_s,
                         time.perf_counter() - start, _here())

    def _pipeline(self, key: tuple) -> tuple[Pipeline, float]:
        # One lock for all models: two threads asking for one model must not load it twice,
        # and a batch switches models rarely (jobs are grouped by model).
        with self._lock:
            if key in self._pipelines:
                self._pipelines.move_to_end(key)
                return self._pipelines[key], 0.0
            start = time.perf_counter()
            model, backend, precision, load = key
            pipe = Pipeline.load(model, backend, threads=self._threads, precision=precision,
                                 **dict(load))
            self._pipelines[key] = pipe
            if len(self._pipelines) > MAX_PIPELINES_PER_WORKER:
                self._pipelines.popitem(last=False)
            return pipe, time.perf_counter() - start


def _here() -> str:
    """Where a job ran: host:pid, then the thread unless it is the main one."""
    thread = threading.current_thread()
    suffix = "" if thread is threading.main_thread() else f"/{thread.name}"
    return f"{socket.gethostname()}:{os.getpid()}{suffix}"


def failure_message(exc: BaseException) -> str:
    """One line for a failed job: sdrt's own message, else the exception's type and first line
    (its traceback is logged at INFO, shown by `sdrt -v`)."""
    if isinstance(exc, SdrtError):
        return str(exc)
    log.info("job failed", exc_info=exc)
    return f"{type(exc).__name__}: {first_line(exc)}"


@dataclass(frozen=True)
class LocalEngine:
    """`workers` threads in this process sharing one Worker (a Pipeline is thread-safe)."""

    workers: int
    threads: int | None

    def run(self, jobs: list[Job], done: Done) -> None:
        worker = Worker(self.threads)
        pool = ThreadPoolExecutor(self.workers, thread_name_prefix="batch")
        try:
            futures = {pool.submit(worker.run, job): job for job in jobs}
            for future in as_completed(futures):
                try:
                    outcome = future.result()
                except Exception as exc:  # a job's failure, whatever it is, never stops the batch
                    outcome = failure_message(exc)
                done(futures[future], outcome, 1)
        finally:
            pool.shutdown(wait=False, cancel_futures=True)  # on Ctrl-C, drop jobs not started


# ---------------------------------------------------------------------------------- results

class _Results:
    """Saves each PNG and appends each record to results.jsonl as it happens, so an
    interrupted run keeps what it finished."""

    def __init__(self, out: Path, on_result: Callable[[dict[str, Any]], None] | None) -> None:
        self.out = out
        self.records: list[dict[str, Any]] = []
        self._on_result = on_result
        self._file = open(out / RESULTS_FILE, "a", encoding="utf-8")

    def __enter__(self) -> _Results:
        return self

    def __exit__(self, *exc) -> None:
        self._file.close()

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._file.flush()
        self.records.append(record)
        if self._on_result is not None:
            self._on_result(record)

    def done(self, job: Job, outcome: JobOutput | str, attempts: int) -> None:
        """An engine's report on one job: save its PNG, or record its failure."""
        record = {"id": job.id, "line": job.line}
        if isinstance(outcome, str):
            self.write({**record, "status": "failed", "error": outcome, "attempts": attempts})
            return
        start = time.perf_counter()
        path = self.out / job.file
        try:
            save_png(Image.fromarray(outcome.pixels), path, outcome.info)
        except OSError as exc:  # a full disk or a lost mount: no later job could be saved either
            raise InputError(f"cannot write {path}: {exc.strerror or exc}") from None
        self.write({**record, "status": "done", "file": job.file, "seed": outcome.info.seed,
                    "worker": outcome.worker, "attempts": attempts,
                    "timings": {"load_s": round(outcome.load_s, 4),
                                "generate_s": round(outcome.generate_s, 4),
                                "save_s": round(time.perf_counter() - start, 4)}})
