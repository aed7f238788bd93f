"""The spec of the k-NN out-of-distribution pass, written for clarity in float64 torch.

For a query q and bank vectors b_0 .. b_{N-1} (all of dimension D):

    q_hat = q / ||q||,   b_hat_j = b_j / ||b_j||                 L2 normalisation
    cos_j = q_hat . b_hat_j                                       cosine similarity
    d_j   = sqrt(max(0, 2 - 2 cos_j))  = ||q_hat - b_hat_j||      Euclidean distance, in [0, 2]

The k nearest neighbours are the k smallest d_j, listed in ascending order of distance, ties broken
by the lower bank row index. The out-of-distribution score (Sun et al. 2022, "Out-of-distribution
detection with deep nearest neighbors") is the k-th of them.

A query that holds NaN or +-inf, or whose components are all zero, cannot be normalised: its
distances are NaN and its neighbour ids -1. Bank rows must be finite with a nonzero norm (the
public functions refuse anything else before searching).

Normalisation divides by the largest absolute component first, so huge or tiny (subnormal) inputs
neither overflow nor underflow when squared; the result is the same unit vector.

**The exact float32 score** (what the backends normalise queries with, and what
:func:`~hitl_triage.kernels.knn.knn_distance_certified` returns for every row it re-scores) is
this spec evaluated on float32 unit rows by fixed IEEE steps, the same bits on every device:

    u     = x / max_j |x_j|                      float32 division (float64 input: float64, rounded)
    n     = sqrt(sum_j u_j ** 2)                 float64, summed in index order j = 0 .. D-1
    q_j   = float32(u_j / n)                     the unit query (:func:`unit_queries`)
    s(b)  = sum_j float64(q_j) * float64(b_j)    float64, in index order, for each stored unit row b
    d_k   = float32(sqrt(max(0, 2 - 2 s_k)))     s_k the k-th largest s(b); the sqrt in float64

(:func:`dot64_torch` here, :func:`~.faiss_cpu.dot64` in numba). A float32 x float32 product is
exact in float64, so fused multiply-adds change nothing; the sums run in index order.
"""

from __future__ import annotations

import torch


def unit_rows(x: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Rows of ``x`` [n, D] scaled to unit L2 norm, returned in ``dtype``.

    Computed in float64 for float64 input or ``dtype`` float64, else in float32. Rows that are
    all zero or hold non-finite values come back as NaN rows (callers mask them).
    """
    work = torch.float64 if torch.float64 in (x.dtype, dtype) else torch.float32
    y = x.to(work)
    scale = y.abs().amax(dim=1, keepdim=True)
    y = y / scale
    y = y / torch.linalg.vector_norm(y, dim=1, keepdim=True)
    return y.to(dtype)


def unit_queries(x: torch.Tensor) -> torch.Tensor:
    """float32 [B, D] unit rows of ``x`` by the exact float32 spec (module docstring), on ``x``'s
    device. Rows must be finite and nonzero (the caller masks the others).

    The float64 sum of squares runs in index order by one elementwise operation per dimension,
    so the CPU and a GPU give the same bits (a reduction kernel's order is the device's); the
    squares of float32 values are exact in float64."""
    if x.dtype == torch.float64:
        u = (x / x.abs().amax(dim=1, keepdim=True)).to(torch.float32)
    else:
        x32 = x.to(torch.float32)
        u = x32 / x32.abs().amax(dim=1, keepdim=True)
    columns = u.T.to(torch.float64).contiguous()  # [D, B]: one contiguous row per dimension
    acc = torch.zeros(u.shape[0], dtype=torch.float64, device=u.device)
    for j in range(columns.shape[0]):
        acc = acc + columns[j] * columns[j]
    return (u.to(torch.float64) / torch.sqrt(acc)[:, None]).to(torch.float32).contiguous()


def dot64_torch(q: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The exact spec's similarity of float32 unit rows ``q`` [n, D] with float32 ``b`` [n, m, D]:
    float64 [n, m], summed in index order by one elementwise operation per dimension (the bits
    of :func:`~.faiss_cpu.dot64`)."""
    q64 = q.to(torch.float64)
    b64 = b.to(torch.float64)
    acc = torch.zeros(b.shape[:2], dtype=torch.float64, device=b.device)
    for d in range(q.shape[1]):
        acc = acc + q64[:, None, d] * b64[:, :, d]
    return acc


def valid_rows(x: torch.Tensor) -> torch.Tensor:
    """bool [n]: the row is finite everywhere and not all zero, so it has a direction."""
    return torch.isfinite(x).all(dim=1) & (x != 0).any(dim=1)


def knn_search_reference(queries, bank, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact k nearest neighbours in float64.

    Args:
        queries: [B, D] float tensor (any float dtype, any device).
        bank: [N, D] float tensor of valid rows (finite, nonzero); normalised here.
        k: number of neighbours, 1 <= k <= N.

    Returns:
        (distances float64 [B, k] ascending, ids int64 [B, k]) on the queries' device; rows of
        invalid queries hold NaN and -1.
    """
    q = torch.as_tensor(queries)
    b = torch.as_tensor(bank).to(q.device)
    valid = valid_rows(q)
    q_hat = unit_rows(torch.where(valid[:, None], q, torch.ones_like(q)))
    b_hat = unit_rows(b)
    cos = q_hat @ b_hat.T
    distance = torch.sqrt(torch.clamp(2.0 - 2.0 * cos, min=0.0))
    # A stable sort keeps equal distances in row order: ties go to the lower id.
    order = torch.sort(distance, dim=1, stable=True).indices[:, :k]
    nearest = torch.gather(distance, 1, order)
    nan = torch.full_like(nearest, float("nan"))
    return (
        torch.where(valid[:, None], nearest, nan),
        torch.where(valid[:, None], order, torch.full_like(order, -1)),
    )


def knn_search_backend(queries: torch.Tensor, bank, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference as a dispatchable backend (exact, slow, memory [B, N] float64).

    ``bank`` is the internal bank view (see :mod:`.index`): a raw bank is searched from its
    original values, a :class:`~hitl_triage.kernels.knn.KnnIndex` from its stored unit vectors;
    an IVF index is searched exactly.
    """
    return knn_search_reference(queries, bank.reference_vectors(queries.device), k)
