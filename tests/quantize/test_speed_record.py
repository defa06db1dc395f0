"""quantize/speed_record.py: a variant that passes its gate has its guided step and fp32's timed
on its backend, filed for this machine (runtime/model/speed.py) and in its manifest entry; a
variant that leaves the denoiser fp32 is not timed."""

import shutil

import pytest

from sdrt.quantize.speed_record import BY, record_speed
from sdrt.quantize.stage import list_variant
from sdrt.runtime.machine import machine_id
from sdrt.runtime.model.manifest import Manifest
from sdrt.runtime.model.speed import recorded_times
from sdrt.runtime.model.variants import VARIANTS_DIR, ComponentVariant, Variant

NATIVE = 64  # the tiny SD's pixels


@pytest.fixture(scope="module")
def quantized(tiny_onnx_dir, tmp_path_factory):
    """A copy of the tiny export listing an "fp16" UNet variant (the fp32 graph copied: the
    gate is not what is tested, and skipping it keeps this fast), then timed; its entry."""
    folder = shutil.copytree(tiny_onnx_dir, tmp_path_factory.mktemp("speed") / "tiny")
    variant = Variant("fp16", "ort", {"unet": ComponentVariant(
        file=f"{VARIANTS_DIR}/fp16-ort/unet/model.onnx")})
    (folder / VARIANTS_DIR / "fp16-ort" / "unet").mkdir(parents=True)
    shutil.copy(folder / "unet" / "model.onnx", folder / variant.components["unet"].file)
    entry = {"precision": "fp16", "backend": "ort",
             "components": {"unet": variant.components["unet"].to_json()}}
    list_variant(folder, Manifest.load(folder), variant, entry)
    return folder, record_speed(folder, entry)


def test_a_listed_variant_and_fp32_are_timed_and_recorded(quantized):
    folder, entry = quantized
    times = recorded_times(folder)
    assert set(times) == {"fp32-ort", "fp16-ort"}
    for found in times.values():
        assert found.shape == (2, NATIVE, NATIVE) and found.by == BY and found.step_s > 0
    speed = entry["speed"]
    assert speed["step_s"] == times["fp16-ort"].step_s
    assert speed["reference_step_s"] == times["fp32-ort"].step_s
    assert speed["ratio"] == pytest.approx(speed["step_s"] / speed["reference_step_s"],
                                           abs=1e-3)  # rounded to 3 places, the times to 4
    assert speed["machine"] == machine_id()
    assert entry in Manifest.load(folder).variants  # the entry returned is the one listed


def test_a_variant_that_leaves_the_denoiser_fp32_is_not_timed(quantized):
    folder, _ = quantized
    entry = {"precision": "fp16", "backend": "openvino",
             "components": {"vae_decoder": {"execution": "f32"}}}
    assert record_speed(folder, entry) is entry
    assert set(recorded_times(folder)) == {"fp32-ort", "fp16-ort"}
