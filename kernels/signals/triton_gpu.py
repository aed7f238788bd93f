"""Triton GPU backend of the ensemble-signal pass (definitions: :mod:`.reference`).

Three layers, as in Triton's fused-softmax tutorial and Liger-Kernel:

- two private ``@triton.jit`` kernels. ``_signals_fused_kernel`` is used when a whole member row
  of C classes fits one register tile (C <= ``FUSED_MAX_CLASSES``): a program takes a block of
  rows, loops over the members, loads each member's [rows, C] tile once and keeps the running mean
  probability, the entropy terms and a per-class vote histogram in registers, so the logits are
  read from memory exactly once. ``_signals_tiled_kernel`` serves larger C: per member, a first
  sweep over class tiles keeps an online max / exp-sum / raw argmax; a second sweep (whose loads hit
  the cache) builds the mean probabilities tile by tile with top-1/top-2 and the entropies, so
  registers stay bounded for any C and nothing overflows.
- :func:`_plan`, the one helper that picks the path, the block sizes, ``num_warps`` and the
  alignment hint (and raises, naming the offending size, for what it cannot serve);
  :func:`_launch` validates, allocates and launches.
- :func:`ensemble_signals_triton`, the backend entry registered as ``"triton"``.

Arithmetic: logits are upcast to float32 in registers (float16 and bfloat16 exactly); float64
logits are also computed in float32, after their finiteness is judged in float64 and their values
are clamped to the float32 range (differences below float32 resolution are lost, as in any float32
backend). Softmax uses exp2 with the temperature folded into one per-row scale ``log2(e) / T``;
exponents are floored at -200 (exp2 of that is exactly 0 in float32), which keeps ``p * log p``
terms free of ``0 * inf`` for padded classes, ±1e4 logits and tiny temperatures.

Layout: a row's classes are spread over several lanes of a warp, so each reduction over classes
costs warp shuffles. The fused kernel reduces only the max, the argmax and the softmax sum per
member (the rest accumulates element-wise and is reduced once), and tells the compiler the
largest power of two dividing C (``ALIGN``): the loads are then vectorised and each thread holds
ALIGN adjacent classes, so fewer lanes share a row (C=16 float32: 4 lanes; C=10: 8 lanes).
``python -m hitl_triage.kernels.signals.triton_offline`` compiles the kernels for sm_90 on a
machine without a GPU and reports registers and spills.

Under ``TRITON_INTERPRET=1`` the same kernels run on CPU tensors through Triton's interpreter
(tests only; far too slow for real use). There the plan keeps the largest row blocks (the
interpreter's cost grows with the number of programs), otherwise it is the GPU's plan.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging

import torch
import triton
import triton.language as tl

from .._dispatch import triton_interpreting
from . import EnsembleSignals

logger = logging.getLogger(__name__)

# A member row of up to this many classes (rounded up to a power of two) is one register tile.
FUSED_MAX_CLASSES = 2048
# Class tile of the two-sweep kernel for C above FUSED_MAX_CLASSES.
TILED_BLOCK_C = 1024
# Elements of one [BLOCK_R, BLOCK_C] tile, and per warp (8 per thread). With 8 per thread ptxas
# (sm_90a) gives the fused kernel 63-80 registers and no spills (16 per thread took 168 registers
# and spilled), so an SM holds 6 or more programs of 4 warps.
TILE_ELEMENTS = 1024
TILE_ELEMENTS_PER_WARP = 256
# The tiled kernel keeps per-member max / 1/sum / argmax in [BLOCK_R, BLOCK_M] registers.
MAX_MEMBERS_TILED = 1024
# Shrink row blocks so that mid-sized batches still spread over the GPU: at least this many
# programs (two per SM of an H100 / H200, which have 132) when the batch allows it.
MIN_PROGRAMS = 264
# Row indices, and offsets inside a row plus one tile, must stay below 2**31 (int32 arithmetic).
_INT32_SPAN = 2**31 - 2**15
# Largest tile a plan may ask for (Triton's own limit is 2**20 elements; registers give out sooner).
_MAX_TILE = 2**14

_LOG2E = tl.constexpr(1.4426950408889634)
_LN2 = tl.constexpr(0.6931471805599453)
_FLT_MAX = tl.constexpr(3.4028234663852886e38)
# exp2(x) is exactly 0 in float32 for x < -149; flooring at -200 keeps e * x finite (0 * -200).
_EXP2_FLOOR = tl.constexpr(-200.0)


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _row_scale(temps_ptr, index_ptr, rows, row_mask, HAS_INDEX: tl.constexpr, BLOCK_R: tl.constexpr):
    """log2(e) / T per row, [BLOCK_R] float32 (T from the table, by the row's index if any)."""
    if HAS_INDEX:
        which = tl.load(index_ptr + rows, mask=row_mask, other=0)
        t = tl.load(temps_ptr + which, mask=row_mask, other=1.0)
    else:
        t = tl.load(temps_ptr) + tl.zeros([BLOCK_R], dtype=tl.float32)
    # A denormal T would make the scale inf and 0 * inf = NaN for the row's maximum.
    return tl.minimum(_LOG2E / t, _FLT_MAX)


@triton.jit
def _load_tile(logits_ptr, row_start, offset, tile_cols, first_col, row_mask, n_classes,
               ALIGN: tl.constexpr, IS_FP64: tl.constexpr):
    """Load the logits of classes ``first_col + tile_cols`` of each row's slice starting at
    ``row_start + offset`` (element offsets; int64 row starts, as B * M * C may pass 2**31) as a
    float32 [BLOCK_R, BLOCK_C] tile, -inf outside the real rows and classes.

    Also returns the tile of ``logit * 0``: 0.0 where the logit is finite (or padding), NaN for
    NaN and ±inf, so that any sum it joins turns NaN exactly when the row is invalid.

    ALIGN, a power of two dividing C (hence M * C and every member's and tile's start), is passed
    on as alignment hints: the compiler then vectorises the loads and gives each thread ALIGN
    adjacent classes of a row, which shortens every reduction over classes. (One helper rather
    than three: the interpreter re-patches triton.language on every call of a jit function.)
    """
    start = tl.multiple_of(row_start + offset, ALIGN)
    mask = row_mask[:, None] & tl.max_constancy(first_col + tile_cols < n_classes, ALIGN)[None, :]
    raw = tl.load(logits_ptr + start[:, None] + tile_cols[None, :], mask=mask, other=0.0)
    if IS_FP64:
        # Judge finiteness in float64: 1e300 is a valid logit that float32 would call inf.
        zero = (raw * 0.0).to(tl.float32)
        x = tl.minimum(tl.maximum(raw, -_FLT_MAX), _FLT_MAX).to(tl.float32)
    else:
        x = raw.to(tl.float32)
        zero = x * 0.0
    x = tl.where(mask, x, float("-inf"))
    return x, zero


@triton.jit
def _max_first_argmax(x, cols, BLOCK_C: tl.constexpr):
    """Row max of ``x`` [BLOCK_R, BLOCK_C] and the lowest column index ``cols`` holding it.

    Two plain reductions (max.f32, then min.s32) rather than one over (value, index) pairs,
    whose combine costs about seven instructions per shuffle step on sm_90.
    """
    mx = tl.max(x, axis=1)
    arg = tl.min(tl.where(x == mx[:, None], cols[None, :], BLOCK_C), axis=1)
    return mx, arg


@triton.jit
def _times_and_renormalise(product, exponent, factor):
    """Multiply the running ``product`` (in [1, 2)) by ``factor`` >= 1 and move the result's
    binary exponent into the integer ``exponent``, so that log2 of the full product is
    ``exponent + log2(product)`` and never overflows: one log per row at the end instead of one
    per member (libdevice's log2f is about 20 instructions, and every lane of a row pays it)."""
    bits = (product * factor).to(tl.int32, bitcast=True)
    exponent += (bits >> 23) - 127
    product = ((bits & 0x007FFFFF) | 0x3F800000).to(tl.float32, bitcast=True)
    return product, exponent


@triton.jit
def _store_signals(
    pred_ptr, conf_ptr, margin_ptr, total_ptr, expected_ptr, mi_ptr, vote_ptr, valid_ptr,
    rows, row_mask, n_members,
    poison, pred, top1, top2, total_log2, log2_s_sum, pd_sum, vote_count,
):
    """Finish the per-row signals and store them; invalid rows get -1 and NaN.

    ``total_log2`` is H(p) in bits; ``log2_s_sum`` the sum over members of log2 of the softmax
    denominators and ``pd_sum`` the sum over members of sum_c p_mc * d_mc with d the shifted
    logits in log2 units, so that sum_m H(p_m) = ln2 * (log2_s_sum - pd_sum).
    """
    valid = poison == 0.0
    total = total_log2 * _LN2
    expected = (log2_s_sum - pd_sum) * _LN2 / n_members
    # One member cannot disagree with itself: exactly 0, not the float32 difference of two
    # formulas for the same entropy (which a zero threshold would see).
    mutual_info = tl.where(n_members > 1, tl.maximum(total - expected, 0.0), 0.0)
    vote = vote_count.to(tl.float32) / n_members
    nan = float("nan")
    tl.store(pred_ptr + rows, tl.where(valid, pred, -1), mask=row_mask)
    tl.store(conf_ptr + rows, tl.where(valid, top1, nan), mask=row_mask)
    tl.store(margin_ptr + rows, tl.where(valid, top1 - top2, nan), mask=row_mask)
    tl.store(total_ptr + rows, tl.where(valid, total, nan), mask=row_mask)
    tl.store(expected_ptr + rows, tl.where(valid, expected, nan), mask=row_mask)
    tl.store(mi_ptr + rows, tl.where(valid, mutual_info, nan), mask=row_mask)
    tl.store(vote_ptr + rows, tl.where(valid, vote, nan), mask=row_mask)
    tl.store(valid_ptr + rows, valid, mask=row_mask)


@triton.jit
def _signals_fused_kernel(
    logits_ptr, temps_ptr, index_ptr,
    pred_ptr, conf_ptr, margin_ptr, total_ptr, expected_ptr, mi_ptr, vote_ptr, valid_ptr,
    n_rows, n_members, n_classes,
    stride_row, stride_member,
    HAS_INDEX: tl.constexpr, IS_FP64: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, ALIGN: tl.constexpr,
):
    """One program: BLOCK_R rows, every member's row tile [BLOCK_R, BLOCK_C >= C] loaded once."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < n_rows
    cols = tl.arange(0, BLOCK_C)
    scale = _row_scale(temps_ptr, index_ptr, rows, row_mask, HAS_INDEX, BLOCK_R)
    row_start = rows.to(tl.int64) * stride_row

    # A row's classes are spread over several lanes of a warp, so every reduction over classes
    # costs shuffles: per member only the max, the argmax and the softmax denominator are
    # reduced; everything else accumulates element-wise in [BLOCK_R, BLOCK_C] registers and is
    # reduced once after the loop.
    s_product = tl.full([BLOCK_R], 1.0, dtype=tl.float32)  # prod_m s_m = s_product * 2**s_exponent
    s_exponent = tl.zeros([BLOCK_R], dtype=tl.int32)
    p_sum = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
    pd_acc = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
    votes = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.int32)
    for m in range(n_members):
        x, zero = _load_tile(logits_ptr, row_start, m * stride_member, cols, 0, row_mask, n_classes,
                             ALIGN, IS_FP64)
        # Max and argmax of the RAW logits (T > 0 keeps the argmax; dividing first could round
        # two distinct logits into a tie).
        mx, arg = _max_first_argmax(x, cols, BLOCK_C)
        d = tl.maximum((x - mx[:, None]) * scale[:, None], _EXP2_FLOOR)
        e = tl.exp2(d)
        s = tl.sum(e, axis=1)
        p_m = e * (1.0 / s)[:, None]
        # `zero` carries a non-finite logit into p_sum as NaN: validity without a reduction.
        p_sum += p_m + zero
        pd_acc += p_m * d
        s_product, s_exponent = _times_and_renormalise(s_product, s_exponent, s)
        votes += (cols[None, :] == arg[:, None]).to(tl.int32)

    poison = tl.sum(p_sum * 0.0, axis=1)
    pd_sum = tl.sum(pd_acc, axis=1)
    log2_s_sum = s_exponent.to(tl.float32) + tl.log2(s_product)
    p = p_sum * (1.0 / n_members)
    # Padded classes hold p = 0, never above a real class (C >= 2 and p sums to 1).
    top1, pred = _max_first_argmax(p, cols, BLOCK_C)
    is_pred = cols[None, :] == pred[:, None]
    top2 = tl.max(tl.where(is_pred, -1.0, p), axis=1)
    total_log2 = -tl.sum(tl.where(p > 0.0, p * tl.log2(p), 0.0), axis=1)
    vote_count = tl.sum(tl.where(is_pred, votes, 0), axis=1)
    _store_signals(
        pred_ptr, conf_ptr, margin_ptr, total_ptr, expected_ptr, mi_ptr, vote_ptr, valid_ptr,
        rows, row_mask, n_members,
        poison, pred, top1, top2, total_log2, log2_s_sum, pd_sum, vote_count,
    )


@triton.jit
def _signals_tiled_kernel(
    logits_ptr, temps_ptr, index_ptr,
    pred_ptr, conf_ptr, margin_ptr, total_ptr, expected_ptr, mi_ptr, vote_ptr, valid_ptr,
    n_rows, n_members, n_classes,
    stride_row, stride_member,
    HAS_INDEX: tl.constexpr, IS_FP64: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_M: tl.constexpr, ALIGN: tl.constexpr,
):
    """One program: BLOCK_R rows, classes in tiles of BLOCK_C, two sweeps (see module doc)."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < n_rows
    tile_cols = tl.arange(0, BLOCK_C)
    members = tl.arange(0, BLOCK_M)
    scale = _row_scale(temps_ptr, index_ptr, rows, row_mask, HAS_INDEX, BLOCK_R)
    row_start = rows.to(tl.int64) * stride_row

    # Sweep 1, per member: online max, softmax denominator and raw argmax over class tiles.
    poison = tl.zeros([BLOCK_R], dtype=tl.float32)
    log2_s_sum = tl.zeros([BLOCK_R], dtype=tl.float32)
    member_max = tl.zeros([BLOCK_R, BLOCK_M], dtype=tl.float32)
    member_inv_s = tl.zeros([BLOCK_R, BLOCK_M], dtype=tl.float32)
    member_arg = tl.full([BLOCK_R, BLOCK_M], -1, dtype=tl.int32)  # -1: padding never votes
    for m in range(n_members):
        run_max = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
        run_s = tl.zeros([BLOCK_R], dtype=tl.float32)
        run_arg = tl.zeros([BLOCK_R], dtype=tl.int32)
        for c0 in range(0, n_classes, BLOCK_C):
            x, zero = _load_tile(logits_ptr, row_start, m * stride_member + c0, tile_cols, c0, row_mask,
                                 n_classes, ALIGN, IS_FP64)
            poison += tl.sum(zero, axis=1)
            tile_max, tile_arg = _max_first_argmax(x, tile_cols, BLOCK_C)
            new_max = tl.maximum(run_max, tile_max)
            # Strictly greater: an equal maximum in a later tile keeps the lower index.
            run_arg = tl.where(tile_max > run_max, tile_arg + c0, run_arg)
            rescale = tl.exp2(tl.maximum((run_max - new_max) * scale, _EXP2_FLOOR))
            e = tl.exp2(tl.maximum((x - new_max[:, None]) * scale[:, None], _EXP2_FLOOR))
            run_s = run_s * rescale + tl.sum(e, axis=1)
            run_max = new_max
        log2_s_sum += tl.log2(run_s)
        is_m = members[None, :] == m
        member_max = tl.where(is_m, run_max[:, None], member_max)
        member_inv_s = tl.where(is_m, (1.0 / run_s)[:, None], member_inv_s)
        member_arg = tl.where(is_m, run_arg[:, None], member_arg)

    # Sweep 2, per class tile: mean probability over members, its entropy and top-1 / top-2.
    inv_members = 1.0 / n_members
    pd_sum = tl.zeros([BLOCK_R], dtype=tl.float32)
    total_log2 = tl.zeros([BLOCK_R], dtype=tl.float32)
    top1 = tl.full([BLOCK_R], -1.0, dtype=tl.float32)
    top2 = tl.full([BLOCK_R], -1.0, dtype=tl.float32)
    pred = tl.zeros([BLOCK_R], dtype=tl.int32)
    for c0 in range(0, n_classes, BLOCK_C):
        p_sum = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
        for m in range(n_members):
            is_m = members[None, :] == m
            mx = tl.sum(tl.where(is_m, member_max, 0.0), axis=1)
            inv_s = tl.sum(tl.where(is_m, member_inv_s, 0.0), axis=1)
            x, _zero = _load_tile(logits_ptr, row_start, m * stride_member + c0, tile_cols, c0, row_mask,
                                  n_classes, ALIGN, IS_FP64)
            d = tl.maximum((x - mx[:, None]) * scale[:, None], _EXP2_FLOOR)
            e = tl.exp2(d)
            p_sum += e * inv_s[:, None]
            pd_sum += tl.sum(e * d, axis=1) * inv_s
        p = p_sum * inv_members
        total_log2 -= tl.sum(tl.where(p > 0.0, p * tl.log2(p), 0.0), axis=1)
        # Padded classes hold p = 0, which can at most tie a real class's value: harmless.
        t1, t_arg = _max_first_argmax(p, tile_cols, BLOCK_C)
        t2 = tl.max(tl.where(tile_cols[None, :] == t_arg[:, None], -1.0, p), axis=1)
        better = t1 > top1  # strictly: the earlier tile keeps ties (lowest index)
        top2 = tl.where(better, tl.maximum(top1, t2), tl.maximum(top2, t1))
        pred = tl.where(better, t_arg + c0, pred)
        top1 = tl.where(better, t1, top1)

    vote_count = tl.sum(tl.where(member_arg == pred[:, None], 1, 0), axis=1)
    _store_signals(
        pred_ptr, conf_ptr, margin_ptr, total_ptr, expected_ptr, mi_ptr, vote_ptr, valid_ptr,
        rows, row_mask, n_members,
        poison, pred, top1, top2, total_log2, log2_s_sum, pd_sum, vote_count,
    )


# --------------------------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Which kernel, its block sizes and warps for one input shape."""

    tiled: bool
    block_r: int
    block_c: int
    block_m: int  # members' register tile of the tiled kernel (1 for the fused one)
    num_warps: int
    align: int  # power of two dividing C (and BLOCK_C): the load-vectorisation hint

    def grid(self, batch: int) -> tuple[int]:
        return (triton.cdiv(batch, self.block_r),)


def _is_power_of_two(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def _plan(batch: int, members: int, classes: int, *, tiled: bool | None = None,
          block_r: int | None = None, block_c: int | None = None) -> _Plan:
    """Pick the kernel and block sizes for logits [batch, members, classes].

    ``tiled``, ``block_r`` and ``block_c`` override the automatic choice (tests use them to put
    tile and row-block boundaries where they want). Raises ValueError naming the size that is out
    of range.
    """
    if not 1 <= batch <= _INT32_SPAN:
        raise ValueError(f"logits: expected 1 <= B <= {_INT32_SPAN} rows, found B={batch}")
    if members < 1:
        raise ValueError(f"logits: expected at least 1 ensemble member, found M={members}")
    if classes < 2:
        raise ValueError(f"logits: expected at least 2 classes, found C={classes}")
    if members * classes > _INT32_SPAN:
        raise ValueError(
            f"logits: expected M * C <= {_INT32_SPAN} (offsets inside a row are 32-bit), "
            f"found M * C = {members} * {classes} = {members * classes}"
        )
    if tiled is None:
        tiled = triton.next_power_of_2(classes) > FUSED_MAX_CLASSES
    if block_c is None:
        block_c = TILED_BLOCK_C if tiled else triton.next_power_of_2(classes)
    if not _is_power_of_two(block_c) or block_c > _MAX_TILE:
        raise ValueError(f"block_c: expected a power of two <= {_MAX_TILE}, found {block_c}")
    if not tiled and block_c < classes:
        raise ValueError(
            f"block_c: the fused kernel holds a whole member row, expected >= C={classes}, found {block_c}"
        )
    if tiled and members > MAX_MEMBERS_TILED:
        raise ValueError(
            f"logits: the tiled kernel (C={classes}) serves at most {MAX_MEMBERS_TILED} members, "
            f"found M={members}"
        )
    if block_r is None:
        block_r = min(max(1, TILE_ELEMENTS // block_c), triton.next_power_of_2(batch))
        if not triton_interpreting():
            # The interpreter has no SMs to fill, and its cost grows with the number of programs.
            block_r = min(block_r, triton.next_power_of_2(triton.cdiv(batch, MIN_PROGRAMS)))
    if not _is_power_of_two(block_r) or block_r * block_c > _MAX_TILE:
        raise ValueError(
            f"block_r: expected a power of two with block_r * block_c <= {_MAX_TILE}, "
            f"found block_r={block_r}, block_c={block_c}"
        )
    block_m = triton.next_power_of_2(members) if tiled else 1
    # The largest power of two dividing C, at most 16 (more than any vector load) and BLOCK_C.
    align = min(classes & -classes, 16, block_c)
    num_warps = min(8, max(1, triton.next_power_of_2(block_r * block_c // TILE_ELEMENTS_PER_WARP)))
    return _Plan(tiled=tiled, block_r=block_r, block_c=block_c, block_m=block_m, num_warps=num_warps,
                 align=align)


def _check_inputs(logits: torch.Tensor, temperatures: torch.Tensor, temperature_index) -> None:
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"logits: expected a torch.Tensor, found {type(logits).__name__}")
    if logits.ndim != 3:
        raise ValueError(f"logits: expected shape [B, M, C], found {tuple(logits.shape)}")
    if logits.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise TypeError(f"logits: expected float16, bfloat16, float32 or float64, found {logits.dtype}")
    if not logits.is_contiguous():
        raise ValueError(f"logits: expected a contiguous tensor, found strides {logits.stride()}")
    if not logits.is_cuda and not triton_interpreting():
        raise ValueError(f"logits: expected a CUDA tensor (or TRITON_INTERPRET=1), found device {logits.device}")
    if temperatures.dtype != torch.float32 or temperatures.ndim != 1 or temperatures.numel() < 1:
        raise ValueError(
            f"temperatures: expected a float32 table [K >= 1], found {temperatures.dtype} "
            f"{tuple(temperatures.shape)}"
        )
    if temperatures.device != logits.device:
        raise ValueError(f"temperatures: expected device {logits.device}, found {temperatures.device}")
    if temperature_index is None:
        if temperatures.numel() != 1:
            raise ValueError(
                f"temperature_index: required with a table of {temperatures.numel()} temperatures, found None"
            )
        return
    if temperature_index.dtype != torch.int32 or tuple(temperature_index.shape) != (logits.shape[0],):
        raise ValueError(
            f"temperature_index: expected int32 ({logits.shape[0]},), found {temperature_index.dtype} "
            f"{tuple(temperature_index.shape)}"
        )
    if temperature_index.device != logits.device:
        raise ValueError(f"temperature_index: expected device {logits.device}, found {temperature_index.device}")


def _launch(logits: torch.Tensor, temperatures: torch.Tensor, temperature_index: torch.Tensor | None,
            *, tiled: bool | None = None, block_r: int | None = None,
            block_c: int | None = None) -> EnsembleSignals:
    """Validate, allocate the outputs, plan and launch one kernel (overrides: see :func:`_plan`)."""
    _check_inputs(logits, temperatures, temperature_index)
    batch, members, classes = logits.shape
    plan = _plan(batch, members, classes, tiled=tiled, block_r=block_r, block_c=block_c)
    device = logits.device
    index = temperature_index.contiguous() if temperature_index is not None else None
    temps = temperatures.contiguous()
    pred = torch.empty(batch, dtype=torch.int32, device=device)
    floats = torch.empty((6, batch), dtype=torch.float32, device=device)
    valid = torch.empty(batch, dtype=torch.bool, device=device)
    args = (
        logits, temps, index if index is not None else temps,  # unused pointer when no index
        pred, *floats.unbind(0), valid,
        batch, members, classes,
        members * classes, classes,  # strides of a contiguous tensor (torch may report any
        # stride for a dimension of size 1, and the kernels promise ALIGN divides these)
    )
    meta = dict(HAS_INDEX=index is not None, IS_FP64=logits.dtype == torch.float64,
                BLOCK_R=plan.block_r, BLOCK_C=plan.block_c, ALIGN=plan.align, num_warps=plan.num_warps)
    logger.debug("signals triton: B=%d M=%d C=%d %s", batch, members, classes, plan)
    # Triton launches on the current CUDA device; make it the logits' one.
    with torch.cuda.device(device) if logits.is_cuda else contextlib.nullcontext():
        if plan.tiled:
            _signals_tiled_kernel[plan.grid(batch)](*args, BLOCK_M=plan.block_m, **meta)
        else:
            _signals_fused_kernel[plan.grid(batch)](*args, **meta)
    confidence, margin, total, expected, mutual_info, vote = floats.unbind(0)
    return EnsembleSignals(
        predicted_class=pred, confidence=confidence, margin=margin, total_entropy=total,
        expected_entropy=expected, mutual_info=mutual_info, vote_agreement=vote, valid=valid,
    )


def ensemble_signals_triton(logits: torch.Tensor, temperatures: torch.Tensor,
                            temperature_index: torch.Tensor | None) -> EnsembleSignals:
    """The ensemble-signal pass on the GPU (backend ``"triton"``).

    Args:
        logits: contiguous [B, M, C] float16 / bfloat16 / float32 / float64 tensor on CUDA (or on
            the CPU under TRITON_INTERPRET=1).
        temperatures: float32 [K] on the same device.
        temperature_index: int32 [B] on the same device, or None when K == 1.

    Returns an :class:`EnsembleSignals` of tensors [B] on the logits' device: ``predicted_class``
    int32 (-1 on invalid rows), ``valid`` bool, the rest float32 (NaN on invalid rows).
    """
    return _launch(logits, temperatures, temperature_index)


__all__ = ["ensemble_signals_triton", "FUSED_MAX_CLASSES", "TILED_BLOCK_C", "MAX_MEMBERS_TILED"]
