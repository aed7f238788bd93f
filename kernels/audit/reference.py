"""The spec of the audit draw: XXH64 written for clarity in pure Python, one row at a time.

XXH64 is the 64-bit variant of xxHash (Yann Collet), specified in the xxHash repository's
``doc/xxhash_spec.md``; every language has an independent implementation, so an outside auditor can
reproduce a draw with, for example, Python's ``xxhash.xxh64_intdigest(data, seed)``.

The audit draw of a row is

    bytes    = the 8 bytes of the int64 id in little-endian order      (integer ids)
             | the UTF-8 bytes of the id as stored, no terminator       (string ids)
    hash     = XXH64(bytes, seed)                  seed an integer in [0, 2**64)
    uniform  = (hash >> 11) * 2**-53               a float64 in [0, 1) with 53 random bits

XXH64, all arithmetic modulo 2**64 (``rotl`` rotates a 64-bit word left; words are read
little-endian; ``len`` is the input's length in bytes):

    P1 = 0x9E3779B185EBCA87   P2 = 0xC2B2AE3D27D4EB4F   P3 = 0x165667B19E3779F9
    P4 = 0x85EBCA77C2B2AE63   P5 = 0x27D4EB2F165667C5

    round(acc, word) = rotl(acc + word * P2, 31) * P1
    merge(h, v)      = (h ^ round(0, v)) * P1 + P4

    1. If len >= 32: four lanes v1 = seed + P1 + P2, v2 = seed + P2, v3 = seed, v4 = seed - P1;
       for every whole 32-byte stripe, lane i takes ``round(v_i, word i of the stripe)``; then
       h = rotl(v1, 1) + rotl(v2, 7) + rotl(v3, 12) + rotl(v4, 18) and h = merge(h, v_i) for
       i = 1..4.  Otherwise h = seed + P5.
    2. h = h + len.
    3. The 0..31 bytes after the last stripe: each whole 8-byte word w:
       h = rotl(h ^ round(0, w), 27) * P1 + P4; then one 4-byte word u (read as an unsigned
       32-bit integer) if at least 4 bytes remain: h = rotl(h ^ (u * P1), 23) * P2 + P3; then
       each remaining byte b: h = rotl(h ^ (b * P5), 11) * P1.
    4. Avalanche: h ^= h >> 33; h *= P2; h ^= h >> 29; h *= P3; h ^= h >> 32.

The fast backends (:mod:`.numba_cpu`, :mod:`.triton_gpu`) follow these steps exactly; the tests
hold every backend to this module and to the ``xxhash`` package, bit for bit.
"""

from __future__ import annotations

import numpy as np
import torch

MASK64 = (1 << 64) - 1

PRIME64_1 = 0x9E3779B185EBCA87
PRIME64_2 = 0xC2B2AE3D27D4EB4F
PRIME64_3 = 0x165667B19E3779F9
PRIME64_4 = 0x85EBCA77C2B2AE63
PRIME64_5 = 0x27D4EB2F165667C5

# 2**-53: the spacing of float64 values in [0.5, 1); 53-bit integers times it are exact.
UNIFORM_SCALE = 2.0**-53


def _rotl(x: int, r: int) -> int:
    return ((x << r) | (x >> (64 - r))) & MASK64


def _round(acc: int, word: int) -> int:
    acc = (acc + word * PRIME64_2) & MASK64
    return (_rotl(acc, 31) * PRIME64_1) & MASK64


def _merge(h: int, v: int) -> int:
    h ^= _round(0, v)
    return (h * PRIME64_1 + PRIME64_4) & MASK64


def _word(data: bytes, pos: int, size: int) -> int:
    return int.from_bytes(data[pos : pos + size], "little")


def xxh64(data: bytes, seed: int) -> int:
    """XXH64 of ``data`` with ``seed`` (an int in [0, 2**64)), as an int in [0, 2**64)."""
    length = len(data)
    pos = 0
    if length >= 32:
        v1 = (seed + PRIME64_1 + PRIME64_2) & MASK64
        v2 = (seed + PRIME64_2) & MASK64
        v3 = seed
        v4 = (seed - PRIME64_1) & MASK64
        while pos + 32 <= length:
            v1 = _round(v1, _word(data, pos, 8))
            v2 = _round(v2, _word(data, pos + 8, 8))
            v3 = _round(v3, _word(data, pos + 16, 8))
            v4 = _round(v4, _word(data, pos + 24, 8))
            pos += 32
        h = (_rotl(v1, 1) + _rotl(v2, 7) + _rotl(v3, 12) + _rotl(v4, 18)) & MASK64
        for v in (v1, v2, v3, v4):
            h = _merge(h, v)
    else:
        h = (seed + PRIME64_5) & MASK64
    h = (h + length) & MASK64
    while pos + 8 <= length:
        h ^= _round(0, _word(data, pos, 8))
        h = (_rotl(h, 27) * PRIME64_1 + PRIME64_4) & MASK64
        pos += 8
    if pos + 4 <= length:
        h ^= (_word(data, pos, 4) * PRIME64_1) & MASK64
        h = (_rotl(h, 23) * PRIME64_2 + PRIME64_3) & MASK64
        pos += 4
    while pos < length:
        h ^= (data[pos] * PRIME64_5) & MASK64
        h = (_rotl(h, 11) * PRIME64_1) & MASK64
        pos += 1
    h ^= h >> 33
    h = (h * PRIME64_2) & MASK64
    h ^= h >> 29
    h = (h * PRIME64_3) & MASK64
    h ^= h >> 32
    return h


def uniform_from_hash(h: int) -> float:
    """The audit draw of a 64-bit hash: its top 53 bits as a float64 in [0, 1) (exact)."""
    return (h >> 11) * UNIFORM_SCALE


def int_id_bytes(value: int) -> bytes:
    """The bytes hashed for an integer id: its int64 two's complement, little-endian."""
    return int(value).to_bytes(8, "little", signed=True)


def audit_uniform_reference_ints(values: np.ndarray, seed: int) -> np.ndarray:
    """Draws of int64 ids ``values`` [n], one Python XXH64 per row; float64 [n]."""
    return np.array(
        [uniform_from_hash(xxh64(int_id_bytes(v), seed)) for v in values.tolist()], dtype=np.float64
    )


def audit_uniform_reference_strings(offsets: np.ndarray, data: np.ndarray, seed: int) -> np.ndarray:
    """Draws of string ids laid out as Arrow does: row i is ``data[offsets[i]:offsets[i + 1]]``.

    ``offsets`` int32 or int64 [n + 1] (the first need not be 0: sliced arrays), ``data`` uint8.
    Returns float64 [n].
    """
    raw = data.tobytes()
    bounds = offsets.tolist()
    return np.array(
        [uniform_from_hash(xxh64(raw[a:b], seed)) for a, b in zip(bounds[:-1], bounds[1:])],
        dtype=np.float64,
    )


def audit_uniform_backend(piece, seed: int, device: torch.device):
    """The reference as a dispatchable backend (exact, slow): computes on the host, then hands the
    result over on ``device`` (numpy for the CPU, a torch tensor for CUDA)."""
    from . import IntPiece, bad_offsets_error

    if isinstance(piece, IntPiece):
        values = piece.values
        if isinstance(values, torch.Tensor):
            values = values.cpu().numpy()
        out = audit_uniform_reference_ints(values, seed)
    else:
        bounds = piece.offsets.astype(np.int64)
        start, end = bounds[:-1], bounds[1:]
        bad = int(np.count_nonzero((start < 0) | (end < start) | (end > piece.data.shape[0])))
        if bad:
            raise bad_offsets_error(bad)
        out = audit_uniform_reference_strings(piece.offsets, piece.data, seed)
    if device.type == "cpu":
        return out
    return torch.from_numpy(out).to(device)
