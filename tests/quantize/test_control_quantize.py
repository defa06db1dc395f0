"""`sdrt quantize CONTROL_DIR --base MODEL_DIR` on the tiny SD model and a tiny ControlNet: fp16 and
int8 (calibrated) on ONNX Runtime are made, gated with the control applied, listed in the control
folder's manifest, and run by a pipeline of the matching precision (else the fp32 graph).

Random weights make the gate's figures meaningless (as in test_quantize.py, these tests check the
machinery: files, entries, which graph each run opened, refusals).
"""

import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from sdrt.cli.main import main
from sdrt.quantize import control as control_stage
from sdrt.quantize import gates, stage
from sdrt.quantize import ort as ort_recipes
from sdrt.quantize.stage import QuantizeOptions, quantize_model
from sdrt.runtime import pipeline as pipeline_module
from sdrt.runtime.control.manifest import CONTROLNET, ControlManifest
from sdrt.runtime.control.unit import ControlUnit
from sdrt.runtime.errors import QuantizeError
from sdrt.runtime.model.manifest import sha256_file
from sdrt.runtime.model.variants import Variant
from sdrt.runtime.pipeline import Pipeline
from tests.cli.test_cli import assert_one_line_error
from tests.quantize.test_quantize import nan_unet, needs

STEPS = 2  # enough to exercise the sampler loop; the figures mean nothing on random weights
SIZE = 32  # pixels: a quarter of the tiny model's native area, to keep the module quick
PIXEL_ATOL = 1e-6  # float32 rounding of k/255 in [0, 1]
MADE = (("fp16", "ort"), ("int8", "ort"))  # one fp16, one int8 (the calibrated recipe)


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def tiny_control(tiny_sd_dir, tmp_path_factory):
    """A tiny ControlNet (tiny_sd's UNet, non-zero zero convolutions) exported once."""
    from sdrt.export.onnx_export import export_pipeline
    from tests.export.controlnet_checkpoint import tiny_controlnet

    root = tmp_path_factory.mktemp("control")
    return export_pipeline(tiny_controlnet(tiny_sd_dir / "unet", root / "cn-src"), root / "cn")


@pytest.fixture(scope="module")
def quantized(tiny_onnx_dir, tiny_control, tmp_path_factory):
    """A copy of the tiny ControlNet with fp16 (made with the CLI) and int8 (the API) listed;
    the graphs each gate opened and the calibration feeds int8 recorded."""
    needs("ort")
    folder = shutil.copytree(tiny_control, tmp_path_factory.mktemp("quantized") / "cn")
    opened, recorded = [], []
    real_open, real_record = pipeline_module.open_session, control_stage.record_inputs

    def spy_open(path, backend, **kwargs):
        if path.is_relative_to(folder):
            opened.append(path.relative_to(folder).as_posix())
        return real_open(path, backend, **kwargs)

    def spy_record(*args):
        recorded.extend(real_record(*args))
        return recorded

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pipeline_module, "open_session", spy_open)
        patch.setattr(control_stage, "record_inputs", spy_record)
        result = run("quantize", folder, "--base", tiny_onnx_dir, "--precision", "fp16",
                     "--backend", "ort", "--steps", STEPS, "--size", SIZE)
        assert result.exit_code == 0, result.output
        assert "listed fp16 (ort)" in result.output and "PSNR" in result.output
        quantize_model(folder, QuantizeOptions("int8", "ort", steps=STEPS, size=SIZE,
                                               base=tiny_onnx_dir))
    return folder, opened, recorded


@pytest.mark.parametrize(("precision", "backend"), MADE)
def test_each_variant_is_made_gated_and_listed(quantized, tiny_onnx_dir, precision, backend):
    folder, _, _ = quantized
    manifest = ControlManifest.load(folder)
    (entry,) = [v for v in manifest.variants if (v["precision"], v["backend"]) ==
                (precision, backend)]
    variant = Variant.from_json(entry)
    assert set(variant.components) == {CONTROLNET}
    (rel,) = variant.files
    assert rel == f"variants/{precision}-{backend}/{CONTROLNET}/model.onnx"
    assert manifest.files[rel].sha256 == sha256_file(folder / rel)
    manifest.verify_files(folder)  # every listed file, with its sha256
    gate = entry["gate"]
    assert gate["figures"]["image_psnr_db"] >= gates.MIN_IMAGE_PSNR_DB[precision]
    # The variant changed the outputs, so the control ran in the candidate: a gate that lost
    # the control would compare two identical uncontrolled runs (IDENTICAL_PSNR_DB).
    assert gate["figures"]["latent_psnr_db"] < gates.IDENTICAL_PSNR_DB
    assert gate["base"] == tiny_onnx_dir.name and (gate["steps"], gate["size"]) == (STEPS, SIZE)
    assert entry["bytes"][CONTROLNET]["variant"] < entry["bytes"][CONTROLNET]["fp32"]
    assert entry["command"].startswith(f"sdrt quantize cn --precision {precision} --backend "
                                       f"{backend} --base {tiny_onnx_dir.name}")
    assert entry["command"].endswith(f"--steps {STEPS} --size {SIZE}")


def test_each_gate_ran_the_fp32_control_then_the_variant(quantized):
    _, opened, _ = quantized
    fp32 = f"{CONTROLNET}/model.onnx"
    assert opened == [fp32, f"variants/fp16-ort/{CONTROLNET}/model.onnx",
                      fp32, f"variants/int8-ort/{CONTROLNET}/model.onnx"]


def test_int8_calibrates_on_the_controlnets_own_inputs(quantized, tiny_onnx_dir):
    """Every ControlNet call of the calibration runs, with the calibration map, not the gate's."""
    folder, _, recorded = quantized
    session = Pipeline.load(tiny_onnx_dir).controlnets.open(folder).net.session
    assert len(recorded) >= stage.CALIBRATION_PROMPT_COUNT * STEPS
    assert all(set(feeds) == set(session.inputs) for feeds in recorded)
    cond = recorded[0]["controlnet_cond"]
    assert cond.shape[-2:] == (SIZE, SIZE)
    calibration = np.asarray(control_stage.control_map(SIZE, control_stage.CALIBRATION_MAP_SEED))
    np.testing.assert_allclose(cond[0], calibration.transpose(2, 0, 1) / 255, atol=PIXEL_ATOL)
    assert not np.array_equal(calibration, np.asarray(control_stage.control_map(SIZE)))


@pytest.mark.parametrize(("precision", "backend", "graph"), [
    ("fp32", "ort", f"{CONTROLNET}/model.onnx"),
    ("fp16", "ort", f"variants/fp16-ort/{CONTROLNET}/model.onnx"),
    ("int8", "ort", f"variants/int8-ort/{CONTROLNET}/model.onnx"),
    ("fp16", "openvino", f"{CONTROLNET}/model.onnx"),  # no fp16-openvino listed: fp32's
])
def test_a_pipeline_runs_the_control_variant_of_its_precision(quantized, tiny_onnx_dir,
                                                               monkeypatch, precision, backend,
                                                               graph):
    needs(backend)
    folder, _, _ = quantized
    opened = []
    real_open = pipeline_module.open_session

    def spy(path, backend_name, **kwargs):
        opened.append((path, backend_name))
        return real_open(path, backend_name, **kwargs)

    monkeypatch.setattr(pipeline_module, "open_session", spy)
    # The base's own graphs stay fp32 (a variant naming no component); only its name counts.
    pipe = Pipeline.load(tiny_onnx_dir, backend,
                         precision=precision if precision == "fp32" else Variant(precision,
                                                                                 backend))
    image = pipe.generate("a red circle", steps=STEPS, seed=3, width=SIZE, height=SIZE,
                          controls=[ControlUnit(folder, control_stage.control_map(SIZE))])[0]
    assert [(p.relative_to(folder).as_posix(), b) for p, b in opened
            if p.is_relative_to(folder)] == [(graph, backend)]
    assert f"Precision: {precision}" in image.info["parameters"]


@pytest.mark.parametrize(("extra", "fragments"), [
    ((), ("is a ControlNet folder", "--base MODEL_DIR")),
    (("--base", "{base}", "--precision", "int4"), ("takes fp16, bf16, int8 variants",)),
    (("--base", "{base}", "--precision", "fp16", "--components", "unet"),
     ("--components and --adherence are for model folders",)),
    (("--base", "{base}", "--precision", "fp16"), ("already lists fp16-ort", "--force")),
])
def test_control_quantize_refusals_are_one_line(quantized, tiny_onnx_dir, extra, fragments):
    folder, _, _ = quantized
    before = (folder / "manifest.json").read_text()
    args = [str(a).format(base=tiny_onnx_dir) for a in extra]
    if "--precision" not in args:
        args += ["--precision", "fp16"]
    assert_one_line_error(run("quantize", folder, *args), *fragments)
    assert (folder / "manifest.json").read_text() == before


def test_base_is_refused_on_a_model_folder(tiny_onnx_dir, tiny_control):
    result = run("quantize", tiny_onnx_dir, "--base", tiny_control, "--precision", "fp16")
    assert_one_line_error(result, "--base is for ControlNet folders")


def test_a_nan_control_variant_fails_its_gate(tiny_control, tiny_onnx_dir, tmp_path,
                                              monkeypatch):
    """A ControlNet variant whose residuals are NaN fails in one line; nothing listed or kept."""
    needs("ort")
    folder = shutil.copytree(tiny_control, tmp_path / "cn")
    before = (folder / "manifest.json").read_text()
    monkeypatch.setattr(ort_recipes, "to_fp16", nan_unet)
    with pytest.raises(QuantizeError, match="fp16-ort failed its gate .*NaN/Inf") as info:
        quantize_model(folder, QuantizeOptions("fp16", "ort", steps=STEPS, size=SIZE,
                                               base=tiny_onnx_dir))
    assert "\n" not in str(info.value)
    assert (folder / "manifest.json").read_text() == before
    assert not (folder / "variants" / "fp16-ort").exists()


def test_bf16_is_refused_without_native_bf16(tiny_control, tiny_onnx_dir, monkeypatch):
    needs("openvino")
    monkeypatch.setattr("sdrt.quantize.openvino.bf16_supported", lambda: False)
    before = (tiny_control / "manifest.json").read_text()
    with pytest.raises(QuantizeError, match="no native bf16"):
        quantize_model(tiny_control, QuantizeOptions("bf16", "openvino", steps=STEPS,
                                                     base=tiny_onnx_dir))
    assert (tiny_control / "manifest.json").read_text() == before


def test_bf16_is_an_execution_precision(tiny_control, tiny_onnx_dir, tmp_path):
    needs("openvino", "bf16")  # skips on CPUs without native bf16
    folder = shutil.copytree(tiny_control, tmp_path / "cn")
    entry = quantize_model(folder, QuantizeOptions("bf16", "openvino", steps=STEPS, size=SIZE,
                                                   base=tiny_onnx_dir))
    variant = Variant.from_json(entry)
    assert variant.files == [] and variant.execution(CONTROLNET) == "bf16"
    assert entry in ControlManifest.load(folder).variants


def test_control_map_is_fixed():
    first, again = control_stage.control_map(64), control_stage.control_map(64)
    assert first.size == (64, 64) and first.mode == "RGB"
    assert np.array_equal(np.asarray(first), np.asarray(again))
    pixels = np.asarray(first)
    assert 0 < (pixels > 0).mean() < 0.5  # white outlines on black, as an edge map
