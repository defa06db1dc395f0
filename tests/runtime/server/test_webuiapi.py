"""`sdrt serve` driven by `webuiapi`, the public AUTOMATIC1111 client, unchanged: every call the
A1111 API answers answers here too (never 404), with and without `--api-auth`; 16 concurrent
txt2img calls queue and finish in arrival order; hires fix, variation seeds, styles, skip,
png-info; the bad inputs of docs/server-api.md's table each get a one-line 4xx."""

from __future__ import annotations

import base64
import io
import json
import socket
import threading
import time
from urllib.parse import urlsplit

import numpy as np
import pytest
from PIL import Image

for _module in ("fastapi", "uvicorn", "prometheus_client", "httpx", "webuiapi"):
    pytest.importorskip(_module, reason=f"{_module} is missing (pip install 'sdrt[serve,dev]')")

import httpx  # noqa: E402
import webuiapi  # noqa: E402

from sdrt.benchmarks.server_load import running_server  # noqa: E402
from sdrt.runtime.metadata import parse_parameters  # noqa: E402

WAIT_S = 120  # bound on one call (a busy CI machine is slow, never this slow)
SIZE = 64  # the embedded model's native side: the cheapest image
FAST = {"width": SIZE, "height": SIZE, "steps": 2, "cfg_scale": 3.0}
CONCURRENT = 16  # the count of parallel webuiapi calls
STAGGER_S = 0.1  # between sends, so that the arrival order is defined
USERS = "alice:wonder-land-7,bob:builder-9"
STYLES_CSV = ('name,prompt,negative_prompt\n'
              '"blue","{prompt} on a blue background","blurry"\n'
              '"small","small","text, watermark"\n')
# The long job /skip stops: the most steps this server takes, at a size whose step is slow
# enough to be caught running (it never runs to its end: skip stops it at its next step).
LONG = {"width": 256, "height": 256, "steps": 50}


@pytest.fixture(scope="module")
def styles_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("styles") / "styles.csv"
    path.write_text(STYLES_CSV)
    return path


@pytest.fixture(scope="module")
def server(styles_file):
    """The default settings (one worker, a waiting list of 64), with a styles file."""
    with running_server("--styles", str(styles_file)) as running:
        yield running


@pytest.fixture(scope="module")
def guarded():
    """`--api-auth` from the environment (kept out of `ps`), as A1111 deployments set it."""
    with running_server(env={"SDRT_API_AUTH": USERS}) as running:
        yield running


def client(server, auth: tuple[str, str] | None = None) -> tuple[webuiapi.WebUIApi, list]:
    """A webuiapi client of `server` and the list every HTTP answer it gets is recorded in."""
    url = urlsplit(server.url)
    api = webuiapi.WebUIApi(host=url.hostname, port=url.port, sampler="Euler a", steps=2)
    answers: list = []
    api.session.hooks["response"].append(lambda r, *_, **__: answers.append(r))
    if auth:
        api.set_auth(*auth)
    return api, answers


def b64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def every_call(api: webuiapi.WebUIApi) -> None:
    """Each call of webuiapi the issue names (results checked by the other tests)."""
    picture = Image.new("RGB", (SIZE, SIZE), (200, 30, 30))
    mask = Image.new("L", (SIZE, SIZE), 0)
    mask.paste(255, (16, 16, 48, 48))
    made = api.txt2img(prompt="a red circle", seed=1, **FAST)
    api.img2img(images=[picture], prompt="a blue square", seed=2, **FAST)
    api.img2img(images=[picture], mask_image=mask, prompt="a blue square", seed=2, **FAST)
    api.png_info(made.image)
    for call in (api.get_options, api.get_cmd_flags, api.get_progress, api.get_samplers,
                 api.get_schedulers, api.get_sd_vae, api.get_upscalers,
                 api.get_latent_upscale_modes, api.get_loras, api.get_sd_models,
                 api.get_hypernetworks, api.get_face_restorers, api.get_realesrgan_models,
                 api.get_prompt_styles, api.get_scripts, api.get_embeddings, api.get_memory,
                 api.refresh_checkpoints, api.interrupt, api.skip, api.util_get_current_model,
                 api.util_get_model_names, api.util_get_sampler_names,
                 api.util_get_scheduler_names):
        call()
    api.set_options({"samples_format": "png"})
    api.extra_single_image(picture, upscaler_1="Lanczos", upscaling_resize=2)
    api.extra_batch_images([picture, picture], upscaler_1="Nearest", upscaling_resize=1.5)
    for route in ("refresh-vae", "refresh-loras", "unload-checkpoint", "reload-checkpoint"):
        api.session.post(f"{api.baseurl}/{route}")
    for route in ("script-info", "extensions", "sd-modules"):
        api.session.get(f"{api.baseurl}/{route}")


@pytest.mark.parametrize("which", ["open", "api-auth"])
def test_every_webuiapi_call_answers(which, request):
    server = request.getfixturevalue("server" if which == "open" else "guarded")
    api, answers = client(server, ("bob", "builder-9") if which == "api-auth" else None)
    every_call(api)
    failed = {urlsplit(r.url).path: r.status_code for r in answers if r.status_code != 200}
    assert failed == {}
    assert len(answers) >= 37  # every call was made (webuiapi probes /scripts on start too)


def test_extras_upscale_as_a1111_and_missing_features_are_4xx(server):
    api, _ = client(server)
    picture = Image.new("RGB", (SIZE, SIZE // 2), (10, 200, 30))
    assert api.extra_single_image(picture, upscaler_1="Lanczos").image.size == (128, 64)
    cropped = api.extra_single_image(picture, resize_mode=1, upscaling_resize_w=96,
                                     upscaling_resize_h=96, upscaler_1="Nearest")
    assert cropped.image.size == (96, 96)
    assert api.extra_single_image(picture).image.size == picture.size  # "None": as it came
    batch = api.extra_batch_images([picture] * 2, upscaler_1="Lanczos", upscaling_resize=3)
    assert [image.size for image in batch.images] == [(192, 96)] * 2
    for route, body, words in (
            ("interrogate", {"image": b64(picture), "model": "clip"}, "no interrogator"),
            ("extra-single-image", {"image": b64(picture), "upscaler_1": "ESRGAN_4x"},
             "unknown upscaler_1 'ESRGAN_4x'"),
            ("extra-single-image", {"image": b64(picture), "codeformer_visibility": 1},
             "face restoration")):
        answer = httpx.post(f"{api.baseurl}/{route}", json=body, timeout=WAIT_S)
        assert answer.status_code == 422 and words in answer.json()["detail"]


def test_an_unloaded_model_loads_again_for_the_next_job(server):
    api, _ = client(server)
    assert api.session.post(f"{api.baseurl}/unload-checkpoint").status_code == 200
    assert api.txt2img(prompt="a red circle", seed=1, **FAST).image.size == (SIZE, SIZE)
    assert api.util_get_current_model() in api.util_get_model_names()


def test_api_auth_challenges_and_refuses(guarded):
    url = guarded.url + "/sdapi/v1/sd-models"
    bare = httpx.get(url, timeout=WAIT_S)
    assert bare.status_code == 401
    assert bare.headers.get_list("www-authenticate") == ['Basic realm="sdrt"']
    assert httpx.get(url, auth=("alice", "wrong"), timeout=WAIT_S).status_code == 401
    assert httpx.get(url, auth=("bob", "wonder-land-7"), timeout=WAIT_S).status_code == 401
    assert httpx.get(url, auth=("alice", "wonder-land-7"), timeout=WAIT_S).status_code == 200
    api, _ = client(guarded)  # no set_auth: webuiapi's call gets the 401
    with pytest.raises(RuntimeError, match="401"):
        api.txt2img(prompt="a red circle", **FAST)
    flags = httpx.get(guarded.url + "/sdapi/v1/cmd-flags", auth=("alice", "wonder-land-7"),
                      timeout=WAIT_S)
    assert flags.json()["api_auth"] is True and "wonder" not in flags.text
    assert "wonder" not in guarded.log.read_text() and "builder" not in guarded.log.read_text()


def started_order(server) -> list[str]:
    """The task ids in the order the server's worker started them (its job log)."""
    lines = [json.loads(line) for line in server.log.read_text().splitlines()
             if line.startswith('{"job"')]
    return [line["job"] for line in lines if line["event"] == "started"]


def test_16_concurrent_calls_all_succeed_in_arrival_order(server):
    api, _ = client(server)
    results: list = [None] * CONCURRENT

    def call(i: int) -> None:
        results[i] = api.txt2img(prompt="a green triangle", seed=100 + i, **FAST)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(CONCURRENT)]
    for thread in threads:
        thread.start()
        time.sleep(STAGGER_S)
    for thread in threads:
        thread.join(WAIT_S)
    assert all(isinstance(r, webuiapi.WebUIApiResult) for r in results)  # none raised (429)
    tasks = [r.info["task_id"] for r in results]
    assert [r.info["seed"] for r in results] == [100 + i for i in range(CONCURRENT)]
    order = [task for task in started_order(server) if task in tasks]
    assert order == tasks  # served in the order they arrived


def test_waiting_job_reports_its_place_and_skip_stops_only_the_current(server):
    api, _ = client(server)
    first, second = "task(skip-first)", "task(skip-second)"
    body = {"prompt": "a yellow star", **LONG, "seed": 4, "sampler_name": "Euler"}
    replies: dict = {}

    def send(task: str, extra: dict) -> None:
        replies[task] = httpx.post(server.url + "/sdapi/v1/txt2img",
                                   json={**body, **extra, "force_task_id": task},
                                   timeout=WAIT_S)

    def progress(task: str) -> dict:
        return httpx.get(server.url + "/sdapi/v1/progress", params={"id_task": task},
                         timeout=WAIT_S).json()

    threads = [threading.Thread(target=send, args=(first, {})),
               threading.Thread(target=send, args=(second, {"steps": 2, "width": SIZE,
                                                            "height": SIZE}))]
    threads[0].start()
    deadline = time.monotonic() + WAIT_S
    while progress(first)["state"]["sampling_step"] == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    threads[1].start()
    while not progress(second)["state"]["queued"] and time.monotonic() < deadline:
        time.sleep(0.02)
    waiting = progress(second)
    assert waiting["state"]["queue_position"] == 1 and waiting["progress"] == 0
    assert waiting["textinfo"] == "Queued: 1 job(s) ahead"
    assert api.skip() == {}
    for thread in threads:
        thread.join(WAIT_S)
    skipped, after = (json.loads(replies[t].json()["info"]) for t in (first, second))
    assert skipped["skipped"] is True and not skipped["interrupted"]
    assert after["skipped"] is False and replies[second].status_code == 200
    assert after["steps"] == 2


def test_styles_are_listed_and_applied_as_a1111(server):
    api, _ = client(server)
    assert api.get_prompt_styles() == [
        {"name": "blue", "prompt": "{prompt} on a blue background", "negative_prompt": "blurry"},
        {"name": "small", "prompt": "small", "negative_prompt": "text, watermark"}]
    result = api.txt2img(prompt="a red circle", negative_prompt="dark", styles=["blue", "small"],
                         seed=3, **FAST)
    assert result.info["prompt"] == "a red circle on a blue background, small"
    assert result.info["negative_prompt"] == "dark, blurry, text, watermark"
    assert result.info["styles"] == ["blue", "small"]
    with pytest.raises(RuntimeError, match=r"422.*unknown style.*nope.*styles: blue, small"):
        api.txt2img(prompt="x", styles=["nope"], **FAST)


def test_png_info_memory_and_flags(server):
    api, _ = client(server)
    made = api.txt2img(prompt="a red circle", seed=9, **FAST)
    read = api.png_info(made.image)
    assert read.info == made.info["infotexts"][0]  # webuiapi keeps the text as is
    assert read.parameters["Seed"] == "9" and read.parameters["prompt"] == "a red circle"
    memory = api.get_memory()
    assert set(memory["ram"]) == {"free", "used", "total"} and "error" in memory["cuda"]
    assert 0 < memory["ram"]["used"] < memory["ram"]["total"]
    flags = api.get_cmd_flags()
    assert flags["api"] is True and flags["api_auth"] is False and flags["listen"] is False
    assert flags["port"] == urlsplit(server.url).port
    assert [u["name"] for u in api.get_upscalers()] == ["None", "Lanczos", "Nearest"]
    assert {"name": "Latent (nearest-exact)"} in api.get_latent_upscale_modes()
    config = httpx.get(server.url + "/sdrt/v1/config", timeout=WAIT_S).json()
    assert "circle" in config["example_prompt"]  # a caption the embedded model was made for


def test_hires_fix_returns_the_upscaled_size_and_infotext(server):
    api, _ = client(server)
    for upscaler, name in ((webuiapi.HiResUpscaler.Latent, "Latent"), ("Lanczos", "Lanczos")):
        result = api.txt2img(prompt="a red circle", seed=5, enable_hr=True, hr_scale=2,
                             hr_upscaler=upscaler, denoising_strength=0.5, **FAST)
        assert result.image.size == (2 * SIZE, 2 * SIZE)
        fields = parse_parameters(result.info["infotexts"][0])
        assert (fields["Hires upscale"], fields["Hires upscaler"]) == ("2", name)
        assert result.info["width"] == SIZE  # A1111 reports the first pass's size


def test_variation_seed_strength_zero_and_one(server):
    api, _ = client(server)

    # a deterministic sampler: an ancestral one draws its later noise from the seed alone
    # (A1111 too), so strength 1 would not give the subseed's image there
    same = {"prompt": "a blue square", "sampler_name": "Euler", **FAST}

    def pixels(**fields) -> np.ndarray:
        return np.asarray(api.txt2img(**same, **fields).image)

    seed_image, subseed_image = pixels(seed=21), pixels(seed=22)
    zero = api.txt2img(**same, seed=21, subseed=22, subseed_strength=0.0)
    one = pixels(seed=21, subseed=22, subseed_strength=1.0)
    assert np.array_equal(np.asarray(zero.image), seed_image)
    assert np.array_equal(one, subseed_image)
    half = api.txt2img(**same, seed=21, subseed=22, subseed_strength=0.5)
    assert (half.info["subseed"], half.info["subseed_strength"]) == (22, 0.5)
    assert "Variation seed: 22, Variation seed strength: 0.5" in half.info["infotexts"][0]


def test_several_init_images_make_a_batch(server):
    api, _ = client(server)
    red, green = (Image.new("RGB", (SIZE, SIZE), colour) for colour in ((200, 30, 30),
                                                                          (30, 200, 30)))
    small_mask = Image.new("L", (SIZE // 2, SIZE // 2), 0)  # another size: resized (A1111)
    small_mask.paste(255, (8, 8, 24, 24))
    result = api.img2img(images=[red, green], mask_image=small_mask, prompt="a circle",
                         seed=7, denoising_strength=0.5, **FAST)
    assert len(result.images) == 2 and result.info["all_seeds"] == [7, 8]


BAD_INPUTS = [  # (body, status, words the message must hold); docs/server-api.md's table
    ({"cfg_scale": 1e38}, 422, "cfg_scale must be between 0 and 100"),
    ({"steps": True}, 422, "steps"),
    ({"cfg_scale": True}, 422, "cfg_scale"),
    ({"batch_size": 17}, 422, "between 1 and 4 on this server"),
    ({"steps": 51}, 422, "between 1 and 50 on this server"),
    ({"sampler_name": "Hune"}, 422, "sampler"),
    ({"styles": ["nope"]}, 422, "unknown style"),
    ({"enable_hr": True, "hr_scale": 100}, 422, "hires scale must be"),
    ({"scheduler": "bogus"}, 422, "unknown schedule 'bogus'"),
    ({"enable_hr": True, "hr_upscaler": "Bogus"}, 422, "Bogus"),
    ({"subseed_strength": 2}, 422, "subseed_strength"),
    ({"restore_faces": True}, 422, "restore_faces"),
    ({"width": 2048, "height": 2048}, 422, "pixels"),
]


@pytest.mark.parametrize("body, status, words", BAD_INPUTS,
                         ids=[next(iter(b)) for b, _, _ in BAD_INPUTS])
def test_bad_inputs_are_one_line_4xx(server, body, status, words):
    response = httpx.post(server.url + "/sdapi/v1/txt2img", json={"prompt": "x", **FAST, **body},
                          timeout=WAIT_S)
    assert response.status_code == status, response.text
    assert words in response.json()["detail"] and "\n" not in response.json()["detail"]


def test_no_warning_or_path_in_the_log_and_aborted_uploads_are_client_closes(server):
    httpx.post(server.url + "/sdapi/v1/txt2img", json={"prompt": "x", **FAST, "cfg_scale": 1e38},
               timeout=WAIT_S)
    url = urlsplit(server.url)
    with socket.create_connection((url.hostname, url.port), timeout=WAIT_S) as sock:
        sock.sendall(b"POST /sdapi/v1/img2img HTTP/1.1\r\nHost: x\r\n"
                     b"Content-Type: application/json\r\nContent-Length: 100000\r\n\r\n"
                     b'{"init_images": ["iVBORw0KGgo')  # then the client goes away
    deadline = time.monotonic() + WAIT_S
    metrics = ""
    while 'status="499"' not in metrics and time.monotonic() < deadline:
        time.sleep(0.1)
        metrics = httpx.get(server.url + "/metrics", timeout=WAIT_S).text
    assert 'method="POST",route="unmatched",status="499"' in metrics
    assert 'status="500"' not in metrics
    log = server.log.read_text()
    assert "Warning" not in log and "Traceback" not in log and ".py" not in log
