"""ASGI layers around the API: JSON access log with Prometheus counts and security headers,
the credentials check (a Bearer token, A1111's `--api-auth` HTTP Basic pairs, or Basic with the
token as password), and the body-size cap, in that order."""

from __future__ import annotations

import base64
import binascii
import json
import logging
import secrets
import time
from collections.abc import Callable
from datetime import datetime, timezone

from fastapi.security import HTTPBasic, HTTPBearer
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
from starlette.requests import ClientDisconnect
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

access_log = logging.getLogger("sdrt.access")

# The page and API load nothing from elsewhere; a kiosk page must not be framed by another site.
SECURITY_HEADERS = [
    (b"content-security-policy", b"default-src 'self'; img-src 'self' data: blob:; "
                                 b"object-src 'none'; base-uri 'none'; frame-ancestors 'none'"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
]
# Declares the scheme in the OpenAPI description; AuthGate does the checking, before FastAPI.
BEARER = HTTPBearer(auto_error=False, description="the token given to `sdrt serve`")
BASIC = HTTPBasic(auto_error=False, realm="sdrt",
                  description="a user:password of `--api-auth`, or any user with the token")
CLIENT_CLOSED = 499  # nginx's "client closed request": logged, never seen by anyone
PUBLIC_PATHS = frozenset({"/", "/health", "/openapi.json"})  # open even with a token
# Job times on CPUs: under a second (embedded model) to minutes (SDXL at 1024²).
JOB_SECONDS_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


class Metrics:
    """The server's Prometheus metrics, in a registry of its own (not the global one)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)  # process_resident_memory_bytes, CPU seconds
        self.requests = Counter("sdrt_http_requests", "HTTP requests answered",
                                ["method", "route", "status"], registry=self.registry)
        self.rejected = Counter("sdrt_queue_rejected",
                                "Generation requests refused because the queue was full",
                                registry=self.registry)
        self.jobs = Counter("sdrt_jobs", "Generation jobs that left the queue", ["outcome"],
                            registry=self.registry)
        self.job_seconds = Histogram("sdrt_job_duration_seconds", "Generation time of a job",
                                     buckets=JOB_SECONDS_BUCKETS, registry=self.registry)
        self._queue = Gauge("sdrt_queue_jobs", "Admitted jobs by state", ["state"],
                            registry=self.registry)

    def watch(self, counts: Callable[[], tuple[int, int]]) -> None:
        """Report the queue's (queued, running) counts at each scrape."""
        self._queue.labels("queued").set_function(lambda: counts()[0])
        self._queue.labels("running").set_function(lambda: counts()[1])

    def finished(self, outcome: str, seconds: float) -> None:
        self.jobs.labels(outcome).inc()
        if outcome in ("done", "interrupted"):
            self.job_seconds.observe(seconds)


class AccessLog:
    """One JSON line per request (no query string, body or credentials), counted in metrics,
    with SECURITY_HEADERS added to every response."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status, sent, started = time.perf_counter(), 500, 0, False

        async def send_logged(message: Message) -> None:
            nonlocal status, sent, started
            if message["type"] == "http.response.start":
                status, started = message["status"], True
                message["headers"] = [*message.get("headers", []), *SECURITY_HEADERS]
            elif message["type"] == "http.response.body":
                sent += len(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, receive, send_logged)
            if not started:  # the client went away before any answer (e.g. mid-upload)
                status = CLIENT_CLOSED
        except ClientDisconnect:
            status = CLIENT_CLOSED
            raise
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")  # a template: few labels
            self.metrics.requests.labels(scope["method"], route, str(status)).inc()
            client = scope.get("client")
            access_log.info(json.dumps({
                "time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
                "client": client[0] if client else None, "method": scope["method"],
                "path": scope["path"], "status": status, "bytes": sent,
                "ms": round((time.perf_counter() - start) * 1000, 1),
            }))


class BodyLimit:
    """413 for a request body over `limit` bytes, declared or streamed (chunked)."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            return await self._refuse(scope, receive, send)
        chunks, size = [], 0
        while True:  # read it all here (at most `limit` bytes), then hand it on
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            size += len(message.get("body", b""))
            if size > self.limit:
                return await self._refuse(scope, receive, send)
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        body, handed = b"".join(chunks), False

        async def replay() -> Message:
            nonlocal handed
            if handed:
                return await receive()  # after the body: the client's disconnect, if any
            handed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = JSONResponse(error_body("PayloadTooLarge", "the request body is over "
                                           f"{self.limit:,} bytes, this server's limit"), 413)
        await response(scope, receive, send)


def error_body(kind: str, detail: str) -> dict[str, str]:
    """sdrt's JSON error: the kind and one line saying what was wrong."""
    return {"error": kind, "detail": detail}


class AuthGate:
    """401 for a request without valid credentials, before its body is read, on every path but
    the public ones (the page, its static files, /health, /openapi.json). Accepted: the token
    (Bearer TOKEN, or HTTP Basic with it as password) and `--api-auth` user:password pairs
    (HTTP Basic, as A1111). The 401 names each scheme that works (RFC 9110 §11.6.1)."""

    def __init__(self, app: ASGIApp, token: str | None,
                 credentials: tuple[tuple[str, str], ...] = ()) -> None:
        self.app = app
        self.token = token.encode() if token else None
        self.credentials = [(user.encode(), password.encode()) for user, password in credentials]
        self.challenges = [*([(b"www-authenticate", b"Bearer")] if token else []),
                           (b"www-authenticate", b'Basic realm="sdrt"')]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self._public(scope["path"]) or self._allowed(scope):
            return await self.app(scope, receive, send)
        how = ("Authorization: Bearer TOKEN, or " if self.token else "") + "HTTP Basic"
        response = JSONResponse(error_body("Unauthorized", f"valid credentials are required "
                                           f"({how})"), 401)
        response.raw_headers.extend(self.challenges)
        await response(scope, receive, send)

    @staticmethod
    def _public(path: str) -> bool:
        return path in PUBLIC_PATHS or path.startswith("/static/")

    def _allowed(self, scope: Scope) -> bool:
        header = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
        scheme, _, value = header.partition(" ")
        if scheme.lower() == "bearer":
            return self.token is not None and secrets.compare_digest(value.strip().encode(),
                                                                     self.token)
        if scheme.lower() != "basic":
            return False
        try:
            user, _, password = base64.b64decode(value.strip(), validate=True).partition(b":")
        except (binascii.Error, ValueError):
            return False
        # every pair is compared, matched or not: the time taken does not say which one failed
        matches = [secrets.compare_digest(user, u) & secrets.compare_digest(password, p)
                   for u, p in self.credentials]
        if self.token is not None:
            matches.append(secrets.compare_digest(password, self.token))
        return any(matches)
