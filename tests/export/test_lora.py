"""`sdrt export --lora FILE --lora-scale S`: LoRA files in kohya's and in diffusers/peft's key
layout fused into tiny_sd before export. The fused weights in the ONNX graphs are checked against
W + S · (alpha / rank) · up @ down computed here, apart from diffusers' loader; the images against
diffusers' pipeline with the same LoRAs loaded and fused; bad files fail with one-line errors.
The export records the LCM-LoRA family, the way an SD 1.5 + LCM-LoRA export is used, and its LoRA
map points at the fused weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from sdrt.runtime.model.manifest import Manifest, sha256_file
from sdrt.runtime.pipeline import Pipeline
from tests.cli.test_cli import assert_one_line_error, run
from tests.conftest import MAX_PIXEL_DIFF, PROMPT, as_array, load_reference, reference_images

torch = pytest.importorskip("torch")
pytest.importorskip("peft", reason="LoRA fusing needs peft (pip install 'sdrt[export]')")

RANK = 4
KOHYA_SCALE, PEFT_SCALE = 0.7, 1.3
# Layers of tiny_sd each file changes: (kohya or diffusers module path, out, in, kernel, alpha).
ATTN = "down_blocks.0.attentions.0.transformer_blocks.0"
KOHYA_LAYERS = [
    (f"lora_unet_{ATTN.replace('.', '_')}_attn1_to_q", 32, 32, None, 2.0),
    ("lora_unet_down_blocks_0_resnets_0_conv1", 32, 32, 3, 1.0),
    # a whole attention block: diffusers recognises kohya text-encoder keys by their out_proj
    *[(f"lora_te_text_model_encoder_layers_0_self_attn_{name}", 32, 32, None, 8.0)
      for name in ("q_proj", "k_proj", "v_proj", "out_proj")],
    # and its MLP, as most kohya LoRAs have it (diffusers renames these `…lora_linear_layer…`)
    ("lora_te_text_model_encoder_layers_0_mlp_fc1", 37, 32, None, 8.0),
    ("lora_te_text_model_encoder_layers_0_mlp_fc2", 32, 37, None, 8.0),
]
PEFT_LAYERS = [(f"unet.{ATTN}.attn2.to_k", 32, 32), (f"unet.{ATTN}.attn2.to_v", 32, 32),
               # diffusers reads peft text-encoder keys only beside an attention projection
               ("text_encoder.text_model.encoder.layers.1.self_attn.q_proj", 32, 32),
               ("text_encoder.text_model.encoder.layers.1.mlp.fc1", 37, 32)]
# Fused weights: W + delta in float32 either way, the product's sums in another order (~1 ulp).
FUSED_ATOL = 1e-6


def _pair(gen, out: int, inp: int, kernel: int | None) -> tuple:
    """(down, up) small random LoRA factors; a conv's down has the kernel, its up is 1×1."""
    down = (RANK, inp) if kernel is None else (RANK, inp, kernel, kernel)
    up = (out, RANK) if kernel is None else (out, RANK, 1, 1)
    return torch.randn(down, generator=gen) * 0.3, torch.randn(up, generator=gen) * 0.3


def write_kohya(path: Path, layers: list[tuple] = KOHYA_LAYERS) -> dict:
    from safetensors.torch import save_file

    gen, tensors = torch.Generator().manual_seed(1), {}
    for name, out, inp, kernel, alpha in layers:
        down, up = _pair(gen, out, inp, kernel)
        tensors |= {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up,
                    f"{name}.alpha": torch.tensor(alpha)}
    save_file(tensors, str(path))
    return tensors


def write_peft(path: Path) -> dict:
    from safetensors.torch import save_file

    gen, tensors = torch.Generator().manual_seed(2), {}
    for name, out, inp in PEFT_LAYERS:
        tensors[f"{name}.lora_A.weight"], tensors[f"{name}.lora_B.weight"] = _pair(gen, out, inp,
                                                                                  None)
    save_file(tensors, str(path))
    return tensors


@pytest.fixture(scope="module")
def lora_files(tmp_path_factory) -> dict[str, tuple[Path, dict]]:
    folder = tmp_path_factory.mktemp("loras")
    return {kind: (folder / f"{kind}.safetensors", write(folder / f"{kind}.safetensors"))
            for kind, write in (("kohya", write_kohya), ("peft", write_peft))}


@pytest.fixture(scope="module")
def lora_onnx_dir(tiny_sd_dir, lora_files, tmp_path_factory) -> Path:
    """tiny_sd with both LoRAs fused (kohya at 0.7, then peft at 1.3), as SD 1.5 + LCM-LoRA."""
    out = tmp_path_factory.mktemp("lora-onnx") / "tiny-lora"
    result = run("export", tiny_sd_dir, out, "--lora", lora_files["kohya"][0], "--lora-scale",
                 KOHYA_SCALE, "--lora", lora_files["peft"][0], "--lora-scale", PEFT_SCALE,
                 "--family", "lcm-lora")
    assert result.exit_code == 0, result.output
    return out


# ---------------------------------------------------------------- the exported folder


def test_manifest_names_the_fused_loras(lora_onnx_dir, lora_files):
    manifest = Manifest.load(lora_onnx_dir)
    assert manifest.family == "lcm-lora"
    assert manifest.extra["loras"] == [
        {"file": f"{kind}.safetensors", "sha256": sha256_file(lora_files[kind][0]),
         "scale": scale} for kind, scale in (("kohya", KOHYA_SCALE), ("peft", PEFT_SCALE))]
    assert "validation" in manifest.components["unet"].extra  # fused graphs checked vs torch


def _initializers(path: Path) -> dict[str, np.ndarray]:
    import onnx
    from onnx import numpy_helper

    return {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}


def _holds(tensors: dict[str, np.ndarray], weight: np.ndarray) -> bool:
    """Whether a graph holds `weight` (a Linear's as its transpose, as MatMul folds it)."""
    forms = [weight, weight.T] if weight.ndim == 2 else [weight]
    return any(t.shape == w.shape and np.abs(t - w).max() <= FUSED_ATOL
               for t in tensors.values() for w in forms)


def _expected(base: dict, key: str, down, up, factor: float) -> tuple[np.ndarray, np.ndarray]:
    """(W, W + factor · up @ down) for base weight `key`; conv factors flattened, as kohya's."""
    weight = base[key]
    delta = (up.flatten(1) @ down.flatten(1)).reshape(weight.shape)
    return weight.numpy(), (weight + delta * factor).numpy()


@pytest.mark.parametrize(("component", "kind", "layer", "key"), [
    ("unet", "kohya", 0, f"{ATTN}.attn1.to_q.weight"),
    ("unet", "kohya", 1, "down_blocks.0.resnets.0.conv1.weight"),
    ("text_encoder", "kohya", 2, "text_model.encoder.layers.0.self_attn.q_proj.weight"),
    ("text_encoder", "kohya", 6, "text_model.encoder.layers.0.mlp.fc1.weight"),
    ("text_encoder", "kohya", 7, "text_model.encoder.layers.0.mlp.fc2.weight"),
    ("unet", "peft", 0, f"{ATTN}.attn2.to_k.weight"),
    ("text_encoder", "peft", 3, "text_model.encoder.layers.1.mlp.fc1.weight"),
])
def test_fused_weight_is_w_plus_scaled_up_down(tiny_sd_dir, lora_onnx_dir, lora_files,
                                               component, kind, layer, key):
    from safetensors.torch import load_file

    weights = "diffusion_pytorch_model" if component == "unet" else "model"
    base = load_file(str(tiny_sd_dir / component / f"{weights}.safetensors"))
    tensors = lora_files[kind][1]
    if kind == "kohya":
        name, *_, alpha = KOHYA_LAYERS[layer]
        down, up = tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"]
        factor = KOHYA_SCALE * alpha / RANK
    else:  # no alpha in the file: alpha = rank
        name = PEFT_LAYERS[layer][0]
        down, up = tensors[f"{name}.lora_A.weight"], tensors[f"{name}.lora_B.weight"]
        factor = PEFT_SCALE
    original, fused = _expected(base, key, down, up, factor)
    graph = _initializers(lora_onnx_dir / component / "model.onnx")
    assert _holds(graph, fused) and not _holds(graph, original)
    assert not any("lora" in name.lower() for name in graph)  # plain graphs, no LoRA branches


def test_kohya_text_encoder_mlp_layers_count_as_peft_wraps_them(tiny_sd_dir, lora_files):
    # diffusers renames kohya's text-encoder MLP keys `….lora_linear_layer.down.weight`; counted
    # from the attention keys alone, the export refused the file ("-2 of its 4 text_encoder
    # layers match no layer"). The fused encoder must equal diffusers' load + fuse.
    from sdrt.export.components import load_text_encoder
    from sdrt.export.lora import fuse_loras, read_lora
    from sdrt.export.source import read_source

    path = lora_files["kohya"][0]
    lora = read_lora(path, KOHYA_SCALE, unet_config=read_source(tiny_sd_dir, None).unet,
                     keys="sd")
    assert lora.layers == {"unet": 2, "text_encoder": 6}
    model = load_text_encoder(tiny_sd_dir / "text_encoder")
    fuse_loras(model, "text_encoder", [lora])
    pipe = load_reference(tiny_sd_dir)
    pipe.load_lora_weights(str(path))
    pipe.fuse_lora(lora_scale=KOHYA_SCALE)
    pipe.unload_lora_weights()
    expected = pipe.text_encoder.state_dict()
    fused = model.state_dict()
    assert set(fused) == set(expected)
    for key, value in fused.items():
        np.testing.assert_allclose(value.numpy(), expected[key].numpy(), rtol=0,
                                   atol=FUSED_ATOL, err_msg=key)
    fc2 = next(key for key in fused if key.endswith("layers.0.mlp.fc2.weight"))
    base = load_text_encoder(tiny_sd_dir / "text_encoder").state_dict()
    assert np.abs(fused[fc2].numpy() - base[fc2].numpy()).max() > 100 * FUSED_ATOL  # changed


def test_per_layer_text_encoder_alphas_are_honoured(tiny_sd_dir, tmp_path):
    # diffusers keys kohya's text-encoder alphas by paths its loader does not find (and
    # transformers 5's CLIP has no `text_model.` level), so a layer whose alpha differs from the
    # file's most common one was fused with that one; kohya's alpha is the layer's own.
    from safetensors.torch import load_file

    from sdrt.export.components import load_text_encoder
    from sdrt.export.lora import fuse_loras, read_lora
    from sdrt.export.source import read_source

    modules = {"self_attn_q_proj": ("self_attn.q_proj", 32, 32, 3.0),
               "self_attn_k_proj": ("self_attn.k_proj", 32, 32, 8.0),
               "self_attn_v_proj": ("self_attn.v_proj", 32, 32, 8.0),
               "self_attn_out_proj": ("self_attn.out_proj", 32, 32, 8.0),
               "mlp_fc1": ("mlp.fc1", 37, 32, 3.0), "mlp_fc2": ("mlp.fc2", 32, 37, 8.0)}
    prefix = "lora_te_text_model_encoder_layers_0_"
    path = tmp_path / "alphas.safetensors"
    tensors = write_kohya(path, [(prefix + name, out, inp, None, alpha)
                                 for name, (_, out, inp, alpha) in modules.items()])
    lora = read_lora(path, KOHYA_SCALE, unet_config=read_source(tiny_sd_dir, None).unet,
                     keys="sd")
    model = load_text_encoder(tiny_sd_dir / "text_encoder")
    fuse_loras(model, "text_encoder", [lora])
    fused = {key.removeprefix("text_model."): value for key, value in model.state_dict().items()}
    base = load_file(str(tiny_sd_dir / "text_encoder" / "model.safetensors"))
    for name, (module, *_, alpha) in modules.items():
        key = f"text_model.encoder.layers.0.{module}.weight"
        _, expected = _expected(base, key, tensors[f"{prefix}{name}.lora_down.weight"],
                                tensors[f"{prefix}{name}.lora_up.weight"],
                                KOHYA_SCALE * alpha / RANK)
        np.testing.assert_allclose(fused[key.removeprefix("text_model.")].numpy(), expected,
                                   rtol=0, atol=FUSED_ATOL, err_msg=key)


def test_lora_map_points_at_the_fused_weights(lora_onnx_dir, tiny_sd_dir, lora_files):
    from safetensors.torch import load_file

    from sdrt.runtime.adapters.lora_map import read_lora_map

    lora_map = read_lora_map(lora_onnx_dir / "text_encoder")
    entry = lora_map.modules["text_model.encoder.layers.0.mlp.fc1"]
    held = _initializers(lora_onnx_dir / "text_encoder" / lora_map.graph)[entry.initializer]
    name, *_, alpha = KOHYA_LAYERS[6]
    tensors = lora_files["kohya"][1]
    _, fused = _expected(load_file(str(tiny_sd_dir / "text_encoder" / "model.safetensors")),
                         "text_model.encoder.layers.0.mlp.fc1.weight",
                         tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"],
                         KOHYA_SCALE * alpha / RANK)
    assert entry.shape == fused.shape
    np.testing.assert_allclose(held.T if entry.transposed else held, fused, rtol=0,
                               atol=FUSED_ATOL)


# ---------------------------------------------------------------- parity with diffusers


@pytest.fixture(scope="module")
def lora_reference(tiny_sd_dir, lora_files):
    """diffusers' pipeline with the same LoRAs loaded, fused at their scales and unloaded."""
    pipe = load_reference(tiny_sd_dir)
    for kind, scale in (("kohya", KOHYA_SCALE), ("peft", PEFT_SCALE)):
        pipe.load_lora_weights(str(lora_files[kind][0]))
        pipe.fuse_lora(lora_scale=scale)
        pipe.unload_lora_weights()
    return pipe


@pytest.mark.parity
def test_lcm_lora_defaults_equal_diffusers(lora_reference, lora_onnx_dir, tiny_onnx_dir,
                                           backend):
    # LCM-LoRA's way: LCMScheduler, 4 steps, guidance 1 (the lcm-lora family's defaults).
    images = as_array(Pipeline.load(lora_onnx_dir, backend).generate(PROMPT, seed=5,
                                                                      num_images=2))
    expected = reference_images(lora_reference, "lcm", steps=4, guidance=1.0, width=64,
                                height=64, seed=5, num_images=2, negative=None)
    assert np.abs(images - expected).max() <= MAX_PIXEL_DIFF[backend]
    plain = as_array(Pipeline.load(tiny_onnx_dir, backend).generate(
        PROMPT, seed=5, num_images=2, steps=4, guidance_scale=1.0, sampler="lcm"))
    assert np.abs(images - plain).max() > 5 * MAX_PIXEL_DIFF[backend]  # the LoRAs matter


@pytest.mark.parity
def test_guided_images_equal_diffusers(lora_reference, lora_onnx_dir):
    images = Pipeline.load(lora_onnx_dir).generate(PROMPT, negative_prompt="blurry", steps=3,
                                                   guidance_scale=5.0, seed=2, sampler="euler")
    expected = reference_images(lora_reference, "euler", steps=3, guidance=5.0, width=64,
                                height=64, seed=2, num_images=1, negative="blurry")
    assert np.abs(as_array(images) - expected).max() <= MAX_PIXEL_DIFF["ort"]


# ---------------------------------------------------------------- one-line errors


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _save(path: Path, tensors: dict) -> Path:
    from safetensors.torch import save_file

    save_file(tensors, str(path))
    return path


def _peft_keys(module: str, out: int = 32, inp: int = 32) -> dict:
    return {f"{module}.lora_A.weight": torch.zeros(RANK, inp),
            f"{module}.lora_B.weight": torch.zeros(out, RANK)}


@pytest.mark.parametrize(("make", "fragments"), [
    (lambda d: d / "missing.safetensors", ["does not exist"]),
    (lambda d: _write(d / "lora.bin", b"pickle"), ["'lora.bin' is not a .safetensors file"]),
    (lambda d: _write(d / "junk.safetensors", b"\x00" * 64),
     ["'junk.safetensors' is not a readable .safetensors file"]),
    (lambda d: _save(d / "plain.safetensors", {"unet.conv_in.weight": torch.zeros(2)}),
     ["'plain.safetensors' holds no LoRA weights"]),
    (lambda d: _save(d / "xl.safetensors", _peft_keys("text_encoder_2.text_model.x.q_proj")),
     ["has weights for no part of this model", "text_encoder_2"]),
    (lambda d: _save(d / "none.safetensors", _peft_keys(f"unet.{ATTN}.attn9.to_q")),
     ["'none.safetensors'", "unet layers", "not found in the base model"]),
    (lambda d: _save(d / "some.safetensors", {**_peft_keys(f"unet.{ATTN}.attn9.to_q"),
                                              **_peft_keys(f"unet.{ATTN}.attn1.to_q")}),
     ["'some.safetensors': 1 of its 2 unet layers match no layer of this model"]),
    (lambda d: _save(d / "wide.safetensors", _peft_keys(f"unet.{ATTN}.attn1.to_q", inp=64)),
     ["'wide.safetensors'", "size mismatch"]),
])
def test_bad_lora_files_fail_in_one_line(tiny_sd_dir, tmp_path, make, fragments):
    result = run("export", tiny_sd_dir, tmp_path / "out", "--lora", make(tmp_path))
    assert_one_line_error(result, *fragments)
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]  # no partial folder


def test_more_scales_than_loras_is_refused(tiny_sd_dir, tmp_path, lora_files):
    result = run("export", tiny_sd_dir, tmp_path / "out", "--lora", lora_files["kohya"][0],
                 "--lora-scale", "0.5", "--lora-scale", "1")
    assert_one_line_error(result, "2 --lora-scale values for 1 --lora files")

