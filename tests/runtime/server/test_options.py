"""A1111's settings API (runtime/server/options.py): GET /options in A1111's shape, POST storing
any key within bounds and refusing bad values of the keys sdrt reads in one line, the same
checks on a request's override_settings, and the model routes of a server made from a bare
Pipeline (one model, titled by its name)."""

from __future__ import annotations

import base64
import io

import pytest
from PIL import Image

for _module in ("fastapi", "httpx"):
    pytest.importorskip(_module, reason=f"{_module} is missing (pip install 'sdrt[serve]' httpx)")

from fastapi.testclient import TestClient  # noqa: E402

from sdrt.runtime.model.folder import EMBEDDED_MODEL  # noqa: E402
from sdrt.runtime.model.manifest import Manifest  # noqa: E402
from sdrt.runtime.pipeline import Pipeline  # noqa: E402
from sdrt.runtime.server.app import create_app  # noqa: E402
from sdrt.runtime.server.options import MAX_KEYS, MAX_VALUE_BYTES  # noqa: E402
from sdrt.runtime.server.settings import ServerSettings  # noqa: E402

OPTIONS = "/sdapi/v1/options"
SHA256 = Manifest.load(EMBEDDED_MODEL).files["unet/model.onnx"].sha256
TITLE = f"embedded [{SHA256[:10]}]"  # models/embedded/onnx: the model's name, not "onnx"


@pytest.fixture(scope="module")
def client() -> TestClient:
    with TestClient(create_app(Pipeline.load(EMBEDDED_MODEL), ServerSettings())) as client:
        yield client


def test_get_options_has_what_clients_read(client: TestClient) -> None:
    options = client.get(OPTIONS).json()
    assert options["sd_model_checkpoint"] == TITLE
    assert options["sd_checkpoint_hash"] == SHA256
    assert options["sd_vae"] == "Automatic"
    assert options["CLIP_stop_at_last_layers"] == 1
    assert options["eta_noise_seed_delta"] == 0
    assert options["samples_format"] == "png"
    assert options["sd_checkpoints_limit"] == 1
    assert options["sd_checkpoints_keep_in_cpu"] is True


def test_post_stores_any_key_and_answers_null(client: TestClient) -> None:
    body = {"my_extension_setting": {"a": [1, 2]}, "eta_noise_seed_delta": 31337,
            "samples_format": "jpg", "sd_model_checkpoint": "embedded", "sd_vae": "Automatic",
            "CLIP_stop_at_last_layers": 1}
    response = client.post(OPTIONS, json=body)
    assert response.status_code == 200 and response.json() is None
    options = client.get(OPTIONS).json()
    assert {key: options[key] for key in body} == {**body, "sd_model_checkpoint": TITLE}
    client.post(OPTIONS, json={"eta_noise_seed_delta": 0, "samples_format": "png"})


@pytest.mark.parametrize(("body", "message"), [
    ({"CLIP_stop_at_last_layers": 2}, "CLIP_stop_at_last_layers 2 is not supported"),
    ({"CLIP_stop_at_last_layers": "2"}, "CLIP_stop_at_last_layers must be int, got a string"),
    ({"eta_noise_seed_delta": True}, "eta_noise_seed_delta must be int, got a boolean"),
    ({"eta_noise_seed_delta": -1}, "eta_noise_seed_delta must be at least 0"),
    ({"samples_format": "gif"}, "samples_format 'gif' is not one of: png, jpg, jpeg, webp"),
    ({"jpeg_quality": 0}, "jpeg_quality must be between 1 and 100"),
    ({"sd_vae": "vae-ft-mse"}, "sd_vae 'vae-ft-mse' is not one of: Automatic, None"),
    ({"sd_model_checkpoint": "sd15"}, f"unknown checkpoint 'sd15'; choose one of: {TITLE}"),
    ({"sd_checkpoint_hash": "0" * 64}, "sd_checkpoint_hash follows the model"),
    ({"x": "y" * MAX_VALUE_BYTES}, "x: a value is at most"),
    ({f"k{i}": i for i in range(MAX_KEYS + 1)}, f"at most {MAX_KEYS} options"),
])
def test_bad_values_are_one_line_422s_and_nothing_is_stored(client: TestClient, body: dict,
                                                              message: str) -> None:
    response = client.post(OPTIONS, json={"stored_if_valid": 1, **body})
    assert response.status_code == 422
    detail = response.json()["detail"]
    assert message in detail and "\n" not in detail
    assert "stored_if_valid" not in client.get(OPTIONS).json()


def test_post_needs_a_json_object(client: TestClient) -> None:
    assert client.post(OPTIONS, json=[1, 2]).status_code == 422


def test_override_settings_are_checked_as_options(client: TestClient) -> None:
    body = {"prompt": "a red circle", "steps": 1, "width": 64, "height": 64, "seed": 3}
    bad = client.post("/sdapi/v1/txt2img",
                      json={**body, "override_settings": {"CLIP_stop_at_last_layers": 2}})
    assert bad.status_code == 422 and "CLIP_stop_at_last_layers" in bad.json()["detail"]
    plain = client.post("/sdapi/v1/txt2img", json=body).json()
    same = client.post("/sdapi/v1/txt2img", json={**body, "override_settings": {
        "sd_model_checkpoint": TITLE, "CLIP_stop_at_last_layers": 1}}).json()
    assert same["images"] == plain["images"]
    assert client.get(OPTIONS).json()["CLIP_stop_at_last_layers"] == 1


def test_samples_format_sets_the_response_images_format(client: TestClient) -> None:
    body = {"prompt": "a red circle", "steps": 1, "width": 64, "height": 64, "seed": 3}

    def image(**overrides) -> Image.Image:
        response = client.post("/sdapi/v1/txt2img", json={**body, **overrides}).json()
        return Image.open(io.BytesIO(base64.b64decode(response["images"][0])))

    assert image().format == "PNG"
    client.post(OPTIONS, json={"samples_format": "jpg", "jpeg_quality": 95})
    try:
        jpeg = image()
        comment = jpeg.getexif().get_ifd(0x8769)[0x9286]  # EXIF UserComment, as A1111 writes
        assert jpeg.format == "JPEG" and comment.startswith(b"UNICODE\0")
        assert comment[8:].decode("utf-16-be").startswith("a red circle\nSteps: 1")
        assert image(override_settings={"samples_format": "webp"}).format == "WEBP"
        assert image().format == "JPEG"  # the override was for one request
    finally:
        client.post(OPTIONS, json={"samples_format": "png"})
    assert image().format == "PNG"


def test_model_routes_of_a_bare_pipeline(client: TestClient) -> None:
    models = client.get("/sdapi/v1/sd-models").json()
    assert models == [{"title": TITLE, "model_name": "embedded", "hash": SHA256[:10],
                       "sha256": SHA256, "filename": "embedded", "config": None}]
    assert client.get("/sdapi/v1/sd-vae").json() == []
    for path in ("/sdapi/v1/refresh-checkpoints", "/sdapi/v1/refresh-vae"):
        response = client.post(path)
        assert response.status_code == 200 and response.json() is None
    assert client.get("/sdapi/v1/sd-models").json() == models
