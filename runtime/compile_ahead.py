"""Compile the UNet and VAE decoder for a request's shapes while the text encoder runs.

OpenVINO compiles a graph per set of input shapes on its first call (runtime/session.py), so a
first generation compiled the text encoder, ran it, then compiled the UNet (~2.3 s for SD 1.5
on 2 cores), then the VAE decoder, one after the other. Compiling is partly serial (SD 1.5's
three graphs: 2.8 s in a row, 2.4 s at once, measured on this 2-core CPU), so starting the
UNet's and decoder's compiles on a background thread as the request starts overlaps them with
each other and with the text encoder's compile and call. Their first calls then wait for the
compile under way (OpenVinoSession.prepare holds the session's lock) instead of starting one.
"""

from __future__ import annotations

import logging
import threading

from sdrt.runtime.components import UNet, VaeDecoder
from sdrt.runtime.session import OpenVinoSession

log = logging.getLogger(__name__)


def compile_ahead(unet: UNet, decoder: VaeDecoder, *, unet_batch: int,
                  latent: tuple[int, int, int], context_length: int) -> threading.Thread | None:
    """Start compiling `unet` for calls at `unet_batch` and `decoder` for one (C, h, w)
    `latent`, on a daemon thread that is returned; None when neither is an OpenVINO session
    with those shapes fixed by the graph (ONNX Runtime compiles once, at load)."""
    jobs = []
    if isinstance(unet.session, OpenVinoSession):
        shapes = unet.feed_shapes(unet_batch, latent[1:], context_length)
        if shapes is not None:
            jobs.append((unet.session, shapes))
    if isinstance(decoder.session, OpenVinoSession) and type(decoder) is VaeDecoder:
        jobs.append((decoder.session, {"latent_sample": (1, *latent)}))
    if not jobs:
        return None
    thread = threading.Thread(target=_prepare_all, args=(jobs,), daemon=True,
                              name="sdrt-compile-ahead")
    thread.start()
    return thread


def _prepare_all(jobs: list[tuple[OpenVinoSession, dict[str, tuple[int, ...]]]]) -> None:
    for session, shapes in jobs:
        try:
            session.prepare(shapes)
        except Exception as exc:  # the call itself compiles again and reports what is wrong
            log.debug("compiling %s ahead failed: %s", session.label, exc)
