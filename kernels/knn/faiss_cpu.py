"""The "faiss" backend: exact search by FAISS's brute-force kernel, on the CPU (re-scored in
float64, see :func:`search_flat`) and, where a FAISS build with GPU support is installed, on the
GPU. It searches every stored vector of a bank, flat or IVF alike; the IVF scan is the "ivf"
backend (:mod:`.ivf_cpu`), which uses :func:`search_flat` for the queries its lists leave short.

FAISS is imported on first use only, and the CPU thread count is set then, deliberately (see
:func:`set_faiss_threads`), instead of inheriting whatever OpenMP picked at start-up.
"""

from __future__ import annotations

import functools
import logging
import os

import numpy as np
import torch
from numba import njit

from .reference import unit_queries

logger = logging.getLogger(__name__)

THREADS_ENV = "HITL_TRIAGE_FAISS_THREADS"

_threads_set: int | None = None


def faiss_module():
    """The ``faiss`` module, with its thread count configured on the first call."""
    import faiss

    if _threads_set is None:
        set_faiss_threads(None)
    return faiss


def knn_threads() -> int:
    """Threads of the CPU k-NN search, FAISS's and the "ivf" backend's (see :func:`set_faiss_threads`)."""
    if _threads_set is None:
        set_faiss_threads(None)
    assert _threads_set is not None  # set_faiss_threads sets it
    return _threads_set


def set_faiss_threads(threads: int | None = None) -> int:
    """Set the threads of the CPU k-NN search: FAISS's OpenMP threads (exact search, k-means)
    and the worker threads of the "ivf" backend's scan; returns the number.

    ``threads`` None means: the environment variable ``HITL_TRIAGE_FAISS_THREADS`` if set, else
    the number of CPUs this process may run on (its affinity mask, which respects container and
    taskset limits, unlike OpenMP's default of every core of the machine). The setting is
    process-wide, as it is in FAISS.

    Why FAISS with one thread used to beat two on the shared 2-core machine: torch, numba and
    FAISS each run an OpenMP pool, and with OpenMP's default wait policy idle workers spin.
    Measured around a 262k-row numba signal pass and a torch op (20k bank, 10k queries), with
    OMP_WAIT_POLICY=ACTIVE the IVF search took 2x as long as with PASSIVE (the other pools'
    spinning workers held the cores), and a spinning or descheduled second FAISS thread made
    FAISS's statically split parallel loops wait for it. The IVF scan here uses plain threads
    taking chunks from a queue, so it neither spins nor waits for a slow core; the passive
    policy that :mod:`hitl_triage.kernels` sets takes effect only if it is in the environment
    before torch is imported (torch reads it when it loads its OpenMP runtime).
    """
    global _threads_set
    import faiss

    source = "argument"
    if threads is None:
        env = os.environ.get(THREADS_ENV)
        if env:
            source = f"environment variable {THREADS_ENV}"
            try:
                threads = int(env)
            except ValueError:
                raise ValueError(f"{THREADS_ENV}: expected a positive integer, found {env!r}") from None
        else:
            source = "CPU affinity"
            threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if threads < 1:
        raise ValueError(f"threads ({source}): expected a positive integer, found {threads}")
    faiss.omp_set_num_threads(threads)
    _threads_set = threads
    logger.debug("FAISS uses %d OpenMP threads (from the %s)", threads, source)
    return threads


@functools.lru_cache(maxsize=1)
def faiss_has_gpu() -> bool:
    """True when the installed FAISS was built with GPU support and sees a CUDA device."""
    try:
        import faiss
    except ImportError:
        return False
    return hasattr(faiss, "StandardGpuResources") and torch.cuda.is_available() and faiss.get_num_gpus() > 0


def faiss_devices() -> frozenset[str]:
    """Device kinds the "faiss" backend serves: the CPU, and CUDA with a FAISS-GPU build."""
    return frozenset({"cpu", "cuda"}) if faiss_has_gpu() else frozenset({"cpu"})


def knn_search_faiss(queries: torch.Tensor, bank, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact k nearest neighbours by FAISS: (distances float32 [B, k] ascending, stored rows
    int64 [B, k]; the caller maps rows to ids).

    ``queries`` [B, D] holds valid rows only (finite, nonzero; the caller masks the others).
    CPU queries are searched with FAISS's brute-force inner-product kernel (the one
    ``IndexFlatIP.search`` runs) over every stored vector, re-scored in float64
    (:func:`search_flat`); CUDA queries (FAISS-GPU only) on the GPU against the bank's float16
    copy. A flat bank and an IVF bank are searched alike (an IVF bank's lists are not used).
    """
    if queries.is_cuda:
        return _search_gpu(queries, bank, k)
    q = unit_queries(queries).numpy()
    sims, rows = search_flat(q, bank.host_unit(), k)
    return torch.from_numpy(similarities_to_distances(sims)), torch.from_numpy(rows)


def similarities_to_distances(sims: np.ndarray) -> np.ndarray:
    """float32 distances sqrt(max(0, 2 - 2 s)) of unit-vector inner products, computed in float64
    (d = sqrt(2 - 2 s) loses digits as s -> 1)."""
    return np.sqrt(np.maximum(2.0 - 2.0 * np.asarray(sims, np.float64), 0.0)).astype(np.float32)


#: Candidates beyond k that the exact flat search re-scores (see :func:`search_flat`).
RESCORE_EXTRA = 4


def search_flat(q: np.ndarray, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact k largest inner products (sims float64 [B, k] descending, rows int64 [B, k]; -inf
    and -1 past the bank's size), the same for a row whatever batch it comes in.

    FAISS's brute force alone is not: it takes a per-vector SIMD loop for fewer than 20 queries
    and BLAS blocks above, and BLAS's edge kernels round differently by position, so one row's
    k-th distance moved by up to 2.4e-7 between batch splits (697 of 3,000 rows differed when
    searched 7 at a time) and a decision on the OOD threshold could flip on a retry. So FAISS
    picks k + RESCORE_EXTRA candidates and :func:`_rescore` computes their inner products again
    in float64 by one compiled loop, keeping the k best (ties to the lower row). A row's result
    then depends on the batch only if more than RESCORE_EXTRA vectors sit within float32
    rounding (~3e-7) of its k-th neighbour, and duplicates of one vector count once. The cost
    was within the noise of the search itself (8,192 vectors, 50k queries, 2-core EPYC).
    """
    faiss = faiss_module()
    candidates = min(vectors.shape[0], k + RESCORE_EXTRA)
    _, rows = faiss.knn(q, vectors, candidates, metric=faiss.METRIC_INNER_PRODUCT)
    sims = np.full((q.shape[0], k), -np.inf, dtype=np.float64)
    best = np.full((q.shape[0], k), -1, dtype=np.int64)
    _rescore(q, vectors, np.ascontiguousarray(rows, dtype=np.int64), sims, best)
    return sims, best


@njit(cache=True, nogil=True)
def dot64(q, i, vectors, row):
    """The exact spec's similarity (:mod:`.reference`) of row i of ``q`` and row ``row`` of
    ``vectors`` (float32 unit rows): float64 products summed in index order. No fast-math: the
    order is the spec, so :func:`~.reference.dot64_torch` gives the same bits on a GPU (it costs
    a few microseconds per query for the k + RESCORE_EXTRA candidates)."""
    acc = 0.0
    for d in range(q.shape[1]):
        acc += np.float64(q[i, d]) * np.float64(vectors[row, d])
    return acc


@njit(inline="always")
def insert_sorted(sims, rows, n, s, row):
    """Insert (s, row) into the first n entries of (sims descending, rows ascending on ties),
    growing them to n + 1 (insertion: there are a handful)."""
    p = n
    while p > 0 and (sims[p - 1] < s or (sims[p - 1] == s and rows[p - 1] > row)):
        sims[p] = sims[p - 1]
        rows[p] = rows[p - 1]
        p -= 1
    sims[p] = s
    rows[p] = row


@njit(cache=True, nogil=True)
def _rescore(q, vectors, candidates, out_sims, out_rows):
    k = out_sims.shape[1]
    m = candidates.shape[1]
    sims = np.empty(m, dtype=np.float64)
    rows = np.empty(m, dtype=np.int64)
    for i in range(q.shape[0]):
        n = 0
        for j in range(m):
            row = candidates[i, j]
            if row < 0:
                continue
            insert_sorted(sims, rows, n, dot64(q, i, vectors, row), row)
            n += 1
        for j in range(min(n, k)):
            out_sims[i, j] = sims[j]
            out_rows[i, j] = rows[j]


@functools.lru_cache(maxsize=None)
def _gpu_resources(device_index: int):
    faiss = faiss_module()
    return faiss.StandardGpuResources()


def _search_gpu(queries: torch.Tensor, bank, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact search with FAISS-GPU's brute-force kernel, float16 operands, on the queries' GPU."""
    faiss = faiss_module()
    import faiss.contrib.torch_utils  # noqa: F401 - lets faiss.knn_gpu take torch CUDA tensors

    device = queries.device
    q = unit_queries(queries).to(torch.float16).contiguous()
    vectors = bank.unit_on(device, torch.float16)
    sims, ids = faiss.knn_gpu(
        _gpu_resources(device.index or 0), q, vectors, k,
        metric=faiss.METRIC_INNER_PRODUCT, device=device.index or 0,
    )
    distances = torch.sqrt(torch.clamp(2.0 - 2.0 * sims.float(), min=0.0))
    return distances, ids.long()
