"""Merging LoRAs into exported weights (runtime/adapters/lora_weights.py).

The reference is diffusers: the tiny SD and SDXL models with LoRA files in each layout (kohya in
diffusers naming with attention, text-encoder attention and MLP, LoCon 3×3 conv, time_emb_proj
and 1×1 conv_shortcut layers; kohya in SGM naming on SDXL with both text encoders; PEFT) loaded
with `load_lora_weights` and fused with `fuse_lora(lora_scale=s)`: every weight diffusers changes
must be patched, to the same values, in the exported graph's layout, and nothing else. Layout
rules (transposed MatMul weights, float16 graphs, a Linear LoRA on a 1×1 conv) and one-line
errors are checked on small hand-made maps.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from sdrt.runtime.adapters.lora_file import read_lora
from sdrt.runtime.adapters.lora_map import LoraMap, MapEntry, read_lora_map
from sdrt.runtime.adapters.lora_weights import check_components, patched_weights
from sdrt.runtime.errors import InputError, ModelError
from sdrt.runtime.model.onnx_tensors import WeightReader
from tests.conftest import load_reference
from tests.runtime.adapters.lora_files import SD_KOHYA, SD_PEFT, SDXL_SGM, write_lora

# Both sides add a float32 up @ down to the float32 weight; only the products' summation order
# may differ (rank-4 sums: an ulp or two of values below 1).
FUSED_ATOL = 1e-6
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")


# ---------------------------------------------------------------- parity with diffusers


def _torch_weights(pipe) -> dict[tuple[str, str], np.ndarray]:
    """(component, module path) → weight, under the map's paths (CLIP under `text_model.`)."""
    import torch

    weights = {}
    for component in COMPONENTS:
        model = getattr(pipe, component, None)
        if model is None:
            continue
        # transformers 5's CLIPTextModel lacks the `text_model` level the map (and LoRAs) name
        prefix = "text_model" if component != "unet" and not hasattr(model, "text_model") else ""
        for path, module in model.named_modules(prefix=prefix):
            if isinstance(module, torch.nn.Linear | torch.nn.Conv2d | torch.nn.Embedding):
                weights[(component, path)] = module.weight.detach().numpy().copy()
    return weights


def _fused(folder: Path, loras: list[tuple[Path, float]]) -> dict[tuple[str, str], np.ndarray]:
    """diffusers' weights with each LoRA loaded, fused at its scale and unloaded, in turn."""
    pytest.importorskip("peft", reason="diffusers' LoRA loading needs peft")
    pipe = load_reference(folder)
    for path, scale in loras:
        pipe.load_lora_weights(str(path))
        pipe.fuse_lora(lora_scale=scale)
        pipe.unload_lora_weights()
    return _torch_weights(pipe)


@pytest.fixture(scope="module")
def base_sd(tiny_sd_dir):
    return _fused(tiny_sd_dir, [])


@pytest.fixture(scope="module")
def base_sdxl(tiny_sdxl_dir):
    return _fused(tiny_sdxl_dir, [])


def _assert_matches(onnx_dir: Path, base: dict, fused: dict, loras: list[tuple[Path, float]],
                    changed_count: int) -> None:
    files = [(read_lora(path), scale) for path, scale in loras]
    changed_total = 0
    for component in COMPONENTS:
        if not (onnx_dir / component).is_dir():
            continue
        lora_map = read_lora_map(onnx_dir / component)
        reader = WeightReader(onnx_dir / component / "model.onnx")
        patched = patched_weights(reader, lora_map, files, component)
        changed = {lora_map.modules[path].initializer: path for path in lora_map.modules
                   if not np.array_equal(base[(component, path)], fused[(component, path)])}
        assert set(patched) == set(changed), component
        for name, path in changed.items():
            expected = fused[(component, path)]
            if lora_map.modules[path].transposed:
                expected = expected.T
            np.testing.assert_allclose(patched[name], expected, rtol=0, atol=FUSED_ATOL,
                                       err_msg=f"{component} {path}")
        changed_total += len(changed)
    assert changed_total == changed_count  # diffusers applied every layer: the check has teeth


@pytest.mark.parity
def test_kohya_lora_equals_diffusers(tiny_sd_dir, tiny_onnx_dir, base_sd, tmp_path):
    loras = [(write_lora(tmp_path / "kohya.safetensors", SD_KOHYA), 0.8)]
    _assert_matches(tiny_onnx_dir, base_sd, _fused(tiny_sd_dir, loras), loras, len(SD_KOHYA))


@pytest.mark.parity
def test_sgm_named_sdxl_lora_equals_diffusers(tiny_sdxl_dir, tiny_sdxl_onnx_dir, base_sdxl,
                                              tmp_path):
    loras = [(write_lora(tmp_path / "sdxl.safetensors", SDXL_SGM), 0.8)]
    _assert_matches(tiny_sdxl_onnx_dir, base_sdxl, _fused(tiny_sdxl_dir, loras), loras,
                    len(SDXL_SGM))


@pytest.mark.parity
def test_peft_lora_equals_diffusers(tiny_sd_dir, tiny_onnx_dir, base_sd, tmp_path):
    loras = [(write_lora(tmp_path / "peft.safetensors", SD_PEFT, peft=True), 1.3)]
    _assert_matches(tiny_onnx_dir, base_sd, _fused(tiny_sd_dir, loras), loras, len(SD_PEFT))


@pytest.mark.parity
def test_two_loras_one_negative_equal_diffusers(tiny_sd_dir, tiny_onnx_dir, base_sd, tmp_path):
    loras = [(write_lora(tmp_path / "kohya.safetensors", SD_KOHYA, seed=1), 0.8),
             (write_lora(tmp_path / "peft.safetensors", SD_PEFT, peft=True, seed=2), -0.5)]
    overlap = 2  # both change attn2.to_k and attn1.to_out.0
    _assert_matches(tiny_onnx_dir, base_sd, _fused(tiny_sd_dir, loras), loras,
                    len(SD_KOHYA) + len(SD_PEFT) - overlap)


# ---------------------------------------------------------------- refusals on a real map


def _patch(onnx_dir: Path, path: Path, component: str = "unet", scale: float = 1.0) -> dict:
    return patched_weights(WeightReader(onnx_dir / component / "model.onnx"),
                           read_lora_map(onnx_dir / component), [(read_lora(path), scale)],
                           component)


def test_layers_the_model_lacks_are_named(tiny_onnx_dir, tmp_path):
    layers = [("lora_unet_conv_in", 32, 4, 3),
              *[(f"lora_unet_down_blocks_{i}_attentions_7_proj_in", 32, 32, 1) for i in range(5)]]
    path = write_lora(tmp_path / "elsewhere.safetensors", layers)
    with pytest.raises(InputError) as caught:
        _patch(tiny_onnx_dir, path)
    assert str(caught.value) == (
        "LoRA 'elsewhere': 5 of its 6 unet layers match no layer of this model: "
        "down_blocks_0_attentions_7_proj_in, down_blocks_1_attentions_7_proj_in, "
        "down_blocks_2_attentions_7_proj_in and 2 more")


def test_sdxl_lora_on_sd_refused(tiny_onnx_dir, tmp_path):
    # SDXL's cross-attention reads a wider context (tiny: 64 wide, tiny SD's 32)
    path = write_lora(tmp_path / "xl.safetensors", [
        ("lora_unet_middle_block_1_transformer_blocks_0_attn2_to_k", 64, 64, None),
        ("lora_te2_text_model_encoder_layers_1_mlp_fc2", 32, 37, None)])
    with pytest.raises(InputError, match=r"^LoRA 'xl' was made for another model \(unet layer "
                       r"'mid_block.attentions.0.transformer_blocks.0.attn2.to_k': its factors "
                       r"make a weight of \(64, 64\), the model's is \(64, 32\)\)$"):
        _patch(tiny_onnx_dir, path)
    with pytest.raises(InputError, match=r"it changes text_encoder_2, which this model does "
                       "not have"):
        check_components(read_lora(path), ("unet", "text_encoder"))


def test_zero_weight_changes_nothing(tiny_onnx_dir, tmp_path):
    path = write_lora(tmp_path / "k.safetensors", SD_KOHYA[:2])
    assert _patch(tiny_onnx_dir, path, scale=0.0) == {}
    assert len(_patch(tiny_onnx_dir, path, scale=-1.0)) == 2


# ---------------------------------------------------------------- layouts on hand-made maps


class _Weights:
    """A WeightReader stand-in holding its arrays in memory."""

    path = Path("model/unet/model.onnx")

    def __init__(self, arrays: dict[str, np.ndarray]) -> None:
        self.arrays = arrays

    def read(self, names):
        return {name: self.arrays[name] for name in names}


def _one_layer(tmp_path: Path, name: str, down: np.ndarray, up: np.ndarray) -> Path:
    path = tmp_path / "one.safetensors"
    save_file({f"{name}.lora_A.weight": down, f"{name}.lora_B.weight": up}, str(path))
    return path


@pytest.mark.parametrize(("kind", "shape", "transposed", "down_shape", "up_shape"), [
    ("linear", (3, 5), True, (2, 5), (3, 2)),  # MatMul holds W.T
    ("linear", (3, 5), False, (2, 5), (3, 2)),  # Gemm(transB=1) holds W
    ("conv", (3, 5, 1, 1), False, (2, 5), (3, 2)),  # a Linear LoRA on a 1×1 conv
    ("linear", (3, 5), True, (2, 5, 1, 1), (3, 2, 1, 1)),  # a 1×1 conv LoRA on a Linear
    ("conv", (3, 5, 3, 3), False, (2, 5, 3, 3), (3, 2, 1, 1)),  # LoCon
    ("embedding", (7, 3), False, (2, 7), (3, 2)),  # PEFT: (B @ A).T
])
def test_layouts(tmp_path, kind, shape, transposed, down_shape, up_shape):
    rng = np.random.default_rng(0)
    weight = rng.standard_normal(shape).astype(np.float32)
    down = rng.standard_normal(down_shape).astype(np.float32)
    up = rng.standard_normal(up_shape).astype(np.float32)
    stored = weight.T if transposed else weight
    lora_map = LoraMap("model.onnx", {"layer": MapEntry("w", kind, transposed, shape)})
    path = _one_layer(tmp_path, "unet.layer", down, up)
    patched = patched_weights(_Weights({"w": stored.copy()}), lora_map,
                              [(read_lora(path), 0.5)], "unet")["w"]
    product = up.reshape(up.shape[0], 2) @ down.reshape(2, -1)
    delta = (product.T if kind == "embedding" else product).reshape(shape) * 0.5
    expected = weight + delta
    np.testing.assert_allclose(patched, expected.T if transposed else expected, atol=FUSED_ATOL)


def test_float16_graph_merged_in_float32(tmp_path):
    rng = np.random.default_rng(1)
    weight = rng.standard_normal((4, 6)).astype(np.float16)
    down, up = (rng.standard_normal(s).astype(np.float32) for s in ((2, 6), (4, 2)))
    lora_map = LoraMap("model.onnx", {"layer": MapEntry("w", "linear", False, (4, 6))})
    path = _one_layer(tmp_path, "unet.layer", down, up)
    patched = patched_weights(_Weights({"w": weight}), lora_map, [(read_lora(path), 1.0)],
                              "unet")["w"]
    assert patched.dtype == np.float16
    assert np.array_equal(patched, (weight.astype(np.float32) + up @ down).astype(np.float16))


def test_quantized_and_stale_weights_refused(tmp_path):
    down, up = np.ones((2, 6), np.float32), np.ones((4, 2), np.float32)
    path = _one_layer(tmp_path, "unet.layer", down, up)
    lora_map = LoraMap("model.onnx", {"layer": MapEntry("w", "linear", False, (4, 6))})
    with pytest.raises(ModelError, match="weight 'w' is int8; LoRAs merge into float32 or "):
        patched_weights(_Weights({"w": np.zeros((4, 6), np.int8)}), lora_map,
                        [(read_lora(path), 1.0)], "unet")
    with pytest.raises(ModelError, match=r"is \(6, 4\) in the graph, but its lora_map.json "):
        patched_weights(_Weights({"w": np.zeros((6, 4), np.float32)}), lora_map,
                        [(read_lora(path), 1.0)], "unet")
