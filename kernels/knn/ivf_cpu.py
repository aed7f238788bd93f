"""Inverted-file (IVF) search on the CPU, batched by list: the "ivf" backend of the k-NN pass,
the fast path of a ``kind="ivf"`` bank (:func:`knn_search_ivf`).

An IVF bank splits its unit vectors into ``nlist`` lists around spherical k-means centroids (FAISS
trains them); a query scans the ``nprobe`` lists whose centroids are nearest. FAISS's own
IndexIVFFlat scans one query at a time, so every probed list is streamed from memory once per
query and each vector read feeds one dot product: on the 2-core CPU it ran at 10-20 GFLOP/s, barely
faster than exact search (a matrix product at 80-90) although it scanned an eighth of the bank.

Here a batch of queries is turned around: the (query, list) pairs are grouped by list, and each
list is scanned once for all the queries of a sweep (up to :data:`MAX_SWEEP_ROWS`) that probe it,
two queries against six vectors at a time with the twelve dot products in registers (70-80
GFLOP/s from numba, about 80% of a BLAS sgemm), each result pushed straight into its query's
running top-k heap; a bank with a pre-filter head (:mod:`.exact`) is scanned through it, eight
queries at a time, and only the rows whose bound can beat a heap's root get a full dot product.
The scores are exact float32 inner products of the probed vectors, so results equal
IndexIVFFlat's with the same lists and nprobe (up to ties): the only approximation is the lists
not probed.

Measured on the fleet simulator (D=128, 5,000 queries of which 20% OOD, 2-core AMD EPYC, one
thread, CPU time): at 100k vectors with 256 lists and nprobe 32, 0.064 s per 1,000 queries for
k=10 against 0.305 for FAISS IndexIVFFlat and 0.318 for FAISS exact search, at the same 0.39%
mean error of the k-th distance (before the head scan).

Threads: a batch is cut into sweeps of queries that worker threads (plain Python threads running
the kernels with the GIL released) take from a shared queue, and no OpenMP pool is left spinning
between calls. Results are bit-identical whatever the thread count, sweep or batch: every
similarity comes from code chosen by the row's position in its list (or the centroid's), never
by which queries share a block (see :func:`_scan_block`), and the heaps order their entries
totally (ties to the lower row).

Memory: the kernel reads the bank's float32 vectors in place (stored list after list,
memory-mapped or not); the lists cost the centroids and nlist + 1 offsets.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from numba import njit

from .faiss_cpu import knn_threads, search_flat, similarities_to_distances
from .reference import unit_queries

logger = logging.getLogger(__name__)

#: Fast-math flags of the scan: reassociation lets LLVM vectorise the dot-product reductions and
#: contraction gives FMAs. Not "nnan"/"ninf": every input is a finite unit vector (the callers
#: validate them), and flags that assume it would only risk silent wrong answers if one slipped.
_FASTMATH = {"reassoc", "contract", "nsz", "arcp"}

#: Queries searched in one sweep over the lists (see :func:`search_ivf`): each probed list is
#: read once per sweep for all the sweep's queries that probe it, so larger sweeps read the bank
#: fewer times. A batch is cut into one sweep per thread, of at least MIN_SWEEP_ROWS (so that a
#: small batch is not split) and at most MAX_SWEEP_ROWS queries (which bounds the (query, list)
#: pairs a sweep holds: 16,384 x nprobe 64 is 8 MB).
MIN_SWEEP_ROWS = 256
MAX_SWEEP_ROWS = 16_384
#: Rows of a list whose head similarities are computed at once (the eight row buffers stay in L1).
HEAD_LIST_ROWS = 512


# ---------------------------------------------------------------------------------------------
# numba kernels


@njit(inline="always")
def _worse(s1, row1, s2, row2):
    """Whether (s1, row1) ranks below (s2, row2): a smaller similarity, or the same with a larger
    row. A strict total order, so a heap keeps the same k entries whatever order its rows come in
    (ties go to the lower row), and so whatever sweep or thread scanned them."""
    return s1 < s2 or (s1 == s2 and row1 > row2)


@njit(inline="always")
def _sift_down(heap_sims, heap_rows, q, size, s, row):
    """Place (s, row) at the root of query q's min-heap of ``size`` entries and sift it down."""
    pos = 0
    while True:
        child = 2 * pos + 1
        if child >= size:
            break
        if child + 1 < size and _worse(heap_sims[q, child + 1], heap_rows[q, child + 1],
                                       heap_sims[q, child], heap_rows[q, child]):
            child += 1
        if not _worse(heap_sims[q, child], heap_rows[q, child], s, row):
            break
        heap_sims[q, pos] = heap_sims[q, child]
        heap_rows[q, pos] = heap_rows[q, child]
        pos = child
    heap_sims[q, pos] = s
    heap_rows[q, pos] = row


@njit(inline="always")
def _push(heap_sims, heap_rows, q, k, s, row):
    """Offer (s, row) to query q's min-heap of its k best entries (the root is the k-th)."""
    if _worse(heap_sims[q, 0], heap_rows[q, 0], s, row):
        _sift_down(heap_sims, heap_rows, q, k, s, row)


@njit(inline="always", fastmath=_FASTMATH)
def _dots_2x6(Q, qa, qb, X, i):
    """Twelve dot products: query rows qa, qb of Q against rows i .. i + 5 of X, in twelve
    accumulators that stay in registers (the 2 x 6 block keeps AVX2's 16 vector registers busy
    without spilling; 3 x 4, 4 x 4 and 8 x 2 measured slower)."""
    z = np.float32(0.0)
    a0 = a1 = a2 = a3 = a4 = a5 = z
    b0 = b1 = b2 = b3 = b4 = b5 = z
    for d in range(Q.shape[1]):
        ya = Q[qa, d]
        yb = Q[qb, d]
        x0 = X[i, d]
        x1 = X[i + 1, d]
        x2 = X[i + 2, d]
        x3 = X[i + 3, d]
        x4 = X[i + 4, d]
        x5 = X[i + 5, d]
        a0 += ya * x0
        a1 += ya * x1
        a2 += ya * x2
        a3 += ya * x3
        a4 += ya * x4
        a5 += ya * x5
        b0 += yb * x0
        b1 += yb * x1
        b2 += yb * x2
        b3 += yb * x3
        b4 += yb * x4
        b5 += yb * x5
    return a0, a1, a2, a3, a4, a5, b0, b1, b2, b3, b4, b5


@njit(inline="always", fastmath=_FASTMATH)
def _dot(Q, q, X, i):
    s = np.float32(0.0)
    for d in range(Q.shape[1]):
        s += Q[q, d] * X[i, d]
    return s


@njit(nogil=True, cache=True, fastmath=_FASTMATH, error_model="numpy")
def _scan_block(Q, qs, q_lo, q_hi, X, i_lo, i_hi, heap_sims, heap_rows, k):
    """Scan rows i_lo .. i_hi - 1 of X for the queries ``qs[q_lo:q_hi]`` (rows of Q), offering
    every similarity to the query's heap (row numbers of X as ids).

    Queries go two at a time against six rows at a time; an odd query out is paired with itself
    (its second results dropped) and a list's last 1-5 rows take one dot product each. Each kind
    of similarity thus comes from one piece of code whoever shares the block: a query's results
    do not depend on which other queries are in its sweep, so not on sweeps or threads. (Two
    copies of the same dot-product loop can be vectorised, hence rounded, differently.)"""
    r = q_lo
    while r < q_hi:
        qa = qs[r]
        paired = r + 1 < q_hi
        qb = qs[r + 1] if paired else qa
        i = i_lo
        while i + 6 <= i_hi:
            a0, a1, a2, a3, a4, a5, b0, b1, b2, b3, b4, b5 = _dots_2x6(Q, qa, qb, X, i)
            _push(heap_sims, heap_rows, qa, k, a0, i)
            _push(heap_sims, heap_rows, qa, k, a1, i + 1)
            _push(heap_sims, heap_rows, qa, k, a2, i + 2)
            _push(heap_sims, heap_rows, qa, k, a3, i + 3)
            _push(heap_sims, heap_rows, qa, k, a4, i + 4)
            _push(heap_sims, heap_rows, qa, k, a5, i + 5)
            if paired:
                _push(heap_sims, heap_rows, qb, k, b0, i)
                _push(heap_sims, heap_rows, qb, k, b1, i + 1)
                _push(heap_sims, heap_rows, qb, k, b2, i + 2)
                _push(heap_sims, heap_rows, qb, k, b3, i + 3)
                _push(heap_sims, heap_rows, qb, k, b4, i + 4)
                _push(heap_sims, heap_rows, qb, k, b5, i + 5)
            i += 6
        tail = i
        for side in range(2 if paired else 1):
            q = qa if side == 0 else qb
            for j in range(tail, i_hi):
                _push(heap_sims, heap_rows, q, k, _dot(Q, q, X, j), j)
        r += 2


@njit(nogil=True, cache=True, fastmath=_FASTMATH, error_model="numpy")
def _admit(Q, X, heap_sims, heap_rows, q, i):
    """Push row i of X into query q's heap by its full float32 dot product (kept out of line:
    inlined many times, it stopped LLVM from vectorising the loops around it)."""
    _push(heap_sims, heap_rows, q, heap_sims.shape[1], _dot(Q, q, X, i), i)


@njit(inline="always", fastmath=_FASTMATH)
def _head_sims8(QH, qs, r, last, XHt, lo, bl, buf):
    """``buf[j, i]`` = similarity of query ``qs[min(r + j, last)]`` (j < 8) with row lo + i, for
    i < bl: rows of QH [B, w] against columns of ``XHt`` [w, N] (a pre-filter head, or the IVF
    centroids, stored transposed), four dimensions per pass over the rows, the loop over rows
    vectorised, eight queries' accumulators (AVX-512 has the registers: 1.1x four queries a pass).
    (At w = 32 the 2 x 6 dot-product block spent its time in horizontal sums; four queries a pass
    ran 1.7x faster, as fast as torch's sgemm on the same shapes.) A row's value depends on its
    position i in the block (vectorised body or remainder), never on which queries share the pass."""
    for j in range(8):
        row = buf[j]
        for i in range(bl):
            row[i] = 0.0
    q0 = qs[min(r, last)]
    q1 = qs[min(r + 1, last)]
    q2 = qs[min(r + 2, last)]
    q3 = qs[min(r + 3, last)]
    q4 = qs[min(r + 4, last)]
    q5 = qs[min(r + 5, last)]
    q6 = qs[min(r + 6, last)]
    q7 = qs[min(r + 7, last)]
    s0, s1, s2, s3, s4, s5, s6, s7 = buf[0], buf[1], buf[2], buf[3], buf[4], buf[5], buf[6], buf[7]
    w4 = QH.shape[1] - QH.shape[1] % 4
    for d0 in range(0, w4, 4):
        v0 = XHt[d0, lo:lo + bl]
        v1 = XHt[d0 + 1, lo:lo + bl]
        v2 = XHt[d0 + 2, lo:lo + bl]
        v3 = XHt[d0 + 3, lo:lo + bl]
        a0, a1, a2, a3 = QH[q0, d0], QH[q0, d0 + 1], QH[q0, d0 + 2], QH[q0, d0 + 3]
        b0, b1, b2, b3 = QH[q1, d0], QH[q1, d0 + 1], QH[q1, d0 + 2], QH[q1, d0 + 3]
        c0, c1, c2, c3 = QH[q2, d0], QH[q2, d0 + 1], QH[q2, d0 + 2], QH[q2, d0 + 3]
        e0, e1, e2, e3 = QH[q3, d0], QH[q3, d0 + 1], QH[q3, d0 + 2], QH[q3, d0 + 3]
        f0, f1, f2, f3 = QH[q4, d0], QH[q4, d0 + 1], QH[q4, d0 + 2], QH[q4, d0 + 3]
        g0, g1, g2, g3 = QH[q5, d0], QH[q5, d0 + 1], QH[q5, d0 + 2], QH[q5, d0 + 3]
        h0, h1, h2, h3 = QH[q6, d0], QH[q6, d0 + 1], QH[q6, d0 + 2], QH[q6, d0 + 3]
        m0, m1, m2, m3 = QH[q7, d0], QH[q7, d0 + 1], QH[q7, d0 + 2], QH[q7, d0 + 3]
        for i in range(bl):
            x0 = v0[i]
            x1 = v1[i]
            x2 = v2[i]
            x3 = v3[i]
            s0[i] += a0 * x0 + a1 * x1 + a2 * x2 + a3 * x3
            s1[i] += b0 * x0 + b1 * x1 + b2 * x2 + b3 * x3
            s2[i] += c0 * x0 + c1 * x1 + c2 * x2 + c3 * x3
            s3[i] += e0 * x0 + e1 * x1 + e2 * x2 + e3 * x3
            s4[i] += f0 * x0 + f1 * x1 + f2 * x2 + f3 * x3
            s5[i] += g0 * x0 + g1 * x1 + g2 * x2 + g3 * x3
            s6[i] += h0 * x0 + h1 * x1 + h2 * x2 + h3 * x3
            s7[i] += m0 * x0 + m1 * x1 + m2 * x2 + m3 * x3
    for d in range(w4, QH.shape[1]):  # the last 1-3 dimensions of a width not a multiple of 4
        v = XHt[d, lo:lo + bl]
        a, b, c, e = QH[q0, d], QH[q1, d], QH[q2, d], QH[q3, d]
        f, g, h, m = QH[q4, d], QH[q5, d], QH[q6, d], QH[q7, d]
        for i in range(bl):
            x = v[i]
            s0[i] += a * x
            s1[i] += b * x
            s2[i] += c * x
            s3[i] += e * x
            s4[i] += f * x
            s5[i] += g * x
            s6[i] += h * x
            s7[i] += m * x


@njit(inline="always")
def _admit_block(Q, X, qt, floor, xt, eps, heap_sims, heap_rows, q, sims, lo, bl, picks):
    """Admit to query q's heap every row lo + i (i < bl) whose bound, head similarity ``sims[i]``
    plus the tail product qt[q] * xt[lo + i], reaches the gate: the larger of q's floor and its
    heap's root, less ``eps`` (the bound's rounding and the float32 dot product's error, so a
    row whose float32 similarity beats the root is never turned away). ``picks`` is scratch
    (int64, at least bl)."""
    gate = max(floor[q], heap_sims[q, 0]) - eps
    tail = qt[q]
    tails = xt[lo:lo + bl]  # a slice: indexing xt[lo + i] (wraparound checks) kept these loops scalar
    # Most blocks admit nothing: a branch-free count first (it vectorises; the row-by-row loop
    # alone halved the speed of the head products). Where one passes, the passing rows are
    # listed branch-free, then admitted in order against the rising gate (a row-by-row loop
    # with a branch per row cost as much as the head products at k = 50). The gate only rises
    # during the block, so a row that fails it at first can never pass.
    hits = 0
    for i in range(bl):
        hits += sims[i] + tail * tails[i] >= gate
    if hits == 0:
        return
    n = 0
    for i in range(bl):
        picks[n] = i
        n += sims[i] + tail * tails[i] >= gate
    for j in range(n):
        i = picks[j]
        if sims[i] + tail * tails[i] >= gate:
            _admit(Q, X, heap_sims, heap_rows, q, lo + i)
            gate = max(floor[q], heap_sims[q, 0]) - eps


@njit(nogil=True, cache=True, fastmath=_FASTMATH, error_model="numpy")
def _scan_list_heads(Q, QH, qt, floor, qs, q_lo, q_hi, X, XHt, xt, eps, i_lo, i_hi, buf, picks, heap_sims, heap_rows):
    """:func:`_scan_block` through a pre-filter head: the queries ``qs[q_lo:q_hi]`` against rows
    i_lo .. i_hi - 1, eight queries at a time (:func:`_head_sims8`); only the rows whose bound can
    beat a query's heap root get a full dot product (:func:`_admit_block`)."""
    width = buf.shape[1]
    for lo in range(i_lo, i_hi, width):
        bl = min(width, i_hi - lo)
        for r in range(q_lo, q_hi, 8):
            _head_sims8(QH, qs, r, q_hi - 1, XHt, lo, bl, buf)
            for j in range(min(8, q_hi - r)):
                _admit_block(Q, X, qt, floor, xt, eps, heap_sims, heap_rows, qs[r + j], buf[j], lo, bl, picks)


@njit(nogil=True, cache=True, error_model="numpy")
def _sort_heaps(heap_sims, heap_rows):
    """Heap-sort every row's min-heap in place into descending similarity."""
    n, k = heap_sims.shape
    for q in range(n):
        for end in range(k - 1, 0, -1):
            s = heap_sims[q, end]
            row = heap_rows[q, end]
            heap_sims[q, end] = heap_sims[q, 0]
            heap_rows[q, end] = heap_rows[q, 0]
            _sift_down(heap_sims, heap_rows, q, end, s, row)


@njit(nogil=True, cache=True, fastmath=_FASTMATH, error_model="numpy")
def _probe(Q, Ct, nprobe):
    """The ``nprobe`` nearest centroids of each query of Q, int64 [n, nprobe] (heap order): eight
    queries at a time against blocks of the transposed centroids ``Ct`` [D, nlist]
    (:func:`_head_sims8`), each similarity offered to the query's heap."""
    n = Q.shape[0]
    nlist = Ct.shape[1]
    probe_sims = np.full((n, nprobe), -np.inf, dtype=np.float32)
    probe_lists = np.full((n, nprobe), -1, dtype=np.int64)
    width = min(HEAD_LIST_ROWS, nlist)
    buf = np.empty((8, width), dtype=np.float32)
    queries = np.arange(n)
    for g in range(0, n, 8):
        for lo in range(0, nlist, width):
            bl = min(width, nlist - lo)
            _head_sims8(Q, queries, g, n - 1, Ct, lo, bl, buf)
            for j in range(min(8, n - g)):
                for i in range(bl):
                    _push(probe_sims, probe_lists, g + j, nprobe, buf[j, i], lo + i)
    return probe_lists


@njit(nogil=True, cache=True, error_model="numpy")
def _group_pairs(probe_lists, nlist):
    """(starts int64 [nlist + 1], queries int64 [n * nprobe]): the (query, list) pairs of
    ``probe_lists`` [n, nprobe] grouped by list by a counting sort, queries ascending within a
    list: list l is probed by ``queries[starts[l]:starts[l + 1]]``."""
    n, nprobe = probe_lists.shape
    starts = np.zeros(nlist + 1, dtype=np.int64)
    for q in range(n):
        for p in range(nprobe):
            starts[probe_lists[q, p] + 1] += 1
    for lst in range(nlist):
        starts[lst + 1] += starts[lst]
    fill = starts[:nlist].copy()
    pair_queries = np.empty(n * nprobe, dtype=np.int64)
    for q in range(n):
        for p in range(nprobe):
            lst = probe_lists[q, p]
            pair_queries[fill[lst]] = q
            fill[lst] += 1
    return starts, pair_queries


@njit(nogil=True, cache=True, error_model="numpy")
def _ivf_sweep(Q, Ct, nprobe, X, offsets, out_sims, out_rows):
    """k nearest rows of X for each query of Q ([n, D] unit rows) among the ``nprobe`` lists with
    the nearest centroids (``Ct`` [D, nlist], the centroids transposed; list l is rows
    offsets[l] .. offsets[l + 1] - 1 of X): probe (:func:`_probe`), group the (query, list) pairs
    by list (:func:`_group_pairs`), scan each list once for all its queries (:func:`_scan_block`),
    sort. Writes ``out_sims`` [n, k] (descending inner products, ties to the lower row) and
    ``out_rows`` [n, k] (-1 where the probed lists held fewer than k rows); both must arrive
    filled with -inf and -1."""
    nlist = Ct.shape[1]
    k = out_sims.shape[1]
    starts, pair_queries = _group_pairs(_probe(Q, Ct, nprobe), nlist)
    for lst in range(nlist):
        if starts[lst] < starts[lst + 1] and offsets[lst] < offsets[lst + 1]:
            _scan_block(Q, pair_queries, starts[lst], starts[lst + 1], X, offsets[lst], offsets[lst + 1],
                        out_sims, out_rows, k)
    _sort_heaps(out_sims, out_rows)


@njit(nogil=True, cache=True, error_model="numpy")
def _ivf_sweep_heads(Q, QH, qt, Ct, nprobe, X, XHt, xt, eps, offsets, out_sims, out_rows):
    """:func:`_ivf_sweep` with the lists scanned through a pre-filter head
    (:func:`_scan_list_heads`): the same rows in each heap (every row whose float32 similarity
    beats the heap's root is admitted), for a fraction of the multiply-adds."""
    nlist = Ct.shape[1]
    starts, pair_queries = _group_pairs(_probe(Q, Ct, nprobe), nlist)
    no_floor = np.full(Q.shape[0], -np.inf, dtype=np.float32)
    buf = np.empty((8, HEAD_LIST_ROWS), dtype=np.float32)
    picks = np.empty(HEAD_LIST_ROWS, dtype=np.int64)
    for lst in range(nlist):
        if starts[lst] < starts[lst + 1] and offsets[lst] < offsets[lst + 1]:
            _scan_list_heads(Q, QH, qt, no_floor, pair_queries, starts[lst], starts[lst + 1], X, XHt, xt, eps,
                             offsets[lst], offsets[lst + 1], buf, picks, out_sims, out_rows)
    _sort_heaps(out_sims, out_rows)


# ---------------------------------------------------------------------------------------------
# Lists and the host-side search


@dataclasses.dataclass
class IvfLists:
    """Inverted lists over vectors stored list after list: ``centroids`` float32 [nlist, D] (unit
    rows) and ``offsets`` int64 [nlist + 1] (list l is stored rows offsets[l] .. offsets[l+1]-1)."""

    centroids: np.ndarray
    offsets: np.ndarray

    @property
    def nlist(self) -> int:
        return self.centroids.shape[0]

    @property
    def sizes(self) -> np.ndarray:
        """Vectors per list, int64 [nlist]."""
        return np.diff(self.offsets)

    @functools.cached_property
    def centroids_t(self) -> np.ndarray:
        """The centroids transposed, float32 [D, nlist] C-contiguous (what the probe scans)."""
        return np.ascontiguousarray(self.centroids.T)


def group_by_list(assignment: np.ndarray, nlist: int) -> tuple[np.ndarray, np.ndarray]:
    """(order, offsets): ``order`` int64 [N] lists the rows list after list (ascending within a
    list) and ``offsets`` int64 [nlist + 1] where each list starts in that order."""
    offsets = np.zeros(nlist + 1, dtype=np.int64)
    np.cumsum(np.bincount(assignment, minlength=nlist), out=offsets[1:])
    return np.argsort(assignment, kind="stable").astype(np.int64), offsets


def merged_order(offsets: np.ndarray, assignment: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Where stored rows go when M new rows (list numbers ``assignment`` [M]) join lists stored as
    ``offsets``: (new position of each old row [N], new position of each new row [M], the new
    offsets [nlist + 1]), old rows first within each list, new ones after in their given order."""
    nlist = offsets.shape[0] - 1
    old_sizes = np.diff(offsets)
    new_sizes = np.bincount(assignment, minlength=nlist)
    new_offsets = np.zeros(nlist + 1, dtype=np.int64)
    np.cumsum(old_sizes + new_sizes, out=new_offsets[1:])
    shift = new_offsets[:-1] - offsets[:-1]  # each list moves by the new rows of the lists before it
    old_pos = np.arange(offsets[-1], dtype=np.int64) + np.repeat(shift, old_sizes)
    order, new_starts = group_by_list(assignment, nlist)
    new_pos = np.empty(assignment.shape[0], dtype=np.int64)
    list_of = assignment[order]
    new_pos[order] = new_offsets[list_of] + old_sizes[list_of] + (np.arange(order.size) - new_starts[list_of])
    return old_pos, new_pos, new_offsets


def train_centroids(unit: np.ndarray, nlist: int, *, seed: int = 1234, max_train: int = 1 << 18) -> np.ndarray:
    """Spherical k-means centroids (float32 [nlist, D], unit rows) of the unit rows ``unit`` by
    FAISS's k-means, ten iterations, on at most ``max_train`` rows (a random sample of at least 39
    and at most 256 per list: FAISS's own bounds), which keeps training under ~10 s at 1M x 128
    on two cores."""
    import faiss

    dim = unit.shape[1]
    per_list = max(39, min(256, max_train // max(nlist, 1)))
    kmeans = faiss.Kmeans(dim, nlist, niter=10, spherical=True, seed=seed, max_points_per_centroid=per_list)
    kmeans.train(np.ascontiguousarray(unit, dtype=np.float32))
    return np.ascontiguousarray(kmeans.centroids, dtype=np.float32)


def assign(unit: np.ndarray, centroids: np.ndarray, block: int = 1 << 16) -> np.ndarray:
    """The nearest centroid (largest inner product) of each row, int64 [N], in blocks of rows."""
    import faiss

    out = np.empty(unit.shape[0], dtype=np.int64)
    for start in range(0, unit.shape[0], block):
        part = np.ascontiguousarray(unit[start:start + block], dtype=np.float32)
        _, nearest = faiss.knn(part, centroids, 1, metric=faiss.METRIC_INNER_PRODUCT)
        out[start:start + block] = nearest[:, 0]
    return out


_pool_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None
_pool_threads = 0


def _executor(threads: int) -> ThreadPoolExecutor:
    global _pool, _pool_threads
    with _pool_lock:
        if _pool is None or _pool_threads != threads:
            if _pool is not None:
                _pool.shutdown(wait=False)
            _pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="hitl-knn")
            _pool_threads = threads
        return _pool


def _read_only(a: np.ndarray) -> np.ndarray:
    # One compiled kernel for memory-mapped (read-only) and in-memory banks: numba types the two
    # differently, so every array the kernel only reads is passed as a read-only view.
    view = a.view(np.ndarray) if isinstance(a, np.memmap) else a.view()
    view.flags.writeable = False
    return view


@dataclasses.dataclass
class HeadScan:
    """What the list scan needs of a pre-filter head (:class:`~.exact.Prefilter`): the queries'
    head coordinates ``qh`` float32 [B, r] and tail norms ``qt`` float32 [B], the stored rows'
    transposed heads ``heads`` float32 [r, N] and tail norms ``tails`` float32 [N], and ``eps``,
    the bound's rounding plus the float32 dot product's error bound."""

    qh: np.ndarray
    qt: np.ndarray
    heads: np.ndarray
    tails: np.ndarray
    eps: float


def sweep_rows(batch: int, threads: int) -> int:
    """Queries per sweep: one sweep per thread, within [MIN_SWEEP_ROWS, MAX_SWEEP_ROWS]. (Cut
    finer, the sweeps re-read the lists more often: at 1M vectors, 2,000 queries on 2 threads,
    four sweeps ran 0.85x as fast as two; results do not depend on the cut.)"""
    return max(1, min(batch, MAX_SWEEP_ROWS, max(MIN_SWEEP_ROWS, math.ceil(batch / max(threads, 1)))))


def search_ivf(queries: np.ndarray, vectors: np.ndarray, lists: IvfLists, nprobe: int, k: int,
               threads: int = 1, head: HeadScan | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The k largest inner products of each query among the vectors of its ``nprobe`` nearest lists.

    Args:
        queries: float32 [B, D] unit rows, C-contiguous.
        vectors: float32 [N, D] unit rows stored list after list (``lists.offsets``), C-contiguous;
            a memory map is read in place.
        lists: the centroids and list offsets.
        nprobe: lists scanned per query, 1 <= nprobe <= nlist.
        k: neighbours per query.
        threads: worker threads, each taking sweeps of queries (:func:`sweep_rows`) from a queue.
        head: scan the lists through this pre-filter head: each vector's head similarity plus
            its tail bound decides whether it gets a full dot product (the same heaps: only rows
            that cannot beat a heap's root are skipped).

    Returns:
        (sims float32 [B, k] descending, rows int64 [B, k] stored rows, ties to the lower row); a
        query whose probed lists hold fewer than k vectors gets -inf and -1 in its last places.
    """
    batch = queries.shape[0]
    sims = np.full((batch, k), -np.inf, dtype=np.float32)
    rows = np.full((batch, k), -1, dtype=np.int64)
    if batch == 0:
        return sims, rows
    size = sweep_rows(batch, threads)
    spans = [(start, min(start + size, batch)) for start in range(0, batch, size)]
    q = _read_only(np.ascontiguousarray(queries, dtype=np.float32))
    x = _read_only(vectors)
    centroids_t = _read_only(lists.centroids_t)
    offsets = _read_only(np.ascontiguousarray(lists.offsets, dtype=np.int64))

    if head is not None:
        qh, qt = _read_only(np.ascontiguousarray(head.qh)), _read_only(np.ascontiguousarray(head.qt))
        heads, tails, eps = _read_only(head.heads), _read_only(head.tails), np.float32(head.eps)

    def run(span):
        a, b = span
        if head is None:
            _ivf_sweep(q[a:b], centroids_t, nprobe, x, offsets, sims[a:b], rows[a:b])
        else:
            _ivf_sweep_heads(q[a:b], qh[a:b], qt[a:b], centroids_t, nprobe, x, heads, tails, eps, offsets,
                             sims[a:b], rows[a:b])

    if threads <= 1 or len(spans) == 1:
        for span in spans:
            run(span)
    else:
        # list() re-raises the first worker exception here.
        list(_executor(threads).map(run, spans))
    return sims, rows


def knn_search_ivf(queries: torch.Tensor, bank, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The "ivf" backend: k nearest neighbours of CPU queries in an IVF bank by the batched scan,
    (distances float32 [B, k] ascending, stored rows int64 [B, k]; the caller maps rows to ids).

    ``queries`` [B, D] holds valid rows only (finite, nonzero; the caller masks the others).
    :func:`search_ivf` probes ``bank.search_nprobe(k)`` lists (the bank's nprobe, more for large
    k); every query for which the probed lists held fewer than k vectors is searched again
    exactly (FAISS's brute force, :func:`~.faiss_cpu.search_flat`), so each row always has k
    real neighbours. A bank without lists is refused before this is called
    (:class:`~hitl_triage.kernels.knn.KnnRegistry`).
    """
    from .exact import dot_error_bound

    q = unit_queries(queries).numpy()
    vectors = bank.host_unit()
    nprobe = bank.search_nprobe(k)
    prefilter = bank.prefilter()
    head = None
    if prefilter.rotation is not None:
        qh, qt = prefilter.queries(q)
        head = HeadScan(qh, qt, prefilter.heads, prefilter.tails, prefilter.eps + dot_error_bound(q.shape[1]))
    sims, rows = search_ivf(q, vectors, bank.lists, nprobe, k, threads=knn_threads(), head=head)
    sims = sims.astype(np.float64)
    short = np.flatnonzero(rows[:, -1] < 0)
    if short.size:
        logger.debug(
            "IVF search (nprobe=%d) found fewer than k=%d neighbours for %d of %d queries; "
            "searching those exactly", nprobe, k, short.size, len(q),
        )
        sims[short], rows[short] = search_flat(q[short], vectors, k)
    return torch.from_numpy(similarities_to_distances(sims)), torch.from_numpy(rows)


__all__ = ["HeadScan", "IvfLists", "assign", "group_by_list", "knn_search_ivf", "merged_order", "search_ivf", "sweep_rows",
           "train_centroids"]
