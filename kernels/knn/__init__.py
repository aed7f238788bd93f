"""k-NN out-of-distribution distance (Sun et al. 2022): how far an embedding lies from a bank.

Public: :func:`knn_distance` (the score), :func:`knn_search` (the same search with neighbour ids)
and :class:`KnnIndex` (a bank built once and searched many times), :func:`prepare_knn` (compile
ahead of the first batch) and :func:`set_faiss_threads` (the CPU search's threads).

Index kinds (:meth:`KnnIndex.build`): "flat" (exact), "ivf" (inverted file: the "ivf" backend
scans only the ``nprobe`` lists nearest each query, by the batched kernel of :mod:`.ivf_cpu`, 4-6x
faster than FAISS's own IVF scan; :func:`hitl_triage.engine.bank.tune_nprobe` sets ``nprobe`` to
the smallest value whose measured error of the k-th distance meets a bound) and "auto" (flat up
to :data:`AUTO_IVF_MIN_VECTORS` vectors, IVF beyond). Storing a bank is the engine's
(:mod:`hitl_triage.engine.bank`); this package only computes.

The float64 reference in :mod:`.reference` is the spec; the backends, chosen per call by
:data:`REGISTRY` (each name is what runs):

- "faiss": FAISS's exact brute force, on the CPU (float32, re-scored in float64) and, where a
  FAISS build with GPU support is installed, on CUDA queries. Searches every stored vector of any
  bank, an IVF bank's included.
- "ivf": the batched IVF scan of :mod:`.ivf_cpu` (numba, CPU only), approximate: only the probed
  lists are scanned, and queries they leave short of k are searched again exactly by FAISS's
  brute force. Needs a bank built with kind="ivf".
- "triton": exact search on the GPU, float16 operands, float32 accumulation, fused running top-k.
- "torch": exact tiled matmul + topk, CPU (float32) or CUDA (float16 operands, float32 results).
- "reference": float64, readable, slow (memory [B, N]).

Automatic choice: CPU queries -> ivf for an IVF bank, then faiss, torch, reference; CUDA queries
-> faiss (FAISS-GPU only), triton, torch (exact, whatever the bank's kind). A fallback from the
first choice is logged once. ``HITL_TRIAGE_KNN_BACKEND`` or ``backend=`` forces one; a forced
backend that cannot run (unknown, not importable, the wrong device, or "ivf" for a bank without
lists) raises :class:`~hitl_triage.kernels.BackendUnavailable`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import numbers
import os
from typing import Any, Callable

import numpy as np
import torch

from .._arrays import as_tensor, device_kind, returns_numpy, to_caller
from .._dispatch import Backend, BackendUnavailable, PassRegistry, cpu_and_cuda, cpu_only, triton_devices
from .faiss_cpu import faiss_devices, set_faiss_threads
from .index import AUTO_IVF_MIN_VECTORS, KnnIndex, RawBank
from .reference import valid_rows

logger = logging.getLogger(__name__)

QUERY_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)



@dataclasses.dataclass
class KnnRegistry(PassRegistry):
    """The k-NN pass's backends, whose automatic choice depends on the bank as well as on the
    device: for a bank with inverted lists (``index_kind="ivf"``) the backends of
    ``ivf_preference[device]`` come first, then ``preference[device]`` as for a flat bank. The
    backends in ``needs_lists`` search a bank's lists and refuse, even when forced, one without."""

    ivf_preference: dict[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)
    needs_lists: frozenset[str] = frozenset()

    def resolve(self, device_kind: str, requested: str | None = None, *,
                index_kind: str = "flat") -> tuple[str, Callable[..., Any]]:
        """``(backend name, implementation)`` for queries on ``device_kind`` against a bank of
        ``index_kind`` ("flat" or "ivf"; a raw array is "flat")."""
        source = "backend argument" if requested is not None else f"environment variable {self.env_var}"
        if requested is not None or os.environ.get(self.env_var):
            name, fn = super().resolve(device_kind, requested)
            if name in self.needs_lists and index_kind != "ivf":
                raise BackendUnavailable(
                    f"{self.pass_name} backend {name!r} (from the {source}) cannot serve a {index_kind} bank: "
                    "it scans the inverted lists of a KnnIndex built with kind='ivf'"
                )
            return name, fn
        if index_kind == "ivf":
            preferred = self.ivf_preference.get(device_kind, ())
            for name in preferred:
                fn = self._load(name) if device_kind in self.backends[name].devices() else None
                if fn is not None:
                    return name, fn
            if preferred and (device_kind, "ivf bank") not in self._warned:
                self._warned.add((device_kind, "ivf bank"))
                logger.warning(
                    "%s pass on %s: an IVF bank is searched exactly by the next backend available; skipped: %s",
                    self.pass_name, device_kind, ", ".join(f"{n} ({self._why_not(n, device_kind)})" for n in preferred),
                )
        return super().resolve(device_kind)


REGISTRY = KnnRegistry(
    pass_name="knn",
    backends={
        "faiss": Backend("faiss", f"{__name__}.faiss_cpu", "knn_search_faiss", faiss_devices),
        "ivf": Backend("ivf", f"{__name__}.ivf_cpu", "knn_search_ivf", cpu_only),
        "triton": Backend("triton", f"{__name__}.triton_gpu", "knn_search_triton", triton_devices),
        "torch": Backend("torch", f"{__name__}.torch_exact", "knn_search_torch", cpu_and_cuda),
        "reference": Backend("reference", f"{__name__}.reference", "knn_search_backend", cpu_and_cuda),
    },
    preference={"cpu": ("faiss", "torch", "reference"), "cuda": ("faiss", "triton", "torch")},
    ivf_preference={"cpu": ("ivf",)},
    needs_lists=frozenset({"ivf"}),
)

#: Largest k the triton backend takes; an automatic choice falls back to torch beyond it.
TRITON_MAX_K = 128


def knn_search(queries, bank, k: int, *, backend: str | None = None):
    """The k nearest bank vectors of each query, by Euclidean distance between unit vectors.

    Args:
        queries: [B, D] embeddings; float16, bfloat16, float32 or float64; numpy, torch (CPU or
            CUDA) or DLPack.
        bank: a :class:`KnnIndex`, or a raw array [N, D] (normalised for this call and searched
            exactly; it must live on the queries' device). Bank rows must be finite and nonzero.
        k: neighbours per query, 1 <= k <= N.
        backend: "faiss", "ivf", "triton", "torch" or "reference"; default from
            ``HITL_TRIAGE_KNN_BACKEND``, else chosen by the queries' device and the bank's kind
            ("ivf" for an IVF bank on the CPU, "faiss" for a flat one: see the module docstring).

    Returns:
        (distances float32 [B, k], ids int64 [B, k]): distances in [0, 2] in ascending order
        (sqrt(max(0, 2 - 2 cos))), ids the bank rows. numpy in, numpy out; torch in, torch out on
        the queries' device. A query that holds NaN/inf or is all zero gets NaN distances and ids
        -1 (it cannot be evaluated). Equal distances may list their ids in any order.

    An IVF :class:`KnnIndex` is searched approximately by the "ivf" backend (CPU; only the
    ``nprobe`` nearest lists are scanned; every query still gets k real neighbours: those the
    probed lists leave short are searched again exactly); every other backend searches all its
    stored vectors exactly. Queries are normalised by the spec of :mod:`.exact`
    (:func:`~.reference.unit_queries`), the same bits on every device.
    """
    found = _search(queries, bank, k, backend)
    return to_caller(found.distances, found.numpy_out), to_caller(found.ids, found.numpy_out)


@dataclasses.dataclass
class _Found:
    """One search as the dispatcher ran it: the validated queries with invalid rows replaced
    (``safe``), the bank view, the backend that ran, and its results (NaN / -1 on invalid rows)."""

    safe: torch.Tensor
    target: Any
    backend: str
    distances: torch.Tensor
    ids: torch.Tensor
    numpy_out: bool


def _search(queries, bank, k: int, backend: str | None) -> _Found:
    numpy_out = returns_numpy(queries)
    q = as_tensor(queries, "queries")
    if q.ndim != 2:
        raise ValueError(f"queries: expected shape [B, D], found {tuple(q.shape)}")
    if q.dtype not in QUERY_DTYPES:
        raise TypeError(f"queries: expected float16, bfloat16, float32 or float64, found {q.dtype}")
    kind = device_kind(q)
    target = bank if isinstance(bank, KnnIndex) else _raw_bank(bank, q)
    if q.shape[1] != target.dim:
        raise ValueError(f"queries: expected D={target.dim} (the bank's dimension), found D={q.shape[1]}")
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 1 <= k <= target.ntotal:
        raise ValueError(f"k: expected an integer in [1, N={target.ntotal}] (the bank's size), found {k!r}")
    k = int(k)
    name, impl = REGISTRY.resolve(kind, backend, index_kind=target.kind)
    if name == "triton" and k > TRITON_MAX_K and backend is None and not _env_forced():
        logger.warning("k=%d exceeds the triton backend's limit of %d: searching with torch", k, TRITON_MAX_K)
        name, impl = REGISTRY.resolve(kind, "torch")
    batch = q.shape[0]
    if batch == 0:
        distances = torch.empty((0, k), dtype=torch.float32, device=q.device)
        ids = torch.empty((0, k), dtype=torch.int64, device=q.device)
        return _Found(q, target, name, distances, ids, numpy_out)
    valid = valid_rows(q)
    # Rows that cannot be normalised are searched as a harmless all-ones row and masked after,
    # so no backend ever sees NaN, inf or a zero norm.
    all_valid = bool(valid.all()) if kind == "cpu" else False
    q_safe = q.contiguous() if all_valid else torch.where(valid[:, None], q, torch.ones((), dtype=q.dtype, device=q.device)).contiguous()
    distances, rows = impl(q_safe, target, k)
    distances = distances.to(torch.float32)
    ids = target.rows_to_ids(rows.to(torch.int64))
    if not all_valid:
        distances = torch.where(valid[:, None], distances, torch.full_like(distances, float("nan")))
        ids = torch.where(valid[:, None], ids, torch.full_like(ids, -1))
    return _Found(q_safe, target, name, distances, ids, numpy_out)


def knn_distance(queries, bank, k: int, *, backend: str | None = None):
    """The out-of-distribution score: distance from each query to its k-th nearest bank vector.

    Same arguments as :func:`knn_search`; returns float32 [B] in [0, 2] (NaN for queries that
    hold NaN/inf or are all zero), numpy in, numpy out; torch in, torch out on the queries'
    device. It is the last column of :func:`knn_search`'s distances.
    """
    distances, _ = knn_search(queries, bank, k, backend=backend)
    return distances[:, -1].copy() if returns_numpy(queries) else distances[:, -1].contiguous()


def knn_distance_certified(queries, bank, k: int, threshold: float, *, backend: str | None = None):
    """The k-th-neighbour distance with every decision "distance > ``threshold``" exact.

    Same arguments as :func:`knn_distance`, plus the threshold (a number; -inf re-scores every
    row, +inf none). The search runs on the backend :func:`knn_search` would choose; then every
    row whose distance an exact search could put above ``threshold`` (its reported distance, or
    that distance within the backend's error bound: :func:`similarity_error`) is re-scored
    exactly (:mod:`.exact`). So for every row ``distance > threshold`` equals the exact search's
    answer, and every re-scored row's distance is the exact one, bit for bit, whatever the
    backend, device or batch: on the CPU and on CUDA alike.

    Returns (distances float32 [B], rescored bool [B]: the rows re-scored exactly), numpy in,
    numpy out; torch in, torch out on the queries' device. NaN (invalid) rows are never
    re-scored. The exact backends on the CPU ("faiss") re-score nothing.
    """
    try:
        t = float(threshold)
    except (TypeError, ValueError):
        raise TypeError(f"threshold: expected a number, found {type(threshold).__name__}") from None
    if math.isnan(t):
        raise ValueError("threshold: expected a number or +-inf, found nan")
    found = _search(queries, bank, k, backend)
    kth = found.distances[:, -1].contiguous()
    rescored = torch.zeros(kth.shape, dtype=torch.bool, device=kth.device)
    eps = similarity_error(found.backend, kth.device.type, found.target.dim)
    if eps is not None and kth.numel() and t < math.inf:
        from .exact import CONVERSION_ERROR, BOUND_SLACK

        # A lower bound on each row's exact k-th similarity: the similarity behind the reported
        # distance, less the backend's error bound; the exact distance is at most its distance.
        kth64 = kth.to(torch.float64)
        floor = 1.0 - kth64 * kth64 / 2.0 - (eps + CONVERSION_ERROR)
        upper = torch.sqrt(torch.clamp(2.0 - 2.0 * floor, min=0.0))
        rescored = torch.isfinite(kth) & ~(upper * (1.0 + BOUND_SLACK) <= t)
        rows = torch.nonzero(rescored).flatten()
        if rows.numel():
            kth[rows] = _exact_kth(found, rows, floor[rows], k)
    return to_caller(kth, found.numpy_out), to_caller(rescored, found.numpy_out)


def similarity_error(backend: str, device: str, dim: int) -> float | None:
    """Bound on |similarity a backend computes - the exact spec's| for unit rows of dimension
    ``dim`` (see :mod:`.exact`), or None for a backend whose distances are exact (FAISS's brute
    force re-scored in float64, on the CPU). The IVF scan's float32 dot products, torch's float32
    matmul on the CPU: the float32 bound; the reference (float64, re-normalising): twice that;
    the float16 GPU searches: the float16 bound (torch and FAISS-GPU may round their results to
    float16 as well)."""
    from .exact import dot_error_bound, float16_error_bound

    if backend == "faiss":
        return None if device == "cpu" else float16_error_bound(dim, float16_results=True)
    if backend == "ivf":
        return dot_error_bound(dim)
    if backend == "reference":
        return 2.0 * dot_error_bound(dim)
    if backend == "torch":
        return dot_error_bound(dim) if device == "cpu" else float16_error_bound(dim, float16_results=True)
    if backend == "triton":
        return float16_error_bound(dim)
    raise ValueError(f"backend: expected one of {sorted(REGISTRY.backends)}, found {backend!r}")


def _exact_kth(found: _Found, rows: torch.Tensor, floor: torch.Tensor, k: int) -> torch.Tensor:
    """Exact k-th distances (float32, on the queries' device) of the rows ``rows`` of a search:
    on the CPU by the fused scan of :mod:`.exact` (the backends that search on the CPU), else by
    its torch path (the GPU searches, also when Triton's interpreter runs them on the CPU)."""
    from .exact import exact_search_cpu, exact_search_torch
    from .faiss_cpu import similarities_to_distances
    from .reference import unit_queries

    q = unit_queries(found.safe[rows])
    if q.device.type == "cpu" and found.backend in CPU_RESCORED:
        sims, _ = exact_search_cpu(q.numpy(), found.target.host_unit(), found.target.prefilter(), k,
                                   floor.numpy())
        return torch.from_numpy(similarities_to_distances(sims[:, -1]))
    sims_t, _ = exact_search_torch(q, found.target, k)
    return torch.sqrt(torch.clamp(2.0 - 2.0 * sims_t[:, -1], min=0.0)).to(torch.float32)


#: Backends whose flagged rows the CPU scan re-scores (on CPU queries); the others use the torch path.
CPU_RESCORED = frozenset({"ivf", "reference", "faiss"})


def prepare_knn(bank: KnnIndex, k: int, device="cpu", *, backend: str | None = None) -> str:
    """Compile (or load from numba's disk cache) and import what will search ``bank`` for ``k``
    neighbours from ``device``, so that no batch pays for it, with the exact re-scoring of
    :func:`knn_distance_certified` and its pre-filter; returns the backend's name (the one
    :func:`knn_search` will choose). The IVF scan takes about 10 s to compile cold on two cores,
    0.2 s from the cache; :class:`~hitl_triage.engine.TriageEngine` calls this when it is built."""
    if not isinstance(bank, KnnIndex):
        raise TypeError(f"bank: expected a KnnIndex, found {type(bank).__name__}")
    device = torch.device(device)
    name, _ = REGISTRY.resolve(device.type, backend, index_kind=bank.kind)
    if bank.ntotal:
        probe = torch.as_tensor(np.array(bank.host_unit()[:1]), device=device)
        k = min(k, bank.ntotal)
        knn_search(probe, bank, k, backend=name)
        if name == "ivf":  # and the exact search of the queries its probed lists leave short
            knn_search(probe, bank, k, backend="faiss")
        # and the exact re-scoring of the rows near a threshold (its pre-filter is built here)
        knn_distance_certified(probe, bank, k, -math.inf, backend=name)
    return name


def _raw_bank(bank, q: torch.Tensor) -> RawBank:
    raw = RawBank(bank)
    if raw.device != q.device:
        raise ValueError(
            f"bank: expected an array on the queries' device ({q.device}), found {raw.device}; "
            "move it, or build a KnnIndex once (it keeps a copy on each device that searches it)"
        )
    return raw


def _env_forced() -> bool:
    return bool(os.environ.get(REGISTRY.env_var))


__all__ = [
    "AUTO_IVF_MIN_VECTORS", "KnnIndex", "KnnRegistry", "REGISTRY", "knn_distance", "knn_distance_certified", "knn_search",
    "prepare_knn", "set_faiss_threads", "similarity_error",
]
