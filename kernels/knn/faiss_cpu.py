"""The "faiss" backend, the CPU path of an index: FAISS's exact brute-force kernel for a flat
bank, the batched IVF scan of :mod:`.ivf_cpu` (over lists FAISS's k-means made) for an IVF bank,
and FAISS-GPU's brute-force kernel for CUDA queries where a FAISS build with GPU support is
installed.

FAISS is imported on first use only, and the CPU thread count is set then, deliberately (see
:func:`set_faiss_threads`), instead of inheriting whatever OpenMP picked at start-up.
"""

from __future__ import annotations

import functools
import logging
import os

import numpy as np
import torch

from .reference import unit_rows

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
    """Threads of the CPU k-NN search (see :func:`set_faiss_threads`)."""
    if _threads_set is None:
        set_faiss_threads(None)
    return _threads_set


def set_faiss_threads(threads: int | None = None) -> int:
    """Set the threads of the CPU k-NN search: FAISS's OpenMP threads (exact search, k-means)
    and the worker threads of the IVF scan; returns the number.

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
    """k nearest neighbours on the index's CPU path: (distances float32 [B, k] ascending, stored
    rows int64 [B, k]; the caller maps rows to ids).

    ``queries`` [B, D] holds valid rows only (finite, nonzero; the caller masks the others).
    On the CPU a flat bank is searched exactly with FAISS's brute-force inner-product kernel (the
    one ``IndexFlatIP.search`` runs); an IVF bank with the batched scan of :mod:`.ivf_cpu`,
    probing ``bank.search_nprobe(k)`` lists (the bank's nprobe, more for large k); every query for
    which the probed lists held fewer than k vectors is searched again exactly, so each row
    always has k real neighbours.
    CUDA queries (FAISS-GPU only) are searched exactly on the GPU against the bank's float16 copy,
    for flat and IVF banks alike.
    """
    if queries.is_cuda:
        return _search_gpu(queries, bank, k)
    faiss = faiss_module()
    q = np.ascontiguousarray(unit_rows(queries, torch.float32).numpy())
    vectors = bank.host_unit()
    if bank.lists is None:
        sims, rows = faiss.knn(q, vectors, k, metric=faiss.METRIC_INNER_PRODUCT)
    else:
        from .ivf_cpu import search_ivf

        nprobe = bank.search_nprobe(k)
        sims, rows = search_ivf(q, vectors, bank.lists, nprobe, k, threads=knn_threads())
        short = np.flatnonzero(rows[:, -1] < 0)
        if short.size:
            logger.debug(
                "IVF search (nprobe=%d) found fewer than k=%d neighbours for %d of %d queries; "
                "searching those exactly", nprobe, k, short.size, len(q),
            )
            sims[short], rows[short] = faiss.knn(q[short], vectors, k, metric=faiss.METRIC_INNER_PRODUCT)
    distances = np.sqrt(np.maximum(2.0 - 2.0 * sims, 0.0))
    return torch.from_numpy(distances), torch.from_numpy(rows)


@functools.lru_cache(maxsize=None)
def _gpu_resources(device_index: int):
    faiss = faiss_module()
    return faiss.StandardGpuResources()


def _search_gpu(queries: torch.Tensor, bank, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact search with FAISS-GPU's brute-force kernel, float16 operands, on the queries' GPU."""
    faiss = faiss_module()
    import faiss.contrib.torch_utils  # noqa: F401 - lets faiss.knn_gpu take torch CUDA tensors

    device = queries.device
    q = unit_rows(queries, torch.float32).to(torch.float16).contiguous()
    vectors = bank.unit_on(device, torch.float16)
    sims, ids = faiss.knn_gpu(
        _gpu_resources(device.index or 0), q, vectors, k,
        metric=faiss.METRIC_INNER_PRODUCT, device=device.index or 0,
    )
    distances = torch.sqrt(torch.clamp(2.0 - 2.0 * sims.float(), min=0.0))
    return distances, ids.long()
