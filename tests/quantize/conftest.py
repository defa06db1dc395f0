"""Quantize tests make many variants of tiny random models, whose gate figures mean nothing
(test_quantize.py's docstring), so they calibrate on fewer prompts and skip the step timing:

- CALIBRATION_PROMPTS_IN_TESTS prompts instead of stage.CALIBRATION_PROMPT_COUNT: the recording
  runs one sampler loop per prompt, and at 16 it made the module fixtures' setup ~1.6x longer
  (137 s at 8 against ~220 s) while testing nothing more than a few prompts do; 4 still cycles
  through every one of stage.CALIBRATION_GUIDANCE's scales.
- No speed record: timing each variant's step against fp32 after its gate
  (quantize/speed_record.py) would add ~10 s a variant; test_speed_record.py tests the timing
  itself, calling record_speed directly.

`quantized`, the folder holding every variant this machine makes, is made once for the package:
test_quantize.py and test_deepcache_ir.py read it (about a minute and a half to make).
"""

import pytest

from sdrt.export.deepcache import make_deepcache
from sdrt.quantize import stage

CALIBRATION_PROMPTS_IN_TESTS = len(stage.CALIBRATION_GUIDANCE)


@pytest.fixture(scope="package", autouse=True)
def quick_variants():
    """`quantize_model` calibrates on fewer prompts and lists variants untimed (module
    docstring), while tests/quantize runs."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(stage, "CALIBRATION_PROMPT_COUNT", CALIBRATION_PROMPTS_IN_TESTS)
        patch.setattr(stage, "record_speed", lambda folder, entry: entry)
        yield


@pytest.fixture(scope="package")
def quantized(tiny_onnx_dir, tmp_path_factory, quick_variants):
    """One folder holding every variant this machine can make, and each one's manifest entry;
    it has fp32 DeepCache graphs, so each OpenVINO variant's UNet is cut too (deepcache_ir.py)."""
    from tests.quantize.test_quantize import MADE, STEPS, fresh_copy, needs

    folder = fresh_copy(tiny_onnx_dir, tmp_path_factory.mktemp("quantized") / "tiny")
    make_deepcache(folder)
    entries = {}
    for precision, backend in MADE:
        try:
            needs(backend, precision)
        except pytest.skip.Exception:
            continue
        options = stage.QuantizeOptions(precision, backend, steps=STEPS)
        entries[precision, backend] = stage.quantize_model(folder, options)
    return folder, entries
