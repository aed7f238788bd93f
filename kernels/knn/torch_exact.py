"""The "torch" backend: exact search as tiled matmul + topk, on the CPU or a CUDA device.

Queries and bank are cut into tiles so that one similarity tile [query rows, bank rows] never
exceeds :data:`TILE_BYTES`, whatever B and N: each tile's top-k is merged into a running top-k per
query. On the CPU operands and results are float32; on CUDA operands are float16 (the bank's
cached half copy) with float32 results where ``torch.mm(..., out_dtype=torch.float32)`` exists,
else float16 results upcast (a rounding of the cosine of at most 2**-11 more).

It is the fallback where FAISS or Triton are missing and the "matmul + topk" comparator of the
benchmarks.
"""

from __future__ import annotations

import logging

import torch

from .reference import unit_queries

logger = logging.getLogger(__name__)

#: Bytes of one float32 similarity tile. 128 MiB keeps the working set small next to any bank
#: while each matmul and topk stays large enough to run at full speed: on the 2-core CPU, tiles
#: of 100k bank rows ran 1.2-1.5x faster than tiles of 32k and 2-3x faster than tiles of 4-8k.
TILE_BYTES = 128 << 20
#: Bank rows per tile (a bank up to this size is one tile wide).
BANK_TILE = 1 << 17

_mm_out_dtype_ok = True


def tile_shape(batch: int, n_bank: int, k: int, tile_bytes: int = TILE_BYTES) -> tuple[int, int]:
    """(query rows, bank rows) of one similarity tile within ``tile_bytes`` of float32."""
    bank_rows = max(min(n_bank, BANK_TILE), min(k, n_bank))
    query_rows = max(1, min(batch, tile_bytes // (4 * bank_rows)))
    return query_rows, bank_rows


def knn_search_torch(queries: torch.Tensor, bank, k: int, *, tile_bytes: int = TILE_BYTES
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """k nearest neighbours by tiled matmul + topk: (distances float32 [B, k] ascending,
    ids int64 [B, k]) on the queries' device.

    ``queries`` [B, D] holds valid rows only (finite, nonzero; the caller masks the others). An
    IVF bank is searched exactly over its stored vectors. Memory beyond inputs and outputs: one
    similarity tile of at most ``tile_bytes`` plus its top-k.
    """
    device = queries.device
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    q = unit_queries(queries).to(dtype)
    vectors = bank.unit_on(device, dtype)
    batch, n_bank = q.shape[0], vectors.shape[0]
    query_rows, bank_rows = tile_shape(batch, n_bank, k, tile_bytes)
    best_sims = torch.empty((batch, k), dtype=torch.float32, device=device)
    best_ids = torch.empty((batch, k), dtype=torch.int64, device=device)
    for q0 in range(0, batch, query_rows):
        q_tile = q[q0:q0 + query_rows]
        sims = ids = None
        for n0 in range(0, n_bank, bank_rows):
            tile = _similarities(q_tile, vectors[n0:n0 + bank_rows])
            tile_sims, tile_ids = torch.topk(tile, min(k, tile.shape[1]), dim=1)
            tile_ids += n0
            if sims is None:
                sims, ids = tile_sims, tile_ids
            else:
                assert ids is not None  # set with sims
                sims = torch.cat((sims, tile_sims), dim=1)
                ids = torch.cat((ids, tile_ids), dim=1)
                sims, keep = torch.topk(sims, k, dim=1)
                ids = torch.gather(ids, 1, keep)
        assert sims is not None and ids is not None  # the bank loop ran at least once
        best_sims[q0:q0 + query_rows] = sims
        best_ids[q0:q0 + query_rows] = ids
    distances = torch.sqrt(torch.clamp(2.0 - 2.0 * best_sims, min=0.0))
    return distances, best_ids


def _similarities(q: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """float32 [q rows, b rows] cosines of unit rows; half operands accumulate in float32."""
    global _mm_out_dtype_ok
    if q.dtype == torch.float32:
        return q @ b.T
    if _mm_out_dtype_ok:
        try:
            return torch.mm(q, b.T, out_dtype=torch.float32)
        except (RuntimeError, TypeError, NotImplementedError) as exc:
            _mm_out_dtype_ok = False
            logger.warning(
                "torch.mm(out_dtype=float32) is unavailable (%s); half-precision similarities "
                "are rounded to %s before the top-k", exc, q.dtype,
            )
    return (q @ b.T).float()
