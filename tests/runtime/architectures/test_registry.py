"""The architecture strategies: every family runs on one, and what one does not support is
refused in one line, the same line wherever it is asked (planner, load, request)."""

from __future__ import annotations

import pytest

from sdrt.runtime.architectures import ARCHITECTURES, architecture_for
from sdrt.runtime.architectures.base import FEATURES, check_request, refusal
from sdrt.runtime.errors import InputError, ModelError
from sdrt.runtime.memory.plan import plan_request
from sdrt.runtime.model.families import FAMILIES, Family
from sdrt.runtime.model.folder import EMBEDDED_MODEL
from sdrt.runtime.model.opened import OpenedModel
from sdrt.runtime.pipeline import GenerationRequest, Pipeline


@pytest.mark.parametrize("family", FAMILIES.values(), ids=list(FAMILIES))
def test_every_family_has_a_strategy(family: Family) -> None:
    strategy = architecture_for(family)
    assert strategy.name == family.architecture
    assert strategy.features <= set(FEATURES)
    assert strategy.denoiser_graph in strategy.required
    assert "vae_decoder" in strategy.required


def test_an_unknown_architecture_is_a_model_error() -> None:
    with pytest.raises(ModelError, match="has no runtime strategy"):
        architecture_for(Family("sd9", "SD 9", "sd9", steps=1, guidance_scale=1.0))


@pytest.mark.parametrize("architecture, request_", [
    ("sd3", GenerationRequest("x", deepcache=3)),
    ("sd1", GenerationRequest("x", skip_layers=(7,))),
    ("sdxl-refiner", GenerationRequest("x", skip_layers=(1, 2))),
])
def test_unsupported_features_are_refused_in_one_line(architecture, request_) -> None:
    with pytest.raises(InputError) as caught:
        check_request(ARCHITECTURES[architecture], request_)
    message = str(caught.value)
    assert "\n" not in message and message.endswith("models")
    assert message == refusal(ARCHITECTURES[architecture], "deepcache" if request_.deepcache
                              else "skip_layers")


def test_only_sdxl_hands_latents_to_a_refiner() -> None:
    assert [name for name, a in ARCHITECTURES.items() if "refiner_base" in a.features] == ["sdxl"]
    assert refusal(ARCHITECTURES["sd3"], "img2img") == \
        "image-to-image is not supported for SD 3 models"


def test_the_planner_and_the_pipeline_refuse_alike() -> None:
    """Skip layers on SD 1.x: the planner (before loading) and a loaded pipeline say the same."""
    request = GenerationRequest("x", steps=1, skip_layers=(1,))
    with pytest.raises(InputError) as planned:
        plan_request(EMBEDDED_MODEL, "ort", "fp32", request, mode="auto", budget=None)
    model = OpenedModel.open(EMBEDDED_MODEL)
    pipe = Pipeline.load(model)
    with pytest.raises(InputError) as ran:
        pipe.run(request)
    assert str(planned.value) == str(ran.value) == refusal(model.architecture, "skip_layers")
    assert pipe.precision == model.precision and pipe.facts == model.facts
    with pytest.raises(InputError, match="opened for ort fp32"):
        Pipeline.load(model, "openvino")
