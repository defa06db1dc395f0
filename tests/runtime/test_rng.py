"""Noise generators: TorchGenerator equals torch's CPU randn stream; NumpyGenerator is seeded."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from sdrt.runtime import rng
from sdrt.runtime.errors import InputError
from sdrt.runtime.rng import (
    GENERATORS,
    TORCH_SCALAR_KERNEL_TOLERANCE,
    NumpyGenerator,
    TorchGenerator,
    make_generator,
)

SEEDS = [0, 1, 42, 2**31 - 1, 2**32 - 1, 2**32 + 5, 2**63 + 11, 2**64 - 1, -1, -(2**63)]
SHAPES = [
    1, (3,), (15,), (16,), (17,), (31,), (100,), (1, 4, 9, 7), (1, 4, 8, 8), (1, 4, 64, 64),
    (2, 4, 96, 96), (0,), (2, 0, 3),
]
# Mixed sizes on one generator: small (cached float64 path) between large (block path) draws,
# odd small sizes so a cached value is carried across a large call, and an empty draw.
SEQUENCE = [(1, 4, 64, 64), (3,), (1, 4, 9, 7), 1, (0,), (5,), (16,), (2, 4, 8, 8), (1,), (17,)]


# --- without torch --------------------------------------------------------------------------------

# torch 2.13 on x86-64, float32 bit patterns: randn((1,4,8,8)), randn(3), randn(17), randn(1) from
# one Generator().manual_seed(0); they pin the stream on machines without torch too.
GOLDEN_SEED0 = [
    ((1, 4, 8, 8), [0, 1, 8, 255], [0xBF901B85, 0xBF93808A, 0x3EA50138, 0x3EC7E1F5]),
    ((3,), [0, 1, 2], [0x3ECA866E, 0x3DB740FB, 0xBE2C3F7D]),
    ((17,), [0, 16], [0x3FBEC153, 0xBF5050B1]),
    ((1,), [0], [0xBEF20D71]),  # the value cached by the randn(3) above, after randn(17)
]


def test_torch_generator_golden_values():
    g = TorchGenerator(0)
    for shape, where, bits in GOLDEN_SEED0:
        out = g.randn(shape)
        assert out.dtype == np.float32 and out.shape == shape
        assert out.ravel()[where].view(np.uint32).tolist() == bits


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_shapes_and_dtype(shape):
    for g in (TorchGenerator(7), NumpyGenerator(7)):
        out = g.randn(shape)
        expected = (shape,) if isinstance(shape, int) else shape
        assert out.shape == expected and out.dtype == np.float32
        assert np.isfinite(out).all()


def test_torch_generator_is_deterministic_and_continues():
    a, b = TorchGenerator(5), TorchGenerator(5)
    first = a.randn((1, 4, 8, 8))
    np.testing.assert_array_equal(first, b.randn((1, 4, 8, 8)))
    assert not np.array_equal(first, a.randn((1, 4, 8, 8)))
    assert not np.array_equal(first, TorchGenerator(6).randn((1, 4, 8, 8)))


def test_torch_generator_seeds_use_low_32_bits_like_torch():
    # torch reduces the seed modulo 2**64 and seeds MT19937 with its low 32 bits.
    ref = TorchGenerator(5).randn(40)
    for seed in (5 + 2**32, 5 + 2**63, 5 - 2**32, 5 - 2**63):
        np.testing.assert_array_equal(TorchGenerator(seed).randn(40), ref)


def test_numpy_generator_is_deterministic_per_seed():
    a, b = NumpyGenerator(123), NumpyGenerator(123)
    first = a.randn((1, 4, 8, 8))
    np.testing.assert_array_equal(first, b.randn((1, 4, 8, 8)))
    np.testing.assert_array_equal(
        first, np.random.default_rng(123).standard_normal((1, 4, 8, 8), dtype=np.float32)
    )
    assert not np.array_equal(first, a.randn((1, 4, 8, 8)))  # the stream continues
    assert not np.array_equal(first, NumpyGenerator(124).randn((1, 4, 8, 8)))


def test_make_generator():
    assert GENERATORS == ("torch", "numpy")
    assert isinstance(make_generator("torch", 1), TorchGenerator)
    assert isinstance(make_generator("numpy", 1), NumpyGenerator)
    np.testing.assert_array_equal(make_generator("torch", 3).randn(20), TorchGenerator(3).randn(20))


@pytest.mark.parametrize("kind", ["Torch", "cuda", "", "philox"])
def test_make_generator_rejects_unknown_kinds(kind):
    with pytest.raises(InputError) as info:
        make_generator(kind, 0)
    message = str(info.value)
    assert "\n" not in message and repr(kind) in message and "torch, numpy" in message


@pytest.mark.parametrize("seed", [2**64, -(2**63) - 1, 1.5, "1", None, True])
@pytest.mark.parametrize("cls", [TorchGenerator, NumpyGenerator])
def test_bad_seeds_raise_input_error(cls, seed):
    with pytest.raises(InputError) as info:
        cls(seed)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("shape", [-1, (2, -3), (1.5,), "abc", None])
def test_bad_shapes_raise_input_error(shape):
    for g in (TorchGenerator(0), NumpyGenerator(0)):
        with pytest.raises(InputError):
            g.randn(shape)


def test_numpy_integer_seed_and_shape_are_accepted():
    a = TorchGenerator(np.uint32(9)).randn((np.int64(2), np.int64(16)))
    np.testing.assert_array_equal(a, TorchGenerator(9).randn((2, 16)))
    assert TorchGenerator(np.int64(9)).randn((np.int64(17),)).shape == (17,)


def _exact_fma32(a, b, c):
    """Correctly rounded float32 a*b + c: float64 sum, nudged off float32 midpoints via TwoSum."""
    p = a * b  # exact: a and b are float32 values
    c = np.broadcast_to(np.asarray(c, np.float64), p.shape)
    s = p + c
    back = s - p
    err = (p - (s - back)) + (c - back)  # Knuth's TwoSum: p + c == s + err exactly
    midpoint = (s.view(np.uint64) & np.uint64((1 << 29) - 1)) == np.uint64(1 << 28)
    s = np.where(midpoint & (err != 0), np.nextafter(s, np.copysign(np.inf, err)), s)
    return s.astype(np.float32).astype(np.float64)


@pytest.mark.slow
def test_double_rounding_never_changes_a_fused_result(monkeypatch):
    # rng._fma32 rounds a float64 sum to float32 (two roundings); over every input the block
    # kernel can see (all 2**24 uniforms for the log and for the angle) it must equal one rounding.
    def checked(a, b, c):
        fast = fast_fma(a, b, c)
        np.testing.assert_array_equal(fast, _exact_fma32(a, b, c))
        return fast

    fast_fma = rng._fma32
    monkeypatch.setattr(rng, "_fma32", checked)
    u = np.arange(2**24, dtype=np.uint32).astype(np.float32) * np.float32(2.0**-24)
    for part in np.split(u, 16):
        rng._log_avx2(np.float32(1) - part)
        rng._sincos_avx2(rng._TWO_PI_F32 * part)


# --- against torch --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def torch():
    return pytest.importorskip("torch")


@pytest.fixture(scope="module")
def assert_matches_torch(torch):
    # x86-64 torch runs the AVX2 kernel that rng reproduces bit for bit (also on AVX-512 CPUs);
    # elsewhere torch uses libm's logf/cosf/sinf and only the documented tolerance holds.
    exact = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")

    def check(ours: np.ndarray, theirs) -> None:
        theirs = theirs.numpy()
        assert ours.dtype == theirs.dtype == np.float32 and ours.shape == theirs.shape
        if exact:
            np.testing.assert_array_equal(ours.view(np.uint32), theirs.view(np.uint32))
        else:
            np.testing.assert_allclose(ours, theirs, rtol=0, atol=TORCH_SCALAR_KERNEL_TOLERANCE)

    return check


@pytest.mark.parity
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_randn_matches_torch(torch, assert_matches_torch, seed, shape):
    tg = torch.Generator().manual_seed(seed)
    assert_matches_torch(TorchGenerator(seed).randn(shape), torch.randn(shape, generator=tg))


@pytest.mark.parity
@pytest.mark.parametrize("seed", SEEDS)
def test_successive_calls_match_torch(torch, assert_matches_torch, seed):
    g, tg = TorchGenerator(seed), torch.Generator().manual_seed(seed)
    for shape in SEQUENCE:
        assert_matches_torch(g.randn(shape), torch.randn(shape, generator=tg))


@pytest.mark.parity
@pytest.mark.parametrize("seed", [0, 2024])
def test_large_draws_match_torch(torch, assert_matches_torch, seed):
    # 2**20 + 5 values: every block of the kernel's tail handling, and ~1M log/sincos inputs.
    g, tg = TorchGenerator(seed), torch.Generator().manual_seed(seed)
    for shape in [(2**20 + 5,), (1, 4, 128, 128)]:
        assert_matches_torch(g.randn(shape), torch.randn(shape, generator=tg))


@pytest.mark.parity
@pytest.mark.parametrize("seed", [2**64, -(2**63) - 1])
def test_torch_rejects_the_seeds_we_reject(torch, seed):
    with pytest.raises((RuntimeError, ValueError, OverflowError)):
        torch.Generator().manual_seed(seed)
    with pytest.raises(InputError):
        TorchGenerator(seed)


@pytest.mark.parity
def test_portable_torch_kernel_within_tolerance(torch, tmp_path):
    # What torch gives on CPUs without AVX2 (e.g. ARM), forced here with ATEN_CPU_CAPABILITY.
    out = tmp_path / "ref.npy"
    code = (
        "import sys, numpy as np, torch\n"
        "assert torch.backends.cpu.get_cpu_capability() == 'DEFAULT'\n"
        "g = torch.Generator().manual_seed(3)\n"
        "np.save(sys.argv[1], np.concatenate([torch.randn(s, generator=g).numpy().ravel()"
        " for s in [(1, 4, 64, 64), (3,), (1, 4, 9, 7)]]))\n"
    )
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "default"}
    subprocess.run([sys.executable, "-c", code, str(out)], check=True, env=env)
    g = TorchGenerator(3)
    ours = np.concatenate([g.randn(s).ravel() for s in [(1, 4, 64, 64), (3,), (1, 4, 9, 7)]])
    np.testing.assert_allclose(ours, np.load(out), rtol=0, atol=TORCH_SCALAR_KERNEL_TOLERANCE)
