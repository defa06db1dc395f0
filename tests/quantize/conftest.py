"""Quantize tests make many variants of tiny models; timing each one's step against fp32 after
its gate (quantize/speed_record.py) would add ~10 s a variant and test nothing they check.
test_speed_record.py tests the timing itself, calling record_speed directly."""

import pytest

from sdrt.quantize import stage


@pytest.fixture(scope="package", autouse=True)
def untimed_variants():
    """`quantize_model` lists variants without timing them, while tests/quantize runs."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(stage, "record_speed", lambda folder, entry: entry)
        yield
