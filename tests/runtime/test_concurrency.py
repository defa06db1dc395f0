"""One loaded Pipeline shared by several threads gives the images sequential calls give.

ONNX Runtime's `InferenceSession.run` is thread-safe; OpenVINO's infer requests are not, so its
session hands each caller its own request from a per-shape pool (runtime/session.py). The
requests mix sizes, batch 1 and 2 UNet calls (guidance ≤ 1 and > 1), samplers that draw noise
every step and ones that do not, so threads compile and share OpenVINO shapes at once.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from sdrt.runtime import session as session_module
from sdrt.runtime.pipeline import GenerationRequest, Pipeline
from sdrt.runtime.session import MAX_COMPILED_SHAPES, OpenVinoSession
from tests.conftest import PARITY_SIZES

THREADS, PER_THREAD = 4, 5  # 20 requests: every size, sampler, guidance and batch mix
SAMPLERS = ("euler_a", "dpmpp_2m", "ddim")


def _requests() -> list[GenerationRequest]:
    out = []
    for i in range(THREADS * PER_THREAD):
        width, height = PARITY_SIZES[i % len(PARITY_SIZES)]
        out.append(GenerationRequest(prompt=f"a red circle number {i}", steps=2, seed=i,
                                     sampler=SAMPLERS[i % len(SAMPLERS)], width=width,
                                     height=height, guidance_scale=(7.5, 1.0)[i % 2],
                                     num_images=2 if i % 5 == 4 else 1))
    return out


def _pixels(pipe: Pipeline, request: GenerationRequest) -> list[np.ndarray]:
    return [np.asarray(result.image) for result in pipe.run(request)]


def test_threads_share_a_pipeline(tiny_onnx_dir, backend):
    requests = _requests()
    # threads=1: the callers are the parallelism here (a backend pool per call would oversubscribe)
    shared = Pipeline.load(tiny_onnx_dir, backend=backend, threads=1)  # nothing compiled yet
    start = threading.Barrier(THREADS)

    def worker(chunk: int) -> list[list[np.ndarray]]:
        start.wait()  # all four begin together
        return [_pixels(shared, request)
                for request in requests[chunk * PER_THREAD:(chunk + 1) * PER_THREAD]]

    with ThreadPoolExecutor(THREADS) as pool:
        concurrent = [images for chunk in pool.map(worker, range(THREADS)) for images in chunk]
    sequential = [_pixels(shared, request) for request in requests]  # one at a time, after
    assert len(concurrent) == len(sequential) == THREADS * PER_THREAD
    for i, (ours, reference) in enumerate(zip(concurrent, sequential, strict=True)):
        assert len(ours) == len(reference), i
        for a, b in zip(ours, reference, strict=True):
            assert np.array_equal(a, b), f"request {i} differs between threads and sequence"


def test_openvino_keeps_a_bounded_number_of_compiled_shapes(tiny_onnx_dir, monkeypatch):
    pytest.importorskip("openvino")
    kept = 2  # the real bound (MAX_COMPILED_SHAPES) works alike; fewer compiles keep this quick
    assert MAX_COMPILED_SHAPES > kept
    monkeypatch.setattr(session_module, "MAX_COMPILED_SHAPES", kept)
    session = OpenVinoSession(tiny_onnx_dir / "vae_decoder" / "model.onnx")
    rng = np.random.default_rng(0)
    first = rng.standard_normal((1, 4, 4, 4), dtype=np.float32)
    expected = session.run({"latent_sample": first})["sample"]
    for side in range(5, 5 + kept + 1):  # more shapes than are kept
        session.run({"latent_sample": rng.standard_normal((1, 4, side, 4), dtype=np.float32)})
    assert len(session._compiled) == kept
    # the evicted first shape compiles again and gives the same output
    assert np.array_equal(session.run({"latent_sample": first})["sample"], expected)
