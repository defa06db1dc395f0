"""Seeded normal-noise generators for starting latents and ancestral-sampler noise.

`TorchGenerator` reproduces, in NumPy alone, the stream of `torch.randn(shape, generator=g)` for
`g = torch.Generator().manual_seed(seed)` on an x86-64 CPU (float32), call after call, so a seed
gives the same image as diffusers on CPU. `NumpyGenerator` is the fast default when that parity is
not wanted. Both return float32 arrays.

How torch draws, as established against torch 2.13 (tests/runtime/test_rng.py pins every point):

* Engine: MT19937 (Matsumoto & Nishimura 1998) seeded with the reference `init_genrand` from the
  low 32 bits of the seed (torch takes any int in [-2**63, 2**64) and reduces it modulo 2**64
  first). NumPy's legacy `RandomState(seed32)` seeding is that same routine, so NumPy's `MT19937`
  bit generator yields torch's raw 32-bit stream.
* numel >= 16 (torch's `normal_fill`): one float32 uniform per raw word, `(w & 0xFFFFFF) * 2**-24`,
  for the whole tensor first; then Box–Muller over each block of 16 (u[0:8] and u[8:16] of the
  block give radius*cos to the first 8 places and radius*sin to the last 8). If numel is not a
  multiple of 16, 16 fresh uniforms are drawn and the last 16 outputs are recomputed from them.
  On x86-64, torch runs this block kernel in AVX2 (even on AVX-512 machines, where the normal
  kernel is deliberately not dispatched to AVX-512), with the Cephes-derived float32 `log` and
  `sincos` polynomials of Pommier's "avx_mathfun", and GCC contracts some of their multiply-adds
  into fused multiply-adds. This module evaluates the same polynomials in the same order with
  the same contractions, emulating each float32 FMA in float64 (exact for every input the kernel
  can get; see `_fma32`), so results match bit for bit rather than to a tolerance.
* numel < 16: a scalar Box–Muller in float64 (`at::normal_distribution<double>`): uniforms with
  53 bits from two raw words (first word high), u1 -> angle, u2 -> radius via log1p(-u2); the
  radius*cos value is returned and radius*sin is cached in the generator and returned by the next
  scalar draw, even one made after intervening large calls (which neither use nor clear it).

torch on CPUs without AVX2 (e.g. ARM) runs the block kernel with the C library's logf/cosf/sinf
instead; there equality holds only to `TORCH_SCALAR_KERNEL_TOLERANCE`.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from typing import Protocol

import numpy as np

from sdrt.runtime.errors import InputError

GENERATORS = ("torch", "numpy")

# Max |ours - torch| where torch runs its portable (non-AVX2) normal kernel: libm's logf/cosf/sinf
# versus the Cephes polynomials differ by a few ulps; 2.3e-6 was the worst over 16M draws
# (ATEN_CPU_CAPABILITY=default, glibc), and float32 ulps reach 4.8e-7 in the |x| < 8 range.
TORCH_SCALAR_KERNEL_TOLERANCE = 1e-5

# torch.Generator.manual_seed accepts exactly this range (it unpacks to uint64, negatives wrapping).
_SEED_MIN = -(2**63)
_SEED_MAX = 2**64 - 1

_F32 = np.float32
_F64 = np.float64


class NoiseGenerator(Protocol):
    """What the pipeline needs: standard-normal float32 draws that continue one stream."""

    def randn(self, shape: int | Sequence[int]) -> np.ndarray: ...


def _check_seed(seed: int) -> int:
    """Validates a seed as torch's manual_seed does and returns it reduced modulo 2**64."""
    if isinstance(seed, bool):  # bool is an int subclass, but a True/False seed is a caller bug
        raise InputError(f"seed must be an integer, got {seed!r}")
    try:
        value = operator.index(seed)
    except TypeError:
        raise InputError(f"seed must be an integer, got {seed!r}") from None
    if not _SEED_MIN <= value <= _SEED_MAX:
        raise InputError(f"seed must be between {_SEED_MIN} and {_SEED_MAX}, got {value}")
    return value % 2**64


def _check_shape(shape: int | Sequence[int]) -> tuple[int, ...]:
    """Returns the shape as a tuple of non-negative ints or raises InputError."""
    try:
        if isinstance(shape, Sequence):
            dims = tuple(operator.index(d) for d in shape)
        else:
            dims = (operator.index(shape),)
    except TypeError:
        raise InputError(f"shape must be an int or a sequence of ints, got {shape!r}") from None
    if any(d < 0 for d in dims):
        raise InputError(f"shape must not have negative sizes, got {dims}")
    return dims


# --- float32 arithmetic as the AVX2 kernel does it ------------------------------------------------
#
# The kernel's values are float32, but NumPy has no float32 FMA, so they are carried in float64
# and rounded to float32 after every operation. For +, -, * and sqrt that is exactly the float32
# operation (53 >= 2*24 + 2 bits). For a fused a*b + c the product is exact in float64 and only
# the sum is rounded twice (to 53 bits, then to 24); that can differ from one rounding only when
# the float64 sum lands exactly on a float32 midpoint while the exact sum is not one. Over every
# input the two functions below can receive here (all 2**24 uniforms each) that never changes a
# result; tests/runtime/test_rng.py re-checks it exhaustively against an exact FMA (a slow test).


def _fma32(a: np.ndarray, b: np.ndarray | _F64, c: np.ndarray | _F64) -> np.ndarray:
    """float32 fused multiply-add a*b + c on float32 values held in float64 (exact here, above)."""
    s = a * b
    s += c
    return _r32(s)


def _r32(x: np.ndarray) -> np.ndarray:
    """Rounds float64 to the nearest float32, kept in float64: the result of a float32 op."""
    return x.astype(_F32).astype(_F64)


def _k(value: float) -> _F64:
    """A kernel constant: the float32 the C source's literal becomes, held as float64."""
    return _F64(_F32(value))


# Cephes logf (Moshier), as vectorised in avx_mathfun: log(x) = log(m) + e*ln2 with m in
# [sqrt(1/2), sqrt(2)), log(1+f) = f - f²/2 + f³·P(f), and ln2 split as q2 + q1.
_LOG_P = tuple(
    _k(v)
    for v in (
        7.0376836292e-2, -1.1514610310e-1, 1.1676998740e-1, -1.2420140846e-1, 1.4249322787e-1,
        -1.6668057665e-1, 2.0000714765e-1, -2.4999993993e-1, 3.3333331174e-1,
    )
)
_LOG_Q1 = _k(-2.12194440e-4)
_LOG_Q2 = _k(0.693359375)
_SQRTHF = _F32(0.707106781186547524)


def _log_avx2(x: np.ndarray) -> np.ndarray:
    """Natural log of float32 x in (0, 1] as torch's AVX2 kernel computes it (Cephes logf)."""
    bits = x.view(np.int32)
    e = ((bits >> 23) - 126).astype(_F64)  # exponent + 1, as the kernel's cvt + add(one)
    m = ((bits & ~0x7F800000) | 0x3F000000).view(_F32)  # mantissa scaled into [0.5, 1)
    small = m < _SQRTHF
    # Below sqrt(1/2): use 2m - 1 and one less in the exponent; both forms are exact here.
    f = (m - _F32(1)).astype(_F64) + np.where(small, m, _F32(0))
    e -= small
    z = _r32(f * f)
    y = np.full_like(f, _LOG_P[0])
    for coef in _LOG_P[1:]:
        y = _fma32(y, f, coef)  # GCC fuses each Horner mul+add
    y = _r32(y * f)
    # The kernel's y*z + e*q1: GCC fuses the multiplication that comes first, y*z.
    y = _fma32(y, z, _r32(e * _LOG_Q1))
    y = _r32(y - _r32(z * 0.5))
    return _fma32(e, _LOG_Q2, _r32(f + y))  # and here e*q2 is the fused one


# Cephes sinf/cosf: reduce by multiples of pi/4 in three parts (DP1+DP2+DP3), then minimax
# polynomials for sin and cos on [-pi/4, pi/4].
_FOPI = _F32(1.27323954473516)  # 4/pi
_MINUS_DP = (_k(-0.78515625), _k(-2.4187564849853515625e-4), _k(-3.77489497744594108e-8))
_COS_C = (_k(2.443315711809948e-5), _k(-1.388731625493765e-3), _k(4.166664568298827e-2))
_SIN_C = (_k(-1.9515295891e-4), _k(8.3321608736e-3), _k(-1.6666654611e-1))


def _sincos_avx2(theta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """sin and cos of float32 theta >= 0 as torch's AVX2 kernel computes them (Cephes sincosf)."""
    j = (theta * _FOPI).astype(np.int32)  # truncation, like cvttps
    j = (j + 1) & ~1  # round the octant up to even, so the reduced x lies in [-pi/4, pi/4]
    y = j.astype(_F64)
    x = theta.astype(_F64)
    for dp in _MINUS_DP:
        x = _fma32(y, dp, x)  # x - y*pi/4 in three fused steps (extended-precision reduction)
    z = _r32(x * x)
    c = _fma32(np.full_like(z, _COS_C[0]), z, _COS_C[1])
    c = _fma32(c, z, _COS_C[2])
    c = _r32(c * z)
    # c*z*z - z/2: GCC fuses the second c*z into the subtraction (z/2 is exact).
    c = _fma32(c, z, -_r32(z * 0.5))
    c = _r32(c + 1.0)
    s = _fma32(np.full_like(z, _SIN_C[0]), z, _SIN_C[1])
    s = _fma32(s, z, _SIN_C[2])
    s = _r32(s * z)
    s = _fma32(s, x, x)
    use_sin_poly = (j & 2) == 0
    # The kernel selects by masking and adding +0, which also turns a -0 result into +0.
    sin = (np.where(use_sin_poly, s, c) + 0.0).astype(_F32)
    cos = (np.where(use_sin_poly, c, s) + 0.0).astype(_F32)
    # Quadrant signs as sign-bit flips (theta >= 0, so the input's own sign bit is clear).
    sin_flip = ((j & 4) << 29).astype(np.uint32)
    cos_flip = ((~(j - 2) & 4) << 29).astype(np.uint32)
    sin = (sin.view(np.uint32) ^ sin_flip).view(_F32)
    cos = (cos.view(np.uint32) ^ cos_flip).view(_F32)
    return sin, cos


_TWO_PI_F32 = _F32(2.0 * math.pi)  # the kernel's _mm256_set1_ps(2.0f * pi<double>)


_CHUNK_BLOCKS = 1024  # blocks per pass: keeps the float64 temporaries in cache (2x faster at 64K)


def _box_muller_blocks(u: np.ndarray) -> np.ndarray:
    """Box–Muller over blocks of 16 float32 uniforms, in torch's block layout; returns float32."""
    blocks = u.reshape(-1, 16)
    out = np.empty_like(blocks)
    for start in range(0, len(blocks), _CHUNK_BLOCKS):
        part = blocks[start : start + _CHUNK_BLOCKS]
        u1 = _F32(1) - part[:, :8]  # [0, 1) -> (0, 1] for the log
        radius = np.sqrt(_F32(-2) * _log_avx2(u1).astype(_F32))
        sin, cos = _sincos_avx2(_TWO_PI_F32 * part[:, 8:])
        np.multiply(radius, cos, out=out[start : start + _CHUNK_BLOCKS, :8])
        np.multiply(radius, sin, out=out[start : start + _CHUNK_BLOCKS, 8:])
    out += _F32(0)  # the kernel's final fmadd(n, std=1, mean=0): bit-identical except -0 -> +0
    return out.reshape(-1)


class TorchGenerator:
    """torch.Generator().manual_seed(seed) on CPU: MT19937 + torch's Box–Muller, in NumPy."""

    def __init__(self, seed: int) -> None:
        self.seed = _check_seed(seed)
        # NumPy's legacy seeding of a 32-bit seed is MT19937's init_genrand, which torch uses on
        # the seed's low 32 bits; copy that state into a bare MT19937 to read raw 32-bit words.
        _, key, pos, _, _ = np.random.RandomState(self.seed & 0xFFFFFFFF).get_state(legacy=True)
        self._mt = np.random.MT19937(0)
        self._mt.state = {"bit_generator": "MT19937", "state": {"key": key, "pos": pos}}
        self._cached_normal: float | None = None  # torch's next_double_normal_sample

    def _words(self, n: int) -> np.ndarray:
        """The next n raw 32-bit outputs of the engine (as uint64 values)."""
        return self._mt.random_raw(n)

    def _uniform_f32(self, n: int) -> np.ndarray:
        """n float32 uniforms in [0, 1), one word each: (w & 0xFFFFFF) * 2**-24, as torch."""
        return (self._words(n) & 0xFFFFFF).astype(_F32) * _F32(2.0**-24)

    def _normal_fill(self, n: int) -> np.ndarray:
        """torch's normal_fill for n >= 16: uniforms for all, blocks of 16, redo the last 16."""
        u = self._uniform_f32(n)
        out = np.empty(n, _F32)
        full = n - n % 16
        out[:full] = _box_muller_blocks(u[:full])
        if full != n:
            # torch draws 16 more uniforms and overwrites the last 16 outputs from them; the
            # leftover uniforms of the first draw are simply never used.
            out[n - 16 :] = _box_muller_blocks(self._uniform_f32(16))
        return out

    def _normal_scalar(self, n: int) -> np.ndarray:
        """torch's element-wise path for n < 16: float64 Box–Muller with one cached value."""
        values: list[float] = []
        if n and self._cached_normal is not None:
            values.append(self._cached_normal)
            self._cached_normal = None
        pairs = (n - len(values) + 1) // 2
        w = self._words(4 * pairs)
        # 53-bit uniforms from word pairs, first word as the high half (torch's random64()).
        u = (((w[0::2] << np.uint64(32)) | w[1::2]) & np.uint64((1 << 53) - 1)) * 2.0**-53
        # At most 8 pairs: plain math calls the platform libm, as torch's double path does,
        # which keeps the float64 values (and so the cached one) exactly torch's.
        for u1, u2 in zip(u[0::2].tolist(), u[1::2].tolist(), strict=True):
            r = math.sqrt(-2.0 * math.log1p(-u2))
            theta = 2.0 * math.pi * u1
            values += [r * math.cos(theta), r * math.sin(theta)]
        if len(values) > n:
            self._cached_normal = values.pop()
        return np.array(values, dtype=_F64).astype(_F32)

    def randn(self, shape: int | Sequence[int]) -> np.ndarray:
        """Standard normals equal to torch.randn(shape, generator=g) for g's next call (float32)."""
        dims = _check_shape(shape)
        n = math.prod(dims)
        flat = self._normal_fill(n) if n >= 16 else self._normal_scalar(n)
        return flat.reshape(dims)


class NumpyGenerator:
    """Fast default: NumPy's PCG64 via default_rng(seed), ziggurat normals drawn in float32."""

    def __init__(self, seed: int) -> None:
        self.seed = _check_seed(seed)
        self._rng = np.random.default_rng(self.seed)

    def randn(self, shape: int | Sequence[int]) -> np.ndarray:
        """Standard normals of the given shape (float32); successive calls continue the stream."""
        return self._rng.standard_normal(_check_shape(shape), dtype=_F32)


def make_generator(kind: str, seed: int) -> NoiseGenerator:
    """A generator of the named kind ("torch" or "numpy") seeded with seed."""
    if kind == "torch":
        return TorchGenerator(seed)
    if kind == "numpy":
        return NumpyGenerator(seed)
    raise InputError(f"unknown generator {kind!r}; choose one of: {', '.join(GENERATORS)}")


def randn_rows(generators: Sequence[NoiseGenerator], shape: Sequence[int]) -> np.ndarray:
    """A (len(generators), *shape[1:]) draw, row i from generators[i] (diffusers' rule for a
    list of generators: each image's noise comes from its own)."""
    one = (1, *shape[1:])
    return np.concatenate([g.randn(one) for g in generators])  # (B, C, h, w)
