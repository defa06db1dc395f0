"""Export stage: optimum ONNX layout, manifest, graph fidelity in ORT and OpenVINO, safe writes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from sdrt.runtime.errors import ExportError, ModelError, SdrtError
from sdrt.runtime.model.manifest import MANIFEST_NAME, Manifest, sha256_file

COMPONENTS = ("text_encoder", "unet", "vae_encoder", "vae_decoder")
# Max |graph − torch| measured on the tiny graphs is ≤ 6e-6 in ONNX Runtime and ≤ 4e-6 in
# OpenVINO with the f32 hint (outputs up to ~2); the bounds leave 3–8× for other CPUs' kernels.
ORT_ATOL = 2e-5
OV_ATOL = 5e-5
# (batch, latent h, latent w): the native 64×64 px, and 48×82 px, which is not a multiple of 64
# and has an odd latent side (the UNet's general upsample path).
SIZES = [(2, 32, 32), (1, 24, 41)]
# The tiny UNet's ControlNet residual inputs (2 blocks of 2 layers): name → (channels, level).
RESIDUALS = {**{f"down_block_residual_{i}": (c, k) for i, (c, k) in enumerate(
    [(32, 0), (32, 0), (32, 0), (32, 1), (64, 1), (64, 1)])}, "mid_block_residual": (64, 1)}


# ---------------------------------------------------------------- helpers


def _torch_graphs(src: Path) -> dict:
    from sdrt.export import components as comp

    vae = comp.load_vae(src / "vae")
    return {
        "text_encoder": comp.TextEncoderGraph(comp.load_text_encoder(src / "text_encoder")),
        "unet": comp.UNetGraph(comp.load_unet(src / "unet"), residuals=len(RESIDUALS)),
        "vae_encoder": comp.VaeEncoderGraph(vae),
        "vae_decoder": comp.VaeDecoderGraph(vae),
    }


def _feeds(component: str, batch: int, h: int, w: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(batch * 1000 + h * 10 + w)
    if component == "text_encoder":
        ids = rng.integers(0, 49406, size=(batch, 77))
        ids[:, 0], ids[:, 9:] = 49406, 49407  # bos, prompt, eos + eos padding
        return {"input_ids": ids.astype(np.int64)}
    if component == "unet":
        return {"sample": rng.standard_normal((batch, 4, h, w), dtype=np.float32),
                "timestep": np.array(521.0, dtype=np.float32),
                "encoder_hidden_states": rng.standard_normal((batch, 77, 32), dtype=np.float32),
                **{name: 0.1 * rng.standard_normal((batch, c, -(-h // 2**k), -(-w // 2**k)),
                                                   dtype=np.float32)
                   for name, (c, k) in RESIDUALS.items()}}
    if component == "vae_encoder":
        return {"sample": rng.uniform(-1, 1, (batch, 3, 2 * h, 2 * w)).astype(np.float32)}
    return {"latent_sample": rng.standard_normal((batch, 4, h, w), dtype=np.float32)}


def _torch_outputs(module, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    import torch

    with torch.no_grad():
        out = module(*(torch.from_numpy(v) for v in feeds.values()))
    return [t.numpy() for t in (out if isinstance(out, tuple) else (out,))]


def _ort_outputs(path: Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)


def _assert_one_line(error: BaseException, *fragments: str) -> None:
    message = str(error)
    assert isinstance(error, SdrtError)
    assert "\n" not in message and message, message
    for fragment in fragments:
        assert fragment in message, message


def _leftovers(parent: Path, name: str) -> list[str]:
    return [p.name for p in parent.iterdir() if p.name.startswith(f".{name}.")]


@pytest.fixture(scope="module")
def torch_graphs(tiny_sd_dir: Path) -> dict:
    return _torch_graphs(tiny_sd_dir)


# ---------------------------------------------------------------- layout and manifest


def test_layout_is_optimums(tiny_onnx_dir: Path) -> None:
    for name in COMPONENTS:
        assert (tiny_onnx_dir / name / "model.onnx").is_file()
        assert (tiny_onnx_dir / name / "config.json").is_file()
        assert not (tiny_onnx_dir / name / "model.onnx_data").exists()  # small: weights inline
    assert (tiny_onnx_dir / "tokenizer" / "vocab.json").is_file()
    assert (tiny_onnx_dir / "scheduler" / "scheduler_config.json").is_file()
    index = json.loads((tiny_onnx_dir / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["safety_checker"] == [None, None]
    decoder = json.loads((tiny_onnx_dir / "vae_decoder" / "config.json").read_text())
    assert decoder["scaling_factor"] == 0.18215
    assert "_name_or_path" not in decoder  # no build-machine paths in the output
    assert _leftovers(tiny_onnx_dir.parent, tiny_onnx_dir.name) == []


def test_manifest_contents(tiny_onnx_dir: Path) -> None:
    m = Manifest.load(tiny_onnx_dir)
    assert (m.family, m.prediction_type, m.opset) == ("sd1", "epsilon", 18)
    assert (m.scaling_factor, m.latent_channels, m.vae_scale_factor, m.sample_size) == (
        0.18215, 4, 2, 32)
    assert m.default_size == 64
    assert m.variants == []
    assert {"sdrt", "torch", "diffusers", "transformers", "onnx"} <= m.versions.keys()
    assert len(m.source["config_sha256"]) == 64
    io = {name: ({k: (v.shape, v.dtype) for k, v in spec.inputs.items()},
                 {k: (v.shape, v.dtype) for k, v in spec.outputs.items()})
          for name, spec in m.components.items()}
    assert io["text_encoder"] == ({"input_ids": ((None, None), "int64")},
                                  {"last_hidden_state": ((None, None, 32), "float32"),
                                   "pooler_output": ((None, 32), "float32")})
    assert io["unet"] == ({"sample": ((None, 4, None, None), "float32"),
                           "timestep": ((), "float32"),
                           "encoder_hidden_states": ((None, None, 32), "float32"),
                           **{name: ((None, c, None, None), "float32")
                              for name, (c, _) in RESIDUALS.items()}},
                          {"out_sample": ((None, 4, None, None), "float32")})
    assert io["vae_encoder"] == ({"sample": ((None, 3, None, None), "float32")},
                                 {"latent_parameters": ((None, 8, None, None), "float32")})
    assert io["vae_decoder"] == ({"latent_sample": ((None, 4, None, None), "float32")},
                                 {"sample": ((None, 3, None, None), "float32")})
    for name in COMPONENTS:
        report = m.components[name].extra["validation"]
        assert report["max_abs_diff"] <= ORT_ATOL


def test_manifest_hashes_every_file(tiny_onnx_dir: Path) -> None:
    m = Manifest.load(tiny_onnx_dir)
    on_disk = {p.relative_to(tiny_onnx_dir).as_posix() for p in tiny_onnx_dir.rglob("*")
               if p.is_file()} - {MANIFEST_NAME}
    assert set(m.files) == on_disk
    for rel, entry in m.files.items():
        path = tiny_onnx_dir / rel
        assert (sha256_file(path), path.stat().st_size) == (entry.sha256, entry.bytes)
    m.verify_files(tiny_onnx_dir)


def test_verify_files_catches_a_changed_file(tiny_onnx_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(tiny_onnx_dir, copy)
    vocab = copy / "tokenizer" / "vocab.json"
    vocab.write_bytes(vocab.read_bytes().replace(b"a", b"b", 1))
    m = Manifest.load(copy)
    m.verify_files(copy, hashes=False)  # same size: only the hash tells
    with pytest.raises(ModelError) as info:
        m.verify_files(copy)
    _assert_one_line(info.value, "tokenizer/vocab.json", "sha256")
    (copy / "unet" / "model.onnx").write_bytes(b"truncated")
    with pytest.raises(ModelError, match="bytes"):
        m.verify_files(copy, hashes=False)


def test_v_prediction_variant(tiny_onnx_dir: Path, tiny_onnx_v_dir: Path) -> None:
    m, v = Manifest.load(tiny_onnx_dir), Manifest.load(tiny_onnx_v_dir)
    assert v.prediction_type == "v_prediction"
    scheduler = json.loads((tiny_onnx_v_dir / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["prediction_type"] == "v_prediction"
    assert v.files["unet/model.onnx"] == m.files["unet/model.onnx"]  # same weights, same graph


# ---------------------------------------------------------------- graph fidelity


@pytest.mark.parity
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"b{s[0]}-{s[1]}x{s[2]}")
@pytest.mark.parametrize("component", COMPONENTS)
def test_ort_matches_torch(tiny_onnx_dir, torch_graphs, component, size) -> None:
    feeds = _feeds(component, *size)
    got = _ort_outputs(tiny_onnx_dir / component / "model.onnx", feeds)
    for ref, out in zip(_torch_outputs(torch_graphs[component], feeds), got, strict=True):
        assert out.shape == ref.shape
        np.testing.assert_allclose(out, ref, rtol=0, atol=ORT_ATOL)


@pytest.mark.parity
@pytest.mark.openvino
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"b{s[0]}-{s[1]}x{s[2]}")
@pytest.mark.parametrize("component", COMPONENTS)
def test_openvino_matches_torch(tiny_onnx_dir, torch_graphs, component, size) -> None:
    ov = pytest.importorskip("openvino")
    core = ov.Core()
    # OpenVINO picks bf16 by itself on AMX CPUs; f32 must be asked for (INFERENCE_PRECISION_HINT).
    compiled = core.compile_model(core.read_model(tiny_onnx_dir / component / "model.onnx"),
                                  "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    feeds = _feeds(component, *size)
    result = compiled(feeds)
    got = [result[compiled.output(i)] for i in range(len(compiled.outputs))]
    for ref, out in zip(_torch_outputs(torch_graphs[component], feeds), got, strict=True):
        assert out.shape == ref.shape
        np.testing.assert_allclose(out, ref, rtol=0, atol=OV_ATOL)


def test_external_data_and_force(tiny_sd_dir, tiny_onnx_dir, tmp_path) -> None:
    from sdrt.export.onnx_export import export_pipeline

    out = tmp_path / "external"
    out.mkdir()
    (out / "stale.txt").write_text("from an earlier export")
    export_pipeline(tiny_sd_dir, out, force=True, external_data_threshold=0)
    assert not (out / "stale.txt").exists()
    m = Manifest.load(out)
    m.verify_files(out)
    for name in COMPONENTS:
        data = out / name / "model.onnx_data"
        assert data.is_file() and m.components[name].extra["external_data"] == data.name
        assert f"{name}/model.onnx_data" in m.files
        inline_size = (tiny_onnx_dir / name / "model.onnx").stat().st_size
        assert (out / name / "model.onnx").stat().st_size < inline_size / 5  # graph, no weights
        feeds = _feeds(name, *SIZES[1])
        inline = _ort_outputs(tiny_onnx_dir / name / "model.onnx", feeds)
        for a, b in zip(inline, _ort_outputs(out / name / "model.onnx", feeds), strict=True):
            np.testing.assert_array_equal(a, b)
    assert _leftovers(tmp_path, "external") == []


@pytest.mark.openvino
def test_scattered_weights_are_gathered_and_openvino_reads_them(tiny_onnx_dir, tmp_path) -> None:
    ov = pytest.importorskip("openvino")
    import onnx

    from sdrt.export.onnx_files import write_onnx

    scratch = tmp_path / "scattered"
    scratch.mkdir()
    model = onnx.load(str(tiny_onnx_dir / "unet" / "model.onnx"))
    # One file per tensor, as torch's TorchScript exporter writes graphs over 2 GiB.
    onnx.save_model(model, str(scratch / "model.onnx"), save_as_external_data=True,
                    all_tensors_to_one_file=False, size_threshold=0)
    assert len(list(scratch.iterdir())) > 50
    dest = tmp_path / "unet" / "model.onnx"
    dest.parent.mkdir()
    write_onnx(scratch / "model.onnx", dest)
    assert sorted(p.name for p in dest.parent.iterdir()) == ["model.onnx", "model.onnx_data"]
    feeds = _feeds("unet", *SIZES[1])
    expected = _ort_outputs(tiny_onnx_dir / "unet" / "model.onnx", feeds)[0]
    np.testing.assert_array_equal(_ort_outputs(dest, feeds)[0], expected)
    core = ov.Core()
    compiled = core.compile_model(core.read_model(dest), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    np.testing.assert_allclose(compiled(feeds)[compiled.output(0)], expected, atol=OV_ATOL)


# ---------------------------------------------------------------- safe writes and bad input


def test_refuses_to_overwrite_without_force(tiny_sd_dir, tmp_path) -> None:
    from sdrt.export.onnx_export import export_pipeline

    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ExportError) as info:
        export_pipeline(tiny_sd_dir, out)
    _assert_one_line(info.value, "already exists", "force")
    assert (out / "keep.txt").read_text() == "mine"
    with pytest.raises(ExportError):
        export_pipeline(tiny_sd_dir, tiny_sd_dir, force=True)  # would delete its own source
    with pytest.raises(ExportError, match="opset"):
        export_pipeline(tiny_sd_dir, tmp_path / "new", opset=25)


@pytest.mark.parametrize("existing", [False, True], ids=["fresh", "force-over-existing"])
def test_interrupted_export_leaves_no_folder(tiny_sd_dir, tmp_path, monkeypatch, existing):
    from sdrt.export import onnx_export

    real = onnx_export._export_component

    def interrupted(model, name, *args, **kwargs):
        if name == "unet":  # after text_encoder/ is written: the folder is half done
            raise KeyboardInterrupt
        return real(model, name, *args, **kwargs)

    monkeypatch.setattr(onnx_export, "_export_component", interrupted)
    out = tmp_path / "out"
    if existing:
        out.mkdir()
        (out / "keep.txt").write_text("previous export")
    with pytest.raises(KeyboardInterrupt):
        onnx_export.export_pipeline(tiny_sd_dir, out, force=existing)
    assert _leftovers(tmp_path, "out") == []
    if existing:
        assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    else:
        assert not out.exists()


def _break_index(root: Path, **changes) -> None:
    index = json.loads((root / "model_index.json").read_text())
    index.update(changes)
    (root / "model_index.json").write_text(json.dumps(index))


def _edit_config(rel: str, **changes):
    def edit(root: Path) -> None:
        config = json.loads((root / rel).read_text())
        config.update(changes)
        (root / rel).write_text(json.dumps(config))
    return edit


def _drop_text_encoder_layer(root: Path) -> None:
    from safetensors.torch import load_file, save_file

    path = root / "text_encoder" / "model.safetensors"
    state = {k: v for k, v in load_file(str(path)).items() if ".layers.4." not in k}
    save_file(state, str(path))


BAD_SOURCES = {
    "no-model-index": (lambda r: (r / "model_index.json").unlink(), "model_index.json"),
    "not-json": (lambda r: (r / "model_index.json").write_text("{oops"), "not valid JSON"),
    "unknown-pipeline": (lambda r: _break_index(r, _class_name="os.system"),
                         "not a supported pipeline"),
    "sdxl-pipeline": (lambda r: _break_index(r, _class_name="StableDiffusionXLPipeline"),
                      "does not fit its components: text_encoder_2 is missing"),
    "foreign-class": (lambda r: _break_index(r, unet=["os", "system"]), "unet"),
    "missing-unet": (lambda r: shutil.rmtree(r / "unet"), "'unet/' is missing"),
    "missing-vae-config": (lambda r: (r / "vae" / "config.json").unlink(), "vae/config.json"),
    "no-tokenizer-vocab": (lambda r: (r / "tokenizer" / "vocab.json").unlink(), "tokenizer/"),
    "depth-unet": (_edit_config("unet/config.json", in_channels=5), "in/out channels"),
    "bad-prediction": (_edit_config("scheduler/scheduler_config.json", prediction_type="x"),
                       "prediction_type"),
    "missing-weights": (_drop_text_encoder_layer, "missing"),
    "config-weights-mismatch": (_edit_config("unet/config.json", layers_per_block=1),
                                "unet/"),
}


@pytest.mark.parametrize("case", sorted(BAD_SOURCES))
def test_bad_source_folder(tiny_sd_dir, tmp_path, case) -> None:
    from sdrt.export.onnx_export import export_pipeline

    src = tmp_path / "src"
    shutil.copytree(tiny_sd_dir, src)
    breaker, fragment = BAD_SOURCES[case]
    breaker(src)
    with pytest.raises((ModelError, ExportError)) as info:
        export_pipeline(src, tmp_path / "out")
    _assert_one_line(info.value, fragment)
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path, "out") == []


def test_missing_source_folder(tmp_path) -> None:
    pytest.importorskip("torch")
    from sdrt.export.onnx_export import export_pipeline

    with pytest.raises(ModelError) as info:
        export_pipeline(tmp_path / "nowhere", tmp_path / "out")
    _assert_one_line(info.value, "does not exist")


# ---------------------------------------------------------------- manifest (no torch needed)


def _manifest_json() -> dict:
    tensor = {"shape": [None, 4, None, None], "dtype": "float32"}
    entry = {"sha256": "0" * 64, "bytes": 1}
    return {
        "format": "sdrt-manifest", "format_version": 1, "family": "sd1",
        "source": {"path": "x"}, "prediction_type": "epsilon", "sample_size": 64,
        "latent_channels": 4, "vae_scale_factor": 8, "scaling_factor": 0.18215, "opset": 18,
        "versions": {}, "variants": [],
        "components": {name: {"file": "model.onnx", "inputs": {"x": tensor},
                              "outputs": {"y": tensor}}
                       for name in ("text_encoder", "unet", "vae_decoder")},
        "files": {f"{name}/model.onnx": entry for name in ("text_encoder", "unet", "vae_decoder")},
    }


def test_manifest_round_trip_keeps_unknown_keys(tmp_path) -> None:
    data = _manifest_json()
    data["future_key"] = {"a": 1}
    data["components"]["unet"]["future_field"] = [1, 2]
    m = Manifest.from_json(data)
    m.save(tmp_path)
    again = json.loads((tmp_path / MANIFEST_NAME).read_text())
    assert again["future_key"] == {"a": 1}
    assert again["components"]["unet"]["future_field"] == [1, 2]
    assert Manifest.load(tmp_path) == m
    assert m.default_size == 512


@pytest.mark.parametrize(("change", "fragment"), [
    (lambda d: d.update(prediction_type="eps"), "prediction_type"),
    (lambda d: d.update(format_version=99), "newer"),
    (lambda d: d.pop("scaling_factor"), "scaling_factor"),
    (lambda d: d.update(scaling_factor=float("nan")), "scaling_factor"),
    (lambda d: d.update(vae_scale_factor=6), "power of two"),
    (lambda d: d.update(latent_channels=True), "latent_channels"),
    (lambda d: d["components"].pop("unet"), "unet"),
    (lambda d: d["components"]["unet"].update(file="../../etc/passwd"), "relative path"),
    (lambda d: d["files"].update({"/abs/x": {"sha256": "0" * 64, "bytes": 1}}), "relative"),
    (lambda d: d["files"]["unet/model.onnx"].update(sha256="zz"), "sha256"),
    (lambda d: d["components"]["unet"]["inputs"]["x"].update(dtype="float128"), "dtype"),
    (lambda d: d["components"]["unet"]["inputs"]["x"].update(shape=[-1]), "shape"),
    (lambda d: d.update(defaults={"width": 64}), "defaults"),
    (lambda d: d.update(defaults={"steps": 0}), "defaults.steps"),
    (lambda d: d.update(defaults={"guidance_scale": "high"}), "defaults.guidance_scale"),
])
def test_manifest_rejects_bad_values(change, fragment) -> None:
    data = _manifest_json()
    change(data)
    with pytest.raises(ModelError) as info:
        Manifest.from_json(data)
    _assert_one_line(info.value, fragment)


def test_manifest_load_errors(tmp_path) -> None:
    with pytest.raises(ModelError, match="no manifest.json"):
        Manifest.load(tmp_path)
    (tmp_path / MANIFEST_NAME).write_text("[1, 2")
    with pytest.raises(ModelError, match="not valid JSON"):
        Manifest.load(tmp_path)


def test_model_defaults_are_recorded_and_used(tiny_sd_dir, tmp_path) -> None:
    from click.testing import CliRunner

    from sdrt.cli.main import main
    from sdrt.runtime.pipeline import GenerationRequest, Pipeline

    out = tmp_path / "onnx"
    result = CliRunner().invoke(main, ["export", str(tiny_sd_dir), str(out), "--default-steps",
                                       "3", "--default-guidance", "2.5", "--default-sampler",
                                       "Euler a"])
    assert result.exit_code == 0, result.output
    assert Manifest.load(out).defaults == {"steps": 3, "guidance_scale": 2.5,
                                           "sampler": "euler_a"}
    pipe = Pipeline.load(out)
    request = GenerationRequest(prompt="x").resolve(pipe.facts, pipe.scheduler)
    assert (request.steps, request.guidance_scale, request.sampler) == (3, 2.5, "euler_a")
    bad = CliRunner().invoke(main, ["export", str(tiny_sd_dir), str(tmp_path / "bad"),
                                    "--default-sampler", "warp"])
    assert bad.exit_code == 1 and "unknown sampler" in bad.output
    assert not (tmp_path / "bad").exists()
