"""The audit draw on the GPU with Triton: XXH64 per row in uint64 arithmetic, a block of rows per
program.

Integer ids: one load, the 8-byte path of the algorithm, one store per row. String ids: the
offsets and the used range of the data buffer are copied to the device; every row of a block
walks its own 32-byte stripes (the loop runs to the longest row of the block, shorter rows are
masked), then its 8-byte, 4-byte and 1-byte tails, each read as masked byte loads combined
little-endian. The steps are those of :mod:`.reference`, bit for bit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._arrays import as_tensor
from . import IntPiece, bad_offsets_error

# The XXH64 primes (see .reference). Each is materialised as a uint64 scalar inside the kernels,
# so no multiplication ever goes through a signed or narrower type.
P1 = tl.constexpr(0x9E3779B185EBCA87)
P2 = tl.constexpr(0xC2B2AE3D27D4EB4F)
P3 = tl.constexpr(0x165667B19E3779F9)
P4 = tl.constexpr(0x85EBCA77C2B2AE63)
P5 = tl.constexpr(0x27D4EB2F165667C5)
SCALE = tl.constexpr(2.0**-53)

INT_BLOCK = 1024
STR_BLOCK = 128


@triton.jit
def _u64(value: tl.constexpr):
    return tl.full((), value, tl.uint64)


@triton.jit
def _rotl(x, r: tl.constexpr):
    return (x << r) | (x >> (64 - r))


@triton.jit
def _round(acc, word):
    return _rotl(acc + word * _u64(P2), 31) * _u64(P1)


@triton.jit
def _merge(h, v):
    return (h ^ _round(tl.zeros_like(v), v)) * _u64(P1) + _u64(P4)


@triton.jit
def _avalanche(h):
    h = h ^ (h >> 33)
    h = h * _u64(P2)
    h = h ^ (h >> 29)
    h = h * _u64(P3)
    h = h ^ (h >> 32)
    return h


@triton.jit
def _to_uniform(h):
    # h >> 11 < 2**53, so the conversion to float64 is exact.
    return (h >> 11).to(tl.float64) * SCALE


@triton.jit
def _load_word(data_ptr, pos, mask, NBYTES: tl.constexpr):
    """The NBYTES-byte little-endian word at data[pos] per row (0 where mask is False), uint64."""
    cols = tl.arange(0, NBYTES)
    byte = tl.load(data_ptr + pos[:, None] + cols[None, :], mask=mask[:, None], other=0)
    shifted = byte.to(tl.uint64) << (cols * 8).to(tl.uint64)[None, :]
    # The shifted bytes occupy disjoint bits, so their sum is their bitwise OR.
    return tl.sum(shifted, axis=1)


@triton.jit
def _uniform_ints_kernel(values_ptr, seed_ptr, out_ptr, n_rows, BLOCK: tl.constexpr):
    """out[i] = draw of the int64 id values[i]: XXH64 of its 8 little-endian bytes."""
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = rows < n_rows
    # The seed comes in as the int64 with the same bits, loaded once per program (a scalar
    # argument would be specialised and typed by its value).
    seed = tl.load(seed_ptr).to(tl.uint64, bitcast=True)
    word = tl.load(values_ptr + rows, mask=mask, other=0).to(tl.uint64, bitcast=True)
    h = (seed + _u64(P5) + 8) ^ _round(tl.zeros_like(word), word)
    h = _rotl(h, 27) * _u64(P1) + _u64(P4)
    tl.store(out_ptr + rows, _to_uniform(_avalanche(h)), mask=mask)


@triton.jit
def _uniform_strings_kernel(
    offsets_ptr, data_ptr, seed_ptr, out_ptr,
    n_rows, base, n_data,
    BLOCK: tl.constexpr,
):
    """out[i] = draw of the bytes data[offsets[i] - base : offsets[i + 1] - base]; NaN where those
    bounds fall outside [0, n_data] or run backwards (the host raises)."""
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_range = rows < n_rows
    start = tl.load(offsets_ptr + rows, mask=in_range, other=0).to(tl.int64) - base
    end = tl.load(offsets_ptr + rows + 1, mask=in_range, other=0).to(tl.int64) - base
    ok = in_range & (start >= 0) & (end >= start) & (end <= n_data)
    length = tl.where(ok, end - start, 0)
    seed = tl.load(seed_ptr).to(tl.uint64, bitcast=True)
    zero = tl.zeros([BLOCK], dtype=tl.uint64)

    # 1. 32-byte stripes, four lanes; the loop runs to the block's longest row.
    n_stripes = length // 32
    v1 = zero + seed + _u64(P1) + _u64(P2)
    v2 = zero + seed + _u64(P2)
    v3 = zero + seed
    v4 = zero + seed - _u64(P1)
    for s in range(0, tl.max(n_stripes, axis=0)):
        active = s < n_stripes
        pos = start + s * 32
        v1 = tl.where(active, _round(v1, _load_word(data_ptr, pos, active, 8)), v1)
        v2 = tl.where(active, _round(v2, _load_word(data_ptr, pos + 8, active, 8)), v2)
        v3 = tl.where(active, _round(v3, _load_word(data_ptr, pos + 16, active, 8)), v3)
        v4 = tl.where(active, _round(v4, _load_word(data_ptr, pos + 24, active, 8)), v4)
    long_h = _rotl(v1, 1) + _rotl(v2, 7) + _rotl(v3, 12) + _rotl(v4, 18)
    long_h = _merge(_merge(_merge(_merge(long_h, v1), v2), v3), v4)
    h = tl.where(n_stripes > 0, long_h, zero + seed + _u64(P5))
    h = h + length.to(tl.uint64)

    # 2. The 0..31 bytes left: up to three 8-byte words, one 4-byte word, up to three bytes.
    pos = start + n_stripes * 32
    rest = length - n_stripes * 32
    for w in tl.static_range(3):
        active = w < rest // 8
        word = _load_word(data_ptr, pos, active, 8)
        mixed = _rotl(h ^ _round(zero, word), 27) * _u64(P1) + _u64(P4)
        h = tl.where(active, mixed, h)
        pos = tl.where(active, pos + 8, pos)
    rest = rest % 8
    active = rest >= 4
    word = _load_word(data_ptr, pos, active, 4)
    h = tl.where(active, _rotl(h ^ (word * _u64(P1)), 23) * _u64(P2) + _u64(P3), h)
    pos = tl.where(active, pos + 4, pos)
    rest = rest % 4
    for b in tl.static_range(3):
        active = b < rest
        byte = tl.load(data_ptr + pos + b, mask=active, other=0).to(tl.uint64)
        h = tl.where(active, _rotl(h ^ (byte * _u64(P5)), 11) * _u64(P1), h)

    u = _to_uniform(_avalanche(h))
    tl.store(out_ptr + rows, tl.where(ok, u, float("nan")), mask=in_range)


def _seed_tensor(seed: int, device: torch.device) -> torch.Tensor:
    """The seed's 64 bits as a one-element int64 tensor (reinterpreted as uint64 in the kernel)."""
    signed = seed - (1 << 64) if seed >= (1 << 63) else seed
    return torch.tensor([signed], dtype=torch.int64, device=device)


def audit_uniform_triton(piece, seed: int, device: torch.device):
    """Backend entry (see :mod:`hitl_triage.kernels.audit`): float64 draws [n] of one piece on
    ``device`` (a torch tensor on CUDA; numpy for the CPU, where it runs only under
    TRITON_INTERPRET=1, for tests)."""
    seed_t = _seed_tensor(seed, device)
    if isinstance(piece, IntPiece):
        values = piece.values
        values = as_tensor(values, "id")
        values = values.to(device=device, dtype=torch.int64).contiguous()
        n_rows = values.shape[0]
        out = torch.empty(n_rows, dtype=torch.float64, device=device)
        grid = (triton.cdiv(n_rows, INT_BLOCK),)
        _uniform_ints_kernel[grid](values, seed_t, out, n_rows, BLOCK=INT_BLOCK)
    else:
        out = _strings(piece, seed_t, device)
    return out.cpu().numpy() if device.type == "cpu" else out


def _strings(piece, seed_t: torch.Tensor, device: torch.device) -> torch.Tensor:
    offsets_np = piece.offsets
    n_rows = offsets_np.shape[0] - 1
    base, stop = int(offsets_np[0]), int(offsets_np[-1])
    if base < 0 or stop < base or stop > piece.data.shape[0]:
        raise bad_offsets_error(n_rows)
    # Only the bytes this piece uses travel; the kernel subtracts ``base`` from every offset.
    data = as_tensor(piece.data[base:stop], "id").to(device)
    offsets = as_tensor(offsets_np, "id").to(device)
    if data.numel() == 0:
        # Triton needs a real pointer even when every row is empty.
        data = torch.zeros(1, dtype=torch.uint8, device=device)
    out = torch.empty(n_rows, dtype=torch.float64, device=device)
    grid = (triton.cdiv(n_rows, STR_BLOCK),)
    _uniform_strings_kernel[grid](offsets, data, seed_t, out, n_rows, base, stop - base, BLOCK=STR_BLOCK)
    bad = int(torch.isnan(out).sum())
    if bad:
        raise bad_offsets_error(bad)
    return out

