"""Backend and precision "auto" (runtime/model/auto.py): each decision from its facts (installed
backends, the CPU's bf16, the manifest's gated variants, step times recorded on this machine),
faked where this machine lacks them, and what the CLI, batch and PNG metadata say of it."""

import json
import shutil

import pytest
from click.testing import CliRunner
from PIL import Image

from sdrt.cli.main import main
from sdrt.runtime.batch.runner import read_jobs
from sdrt.runtime.errors import InputError
from sdrt.runtime.metadata import JSON_KEYWORD
from sdrt.runtime.model import auto
from sdrt.runtime.model.auto import AUTO, choose
from sdrt.runtime.model.folder import EMBEDDED_MODEL
from sdrt.runtime.model.opened import OpenedModel
from sdrt.runtime.model.speed import StepTime, record_time
from sdrt.runtime.pipeline import _opened

SHAPE = (2, 64, 64)  # one guided step at the embedded model's native size


def _variant(precision, backend, unet_file=True, execution="f32"):
    """A manifest `variants` entry (the files need not exist: choose reads the listing)."""
    unet = {"execution": execution}
    if unet_file:
        unet["file"] = f"variants/{precision}-{backend}/unet/model.onnx"
    return {"precision": precision, "backend": backend, "components": {"unet": unet}}


@pytest.fixture
def model(tmp_path):
    """What choose reads of the embedded model (manifest, model_index.json, the UNet folder),
    with variants listed as a gate would."""
    folder = tmp_path / "model"
    folder.mkdir()
    for name in ("manifest.json", "model_index.json"):
        shutil.copy(EMBEDDED_MODEL / name, folder / name)
    shutil.copytree(EMBEDDED_MODEL / "unet", folder / "unet")
    manifest = json.loads((folder / "manifest.json").read_text("utf-8"))
    manifest["variants"] = [_variant("bf16", "openvino", unet_file=False, execution="bf16"),
                            _variant("int8-hybrid", "openvino"), _variant("int8", "ort")]
    (folder / "manifest.json").write_text(json.dumps(manifest), "utf-8")
    return folder


@pytest.fixture
def large(monkeypatch):
    """OpenVINO installed and every denoiser counted as large."""
    monkeypatch.setattr(auto, "openvino_installed", lambda: True)
    monkeypatch.setattr(auto, "SMALL_DENOISER_BYTES", 0)


def test_explicit_values_are_kept(model):
    assert choose(model, "openvino", "int8-hybrid") == auto.Choice(
        "openvino", "int8-hybrid", "", ("openvino", "int8-hybrid"))


def test_small_denoiser_runs_on_ort(model, monkeypatch):
    monkeypatch.setattr(auto, "openvino_installed", lambda: True)
    choice = choose(model)
    assert (choice.backend, choice.precision) == ("ort", "fp32")
    assert "7 MB denoiser" in choice.reason


def test_large_denoiser_runs_on_openvino_where_installed(model, large, monkeypatch):
    assert choose(model).backend == "openvino"
    monkeypatch.setattr(auto, "openvino_installed", lambda: False)
    choice = choose(model)
    assert choice.backend == "ort" and "openvino not installed" in choice.reason


def test_ir_denoiser_runs_on_openvino(model, monkeypatch):
    monkeypatch.setattr(auto, "openvino_installed", lambda: True)
    (model / "unet" / "openvino_model.xml").write_text("<net/>", "utf-8")
    assert choose(model).backend == "openvino"


@pytest.mark.parametrize(("native_bf16", "expected"), [(True, "bf16"), (False, "fp32")])
def test_reference_is_bf16_only_where_the_cpu_has_it(model, large, monkeypatch, native_bf16,
                                                     expected):
    monkeypatch.setattr(auto, "has_native_bf16", lambda: native_bf16)
    choice = choose(model)
    assert (choice.backend, choice.precision) == ("openvino", expected)
    assert "no faster gated variant recorded" in choice.reason


def test_a_variant_recorded_faster_here_is_chosen(model, large, monkeypatch):
    monkeypatch.setattr(auto, "has_native_bf16", lambda: False)
    record_time(model, "fp32-openvino", StepTime(1.0, SHAPE, "test"))
    record_time(model, "int8-hybrid-openvino", StepTime(0.5, SHAPE, "test"))
    record_time(model, "int8-ort", StepTime(0.1, SHAPE, "test"))  # another backend's
    choice = choose(model)
    assert (choice.backend, choice.precision) == ("openvino", "int8-hybrid")
    assert "0.50× fp32's step" in choice.reason
    assert choose(model, "ort").precision == "fp32"  # no fp32-ort time to compare with
    # DeepCache and LoRAs need the fp32 UNet graph: no variant with a UNet of its own
    assert choose(model, keeps_unet=True).precision == "fp32"


@pytest.mark.parametrize("recorded", [StepTime(1.5, SHAPE, "test"),  # slower
                                      StepTime(0.5, (2, 32, 32), "test")])  # another shape
def test_a_variant_not_measured_faster_is_not_chosen(model, large, monkeypatch, recorded):
    monkeypatch.setattr(auto, "has_native_bf16", lambda: False)
    record_time(model, "fp32-openvino", StepTime(1.0, SHAPE, "test"))
    record_time(model, "int8-hybrid-openvino", recorded)
    assert choose(model).precision == "fp32"


def test_opened_model_keeps_the_choice():
    model = OpenedModel.open(EMBEDDED_MODEL)
    assert (model.backend, model.precision) == ("ort", "fp32")
    assert model.choice is not None and model.choice.reason.startswith("auto: ")
    assert OpenedModel.open(EMBEDDED_MODEL, "ort", "fp32").choice is None


def test_cli_dry_run_and_metadata_say_what_ran_and_why(tmp_path):
    runner = CliRunner()
    dry = runner.invoke(main, ["generate", "a red circle", "--dry-run"])
    assert dry.exit_code == 0, dry.output
    assert "runs on: ort fp32 (auto: ort (a 7 MB denoiser" in dry.output
    out = tmp_path / "x.png"
    result = runner.invoke(main, ["generate", "a red circle", "--steps", "2", "-o", str(out)])
    assert result.exit_code == 0, result.output
    with Image.open(out) as image:
        info = json.loads(image.info[JSON_KEYWORD])
        parameters = image.info["parameters"]
    assert info["extra"]["Backend"] == "ort" and info["extra"]["Precision"] == "fp32"
    assert info["choice"].startswith("auto: ort")
    assert "Backend: ort, Precision: fp32" in parameters and "auto:" not in parameters


def test_batch_jobs_resolve_auto():
    jobs, bad = read_jobs([{"prompt": "a", "steps": 2},
                           {"prompt": "b", "steps": 2, "backend": "ort", "precision": "fp32"}])
    assert not bad
    assert [(job.backend, job.precision) for job in jobs] == [("ort", "fp32")] * 2
    assert jobs[0].choice.startswith("auto: ") and jobs[1].choice == ""


def test_unknown_backend_names_auto():
    with pytest.raises(InputError, match="choose one of: auto, ort, openvino"):
        OpenedModel.open(EMBEDDED_MODEL, "tpu", AUTO)


def test_api_defaults_to_auto_and_a_named_backend_alone_to_fp32():
    # Pipeline.load's folder argument, opened as its defaults say (no graphs loaded)
    assert _opened(EMBEDDED_MODEL, None, None, keeps_unet=False).choice.asked == (AUTO, AUTO)
    named = _opened(EMBEDDED_MODEL, "ort", None, keeps_unet=False)
    assert named.choice is None and named.precision == "fp32"
