"""The numba CPU backend of the calibration pass (float64, multi-threaded over chunks of rows).

Entry point: :data:`KERNELS` (registered as backend "numba"), holding
:func:`nll_derivative_sums_numba` and :func:`row_statistics_numba`. The spec is
:mod:`hitl_triage.kernels.calibration.reference`; the public functions and their argument checks
are in :mod:`hitl_triage.kernels.calibration`, which hands these functions C-contiguous float32 or
float64 logits [N, M, C], int64 labels [N] in [0, C) and float64 inverse temperatures.

Both kernels work on tiles of _TILE rows transposed into a [C, _TILE] float64 scratch, so that the
inner loops run across rows and vectorise (with C = 10 a loop over classes is too short for SIMD),
and use a branch-free polynomial exp that LLVM can vectorise (numba has no vector math library
here; math.exp stays a scalar call, about 3x slower overall). They are compiled lazily on first use,
once per logits dtype, and cached on disk. They release the GIL and run on chunks of rows from a
thread pool; each chunk's partial sums are added in chunk order, so results do not depend on the
thread count.

The bit casts come from :mod:`hitl_triage.kernels._numba_math` (shared with the float32 signal
kernels); the float64 exp below is precision-specific (a degree-13 polynomial, a float64 Cody-Waite
split of ln 2, rounding by the 1.5 * 2**52 trick) and stays here.

Domain: exp is floored at exp(-708) (a normal double), so a softmax term below e^-708 of the row's
largest counts as e^-708 ~ 3e-308; in the derivative sums' moments it carries a factor d or d^2 (d
the shifted logit), which stays far under float64 resolution for logit spreads below ~1e100. Rows
passed to the derivative sums must be finite (the fit removes the others first).
"""

from __future__ import annotations

import logging
import math
from concurrent.futures import ThreadPoolExecutor

import numba
import numpy as np

from .._numba_math import LOG2E, bits_f64, f64_bits
from . import CalibrationKernels

logger = logging.getLogger(__name__)

_TILE = 64
_CHUNK_ROWS = 8192
# Contraction (FMA) and sign-of-zero freedom only: no reassociation, which would undo the rounding
# trick in _exp_nonpositive, no approximate reciprocals, and no finite-math assumption, so the NaN
# checks stay.
_FASTMATH = {"contract", "nsz"}

_ROUND_MAGIC = 6755399441055744.0  # 1.5 * 2**52: adding it rounds a double to an integer
_LOG2E = LOG2E
_LN2_HI = 0.6931471803691238  # ln 2 split in two (Cody-Waite) so that k * _LN2_HI is exact
_LN2_LO = 1.9082149292705877e-10
_EXP_FLOOR = -708.0  # exp(-708) ~ 3e-308, still a normal double


@numba.njit(inline="always", fastmath=_FASTMATH, error_model="numpy", cache=True)
def _exp_nonpositive(x):  # pragma: no cover - compiled
    """exp(x) for x <= 0 to ~5e-16 relative, branch-free; x below -708 gives exp(-708).

    exp(x) = 2^k * exp(r) with k = round(x / ln 2) and |r| <= ln2 / 2; exp(r) by its Taylor
    polynomial of degree 13 (remainder < 2e-16 on that interval); 2^k built in the exponent bits.
    """
    x = max(x, _EXP_FLOOR)
    t = x * _LOG2E + _ROUND_MAGIC
    k = t - _ROUND_MAGIC
    r = x - k * _LN2_HI - k * _LN2_LO
    p = 1.0 / 6227020800.0
    p = p * r + 1.0 / 479001600.0
    p = p * r + 1.0 / 39916800.0
    p = p * r + 1.0 / 3628800.0
    p = p * r + 1.0 / 362880.0
    p = p * r + 1.0 / 40320.0
    p = p * r + 1.0 / 5040.0
    p = p * r + 1.0 / 720.0
    p = p * r + 1.0 / 120.0
    p = p * r + 1.0 / 24.0
    p = p * r + 1.0 / 6.0
    p = p * r + 0.5
    p = p * r + 1.0
    p = p * r + 1.0
    # The low bits of t hold k as an integer: shift k + 1023 into the exponent field of 2^k.
    return p * bits_f64((f64_bits(t) - f64_bits(_ROUND_MAGIC) + 1023) << 52)


@numba.njit(inline="always", fastmath=_FASTMATH, error_model="numpy", cache=True)
def _load_tile(logits, i0, rows, m, shifted, top):  # pragma: no cover - compiled
    """shifted[c, r] = z[i0 + r, m, c] - max_c z[i0 + r, m, :] in float64; top[r] the max."""
    classes = logits.shape[2]
    for r in range(rows):
        for c in range(classes):
            shifted[c, r] = logits[i0 + r, m, c]
    for r in range(rows):
        top[r] = shifted[0, r]
    for c in range(1, classes):
        for r in range(rows):
            top[r] = max(top[r], shifted[c, r])
    for c in range(classes):
        for r in range(rows):
            shifted[c, r] -= top[r]


@numba.njit(inline="always", fastmath=_FASTMATH, error_model="numpy", cache=True)
def _log_mixture(x, s, r, members):  # pragma: no cover - compiled
    """log sum_m exp(x[m, r]) / s[m, r], in log space (every term may underflow)."""
    top = x[0, r] - math.log(s[0, r])
    for m in range(1, members):
        top = max(top, x[m, r] - math.log(s[m, r]))
    total = 0.0
    for m in range(members):
        total += math.exp(x[m, r] - math.log(s[m, r]) - top)
    return top + math.log(total)


@numba.njit(nogil=True, fastmath=_FASTMATH, error_model="numpy", cache=True)
def _nll_derivative_sums(logits, labels, beta, start, stop):  # pragma: no cover - compiled
    """Over rows [start, stop): sums of log S_i, of S'_i / S_i and of (S'_i / S_i)', where
    S_i(beta) = sum_m softmax(beta * z[i, m])[y_i] and ' is d/d beta. Rows must be finite.

    For member m write a_m = softmax(beta z_m)[y], g_m = z_my - E_m[z] and v_m = Var_m[z] under
    softmax(beta z_m). Then a_m' = a_m g_m and g_m' = -v_m, so with weights w_m = a_m / S:
    S'/S = sum_m w_m g_m and (S'/S)' = sum_m w_m (g_m^2 - v_m) - (S'/S)^2.
    """
    members, classes = logits.shape[1], logits.shape[2]
    shifted = np.empty((classes, _TILE))
    top = np.empty(_TILE)
    x = np.empty((members, _TILE))  # beta * (z_my - max_m): log of member m's numerator
    s = np.empty((members, _TILE))  # softmax denominators (>= 1 after the max shift)
    g = np.empty((members, _TILE))
    v = np.empty((members, _TILE))
    sd = np.empty(_TILE)
    sdd = np.empty(_TILE)
    sum_log, sum_r1, sum_dr1 = 0.0, 0.0, 0.0
    for i0 in range(start, stop, _TILE):
        rows = min(_TILE, stop - i0)
        for m in range(members):
            _load_tile(logits, i0, rows, m, shifted, top)
            for r in range(rows):
                s[m, r] = 0.0
                sd[r] = 0.0
                sdd[r] = 0.0
            for c in range(classes):
                for r in range(rows):
                    d = shifted[c, r]
                    e = _exp_nonpositive(beta * d)
                    s[m, r] += e
                    sd[r] += e * d
                    sdd[r] += e * d * d
            for r in range(rows):
                dy = shifted[labels[i0 + r], r]
                mean = sd[r] / s[m, r]
                x[m, r] = beta * dy
                g[m, r] = dy - mean
                v[m, r] = sdd[r] / s[m, r] - mean * mean
        for r in range(rows):
            big = x[0, r]
            for m in range(1, members):
                big = max(big, x[m, r])
            total, r1, r2 = 0.0, 0.0, 0.0
            for m in range(members):
                a = _exp_nonpositive(x[m, r]) / s[m, r]
                total += a
                r1 += a * g[m, r]
                r2 += a * (g[m, r] * g[m, r] - v[m, r])
            r1 /= total
            r2 /= total
            # Far below -600 every a_m is near the exp floor: take the exact log-space path.
            sum_log += math.log(total) if big > -600.0 else _log_mixture(x, s, r, members)
            sum_r1 += r1
            sum_dr1 += r2 - r1 * r1
    return sum_log, sum_r1, sum_dr1


@numba.njit(nogil=True, fastmath=_FASTMATH, error_model="numpy", cache=True)
def _row_statistics(logits, labels, betas, start, stop, confidence, predicted, log_py, brier, valid):  # pragma: no cover - compiled
    """For rows [start, stop), at inverse temperature betas[i], of the ensemble mean ``p``: top
    confidence, predicted class (lowest index on ties), log p[y] (log space) and the Brier term
    sum_c (p_c - 1[c = y])^2. Rows holding a NaN or inf get valid = False, NaN and -1."""
    members, classes = logits.shape[1], logits.shape[2]
    shifted = np.empty((classes, _TILE))
    top = np.empty(_TILE)
    e = np.empty((classes, _TILE))
    p = np.empty((classes, _TILE))
    x = np.empty((members, _TILE))
    s = np.empty((members, _TILE))
    check = np.empty(_TILE)
    for i0 in range(start, stop, _TILE):
        rows = min(_TILE, stop - i0)
        for c in range(classes):
            for r in range(rows):
                p[c, r] = 0.0
        for r in range(rows):
            check[r] = 0.0
        for m in range(members):
            _load_tile(logits, i0, rows, m, shifted, top)
            for r in range(rows):
                check[r] += top[r] - top[r]  # NaN once a NaN or inf entered the row's max
                s[m, r] = 0.0
            for c in range(classes):
                for r in range(rows):
                    check[r] += shifted[c, r] - shifted[c, r]
                    ec = _exp_nonpositive(betas[i0 + r] * shifted[c, r])
                    e[c, r] = ec
                    s[m, r] += ec
            for c in range(classes):
                for r in range(rows):
                    p[c, r] += e[c, r] / s[m, r]
            for r in range(rows):
                x[m, r] = betas[i0 + r] * shifted[labels[i0 + r], r]
        for r in range(rows):
            i = i0 + r
            if not check[r] == 0.0:
                valid[i] = False
                confidence[i] = np.nan
                predicted[i] = -1
                log_py[i] = np.nan
                brier[i] = np.nan
                continue
            best = 0
            sq = 0.0
            for c in range(classes):
                pc = p[c, r] / members
                sq += pc * pc
                if pc > p[best, r] / members:
                    best = c
            big = x[0, r]
            for m in range(1, members):
                big = max(big, x[m, r])
            if big > -600.0:
                total = 0.0
                for m in range(members):
                    total += _exp_nonpositive(x[m, r]) / s[m, r]
                lp = math.log(total)
            else:
                lp = _log_mixture(x, s, r, members)
            valid[i] = True
            confidence[i] = p[best, r] / members
            predicted[i] = best
            log_py[i] = lp - math.log(members)
            brier[i] = sq - 2.0 * p[labels[i], r] / members + 1.0


_POOL: ThreadPoolExecutor | None = None


def _chunks(rows: int):
    return [(start, min(rows, start + _CHUNK_ROWS)) for start in range(0, rows, _CHUNK_ROWS)]


def _map_chunks(fn, rows: int):
    """fn(start, stop) over fixed chunks of rows, on a thread pool (the kernels release the GIL)."""
    global _POOL
    chunks = _chunks(rows)
    if len(chunks) <= 1:
        return [fn(a, b) for a, b in chunks]
    if _POOL is None:
        _POOL = ThreadPoolExecutor(max_workers=max(1, numba.config.NUMBA_NUM_THREADS), thread_name_prefix="calibration")  # type: ignore[attr-defined]  # numba.config sets its options at import
    return list(_POOL.map(lambda ab: fn(*ab), chunks))


def nll_derivative_sums_numba(logits: np.ndarray, labels: np.ndarray, beta: float) -> np.ndarray:
    """float64 [3]: (sum log S_i, sum S_i'/S_i, sum (S_i'/S_i)') over all rows (see the reference)."""
    parts = _map_chunks(lambda a, b: _nll_derivative_sums(logits, labels, beta, a, b), logits.shape[0])
    return np.sum(np.array(parts, dtype=np.float64).reshape(-1, 3), axis=0)


def row_statistics_numba(logits: np.ndarray, labels: np.ndarray, betas: np.ndarray):
    """Per-row (confidence, predicted, log p[y], Brier term, valid) of the ensemble mean at
    inverse temperature ``betas[i]`` (float64 [N])."""
    rows = logits.shape[0]
    confidence = np.empty(rows)
    predicted = np.empty(rows, dtype=np.int64)
    log_py = np.empty(rows)
    brier = np.empty(rows)
    valid = np.empty(rows, dtype=np.bool_)
    betas = np.ascontiguousarray(betas, dtype=np.float64)
    _map_chunks(
        lambda a, b: _row_statistics(logits, labels, betas, a, b, confidence, predicted, log_py, brier, valid),
        rows,
    )
    return confidence, predicted, log_py, brier, valid


# The registry's entry for this backend: both functions of the pass.
KERNELS = CalibrationKernels(nll_derivative_sums_numba, row_statistics_numba)

__all__ = ["KERNELS", "nll_derivative_sums_numba", "row_statistics_numba"]
