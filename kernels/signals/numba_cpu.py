"""The numba CPU backend of the ensemble-signal pass (the CPU hot path).

Entry point: :func:`ensemble_signals_numba` (registered as backend "numba"); :func:`precompile`
compiles or loads ahead of the first request what a shape will use. The spec is
:mod:`hitl_triage.kernels.signals.reference`; this computes the same signals in float32.

The logits reach the kernels as raw bytes plus a dtype code (float32, float64, float16 and
bfloat16 read in place, widened in the kernel), so each kernel has one machine-code version for
every dtype. Three kernels, chosen by :func:`_pick_kernel`:

- ``_blocked_kernel`` for few classes (C <= ``BLOCKED_MAX_CLASSES``, M*C <= ``BLOCKED_MAX_ENTRIES``):
  with C = 10 and M = 5 a loop over classes is too short for SIMD, so blocks of ``BLOCK_ROWS``
  rows are transposed (8x8 register tiles) into a float32 scratch laid out [member*class, row] and
  every step runs across the rows of the block, 8 rows per AVX2 register, 16 per AVX-512 one.
  Every block is computed at full width (the last one padded), so a row's result never depends on
  its neighbours, its position or the thread count.
- the same driver with the class loops unrolled for one C (numba_specialise.py), generated and
  cached on disk on first use: same operations in the same order, same bits, 1.3-1.6x faster.
- ``_rowwise_kernel`` for many classes: one row at a time, loops over classes (long enough to
  vectorise), sums in float64 so that C = 32768 keeps float32-level accuracy.

All are parallel (``prange``) over pieces of contiguous rows handed out dynamically, about eight per
thread, and release the GIL; the piece size is an argument and the thread count is set around the
call (calling ``numba.get_num_threads()`` inside a kernel prevents caching). Small batches run on
one thread.

Numerics, the same in every kernel:
- Member argmax (for vote agreement) on the raw logits, lowest index on ties; the mean-probability
  argmax likewise.
- Softmax with the member max subtracted; float64 inputs are shifted in float64 before narrowing,
  so any finite logits work, 1e300 included. d = (z - max)/T is clamped at ``D_FLOOR`` = -70: the
  probabilities lost are below e^-70 = 4e-31 of the largest, far under float32 resolution, and no
  product or quotient downstream ever meets a denormal (denormal arithmetic is ~100x slower on x86).
- Entropy of a member H_m = log s_m - sum_c p_mc d_mc (s_m the softmax denominator). The blocked
  kernels take sum_m log s_m as one log of the product of the s_m kept as mantissa and exponent:
  one log per row for the expected entropy, plus C logs for the entropy of the mean.
- With one member, expected entropy = total entropy and mutual information = 0 exactly.
- Finiteness is tested on each logit's exponent bits as integers (an optimiser allowed to assume
  no NaN deletes float ``isfinite`` checks); non-finite logits are replaced by 0 on load, so an
  invalid row computes harmlessly and is then written as -1 / NaN.
"""

from __future__ import annotations

import logging
import os

import numba
import numpy as np
import torch
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

from .._numba_math import LOG2E, bits_f32, f32_bits

logger = logging.getLogger(__name__)

f32 = np.float32
i32 = np.int32

# ---------------------------------------------------------------------------------------------
# Float32 building blocks: bit casts, maxnum, exp, log, 16-bit widening
# ---------------------------------------------------------------------------------------------
# numba has no vector math library here, so ``math.exp``/``math.log`` stay scalar library calls that
# stop LLVM from vectorising a loop. These are straight-line float32 code (Cephes-style range
# reduction and polynomial, the exponent handled through int32 bit casts), so a loop over rows
# that calls them vectorises (8 rows per AVX2 register, 16 per AVX-512 register).
#
# Accuracy, checked against numpy in tests/test_signals_numba.py on dense sweeps: exp32 about 1 ulp
# over the whole float32 range (denormal results too; 0 below -103.98, +inf above 88.73); log32
# below 1 ulp for every positive float32, denormals included (-inf at 0, +inf at +inf). Neither
# propagates NaN: callers test finiteness on the bits.
#
# Constants are typed ``np.float32``: a Python float literal would promote the expression to
# float64 and halve the vector width. The helpers are inlined by numba (``inline="always"``): left
# to LLVM's inliner, f16_to_f32 stayed a call inside the 16-bit load loop, which then ran scalar.
#
# The float32 polynomials live in this file on purpose: numba's on-disk cache of a function is keyed
# on the time stamp of that function's own source file only, so a kernel cached here would keep a
# stale inlined copy of a helper edited in another file. The bit casts and log2(e), identical for
# the float64 calibration kernels, come from kernels/_numba_math.py (see its note on editing).

# Flags for every helper: fused multiply-add only. "reassoc" would let LLVM fold the Cody-Waite
# split x - n*C1 - n*C2 into x - n*(C1+C2) and lose the low bits.
MATH_FLAGS = {"contract"}

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


# Shuffle masks of an 8x8 float32 transpose (indices 0-7 pick from the first vector, 8-15 from the
# second): interleave pairs of rows, then pairs of pairs, then swap 128-bit halves.
_UNPACK_LO = (0, 8, 1, 9, 4, 12, 5, 13)
_UNPACK_HI = (2, 10, 3, 11, 6, 14, 7, 15)
_PAIRS_LO = (0, 1, 8, 9, 4, 5, 12, 13)
_PAIRS_HI = (2, 3, 10, 11, 6, 7, 14, 15)
_HALVES_LO = (0, 1, 2, 3, 8, 9, 10, 11)
_HALVES_HI = (4, 5, 6, 7, 12, 13, 14, 15)


@intrinsic
def transpose8(typingctx, src, src_start, src_stride, dst, dst_start, dst_stride):
    """dst[dst_start + i*dst_stride + k] = src[src_start + k*src_stride + i] for i, k in 0..7.

    An 8x8 float32 tile through registers: 8 vector loads, 24 shuffles, 8 vector stores, where
    LLVM's own code for a transposing loop is a gather (or a scalar load) per element, the cost
    that dominated loading a block. No bounds checks: the caller keeps the tile inside both
    1-D float32 arrays."""
    if not (isinstance(src, types.Array) and isinstance(dst, types.Array)
            and src.dtype == types.float32 and dst.dtype == types.float32
            and src.ndim == 1 and dst.ndim == 1):
        return None
    sig = types.void(src, types.intp, types.intp, dst, types.intp, types.intp)

    def codegen(context, builder, signature, args):
        src_val, s0, s_stride, dst_val, d0, d_stride = args
        src_ary = context.make_array(signature.args[0])(context, builder, src_val)
        dst_ary = context.make_array(signature.args[3])(context, builder, dst_val)
        i64 = ir.IntType(64)
        vec = ir.VectorType(ir.FloatType(), 8)

        def shuffle(a, b, mask):
            return builder.shuffle_vector(a, b, ir.Constant(ir.VectorType(ir.IntType(32), 8), list(mask)))

        def address(ary, start, stride, k):
            offset = builder.add(start, builder.mul(stride, ir.Constant(i64, k)))
            return builder.bitcast(builder.gep(ary.data, [offset]), vec.as_pointer())

        rows = [builder.load(address(src_ary, s0, s_stride, k), align=4) for k in range(8)]
        pairs = []  # rows (0,1), (2,3), (4,5), (6,7) interleaved: low and high halves of each pair
        for k in range(0, 8, 2):
            pairs += [shuffle(rows[k], rows[k + 1], _UNPACK_LO), shuffle(rows[k], rows[k + 1], _UNPACK_HI)]
        quads = []  # rows 0-3 then 4-7: columns (0,4), (1,5), (2,6), (3,7) in 128-bit halves
        for a in (0, 4):
            for lo_hi in (0, 1):
                quads += [shuffle(pairs[a + lo_hi], pairs[a + 2 + lo_hi], _PAIRS_LO),
                          shuffle(pairs[a + lo_hi], pairs[a + 2 + lo_hi], _PAIRS_HI)]
        for i in range(4):
            builder.store(shuffle(quads[i], quads[i + 4], _HALVES_LO), address(dst_ary, d0, d_stride, i), align=4)
            builder.store(shuffle(quads[i], quads[i + 4], _HALVES_HI), address(dst_ary, d0, d_stride, i + 4), align=4)
        return context.get_dummy_value()

    return sig, codegen


# exp: x = n*ln2 + r with |r| <= ln2/2, exp(x) = 2^n * P(r). ln2 is split in two (C1 has few
# mantissa bits, so n*C1 is exact) to keep r accurate for |n| up to 150.
_LOG2E = f32(LOG2E)
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


@njit(fastmath=MATH_FLAGS, error_model="numpy", cache=True, inline="always")
def _exp_poly(x):
    """(P(r), n) with exp(x) = P(r) * 2^n, |r| <= ln2/2: the range reduction and polynomial."""
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
    return y * z + r + _ONE, i32(fx)


@njit(fastmath=MATH_FLAGS, error_model="numpy", cache=True, inline="always")
def exp32(x):
    """exp(x) for any float32 ``x``, branch-free. The kernels use :func:`exp_softmax` (same
    polynomial, the same bits on its domain); this full-range form is what the tests sweep."""
    x = x if x > EXP_LO else EXP_LO
    x = x if x < EXP_HI else EXP_HI
    y, n = _exp_poly(x)
    # 2^n in two factors, each a normal float32 for n in [-150, 128]: this gives denormal results
    # and the exact overflow point without a branch.
    n1 = i32(n >> i32(1))
    n2 = i32(n - n1)
    s1 = bits_f32(i32((n1 + i32(127)) << i32(23)))
    s2 = bits_f32(i32((n2 + i32(127)) << i32(23)))
    return (y * s1) * s2


@njit(fastmath=MATH_FLAGS, error_model="numpy", cache=True, inline="always")
def exp_softmax(x):
    """exp(x) for float32 ``x`` in [-87, 0] (the softmax's clamped shifted logits): no clamping
    and one scaling, since the result is a normal float32 there. exp32 elsewhere."""
    y, n = _exp_poly(x)
    return y * bits_f32(i32((n + i32(127)) << i32(23)))


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


@njit(fastmath=MATH_FLAGS, error_model="numpy", cache=True, inline="always")
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


@njit(fastmath=MATH_FLAGS, error_model="numpy", cache=True, inline="always")
def split_exponent(x):
    """(m, e) with x = m * 2^e, m in [1, 2) float32 and e an int32, for a positive normal float32."""
    bits = f32_bits(x)
    e = i32((bits >> i32(23)) - i32(127))
    m = bits_f32(i32((bits & i32(0x007FFFFF)) | i32(0x3F800000)))
    return m, e


@njit(fastmath=MATH_FLAGS, error_model="numpy", cache=True, inline="always")
def log32(x):
    """log(x) for a float32 ``x`` >= 0, branch-free: denormals exact, -inf at 0, +inf at +inf.
    The kernels call split_exponent and log_parts directly; the tests sweep them through this."""
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


@njit(fastmath=MATH_FLAGS, error_model="numpy", cache=True, inline="always")
def bf16_to_f32(h):
    """float32 value of the bfloat16 whose bits are the int32 ``h`` (0..65535): exact."""
    return bits_f32(i32(h << i32(16)))


@njit(fastmath=MATH_FLAGS, error_model="numpy", cache=True, inline="always")
def f16_to_f32(h):
    """float32 value of the IEEE half whose bits are the int32 ``h`` (0..65535): exact for every
    finite half (subnormals through an int-to-float conversion, which never meets a denormal)."""
    a = i32(h & i32(0x7FFF))
    sign = i32((h & i32(0x8000)) << i32(16))
    normal = bits_f32(i32((a << i32(13)) + i32(112 << 23)))
    sub = f32(a) * _F16_SUBNORMAL_SCALE
    v = sub if a < i32(0x0400) else normal
    return bits_f32(i32(f32_bits(v) | sign))


# Input dtype codes (the logits reach the kernels as raw bytes).
KIND_F32, KIND_F64, KIND_F16, KIND_BF16 = 0, 1, 2, 3
_KINDS = {torch.float32: KIND_F32, torch.float64: KIND_F64, torch.float16: KIND_F16, torch.bfloat16: KIND_BF16}

# Rows per block of the blocked kernel: a compile-time constant, so the row loops have a known trip
# count (no scalar remainder, identical arithmetic in every lane).
BLOCK_ROWS = 64
# Above about this many classes the class loops are long enough to vectorise and the row-wise kernel
# wins (measured on the 2-core AVX-512 machine: equal near C = 64 for M = 5 and M = 1)...
BLOCKED_MAX_CLASSES = 48
# ...and above this many [member*class] entries the blocked scratch (BLOCK_ROWS rows, 256 KiB) leaves
# L2 (M = 64, C = 32: blocked 3.8 ns per logit, row-wise 2.0).
BLOCKED_MAX_ENTRIES = 1024

# Flags of the kernels: FMA contraction only. No "reassoc" (exp/log range reduction), no
# "nnan"/"ninf" (they would delete the NaN outputs of invalid rows).
_FLAGS = {"contract"}
# Reductions over the classes of one row in the row-wise kernel: the row is finite (checked on the
# bits, non-finite rows never get here), so every fast-math assumption holds and LLVM may reorder
# the sums and maxima into vector lanes.
_REDUCE_FLAGS = {"contract", "reassoc", "nsz", "nnan", "ninf", "arcp"}

D_FLOOR = f32(-70.0)
_NAN = f32(np.nan)
_ZERO = f32(0.0)
_ONE = f32(1.0)
_NEG_BIG = f32(-3.0e38)
_FLT_MAX = f32(np.finfo(np.float32).max)
_F32_EXP = i32(0x7F800000)
_F16_EXP = 0x7C00
_BF16_EXP = 0x7F80
_F64_EXP = np.int64(0x7FF0000000000000)


# ---------------------------------------------------------------------------------------------
# Blocked kernel (few classes)
# ---------------------------------------------------------------------------------------------

# Rows of the per-row float32 scratch ``fv`` [_NF, BLOCK_ROWS] and int32 scratch ``iv``.
_TOP, _TOP2, _INV_T, _S, _SD, _LP_M, _H_SUM, _W, _ENT = 0, 1, 2, 3, 4, 5, 6, 7, 8
_CONF, _MARGIN, _TOTAL, _EXPECTED, _MI, _VOTE = 9, 10, 11, 12, 13, 14
_NF = 15
_BEST, _BAD, _LP_E, _CLASS, _VOTES = 0, 1, 2, 3, 4
_NI = 5

# Every loop over the rows of a block indexes a row view (``x[j]``) from 0: with a computed flat
# index (``x[j * R + r]``) numba's negative-index wraparound can hide the affine access from LLVM
# and the loop stays scalar.


@njit(fastmath=_FLAGS, error_model="numpy", cache=True)
def _transpose_rows(src, nrows, width, x):
    """x[j, r] = src[r*width + j] for r < nrows, j < width: 8x8 tiles through registers, the
    ragged edges element by element."""
    R = BLOCK_ROWS
    flat = x.reshape(-1)
    full_rows = nrows // 8 * 8
    full_cols = width // 8 * 8
    for r0 in range(0, full_rows, 8):
        for j0 in range(0, full_cols, 8):
            transpose8(src, r0 * width + j0, width, flat, j0 * R + r0, R)
    for j in range(full_cols, width):
        xj = x[j]
        for r in range(nrows):
            xj[r] = src[r * width + j]
    for j in range(full_cols):
        xj = x[j]
        for r in range(full_rows, nrows):
            xj[r] = src[r * width + j]


@njit(fastmath=_FLAGS, error_model="numpy", cache=True)
def _bits_at(raw, kind, k):
    """Bits of logit ``k`` of a float32 (KIND_F32) or 16-bit input, as int32 (slow paths only)."""
    if kind == KIND_F32:
        return i32(raw.view(np.int32)[k])
    return i32(raw.view(np.uint16)[k])


@njit(fastmath=_FLAGS, error_model="numpy", cache=True)
def _nonfinite_narrow(kind, bits):
    """True for the bits of a NaN or +-inf float32 (KIND_F32) or 16-bit float."""
    if kind == KIND_F32:
        return (bits & _F32_EXP) == _F32_EXP
    if kind == KIND_BF16:
        return (bits & _BF16_EXP) == _BF16_EXP
    return (bits & _F16_EXP) == _F16_EXP


@njit(fastmath=_FLAGS, error_model="numpy", cache=True)
def _widen_narrow(kind, bits):
    """float32 value of the bits of a float32 (KIND_F32) or 16-bit float."""
    if kind == KIND_F32:
        return bits_f32(bits)
    if kind == KIND_BF16:
        return bf16_to_f32(bits)
    return f16_to_f32(bits)


@njit(fastmath=_FLAGS, error_model="numpy", cache=True)
def _load_block(raw, kind, row0, nrows, members, classes, x, conv, arg, bad):
    """Transpose rows [row0, row0 + nrows) of the logits into ``x`` [member*class, BLOCK_ROWS]
    as float32, zero-padding the rest of the block; ``bad[r]`` = 1 for a row with a non-finite
    logit (whose logits are loaded as 0). ``conv`` [BLOCK_ROWS*member*class] is scratch.

    For float64 input the member max is subtracted in float64 and the member argmax is stored in
    ``arg`` [member, BLOCK_ROWS]; returns True in that case (``x`` is then already shifted)."""
    width = members * classes
    R = BLOCK_ROWS
    start = row0 * width
    stop = (row0 + nrows) * width
    if kind != KIND_F64:
        # Common case first: one vectorised OR over the block's bits, then a plain transposing
        # copy (8x8 register tiles).
        flag = i32(0)
        if kind == KIND_F32:
            src = raw.view(np.int32)[start:stop]
            for k in range(stop - start):
                flag |= i32((src[k] & _F32_EXP) == _F32_EXP)
        else:
            src16 = raw.view(np.uint16)[start:stop]
            mask = _BF16_EXP if kind == KIND_BF16 else _F16_EXP
            for k in range(stop - start):
                flag |= i32((i32(src16[k]) & mask) == mask)
        if flag == 0:
            for r in range(R):
                bad[r] = 0
            if kind == KIND_F32:
                srcf = raw.view(np.float32)[start:stop]
            else:
                # Widen the 16-bit block in one contiguous pass (vectorises everywhere), then
                # transpose it like float32: widening inside the strided copy was left scalar in
                # some of the kernels LLVM inlined it into.
                srcf = conv[:stop - start]
                if kind == KIND_BF16:
                    for k in range(stop - start):
                        srcf[k] = bf16_to_f32(i32(src16[k]))
                else:
                    for k in range(stop - start):
                        srcf[k] = f16_to_f32(i32(src16[k]))
            _transpose_rows(srcf, nrows, width, x)
        else:
            # Some row holds NaN or inf: flag rows and load their logits as 0, element by element.
            for r in range(nrows):
                row_flag = i32(0)
                for j in range(width):
                    bits = _bits_at(raw, kind, start + r * width + j)
                    nonfinite = _nonfinite_narrow(kind, bits)
                    row_flag |= i32(nonfinite)
                    x[j, r] = _ZERO if nonfinite else _widen_narrow(kind, bits)
                bad[r] = row_flag
    else:
        src = raw.view(np.float64)
        bits = raw.view(np.int64)
        for r in range(nrows):
            off = (row0 + r) * width
            flag = i32(0)
            for j in range(width):
                flag |= i32((bits[off + j] & _F64_EXP) == _F64_EXP)
            bad[r] = flag
            for m in range(members):
                base = off + m * classes
                best = 0
                top = 0.0
                if flag == 0:
                    top = src[base]
                    for c in range(1, classes):
                        if src[base + c] > top:
                            top = src[base + c]
                            best = c
                arg[m, r] = best
                for c in range(classes):
                    v = src[base + c] - top if flag == 0 else 0.0
                    x[m * classes + c, r] = f32(v)
    for r in range(nrows, R):
        bad[r] = 0
        for j in range(width):
            x[j, r] = _ZERO
        for m in range(members):
            arg[m, r] = 0
    return kind == KIND_F64


@njit(fastmath=_FLAGS, error_model="numpy", cache=True)
def _block_scratch(members, classes):
    """Per-thread scratch of the blocked kernels: x [M*C, R], conv [R*M*C], pbar [C, R],
    arg [M, R], fv [_NF, R], iv [_NI, R] and a bool [R] for the last, partial block."""
    R = BLOCK_ROWS
    return (np.empty((members * classes, R), np.float32), np.empty(members * classes * R, np.float32),
            np.empty((classes, R), np.float32), np.empty((members, R), np.int32),
            np.empty((_NF, R), np.float32), np.empty((_NI, R), np.int32), np.empty(R, np.bool_))


@njit(fastmath=_FLAGS, error_model="numpy", cache=True)
def _inverse_temperature(t):
    """1/T as float32, at most FLT_MAX: below T = 2.9e-39 the reciprocal would be +inf and the
    max logit's (z - max) * (1/T) = 0 * inf a NaN; FLT_MAX sends every other logit to D_FLOOR."""
    inv = _ONE / t
    return inv if inv < _FLT_MAX else _FLT_MAX


@njit(fastmath=_FLAGS, error_model="numpy", cache=True)
def _block_prepare(raw, kind, row0, nrows, members, classes, temps, t_index, has_index, x, conv,
                   arg, pbar, fv, iv):
    """Load a block (see _load_block), gather 1/T per row and reset the accumulators: pbar, the
    denominator product (_LP_M = 1, _LP_E = 0) and _H_SUM. Returns ``shifted``."""
    R = BLOCK_ROWS
    shifted = _load_block(raw, kind, row0, nrows, members, classes, x, conv, arg, iv[_BAD])
    inv_t = fv[_INV_T]
    if has_index:
        for r in range(nrows):
            inv_t[r] = _inverse_temperature(temps[t_index[row0 + r]])
        for r in range(nrows, R):
            inv_t[r] = _ONE
    else:
        inv_t0 = _inverse_temperature(temps[0])
        for r in range(R):
            inv_t[r] = inv_t0
    for c in range(classes):
        pc = pbar[c]
        for r in range(R):
            pc[r] = _ZERO
    lp_m = fv[_LP_M]
    h_sum = fv[_H_SUM]
    lp_e = iv[_LP_E]
    for r in range(R):
        lp_m[r] = _ONE
        lp_e[r] = 0
        h_sum[r] = _ZERO
    return shifted


@njit(fastmath=_FLAGS, error_model="numpy", cache=True)
def _block_member(x, arg, m, shifted, members, classes, pbar, fv, iv):
    """Softmax of member ``m`` across a full block, each step a loop over the rows.

    Reads x[m*C:(m+1)*C] (overwritten with exp values); fills arg[m] with the member argmax of
    the raw logits unless ``shifted`` (float64 input: x already shifted, arg already set). Adds
    p_mc / M to pbar, s_m to the denominator product (_LP_M, _LP_E) and (sum_c e_mc d_mc) / s_m
    to _H_SUM."""
    R = BLOCK_ROWS
    w_mean = _ONE / f32(members)
    top = fv[_TOP]
    inv_t = fv[_INV_T]
    s = fv[_S]
    sd = fv[_SD]
    lp_m = fv[_LP_M]
    h_sum = fv[_H_SUM]
    w = fv[_W]
    best = iv[_BEST]
    lp_e = iv[_LP_E]
    am = arg[m]
    # Member max and first argmax, across the rows of the block. Float64 input arrives shifted,
    # its max is exactly 0 and its argmax was taken in float64.
    x0 = x[m * classes]
    for r in range(R):
        top[r] = x0[r]
        best[r] = 0
    for c in range(1, classes):
        xc = x[m * classes + c]
        for r in range(R):
            v = xc[r]
            gt = v > top[r]
            top[r] = v if gt else top[r]
            best[r] = i32(c) if gt else best[r]
    if not shifted:
        for r in range(R):
            am[r] = best[r]
    for r in range(R):
        s[r] = _ZERO
        sd[r] = _ZERO
    for c in range(classes):
        xc = x[m * classes + c]
        for r in range(R):
            d = (xc[r] - top[r]) * inv_t[r]
            d = d if d > D_FLOOR else D_FLOOR
            e = exp_softmax(d)
            xc[r] = e
            s[r] += e
            sd[r] += e * d
    for r in range(R):
        inv_s = _ONE / s[r]
        h_sum[r] += sd[r] * inv_s
        w[r] = inv_s * w_mean
        # Running product of the denominators, renormalised to [1, 2) so it never overflows.
        mant, ex = split_exponent(lp_m[r] * s[r])
        lp_m[r] = mant
        lp_e[r] += ex
    for c in range(classes):
        xc = x[m * classes + c]
        pc = pbar[c]
        for r in range(R):
            pc[r] += xc[r] * w[r]


@njit(fastmath=_FLAGS, error_model="numpy", cache=True)
def _block_top_entropy(pbar, classes, fv, iv):
    """Top-1 (_TOP), top-2 (_TOP2), first argmax (_BEST) and entropy (_ENT) of the mean
    probabilities of a full block."""
    R = BLOCK_ROWS
    top = fv[_TOP]
    top2 = fv[_TOP2]
    ent = fv[_ENT]
    best = iv[_BEST]
    p0 = pbar[0]
    for r in range(R):
        top[r] = p0[r]
        top2[r] = _NEG_BIG
        best[r] = 0
    for c in range(1, classes):
        pc = pbar[c]
        for r in range(R):
            v = pc[r]
            gt = v > top[r]
            # The second largest is the larger of the old second and min(v, old first): ties with
            # the first give a zero margin, as top-k does.
            lo = v if v < top[r] else top[r]
            top2[r] = lo if lo > top2[r] else top2[r]
            top[r] = v if gt else top[r]
            best[r] = i32(c) if gt else best[r]
    for r in range(R):
        ent[r] = _ZERO
    for c in range(classes):
        pc = pbar[c]
        for r in range(R):
            p = pc[r]
            # p >= e^-70 / (C*M) is a normal float32 (D_FLOOR), so split_exponent applies.
            mant, ex = split_exponent(p)
            ent[r] -= p * log_parts(mant, f32(ex))


@njit(fastmath=_FLAGS, error_model="numpy", cache=True)
def _block_outputs(arg, members, fv, iv, out_class, out_conf, out_margin, out_total,
                   out_expected, out_mi, out_vote, out_valid):
    """Votes and the final signals of a full block into [BLOCK_ROWS] output views (-1 / NaN on
    rows flagged bad)."""
    R = BLOCK_ROWS
    top = fv[_TOP]
    top2 = fv[_TOP2]
    ent = fv[_ENT]
    lp_m = fv[_LP_M]
    h_sum = fv[_H_SUM]
    best = iv[_BEST]
    lp_e = iv[_LP_E]
    votes = iv[_VOTES]
    bad = iv[_BAD]
    for r in range(R):
        votes[r] = 0
    for m in range(members):
        am = arg[m]
        for r in range(R):
            votes[r] += i32(am[r] == best[r])
    inv_members = _ONE / f32(members)
    single = members == 1
    for r in range(R):
        ok = bad[r] == 0
        exp_r = (log_parts(lp_m[r], f32(lp_e[r])) - h_sum[r]) * inv_members
        # One member: the expected entropy is the total one and there is no disagreement, exactly
        # (the two formulas would differ in the last bits).
        exp_r = ent[r] if single else exp_r
        mi_r = ent[r] - exp_r
        mi_r = mi_r if mi_r > _ZERO else _ZERO
        out_vote[r] = f32(votes[r]) * inv_members if ok else _NAN
        out_class[r] = best[r] if ok else i32(-1)
        out_conf[r] = top[r] if ok else _NAN
        out_margin[r] = top[r] - top2[r] if ok else _NAN
        out_total[r] = ent[r] if ok else _NAN
        out_expected[r] = exp_r if ok else _NAN
        out_mi[r] = mi_r if ok else _NAN
        out_valid[r] = ok


@njit(fastmath=_FLAGS, error_model="numpy", cache=True)
def _block_store(arg, members, fv, iv, tail_valid, row0, nrows, out_class, out_conf, out_margin,
                 out_total, out_expected, out_mi, out_vote, out_valid):
    """Write the outputs of the block at ``row0``: straight into the output arrays when full, else
    full-width into scratch and then the ``nrows`` live rows."""
    R = BLOCK_ROWS
    if nrows == R:
        end = row0 + R
        _block_outputs(arg, members, fv, iv, out_class[row0:end], out_conf[row0:end],
                       out_margin[row0:end], out_total[row0:end], out_expected[row0:end],
                       out_mi[row0:end], out_vote[row0:end], out_valid[row0:end])
        return
    _block_outputs(arg, members, fv, iv, iv[_CLASS], fv[_CONF], fv[_MARGIN], fv[_TOTAL],
                   fv[_EXPECTED], fv[_MI], fv[_VOTE], tail_valid)
    for r in range(nrows):
        i = row0 + r
        out_class[i] = iv[_CLASS, r]
        out_conf[i] = fv[_CONF, r]
        out_margin[i] = fv[_MARGIN, r]
        out_total[i] = fv[_TOTAL, r]
        out_expected[i] = fv[_EXPECTED, r]
        out_mi[i] = fv[_MI, r]
        out_vote[i] = fv[_VOTE, r]
        out_valid[i] = tail_valid[r]


@njit(fastmath=_FLAGS, error_model="numpy", cache=True, parallel=True, nogil=True)
def _blocked_kernel(raw, kind, batch, members, classes, temps, t_index, has_index, chunk,
                    out_class, out_conf, out_margin, out_total, out_expected, out_mi, out_vote,
                    out_valid):
    """All rows, in blocks of BLOCK_ROWS rows; each parallel iteration takes ``chunk`` blocks.
    (numba_specialise.py generates the same driver around class-unrolled steps.)"""
    nblocks = (batch + BLOCK_ROWS - 1) // BLOCK_ROWS
    for c in prange((nblocks + chunk - 1) // chunk):
        x, conv, pbar, arg, fv, iv, tail_valid = _block_scratch(members, classes)
        for blk in range(c * chunk, min((c + 1) * chunk, nblocks)):
            row0 = blk * BLOCK_ROWS
            nrows = min(BLOCK_ROWS, batch - row0)
            shifted = _block_prepare(raw, kind, row0, nrows, members, classes, temps, t_index,
                                     has_index, x, conv, arg, pbar, fv, iv)
            for m in range(members):
                _block_member(x, arg, m, shifted, members, classes, pbar, fv, iv)
            _block_top_entropy(pbar, classes, fv, iv)
            _block_store(arg, members, fv, iv, tail_valid, row0, nrows, out_class, out_conf,
                         out_margin, out_total, out_expected, out_mi, out_vote, out_valid)


# ---------------------------------------------------------------------------------------------
# Row-wise kernel (many classes)
# ---------------------------------------------------------------------------------------------

@njit(fastmath=_FLAGS, error_model="numpy", cache=True)
def _load_row(raw, kind, row, members, classes, z, arg):
    """Row ``row`` of the logits as float32 into ``z`` [member*class]; returns True when the row
    holds a non-finite logit (``z`` is then unspecified). Float64 rows are shifted by the member
    max in float64 (stored argmax in ``arg``); other dtypes are widened exactly."""
    width = members * classes
    off = row * width
    end = off + width
    if kind == KIND_F32:
        src = raw.view(np.int32)[off:end]
        flag = i32(0)
        for j in range(width):
            bits = i32(src[j])
            flag |= i32((bits & _F32_EXP) == _F32_EXP)
            z[j] = bits_f32(bits)
        return flag != 0
    if kind == KIND_BF16:
        src16 = raw.view(np.uint16)[off:end]
        flag = i32(0)
        for j in range(width):
            h = i32(src16[j])
            flag |= i32((h & _BF16_EXP) == _BF16_EXP)
            z[j] = bf16_to_f32(h)
        return flag != 0
    if kind == KIND_F16:
        src16 = raw.view(np.uint16)[off:end]
        flag = i32(0)
        for j in range(width):
            h = i32(src16[j])
            flag |= i32((h & _F16_EXP) == _F16_EXP)
            z[j] = f16_to_f32(h)
        return flag != 0
    src64 = raw.view(np.float64)[off:end]
    bits64 = raw.view(np.int64)[off:end]
    flag = i32(0)
    for j in range(width):
        flag |= i32((bits64[j] & _F64_EXP) == _F64_EXP)
    if flag != 0:
        return True
    for m in range(members):
        seg = src64[m * classes:(m + 1) * classes]
        top = _max(seg)
        arg[m] = _first_equal(seg, top)
        zm = z[m * classes:(m + 1) * classes]
        for c in range(classes):
            zm[c] = f32(seg[c] - top)
    return False


# The reductions take 1-D views and index them from 0 (see the note on wraparound above); maxima
# go through ``fmax`` (LLVM's maxnum) and the first-index search is an integer min, so that LLVM
# turns each loop into a vector reduction.

@njit(fastmath=_REDUCE_FLAGS, error_model="numpy", cache=True)
def _max(a):
    """Largest element of a finite 1-D array."""
    top = a[0]
    for k in range(1, a.size):
        top = fmax(top, a[k])
    return top


@njit(fastmath=_REDUCE_FLAGS, error_model="numpy", cache=True)
def _first_equal(a, value):
    """Lowest k with a[k] == value (a.size if none)."""
    n = a.size
    first = n
    for k in range(n):
        cand = k if a[k] == value else n
        first = cand if cand < first else first
    return first


@njit(fastmath=_REDUCE_FLAGS, error_model="numpy", cache=True)
def _max_except(a, skip):
    """Largest element of a finite 1-D array other than a[skip]."""
    top = _NEG_BIG
    for k in range(a.size):
        top = fmax(top, a[k] if k != skip else _NEG_BIG)
    return top


# exp and log are computed in loops compiled with _FLAGS and only summed under _REDUCE_FLAGS: the
# helpers are inlined into their caller and take its flags, and under "reassoc" LLVM folds the
# Cody-Waite split of exp (measured: 4.5 ulp instead of 1).

@njit(fastmath=_FLAGS, error_model="numpy", cache=True)
def _member_exp(z, top, inv_t, e, d):
    """d[k] = max((z[k] - top)/T, D_FLOOR) and e[k] = exp(d[k])."""
    for k in range(z.size):
        dk = (z[k] - top) * inv_t
        dk = dk if dk > D_FLOOR else D_FLOOR
        d[k] = dk
        e[k] = exp_softmax(dk)


@njit(fastmath=_REDUCE_FLAGS, error_model="numpy", cache=True)
def _sums(e, d):
    """(sum e, sum e*d) in float64."""
    s = 0.0
    sd = 0.0
    for k in range(e.size):
        s += np.float64(e[k])
        sd += np.float64(e[k] * d[k])
    return s, sd


@njit(fastmath=_REDUCE_FLAGS, error_model="numpy", cache=True)
def _accumulate(pbar, e, w):
    for k in range(pbar.size):
        pbar[k] += e[k] * w


@njit(fastmath=_FLAGS, error_model="numpy", cache=True)
def _p_log_p(p, out):
    """out[k] = p[k] log p[k] for float32 p >= e^-70/(C*M) (normal numbers, see D_FLOOR)."""
    for k in range(p.size):
        mant, ex = split_exponent(p[k])
        out[k] = p[k] * log_parts(mant, f32(ex))


@njit(fastmath=_REDUCE_FLAGS, error_model="numpy", cache=True)
def _sum64(a):
    """sum a in float64."""
    h = 0.0
    for k in range(a.size):
        h += np.float64(a[k])
    return h


@njit(fastmath=_FLAGS, error_model="numpy", cache=True, parallel=True, nogil=True)
def _rowwise_kernel(raw, kind, batch, members, classes, temps, t_index, has_index, chunk,
                    out_class, out_conf, out_margin, out_total, out_expected, out_mi, out_vote,
                    out_valid):
    """All rows one at a time; each parallel iteration takes ``chunk`` rows."""
    inv_members = 1.0 / members
    for c in prange((batch + chunk - 1) // chunk):
        r0 = c * chunk
        r1 = min(r0 + chunk, batch)
        z = np.empty(members * classes, np.float32)
        e = np.empty(classes, np.float32)
        d = np.empty(classes, np.float32)
        pbar = np.empty(classes, np.float32)
        arg = np.empty(members, np.int32)
        for row in range(r0, r1):
            invalid = _load_row(raw, kind, row, members, classes, z, arg)
            if invalid:
                out_class[row] = -1
                out_conf[row] = _NAN
                out_margin[row] = _NAN
                out_total[row] = _NAN
                out_expected[row] = _NAN
                out_mi[row] = _NAN
                out_vote[row] = _NAN
                out_valid[row] = False
                continue
            t = temps[t_index[row]] if has_index else temps[0]
            inv_t = _inverse_temperature(t)
            pbar[:] = _ZERO
            log_sum = 0.0
            h_sum = 0.0
            for m in range(members):
                zm = z[m * classes:(m + 1) * classes]
                if kind == KIND_F64:
                    top = _ZERO
                else:
                    top = _max(zm)
                    arg[m] = _first_equal(zm, top)
                _member_exp(zm, top, inv_t, e, d)
                s, sd = _sums(e, d)
                log_sum += np.log(s)
                h_sum += sd / s
                _accumulate(pbar, e, f32(inv_members / s))
            best_p = _max(pbar)
            best = _first_equal(pbar, best_p)
            second = _max_except(pbar, best)
            _p_log_p(pbar, d)
            total = -_sum64(d)
            # One member: expected entropy = total entropy and no disagreement, exactly.
            expected = total if members == 1 else (log_sum - h_sum) * inv_members
            votes = 0
            for m in range(members):
                votes += arg[m] == best
            mi = total - expected
            out_class[row] = best
            out_conf[row] = best_p
            out_margin[row] = best_p - second
            out_total[row] = f32(total)
            out_expected[row] = f32(expected)
            out_mi[row] = f32(mi) if mi > 0.0 else _ZERO
            out_vote[row] = f32(votes * inv_members)
            out_valid[row] = True


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------

def _raw_bytes(logits: torch.Tensor) -> np.ndarray:
    """The logits' buffer as a read-only uint8 numpy view (no copy), for every supported dtype."""
    t = logits.detach()
    if t.dtype in (torch.float16, torch.bfloat16):
        t = t.view(torch.int16)
    raw = t.reshape(-1).numpy().view(np.uint8)
    raw.flags.writeable = False  # one numba type whatever the caller's array flags
    return raw


def compile_now(kernel, classes: int) -> None:
    """Compile ``kernel`` (a blocked or specialised driver) for the argument types every call
    uses, by running it on one row of one member."""
    raw = np.zeros(classes, np.float32).view(np.uint8)
    raw.flags.writeable = False
    outs = [np.empty(1, np.int32)] + [np.empty(1, np.float32) for _ in range(6)] + [np.empty(1, np.bool_)]
    kernel(raw, KIND_F32, 1, 1, classes, np.ones(1, np.float32), np.zeros(1, np.int32), False, 1, *outs)


def use_blocked(members: int, classes: int) -> bool:
    """True when the blocked kernel serves the shape (few classes, scratch within L2)."""
    return classes <= BLOCKED_MAX_CLASSES and members * classes <= BLOCKED_MAX_ENTRIES


# A kernel unrolled for the class count (numba_specialise.py) is 1.3-1.5x faster than the generic
# blocked one but costs about 10 s of compilation the first time on a machine (0.5 s from the disk
# cache after that). It is made on the first batch of at least this many rows (a throughput job is
# running) and then serves every batch of that class count; precompile() makes it at start-up.
SPECIALISE_MIN_ROWS = 100_000
SPECIALISE_ENV = "HITL_TRIAGE_NUMBA_SPECIALISE"


def _specialisation_enabled() -> bool:
    return os.environ.get(SPECIALISE_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def _pick_kernel(kernel: str | None, batch: int, members: int, classes: int):
    """(name, compiled kernel) for a call; ``kernel`` as the user asked or None for automatic."""
    from . import numba_specialise

    if kernel is None:
        if not use_blocked(members, classes):
            return "rowwise", _rowwise_kernel
        if classes <= numba_specialise.SPECIALISE_MAX_CLASSES and _specialisation_enabled():
            special = numba_specialise.loaded_kernel(classes)
            if special is None and batch >= SPECIALISE_MIN_ROWS:
                special = numba_specialise.specialised_kernel(classes)
            if special is not None:
                return "specialised", special
        return "blocked", _blocked_kernel
    if kernel == "blocked":
        return kernel, _blocked_kernel
    if kernel == "rowwise":
        return kernel, _rowwise_kernel
    if kernel == "specialised":
        special = numba_specialise.specialised_kernel(classes)
        if special is None:
            raise ValueError(
                f"kernel: 'specialised' needs 2 <= C <= {numba_specialise.SPECIALISE_MAX_CLASSES} and a "
                f"writable cache directory ({numba_specialise.cache_dir()}), found C={classes}"
            )
        return kernel, special
    raise ValueError(f"kernel: expected 'blocked', 'rowwise' or 'specialised', found {kernel!r}")


def precompile(members: int, classes: int) -> list[str]:
    """Compile (or load from the disk caches) the kernels that serve [B, members, classes] logits,
    small batches and large, so that no request pays for it (any dtype: the kernels take the
    logits as raw bytes). Returns the kernels' names."""
    z = torch.zeros((1, members, classes), dtype=torch.float32)
    names = []
    for batch in (1, SPECIALISE_MIN_ROWS):
        name, _ = _pick_kernel(None, batch, members, classes)
        if name not in names:
            ensemble_signals_numba(z, torch.ones(1), None, kernel=name)
            names.append(name)
    return names


# Below this many logits per thread (about 2 ms of work) a second thread is not worth its risk: the
# OpenMP team ends on a barrier that waits for every thread to check in, and on a shared 2-core
# machine a worker can wait a whole scheduler slice (measured 8-16 ms under load) to be woken.
MIN_LOGITS_PER_THREAD = 1 << 20
# Work is handed out in about this many pieces per thread, each at least MIN_LOGITS_PER_PIECE
# logits, dynamically: on a shared machine one thread may stall for a scheduler slice, and the
# others then take its share instead of waiting for it at the barrier.
PIECES_PER_THREAD = 8
MIN_LOGITS_PER_PIECE = 1 << 14


def thread_count(batch: int, members: int, classes: int, requested: int | None) -> int:
    """Threads for a call: ``requested`` as given, else numba's current count limited so that
    each thread gets at least MIN_LOGITS_PER_THREAD logits."""
    if requested is not None:
        if isinstance(requested, bool) or not isinstance(requested, (int, np.integer)) or requested < 1:
            raise ValueError(f"num_threads: expected a positive integer, found {requested!r}")
        return int(requested)
    useful = max(1, batch * members * classes // MIN_LOGITS_PER_THREAD)
    return max(1, min(numba.get_num_threads(), useful))


def piece_size(units: int, logits_per_unit: int, threads: int) -> int:
    """Units (blocks or rows) per parallel iteration: the whole range on one thread, else about
    PIECES_PER_THREAD pieces per thread of at least MIN_LOGITS_PER_PIECE logits."""
    if threads <= 1:
        return max(1, units)
    smallest = -(-MIN_LOGITS_PER_PIECE // logits_per_unit)
    return max(1, smallest, -(-units // (threads * PIECES_PER_THREAD)))


def ensemble_signals_numba(logits: torch.Tensor, temperatures: torch.Tensor,
                           temperature_index: torch.Tensor | None, *, num_threads: int | None = None,
                           kernel: str | None = None):
    """Ensemble signals on the CPU with numba (see :func:`hitl_triage.kernels.ensemble_signals`).

    Args:
        logits: C-contiguous CPU tensor [B, M, C] (B >= 1, M >= 1, C >= 2), float16, bfloat16,
            float32 or float64; read in place, never copied.
        temperatures: float32 CPU tensor [K] of positive finite temperatures.
        temperature_index: int32 CPU tensor [B] of values in [0, K), or None when K == 1.
        num_threads: threads to run on, at most numba's pool size (default: numba's thread
            count, fewer for small batches, see :func:`thread_count`). Results do not depend on
            it, nor on how the rows are split between threads.
        kernel: "blocked", "rowwise" or "specialised" (blocked, unrolled for C) to force a kernel;
            default by shape and batch size (see :func:`_pick_kernel`).

    Returns:
        ``EnsembleSignals`` of CPU tensors [B]: predicted_class int32, float signals float32,
        valid bool.
    """
    from . import EnsembleSignals

    if logits.device.type != "cpu":
        raise ValueError(f"logits: expected a CPU tensor, found device {logits.device}")
    if logits.dtype not in _KINDS:
        raise TypeError(f"logits: expected float16, bfloat16, float32 or float64, found {logits.dtype}")
    if logits.ndim != 3 or not logits.is_contiguous():
        raise ValueError(
            f"logits: expected a C-contiguous [B, M, C] tensor, found shape {tuple(logits.shape)} "
            f"with strides {logits.stride()}"
        )
    batch, members, classes = logits.shape
    temps = temperatures.detach().to("cpu", torch.float32).contiguous().reshape(-1).numpy()
    if temps.shape[0] == 0:
        raise ValueError("temperatures: expected at least one temperature, found an empty table")
    if temperature_index is None:
        if temps.shape[0] != 1:
            raise ValueError(f"temperature_index: required with {temps.shape[0]} temperatures, found None")
        index = np.zeros(1, np.int32)
        has_index = False
    else:
        index = temperature_index.detach().to("cpu", torch.int32).contiguous().numpy()
        if index.shape != (batch,):
            raise ValueError(f"temperature_index: expected shape ({batch},), found {index.shape}")
        # The kernels index without bounds checks: an out-of-range value must never reach them.
        if batch and (int(index.min()) < 0 or int(index.max()) >= temps.shape[0]):
            raise ValueError(
                f"temperature_index: expected values in [0, {temps.shape[0]}), "
                f"found range [{int(index.min())}, {int(index.max())}]"
            )
        has_index = True
    threads = thread_count(batch, members, classes, num_threads)
    kernel, impl = _pick_kernel(kernel, batch, members, classes)

    out_class = np.empty(batch, np.int32)
    floats = [np.empty(batch, np.float32) for _ in range(6)]
    out_valid = np.empty(batch, np.bool_)
    if batch:
        if kernel == "rowwise":
            chunk = piece_size(batch, members * classes, threads)
        else:
            chunk = piece_size(-(-batch // BLOCK_ROWS), BLOCK_ROWS * members * classes, threads)
        # numba's thread count and chunk size are per calling thread: set for this call only.
        # Fewer pool threads (not only fewer pieces) keep idle threads out of the launch barrier;
        # a chunk size of 1 hands the pieces out one at a time (dynamic scheduling).
        previous = numba.get_num_threads()
        wanted = min(threads, numba.config.NUMBA_NUM_THREADS)  # type: ignore[attr-defined]  # numba.config sets its options at import
        if wanted != previous:
            numba.set_num_threads(wanted)
        previous_chunksize = numba.set_parallel_chunksize(1 if threads > 1 else 0)
        try:
            impl(_raw_bytes(logits), _KINDS[logits.dtype], batch, members, classes, temps, index,
                 has_index, chunk, out_class, *floats, out_valid)
        finally:
            numba.set_parallel_chunksize(previous_chunksize)
            if wanted != previous:
                numba.set_num_threads(previous)
    conf, margin, total, expected, mi, vote = (torch.from_numpy(a) for a in floats)
    return EnsembleSignals(
        predicted_class=torch.from_numpy(out_class), confidence=conf, margin=margin,
        total_entropy=total, expected_entropy=expected, mutual_info=mi, vote_agreement=vote,
        valid=torch.from_numpy(out_valid),
    )
