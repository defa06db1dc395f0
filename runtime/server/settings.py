"""The server's limits and bind address, checked before anything listens (safe defaults), and
the prompt settings every request runs with."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sdrt.runtime.errors import InputError

if TYPE_CHECKING:
    from sdrt.runtime.adapters.adapted import LoraRequest
    from sdrt.runtime.server.styles import PromptStyle

DEFAULT_HOST = "127.0.0.1"  # loopback: nothing off this machine can reach the server
DEFAULT_PORT = 7860  # A1111's port, so its clients find the server where they expect it
# Jobs waiting for a worker (A1111 queues without bound; webuiapi does not retry a 429, so a
# client script's thread pool, typically 8–32 threads, must fit). A waiting txt2img job holds a
# few kB; an img2img one its decoded picture (≤ max_pixels × 12 B, 12 MB at 1024²): 64 of them
# stay well under a kiosk's memory while covering any client's parallelism.
DEFAULT_MAX_QUEUE = 64
DEFAULT_MAX_PIXELS = 1024 * 1024  # per image: SDXL's native size, the largest a kiosk CPU serves
DEFAULT_MAX_STEPS = 50  # A1111's own default step count; more is rarely better, always slower
DEFAULT_MAX_BATCH = 4  # images per request (batch_size × n_iter)
# Each open request's body is held in memory. 16 MiB carries a 1024² PNG (≤ 3 MB) and its mask
# in base64 (+33 %) with room to spare, or a phone photo as JPEG.
DEFAULT_MAX_BODY_BYTES = 16 * 1024 * 1024
MIN_TOKEN_CHARS = 16  # a token guessable by brute force over a LAN protects nothing
LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost"})


@dataclass(frozen=True)
class ServerSettings:
    """Where to listen and what a request may ask for."""

    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    token: str | None = field(default=None, repr=False)  # secrets stay out of logs
    # `--api-auth user:pass[,user2:pass2]`: HTTP Basic credentials, as A1111 takes them
    api_auth: tuple[tuple[str, str], ...] = field(default=(), repr=False)
    max_queue: int = DEFAULT_MAX_QUEUE
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_steps: int = DEFAULT_MAX_STEPS
    max_batch: int = DEFAULT_MAX_BATCH
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    workers: int = 1
    cors_origins: tuple[str, ...] = ()
    # `sdrt serve --lora/--prompt-syntax/--emphasis`: applied to every request (A1111 keeps
    # emphasis as a server-wide setting too); None: the request's own default
    loras: tuple[LoraRequest, ...] = ()
    prompt_syntax: str | None = None
    emphasis: str | None = None
    styles: tuple[PromptStyle, ...] = ()  # `--styles FILE` (A1111's styles.csv)

    def request_fields(self) -> dict[str, Any]:
        """The GenerationRequest fields these settings set for every request."""
        fields = {"loras": self.loras, "prompt_syntax": self.prompt_syntax,
                  "emphasis": self.emphasis}
        return {name: value for name, value in fields.items() if value not in (None, ())}

    def validate(self) -> None:
        """Refuse settings that would expose an open server or make no sense."""
        if not is_loopback(self.host) and not self.token and not self.api_auth:
            raise InputError(f"--host {self.host} is not a loopback address: set a token "
                             "(--token or SDRT_TOKEN) or credentials (--api-auth or "
                             "SDRT_API_AUTH) so that only their holders can generate")
        if self.token is not None and len(self.token) < MIN_TOKEN_CHARS:
            raise InputError(f"the token must be at least {MIN_TOKEN_CHARS} characters, "
                             f"got {len(self.token)}")
        for name in ("max_pixels", "max_steps", "max_batch", "max_body_bytes",
                     "workers"):
            if getattr(self, name) < 1:
                raise InputError(f"{name.replace('_', '-')} must be at least 1, "
                                 f"got {getattr(self, name)}")
        if self.max_queue < 0:
            raise InputError(f"max-queue must be at least 0, got {self.max_queue}")
        if "*" in self.cors_origins:
            raise InputError("--cors-origin '*' would let any web page drive the server; "
                             "name each origin (e.g. http://kiosk.local:8080)")
        if not 0 <= self.port <= 65535:
            raise InputError(f"port must be in 0..65535, got {self.port}")
        self._validate_prompt_settings()

    def _validate_prompt_settings(self) -> None:
        from sdrt.runtime.prompts import EMPHASES, SYNTAXES  # not needed to read the limits

        for option, value, choices in (("--prompt-syntax", self.prompt_syntax, SYNTAXES),
                                       ("--emphasis", self.emphasis, EMPHASES)):
            if value is not None and value not in choices:
                raise InputError(f"{option} {str(value)[:20]!r} is not one of: "
                                 f"{', '.join(choices)}")


def parse_api_auth(text: str | None) -> tuple[tuple[str, str], ...]:
    """A1111's `--api-auth` value, `user:pass[,user2:pass2]`, as (user, password) pairs."""
    pairs = []
    for item in (text or "").split(","):
        user, colon, password = item.strip().partition(":")
        if not item.strip():
            continue
        if not colon or not user or not password:
            # never echo the value: it holds passwords
            raise InputError("--api-auth must be user:password[,user2:password2], each with a "
                             "user name and a non-empty password")
        pairs.append((user, password))
    return tuple(pairs)


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and the usual names of this machine's loopback interface."""
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to any interface
        return False
