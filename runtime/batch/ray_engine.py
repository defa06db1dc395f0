"""The `ray` engine of `sdrt batch`: one actor per worker on a Ray cluster, each loading its
pipelines once (`batch.Worker`) and taking one job at a time from the driver.

The scheduler is a small loop over `ray.wait`, not `ray.util.ActorPool`: ActorPool neither
replaces a dead actor nor resubmits the job it held, and Ray's own actor restarts with task
retries would retry silently (no attempt count to report) with no cap per job. With one job in
flight per actor, a worker that dies loses only that job, which goes back to the front of the
queue for another worker (up to MAX_ATTEMPTS runs) while a fresh actor replaces the dead one.

Every node needs sdrt installed (the same version) and the model folders at the paths the jobs
name, as the driver reads them too (a shared mount, or the same layout on every machine). Ray
moves jobs and results with pickle, so this engine, opt-in, is the runtime's one exception to
"nothing is unpickled": join only clusters you run yourself.
"""

from __future__ import annotations

import logging
import os
import re
import socket
from collections import Counter, deque

import ray
from ray.exceptions import RayError, RayTaskError

from sdrt.runtime.batch.runner import Done, Job, JobOutput, Worker, failure_message
from sdrt.runtime.errors import GenerationError, InputError, SdrtError, first_line

log = logging.getLogger(__name__)

# A job whose worker dies this many times running it (out of memory, a crash inside a graph)
# fails, rather than take down one worker after another.
MAX_ATTEMPTS = 3
# The batch stops once workers have died this many times per worker: a cluster that kills every
# actor (sdrt missing on a node, no memory) would otherwise run each job MAX_ATTEMPTS times.
MAX_DEATHS_PER_WORKER = 3
# A cluster's head answers a TCP connect in milliseconds; ray.init's own retries take minutes
# to give up on a wrong address, so one is tried for this long first.
CONNECT_TIMEOUT_S = 10

# Actors are not restarted by Ray (max_restarts=0): the pool replaces a dead one itself.
_RemoteWorker = ray.remote(max_restarts=0)(Worker)


class RayEngine:
    """`workers` actors of `threads` backend threads (and Ray CPUs) each."""

    def __init__(self, workers: int, threads: int, address: str | None) -> None:
        self.workers = workers
        self.threads = threads
        self.address = address

    def run(self, jobs: list[Job], done: Done) -> None:
        started_here = connect(self.address, self.workers * self.threads)
        try:
            _check_capacity(self.workers, self.threads)
            _Pool(self.workers, self.threads).run(jobs, done)
        finally:
            if started_here:
                ray.shutdown()


def connect(address: str | None, cpus: int) -> bool:
    """Join the cluster at `address` (else at RAY_ADDRESS), or start a local one with at least
    `cpus` CPUs; True when this call started Ray, which the caller then shuts down. A Ray
    already initialised in this process (a notebook's, a test's) is used as it is."""
    if ray.is_initialized():
        if address:
            log.info("Ray is already initialised here: using that cluster, not %s", address)
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        _check_reachable(address)
        options = {"address": address}
    else:  # sized for the workers asked for, even when that oversubscribes this machine
        options = {"address": "local", "num_cpus": max(os.cpu_count() or 1, cpus),
                   "include_dashboard": False}
    try:
        ray.init(logging_level=logging.WARNING, **options)
    except Exception as exc:  # Ray raises ConnectionError, ValueError, or a bare Exception
        where = f"reach the Ray cluster at '{address}'" if address else "start a local Ray"
        raise SdrtError(f"cannot {where}: {first_line(exc)}") from None
    return True


def _check_reachable(address: str) -> None:
    """Fail fast when a host:port (or ray://host:port) address refuses or does not answer."""
    match = re.fullmatch(r"(?:ray://)?\[?([^\[\]]+?)\]?:(\d+)", address)
    if match is None:  # "auto", "local": Ray finds the cluster itself
        return
    try:
        socket.create_connection((match[1], int(match[2])), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        raise SdrtError(f"cannot reach the Ray cluster at '{address}': "
                        f"{exc.strerror or 'no answer'}") from None


def _check_capacity(workers: int, threads: int) -> None:
    """Refuse workers no node can host (they would wait forever); warn when not all fit."""
    nodes = [node["Resources"].get("CPU", 0) for node in ray.nodes() if node["Alive"]]
    if max(nodes, default=0) < threads:
        raise InputError(f"no node of the Ray cluster has {threads} CPUs for a worker (largest: "
                         f"{max(nodes, default=0):g}); lower --threads-per-worker")
    if sum(nodes) < workers * threads:
        log.warning("the Ray cluster has %g CPUs; %d workers × %d threads need %d: some workers "
                    "wait until CPUs free up", sum(nodes), workers, threads, workers * threads)


class _Pool:
    """Actors taking one job at a time from a queue; a dead one is replaced, its job retried."""

    def __init__(self, size: int, threads: int) -> None:
        self.threads = threads
        self.actors: list = []
        self.deaths_left = MAX_DEATHS_PER_WORKER * size
        self.idle = [self._start() for _ in range(size)]
        self.running: dict = {}  # ObjectRef of a job's result → (actor, job)
        self.attempts: Counter = Counter()  # job id → runs started

    def _start(self):
        actor = _RemoteWorker.options(num_cpus=self.threads).remote(self.threads)
        self.actors.append(actor)
        return actor

    def run(self, jobs: list[Job], done: Done) -> None:
        queue = deque(jobs)
        try:
            self._fill(queue)
            while self.running:
                [ref], _ = ray.wait(list(self.running), num_returns=1)
                actor, job = self.running.pop(ref)
                outcome = self._outcome(ref, actor, job, queue)
                self._fill(queue)  # keep the workers busy while the driver saves the PNG
                if outcome is not None:
                    done(job, outcome, self.attempts[job.id])
        finally:
            for actor in self.actors:
                ray.kill(actor)

    def _fill(self, queue: deque[Job]) -> None:
        while self.idle and queue:
            actor, job = self.idle.pop(), queue.popleft()
            self.attempts[job.id] += 1
            self.running[actor.run.remote(job)] = (actor, job)

    def _outcome(self, ref, actor, job: Job, queue: deque[Job]) -> JobOutput | str | None:
        """The job's output or failure; None when its worker died and the job went back."""
        try:
            output = ray.get(ref)
        except RayTaskError as exc:  # the job raised; its worker lives on
            self.idle.append(actor)
            return failure_message(exc.cause if exc.cause is not None else exc)
        except RayError as exc:  # the worker died: killed, out of memory, its node lost
            why = first_line(exc)
            self._replace(actor, why)
            if self.attempts[job.id] < MAX_ATTEMPTS:
                log.warning("a Ray worker died running job %s (%s); running it again", job.id,
                            why)
                queue.appendleft(job)
                return None
            return f"its Ray worker died each of {MAX_ATTEMPTS} times it ran; last: {why}"
        self.idle.append(actor)
        return output

    def _replace(self, actor, why: str) -> None:
        ray.kill(actor)  # an actor that is only unreachable must not come back with a stale job
        self.deaths_left -= 1
        if self.deaths_left < 0:
            raise GenerationError(f"Ray workers died {MAX_DEATHS_PER_WORKER} times each; "
                                  f"stopping the batch (last: {why}). Finished jobs are kept: "
                                  "a re-run resumes")
        self.idle.append(self._start())
