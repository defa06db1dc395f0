"""Compile the UNet and VAE decoder for a request's shapes while the text encoder runs.

OpenVINO compiles a graph per set of input shapes on its first call (runtime/session.py), so a
first generation compiled the text encoder, ran it, then compiled the UNet (~2.3 s for SD 1.5
on 2 cores), then the VAE decoder, one after the other. Compiling is partly serial (SD 1.5's
three graphs: 2.8 s in a row, 2.4 s at once, measured on this 2-core CPU), so starting the
UNet's and decoder's compiles on a background thread as the request starts overlaps them with
each other and with the text encoder's compile and call; each graph gets its own thread, as
one thread compiling the decoder after the UNet ran it during the UNet's first call, which uses
both cores. Their first calls wait for the compile under way (OpenVinoSession.prepare holds the
session's lock) instead of starting one.
"""

from __future__ import annotations

import logging
import threading

from sdrt.runtime.components import UNet, VaeDecoder
from sdrt.runtime.session import OpenVinoSession

log = logging.getLogger(__name__)


def compile_ahead(unet: UNet, decoder: VaeDecoder, *, unet_batch: int,
                  latent: tuple[int, int, int], context_length: int) -> list[threading.Thread]:
    """Start compiling `unet` for calls at `unet_batch` and `decoder` for one (C, h, w)
    `latent`, each on a daemon thread; the threads started, none for a graph that is not an
    OpenVINO session or whose other input dims the graph leaves open (ONNX Runtime compiles
    once, at load)."""
    jobs = []
    if isinstance(unet.session, OpenVinoSession):
        shapes = unet.feed_shapes(unet_batch, latent[1:], context_length)
        if shapes is not None:
            jobs.append((unet.session, shapes))
    if isinstance(decoder.session, OpenVinoSession) and type(decoder) is VaeDecoder:
        jobs.append((decoder.session, {"latent_sample": (1, *latent)}))
    threads = [threading.Thread(target=_prepare, args=job, daemon=True,
                                name=f"sdrt-compile-{job[0].label}") for job in jobs]
    for thread in threads:
        thread.start()
    return threads


def _prepare(session: OpenVinoSession, shapes: dict[str, tuple[int, ...]]) -> None:
    try:
        session.prepare(shapes)
    except Exception as exc:  # the call itself compiles again and reports what is wrong
        log.debug("compiling %s ahead failed: %s", session.label, exc)
