"""The quantize stage on the tiny random SD model: each precision is made, gated, listed and run.

Random weights make the gate's figures meaningless (these tests check the machinery: files,
manifest entries, backends, metadata, refusals); the gates' thresholds are meant for trained
models such as the embedded one (benchmarks/quantize_gates.md).
"""

import shutil
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from PIL import Image

from sdrt.benchmarks.unet_step import measure, table, with_ratios
from sdrt.cli.main import main
from sdrt.quantize import gates
from sdrt.quantize import ort as ort_recipes
from sdrt.quantize.calibration import RecordingSession, record_inputs
from sdrt.quantize.stage import SUPPORTED, QuantizeOptions, quantize_model
from sdrt.runtime import pipeline as pipeline_module
from sdrt.runtime.errors import InputError, ModelError, QuantizeError
from sdrt.runtime.model.auto import choose
from sdrt.runtime.model.manifest import Manifest, sha256_file
from sdrt.runtime.model.variants import Variant, select_variant
from sdrt.runtime.pipeline import Pipeline
from tests.cli.test_cli import assert_one_line_error

STEPS = 2  # enough to exercise the sampler loop; the figures mean nothing on random weights
MADE = [(precision, backend) for precision, backends in SUPPORTED.items()
        for backend in backends]


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def fresh_copy(source, dest):
    """The session-scoped export copied, so quantizing never touches the shared fixture."""
    shutil.copytree(source, dest)
    return dest


def needs(backend: str, precision: str | None = None) -> None:
    if backend == "openvino":
        pytest.importorskip("openvino")
        pytest.importorskip("nncf")
    else:
        pytest.importorskip("onnx")
    if precision == "bf16":  # refused on such CPUs (test_bf16_is_refused_without_native_bf16)
        from sdrt.quantize.openvino import bf16_supported

        if not bf16_supported():
            pytest.skip("this CPU has no native bf16 (AVX-512 BF16 or AMX)")


@pytest.mark.parametrize(("precision", "backend"), MADE)
def test_each_precision_is_made_gated_and_listed(quantized, precision, backend):
    needs(backend, precision)
    folder, entries = quantized
    entry = entries[precision, backend]
    manifest = Manifest.load(folder)
    assert entry in manifest.variants
    figures = entry["gate"]["figures"]
    assert figures["image_psnr_db"] >= gates.MIN_IMAGE_PSNR_DB[precision]
    assert {"latent_psnr_db", "worst_image_psnr_db"} <= set(figures)
    assert entry["command"].startswith(f"sdrt quantize tiny --precision {precision} "
                                       f"--backend {backend}")
    variant = Variant.from_json(entry)
    made = {"int8-hybrid": {"unet"}, "bf16": {"text_encoder", "unet", "vae_decoder"}}
    if precision == "int8-hybrid":  # its float remainder runs bf16 where that is native
        from sdrt.quantize.openvino import bf16_supported

        native = bf16_supported()
        assert variant.execution("unet") == ("bf16" if native else "f32")
        if native:  # and so do the graphs it leaves unquantized (stage.BF16_REMAINDER)
            made["int8-hybrid"] |= {"text_encoder", "vae_decoder"}
            assert variant.execution("vae_decoder") == variant.execution("text_encoder") == "bf16"
            assert variant.components["vae_decoder"].file is None
    assert set(variant.components) == made.get(precision, {"text_encoder", "unet"})
    for rel in variant.files:  # listed with their sha256, so verify_files covers them
        assert rel.startswith(f"variants/{precision}-{backend}/")
        assert manifest.files[rel].sha256 == sha256_file(folder / rel)
    # the folder has fp32 DeepCache graphs: an OpenVINO UNet of the variant's own is cut too
    own_unet = "unet" in variant.components and variant.components["unet"].file is not None
    cut = backend == "openvino" and own_unet
    cut_files = [f for f in manifest.files
                 if f.startswith(f"variants/{variant.key}/unet/deepcache/")]
    assert ("DeepCache graphs cut" in entry["method"]) == cut == bool(cut_files)
    if precision == "bf16":  # an execution precision: no files
        assert variant.files == [] and variant.execution("unet") == "bf16"
    else:
        assert entry["bytes"]["unet"]["variant"] < entry["bytes"]["unet"]["fp32"]
    manifest.verify_files(folder)


@pytest.mark.parametrize("native", [True, False])
def test_int8_hybrid_runs_its_float_graphs_in_bf16_only_where_native(monkeypatch, native):
    """On a CPU with native bf16, int8-hybrid adds the graphs it does not quantize, at bf16
    execution and with no file; a graph it quantizes keeps its own; elsewhere it adds none."""
    from sdrt.quantize import openvino as ov_recipes
    from sdrt.quantize.stage import _bf16_remainder
    from sdrt.runtime.model.variants import ComponentVariant

    monkeypatch.setattr(ov_recipes, "bf16_supported", lambda: native)
    manifest = SimpleNamespace(components=dict.fromkeys(
        ("text_encoder", "unet", "vae_decoder", "vae_encoder")))  # what the remainder reads
    decoder = ComponentVariant("variants/int8-hybrid-openvino/vae_decoder/openvino_model.xml")
    chosen = {"unet": ComponentVariant("variants/x.xml", "bf16"), "vae_decoder": decoder}
    added = _bf16_remainder(ov_recipes, "int8-hybrid", manifest, chosen)
    assert added == ({"text_encoder": ComponentVariant(execution="bf16")} if native else {})
    assert _bf16_remainder(ov_recipes, "int8", manifest, {}) == {}


def test_bf16_is_refused_without_native_bf16(tiny_onnx_dir, tmp_path, monkeypatch):
    """On a CPU without bf16 dot products (no AVX-512 BF16, no AMX) bf16 would run as fp32:
    refused in one line, nothing listed."""
    needs("openvino")
    monkeypatch.setattr("sdrt.quantize.openvino.bf16_supported", lambda: False)
    folder = fresh_copy(tiny_onnx_dir, tmp_path / "tiny")
    with pytest.raises(QuantizeError, match="no native bf16") as info:
        quantize_model(folder, QuantizeOptions("bf16", "openvino", steps=STEPS))
    assert "\n" not in str(info.value)
    assert not any(v["precision"] == "bf16" for v in Manifest.load(folder).variants)


@pytest.mark.parametrize(("precision", "backend"), MADE)
def test_pipeline_loads_the_variant_on_its_backend(quantized, precision, backend, monkeypatch):
    needs(backend, precision)
    folder, entries = quantized
    opened = {}
    real_open = pipeline_module.open_session

    def spy(path, backend_name, **kwargs):
        opened[path.parent.name] = (path.relative_to(folder).as_posix(), backend_name,
                                    kwargs.get("execution", "f32"))
        return real_open(path, backend_name, **kwargs)

    monkeypatch.setattr(pipeline_module, "open_session", spy)
    pipe = Pipeline.load(folder, backend, precision=precision)
    variant = Variant.from_json(entries[precision, backend])
    for component in ("text_encoder", "unet"):
        path, used_backend, execution = opened[component]
        assert used_backend == backend
        assert path == variant.graph_path(folder, component).relative_to(folder).as_posix()
        assert execution == variant.execution(component)
    assert opened["vae_decoder"][0] == "vae_decoder/model.onnx"
    image = pipe.generate("a red circle", steps=STEPS, seed=3)[0]
    assert f"Backend: {backend}, Precision: {precision}" in image.info["parameters"]


def test_cli_quantize_then_generate_names_the_precision(tiny_onnx_dir, tmp_path):
    needs("ort")
    folder = fresh_copy(tiny_onnx_dir, tmp_path / "m")
    result = run("quantize", folder, "--precision", "int8", "--steps", STEPS, "--size", 32)
    assert result.exit_code == 0, result.output
    assert "listed int8 (ort)" in result.output and "PSNR" in result.output
    (entry,) = Manifest.load(folder).variants
    assert entry["gate"]["size"] == 32 and entry["command"].endswith("--steps 2 --size 32")
    out = tmp_path / "x.png"
    result = run("generate", "a cat", "--model", folder, "--precision", "int8", "--steps",
                 STEPS, "--seed", 1, "-o", out)
    assert result.exit_code == 0, result.output
    assert "Precision: int8" in Image.open(out).info["parameters"]
    default = tmp_path / "default.png"  # precision auto: fp32 unless int8 was recorded faster
    assert run("generate", "a cat", "--model", folder, "--steps", STEPS, "--seed", 1,
               "-o", default).exit_code == 0
    assert f"Precision: {choose(folder).precision}" in Image.open(default).info["parameters"]


def test_a_failed_gate_lists_nothing_and_removes_the_files(tiny_onnx_dir, tmp_path,
                                                          monkeypatch):
    needs("ort")
    folder = fresh_copy(tiny_onnx_dir, tmp_path / "m")
    before = (folder / "manifest.json").read_text()
    monkeypatch.setitem(gates.MIN_IMAGE_PSNR_DB, "fp16", 1000.0)  # no variant can pass
    result = run("quantize", folder, "--precision", "fp16", "--steps", STEPS)
    assert_one_line_error(result, "fp16-ort failed its gate", "image PSNR", "not listed")
    assert (folder / "manifest.json").read_text() == before
    assert not (folder / "variants" / "fp16-ort").exists()


def nan_unet(src, dest):
    """A stand-in fp16 conversion whose UNet returns NaN (what an fp16 overflow gives)."""
    model = onnx.load(str(src))
    graph = model.graph
    out = graph.output[0].name
    graph.initializer.append(onnx.numpy_helper.from_array(np.array(np.nan, np.float32), "nan"))
    for node in graph.node:
        node.output[:] = [f"{name}_pre" if name == out else name for name in node.output]
    graph.node.append(onnx.helper.make_node("Mul", [f"{out}_pre", "nan"], [out]))
    onnx.save_model(model, str(dest))


def test_nan_output_fails_the_gate(tiny_onnx_dir, tmp_path, monkeypatch):
    needs("ort")
    folder = fresh_copy(tiny_onnx_dir, tmp_path / "m")
    monkeypatch.setattr(ort_recipes, "to_fp16", nan_unet)
    with pytest.raises(QuantizeError, match="fp16-ort failed its gate .*NaN/Inf"):
        quantize_model(folder, QuantizeOptions("fp16", components=("unet",), steps=STEPS))
    assert Manifest.load(folder).variants == []
    assert not (folder / "variants" / "fp16-ort").exists()


def test_adherence_is_gated_on_scenes_captions(tiny_onnx_dir, tmp_path, monkeypatch):
    needs("ort")
    folder = fresh_copy(tiny_onnx_dir, tmp_path / "m")
    monkeypatch.setattr(gates, "MAX_ADHERENCE_DROP", -1.0)  # any adherence fails
    with pytest.raises(QuantizeError, match="adherence .* below fp32"):
        quantize_model(folder, QuantizeOptions("fp16", prompt_set="scenes", adherence=2,
                                               steps=STEPS))
    assert Manifest.load(folder).variants == []


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["--precision", "int3"], ["unknown precision 'int3'"]),
        (["--precision", "int4", "--backend", "ort"], ["int4 is made for the openvino backend"]),
        (["--precision", "bf16", "--backend", "ort"], ["bf16 is made for the openvino"]),
        (["--precision", "fp16", "--components", "vae_encoder"], ["cannot be quantized"]),
        (["--precision", "fp16", "--prompts", "poems"], ["unknown prompt set 'poems'"]),
    ],
)
def test_quantize_refusals_are_one_line(tiny_onnx_dir, tmp_path, args, fragments):
    folder = fresh_copy(tiny_onnx_dir, tmp_path / "m")
    assert_one_line_error(run("quantize", folder, *args), *fragments)
    assert Manifest.load(folder).variants == []


def test_a_missing_nncf_names_the_extra_that_installs_it(tiny_onnx_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "nncf", None)  # import nncf → ModuleNotFoundError
    folder = fresh_copy(tiny_onnx_dir, tmp_path / "m")
    result = run("quantize", folder, "--precision", "int4", "--steps", STEPS)
    assert_one_line_error(result, "needs the 'nncf' package", "pip install 'sdrt[openvino]'")
    assert Manifest.load(folder).variants == []


def test_generate_refuses_a_precision_the_folder_lacks(quantized, tiny_onnx_dir, tmp_path):
    folder, entries = quantized
    assert_one_line_error(run("generate", "x", "--model", tiny_onnx_dir, "--precision", "int8"),
                          "lists no int8 variant", "sdrt quantize")
    assert_one_line_error(run("generate", "x", "--model", folder, "--precision", "int3"),
                          "unknown precision 'int3'")
    if ("int4", "openvino") in entries:
        assert_one_line_error(run("generate", "x", "--model", folder, "--precision", "int4"),
                              "int4 variant for the openvino backend", "--backend openvino")


def test_a_listed_variant_is_not_replaced_without_force(quantized):
    folder, entries = quantized
    with pytest.raises(QuantizeError, match="already lists fp16-ort; pass --force"):
        quantize_model(folder, QuantizeOptions("fp16", steps=STEPS))


def test_force_replaces_the_variant_and_its_files(tiny_onnx_dir, tmp_path, monkeypatch):
    needs("ort")
    folder = fresh_copy(tiny_onnx_dir, tmp_path / "m")
    quantize_model(folder, QuantizeOptions("fp16", steps=STEPS))
    only_unet = QuantizeOptions("fp16", components=("unet",), steps=STEPS, force=True)
    quantize_model(folder, only_unet)
    manifest = Manifest.load(folder)
    assert len(manifest.variants) == 1
    assert not any(p.startswith("variants/fp16-ort/text_encoder") for p in manifest.files)
    assert not (folder / "variants" / "fp16-ort" / "text_encoder").exists()
    # A replacement that fails its gate leaves neither: never a listed variant without files.
    monkeypatch.setitem(gates.MIN_IMAGE_PSNR_DB, "fp16", 1000.0)
    with pytest.raises(QuantizeError, match="failed its gate"):
        quantize_model(folder, only_unet)
    manifest = Manifest.load(folder)
    assert manifest.variants == [] and not any(p.startswith("variants/") for p in manifest.files)
    assert not (folder / "variants" / "fp16-ort").exists()


def test_a_truncated_variant_file_is_refused_at_load(quantized, tmp_path):
    folder, entries = quantized
    copy = fresh_copy(folder, tmp_path / "copy")
    graph = copy / Variant.from_json(entries["fp16", "ort"]).components["unet"].file
    graph.write_bytes(graph.read_bytes()[:-10])
    with pytest.raises(ModelError, match="truncated or replaced"):
        Pipeline.load(copy, precision="fp16")


def test_calibration_records_every_unet_call(tiny_onnx_dir):
    pipe = Pipeline.load(tiny_onnx_dir)
    recorder = RecordingSession(pipe.unet.session)
    pipe.unet.session = recorder
    pipe.generate("a cat", steps=3, sampler="ddim", seed=0)
    assert len(recorder.feeds) == 3
    feeds = recorder.feeds[0]
    assert feeds["sample"].shape == (2, 4, 32, 32) and feeds["sample"].dtype == np.float32
    assert feeds["timestep"].dtype == pipe.unet.session.inputs["timestep"].dtype


def test_calibration_records_at_the_asked_size(tiny_onnx_dir):
    recorded = record_inputs(tiny_onnx_dir, "ort", ("unet",), ["a cat"], steps=2, size=32)
    shapes = {feeds["sample"].shape for feeds in recorded["unet"]}
    assert shapes == {(2, 4, 16, 16)} and len(recorded["unet"]) >= 2


# --- fast units -----------------------------------------------------------------------------


def test_psnr():
    reference = np.zeros((2, 8, 8, 3), np.uint8)
    assert gates.psnr(reference, reference, 255.0) == gates.IDENTICAL_PSNR_DB
    off_by_one = reference + 1  # MSE 1: 20·log10(255)
    assert gates.psnr(reference, off_by_one, 255.0) == pytest.approx(48.13, abs=0.01)


def test_failures_name_each_reason():
    figures = {"image_psnr_db": 25.0, "adherence": 0.70, "adherence_fp32": 0.80}
    reasons = gates.failures("fp16", figures)
    assert len(reasons) == 2
    assert "image PSNR 25.0 dB < 30 dB" in reasons[0] and "10.0 points below" in reasons[1]
    assert gates.failures("int8", {"image_psnr_db": 25.0}) == []


def test_variant_entries_are_checked(tmp_path):
    with pytest.raises(ModelError, match="under variants/"):
        Variant.from_json({"precision": "int8", "backend": "ort",
                           "components": {"unet": {"file": "../elsewhere/model.onnx"}}})
    with pytest.raises(ModelError, match="needs OpenVINO"):
        Variant.from_json({"precision": "bf16", "backend": "ort",
                           "components": {"unet": {"execution": "bf16"}}})
    with pytest.raises(InputError, match="unknown precision"):
        select_variant(tmp_path, "fp12", "ort")
    assert select_variant(tmp_path, "fp32", "ort").components == {}  # needs no manifest


def test_the_runtime_never_imports_the_quantize_stage():
    probe = ("import sys, sdrt.cli.main, sdrt.runtime.pipeline, sdrt.runtime.model.variants\n"
             "print(' '.join(sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True,
                            text=True).stdout.split()
    assert not [name for name in loaded
                if name.startswith("sdrt.quantize") or name.split(".")[0] in ("nncf", "onnx")]


def test_unet_step_benchmark_compares_each_variant_with_fp32(quantized):
    needs("ort")
    folder, _ = quantized
    rows = with_ratios([measure(folder, key, batch=2, size=32, runs=1, threads=None)
                        for key in ("fp32-ort", "int8-ort")])
    fp32, int8 = rows
    assert fp32["size_vs_fp32"] == fp32["step_vs_fp32"] == 1.0
    assert int8["size_vs_fp32"] < 1.0 and int8["step_median_s"] > 0
    assert "| int8-ort |" in table(rows)
