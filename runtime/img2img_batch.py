"""Several init images in one request, A1111's batch over `init_images`: image i of the request
starts from inits[i % len(inits)] with seed + i (and subseed + i), so each image equals the one
a request of that init alone with that seed would make. One init image is an ordinary batch
(`Pipeline.run`); with several, each image is its own run of one, and progress counts over all.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import numpy as np

from sdrt.runtime.errors import InputError
from sdrt.runtime.img2img import ImageInput
from sdrt.runtime.pipeline import GeneratedImage, Pipeline, StepCallback
from sdrt.runtime.request import GenerationRequest
from sdrt.runtime.rng import make_generator


def run_images(pipe: Pipeline, request: GenerationRequest, inits: Sequence[ImageInput],
               callback: StepCallback | None = None) -> list[GeneratedImage]:
    """The request's images, image i from inits[i % len(inits)] with seed + i; A1111 refuses
    more init images than images, and so does this. `callback(i, n, latents)` counts the
    steps of every image; when it returns True the image in progress is the last."""
    if not inits:
        raise InputError("init_images is empty: give at least one picture")
    if len(inits) == 1:
        return pipe.run(request, callback=callback, init=inits[0])
    req = request.resolve(pipe.facts, pipe.scheduler)
    if req.hires is not None:  # as Pipeline.run refuses it for one init image
        raise InputError("the hires fix is for text-to-image (A1111's txt2img), not for an "
                         "image input")
    count = req.num_images
    if len(inits) > count:
        raise InputError(f"{len(inits)} init images but the request makes {count} images: ask "
                         f"for at least {len(inits)} (batch_size × n_iter)")
    results: list[GeneratedImage] = []
    for i in range(count):
        stopped = False

        def step(j: int, n: int, latents: np.ndarray, done: int = i) -> bool | None:
            nonlocal stopped
            if callback is not None and callback(done * n + j, count * n, latents):
                stopped = True
            return stopped

        one = _image_request(req, i)  # resolved already: run from step 3, no second check
        results += pipe.run_resolved(one, [make_generator(one.generator, one.seed)],
                                     inits[i % len(inits)], step)
        if stopped:
            break
    return results


def _image_request(req: GenerationRequest, i: int) -> GenerationRequest:
    """Image i of a resolved request alone: seed + i, and subseed + i where one is set."""
    one = replace(req, seed=req.seed + i, num_images=1)
    return one if req.subseed is None else replace(one, subseed=req.subseed + i)
