"""OpenVINO compiles the UNet and VAE decoder for a request's shapes ahead of their first call
(runtime/compile_ahead.py): the shapes it predicts must be the ones the calls feed, or each
first call would compile a second time."""

from __future__ import annotations

import numpy as np
import pytest

from sdrt.runtime.components import UNet
from sdrt.runtime.pipeline import Pipeline
from sdrt.runtime.session import OpenVinoSession, TensorSpec

CASES = {  # fixture, request options: guided and unguided batches, SDXL's added inputs, LCM's
    "sd15 guided, 2 images": ("tiny_onnx_dir", {"guidance_scale": 7.5, "num_images": 2}),
    "sd15 unguided": ("tiny_onnx_dir", {"guidance_scale": 1.0, "width": 72, "height": 56}),
    "sdxl guided": ("tiny_sdxl_onnx_dir", {"guidance_scale": 5.0}),
    "lcm embedding": ("tiny_lcm_onnx_dir", {"guidance_scale": 4.0}),
    "inpainting UNet": ("tiny_inpaint_onnx_dir", {"guidance_scale": 7.5}),
}


@pytest.mark.parametrize("case", CASES)
def test_compiled_ahead_with_the_shapes_the_calls_feed(case, request, monkeypatch):
    pytest.importorskip("openvino")
    fixture, options = CASES[case]
    pipe = Pipeline.load(request.getfixturevalue(fixture), backend="openvino")
    prepared = []
    original = OpenVinoSession.prepare

    def recording_prepare(session, shapes):
        prepared.append(session)
        original(session, shapes)

    monkeypatch.setattr(OpenVinoSession, "prepare", recording_prepare)
    pipe.generate("a red circle", steps=2, seed=0, **options)
    # one thread each (appended before compiling, so before the call waiting for it returns)
    assert sorted(map(id, prepared)) == sorted([id(pipe.unet.session),
                                                id(pipe.vae_decoder.session)])
    # one compiled model each: the calls found the shapes compiled ahead
    assert len(pipe.unet.session._compiled) == 1
    assert len(pipe.vae_decoder.session._compiled) == 1


def test_ahead_compile_gives_the_same_image(tiny_onnx_dir, monkeypatch):
    pytest.importorskip("openvino")
    ahead = Pipeline.load(tiny_onnx_dir, backend="openvino").generate("a blue square", steps=2,
                                                                       seed=3)
    monkeypatch.setattr("sdrt.runtime.architectures.unet.compile_ahead",
                        lambda *args, **kwargs: None)
    on_call = Pipeline.load(tiny_onnx_dir, backend="openvino").generate("a blue square",
                                                                         steps=2, seed=3)
    assert np.array_equal(np.asarray(ahead[0]), np.asarray(on_call[0]))


class _Specs:
    def __init__(self, **shapes) -> None:
        self.inputs = {name: TensorSpec(name, shape, np.float32) for name, shape in shapes.items()}
        self.outputs = {"out_sample": TensorSpec("out_sample", (None, 4, None, None), np.float32)}


def test_feed_shapes_fill_batch_size_and_context_length_only():
    unet = UNet(_Specs(sample=(None, 4, None, None), timestep=(None,),
                       encoder_hidden_states=(None, None, 32), text_embeds=(None, 64),
                       time_ids=(None, 6)))
    assert unet.feed_shapes(2, (8, 12), 77) == {
        "sample": (2, 4, 8, 12), "timestep": (2,), "encoder_hidden_states": (2, 77, 32),
        "text_embeds": (2, 64), "time_ids": (2, 6)}
    # a width left dynamic by the graph cannot be predicted: nothing is compiled ahead
    unsure = UNet(_Specs(sample=(None, 4, None, None), timestep=(),
                         encoder_hidden_states=(None, None, None)))
    assert unsure.feed_shapes(1, (8, 8), 77) is None
