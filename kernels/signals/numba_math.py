"""Branch-free float32 building blocks for the numba CPU kernels: bit casts, exp, log, widening.

numba has no vector math library here, so ``math.exp``/``math.log`` stay scalar library calls that
stop LLVM from vectorising a loop. The functions below are straight-line float32 code (Cephes-style
range reduction plus a minimax polynomial, the exponent handled through int32 bit casts), so a loop
over rows that calls them vectorises, 8 rows per AVX2 register.

Accuracy (checked against numpy in tests/test_signals_numba.py on dense sweeps):
- :func:`exp32`: a few float32 ulp over the whole float32 range, denormal results included;
  0 below -103.98, +inf above 88.73. NaN is not propagated (callers check finiteness on the bits).
- :func:`log32`: a few ulp for every positive float32, denormals included; -inf at 0, +inf at
  +inf. Negative inputs and NaN give unspecified values (callers never pass them).

All arithmetic is kept in float32 by typing constants as ``np.float32`` (a Python float literal
would promote the whole expression to float64 and halve the vector width). The helpers are compiled
without ``reassoc`` so LLVM keeps the two-constant (Cody-Waite) range reduction intact, and without
``nnan``/``ninf`` so comparisons mean what they say.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

# Flags for every helper: fused multiply-add only. "reassoc" would let LLVM fold the Cody-Waite
# split x - n*C1 - n*C2 into x - n*(C1+C2) and lose the low bits.
MATH_FLAGS = {"contract"}

f32 = np.float32
i32 = np.int32


@intrinsic
def f32_bits(typingctx, x):
    """The IEEE-754 bits of a float32 as an int32 (a register move, vectorises)."""
    if x != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.int32(types.float32), codegen


@intrinsic
def bits_f32(typingctx, x):
    """The float32 whose IEEE-754 bits are the int32 ``x``."""
    if x != types.int32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.int32), codegen


@intrinsic
def fmax(typingctx, a, b):
    """max(a, b) of two float32 or two float64 as LLVM's ``maxnum``: LLVM vectorises a loop
    reduction of it without fast-math flags (a compare-and-select maximum stays scalar when numba
    compiles it). If one argument is NaN the other is returned."""
    if a != b or a not in (types.float32, types.float64):
        return None

    def codegen(context, builder, signature, args):
        ty = args[0].type
        fn = builder.module.declare_intrinsic("llvm.maxnum", [ty], ir.FunctionType(ty, [ty, ty]))
        return builder.call(fn, args)

    return a(a, a), codegen


# exp: x = n*ln2 + r with |r| <= ln2/2, exp(x) = 2^n * P(r). ln2 is split in two (C1 has few
# mantissa bits, so n*C1 is exact) to keep r accurate for |n| up to 150.
_LOG2E = f32(1.44269504088896341)
_EXP_C1 = f32(0.693359375)
_EXP_C2 = f32(-2.12194440e-4)
_EXP_P0 = f32(1.9875691500e-4)
_EXP_P1 = f32(1.3981999507e-3)
_EXP_P2 = f32(8.3334519073e-3)
_EXP_P3 = f32(4.1665795894e-2)
_EXP_P4 = f32(1.6666665459e-1)
_EXP_P5 = f32(5.0000001201e-1)
# Below -103.98 the result rounds to 0 even as a denormal; above 88.73 it overflows.
EXP_LO = f32(-103.972084)
EXP_HI = f32(88.7228394)
_HALF = f32(0.5)
_ONE = f32(1.0)
_ZERO = f32(0.0)


@njit(fastmath=MATH_FLAGS, cache=True)
def exp32(x):
    """exp(x) for a float32 ``x``, branch-free. Returns float32."""
    x = x if x > EXP_LO else EXP_LO
    x = x if x < EXP_HI else EXP_HI
    fx = np.floor(x * _LOG2E + _HALF)
    r = x - fx * _EXP_C1
    r = r - fx * _EXP_C2
    z = r * r
    y = _EXP_P0
    y = y * r + _EXP_P1
    y = y * r + _EXP_P2
    y = y * r + _EXP_P3
    y = y * r + _EXP_P4
    y = y * r + _EXP_P5
    y = y * z + r + _ONE
    # 2^n in two factors, each a normal float32 for n in [-150, 128]: this gives denormal results
    # and the exact overflow point without a branch.
    n = i32(fx)
    n1 = i32(n >> i32(1))
    n2 = i32(n - n1)
    s1 = bits_f32(i32((n1 + i32(127)) << i32(23)))
    s2 = bits_f32(i32((n2 + i32(127)) << i32(23)))
    return (y * s1) * s2


# log: x = m * 2^e with m in [sqrt(1/2), sqrt(2)), log(x) = e*ln2 + log1p(m - 1) with a polynomial
# for log1p on that interval.
_SQRT2 = f32(1.41421356237)
_LOG_P0 = f32(7.0376836292e-2)
_LOG_P1 = f32(-1.1514610310e-1)
_LOG_P2 = f32(1.1676998740e-1)
_LOG_P3 = f32(-1.2420140846e-1)
_LOG_P4 = f32(1.4249322787e-1)
_LOG_P5 = f32(-1.6668057665e-1)
_LOG_P6 = f32(2.0000714765e-1)
_LOG_P7 = f32(-2.4999993993e-1)
_LOG_P8 = f32(3.3333331174e-1)
_FLT_MIN = f32(1.17549435e-38)
_TWO23 = f32(8388608.0)
_NEG_INF = f32(-np.inf)
_POS_INF = f32(np.inf)


@njit(fastmath=MATH_FLAGS, cache=True)
def log_parts(m, e):
    """log(m * 2^e) for float32 ``m`` in [1, 2) and float32 ``e`` (an integer value).

    Lets a caller keep a long product as mantissa and exponent (no overflow) and take one log."""
    big = m > _SQRT2
    m = m * _HALF if big else m
    e = e + _ONE if big else e
    f = m - _ONE
    z = f * f
    y = _LOG_P0
    y = y * f + _LOG_P1
    y = y * f + _LOG_P2
    y = y * f + _LOG_P3
    y = y * f + _LOG_P4
    y = y * f + _LOG_P5
    y = y * f + _LOG_P6
    y = y * f + _LOG_P7
    y = y * f + _LOG_P8
    y = y * f * z
    y = y + e * _EXP_C2
    y = y - _HALF * z
    return (f + y) + e * _EXP_C1


@njit(fastmath=MATH_FLAGS, cache=True)
def split_exponent(x):
    """(m, e) with x = m * 2^e, m in [1, 2) float32 and e an int32, for a positive normal float32."""
    bits = f32_bits(x)
    e = i32((bits >> i32(23)) - i32(127))
    m = bits_f32(i32((bits & i32(0x007FFFFF)) | i32(0x3F800000)))
    return m, e


@njit(fastmath=MATH_FLAGS, cache=True)
def log32(x):
    """log(x) for a float32 ``x`` >= 0, branch-free: denormals exact, -inf at 0, +inf at +inf."""
    tiny = x < _FLT_MIN
    # Denormals are scaled into the normal range first; the exponent is corrected below.
    xs = x * _TWO23 if tiny else x
    m, e = split_exponent(xs)
    ef = f32(e) - (f32(23.0) if tiny else _ZERO)
    y = log_parts(m, ef)
    y = _NEG_INF if x == _ZERO else y
    return _POS_INF if x == _POS_INF else y


# Widening of the 16-bit formats, from their bits (numba has no float16 on the CPU).
_F16_SUBNORMAL_SCALE = f32(2.0 ** -24)


@njit(fastmath=MATH_FLAGS, cache=True)
def bf16_to_f32(h):
    """float32 value of the bfloat16 whose bits are the int32 ``h`` (0..65535): exact."""
    return bits_f32(i32(h << i32(16)))


@njit(fastmath=MATH_FLAGS, cache=True)
def f16_to_f32(h):
    """float32 value of the IEEE half whose bits are the int32 ``h`` (0..65535): exact for every
    finite half (subnormals through an int-to-float conversion, which never meets a denormal)."""
    a = i32(h & i32(0x7FFF))
    sign = i32((h & i32(0x8000)) << i32(16))
    normal = bits_f32(i32((a << i32(13)) + i32(112 << 23)))
    sub = f32(a) * _F16_SUBNORMAL_SCALE
    v = sub if a < i32(0x0400) else normal
    return bits_f32(i32(f32_bits(v) | sign))
