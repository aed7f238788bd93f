"""The audit draw on the CPU with numba: XXH64 per row, rows spread over threads (prange).

Reads the Arrow buffers as they are (int64 values; or offsets + UTF-8 data, int32 or int64
offsets) and writes float64 draws; the steps are those of :mod:`.reference`, bit for bit.
Compiled on first import for the explicit signatures below and cached on disk (``cache=True``).
"""

from __future__ import annotations

from typing import Any

import numba
import numpy as np
import torch
from numba import types

from . import IntPiece, bad_offsets_error

# All hash arithmetic stays in uint64: numba promotes uint64 (op) int64 to float64, so every
# constant, shift count and length is a uint64 before it meets the state.
P1 = np.uint64(0x9E3779B185EBCA87)
P2 = np.uint64(0xC2B2AE3D27D4EB4F)
P3 = np.uint64(0x165667B19E3779F9)
P4 = np.uint64(0x85EBCA77C2B2AE63)
P5 = np.uint64(0x27D4EB2F165667C5)
U0 = np.uint64(0)
U8 = np.uint64(8)
U11 = np.uint64(11)
U16 = np.uint64(16)
U24 = np.uint64(24)
U29 = np.uint64(29)
U32 = np.uint64(32)
U33 = np.uint64(33)
SCALE = np.float64(2.0**-53)

# Typed as Any-valued so the ** expansion matches numba.njit's keyword-typed overloads.
_JIT: dict[str, Any] = dict(nogil=True, cache=True, error_model="numpy")
_PARALLEL: dict[str, Any] = dict(_JIT, parallel=True)


@numba.njit(inline="always", **_JIT)
def _rotl(x, r):
    return (x << np.uint64(r)) | (x >> np.uint64(64 - r))


@numba.njit(inline="always", **_JIT)
def _round(acc, word):
    return _rotl(acc + word * P2, 31) * P1


@numba.njit(inline="always", **_JIT)
def _merge(h, v):
    return (h ^ _round(U0, v)) * P1 + P4


@numba.njit(inline="always", **_JIT)
def _read32(data, p):
    # Unsigned positions let numba skip its negative-index wrap-around, so LLVM can fuse the
    # four byte loads into one little-endian load.
    return (
        np.uint64(data[p])
        | (np.uint64(data[p + np.uint64(1)]) << U8)
        | (np.uint64(data[p + np.uint64(2)]) << U16)
        | (np.uint64(data[p + np.uint64(3)]) << U24)
    )


@numba.njit(inline="always", **_JIT)
def _read64(data, p):
    return _read32(data, p) | (_read32(data, p + np.uint64(4)) << U32)


@numba.njit(inline="always", **_JIT)
def _avalanche(h):
    h ^= h >> U33
    h *= P2
    h ^= h >> U29
    h *= P3
    h ^= h >> U32
    return h


@numba.njit(inline="always", **_JIT)
def _xxh64_bytes(data, start, length, seed):
    """XXH64 of ``data[start:start + length]`` (start and length uint64)."""
    p = start
    end = start + length
    if length >= U32:
        v1 = seed + P1 + P2
        v2 = seed + P2
        v3 = seed
        v4 = seed - P1
        limit = end - U32
        while p <= limit:
            v1 = _round(v1, _read64(data, p))
            v2 = _round(v2, _read64(data, p + U8))
            v3 = _round(v3, _read64(data, p + U16))
            v4 = _round(v4, _read64(data, p + U24))
            p += U32
        h = _rotl(v1, 1) + _rotl(v2, 7) + _rotl(v3, 12) + _rotl(v4, 18)
        h = _merge(h, v1)
        h = _merge(h, v2)
        h = _merge(h, v3)
        h = _merge(h, v4)
    else:
        h = seed + P5
    h += length
    while p + U8 <= end:
        h ^= _round(U0, _read64(data, p))
        h = _rotl(h, 27) * P1 + P4
        p += U8
    if p + np.uint64(4) <= end:
        h ^= _read32(data, p) * P1
        h = _rotl(h, 23) * P2 + P3
        p += np.uint64(4)
    while p < end:
        h ^= np.uint64(data[p]) * P5
        h = _rotl(h, 11) * P1
        p += np.uint64(1)
    return _avalanche(h)


_RO_I64 = types.Array(types.int64, 1, "C", readonly=True)
_RO_I32 = types.Array(types.int32, 1, "C", readonly=True)
_RO_U8 = types.Array(types.uint8, 1, "C", readonly=True)
_OUT = types.Array(types.float64, 1, "C")


@numba.njit(types.void(_RO_I64, types.uint64, _OUT), **_PARALLEL)
def _uniform_ints(values, seed, out):
    """out[i] = draw of the int64 id values[i]: XXH64 of its 8 little-endian bytes."""
    # The 8-byte input is the 0-stripe, one-word path of the algorithm, written out.
    h0 = seed + P5 + U8
    for i in numba.prange(values.shape[0]):
        h = h0 ^ _round(U0, np.uint64(values[i]))
        h = _rotl(h, 27) * P1 + P4
        out[i] = np.float64(_avalanche(h) >> U11) * SCALE


@numba.njit(
    [
        types.int64(_RO_I32, _RO_U8, types.uint64, _OUT),
        types.int64(_RO_I64, _RO_U8, types.uint64, _OUT),
    ],
    **_PARALLEL,
)
def _uniform_strings(offsets, data, seed, out):
    """out[i] = draw of the bytes data[offsets[i]:offsets[i + 1]]; returns the number of rows whose
    offsets fall outside the data buffer or run backwards (their draw is NaN)."""
    n_data = data.shape[0]
    bad = 0
    for i in numba.prange(offsets.shape[0] - 1):
        a = np.int64(offsets[i])
        b = np.int64(offsets[i + 1])
        if a < 0 or b < a or b > n_data:
            out[i] = np.nan
            bad += 1
            continue
        h = _xxh64_bytes(data, np.uint64(a), np.uint64(b - a), seed)
        out[i] = np.float64(h >> U11) * SCALE
    return bad


def audit_uniform_numba(piece, seed: int, device: torch.device):
    """Backend entry (see :mod:`hitl_triage.kernels.audit`): float64 draws [n] of one piece,
    numpy for the CPU, else a torch tensor moved to ``device`` (computed on the host)."""
    if isinstance(piece, IntPiece):
        values = piece.values
        if isinstance(values, torch.Tensor):
            values = values.cpu().numpy()
        out = np.empty(values.shape[0], dtype=np.float64)
        _uniform_ints(values, np.uint64(seed), out)
    else:
        out = np.empty(piece.offsets.shape[0] - 1, dtype=np.float64)
        bad = _uniform_strings(piece.offsets, piece.data, np.uint64(seed), out)
        if bad:
            raise bad_offsets_error(bad)
    if device.type == "cpu":
        return out
    return torch.from_numpy(out).to(device)
