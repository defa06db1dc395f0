"""What `sdrt export` reads: folders, A1111 single files, pickles, the Hugging Face cache.

The must-show: a single-file checkpoint written from the tiny model in A1111's LDM key layout
(tests/ldm_checkpoint.py) exports to the same graphs as the diffusers folder it came from.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from sdrt.runtime.errors import ExportError, InputError, ModelError
from sdrt.runtime.model.manifest import Manifest, sha256_file
from tests.cli.test_cli import assert_one_line_error, run
from tests.export.ldm_checkpoint import write_ldm_checkpoint

COMPONENTS = ("text_encoder", "unet", "vae_encoder", "vae_decoder")
WEIGHTS = ("unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
           "text_encoder/model.safetensors")
REPO, COMMIT = "tiny-org/tiny-sd", "0123456789abcdef0123456789abcdef01234567"
# Dynamic axes of the exported graphs (sdrt.export.components) → sizes to feed: batch 2, the full
# 77 tokens, and a 24×40 latent (not square, not a multiple of the UNet's downsampling factor);
# the UNet's ControlNet residuals at level 1 are that latent halved.
DYNAMIC = {"batch_size": 2, "sequence_length": 77, "height": 24, "width": 40,
           "height_latent": 24, "width_latent": 40, "height_1": 12, "width_1": 20}


@pytest.fixture(autouse=True)
def _need_export_stack() -> None:
    for name in ("torch", "diffusers", "transformers", "onnx", "safetensors"):
        pytest.importorskip(name)


@pytest.fixture(scope="module")
def ldm_file(tiny_sd_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny_sd_dir as an A1111 single file (LDM keys, schedule buffers, EMA decay)."""
    return write_ldm_checkpoint(tiny_sd_dir, tmp_path_factory.mktemp("ldm") / "tiny-sd.safetensors")


@pytest.fixture(scope="module")
def ldm_state(ldm_file: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(ldm_file))


@pytest.fixture(scope="module")
def single_file_onnx(ldm_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`sdrt export tiny-sd.safetensors OUT`, graphs checked against torch as for any source."""
    out = tmp_path_factory.mktemp("single_file_onnx") / "from-single-file"
    result = run("export", ldm_file, out)
    assert result.exit_code == 0, result.output
    return out


# ---------------------------------------------------------------- helpers


def _random_feeds(session, rng: np.random.Generator) -> dict[str, np.ndarray]:
    feeds = {}
    for spec in session.get_inputs():
        shape = [DYNAMIC[d] if isinstance(d, str) else d for d in spec.shape]
        if spec.type == "tensor(int64)":
            feeds[spec.name] = rng.integers(0, 49406, size=shape, dtype=np.int64)
        else:
            feeds[spec.name] = rng.standard_normal(shape).astype(np.float32)
    return feeds


def _assert_same_graph(path_a: Path, path_b: Path) -> None:
    """Same nodes in the same order, same initializers by value, same outputs in ORT."""
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    a, b = onnx.load(str(path_a)).graph, onnx.load(str(path_b)).graph
    assert [n.SerializeToString() for n in a.node] == [n.SerializeToString() for n in b.node]
    assert [(v.name, v.type) for v in a.input] == [(v.name, v.type) for v in b.input]
    weights_a = {t.name: numpy_helper.to_array(t) for t in a.initializer}
    weights_b = {t.name: numpy_helper.to_array(t) for t in b.initializer}
    assert weights_a.keys() == weights_b.keys()
    for name, value in weights_a.items():
        np.testing.assert_array_equal(weights_b[name], value, err_msg=name)
    sessions = [ort.InferenceSession(str(p), providers=["CPUExecutionProvider"])
                for p in (path_a, path_b)]
    feeds = _random_feeds(sessions[0], np.random.default_rng(7))
    for out_a, out_b in zip(*(s.run(None, feeds) for s in sessions), strict=True):
        np.testing.assert_array_equal(out_a, out_b)


def _assert_same_weights(folder: Path, reference: Path) -> None:
    from safetensors.torch import load_file

    for rel in WEIGHTS:
        got, want = load_file(str(folder / rel)), load_file(str(reference / rel))
        assert got.keys() == want.keys(), rel
        for key, value in want.items():
            assert got[key].equal(value), f"{rel}: {key}"


def _fake_hub_cache(cache: Path, source: Path, repo: str = REPO) -> Path:
    """huggingface_hub's cache layout (models--ORG--NAME/): snapshot files are links into blobs/."""
    storage = cache / f"models--{repo.replace('/', '--')}"
    snapshot = storage / "snapshots" / COMMIT
    (storage / "blobs").mkdir(parents=True)
    for path in sorted(p for p in source.rglob("*") if p.is_file()):
        data = path.read_bytes()
        blob = storage / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = snapshot / path.relative_to(source)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (storage / "refs").mkdir()
    (storage / "refs" / "main").write_text(COMMIT)
    return snapshot


@pytest.fixture
def offline_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty HF cache with HF_HUB_OFFLINE set, as the environment sets them before import."""
    from huggingface_hub import constants

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    # huggingface_hub reads both variables once, at import: this process imported it already.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


# ---------------------------------------------------------------- single-file checkpoints


@pytest.mark.parity
@pytest.mark.parametrize("component", COMPONENTS)
def test_single_file_exports_the_same_graphs(single_file_onnx, tiny_onnx_dir, component) -> None:
    _assert_same_graph(single_file_onnx / component / "model.onnx",
                       tiny_onnx_dir / component / "model.onnx")


def test_single_file_manifest_names_the_file(single_file_onnx, tiny_onnx_dir, ldm_file) -> None:
    got, want = Manifest.load(single_file_onnx), Manifest.load(tiny_onnx_dir)
    assert got.source == {"file": "tiny-sd.safetensors", "sha256": sha256_file(ldm_file),
                          "config": "tiny_sd", "config_sha256": got.source["config_sha256"]}
    assert (got.family, got.prediction_type, got.scaling_factor, got.sample_size) == (
        want.family, want.prediction_type, want.scaling_factor, want.sample_size)
    assert not list(single_file_onnx.parent.glob(".sdrt-convert-*"))  # the temporary folder


def test_converted_folder_loads_in_diffusers_with_every_weight(ldm_file, tiny_sd_dir) -> None:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    from sdrt.export.sources import resolve_source

    with resolve_source(str(ldm_file)) as (folder, origin):
        _assert_same_weights(folder, tiny_sd_dir)
        for cls, name in ((UNet2DConditionModel, "unet"), (AutoencoderKL, "vae"),
                          (CLIPTextModel, "text_encoder")):
            _, info = cls.from_pretrained(folder / name, output_loading_info=True)
            assert not any(info.values()), (name, info)  # nothing missing, unexpected, resized
    assert origin["config"] == "tiny_sd"
    assert not folder.exists()


def test_sd2_single_file_needs_a_config_choice(tiny_sd2_dir, tmp_path) -> None:
    from sdrt.export.sources import resolve_source

    path = write_ldm_checkpoint(tiny_sd2_dir, tmp_path / "tiny-sd2.safetensors")
    result = run("export", path, tmp_path / "out")
    assert_one_line_error(result, "fits several shipped configs (tiny_sd2, tiny_turbo)",
                          "--config")
    result = run("export", path, tmp_path / "out", "--config", "tiny_sd")
    assert_one_line_error(result, "does not fit --config tiny_sd: unet/ weights do not match")
    with resolve_source(str(path), config="tiny_sd2") as (folder, origin):
        _assert_same_weights(folder, tiny_sd2_dir)  # OpenCLIP's stacked q/k/v split back
    assert origin["config"] == "tiny_sd2"


@pytest.mark.parametrize(("arch", "fits"), [("sd15", "sd15"), ("sd21", "sd21, sd_turbo")])
def test_full_size_checkpoint_shapes_find_their_config(arch, fits) -> None:
    """SD 1.5 and 2.1 layouts at full size, as shapes only (meta tensors: no weights in memory)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from sdrt.export.single_file import SHIPPED_CONFIGS, Checkpoint, choose_config
    from tests.export.ldm_checkpoint import ldm_state

    folder = SHIPPED_CONFIGS / arch
    with torch.device("meta"):
        models = {name: cls.from_config(cls.load_config(folder / name))
                  for name, cls in (("unet", UNet2DConditionModel), ("vae", AutoencoderKL))}
        text = CLIPTextConfig.from_json_file(folder / "text_encoder" / "config.json")
        models["text_encoder"] = CLIPTextModel(text)
        state = ldm_state({name: model.state_dict() for name, model in models.items()},
                          {name: json.loads((folder / name / "config.json").read_text())
                           for name in models})
    if arch == "sd21":  # SD 2.x files hold OpenCLIP's 24 layers; SD reads the 23rd's output
        last = "cond_stage_model.model.transformer.resblocks."
        state.update({key.replace(f"{last}22.", f"{last}23."): value
                      for key, value in state.items() if key.startswith(f"{last}22.")})
    shapes = {key: tuple(value.shape) for key, value in state.items()}
    checkpoint = Checkpoint(f"{arch}.safetensors", shapes, lambda keys: pytest.fail("read"))
    if "," not in fits:
        assert choose_config(checkpoint) == fits
        return
    with pytest.raises(InputError, match=f"fits several shipped configs \\({fits}\\)"):
        choose_config(checkpoint)
    assert choose_config(checkpoint, config="sd_turbo") == "sd_turbo"


def _drop(key: str):
    return lambda state: state.pop(key)


def _add(key: str, *shape: int):
    def change(state: dict) -> None:
        import torch

        state[key] = torch.zeros(shape)
    return change


BAD_CHECKPOINTS = {  # change to the tiny checkpoint → what the one-line error must say
    "missing-weight": (_drop("model.diffusion_model.output_blocks.2.0.in_layers.0.weight"),
                       "closest (fewest keys off), tiny_sd: unet/ weights do not match its config: "
                       "1 missing"),
    "unused-weight": (_add("model.diffusion_model.label_emb.0.0.weight", 3),
                      "1 unexpected (e.g. 'model.diffusion_model.label_emb.0.0.weight')"),
    "wrong-shape": (_add("first_stage_model.quant_conv.weight", 8, 8, 1, 1, 1),
                    "vae/ weights do not match its config: 1 mismatched"),
    "unknown-tensor": (_add("embedding_manager.embedder.weight", 3),
                       "outside the UNet, VAE and text encoder"),
    "sdxl": (_add("conditioner.embedders.1.model.positional_embedding", 3),
             "an SDXL checkpoint ('conditioner.*') without its CLIP ViT-L"),
    "inpainting": (_add("model.diffusion_model.input_blocks.0.0.weight", 32, 9, 3, 3),
                   "9 input channels"),
    "lora-like": (lambda s: [s.pop(k) for k in list(s) if k.startswith("model.")],
                  "has no UNet"),
}


@pytest.mark.parametrize("case", sorted(BAD_CHECKPOINTS))
def test_bad_single_file_is_refused(ldm_state, tmp_path, case) -> None:
    assert_refused_in_one_line(ldm_state, case, *BAD_CHECKPOINTS[case], tmp_path)


def assert_refused_in_one_line(state, case, change, fragment, tmp_path) -> None:
    """`state` changed by `change` and saved as a single file is refused with one line naming
    `fragment`, and no half-converted folder is left in the scratch folder."""
    from safetensors.torch import save_file

    from sdrt.export.sources import resolve_source

    state = dict(state)
    change(state)
    path = tmp_path / f"{case}.safetensors"
    save_file(state, str(path))
    with pytest.raises(ModelError) as info, resolve_source(str(path), scratch=tmp_path / "work"):
        pass
    assert "\n" not in str(info.value) and fragment in str(info.value), str(info.value)
    assert list((tmp_path / "work").iterdir()) == []  # the half-converted folder is gone


# ---------------------------------------------------------------- pickle checkpoints


def test_pickle_refused_without_the_flag(tiny_sd_dir, tmp_path) -> None:
    path = write_ldm_checkpoint(tiny_sd_dir, tmp_path / "tiny-sd.ckpt")
    result = run("export", path, tmp_path / "out")
    assert_one_line_error(result, "'tiny-sd.ckpt' is a pickle checkpoint", "--allow-pickle")
    assert not (tmp_path / "out").exists()


def test_pickle_accepted_with_the_flag(tiny_sd_dir, tmp_path) -> None:
    from sdrt.export.sources import resolve_source

    path = write_ldm_checkpoint(tiny_sd_dir, tmp_path / "tiny-sd.ckpt")  # Lightning's nesting
    with resolve_source(str(path), allow_pickle=True) as (folder, origin):
        _assert_same_weights(folder, tiny_sd_dir)
    assert origin == {"file": "tiny-sd.ckpt", "sha256": sha256_file(path), "config": "tiny_sd"}


def test_pickle_with_code_is_refused_even_with_the_flag(ldm_state, tmp_path) -> None:
    import torch

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": ldm_state, "callback": Payload()}, path)
    result = run("export", path, tmp_path / "out", "--allow-pickle")
    assert_one_line_error(result, "'evil.ckpt' holds more than tensors", "weights_only=True")
    assert not marker.exists()


# ---------------------------------------------------------------- folders


def test_folder_is_used_in_place(tiny_sd_dir) -> None:
    from sdrt.export.sources import resolve_source

    with resolve_source(str(tiny_sd_dir)) as (folder, origin):
        assert (folder, origin) == (tiny_sd_dir, None)


def test_folder_with_pickle_weights_only(tiny_sd_dir, tmp_path) -> None:
    import torch
    from safetensors.torch import load_file

    from sdrt.export.sources import resolve_source

    src = tmp_path / "pickled"
    shutil.copytree(tiny_sd_dir, src)
    weights = src / "unet" / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(str(weights)), src / "unet" / "diffusion_pytorch_model.bin")
    weights.unlink()
    with pytest.raises(ExportError, match="pickle weights only for unet.*--allow-pickle"), \
            resolve_source(str(src)):
        pass
    with resolve_source(str(src), allow_pickle=True) as (folder, _):
        assert folder == src


@pytest.mark.parametrize(("spec", "fragment"), [
    ("missing/model.safetensors", "does not exist"),
    ("nowhere", "does not exist"),
    ("./org/name", "does not exist"),
])
def test_nonexistent_source(offline_cache, tmp_path, monkeypatch, spec, fragment) -> None:
    monkeypatch.chdir(tmp_path)  # offline_cache: were it taken for a hub id, still no network
    result = run("export", spec, tmp_path / "out")
    assert_one_line_error(result, fragment)


def test_source_options_that_do_not_apply(tiny_sd_dir, tmp_path) -> None:
    result = run("export", tiny_sd_dir, tmp_path / "out", "--revision", "main")
    assert_one_line_error(result, "--revision applies to hub ids only")
    result = run("export", tiny_sd_dir, tmp_path / "out", "--config", "sd15")
    assert_one_line_error(result, "--config applies to single-file checkpoints only")


# ---------------------------------------------------------------- Hugging Face cache


def test_hub_id_exports_offline_from_the_cache(tiny_sd_dir, tiny_onnx_dir, offline_cache,
                                               tmp_path) -> None:
    snapshot = _fake_hub_cache(offline_cache, tiny_sd_dir)
    assert (snapshot / "unet" / "config.json").is_symlink()
    out = tmp_path / "from-hub"
    result = run("export", REPO, out)
    assert result.exit_code == 0, result.output
    manifest = Manifest.load(out)
    assert manifest.source == {"hub_id": REPO, "revision": COMMIT,
                               "config_sha256": manifest.source["config_sha256"]}
    assert not any(p.is_symlink() for p in out.rglob("*"))  # contents copied, never links
    _assert_same_graph(out / "unet" / "model.onnx", tiny_onnx_dir / "unet" / "model.onnx")


def test_hub_revision_must_be_cached(tiny_sd_dir, offline_cache, tmp_path) -> None:
    _fake_hub_cache(offline_cache, tiny_sd_dir)
    result = run("export", f"{REPO}@v2", tmp_path / "out")
    assert_one_line_error(result, f"'{REPO}' is not in the Hugging Face cache")
    result = run("export", f"{REPO}@v2", tmp_path / "out", "--revision", "v3")
    assert_one_line_error(result, "two revisions")


def test_hub_snapshot_with_pickle_weights(tiny_sd_dir, offline_cache, tmp_path) -> None:
    import torch
    from safetensors.torch import load_file

    src = tmp_path / "pickled"
    shutil.copytree(tiny_sd_dir, src)
    weights = src / "text_encoder" / "model.safetensors"
    torch.save(load_file(str(weights)), src / "text_encoder" / "pytorch_model.bin")
    weights.unlink()
    _fake_hub_cache(offline_cache, src)
    result = run("export", REPO, tmp_path / "out")
    assert_one_line_error(result, "pickle weights only for text_encoder", "--allow-pickle")
    (offline_cache / f"models--{REPO.replace('/', '--')}" / "snapshots" / COMMIT / "text_encoder"
     / "pytorch_model.bin").unlink()
    result = run("export", REPO, tmp_path / "out")
    assert_one_line_error(result, f"'{REPO}' at {COMMIT} has no weights for text_encoder")


@pytest.mark.parametrize("model", ["tiny_sd_dir", "tiny_sdxl_dir"])
def test_hub_download_asks_for_every_file_export_reads(model, request, tmp_path,
                                                       monkeypatch) -> None:
    """The allow-patterns sent to huggingface_hub, applied (as it does, with fnmatch) to a repo
    that also holds files export never reads: exactly the pipeline folder's files come back."""
    from sdrt.export.source import read_source
    from sdrt.export.sources import resolve_source

    source = request.getfixturevalue(model)
    repo = tmp_path / "repo"
    shutil.copytree(source, repo)
    unread = ["unet/diffusion_pytorch_model.fp16.safetensors", "safety_checker/model.safetensors",
              "text_encoder/flax_model.msgpack", "vae_1_0/diffusion_pytorch_model.safetensors",
              "sd_xl_base_1.0.safetensors", "text_encoder_2/model.fp16.safetensors"]
    for rel in unread:
        (repo / rel).parent.mkdir(parents=True, exist_ok=True)
        (repo / rel).write_bytes(b"not read")

    with _serve(repo, monkeypatch), resolve_source(REPO, cache_dir=tmp_path / "cache") as (
            folder, origin):
        fetched = _files(folder)
        family = read_source(folder).family
    assert fetched == _files(source)
    assert origin == {"hub_id": REPO, "revision": COMMIT}
    assert family == ("sdxl" if model == "tiny_sdxl_dir" else "sd1")


def _files(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


@contextlib.contextmanager
def _serve(repo: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """An online hub that holds `repo`: snapshot_download copies the files its allow-patterns
    match (with fnmatch, as huggingface_hub does) into one snapshot folder."""
    import huggingface_hub
    from huggingface_hub import constants

    def download(repo_id, *, revision, cache_dir, local_files_only, allow_patterns):
        snapshot = Path(cache_dir) / "snapshot" / COMMIT
        for path in sorted(p for p in repo.rglob("*") if p.is_file()):
            rel = path.relative_to(repo).as_posix()
            if any(fnmatch.fnmatch(rel, pattern) for pattern in allow_patterns):
                (snapshot / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(path, snapshot / rel)
        return str(snapshot)

    with monkeypatch.context() as patch:
        patch.setattr(constants, "HF_HUB_OFFLINE", False)
        patch.setattr(huggingface_hub, "snapshot_download", download)
        yield


def test_sdxl_hub_snapshot_needs_text_encoder_2_weights(tiny_sdxl_dir, offline_cache,
                                                        tmp_path) -> None:
    src = tmp_path / "no-te2"
    shutil.copytree(tiny_sdxl_dir, src)
    (src / "text_encoder_2" / "model.safetensors").unlink()
    _fake_hub_cache(offline_cache, src, "tiny-org/tiny-sdxl")
    result = run("export", "tiny-org/tiny-sdxl", tmp_path / "out")
    assert_one_line_error(result, f"'tiny-org/tiny-sdxl' at {COMMIT} has no weights for "
                                  "text_encoder_2")


def test_offline_and_not_cached(tmp_path) -> None:
    """HF_HUB_OFFLINE as a user sets it: in the environment of a fresh process."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "empty")}
    code = "from sdrt.cli.main import main; main()"
    done = subprocess.run([sys.executable, "-c", code, "export", "someone/some-model",
                           str(tmp_path / "out")], capture_output=True, text=True, env=env)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert [line for line in done.stderr.splitlines() if line.startswith("error:")] == [
        f"error: 'someone/some-model' is not in the Hugging Face cache ({tmp_path / 'empty'}) "
        "and HF_HUB_OFFLINE is set; download it once online or pass a local folder"]
