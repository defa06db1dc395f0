"""Load test of `sdrt serve` on loopback: `--requests` A1111 txt2img calls from `--clients`
concurrent clients against a queue of `--max-queue`, with health checks throughout.

Passes when every request ends in 200 or 429 (each 429 with Retry-After), no health check fails,
and the server's RSS after the run is within `--max-rss-growth-mb` of its RSS after warm-up (a
burst of 2 × clients requests, after which ONNX Runtime's arenas have grown to their working
size). A client that gets 429 waits Retry-After seconds (at most MAX_BACKOFF_S) before its
next request and does not retry that one: each request is counted once, as it ended.

Usage: python -m sdrt.benchmarks.server_load [--requests 200] [--clients 16] [--max-queue 4]
       [--json out.json] [-- extra `sdrt serve` options, e.g. --model DIR]
(no --model: sdrt's embedded model). Needs the serve extra and httpx.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil

LOOPBACK = "127.0.0.1"
STARTUP_TIMEOUT_S = 120  # loading a full-size model takes tens of seconds on a busy CPU
HEALTH_INTERVAL_S = 0.1
HEALTH_TIMEOUT_S = 5.0  # a health check slower than this counts as failed
REQUEST_TIMEOUT_S = 600.0  # a queued request may wait for every job ahead of it
MAX_BACKOFF_S = 10  # the longest a client waits after a 429, whatever Retry-After says
MAX_RSS_GROWTH_MB = 50.0  # the bound: RSS after the run vs after warm-up
MB = 1024 * 1024

# A txt2img body as A1111 clients send it: StableDiffusionTxt2ImgProcessingAPI's fields at A1111's
# defaults (hires fix off, no scripts), with prompt, seed, sampler, size and steps set (64×64 for
# the embedded model).
A1111_TXT2IMG_BODY = {
    "enable_hr": False, "denoising_strength": 0, "firstphase_width": 0, "firstphase_height": 0,
    "hr_scale": 2, "hr_upscaler": "", "hr_second_pass_steps": 0, "hr_resize_x": 0,
    "hr_resize_y": 0, "hr_sampler_name": "", "hr_prompt": "", "hr_negative_prompt": "",
    "prompt": "a red circle on a blue background", "styles": [], "seed": 1234, "subseed": -1,
    "subseed_strength": 0, "seed_resize_from_h": -1, "seed_resize_from_w": -1,
    "sampler_name": "Euler a", "batch_size": 1, "n_iter": 1, "steps": 20, "cfg_scale": 7,
    "width": 64, "height": 64, "restore_faces": False, "tiling": False,
    "do_not_save_samples": False, "do_not_save_grid": False, "negative_prompt": "",
    "eta": 0, "s_min_uncond": 0, "s_churn": 0, "s_tmax": 0, "s_tmin": 0, "s_noise": 1,
    "override_settings": {}, "override_settings_restore_afterwards": True,
    "script_args": [], "sampler_index": "Euler", "script_name": "", "send_images": True,
    "save_images": False, "alwayson_scripts": {},
}


@dataclass
class Server:
    """A running `sdrt serve` process."""

    url: str
    process: subprocess.Popen
    log: Path  # its stderr: the access log and uvicorn's messages

    def rss_mb(self) -> float:
        return psutil.Process(self.process.pid).memory_info().rss / MB


def free_port() -> int:
    """A TCP port free on loopback now (the server binds it a moment later)."""
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


@contextmanager
def running_server(*options: str, env: dict[str, str] | None = None) -> Iterator[Server]:
    """`sdrt serve --port P *options` in a child process, ready when /health answers."""
    port = free_port()
    command = [sys.executable, "-c", "from sdrt.cli.main import main; main()", "serve",
               "--port", str(port), *options]
    with tempfile.TemporaryDirectory() as scratch:
        log = Path(scratch) / "server.log"
        with log.open("wb") as stderr:
            process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr,
                                       env={**os.environ, **(env or {})})
        server = Server(f"http://{LOOPBACK}:{port}", process, log)
        try:
            _wait_until_up(server)
            yield server
        finally:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _wait_until_up(server: Server) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"sdrt serve exited with {server.process.returncode}: "
                               f"{server.log.read_text(errors='replace')[-2000:]}")
        try:
            if httpx.get(server.url + "/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"sdrt serve did not answer /health within {STARTUP_TIMEOUT_S} s")


async def _health_checks(url: str, stop: asyncio.Event, server: Server) -> dict:
    """Ping /health every HEALTH_INTERVAL_S until `stop`; track failures and peak RSS."""
    checks, failures, slowest, peak = 0, 0, 0.0, 0.0
    async with httpx.AsyncClient(timeout=HEALTH_TIMEOUT_S) as client:
        while not stop.is_set():
            start = time.perf_counter()
            try:
                ok = (await client.get(url + "/health")).status_code == 200
            except httpx.HTTPError:
                ok = False
            checks, failures = checks + 1, failures + (not ok)
            slowest = max(slowest, time.perf_counter() - start)
            peak = max(peak, server.rss_mb())
            await asyncio.sleep(HEALTH_INTERVAL_S)
    return {"checks": checks, "failures": failures, "slowest_ms": round(slowest * 1000, 1),
            "rss_peak_mb": round(peak, 1)}


async def _load(server: Server, requests: int, clients: int) -> dict:
    """`requests` txt2img calls from `clients` concurrent clients (seeds 0, 1, …)."""
    statuses: Counter[int] = Counter()
    missing_retry_after, latencies = 0, []
    todo = iter(range(requests))
    stop = asyncio.Event()
    health = asyncio.create_task(_health_checks(server.url, stop, server))
    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(timeout=REQUEST_TIMEOUT_S, limits=limits) as client:

        async def one_client() -> None:
            nonlocal missing_retry_after
            for seed in todo:
                start = time.perf_counter()
                try:
                    response = await client.post(server.url + "/sdapi/v1/txt2img",
                                                 json={**A1111_TXT2IMG_BODY, "seed": seed})
                    status = response.status_code
                except httpx.HTTPError:
                    status = 0  # no answer at all
                statuses[status] += 1
                if status == 200:
                    latencies.append(time.perf_counter() - start)
                elif status == 429:
                    retry = response.headers.get("retry-after", "")
                    missing_retry_after += not retry.isdigit()
                    # a polite client: wait as told before its next request
                    await asyncio.sleep(min(int(retry or 0), MAX_BACKOFF_S))

        start = time.perf_counter()
        await asyncio.gather(*(one_client() for _ in range(clients)))
        wall = time.perf_counter() - start
    stop.set()
    return {"statuses": {str(k): v for k, v in sorted(statuses.items())},
            "missing_retry_after": missing_retry_after, "wall_s": round(wall, 2),
            "latency_200_ms": _percentiles(latencies), "health": await health}


def _percentiles(seconds: list[float]) -> dict[str, float] | None:
    if len(seconds) < 2:
        return None
    cuts = statistics.quantiles(seconds, n=20, method="inclusive")  # 5 % steps
    return {"p50": round(statistics.median(seconds) * 1000, 1),
            "p95": round(cuts[18] * 1000, 1), "max": round(max(seconds) * 1000, 1)}


def run_load(requests: int, clients: int, max_queue: int,
             serve_options: tuple[str, ...] = ()) -> dict:
    """Start a server on loopback, measure it (see `measure`), stop it."""
    with running_server("--host", LOOPBACK, "--max-queue", str(max_queue),
                        *serve_options) as server:
        report = measure(server, requests, clients)
    return {"max_queue": max_queue, "serve_options": list(serve_options), **report}


def measure(server: Server, requests: int, clients: int) -> dict:
    """Warm the server up, read its RSS, run the load, read its RSS again (see `problems`)."""
    warmup = asyncio.run(_load(server, 2 * clients, clients))
    rss_warm = server.rss_mb()
    run = asyncio.run(_load(server, requests, clients))
    rss_after = server.rss_mb()
    return {
        "requests": requests, "clients": clients, "warmup": warmup, "run": run,
        "rss_after_warmup_mb": round(rss_warm, 1), "rss_after_run_mb": round(rss_after, 1),
        "rss_growth_mb": round(rss_after - rss_warm, 1),
        "machine": {"cpu": platform.processor() or platform.machine(),
                    "cores": os.cpu_count(), "python": platform.python_version(),
                    "load_avg_1m": round(os.getloadavg()[0], 2)},
    }


def problems(report: dict, max_rss_growth_mb: float = MAX_RSS_GROWTH_MB) -> list[str]:
    """What the report breaks of the pass conditions (empty: it passes)."""
    found = []
    for phase in ("warmup", "run"):
        result = report[phase]
        other = {k: v for k, v in result["statuses"].items() if k not in ("200", "429")}
        if other:
            found.append(f"{phase}: requests that ended neither 200 nor 429: {other}")
        if result["missing_retry_after"]:
            found.append(f"{phase}: {result['missing_retry_after']} 429s lacked Retry-After")
        if result["health"]["failures"]:
            found.append(f"{phase}: {result['health']['failures']} of "
                         f"{result['health']['checks']} health checks failed")
    if abs(report["rss_growth_mb"]) > max_rss_growth_mb:
        found.append(f"RSS changed by {report['rss_growth_mb']} MB after warm-up "
                     f"(limit {max_rss_growth_mb} MB)")
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--max-queue", type=int, default=4)
    parser.add_argument("--max-rss-growth-mb", type=float, default=MAX_RSS_GROWTH_MB)
    parser.add_argument("--json", type=Path, default=None, help="write the report here")
    parser.add_argument("serve_options", nargs="*", help="more `sdrt serve` options, after --")
    args = parser.parse_args(argv)
    report = run_load(args.requests, args.clients, args.max_queue, tuple(args.serve_options))
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n", "utf-8")
    found = problems(report, args.max_rss_growth_mb)
    for problem in found:
        print(f"FAIL: {problem}", file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
