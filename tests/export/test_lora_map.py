"""lora_map.json, written by the export beside the UNet and text-encoder graphs: every Linear and
Conv2d of the UNet and every Linear and the token embedding of each text encoder of tiny SD 1.x,
SD 2.x (linear proj_in), SDXL (two encoders, text_projection) and the SDXL refiner points at the
initializer holding its weight (as W.T where it says transposed), checked against the source
folder's safetensors, not against the code that matched them; the runtime reader round-trips it
and refuses a missing or malformed map in one line."""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import numpy as np
import pytest

from sdrt.runtime.adapters.lora_map import MAP_NAME, LoraMap, MapEntry, read_lora_map
from sdrt.runtime.errors import ModelError
from sdrt.runtime.model.check import check_model
from sdrt.runtime.model.manifest import Manifest, sha256_file
from tests.conftest import _build, _export

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")

MAPPED = ("unet", "text_encoder", "text_encoder_2")
WEIGHT_FILES = {"unet": "diffusion_pytorch_model.safetensors", "text_encoder": "model.safetensors",
                "text_encoder_2": "model.safetensors"}
# CLIP's position table is looked up by a constant index range the exporter may fold: optional
OPTIONAL = ("text_model.embeddings.position_embedding",)


@pytest.fixture(scope="module")
def tiny_refiner_onnx_dir(tmp_path_factory) -> tuple[Path, Path]:
    """The tiny SDXL refiner (text_encoder_2 alone) and its export (graphs not re-checked)."""
    src = _build("tiny_sdxl_refiner", tmp_path_factory)
    return src, _export(src, tmp_path_factory, check=False)


@pytest.fixture(params=["sd", "sd2", "sdxl", "refiner"])
def exported(request) -> tuple[Path, Path]:
    """(source folder, exported folder) of each architecture with LoRA support."""
    if request.param == "refiner":
        return request.getfixturevalue("tiny_refiner_onnx_dir")
    name = {"sd": "tiny_sd", "sd2": "tiny_sd2", "sdxl": "tiny_sdxl"}[request.param]
    onnx_name = {"sd": "tiny_onnx", "sd2": "tiny_sd2_onnx", "sdxl": "tiny_sdxl_onnx"}
    return (request.getfixturevalue(f"{name}_dir"),
            request.getfixturevalue(f"{onnx_name[request.param]}_dir"))


def _layer_weights(src: Path, component: str) -> dict[str, np.ndarray]:
    """Module path → weight of each Linear/Conv2d/Embedding in the source folder's weights file
    (SD key layout): the 2-D and 4-D `.weight` tensors; norms' are 1-D."""
    from safetensors.numpy import load_file

    tensors = load_file(str(src / component / WEIGHT_FILES[component]))
    return {key.removesuffix(".weight"): value for key, value in tensors.items()
            if key.endswith(".weight") and value.ndim in (2, 4)}


def _initializers(path: Path) -> dict[str, np.ndarray]:
    from onnx import numpy_helper

    return {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}


def test_map_covers_every_layer_with_its_weight(exported):
    src, out = exported
    components = [c for c in MAPPED if (src / c).is_dir()]
    assert components and "unet" in components
    for component in components:
        lora_map = read_lora_map(out / component)
        assert lora_map.graph == "model.onnx"
        weights = _layer_weights(src, component)
        assert set(weights) - set(OPTIONAL) <= set(lora_map.modules), component
        assert set(lora_map.modules) <= set(weights), component
        graph = _initializers(out / component / lora_map.graph)
        for path, entry in lora_map.modules.items():
            weight = weights[path]
            assert entry.shape == weight.shape, path
            assert entry.kind == ("conv" if weight.ndim == 4 else
                                  "embedding" if "embedding" in path.rsplit(".", 1)[-1]
                                  else "linear"), path
            held = graph[entry.initializer]
            np.testing.assert_array_equal(held.T if entry.transposed else held, weight,
                                          err_msg=path)


def test_text_projection_and_linear_proj_in_are_mapped(tiny_sdxl_onnx_dir, tiny_sd2_onnx_dir):
    assert "text_projection" in read_lora_map(tiny_sdxl_onnx_dir / "text_encoder_2").modules
    unet = read_lora_map(tiny_sd2_onnx_dir / "unet").modules
    proj_in = unet["down_blocks.0.attentions.0.proj_in"]
    assert proj_in.kind == "linear" and len(proj_in.shape) == 2
    # attention projections without bias become MatMul on W.T
    assert unet["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"].transposed


def test_maps_are_listed_in_the_manifest_and_check_passes(tiny_onnx_dir):
    manifest = Manifest.load(tiny_onnx_dir)
    for component in ("unet", "text_encoder"):
        rel = f"{component}/{MAP_NAME}"
        assert manifest.files[rel].sha256 == sha256_file(tiny_onnx_dir / rel)
    assert not any((tiny_onnx_dir / c / MAP_NAME).exists() for c in ("vae_encoder", "vae_decoder"))
    report = check_model(tiny_onnx_dir)
    assert report.ok, report.problems


# ---------------------------------------------------------------- the runtime reader


def test_read_lora_map_round_trips(tiny_onnx_dir, tmp_path):
    on_disk = json.loads((tiny_onnx_dir / "unet" / MAP_NAME).read_text("utf-8"))
    lora_map = read_lora_map(tiny_onnx_dir / "unet")
    assert lora_map.to_json() == on_disk
    assert on_disk["format"] == "sdrt-lora-map" and on_disk["format_version"] == 1
    made = LoraMap("model.onnx", {"a.conv": MapEntry("w", "conv", False, (4, 2, 3, 3))})
    made.save(tmp_path)
    assert read_lora_map(tmp_path) == made


def test_folder_without_a_map_says_how_to_add_it(tmp_path):
    with pytest.raises(ModelError) as caught:
        read_lora_map(tmp_path)
    assert str(caught.value) == (f"{tmp_path} has no LoRA map (exported before sdrt recorded "
                                 "one); re-export it with `sdrt export`")


GOOD_ENTRY = {"initializer": "w", "kind": "linear", "transposed": True, "shape": [4, 2]}


def _map(**changes) -> dict:
    return {"format": "sdrt-lora-map", "format_version": 1, "graph": "model.onnx",
            "modules": {"a.to_q": GOOD_ENTRY}, **changes}


@pytest.mark.parametrize(("content", "fragment"), [
    ("{not json", "Expecting property name"),
    (json.dumps([1]), "'format' must be 'sdrt-lora-map'"),
    (json.dumps(_map(format_version=2)), "'format_version' 2 is not 1"),
    (json.dumps(_map(graph="../unet/model.onnx")), "'graph' must be a file name"),
    (json.dumps(_map(modules={})), "'modules' must be a non-empty object"),
    (json.dumps(_map(modules={"a": {**GOOD_ENTRY, "kind": "lokr"}})), "kind must be one of"),
    (json.dumps(_map(modules={"a": {**GOOD_ENTRY, "kind": "conv", "shape": [4, 2, 1, 1]}})),
     "true only for a linear layer"),
    (json.dumps(_map(modules={"a": {**GOOD_ENTRY, "shape": [4, 0]}})), "2 positive integers"),
    (json.dumps(_map(modules={"a": {**GOOD_ENTRY, "initializer": 3}})), "initializer must be"),
])
def test_malformed_map_is_one_line(tmp_path, content, fragment):
    (tmp_path / MAP_NAME).write_text(content, "utf-8")
    with pytest.raises(ModelError) as caught:
        read_lora_map(tmp_path)
    message = str(caught.value)
    assert "\n" not in message and "is malformed" in message and fragment in message


# ---------------------------------------------------------------- matching by value


class _Layers(torch.nn.Module):
    """A Linear exported as MatMul (no bias), one as Gemm, two Linears tied to one weight, a
    Conv2d and an Embedding."""

    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.emb = torch.nn.Embedding(10, 6)
        self.matmul = torch.nn.Linear(6, 5, bias=False)
        self.gemm = torch.nn.Linear(5, 4)
        self.tied_a, self.tied_b = (torch.nn.Linear(4, 4, bias=False) for _ in range(2))
        self.conv = torch.nn.Conv2d(1, 2, 3)
        for param in self.parameters():
            param.data = torch.randn(param.shape, generator=gen)
        self.tied_b.weight.data = self.tied_a.weight.data.clone()  # equal values, two modules

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.matmul(self.emb(ids))  # (B, L, 5)
        x = self.gemm(x[:, 0])  # (B, 4): 2-D input, as Gemm
        x = self.tied_b(self.tied_a(x)) + x
        return self.conv(x.reshape(-1, 1, 2, 2).repeat(1, 1, 2, 2))


@pytest.fixture(scope="module")
def layers_graph(tmp_path_factory) -> tuple[torch.nn.Module, Path]:
    model, folder = _Layers().eval(), tmp_path_factory.mktemp("layers")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the exporter sdrt uses, on purpose
        torch.onnx.export(model, (torch.tensor([[1, 2, 3]]),), str(folder / "model.onnx"),
                          dynamo=False, opset_version=18, input_names=["ids"],
                          do_constant_folding=True)
    return model, folder


def test_each_layer_is_matched_by_value_and_shared_weights_left_out(layers_graph, caplog):
    from sdrt.export.lora_map import fingerprints, write_lora_map

    model, folder = layers_graph
    with caplog.at_level(logging.DEBUG, logger="sdrt.export"):
        lora_map = write_lora_map(folder, "model.onnx", fingerprints(model))
    modules = lora_map.modules
    assert set(modules) == {"emb", "matmul", "gemm", "conv"}
    assert modules["matmul"].transposed and not modules["gemm"].transposed
    assert (modules["emb"].kind, modules["conv"].kind) == ("embedding", "conv")
    assert "tied_a" in caplog.text  # left out, and said so
    assert read_lora_map(folder) == lora_map


def test_no_layer_found_is_an_export_error(layers_graph, tmp_path):
    from sdrt.export.lora_map import fingerprints, write_lora_map
    from sdrt.runtime.errors import ExportError

    _, folder = layers_graph
    other = torch.nn.Sequential(torch.nn.Linear(6, 5))  # random weights the graph does not hold
    with pytest.raises(ExportError, match="no layer's weight was found among model.onnx"):
        write_lora_map(folder, "model.onnx", fingerprints(other))
