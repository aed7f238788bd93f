"""The "triton" backend: exact k-NN on the GPU's matrix units with a fused running top-k.

One program owns BLOCK_M queries and a contiguous slice of the bank. It walks the slice in tiles
of BLOCK_N bank vectors; for each tile it computes the cosines [BLOCK_M, BLOCK_N] with ``tl.dot``
on float16 unit vectors, accumulating in float32, and merges them at once into a running top-k
kept in registers ([BLOCK_M, TOP_K] similarities and ids). The [B, N] similarity matrix never
exists; what a program keeps is independent of N.

The merge. Each row keeps ``floor``, the smallest similarity on its list (-inf until the list is
full). A tile element can only enter the list if it beats the floor, so the kernel counts those
per row and runs as many extraction rounds as the largest count (at most k): each round takes
every row's best remaining element of the tile, puts it in place of the row's current minimum when
it beats the floor, and removes it from the tile. Once the lists fill, few elements of a tile beat
the floors, so most tiles should need few rounds: the cost is the matmul, a compare and a count per
element, plus the rounds (a model, not yet measured on a GPU).

Parallelism and memory. The bank is split across a second grid axis when there are too few query
blocks to fill the GPU (small batches); each split writes its own top-k, and a ``torch.topk`` on the
device merges the splits' [B, splits * k] candidates (and sorts them). Queries go through in chunks of
at most QUERY_CHUNK rows; beyond inputs and outputs a chunk needs its float16 copy (rows * D * 2
bytes: 64 MiB at D=128) and the candidate buffers (splits * rows * k * 8 bytes). Splits are only
used while the query blocks number fewer than four per SM, so splits * rows stays below about
4 * SMs * BLOCK_M (34 MB of candidates at k=128 on a 132-SM H100); with one split the buffers are
rows * k * 8 bytes (at most 256 MiB at k=128). Nothing depends on N.

k is limited to MAX_K (128): the running list lives in registers.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .._dispatch import triton_interpreting
from .reference import unit_queries

#: Largest k: the running list [BLOCK_M, TOP_K] must fit in registers.
MAX_K = 128
#: Queries normalised and searched per launch (bounds the float16 query copy and the buffers).
QUERY_CHUNK = 1 << 18
#: Each bank split scans at least this many tiles, so splitting never dominates the work.
MIN_TILES_PER_SPLIT = 16


@triton.jit
def _knn_topk_kernel(
    q_ptr, bank_ptr, out_sim_ptr, out_idx_ptr,
    n_queries, n_bank, dim, k, bank_per_split,
    stride_qm, stride_qd, stride_bn, stride_bd, stride_os, stride_om, stride_ok,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    D_CHUNKS: tl.constexpr, TOP_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_queries
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    slots = tl.arange(0, TOP_K)

    n_start = pid_s * bank_per_split
    n_stop = tl.minimum(n_start + bank_per_split, n_bank)

    if D_CHUNKS == 1:
        # The whole query block fits one operand: load it once for the entire scan.
        q = tl.load(
            q_ptr + rows[:, None] * stride_qm + offs_d[None, :] * stride_qd,
            mask=row_ok[:, None] & (offs_d[None, :] < dim), other=0.0,
        )

    # Slots past k hold +inf: argmin never picks them and they never lower the floor.
    top_sim = tl.where(slots[None, :] < k, float("-inf"), float("inf")) + tl.zeros([BLOCK_M, TOP_K], tl.float32)
    top_idx = tl.full([BLOCK_M, TOP_K], -1, tl.int32)
    floor = tl.full([BLOCK_M], float("-inf"), tl.float32)

    for n0 in range(n_start, n_stop, BLOCK_N):
        cols = n0 + offs_n
        col_ok = cols < n_stop
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for c in range(D_CHUNKS):
            d = c * BLOCK_D + offs_d
            if D_CHUNKS > 1:
                q = tl.load(
                    q_ptr + rows[:, None] * stride_qm + d[None, :] * stride_qd,
                    mask=row_ok[:, None] & (d[None, :] < dim), other=0.0,
                )
            # 64-bit row offsets: a bank of more than 2**31 half values (16M x 128) is plausible.
            b = tl.load(
                bank_ptr + cols[None, :].to(tl.int64) * stride_bn + d[:, None] * stride_bd,
                mask=col_ok[None, :] & (d[:, None] < dim), other=0.0,
            )
            acc = tl.dot(q, b, acc)
        sim = tl.where(row_ok[:, None] & col_ok[None, :], acc, float("-inf"))

        beats_floor = tl.sum((sim > floor[:, None]).to(tl.int32), axis=1)
        rounds = tl.minimum(tl.max(beats_floor, axis=0), k)
        for _ in range(rounds):
            best, best_col = tl.max(sim, axis=1, return_indices=True)
            take = best > floor
            slot = tl.argmin(top_sim, axis=1)
            put = (slots[None, :] == slot[:, None]) & take[:, None]
            top_sim = tl.where(put, best[:, None], top_sim)
            top_idx = tl.where(put, (n0 + best_col)[:, None], top_idx)
            floor = tl.min(top_sim, axis=1)
            sim = tl.where(offs_n[None, :] == best_col[:, None], float("-inf"), sim)

    out_offsets = pid_s * stride_os + rows[:, None] * stride_om + slots[None, :] * stride_ok
    out_mask = row_ok[:, None] & (slots[None, :] < k)
    tl.store(out_sim_ptr + out_offsets, top_sim, mask=out_mask)
    tl.store(out_idx_ptr + out_offsets, top_idx, mask=out_mask)


def block_config(dim: int, k: int) -> dict:
    """Block sizes for dimension ``dim`` and ``k`` neighbours; raises naming the size it cannot take.

    Every block is a power of two (``tl.arange``) and at least 16 on each ``tl.dot`` axis.
    """
    if not 1 <= k <= MAX_K:
        raise ValueError(f"k: the triton backend supports 1 <= k <= {MAX_K}, found {k} (use backend='torch')")
    if dim < 1:
        raise ValueError(f"dim: expected at least 1, found {dim}")
    block_d = min(128, max(16, triton.next_power_of_2(dim)))
    top_k = max(16, triton.next_power_of_2(k))
    # 8 warps, 64 bank vectors per tile, 64 queries per block (32 when k > 64): compiled for
    # sm_90 with Triton 3.9 this takes 93-237 registers per thread and spills nothing for every
    # k <= 128 and D up to 4096 (the test suite checks three of them); 4 warps, 128-wide tiles,
    # or 64 query rows with k > 64 spill the running list to local memory.
    return dict(
        BLOCK_M=64 if top_k <= 64 else 32,
        BLOCK_N=64,
        BLOCK_D=block_d,
        D_CHUNKS=triton.cdiv(dim, block_d),
        TOP_K=top_k,
        num_warps=8,
        num_stages=3,
    )


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def bank_splits(n_query_blocks: int, n_bank: int, block_n: int, device: torch.device) -> int:
    """Bank slices per query block: enough programs for about four waves on the GPU, but each
    slice at least MIN_TILES_PER_SPLIT tiles long. One under Triton's interpreter."""
    if device.type != "cuda":
        return 1
    target_programs = 4 * _sm_count(device.index or 0)
    wanted = triton.cdiv(target_programs, n_query_blocks)
    most = max(1, n_bank // (block_n * MIN_TILES_PER_SPLIT))
    return max(1, min(wanted, most))


def knn_search_triton(queries: torch.Tensor, bank, k: int, *, splits: int | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """k nearest neighbours with the fused kernel: (distances float32 [B, k] ascending, ids int64
    [B, k]) on the queries' device.

    ``queries`` [B, D] holds valid rows only (the caller masks the others); they are normalised
    in float32 and rounded to float16, as the bank's stored unit vectors are. An IVF bank is
    searched exactly over its stored vectors. ``splits`` forces the number of bank slices (tests).
    """
    if queries.device.type != "cuda" and not triton_interpreting():
        raise RuntimeError("queries: the triton backend needs CUDA tensors (or TRITON_INTERPRET=1), found cpu")
    device = queries.device
    vectors = bank.unit_on(device, torch.float16)
    n_bank, dim = vectors.shape
    if n_bank >= 2**31:
        raise ValueError(f"bank: the triton backend indexes rows with int32, found N={n_bank}")
    cfg = block_config(dim, k)
    launch = {name: cfg.pop(name) for name in ("num_warps", "num_stages")}
    if triton_interpreting():
        launch = {}
    batch = queries.shape[0]
    distances = torch.empty((batch, k), dtype=torch.float32, device=device)
    ids = torch.empty((batch, k), dtype=torch.int64, device=device)
    for q0 in range(0, batch, QUERY_CHUNK):
        q = unit_queries(queries[q0:q0 + QUERY_CHUNK]).to(torch.float16).contiguous()
        rows = q.shape[0]
        m_blocks = triton.cdiv(rows, cfg["BLOCK_M"])
        n_splits = splits or bank_splits(m_blocks, n_bank, cfg["BLOCK_N"], device)
        per_split = triton.cdiv(triton.cdiv(n_bank, n_splits), cfg["BLOCK_N"]) * cfg["BLOCK_N"]
        n_splits = triton.cdiv(n_bank, per_split)
        out_sim = torch.empty((n_splits, rows, k), dtype=torch.float32, device=device)
        out_idx = torch.empty((n_splits, rows, k), dtype=torch.int32, device=device)
        _knn_topk_kernel[(m_blocks, n_splits)](
            q, vectors, out_sim, out_idx,
            rows, n_bank, dim, k, per_split,
            q.stride(0), q.stride(1), vectors.stride(0), vectors.stride(1),
            out_sim.stride(0), out_sim.stride(1), out_sim.stride(2),
            **cfg, **launch,
        )
        # Merge the slices (and sort): the best k of splits * k candidates per query.
        cand_sim = out_sim.permute(1, 0, 2).reshape(rows, n_splits * k)
        cand_idx = out_idx.permute(1, 0, 2).reshape(rows, n_splits * k)
        sims, pos = torch.topk(cand_sim, k, dim=1)
        distances[q0:q0 + rows] = torch.sqrt(torch.clamp(2.0 - 2.0 * sims, min=0.0))
        ids[q0:q0 + rows] = torch.gather(cand_idx, 1, pos).long()
    return distances, ids
