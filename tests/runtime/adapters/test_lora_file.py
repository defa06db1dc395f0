"""Reading LoRA files at run time (runtime/adapters/lora_file.py, lora_names.py), NumPy only:
each key layout read into (component, module) layers, names mapped onto a model's module paths
(kohya's underscores and SGM's block numbers included), A1111's hashes, and one-line refusals."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from sdrt.runtime.adapters.lora_file import read_lora
from sdrt.runtime.adapters.lora_names import module_paths
from sdrt.runtime.errors import InputError

RANK = 2


def _factors(out: int, inp: int, kernel: int | None = None, seed: int = 0) -> tuple:
    rng = np.random.default_rng(seed)
    down = (RANK, inp) if kernel is None else (RANK, inp, kernel, kernel)
    up = (out, RANK) if kernel is None else (out, RANK, 1, 1)
    return (rng.standard_normal(down).astype(np.float32),
            rng.standard_normal(up).astype(np.float32))


def _kohya(name: str, out: int = 4, inp: int = 3, kernel: int | None = None,
           alpha: float | None = 1.0) -> dict[str, np.ndarray]:
    down, up = _factors(out, inp, kernel)
    tensors = {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up}
    if alpha is not None:
        tensors[f"{name}.alpha"] = np.array(alpha, np.float32)
    return tensors


def _write(path: Path, tensors: dict[str, np.ndarray]) -> Path:
    save_file(tensors, str(path))
    return path


def _write_raw(path: Path, tensors: dict[str, tuple[str, tuple, bytes]]) -> Path:
    """A safetensors file written by hand: name → (dtype, shape, bytes), for types NumPy lacks."""
    header, offset = {}, 0
    for name, (dtype, shape, raw) in tensors.items():
        header[name] = {"dtype": dtype, "shape": list(shape),
                        "data_offsets": [offset, offset + len(raw)]}
        offset += len(raw)
    text = json.dumps(header).encode()
    path.write_bytes(len(text).to_bytes(8, "little") + text
                     + b"".join(raw for *_, raw in tensors.values()))
    return path


# ---------------------------------------------------------------- layouts


def test_kohya_layers_by_component(tmp_path):
    path = _write(tmp_path / "style.safetensors", {
        **_kohya("lora_unet_down_blocks_0_resnets_0_conv1", kernel=3, alpha=4.0),
        **_kohya("lora_te_text_model_encoder_layers_0_mlp_fc1", alpha=None),
        **_kohya("lora_te2_text_model_encoder_layers_1_self_attn_q_proj")})
    lora = read_lora(path)
    assert lora.name == "style"
    assert set(lora.layers) == {
        ("unet", "down_blocks_0_resnets_0_conv1"),
        ("text_encoder", "text_model_encoder_layers_0_mlp_fc1"),
        ("text_encoder_2", "text_model_encoder_layers_1_self_attn_q_proj")}
    conv = lora.layers[("unet", "down_blocks_0_resnets_0_conv1")]
    assert conv.down.shape == (RANK, 3, 3, 3) and conv.up.shape == (4, RANK, 1, 1)
    assert conv.factor == 4.0 / RANK
    assert lora.layers[("text_encoder", "text_model_encoder_layers_0_mlp_fc1")].factor == 1.0
    assert lora.components == {"unet", "text_encoder", "text_encoder_2"}


def test_diffusers_layouts(tmp_path):
    down, up = _factors(4, 3)
    attn = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1"
    path = _write(tmp_path / "peft.safetensors", {
        "text_encoder_2.text_model.encoder.layers.0.mlp.fc2.lora_A.weight": down,
        "text_encoder_2.text_model.encoder.layers.0.mlp.fc2.lora_B.weight": up,
        "text_encoder.text_model.encoder.layers.0.mlp.fc2.lora_A.weight": down,
        "text_encoder.text_model.encoder.layers.0.mlp.fc2.lora_B.weight": up,
        "text_encoder.text_model.encoder.layers.0.mlp.fc2.alpha": np.array(1.0, np.float32),
        f"{attn}.to_k.lora.down.weight": down, f"{attn}.to_k.lora.up.weight": up,
        f"{attn}.processor.to_out_lora.down.weight": down,
        f"{attn}.processor.to_out_lora.up.weight": up})
    lora = read_lora(path)
    assert set(lora.layers) == {
        ("text_encoder_2", "text_model.encoder.layers.0.mlp.fc2"),
        ("text_encoder", "text_model.encoder.layers.0.mlp.fc2"),
        ("unet", f"{attn[5:]}.to_k"), ("unet", f"{attn[5:]}.to_out.0")}
    assert lora.layers[("text_encoder", "text_model.encoder.layers.0.mlp.fc2")].factor == 0.5
    assert lora.layers[("unet", f"{attn[5:]}.to_k")].alpha is None


def test_float16_and_bfloat16_factors(tmp_path):
    down, up = _factors(4, 3)
    half = _write(tmp_path / "half.safetensors", {
        "lora_unet_conv_in.lora_down.weight": down.astype(np.float16),
        "lora_unet_conv_in.lora_up.weight": up.astype(np.float16)})
    assert read_lora(half).layers[("unet", "conv_in")].down.dtype == np.float16
    # bfloat16 (NumPy has no such type): the upper 16 bits of each float32
    path = _write_raw(tmp_path / "bf16.safetensors", {
        f"lora_unet_conv_in.lora_{part}.weight": (
            "BF16", value.shape, (value.view(np.uint32) >> 16).astype("<u2").tobytes())
        for part, value in (("down", down), ("up", up))})
    layer = read_lora(path).layers[("unet", "conv_in")]
    truncated = (down.view(np.uint32) & 0xFFFF0000).view(np.float32)
    assert layer.down.dtype == np.float32 and np.array_equal(layer.down, truncated)


def test_hashes_are_a1111s(tmp_path):
    path = _write(tmp_path / "x.safetensors", _kohya("lora_unet_conv_in"))
    data = path.read_bytes()
    header = int.from_bytes(data[:8], "little")
    lora = read_lora(path)
    assert lora.sha256 == hashlib.sha256(data).hexdigest()
    # sd-webui-additional-networks' hash, which A1111 writes: the bytes after the JSON header
    assert lora.addnet_hash == hashlib.sha256(data[8 + header:]).hexdigest()
    assert lora.short_hash == lora.addnet_hash[:12]


# ---------------------------------------------------------------- names onto a model

SD_PATHS = ["conv_in", "time_embedding.linear_1", "conv_out",
            "down_blocks.0.resnets.0.conv1", "down_blocks.0.resnets.1.time_emb_proj",
            "down_blocks.0.attentions.1.transformer_blocks.0.attn1.to_out.0",
            "down_blocks.0.downsamplers.0.conv",
            "down_blocks.1.resnets.0.conv_shortcut", "down_blocks.1.resnets.1.conv2",
            "mid_block.resnets.1.conv1", "mid_block.attentions.0.proj_in",
            "up_blocks.0.resnets.2.conv1", "up_blocks.0.upsamplers.0.conv",
            "up_blocks.1.resnets.0.conv1", "up_blocks.1.attentions.2.proj_out"]


@pytest.mark.parametrize(("name", "path"), [
    ("down_blocks_0_attentions_1_transformer_blocks_0_attn1_to_out_0",
     "down_blocks.0.attentions.1.transformer_blocks.0.attn1.to_out.0"),
    ("down_blocks.1.resnets.1.conv2", "down_blocks.1.resnets.1.conv2"),
    # SGM: down block 0 (CrossAttn, 2 resnets) is input_blocks 1, 2 and its downsampler 3;
    # down block 1 (no attention, no downsampler) 4, 5
    ("input_blocks_0_0", "conv_in"), ("time_embed_0", "time_embedding.linear_1"),
    ("input_blocks_1_0_in_layers_2", "down_blocks.0.resnets.0.conv1"),
    ("input_blocks_2_0_emb_layers_1", "down_blocks.0.resnets.1.time_emb_proj"),
    ("input_blocks_2_1_transformer_blocks_0_attn1_to_out_0",
     "down_blocks.0.attentions.1.transformer_blocks.0.attn1.to_out.0"),
    ("input_blocks_3_0_op", "down_blocks.0.downsamplers.0.conv"),
    ("input_blocks_4_0_skip_connection", "down_blocks.1.resnets.0.conv_shortcut"),
    ("input_blocks_5_0_out_layers_3", "down_blocks.1.resnets.1.conv2"),
    ("middle_block_1_proj_in", "mid_block.attentions.0.proj_in"),
    ("middle_block_2_in_layers_2", "mid_block.resnets.1.conv1"),
    # up block 0 (no attention): output_blocks 0-2, its upsampler in 2 at slot 1
    ("output_blocks_2_0_in_layers_2", "up_blocks.0.resnets.2.conv1"),
    ("output_blocks_2_1_conv", "up_blocks.0.upsamplers.0.conv"),
    ("output_blocks_3_0_in_layers_2", "up_blocks.1.resnets.0.conv1"),
    ("output_blocks_5_1_proj_out", "up_blocks.1.attentions.2.proj_out"),
    ("out_2", "conv_out"),
    ("input_blocks_6_0_in_layers_2", None), ("down_blocks_0_resnets_0_conv9", None),
])
def test_unet_names(name, path):
    known = [*SD_PATHS, "up_blocks.1.attentions.0.proj_in", "up_blocks.1.resnets.2.conv1"]
    assert module_paths([name], known) == {name: path}


def test_text_encoder_names_with_or_without_text_model():
    with_level = ["text_model.encoder.layers.0.self_attn.q_proj",
                  "text_model.encoder.layers.0.mlp.fc1"]
    without = [path.removeprefix("text_model.") for path in with_level]
    for known in (with_level, without):
        found = module_paths(["text_model_encoder_layers_0_self_attn_q_proj",
                              "text_model.encoder.layers.0.mlp.fc1", "encoder_layers_0_mlp_fc2"],
                             known)
        assert list(found.values()) == [known[0], known[1], None]


# ---------------------------------------------------------------- refusals


def _nan(path: Path) -> None:
    tensors = _kohya("lora_unet_conv_in")
    tensors["lora_unet_conv_in.lora_up.weight"][0, 0] = np.nan
    _write(path, tensors)


def _inf(path: Path) -> None:
    _write(path, {**_kohya("lora_unet_conv_in"),
                  "lora_unet_conv_in.alpha": np.array(np.inf, np.float32)})


def _truncated(path: Path) -> None:
    _write(path, _kohya("lora_unet_conv_in"))
    path.write_bytes(path.read_bytes()[:-10])


def _extra(name: str, value: np.ndarray | None = None):
    def write(path: Path) -> None:
        _write(path, {**_kohya("lora_unet_conv_in"),
                      name: np.zeros(3, np.float32) if value is None else value})
    return write


def _float8(path: Path) -> None:
    _write_raw(path, {"lora_unet_conv_in.lora_down.weight": ("F8_E4M3", (2, 3), bytes(6)),
                      "lora_unet_conv_in.lora_up.weight": ("F8_E4M3", (4, 2), bytes(8))})


def _rank_mismatch(path: Path) -> None:
    tensors = _kohya("lora_unet_conv_in")
    tensors["lora_unet_conv_in.lora_up.weight"] = np.zeros((4, RANK + 1), np.float32)
    _write(path, tensors)


def _no_up(path: Path) -> None:
    tensors = _kohya("lora_unet_conv_in")
    del tensors["lora_unet_conv_in.lora_up.weight"]
    _write(path, tensors)


@pytest.mark.parametrize(("write", "message"), [
    (lambda p: p.write_bytes(b""), "truncated or not a safetensors file"),
    (lambda p: p.write_bytes(b"\xff" * 64), "truncated or not a safetensors file"),
    (lambda p: p.write_bytes((20).to_bytes(8, "little") + b"{not json at all}xxx"),
     "header is not JSON"),
    (_truncated, "truncated or corrupt"),
    (lambda p: _write(p, {"emb_params": np.zeros((2, 8), np.float32)}), "holds no LoRA weights"),
    (_nan, "NaN or infinite values in 'lora_unet_conv_in.lora_up.weight'"),
    (_inf, "NaN or infinite values in 'lora_unet_conv_in.alpha'"),
    (_extra("lora_unet_conv_out.hada_w1_a"), "LyCORIS LoHa"),
    (_extra("lora_unet_conv_out.lokr_w1"), "LyCORIS LoKr"),
    (_extra("lora_unet_conv_in.dora_scale"), "LyCORIS DoRA"),
    (_extra("lora_unet_conv_in.lora_mid.weight"), "Tucker"),
    (_extra("lora_transformer_x.lora_down.weight"), "made for another kind of model"),
    (_extra("lora_unet_conv_in.diff"), "1 keys sdrt does not read, e.g. 'lora_unet_conv_in.diff'"),
    (_float8, "tensor 'lora_unet_conv_in.lora_down.weight' is F8_E4M3, a type sdrt does not"),
    (_rank_mismatch, f"has down rank {RANK} but up rank {RANK + 1}"),
    (_no_up, "layer 'conv_in' has no up factor"),
])
def test_bad_files_refused_in_one_line(tmp_path, write, message):
    path = tmp_path / "bad.safetensors"
    write(path)
    with pytest.raises(InputError) as caught:
        read_lora(path)
    text = str(caught.value)
    assert message in text and "'bad.safetensors'" in text and "\n" not in text


def test_pickles_and_missing_files_refused(tmp_path):
    pickle = tmp_path / "old.ckpt"
    pickle.write_bytes(b"\x80\x04")
    with pytest.raises(InputError, match="'old.ckpt' is not a .safetensors file .*pickle"):
        read_lora(pickle)
    with pytest.raises(InputError, match="does not exist"):
        read_lora(tmp_path / "gone.safetensors")
