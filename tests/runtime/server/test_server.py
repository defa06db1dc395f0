"""`sdrt serve` end to end: a real server process on loopback (embedded model), spoken to with
AUTOMATIC1111 client bodies; the queue's 429s, interrupt and disconnects; the token rule; a
small load run; and the kiosk page in headless Chromium (Debian's, driven by Playwright)."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

for _module in ("fastapi", "uvicorn", "prometheus_client", "httpx"):
    pytest.importorskip(_module, reason=f"{_module} is missing (pip install 'sdrt[serve]' httpx)")

import httpx  # noqa: E402

from sdrt.benchmarks.server_load import (  # noqa: E402
    A1111_TXT2IMG_BODY,
    free_port,
    measure,
    problems,
    running_server,
)
from sdrt.runtime.errors import InputError  # noqa: E402
from sdrt.runtime.metadata import parse_parameters  # noqa: E402
from sdrt.runtime.model.folder import EMBEDDED_MODEL  # noqa: E402
from sdrt.runtime.server.settings import ServerSettings, is_loopback  # noqa: E402

WAIT_S = 60  # bound on waiting for a state change (a busy CI machine is slow, never this slow)
LONG_STEPS = 1000  # the most steps a request may ask
PAGE_SIZE = 96  # the kiosk page's image side: long enough a job to watch its progress (below)
# Jobs the tests stop or abandon while they run: ~1 min each at 128² (the embedded model's
# steps cost 4× those at 64²), far longer than any test waits, even on a fast machine.
LONG = {"steps": LONG_STEPS, "width": 128, "height": 128}
BODY_LIMIT = 300_000  # bytes; small so the 413 test sends little
TOKEN = "kiosk-token-0123456789"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu",
                 "--disable-background-networking", "--disable-component-update",
                 "--no-first-run"]


@pytest.fixture(scope="module")
def server():
    # two running and one waiting: three admitted at once
    with running_server("--workers", "2", "--max-queue", "1", "--max-steps", str(LONG_STEPS),
                        "--max-body-bytes", str(BODY_LIMIT)) as running:
        yield running


def post(server, path: str, body: dict, **kwargs) -> httpx.Response:
    return httpx.post(server.url + path, json=body, timeout=WAIT_S * 2, **kwargs)


def wait_for(predicate, what: str, state=None):
    """Poll `predicate` until it holds; on giving up, say what `state()` shows then."""
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    pytest.fail(f"gave up waiting for {what}" + (f"; {state()}" if state else ""))


def health(server) -> dict:
    return httpx.get(server.url + "/health", timeout=WAIT_S).json()


def png(base64_text: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(base64_text)))


def png_b64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def check_error(response: httpx.Response, status: int, mentions: str = "") -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error", "detail"} and "\n" not in body["detail"], body
    assert mentions in body["detail"], body


def test_a1111_client_body_unchanged(server):
    response = post(server, "/sdapi/v1/txt2img", A1111_TXT2IMG_BODY)
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {"images", "parameters", "info"}
    info = json.loads(body["info"])  # A1111: `info` is JSON text
    assert info["seed"] == 1234 and info["all_seeds"] == [1234]
    assert info["sampler_name"] == "Euler a" and info["steps"] == 20
    assert body["parameters"]["prompt"] == A1111_TXT2IMG_BODY["prompt"]
    image = png(body["images"][0])
    assert image.size == (64, 64)
    assert image.info["parameters"] == info["infotexts"][0]
    fields = parse_parameters(image.info["parameters"])
    assert (fields["Seed"], fields["Sampler"], fields["Steps"]) == ("1234", "Euler a", "20")
    # no filesystem path in the response or the image's metadata
    for text in (response.text, image.info["parameters"], image.info["sdrt"]):
        assert str(EMBEDDED_MODEL) not in text and str(EMBEDDED_MODEL.parent) not in text
    again = post(server, "/sdapi/v1/txt2img", A1111_TXT2IMG_BODY).json()
    assert np.array_equal(np.asarray(png(again["images"][0])), np.asarray(image))


def test_img2img_and_inpainting(server):
    picture = Image.new("RGB", (64, 64), (200, 30, 30))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    body = {"init_images": [png_b64(picture)], "prompt": "a blue square", "seed": 5,
            "denoising_strength": 0.5, "steps": 10, "cfg_scale": 3, "sampler_name": "Euler",
            "width": 64, "height": 64, "resize_mode": 0, "mask_blur": 4,
            "include_init_images": False}
    plain = post(server, "/sdapi/v1/img2img", body)
    assert plain.status_code == 200, plain.text
    assert json.loads(plain.json()["info"])["denoising_strength"] == 0.5
    assert plain.json()["parameters"]["init_images"] is None  # as A1111 answers
    with_url = {**body, "init_images": ["data:image/png;base64," + png_b64(picture)],
                "mask": png_b64(mask)}
    inpainted = post(server, "/sdapi/v1/img2img", with_url)
    assert inpainted.status_code == 200, inpainted.text
    out = np.asarray(png(inpainted.json()["images"][0]).convert("RGB"))
    assert np.array_equal(out[0, 0], np.asarray(picture)[0, 0])  # kept outside the mask


def test_concurrent_requests_match_sequential(server):
    bodies = [{**A1111_TXT2IMG_BODY, "seed": seed, "prompt": prompt}
              for seed, prompt in [(11, "a red circle"), (12, "a green square")]]
    alone = [post(server, "/sdapi/v1/txt2img", body).json()["images"][0] for body in bodies]
    for _ in range(2):  # two workers: both run at once
        with ThreadPoolExecutor(2) as pool:
            together = list(pool.map(lambda b: post(server, "/sdapi/v1/txt2img", b), bodies))
        assert [r.status_code for r in together] == [200, 200]
        for single, shared in zip(alone, together, strict=True):
            assert np.array_equal(np.asarray(png(single)),
                                  np.asarray(png(shared.json()["images"][0])))


def test_progress_preview_and_interrupt(server):
    task = "task(progress-test)"
    body = {"prompt": "a yellow star", **LONG, "seed": 3, "force_task_id": task}
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(post, server, "/sdapi/v1/txt2img", body)

        def running_with_preview():
            p = httpx.get(server.url + "/sdapi/v1/progress", params={"id_task": task},
                          timeout=WAIT_S).json()
            return p if p["state"]["sampling_step"] > 0 and p["current_image"] else None

        progress = wait_for(running_with_preview, "progress with a preview")
        assert 0 < progress["progress"] < 1 and progress["state"]["job"] == task
        assert png(progress["current_image"]).size == (128, 128)
        assert httpx.get(server.url + "/sdapi/v1/progress", timeout=WAIT_S).json()["state"][
            "job"] == task  # A1111's form: the current job
        stopped = httpx.post(server.url + "/sdapi/v1/interrupt", params={"id_task": task},
                             timeout=WAIT_S)
        assert stopped.json() == {}  # as A1111 answers
        response = pending.result()
    assert response.status_code == 200  # A1111 returns the picture as it stands
    info = json.loads(response.json()["info"])
    assert info["interrupted"] is True and info["task_id"] == task


def long_jobs(pool: ThreadPoolExecutor, server, seeds: range, timeout: float = WAIT_S * 2):
    """Long txt2img requests (task ids `task(long-SEED)`) sent from `pool`, each once the
    previous one is admitted, so they queue in order."""
    admitted = sum(health(server)[k] for k in ("queued", "running"))
    pending = []
    for n, seed in enumerate(seeds, start=admitted + 1):
        body = {"prompt": "a purple star", **LONG, "seed": seed,
                "force_task_id": f"task(long-{seed})"}
        pending.append(pool.submit(httpx.post, server.url + "/sdapi/v1/txt2img", json=body,
                                   timeout=timeout))
        wait_for(lambda n=n: sum(health(server)[k] for k in ("queued", "running")) == n,
                 f"{n} admitted jobs")
    return pending


def interrupt(server, task: str | None = None) -> None:
    params = {"id_task": task} if task else {}
    answer = httpx.post(server.url + "/sdapi/v1/interrupt", params=params, timeout=WAIT_S)
    assert answer.json() == {}  # as A1111 answers


def test_full_queue_answers_429_with_retry_after(server):
    with ThreadPoolExecutor(3) as pool:
        pending = long_jobs(pool, server, range(3))  # two workers run two; the third waits
        wait_for(lambda: health(server)["running"] == 2, "two running jobs")
        waiting = httpx.get(server.url + "/sdapi/v1/progress",
                            params={"id_task": "task(long-2)"}, timeout=WAIT_S).json()
        assert waiting["state"]["queue_position"] == 2 and waiting["progress"] == 0
        refused = post(server, "/sdapi/v1/txt2img", A1111_TXT2IMG_BODY)
        check_error(refused, 429)
        assert int(refused.headers["retry-after"]) >= 1
        interrupt(server, "task(long-2)")  # stops at its first step
        interrupt(server)
        assert [p.result().status_code for p in pending] == [200, 200, 200]
        assert all(json.loads(p.result().json()["info"])["interrupted"] for p in pending)
    assert post(server, "/sdapi/v1/txt2img", A1111_TXT2IMG_BODY).status_code == 200


def test_disconnected_clients_free_their_slots(server):
    idle = {"status": "ok", "queued": 0, "running": 0, "capacity": 3}
    with ThreadPoolExecutor(3) as pool:
        kept = long_jobs(pool, server, range(2))
        wait_for(lambda: health(server)["running"] == 2, "two running jobs")
        # a waiting job whose client gives up and closes the connection leaves the queue
        (gone,) = long_jobs(pool, server, range(2, 3), timeout=3.0)
        with pytest.raises(httpx.ReadTimeout):
            gone.result()
        wait_for(lambda: health(server) == {**idle, "running": 2}, "the waiting slot to free")
        interrupt(server)
        assert [p.result().status_code for p in kept] == [200, 200]
    # so does a running one: it stops at its next step
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/sdapi/v1/txt2img", timeout=3.0,
                   json={"prompt": "a grey circle", **LONG, "seed": 9})
    wait_for(lambda: health(server) == idle, "the running slot to free")
    metrics = httpx.get(server.url + "/metrics", timeout=WAIT_S).text
    assert 'sdrt_jobs_total{outcome="cancelled"} 2.0' in metrics


def test_bad_requests_get_one_line_json_4xx(server):
    url = "/sdapi/v1/txt2img"
    check_error(post(server, url, {"prompt": "x", "steps": "many"}), 422, "steps")
    check_error(post(server, url, {"prompt": "x", "width": 63}), 422, "width")
    check_error(post(server, url, {"prompt": "x", "steps": LONG_STEPS + 1}), 422, "steps")
    check_error(post(server, url, {"prompt": "x", "width": 2048, "height": 2048}), 422,
                "pixels")
    check_error(post(server, url, {"prompt": "x", "batch_size": 5}), 422, "batch_size")
    check_error(post(server, url, {"prompt": "x", "restore_faces": True}), 422, "restore_faces")
    check_error(post(server, url, {"prompt": "x", "sampler_name": "Hune"}), 422, "sampler")
    check_error(post(server, url, {"prompt": "x", "seed": -7}), 422, "seed")
    check_error(post(server, "/sdapi/v1/img2img", {"init_images": ["not base64!"]}), 422,
                "base64")
    check_error(post(server, "/sdapi/v1/img2img", {"init_images": ["aGVsbG8="]}), 422,
                "not an image")
    malformed = httpx.post(server.url + url, content=b"{", timeout=WAIT_S,
                           headers={"content-type": "application/json"})
    check_error(malformed, 422)
    check_error(post(server, url, {"prompt": "x" * BODY_LIMIT}), 413, "bytes")
    check_error(httpx.get(server.url + url, timeout=WAIT_S), 405)


def test_info_endpoints_page_and_log(server):
    samplers = httpx.get(server.url + "/sdapi/v1/samplers", timeout=WAIT_S).json()
    assert "Euler a" in [s["name"] for s in samplers]
    models = httpx.get(server.url + "/sdapi/v1/sd-models", timeout=WAIT_S).json()
    assert len(models) == 1 and "/" not in models[0]["filename"]
    metrics = httpx.get(server.url + "/metrics", timeout=WAIT_S).text
    assert "process_resident_memory_bytes" in metrics and "sdrt_queue_jobs" in metrics
    schema = httpx.get(server.url + "/openapi.json", timeout=WAIT_S).json()
    assert {"/sdapi/v1/txt2img", "/sdapi/v1/progress"} <= set(schema["paths"])
    page = httpx.get(server.url + "/", timeout=WAIT_S)
    assert page.status_code == 200 and "default-src 'self'" in page.headers[
        "content-security-policy"]
    assert httpx.get(server.url + "/static/app.js", timeout=WAIT_S).status_code == 200
    lines = [json.loads(line) for line in server.log.read_text().splitlines()
             if line.startswith("{")]
    assert {"time", "client", "method", "path", "status", "ms"} <= set(lines[-1])
    assert all("prompt" not in json.dumps(line) for line in lines)


def test_small_load_run(server):
    """The 200-request run lives in benchmarks/server_load.py; this is its small sibling."""
    report = measure(server, requests=16, clients=8)
    assert problems(report) == []
    assert report["run"]["statuses"].get("200", 0) > 0


def test_non_loopback_bind_without_token_refuses_to_start():
    port = free_port()
    done = subprocess.run([sys.executable, "-c", "from sdrt.cli.main import main; main()",
                           "serve", "--host", "0.0.0.0", "--port", str(port)],
                          capture_output=True, text=True, timeout=WAIT_S,
                          env={k: v for k, v in os.environ.items() if k != "SDRT_TOKEN"})
    assert done.returncode == 1
    assert done.stderr.startswith("error: --host 0.0.0.0 is not a loopback address")
    with socket.socket() as sock:
        assert sock.connect_ex(("127.0.0.1", port)) != 0  # nothing listens


def test_non_loopback_bind_with_token_requires_it():
    with running_server("--host", "0.0.0.0", "--max-body-bytes", "1000",
                        env={"SDRT_TOKEN": TOKEN}) as guarded:
        models = guarded.url + "/sdapi/v1/sd-models"
        check_error(httpx.get(models, timeout=WAIT_S), 401)
        check_error(httpx.get(models, headers={"Authorization": "Bearer wrong-token-xxxxxxx"},
                              timeout=WAIT_S), 401)
        check_error(post(guarded, "/sdapi/v1/txt2img", A1111_TXT2IMG_BODY), 401)
        assert httpx.get(guarded.url + "/metrics", timeout=WAIT_S).status_code == 401
        assert httpx.get(models, headers={"Authorization": f"Bearer {TOKEN}"},
                         timeout=WAIT_S).status_code == 200
        assert httpx.get(models, auth=("a1111-user", TOKEN), timeout=WAIT_S).status_code == 200
        assert httpx.get(guarded.url + "/health", timeout=WAIT_S).status_code == 200
        assert httpx.get(guarded.url + "/", timeout=WAIT_S).status_code == 200
        big = {"prompt": "x" * 2000}  # over the body cap: refused unread without the token
        check_error(post(guarded, "/sdapi/v1/txt2img", big), 401)
        check_error(post(guarded, "/sdapi/v1/txt2img", big,
                         headers={"Authorization": f"Bearer {TOKEN}"}), 413)
        schema = httpx.get(guarded.url + "/openapi.json", timeout=WAIT_S).json()
        assert "HTTPBearer" in schema["components"]["securitySchemes"]


EMBEDDED_TINY_VAE = EMBEDDED_MODEL.parent / "tiny_vae" / "onnx"


def test_vae_option_decodes_with_the_tiny_vae_and_names_it():
    from sdrt.runtime.pipeline import Pipeline
    from sdrt.runtime.vae.tiny import TinyVaeManifest

    tiny = TinyVaeManifest.load(EMBEDDED_TINY_VAE)
    body = {"prompt": "a red circle", "seed": 7, "steps": 4, "sampler_name": "Euler",
            "cfg_scale": 5, "width": 64, "height": 64}
    with running_server("--vae", str(EMBEDDED_TINY_VAE)) as served:
        response = post(served, "/sdapi/v1/txt2img", body)
        vaes = httpx.get(served.url + "/sdapi/v1/sd-vae", timeout=WAIT_S).json()
    assert response.status_code == 200, response.text
    info = json.loads(response.json()["info"])
    image = png(response.json()["images"][0])
    fields = parse_parameters(image.info["parameters"])
    assert (fields["VAE"], fields["VAE hash"]) == (tiny.name, tiny.autov2_hash)
    assert (info["sd_vae_name"], info["sd_vae_hash"]) == (tiny.name, tiny.autov2_hash)
    assert vaes == [{"model_name": tiny.name, "filename": tiny.name}]
    for text in (response.text, image.info["parameters"], image.info["sdrt"]):
        assert str(EMBEDDED_TINY_VAE.parent) not in text  # names, never paths
    pipe = Pipeline.load(EMBEDDED_MODEL, vae=EMBEDDED_TINY_VAE)  # what `generate --vae` makes
    [expected] = pipe.generate(body["prompt"], seed=7, steps=4, sampler="euler",
                               guidance_scale=5, width=64, height=64)
    assert np.array_equal(np.asarray(image), np.asarray(expected))


def test_the_default_server_names_no_vae(server):
    body = json.loads(post(server, "/sdapi/v1/txt2img", {**A1111_TXT2IMG_BODY, "steps": 1})
                      .json()["info"])
    assert (body["sd_vae_name"], body["sd_vae_hash"]) == (None, None)
    assert "VAE" not in parse_parameters(body["infotexts"][0])
    assert httpx.get(server.url + "/sdapi/v1/sd-vae", timeout=WAIT_S).json() == []


@pytest.mark.parametrize("vae, message", [
    (EMBEDDED_MODEL, "is not a tiny autoencoder folder"),
    (EMBEDDED_MODEL / "missing", "does not exist or is not a folder"),
])
def test_a_bad_vae_folder_is_a_one_line_error_before_listening(vae, message):
    port = free_port()
    done = subprocess.run([sys.executable, "-c", "from sdrt.cli.main import main; main()",
                           "serve", "--port", str(port), "--vae", str(vae)],
                          capture_output=True, text=True, timeout=WAIT_S)
    assert done.returncode == 1
    assert done.stderr.startswith("error: ") and message in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr
    with socket.socket() as sock:
        assert sock.connect_ex(("127.0.0.1", port)) != 0  # nothing listens


def test_settings_refuse_unsafe_combinations():
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.5")
    with pytest.raises(InputError, match="token"):
        ServerSettings(host="0.0.0.0").validate()
    with pytest.raises(InputError, match="at least 16"):
        ServerSettings(host="0.0.0.0", token="short").validate()
    with pytest.raises(InputError, match="name each origin"):
        ServerSettings(cors_origins=("*",)).validate()
    ServerSettings(host="0.0.0.0", token=TOKEN).validate()


def chromium() -> str:
    """Debian's chromium and Playwright, or a skip (a failure under SDRT_REQUIRE_BROWSER=1)."""
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        path, missing = None, "playwright is not installed (pip install playwright)"
    else:
        missing = "chromium is not installed (apt-get install chromium)"
    if path is None:
        if os.environ.get("SDRT_REQUIRE_BROWSER") == "1":
            pytest.fail(f"SDRT_REQUIRE_BROWSER=1 but {missing}")
        pytest.skip(missing)
    return path


def test_kiosk_page_in_headless_chromium():
    executable = chromium()  # skips (or fails) before the import when playwright is missing
    from playwright.sync_api import sync_playwright

    # A server of its own: after test_disconnected_clients_free_their_slots on the shared one,
    # the page's job stayed "Queued" while /health said idle (not yet explained; see the
    # session note), and this test is about the page.
    with running_server("--workers", "2", "--max-queue", "3",
                        "--max-steps", str(LONG_STEPS)) as server:
        _drive_the_page(server, executable, sync_playwright)


def page_state(page, server, console: list[str]) -> str:
    """What the page and the server show, for a failure message."""
    return (f"page status {page.text_content('#status')!r}, progress "
            f"{page.eval_on_selector('#progress', 'p => p.value')}, server {health(server)}, "
            f"console {console[-5:]}")


def _drive_the_page(server, executable, sync_playwright) -> None:

    outside: list[str] = []

    def only_this_server(route):
        if route.request.url.startswith(server.url):
            return route.continue_()
        outside.append(route.request.url)
        return route.abort()

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            console: list[str] = []
            page.on("console", lambda message: console.append(message.text))
            # playwright's 30 s default: a page load on a 2-core machine running other jobs
            # (load average 11) timed out; the test is about the page, not its speed
            page.set_default_timeout(WAIT_S * 1000)
            page.route("**/*", only_this_server)
            page.goto(server.url + "/")
            # the page's CSP forbids eval, so conditions are polled here, not in the page
            wait_for(lambda: page.text_content("#model"), "the page to load its config")
            # a prompt the embedded model knows (its manifest's example_prompt)
            assert "circle" in page.get_attribute("#prompt", "placeholder")
            page.fill("#prompt", "a red circle on a blue background")
            page.fill("#width", "2048")  # over the server's pixel cap: its 422 shows in red
            page.fill("#height", "2048")
            page.click("#generate")
            page.wait_for_selector("#status.error")
            assert "pixels" in page.text_content("#status")
            page.fill("#width", str(PAGE_SIZE))  # the next valid input clears the stale error
            assert page.text_content("#status") == "Ready"
            assert page.get_attribute("#status", "class") in ("", None)
            # ~9 s on an idle machine. At 64² (~4 s) a loaded machine answered only two of the
            # page's polls, one mid-job, and this loop missed the 1.8 s the bar showed it; at
            # 300 steps (1.3 s) even an idle one saw no progress or preview (at most one a second)
            page.fill("#width", str(PAGE_SIZE))
            page.fill("#height", str(PAGE_SIZE))
            page.fill("#steps", str(LONG_STEPS))
            page.fill("#seed", "7")
            page.click("#generate")
            wait_for(lambda: 0 < page.eval_on_selector("#progress", "p => p.value") < 1,
                     "the progress bar to move", lambda: page_state(page, server, console))
            page.wait_for_selector("#preview:not([hidden])", timeout=WAIT_S * 1000)
            page.wait_for_selector("#gallery img", timeout=WAIT_S * 1000)
            assert page.text_content("#status").startswith("Done (seed 7)")
            assert page.eval_on_selector("#gallery img", "img => img.naturalWidth") == PAGE_SIZE
            link = page.locator("#gallery a")
            assert link.get_attribute("download") == "sdrt-7.png"
            with page.expect_download() as download:
                link.click()
            saved = Image.open(download.value.path())
            assert saved.size == (PAGE_SIZE, PAGE_SIZE)
            assert "Seed: 7" in saved.info["parameters"]  # the PNG's A1111 metadata
        finally:
            browser.close()
    assert outside == []  # the page asked nothing of any other host


def test_schedulers_are_listed_and_apply_to_txt2img(server):
    schedulers = httpx.get(server.url + "/sdapi/v1/schedulers", timeout=WAIT_S).json()
    assert schedulers[:2] == [
        {"name": "automatic", "label": "Automatic", "aliases": None, "default_rho": -1.0,
         "need_inner_model": False},
        {"name": "karras", "label": "Karras", "aliases": None, "default_rho": 7.0,
         "need_inner_model": False}]
    samplers = {s["name"]: s for s in httpx.get(server.url + "/sdapi/v1/samplers",
                                                timeout=WAIT_S).json()}
    assert samplers["DPM++ 2M"]["options"]["schedules"] == [s["name"] for s in schedulers]
    assert samplers["PLMS"]["options"]["schedules"] == ["automatic"]
    body = {"prompt": "a red circle", "seed": 3, "steps": 3, "width": 64, "height": 64}
    images = []
    for fields in ({"sampler_name": "DPM++ 2M", "scheduler": "karras"},
                   {"sampler_name": "DPM++ 2M Karras", "scheduler": "Automatic"}):
        response = post(server, "/sdapi/v1/txt2img", {**body, **fields})
        assert response.status_code == 200, response.text
        images.append(png(response.json()["images"][0]))
        parsed = parse_parameters(images[-1].info["parameters"])
        assert (parsed["Sampler"], parsed["Schedule type"]) == ("DPM++ 2M", "Karras")
    assert np.array_equal(np.asarray(images[0]), np.asarray(images[1]))
    url = "/sdapi/v1/txt2img"
    check_error(post(server, url, {**body, "scheduler": "Beta"}), 422,
                "unknown schedule 'Beta'; choose one of: Automatic, Karras, Exponential")
    check_error(post(server, url, {**body, "sampler_name": "PLMS", "scheduler": "Karras"}), 422,
                "schedule 'karras' takes: Euler, Euler a, DPM++ 2M")
