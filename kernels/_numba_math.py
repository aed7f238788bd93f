"""Bit-level building blocks shared by the numba kernels of every pass.

The signal kernels (``signals/numba_cpu.py``) work in float32 and the calibration kernels
(``calibration/numba_cpu.py``) in float64. Both build their exp and log from the same idea: a
branch-free range reduction x = k*ln2 + r, a polynomial for exp(r) (or log1p of a mantissa), and
2^k assembled in the exponent bits of an IEEE-754 number. What is identical between the two lives
here once: the bit casts between a float and the integer holding its bits, and log2(e). The
polynomials, the Cody-Waite splits of ln 2 and the rounding step differ with the precision and stay
beside the kernels that use them.

numba has no vector math library here, so ``math.exp``/``math.log`` are scalar library calls that
stop LLVM from vectorising a loop; a bit cast is a register move and vectorises.

Editing this file: numba keys a kernel's on-disk cache on the time stamp of the kernel's own source
file only, so a kernel cached before an edit here keeps the old inlined code. After changing
anything below, touch ``signals/numba_cpu.py`` and ``calibration/numba_cpu.py`` (or clear their
``__pycache__``), and note that ``signals/numba_specialise.py`` digests numba_cpu.py, not this file.
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.extending import intrinsic

# log2(e), correctly rounded in float64; float32 callers narrow it (np.float32(LOG2E) is the
# correctly rounded float32 too).
LOG2E = 1.4426950408889634


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
def f64_bits(typingctx, x):
    """The IEEE-754 bits of a float64 as an int64 (no conversion)."""
    if x != types.float64:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(64))

    return types.int64(types.float64), codegen


@intrinsic
def bits_f64(typingctx, x):
    """The float64 whose IEEE-754 bits are the int64 ``x``."""
    if x != types.int64:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.DoubleType())

    return types.float64(types.int64), codegen


__all__ = ["LOG2E", "bits_f32", "bits_f64", "f32_bits", "f64_bits"]
