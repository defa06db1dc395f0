"""Quantize tests make many variants of tiny random models, whose gate figures mean nothing
(test_quantize.py's docstring), so they calibrate on fewer prompts and skip the step timing:

- CALIBRATION_PROMPTS_IN_TESTS prompts instead of stage.CALIBRATION_PROMPT_COUNT: the recording
  runs one sampler loop per prompt, and at 16 it made the module fixtures' setup ~1.6x longer
  (137 s at 8 against ~220 s) while testing nothing more than a few prompts do; 4 still cycles
  through every one of stage.CALIBRATION_GUIDANCE's scales.
- No speed record: timing each variant's step against fp32 after its gate
  (quantize/speed_record.py) would add ~10 s a variant; test_speed_record.py tests the timing
  itself, calling record_speed directly.
"""

import pytest

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
