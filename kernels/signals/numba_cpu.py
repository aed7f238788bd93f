"""The numba CPU backend of the ensemble-signal pass (the CPU hot path).

Entry point: :func:`ensemble_signals_numba` (registered as backend "numba"). The spec is
:mod:`hitl_triage.kernels.signals.reference`; this computes the same signals in float32.

Two kernels, each compiled once for every input dtype (the logits travel as raw bytes with a dtype
code, so there is one machine-code version per kernel, not one per dtype):

- ``_blocked_kernel`` for few classes (C <= ``BLOCKED_MAX_CLASSES``): with C = 10 and M = 5 a loop
  over classes is too short for SIMD, so blocks of ``BLOCK_ROWS`` rows are transposed into a
  float32 scratch laid out [member*class, row] and every step runs across the rows of the block,
  8 rows per AVX2 register. Every block is computed at full width (the last one padded), so a row's
  result never depends on its neighbours, its position or the thread count.
- ``_rowwise_kernel`` for many classes: one row at a time, loops over classes (long enough to
  vectorise), sums in float64 so that C = 32768 keeps float32-level accuracy.

Both are parallel over contiguous chunks of rows (``prange``), one chunk per thread; the thread
count is an argument (calling ``numba.get_num_threads()`` inside a kernel prevents caching).

Numerics, the same in both kernels:
- Member argmax (for vote agreement) on the raw logits, lowest index on ties; the mean-probability
  argmax likewise.
- Softmax with the member max subtracted; float64 inputs are shifted in float64 before narrowing,
  so any finite logits work, 1e300 included. d = (z - max)/T is clamped at ``D_FLOOR`` = -70: the
  probabilities lost are below e^-70 = 4e-31 of the largest, far under float32 resolution, and no
  product or quotient downstream ever meets a denormal (denormal arithmetic is ~100x slower on x86).
- Entropy of a member H_m = log s_m - sum_c p_mc d_mc (s_m the softmax denominator), and
  sum_m log s_m is taken as one log of the product of the s_m kept as mantissa and exponent: one
  log per row for the expected entropy, plus C logs for the entropy of the mean.
- Finiteness is tested on each logit's exponent bits as integers (an optimiser allowed to assume
  no NaN deletes float ``isfinite`` checks); non-finite logits are replaced by 0 on load, so an
  invalid row computes harmlessly and is then written as -1 / NaN.
"""

from __future__ import annotations

import logging

import numba
import numpy as np
import torch
from numba import njit, prange

from .numba_math import bf16_to_f32, bits_f32, exp32, f16_to_f32, f32_bits, log_parts, split_exponent

logger = logging.getLogger(__name__)

# Input dtype codes (the logits reach the kernels as raw bytes).
KIND_F32, KIND_F64, KIND_F16, KIND_BF16 = 0, 1, 2, 3
_KINDS = {torch.float32: KIND_F32, torch.float64: KIND_F64, torch.float16: KIND_F16, torch.bfloat16: KIND_BF16}

# Rows per block of the blocked kernel: a compile-time constant, so the row loops have a known trip
# count (no scalar remainder, identical arithmetic in every lane).
BLOCK_ROWS = 64
# Above this many classes the class loops are long enough to vectorise, and the row-wise kernel wins.
BLOCKED_MAX_CLASSES = 64
# ...and above this many [member*class] entries the blocked scratch (BLOCK_ROWS rows) leaves L2.
BLOCKED_MAX_ENTRIES = 2048

# Flags of the kernels: FMA contraction only. No "reassoc" (exp/log range reduction), no
# "nnan"/"ninf" (they would delete the NaN outputs of invalid rows).
_FLAGS = {"contract"}
# Reductions over the classes of one row in the row-wise kernel: the row is finite (checked on the
# bits, non-finite rows never get here), so every fast-math assumption holds and LLVM may reorder
# the sums and maxima into vector lanes.
_REDUCE_FLAGS = {"contract", "reassoc", "nsz", "nnan", "ninf", "arcp"}

f32 = np.float32
i32 = np.int32
D_FLOOR = f32(-70.0)
_NAN = f32(np.nan)
_ZERO = f32(0.0)
_ONE = f32(1.0)
_LN2 = f32(0.6931471805599453)
_NEG_BIG = f32(-3.0e38)
_F32_EXP = i32(0x7F800000)
_F16_EXP = 0x7C00
_BF16_EXP = 0x7F80
_F64_EXP = np.int64(0x7FF0000000000000)


# ---------------------------------------------------------------------------------------------
# Blocked kernel (few classes)
# ---------------------------------------------------------------------------------------------

@njit(fastmath=_FLAGS, cache=True)
def _load_block(raw, kind, row0, nrows, members, classes, x, arg, bad):
    """Transpose rows [row0, row0 + nrows) of the logits into ``x`` [member*class, BLOCK_ROWS]
    as float32, zero-padding the rest of the block; flag rows with a non-finite logit in ``bad``.

    For float64 input the member max is subtracted in float64 and the member argmax is stored in
    ``arg`` [member, BLOCK_ROWS]; returns True in that case (``x`` is then already shifted)."""
    width = members * classes
    R = BLOCK_ROWS
    if kind == KIND_F32:
        src = raw.view(np.int32)
        for r in range(nrows):
            off = (row0 + r) * width
            flag = i32(0)
            for j in range(width):
                bits = i32(src[off + j])
                nonfinite = (bits & _F32_EXP) == _F32_EXP
                flag |= i32(nonfinite)
                x[j * R + r] = _ZERO if nonfinite else bits_f32(bits)
            bad[r] = flag
    elif kind == KIND_BF16:
        src = raw.view(np.uint16)
        for r in range(nrows):
            off = (row0 + r) * width
            flag = i32(0)
            for j in range(width):
                h = i32(src[off + j])
                nonfinite = (h & _BF16_EXP) == _BF16_EXP
                flag |= i32(nonfinite)
                x[j * R + r] = _ZERO if nonfinite else bf16_to_f32(h)
            bad[r] = flag
    elif kind == KIND_F16:
        src = raw.view(np.uint16)
        for r in range(nrows):
            off = (row0 + r) * width
            flag = i32(0)
            for j in range(width):
                h = i32(src[off + j])
                nonfinite = (h & _F16_EXP) == _F16_EXP
                flag |= i32(nonfinite)
                x[j * R + r] = _ZERO if nonfinite else f16_to_f32(h)
            bad[r] = flag
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
                arg[m * R + r] = best
                for c in range(classes):
                    v = src[base + c] - top if flag == 0 else 0.0
                    x[(m * classes + c) * R + r] = f32(v)
    for r in range(nrows, R):
        bad[r] = 0
        for j in range(width):
            x[j * R + r] = _ZERO
        for m in range(members):
            arg[m * R + r] = 0
    return kind == KIND_F64


@njit(fastmath=_FLAGS, cache=True)
def _block_signals(x, arg, shifted, inv_t, members, classes, pbar, top, best, s, sd, lp_m, lp_e,
                   h_sum, tmp):
    """Signals of one full block: reads ``x`` (overwritten with exp values) and ``arg``; leaves
    the mean probabilities in ``pbar`` [class, BLOCK_ROWS] and per-row partial results in the
    [BLOCK_ROWS] arrays: ``lp_m``/``lp_e`` the product of the softmax denominators as mantissa and
    exponent, ``h_sum`` sum_m sum_c p_mc d_mc."""
    R = BLOCK_ROWS
    w_mean = _ONE / f32(members)
    for k in range(classes * R):
        pbar[k] = _ZERO
    for r in range(R):
        lp_m[r] = _ONE
        lp_e[r] = 0
        h_sum[r] = _ZERO
    for m in range(members):
        base = m * classes * R
        if shifted:
            for r in range(R):
                top[r] = _ZERO
        else:
            # Member max and first argmax on the raw logits, across the rows of the block.
            for r in range(R):
                top[r] = x[base + r]
                best[r] = 0
            for c in range(1, classes):
                row = base + c * R
                for r in range(R):
                    v = x[row + r]
                    gt = v > top[r]
                    top[r] = v if gt else top[r]
                    best[r] = i32(c) if gt else best[r]
            for r in range(R):
                arg[m * R + r] = best[r]
        for r in range(R):
            s[r] = _ZERO
            sd[r] = _ZERO
        for c in range(classes):
            row = base + c * R
            for r in range(R):
                d = (x[row + r] - top[r]) * inv_t[r]
                d = d if d > D_FLOOR else D_FLOOR
                e = exp32(d)
                x[row + r] = e
                s[r] += e
                sd[r] += e * d
        for r in range(R):
            inv_s = _ONE / s[r]
            h_sum[r] += sd[r] * inv_s
            tmp[r] = inv_s * w_mean
            # Running product of the denominators, renormalised to [1, 2) so it never overflows.
            mant, ex = split_exponent(lp_m[r] * s[r])
            lp_m[r] = mant
            lp_e[r] += ex
        for c in range(classes):
            row = base + c * R
            prow = c * R
            for r in range(R):
                pbar[prow + r] += x[row + r] * tmp[r]


@njit(fastmath=_FLAGS, cache=True)
def _block_finish(pbar, arg, bad, members, classes, row0, nrows, lp_m, lp_e, h_sum, top, top2,
                  best, ent, out_class, out_conf, out_margin, out_total, out_expected, out_mi,
                  out_vote, out_valid):
    """Top-1/top-2/argmax and entropy of the mean probabilities, then the outputs of the block."""
    R = BLOCK_ROWS
    for r in range(R):
        top[r] = pbar[r]
        top2[r] = _NEG_BIG
        best[r] = 0
        ent[r] = _ZERO
    for c in range(1, classes):
        prow = c * R
        for r in range(R):
            v = pbar[prow + r]
            gt = v > top[r]
            # The second largest is the larger of the old second and min(v, old first): ties with
            # the first give a zero margin, as top-k does.
            lo = v if v < top[r] else top[r]
            top2[r] = lo if lo > top2[r] else top2[r]
            top[r] = v if gt else top[r]
            best[r] = i32(c) if gt else best[r]
    for c in range(classes):
        prow = c * R
        for r in range(R):
            p = pbar[prow + r]
            # p >= e^-70 / (C*M) is a normal float32 (D_FLOOR), so split_exponent applies.
            mant, ex = split_exponent(p)
            ent[r] -= p * log_parts(mant, f32(ex))
    inv_members = _ONE / f32(members)
    for r in range(nrows):
        votes = 0
        for m in range(members):
            votes += arg[m * R + r] == best[r]
        total = ent[r]
        expected = (log_parts(lp_m[r], f32(lp_e[r])) - h_sum[r]) * inv_members
        mi = total - expected
        mi = mi if mi > _ZERO else _ZERO
        ok = bad[r] == 0
        i = row0 + r
        out_class[i] = best[r] if ok else i32(-1)
        out_conf[i] = top[r] if ok else _NAN
        out_margin[i] = top[r] - top2[r] if ok else _NAN
        out_total[i] = total if ok else _NAN
        out_expected[i] = expected if ok else _NAN
        out_mi[i] = mi if ok else _NAN
        out_vote[i] = f32(votes) * inv_members if ok else _NAN
        out_valid[i] = ok


@njit(fastmath=_FLAGS, cache=True, parallel=True)
def _blocked_kernel(raw, kind, batch, members, classes, temps, t_index, has_index, num_threads,
                    out_class, out_conf, out_margin, out_total, out_expected, out_mi, out_vote,
                    out_valid):
    """All rows, blocks of BLOCK_ROWS rows, ``num_threads`` contiguous chunks of blocks."""
    R = BLOCK_ROWS
    nblocks = (batch + R - 1) // R
    nchunks = min(num_threads, nblocks)
    for chunk in prange(nchunks):
        b0 = chunk * nblocks // nchunks
        b1 = (chunk + 1) * nblocks // nchunks
        x = np.empty(members * classes * R, np.float32)
        pbar = np.empty(classes * R, np.float32)
        arg = np.empty(members * R, np.int32)
        bad = np.empty(R, np.int32)
        inv_t = np.empty(R, np.float32)
        top = np.empty(R, np.float32)
        top2 = np.empty(R, np.float32)
        best = np.empty(R, np.int32)
        s = np.empty(R, np.float32)
        sd = np.empty(R, np.float32)
        lp_m = np.empty(R, np.float32)
        lp_e = np.empty(R, np.int32)
        h_sum = np.empty(R, np.float32)
        tmp = np.empty(R, np.float32)
        for blk in range(b0, b1):
            row0 = blk * R
            nrows = min(R, batch - row0)
            shifted = _load_block(raw, kind, row0, nrows, members, classes, x, arg, bad)
            for r in range(R):
                t = temps[0]
                if has_index and r < nrows:
                    t = temps[t_index[row0 + r]]
                inv_t[r] = _ONE / t
            _block_signals(x, arg, shifted, inv_t, members, classes, pbar, top, best, s, sd,
                           lp_m, lp_e, h_sum, tmp)
            _block_finish(pbar, arg, bad, members, classes, row0, nrows, lp_m, lp_e, h_sum, top,
                          top2, best, tmp, out_class, out_conf, out_margin, out_total,
                          out_expected, out_mi, out_vote, out_valid)


# ---------------------------------------------------------------------------------------------
# Row-wise kernel (many classes)
# ---------------------------------------------------------------------------------------------

@njit(fastmath=_FLAGS, cache=True)
def _load_row(raw, kind, row, members, classes, z, arg):
    """Row ``row`` of the logits as float32 into ``z`` [member*class]; returns True when the row
    holds a non-finite logit (``z`` is then unspecified). Float64 rows are shifted by the member
    max in float64 (stored argmax in ``arg``); other dtypes are widened exactly."""
    width = members * classes
    off = row * width
    if kind == KIND_F32:
        src = raw.view(np.int32)
        flag = i32(0)
        for j in range(width):
            bits = i32(src[off + j])
            flag |= i32((bits & _F32_EXP) == _F32_EXP)
            z[j] = bits_f32(bits)
        return flag != 0
    if kind == KIND_BF16:
        src = raw.view(np.uint16)
        flag = i32(0)
        for j in range(width):
            h = i32(src[off + j])
            flag |= i32((h & _BF16_EXP) == _BF16_EXP)
            z[j] = bf16_to_f32(h)
        return flag != 0
    if kind == KIND_F16:
        src = raw.view(np.uint16)
        flag = i32(0)
        for j in range(width):
            h = i32(src[off + j])
            flag |= i32((h & _F16_EXP) == _F16_EXP)
            z[j] = f16_to_f32(h)
        return flag != 0
    src = raw.view(np.float64)
    bits = raw.view(np.int64)
    flag = i32(0)
    for j in range(width):
        flag |= i32((bits[off + j] & _F64_EXP) == _F64_EXP)
    if flag != 0:
        return True
    for m in range(members):
        base = off + m * classes
        top = _max64(src, base, classes)
        arg[m] = _first_equal64(src, base, classes, top)
        for c in range(classes):
            z[m * classes + c] = f32(src[base + c] - top)
    return False


@njit(fastmath=_REDUCE_FLAGS, cache=True)
def _max64(a, start, n):
    top = a[start]
    for k in range(start + 1, start + n):
        top = a[k] if a[k] > top else top
    return top


@njit(fastmath=_REDUCE_FLAGS, cache=True)
def _first_equal64(a, start, n, value):
    first = n
    for k in range(n):
        first = k if (a[start + k] == value and k < first) else first
    return first


@njit(fastmath=_REDUCE_FLAGS, cache=True)
def _max32(a, start, n):
    top = a[start]
    for k in range(start + 1, start + n):
        top = a[k] if a[k] > top else top
    return top


@njit(fastmath=_REDUCE_FLAGS, cache=True)
def _first_equal32(a, start, n, value):
    """Lowest k with a[start + k] == value (n if none): a min-reduction, so it vectorises."""
    first = n
    for k in range(n):
        first = k if (a[start + k] == value and k < first) else first
    return first


@njit(fastmath=_REDUCE_FLAGS, cache=True)
def _max32_except(a, n, skip):
    top = _NEG_BIG
    for k in range(n):
        v = a[k] if k != skip else _NEG_BIG
        top = v if v > top else top
    return top


@njit(fastmath=_REDUCE_FLAGS, cache=True)
def _member_exp(z, start, n, top, inv_t, e):
    """e[k] = exp(max((z[start+k] - top)/T, D_FLOOR)); returns (sum e, sum e*d) in float64."""
    s = 0.0
    sd = 0.0
    for k in range(n):
        d = (z[start + k] - top) * inv_t
        d = d if d > D_FLOOR else D_FLOOR
        v = exp32(d)
        e[k] = v
        s += np.float64(v)
        sd += np.float64(v * d)
    return s, sd


@njit(fastmath=_REDUCE_FLAGS, cache=True)
def _accumulate(pbar, e, n, w):
    for k in range(n):
        pbar[k] += e[k] * w


@njit(fastmath=_REDUCE_FLAGS, cache=True)
def _entropy(p, n):
    """-sum p log p in float64 for float32 p >= e^-70/(C*M) (normal numbers, see D_FLOOR)."""
    h = 0.0
    for k in range(n):
        mant, ex = split_exponent(p[k])
        h -= np.float64(p[k] * log_parts(mant, f32(ex)))
    return h


@njit(fastmath=_FLAGS, cache=True, parallel=True)
def _rowwise_kernel(raw, kind, batch, members, classes, temps, t_index, has_index, num_threads,
                    out_class, out_conf, out_margin, out_total, out_expected, out_mi, out_vote,
                    out_valid):
    """All rows one at a time, ``num_threads`` contiguous chunks of rows."""
    nchunks = min(num_threads, batch)
    inv_members = 1.0 / members
    for chunk in prange(nchunks):
        r0 = chunk * batch // nchunks
        r1 = (chunk + 1) * batch // nchunks
        z = np.empty(members * classes, np.float32)
        e = np.empty(classes, np.float32)
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
            inv_t = _ONE / t
            pbar[:] = _ZERO
            log_sum = 0.0
            h_sum = 0.0
            for m in range(members):
                start = m * classes
                if kind == KIND_F64:
                    top = _ZERO
                else:
                    top = _max32(z, start, classes)
                    arg[m] = _first_equal32(z, start, classes, top)
                s, sd = _member_exp(z, start, classes, top, inv_t, e)
                log_sum += np.log(s)
                h_sum += sd / s
                _accumulate(pbar, e, classes, f32(inv_members / s))
            best_p = _max32(pbar, 0, classes)
            best = _first_equal32(pbar, 0, classes, best_p)
            second = _max32_except(pbar, classes, best)
            total = _entropy(pbar, classes)
            expected = (log_sum - h_sum) * inv_members
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


def use_blocked(members: int, classes: int) -> bool:
    """True when the blocked kernel serves the shape (few classes, scratch within L2)."""
    return classes <= BLOCKED_MAX_CLASSES and members * classes <= BLOCKED_MAX_ENTRIES


def ensemble_signals_numba(logits: torch.Tensor, temperatures: torch.Tensor,
                           temperature_index: torch.Tensor | None, *, num_threads: int | None = None,
                           kernel: str | None = None):
    """Ensemble signals on the CPU with numba (see :func:`hitl_triage.kernels.ensemble_signals`).

    Args:
        logits: C-contiguous CPU tensor [B, M, C] (B >= 1, M >= 1, C >= 2), float16, bfloat16,
            float32 or float64; read in place, never copied.
        temperatures: float32 CPU tensor [K] of positive finite temperatures.
        temperature_index: int32 CPU tensor [B] of values in [0, K), or None when K == 1.
        num_threads: threads to use (default ``numba.get_num_threads()``).
        kernel: "blocked" or "rowwise" to force a kernel (tests); default by shape.

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
    temps = temperatures.detach().to("cpu", torch.float32).contiguous().numpy()
    if temperature_index is None:
        if temps.shape[0] != 1:
            raise ValueError(f"temperature_index: required with {temps.shape[0]} temperatures, found None")
        index = np.zeros(1, np.int32)
        has_index = False
    else:
        index = temperature_index.detach().to("cpu", torch.int32).contiguous().numpy()
        if index.shape != (batch,):
            raise ValueError(f"temperature_index: expected shape ({batch},), found {index.shape}")
        has_index = True
    if num_threads is None:
        num_threads = numba.get_num_threads()
    if num_threads < 1:
        raise ValueError(f"num_threads: expected a positive count, found {num_threads}")
    if kernel is None:
        kernel = "blocked" if use_blocked(members, classes) else "rowwise"
    if kernel not in ("blocked", "rowwise"):
        raise ValueError(f"kernel: expected 'blocked' or 'rowwise', found {kernel!r}")

    out_class = np.empty(batch, np.int32)
    floats = [np.empty(batch, np.float32) for _ in range(6)]
    out_valid = np.empty(batch, np.bool_)
    if batch:
        impl = _blocked_kernel if kernel == "blocked" else _rowwise_kernel
        impl(_raw_bytes(logits), _KINDS[logits.dtype], batch, members, classes, temps, index,
             has_index, num_threads, out_class, *floats, out_valid)
    conf, margin, total, expected, mi, vote = (torch.from_numpy(a) for a in floats)
    return EnsembleSignals(
        predicted_class=torch.from_numpy(out_class), confidence=conf, margin=margin,
        total_entropy=total, expected_entropy=expected, mutual_info=mi, vote_agreement=vote,
        valid=torch.from_numpy(out_valid),
    )
