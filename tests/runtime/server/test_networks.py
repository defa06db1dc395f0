"""The server's LoRA and embedding routes (runtime/server/networks.py) in A1111's shapes, and
LoRAs through the A1111 API: listed, rescanned, named by `<lora:NAME:W>` in a txt2img prompt
(spoken to with `webuiapi`, a public A1111 client), and refused in one line when unknown."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import save_file

for _module in ("fastapi", "uvicorn", "httpx"):
    pytest.importorskip(_module, reason=f"{_module} is missing (pip install 'sdrt[serve]' httpx)")

from fastapi.testclient import TestClient  # noqa: E402

from sdrt.benchmarks.server_load import running_server  # noqa: E402
from sdrt.runtime.model.folder import EMBEDDED_MODEL  # noqa: E402
from sdrt.runtime.pipeline import Pipeline  # noqa: E402
from sdrt.runtime.server.app import create_app  # noqa: E402
from sdrt.runtime.server.settings import ServerSettings  # noqa: E402
from tests.cli.test_lora_options import lora_file  # noqa: E402

LORA_WEIGHT = 0.8
RANK = 2
# Large enough a LoRA update that a 64×64 picture visibly changes after two steps.
LORA_SCALE = 0.5


def client(model=EMBEDDED_MODEL, **load) -> TestClient:
    return TestClient(create_app(Pipeline.load(model, **load), ServerSettings()))


@pytest.fixture
def loras(tmp_path):
    folder = tmp_path / "loras"
    (folder / "styles").mkdir(parents=True)
    lora_file(folder / "ink.safetensors", metadata={"ss_output_name": "ink-v2",
                                                    "ss_network_dim": "2"})
    lora_file(folder / "styles" / "watercolor.safetensors", seed=1)
    return folder


def test_loras_are_listed_in_a1111s_shape_without_full_paths(loras, tmp_path):
    with client(lora_dir=loras) as api:
        response = api.get("/sdapi/v1/loras")
    assert response.status_code == 200, response.text
    items = {item["name"]: item for item in response.json()}
    assert set(items) == {"ink", "watercolor"}
    assert items["ink"] == {"name": "ink", "alias": "ink-v2", "path": "ink.safetensors",
                            "metadata": {"ss_output_name": "ink-v2", "ss_network_dim": "2"}}
    assert items["watercolor"]["alias"] == "watercolor"
    assert items["watercolor"]["path"] == "styles/watercolor.safetensors"
    assert str(tmp_path) not in response.text


def test_refresh_loras_rescans_the_folder(loras, tmp_path):
    with client(lora_dir=loras) as api:
        lora_file(loras / "charcoal.safetensors", seed=2)
        (loras / "ink.safetensors").unlink()
        assert {item["name"] for item in api.get("/sdapi/v1/loras").json()} == {
            "ink", "watercolor"}  # as scanned at start
        refreshed = api.post("/sdapi/v1/refresh-loras")
        assert refreshed.status_code == 200 and refreshed.json() is None  # A1111 answers null
        assert {item["name"] for item in api.get("/sdapi/v1/loras").json()} == {
            "charcoal", "watercolor"}


@pytest.mark.parametrize(("prompt", "fragment"), [
    ("x <lora:ink:heavy>", "weight 'heavy' is not a number"),
    ("x <lora:ink:0.5>", "match no layer"),  # the embedded UNet has no attention there
])
def test_refused_loras_are_one_line_4xx_without_paths(loras, tmp_path, prompt, fragment):
    with client(lora_dir=loras) as api:
        refused = api.post("/sdapi/v1/txt2img", json={"prompt": prompt, "steps": 1})
        assert refused.status_code == 422, refused.text
        detail = refused.json()["detail"]
        assert fragment in detail and "\n" not in detail and str(tmp_path) not in detail
        assert str(EMBEDDED_MODEL) not in detail
        assert api.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 1}).status_code == 200


def test_without_folders_the_lists_are_empty(tmp_path):
    with client() as api:
        assert api.get("/sdapi/v1/loras").json() == []
        assert api.post("/sdapi/v1/refresh-loras").status_code == 200
        assert api.get("/sdapi/v1/embeddings").json() == {"loaded": {}, "skipped": {}}


def test_embeddings_are_listed_in_a1111s_shape(tiny_onnx_dir, tmp_path):
    width = token_table(tiny_onnx_dir)["shape"][1]
    folder = tmp_path / "embeddings"
    folder.mkdir()
    rng = np.random.default_rng(0)
    save_file({"emb_params": rng.standard_normal((2, width), dtype=np.float32)},
              str(folder / "zandor.safetensors"))
    save_file({"emb_params": rng.standard_normal((1, width + 8), dtype=np.float32)},
              str(folder / "too-wide.safetensors"))
    with client(tiny_onnx_dir, embeddings_dir=folder) as api:
        body = api.get("/sdapi/v1/embeddings").json()
    assert set(body) == {"loaded", "skipped"}
    assert body["loaded"]["zandor"]["vectors"] == 2
    assert body["loaded"]["zandor"]["shape"] == width
    assert set(body["skipped"]) == {"too-wide"}


def token_table(model) -> dict:
    """The text encoder's token table as its LoRA map lists it (shape: rows, width)."""
    modules = json.loads((model / "text_encoder" / "lora_map.json").read_text())["modules"]
    return modules["text_model.embeddings.token_embedding"]


def fitting_lora(model, path, seed: int = 0):
    """A kohya LoRA over every attention projection and text-encoder q/k/v the exported
    model's LoRA maps list (their shapes read from the maps)."""
    rng = np.random.default_rng(seed)
    tensors = {}
    for component, prefix in (("unet", "lora_unet_"), ("text_encoder", "lora_te_")):
        modules = json.loads((model / component / "lora_map.json").read_text())["modules"]
        for module, entry in modules.items():
            if entry["kind"] != "linear" or not module.endswith(
                    ("to_q", "to_k", "to_v", "q_proj", "k_proj", "v_proj")):
                continue
            out, inner = entry["shape"][:2]
            key = prefix + module.replace(".", "_")
            tensors[f"{key}.lora_down.weight"] = LORA_SCALE * rng.standard_normal(
                (RANK, inner), dtype=np.float32)
            tensors[f"{key}.lora_up.weight"] = LORA_SCALE * rng.standard_normal(
                (out, RANK), dtype=np.float32)
            tensors[f"{key}.alpha"] = np.array(RANK, dtype=np.float32)
    save_file(tensors, str(path))
    return path


def test_a1111_client_gets_lora_tags_applied_and_unknown_names_refused(tiny_onnx_dir,
                                                                       tmp_path):
    webuiapi = pytest.importorskip("webuiapi")
    from sdrt.runtime.metadata import parse_parameters

    folder = tmp_path / "loras"
    folder.mkdir()
    fitting_lora(tiny_onnx_dir, folder / "style.safetensors")
    with running_server("--model", tiny_onnx_dir, "--lora-dir", folder) as server:
        host, port = server.url.removeprefix("http://").rsplit(":", 1)
        api = webuiapi.WebUIApi(host=host, port=int(port), sampler="Euler", steps=2)
        assert [item["name"] for item in api.get_loras()] == ["style"]

        def txt2img(prompt: str):
            return api.txt2img(prompt=prompt, seed=7, width=64, height=64, cfg_scale=7.5)

        plain = txt2img("a red circle")
        styled = txt2img(f"a red circle <lora:style:{LORA_WEIGHT}>")
        infotext = styled.info["infotexts"][0]
        fields = parse_parameters(infotext)
        assert fields["prompt"] == f"a red circle <lora:style:{LORA_WEIGHT}>"  # as given
        assert fields["Lora hashes"].startswith("style: ")
        assert "Lora hashes" not in parse_parameters(plain.info["infotexts"][0])
        assert not np.array_equal(np.asarray(plain.image), np.asarray(styled.image))
        with pytest.raises(RuntimeError) as refused:
            txt2img("a red circle <lora:nope:0.8>")
        status, text = refused.value.args
        assert 400 <= status < 500, text
        detail = json.loads(text)["detail"]
        assert "unknown LoRA 'nope'; --lora-dir holds: style" in detail
        assert "\n" not in detail and str(tmp_path) not in detail  # never a path
        again = txt2img("a red circle")  # the server goes on, and no LoRA stays applied
        assert np.array_equal(np.asarray(again.image), np.asarray(plain.image))
