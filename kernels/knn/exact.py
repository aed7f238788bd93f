"""Exact k-th distances where a decision needs them: the spec of "exact", the error bound of
every backend against it, and the exact re-scoring of the rows a backend leaves near a threshold.

**Exact** is the float32 spec of :mod:`.reference` (float32 unit rows by
:func:`~.reference.unit_queries`, float64 similarities summed in index order, the k-th as a
float32 distance): fixed IEEE steps, so numba on the CPU (:func:`~.faiss_cpu.dot64`) and torch on
a GPU (:func:`~.reference.dot64_torch`) give the same bits. The "faiss" backend's exact search
(FAISS's brute force re-scored in float64, :func:`~.faiss_cpu.search_flat`) gives the same
values, except where more than ``RESCORE_EXTRA`` bank vectors tie within float32 rounding of the
k-th.

**Error bounds.** Every other backend computes similarities with a bounded error against s(b):
the float32 scans (the IVF scan, torch on the CPU) within :func:`dot_error_bound` (gamma_D for a
sum of D products of unit vectors, any summation order), the float16 GPU searches within
:func:`float16_error_bound`. An approximate search also only sees a subset of the bank, so the
k-th of its similarities is at most the exact one plus the bound: s_k >= s_found - eps. A row
whose upper bound sqrt(2 - 2 (s_found - eps)) is at or below a threshold t is therefore at or
below it exactly (and so is the distance the backend reported); every other row is *flagged* and
re-scored here, so the decision "distance > t" and the distance of every flagged row equal the
exact ones whatever the backend.

**Re-scoring.** On the CPU (:func:`exact_search_cpu`), one pass over the whole bank per chunk of
flagged rows, fused so that nothing of size [rows, N] is written: a *pre-filter* bounds each
similarity from above cheaply, and only vectors whose bound reaches the row's floor (a lower
bound on its k-th similarity, from the approximate search) get a full float32 dot product and
enter a running top-(k + :data:`EXTRA`) heap; the heap is then re-scored by the float64 spec and
*certified*: every vector left out has a similarity below the k-th re-scored one (else the row is
searched again with a larger heap, then by a float64 scan of the bank). The pre-filter
(:class:`Prefilter`) projects the bank on its leading principal directions: with R orthonormal,
q . b = (R q)_head . (R b)_head + (R q)_tail . (R b)_tail <= head dot + ||(R q)_tail|| ||(R b)_tail||,
plus the rounding of it all (:attr:`Prefilter.eps`). It changes the speed, never a result: a bank
whose variance is spread over all D directions gets no head (every vector is then checked by its
full dot product). On CUDA (:func:`exact_search_torch`), top-(k + EXTRA) by float64 matrix
products on the device, re-scored by the spec in torch and certified the same way.
"""

from __future__ import annotations

import dataclasses
import logging
import math

import numpy as np
import torch
from numba import njit

from .faiss_cpu import _rescore, dot64, knn_threads, similarities_to_distances
from .ivf_cpu import _FASTMATH, _admit, _admit_block, _dot, _dots_2x6, _executor, _head_sims8, _read_only, _sift_down
from .reference import dot64_torch, unit_queries

logger = logging.getLogger(__name__)

U32 = 2.0**-24
U64 = 2.0**-53
U16 = 2.0**-11

#: Heap slots beyond k in the exact re-scoring: the certificate needs the k-th re-scored
#: similarity to clear the (k + EXTRA)-th float32 one by the float32 error bound (about 8e-6 at
#: D = 128), which fails only when more than EXTRA vectors tie that closely.
EXTRA = 8
#: Heap slots beyond k of the second attempt for a row the first one could not certify.
RETRY_EXTRA = 64
#: Distances are reported in float32: a similarity recovered from one, 1 - d^2 / 2, is within
#: this of the one the distance came from (float32 rounding of d, or d computed in float32).
CONVERSION_ERROR = 2.0**-20
#: Relative slack on the float64 evaluation of the flagging bound (its own rounding).
BOUND_SLACK = 1e-12

#: Head dimensions of the pre-filter are a multiple of this, at most half of D (beyond that a
#: full dot product costs little more); a head is kept only if it leaves the bank's tail norms
#: (99.9th percentile) at or below :data:`MAX_TAIL_NORM`.
HEAD_STEP = 8
MAX_TAIL_NORM = 0.02
#: Bank rows used to find the principal directions (a fixed, evenly spaced sample).
PCA_SAMPLE = 1 << 17
#: Bank rows per block of the CPU scan: a block of head rows stays in L2 while every query pair
#: of the chunk passes over it.
BLOCK_BYTES = 1 << 17
#: Bank rows per block of the scan over a projected head (its four row buffers stay in L1:
#: 256-512 rows measured fastest, 1024-2048 a quarter slower).
HEAD_BLOCK_ROWS = 512
#: Flagged rows per chunk of the CPU scan (each chunk reads the whole bank's heads once, so
#: larger chunks read it fewer times): up to MAX_CHUNK_ROWS, but small enough that every worker
#: thread gets a chunk. At 1M vectors (466 flagged rows, 2 threads) 256 ran 1.13x faster than 64.
MIN_CHUNK_ROWS = 64
MAX_CHUNK_ROWS = 256


def gamma(n: int, u: float) -> float:
    """gamma_n = n u / (1 - n u): the relative error bound of a sum of n products in any order."""
    return n * u / (1.0 - n * u)


def dot_error_bound(dim: int) -> float:
    """Bound on |float32 dot product - float64 spec| for float32 unit rows of dimension ``dim``
    summed in any order (reassociated, vectorised, with FMAs): gamma_D(float32) sum |q_j b_j|,
    and sum |q_j b_j| <= ||q|| ||b|| <= 1 + 2^-20; plus the spec's own float64 rounding; 1%
    headroom."""
    return 1.01 * (gamma(dim, U32) + gamma(dim, U64)) * (1.0 + 2.0**-20) ** 2


def float16_error_bound(dim: int, *, float16_results: bool = False) -> float:
    """Bound on |similarity of float16-rounded unit rows, accumulated in float32 - spec|.

    Rounding a unit row to float16 moves each component by at most 2^-11 of itself (normal
    range) or 2^-25 (subnormals), so by ||e|| <= 2^-11 + sqrt(D) 2^-25 =: r per operand;
    |q^ . b^ - q . b| <= ||q^ - q|| ||b^|| + ||q|| ||b^ - b|| <= r (1 + r) + r; the float32
    accumulation of the (exact) float16 products adds the float32 dot bound. A result rounded to
    float16 (``float16_results``) adds 2^-11."""
    r = U16 + math.sqrt(dim) * 2.0**-25
    eps = r * (1.0 + r) + r + dot_error_bound(dim) * (1.0 + r) ** 2
    if float16_results:
        eps += U16
    return 1.01 * eps


# ---------------------------------------------------------------------------------------------
# The pre-filter


@dataclasses.dataclass
class Prefilter:
    """Cheap upper bounds on the similarities of a bank's stored rows.

    ``rotation`` float64 [D, D] (orthonormal rows, leading principal direction first) or None
    (no head: ``heads`` is then the stored rows themselves [N, D], ``tails`` zero and ``eps``
    the float32 dot product's error bound, :func:`no_head`); ``heads``
    float32 [r, N] (transposed: one row per head dimension, for the vectorised scan) the rotated
    stored rows' first r coordinates; ``tails`` float32 [N] upper bounds on the norms of their
    remaining coordinates; ``eps`` the bound on the rounding of head dot + tail product (see
    :func:`build_prefilter`)."""

    rotation: np.ndarray | None
    heads: np.ndarray
    tails: np.ndarray
    eps: float

    @property
    def head_dim(self) -> int:
        """r, the dimensions the scan reads per stored row (D without a head)."""
        return self.heads.shape[1] if self.rotation is None else self.heads.shape[0]

    def queries(self, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(heads float32 [n, r], tail norms float32 [n], rounded up) of unit queries ``q``."""
        if self.rotation is None:
            return q, np.zeros(q.shape[0], np.float32)
        heads = np.empty((q.shape[0], self.head_dim), np.float32)
        tails = np.empty(q.shape[0], np.float64)
        _rotate_queries(_read_only(np.ascontiguousarray(q, np.float32)), _read_only(np.ascontiguousarray(self.rotation.T)),
                        heads, tails)
        return heads, _round_up(tails)


@njit(nogil=True, cache=True, error_model="numpy")
def _rotate_queries(q, rotation_t, heads, tails):
    """Each query rotated in float64 (``rotation_t`` [D, D], the rotation transposed): its first r
    coordinates into ``heads`` [n, r] (float32) and the norm of the rest into ``tails`` [n].

    A loop rather than numpy's matrix product: OpenBLAS's threads spin-wait for about a tenth of
    a second after each call, and on two cores that held one of them while the k-NN scan ran
    right after (1M vectors, 2,000 queries: 17.5k queries/s, against 25k with OpenBLAS limited to
    one thread). Each coordinate is summed in dimension order (the loop vectorises across
    coordinates, with no fast-math), so a query's values do not depend on the batch."""
    n, dim = q.shape
    r = heads.shape[1]
    acc = np.empty(dim, np.float64)
    for i in range(n):
        acc[:] = 0.0
        for d in range(dim):
            qd = np.float64(q[i, d])
            for j in range(dim):
                acc[j] += qd * rotation_t[d, j]
        tail = 0.0
        for j in range(r):
            heads[i, j] = acc[j]
        for j in range(r, dim):
            tail += acc[j] * acc[j]
        tails[i] = np.sqrt(tail)


def no_head(stored: np.ndarray) -> Prefilter:
    """The pre-filter without a head: the bound of a row is its float32 dot product plus that
    product's error bound (so no row is turned away that could enter)."""
    return Prefilter(None, stored, np.zeros(stored.shape[0], np.float32), dot_error_bound(stored.shape[1]))


def _round_up(norms64: np.ndarray) -> np.ndarray:
    """float32 values >= the float64 norms plus their own rounding (about D ulps)."""
    padded = np.asarray(norms64, np.float64) * (1.0 + 1e-12) + 1e-30
    return np.nextafter(padded.astype(np.float32), np.float32(np.inf))


def build_prefilter(stored: np.ndarray, *, max_tail: float = MAX_TAIL_NORM, sample: int = PCA_SAMPLE,
                    block: int = 1 << 16) -> Prefilter:
    """The pre-filter of the unit rows ``stored`` float32 [N, D] (see :class:`Prefilter`).

    The principal directions come from the float64 Gram matrix of an evenly spaced sample of up
    to ``sample`` rows; r is the smallest multiple of :data:`HEAD_STEP` (at most D / 2) whose
    sampled tail norms have a 99.9th percentile <= ``max_tail``, else there is no head. The
    bound on the rounding, for unit q and b: the head dot in float32 (gamma_r), the float32
    rounding of the head coordinates of both (2^-24 each, relative), the float32 product and
    sum of bound terms (2^-22), and the rotation's departure from orthonormality (the spectral
    norm of R R^T - I, bounded by its Frobenius norm); doubled for headroom."""
    n, dim = stored.shape
    none = no_head(stored)
    if n == 0 or dim < 2 * HEAD_STEP:
        return none
    pick = np.linspace(0, n - 1, min(n, sample)).astype(np.int64)
    x = torch.from_numpy(np.asarray(stored)[pick].astype(np.float64))  # a copy: a memory map stays read-only
    _, vectors = np.linalg.eigh((x.T @ x).numpy())
    rotation = np.ascontiguousarray(vectors[:, ::-1].T)  # rows: directions, largest variance first
    rot = torch.from_numpy(rotation)
    # Tail norm for every head size at once: the reversed cumulative sum of squared coordinates.
    tail_sq = torch.flip(torch.cumsum(torch.flip((x @ rot.T) ** 2, dims=(1,)), dim=1), dims=(1,))
    head = None
    for r in range(HEAD_STEP, dim // 2 + 1, HEAD_STEP):
        if float(torch.quantile(tail_sq[:, r].float(), 0.999).sqrt()) <= max_tail:
            head = r
            break
    del x, tail_sq
    if head is None:
        logger.info("k-NN pre-filter: the bank's variance is spread over its %d dimensions; no projected head", dim)
        return none
    heads = np.empty((head, n), np.float32)
    tails = np.empty(n, np.float32)
    for start in range(0, n, block):
        part = torch.from_numpy(np.asarray(stored[start:start + block], dtype=np.float64)) @ rot.T
        heads[:, start:start + block] = part[:, :head].T.numpy()
        tails[start:start + block] = _round_up(torch.linalg.vector_norm(part[:, head:], dim=1).numpy())
    orthogonality = float(np.linalg.norm(rotation @ rotation.T - np.eye(dim)))
    eps = 2.0 * (1.01 * gamma(head, U32) + 2 * U32 + 2.0**-22 + orthogonality) * (1.0 + 2.0**-20) ** 2
    logger.info("k-NN pre-filter: %d of %d principal dimensions (99.9%% of tail norms <= %.3g)", head, dim, max_tail)
    return Prefilter(rotation, heads, tails, eps)


# ---------------------------------------------------------------------------------------------
# CPU: the fused exact scan


@njit(inline="always")
def _offer(Q, X, qt, xt, gate, eps, heap_sims, heap_rows, q, h, i):
    """Admit bank row i to query q's heap if its bound h + tail product + eps reaches the gate
    (the larger of the row's floor and its heap's root)."""
    if h + qt[q] * xt[i] + eps >= gate:
        _admit(Q, X, heap_sims, heap_rows, q, i)


@njit(inline="always")
def _offer6(Q, X, qt, xt, floor, eps, heap_sims, heap_rows, q, h0, h1, h2, h3, h4, h5, i):
    """:func:`_offer` rows i .. i + 5 with head similarities h0 .. h5 to query q."""
    gate = max(floor[q], heap_sims[q, 0])
    _offer(Q, X, qt, xt, gate, eps, heap_sims, heap_rows, q, h0, i)
    _offer(Q, X, qt, xt, gate, eps, heap_sims, heap_rows, q, h1, i + 1)
    _offer(Q, X, qt, xt, gate, eps, heap_sims, heap_rows, q, h2, i + 2)
    _offer(Q, X, qt, xt, gate, eps, heap_sims, heap_rows, q, h3, i + 3)
    _offer(Q, X, qt, xt, gate, eps, heap_sims, heap_rows, q, h4, i + 4)
    _offer(Q, X, qt, xt, gate, eps, heap_sims, heap_rows, q, h5, i + 5)


@njit(nogil=True, cache=True, fastmath=_FASTMATH, error_model="numpy")
def _exact_scan(Q, QH, qt, floor, X, XH, xt, eps, block, heap_sims, heap_rows):
    """Offer every row of X to the heaps of the queries Q (see :func:`_offer`); QH and XH are
    the pre-filter heads, qt and xt the tail norms. Heaps arrive filled with -inf and -1.

    Bank rows go in blocks that stay in cache while every query pair of the chunk passes over
    them, two queries against six rows at a time (the IVF scan's register block, on the heads)."""
    n = Q.shape[0]
    total = X.shape[0]
    for b0 in range(0, total, block):
        b1 = min(b0 + block, total)
        r = 0
        while r < n:
            qa = r
            paired = r + 1 < n
            qb = r + 1 if paired else r
            i = b0
            while i + 6 <= b1:
                a0, a1, a2, a3, a4, a5, c0, c1, c2, c3, c4, c5 = _dots_2x6(QH, qa, qb, XH, i)
                _offer6(Q, X, qt, xt, floor, eps, heap_sims, heap_rows, qa, a0, a1, a2, a3, a4, a5, i)
                if paired:
                    _offer6(Q, X, qt, xt, floor, eps, heap_sims, heap_rows, qb, c0, c1, c2, c3, c4, c5, i)
                i += 6
            for side in range(2 if paired else 1):
                q = qa if side == 0 else qb
                for j in range(i, b1):
                    gate = max(floor[q], heap_sims[q, 0])
                    _offer(Q, X, qt, xt, gate, eps, heap_sims, heap_rows, q, _dot(QH, q, XH, j), j)
            r += 2


@njit(nogil=True, cache=True, fastmath=_FASTMATH, error_model="numpy")
def _exact_scan_heads(Q, QH, qt, floor, X, XHt, xt, eps, block, heap_sims, heap_rows):
    """:func:`_exact_scan` for a projected head stored transposed, ``XHt`` [r, N]: eight queries
    at a time against a block of rows (:func:`~.ivf_cpu._head_sims8`), then each row of the
    block whose bound reaches the query's gate is admitted (:func:`~.ivf_cpu._admit_block`)."""
    n = Q.shape[0]
    total = XHt.shape[1]
    buf = np.empty((8, block), np.float32)
    picks = np.empty(block, np.int64)
    queries = np.arange(n)
    for b0 in range(0, total, block):
        bl = min(block, total - b0)
        for g in range(0, n, 8):
            _head_sims8(QH, queries, g, n - 1, XHt, b0, bl, buf)
            for j in range(min(8, n - g)):
                _admit_block(Q, X, qt, floor, xt, eps, heap_sims, heap_rows, g + j, buf[j], b0, bl, picks)


@njit(nogil=True, cache=True, error_model="numpy")
def _certify(Q, X, heap_sims, heap_rows, eps32, out_sims, out_rows, certified):
    """Re-score each query's heap by the spec (:func:`dot64`), keep its k best (ties to the lower
    row) in ``out_*``, and certify it: with a full heap, every vector left out had a float32
    similarity at most the root's, so its spec value is below root + eps32; the k-th re-scored
    value must clear that. A heap that never filled left nothing out but rows below the floor."""
    n, slots = heap_sims.shape
    k = out_sims.shape[1]
    _rescore(Q, X, heap_rows, out_sims, out_rows)
    for q in range(n):
        m = 0
        for j in range(slots):
            m += heap_rows[q, j] >= 0
        if m < k:
            certified[q] = False
        elif m == slots:
            certified[q] = out_sims[q, k - 1] > np.float64(heap_sims[q, 0]) + eps32
        else:
            certified[q] = True


@njit(nogil=True, cache=True, error_model="numpy")
def _scan64(Q, X, out_sims, out_rows):
    """The last resort: every row of X by the spec, the k best per query (a min-heap on float64)."""
    n = Q.shape[0]
    k = out_sims.shape[1]
    heap_s = np.full((1, k), -np.inf, np.float64)
    heap_r = np.full((1, k), -1, np.int64)
    sims = np.empty(k, np.float64)
    rows = np.empty(k, np.int64)
    for q in range(n):
        heap_s[0, :] = -np.inf
        heap_r[0, :] = -1
        for row in range(X.shape[0]):
            s = dot64(Q, q, X, row)
            if s > heap_s[0, 0]:
                _sift_down(heap_s, heap_r, 0, k, s, row)
        for j in range(k):
            sims[j] = heap_s[0, j]
            rows[j] = heap_r[0, j]
        order = np.argsort(-sims, kind="mergesort")
        for j in range(k):
            out_sims[q, j] = sims[order[j]]
            out_rows[q, j] = rows[order[j]]


def exact_search_cpu(q: np.ndarray, vectors: np.ndarray, prefilter: Prefilter, k: int, floor: np.ndarray,
                     threads: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The exact k best similarities of unit queries ``q`` float32 [n, D] (by :func:`unit_queries`)
    among the stored rows ``vectors`` float32 [N, D]: (sims float64 [n, k] descending, stored rows
    int64 [n, k]), by the spec.

    ``floor`` float64 [n] must be a lower bound on each query's k-th spec similarity (from an
    approximate search: its k-th found similarity minus its error bound; -inf when unknown, which
    leaves only the heap's root to prune). A wrong floor would drop true neighbours: the rows it
    leaves short are caught and searched again without it."""
    n = q.shape[0]
    total = vectors.shape[0]
    sims = np.full((n, k), -np.inf, np.float64)
    rows = np.full((n, k), -1, np.int64)
    if n == 0:
        return sims, rows
    eps32 = dot_error_bound(q.shape[1])
    qh, qt = prefilter.queries(q)
    x, xh, xt = _read_only(vectors), _read_only(prefilter.heads), _read_only(prefilter.tails)
    block = max(6, min(total, (HEAD_BLOCK_ROWS if prefilter.rotation is not None else
                               BLOCK_BYTES // (4 * prefilter.head_dim))))
    certified = np.zeros(n, np.bool_)

    def attempt(picks: np.ndarray, slots: int, floors: np.ndarray) -> None:
        def run(span):
            a, b = span
            part = picks[a:b]
            heap_s = np.full((part.size, slots), -np.inf, np.float32)
            heap_r = np.full((part.size, slots), -1, np.int64)
            qq = _read_only(np.ascontiguousarray(q[part]))
            scan = _exact_scan if prefilter.rotation is None else _exact_scan_heads
            scan(qq, _read_only(np.ascontiguousarray(qh[part])), _read_only(qt[part]),
                 _read_only(np.ascontiguousarray(floors[a:b], np.float32)), x, xh, xt,
                 np.float32(prefilter.eps), block, heap_s, heap_r)
            out_s, out_r = sims[part], rows[part]
            ok = np.zeros(part.size, np.bool_)
            _certify(qq, x, heap_s, heap_r, eps32, out_s, out_r, ok)
            sims[part], rows[part], certified[part] = out_s, out_r, ok

        workers = knn_threads() if threads is None else threads
        size = min(MAX_CHUNK_ROWS, max(MIN_CHUNK_ROWS, math.ceil(picks.size / max(workers, 1))))
        spans = [(a, min(a + size, picks.size)) for a in range(0, picks.size, size)]
        if workers <= 1 or len(spans) == 1:
            for span in spans:
                run(span)
        else:
            list(_executor(workers).map(run, spans))

    # The floor is lowered by the float32 rounding of its own comparison (the scan compares in
    # float32), so it can only let more vectors through.
    lowered = np.asarray(floor, np.float64) - 2.0**-22
    attempt(np.arange(n), min(total, k + EXTRA), lowered)
    again = np.flatnonzero(~certified)
    if again.size:
        logger.debug("exact k-NN re-scoring: %d of %d rows not certified with %d slots; retrying with %d",
                     again.size, n, k + EXTRA, k + RETRY_EXTRA)
        attempt(again, min(total, k + RETRY_EXTRA), np.full(again.size, -np.inf))
        last = np.flatnonzero(~certified)
        if last.size:
            logger.info("exact k-NN re-scoring: %d rows tie too closely to certify; scanning the bank in float64", last.size)
            out_s, out_r = sims[last], rows[last]
            _scan64(_read_only(np.ascontiguousarray(q[last])), x, out_s, out_r)
            sims[last], rows[last] = out_s, out_r
    return sims, rows


# ---------------------------------------------------------------------------------------------
# Any device (the CUDA path): float64 matrix products, the spec in torch, the same certificate

#: Bytes of one float64 similarity tile on the device.
TORCH_TILE_BYTES = 256 << 20


def exact_search_torch(q: torch.Tensor, bank, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`exact_search_cpu`'s result for unit queries ``q`` float32 [n, D] on any device:
    (sims float64 [n, k] descending, stored rows int64 [n, k]) on ``q``'s device.

    The top-(k + EXTRA) rows by float64 matrix products (error gamma_D(float64), no TF32 in
    float64) are re-scored by the spec (:func:`dot64_torch`, the bits of the CPU's
    :func:`dot64`) and certified as on the CPU; a row that is not (ties) is searched on the CPU."""
    device = q.device
    n = q.shape[0]
    vectors = bank.unit_on(device, torch.float32)
    total, dim = vectors.shape
    slots = min(total, k + EXTRA)
    q64 = q.to(torch.float64)
    bank_rows = max(slots, min(total, TORCH_TILE_BYTES // (8 * max(n, 1))))
    best_s = best_r = None
    for n0 in range(0, total, bank_rows):
        tile = q64 @ vectors[n0:n0 + bank_rows].to(torch.float64).T
        s, r = torch.topk(tile, min(slots, tile.shape[1]), dim=1)
        r = r + n0
        if best_s is None:
            best_s, best_r = s, r
        else:
            assert best_r is not None  # set with best_s
            s, r = torch.cat((best_s, s), dim=1), torch.cat((best_r, r), dim=1)
            best_s, keep = torch.topk(s, slots, dim=1)
            best_r = torch.gather(r, 1, keep)
    assert best_s is not None and best_r is not None  # the bank is not empty
    spec = dot64_torch(q, vectors[best_r])  # [n, slots]
    # Sort by (spec similarity descending, row ascending), as the CPU path does.
    order = torch.sort(best_r, dim=1, stable=True).indices
    spec, rows = torch.gather(spec, 1, order), torch.gather(best_r, 1, order)
    order = torch.sort(spec, dim=1, descending=True, stable=True).indices
    spec, rows = torch.gather(spec, 1, order)[:, :k], torch.gather(rows, 1, order)[:, :k]
    eps64 = 2.02 * gamma(dim, U64) * (1.0 + 2.0**-20) ** 2
    if slots == total:
        certified = torch.ones(n, dtype=torch.bool, device=device)
    else:
        certified = spec[:, -1] > best_s[:, -1] + eps64
    if not bool(certified.all()):
        again = torch.nonzero(~certified).flatten()
        logger.info("exact k-NN re-scoring on %s: %d rows tie too closely to certify; searching them on the CPU",
                    device, again.numel())
        host_q = q[again].cpu().numpy()
        host_s, host_r = exact_search_cpu(host_q, bank.host_unit(), bank.prefilter(), k, np.full(host_q.shape[0], -np.inf))
        spec[again] = torch.from_numpy(host_s).to(device)
        rows[again] = torch.from_numpy(host_r).to(device)
    return spec, rows


__all__ = [
    "EXTRA", "Prefilter", "build_prefilter", "dot_error_bound", "exact_search_cpu", "exact_search_torch",
    "float16_error_bound", "no_head",
]
