"""Several models behind `sdrt serve --models-dir` (runtime/server/models.py): A1111 titles,
switching through POST /options and for one request through override_settings, the old model
released before the new one loads, refresh-checkpoints; driven with `webuiapi`, the public
A1111 client, against a real server over a folder of two tiny exported models."""

from __future__ import annotations

import json
import shutil
import threading
import time
import weakref
from pathlib import Path

import numpy as np
import pytest

for _module in ("fastapi", "uvicorn", "httpx", "webuiapi"):
    pytest.importorskip(_module, reason=f"{_module} is missing (pip install 'sdrt[serve,dev]')")

import httpx  # noqa: E402
import webuiapi  # noqa: E402

from sdrt.benchmarks.server_load import running_server  # noqa: E402
from sdrt.runtime.errors import InputError  # noqa: E402
from sdrt.runtime.model.folder import EMBEDDED_MODEL, read_facts  # noqa: E402
from sdrt.runtime.model.manifest import Manifest  # noqa: E402
from sdrt.runtime.pipeline import Pipeline  # noqa: E402
from sdrt.runtime.server.models import ModelHost, first_model, scan  # noqa: E402

SMALL = {"width": 64, "height": 64, "steps": 2, "seed": 7, "cfg_scale": 3.0}
WAIT_S = 5  # how long a switch is watched not to happen while a job runs


def short_hash(folder: Path) -> str:
    return Manifest.load(folder).files["unet/model.onnx"].sha256[:10]


@pytest.fixture(scope="module")
def models_dir(tiny_onnx_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`embedded/onnx/` (optimum's NAME/onnx layout) and `tiny/`, plus a folder that is no
    model (skipped)."""
    root = tmp_path_factory.mktemp("models")
    shutil.copytree(EMBEDDED_MODEL, root / "embedded" / "onnx")
    shutil.copytree(tiny_onnx_dir, root / "tiny")
    (root / "notes").mkdir()
    return root


def test_scan_titles_models_by_name_and_unet_hash(models_dir: Path) -> None:
    found = scan(models_dir)
    assert [c.name for c in found] == ["embedded", "tiny"]  # "onnx" is the layout, not a name
    embedded = found[0]
    assert embedded.title == f"embedded [{short_hash(EMBEDDED_MODEL)}]"
    assert embedded.sha256 == Manifest.load(EMBEDDED_MODEL).files["unet/model.onnx"].sha256
    assert first_model(models_dir, None) == embedded.folder
    assert first_model(models_dir, Path("tiny")) == found[1].folder  # --model by name
    with pytest.raises(InputError, match="holds no exported model"):
        first_model(models_dir / "notes", None)


def test_model_name_from_manifest_over_folder(tmp_path: Path) -> None:
    folder = tmp_path / "onnx"
    shutil.copytree(EMBEDDED_MODEL, folder)
    assert read_facts(folder).name == tmp_path.name  # NAME/onnx → NAME
    manifest = json.loads((folder / "manifest.json").read_text())
    (folder / "manifest.json").write_text(json.dumps({**manifest, "name": "shapes-v1"}))
    assert read_facts(folder).name == "shapes-v1"


def test_switch_releases_the_old_model_first_and_waits_for_jobs(models_dir: Path) -> None:
    loads: list[str] = []
    resident: list[weakref.ref] = []  # the loaded model, not kept alive by the test

    def load(folder: Path) -> Pipeline:
        assert resident[-1]() is None, "the old model was still alive when the new one loaded"
        loads.append(folder.name)
        pipe = Pipeline.load(folder)
        resident.append(weakref.ref(pipe))
        return pipe

    host = ModelHost(Pipeline.load(scan(models_dir)[0].folder), models_dir, load)
    resident.append(weakref.ref(host.pipe))

    def model_of_job(name: str | None) -> str:
        with host.use(name) as pipe:
            return pipe.facts.name

    entered, leave = threading.Event(), threading.Event()

    def job() -> None:
        with host.use(None):
            entered.set()
            leave.wait()

    worker = threading.Thread(target=job)
    worker.start()
    entered.wait()
    switcher = threading.Thread(target=host.switch, args=("tiny",))
    switcher.start()
    time.sleep(WAIT_S / 5)
    assert loads == []  # a running job keeps its model
    leave.set()
    worker.join()
    switcher.join()
    assert loads == ["tiny"] and host.pipe.facts.name == "tiny" and host.selected.name == "tiny"
    assert model_of_job("embedded") == "embedded"  # one job's override
    assert host.selected.name == "tiny"
    assert model_of_job(None) == "tiny"  # the next job without one goes back
    assert model_of_job(None) == "tiny"
    assert loads == ["tiny", "onnx", "tiny"]
    with pytest.raises(InputError, match=r"choose one of: embedded \[.*\], tiny \["):
        host.find("nope")


@pytest.fixture(scope="module")
def api(models_dir: Path):
    with running_server("--models-dir", str(models_dir), "--max-steps", "10") as server:
        host, port = server.url.removeprefix("http://").split(":")
        yield webuiapi.WebUIApi(host=host, port=int(port)), server


def test_webuiapi_lists_and_switches_models(api, models_dir: Path) -> None:
    client, _ = api
    titles = [f"embedded [{short_hash(EMBEDDED_MODEL)}]",
              f"tiny [{short_hash(models_dir / 'tiny')}]"]
    assert client.util_get_model_names() == titles
    assert client.util_get_current_model() == titles[0]
    options = client.get_options()
    assert options["sd_checkpoint_hash"] == client.get_sd_models()[0]["sha256"]
    assert "folder" not in json.dumps(client.get_sd_models())
    before = client.txt2img(prompt="a red circle", **SMALL)
    assert before.info["sd_model_hash"] == short_hash(EMBEDDED_MODEL)

    client.util_set_model("tiny")
    assert client.util_get_current_model() == titles[1]
    after = client.txt2img(prompt="a red circle", **SMALL)
    assert after.info["sd_model_hash"] == short_hash(models_dir / "tiny")
    assert after.info["sd_model_name"] == "tiny"
    assert not np.array_equal(np.asarray(after.image), np.asarray(before.image))

    # one request on another model (A1111's override_settings), then back to the selected one
    once = client.txt2img(prompt="a red circle", override_settings={
        "sd_model_checkpoint": titles[0]}, **SMALL)
    assert once.info["sd_model_hash"] == short_hash(EMBEDDED_MODEL)
    assert np.array_equal(np.asarray(once.image), np.asarray(before.image))
    assert client.util_get_current_model() == titles[1]
    again = client.txt2img(prompt="a red circle", **SMALL)
    assert again.info["sd_model_hash"] == short_hash(models_dir / "tiny")
    client.set_options({"sd_model_checkpoint": "embedded"})  # a name does, as a title
    assert client.util_get_current_model() == titles[0]


def test_bad_checkpoint_is_a_422_listing_titles(api) -> None:
    _, server = api
    for path, body in (("/sdapi/v1/options", {"sd_model_checkpoint": "nope"}),
                       ("/sdapi/v1/txt2img", {"prompt": "x", **SMALL,
                                              "override_settings": {"sd_model_checkpoint": 3}}),
                       ("/sdapi/v1/txt2img", {"prompt": "x", **SMALL,
                                              "override_settings": {"sd_model_checkpoint":
                                                                    "nope"}})):
        response = httpx.post(server.url + path, json=body, timeout=60)
        assert response.status_code == 422, response.text
        detail = response.json()["detail"]
        assert "\n" not in detail
        assert "sd_model_checkpoint must be a string" in detail or (
            "unknown checkpoint 'nope'; choose one of: embedded [" in detail and "tiny [" in detail)


def test_refresh_checkpoints_finds_new_folders(api, models_dir: Path) -> None:
    client, _ = api
    shutil.copytree(EMBEDDED_MODEL, models_dir / "zeta")
    try:
        assert all(not t.startswith("zeta") for t in client.util_get_model_names())
        assert client.refresh_checkpoints() is None  # A1111 answers null
        assert [t.split(" ")[0] for t in client.util_get_model_names()] == [
            "embedded", "tiny", "zeta"]
    finally:
        shutil.rmtree(models_dir / "zeta")
        client.refresh_checkpoints()
