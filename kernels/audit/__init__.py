"""The audit draw: a reproducible uniform in [0, 1) per row from a seeded 64-bit hash of its id.

Public: :func:`audit_uniform`. The pure-Python XXH64 in :mod:`.reference` is the spec (its
docstring gives the algorithm); ``numba`` (CPU) and ``triton`` (CUDA) are the fast backends. Any
replica, rerun or outside auditor reproduces a draw with any XXH64 implementation, for example
``(xxhash.xxh64_intdigest(id_bytes, seed) >> 11) * 2**-53``, where ``id_bytes`` is the 8-byte
little-endian int64 of an integer id or the UTF-8 bytes of a string id.
"""

from __future__ import annotations

import dataclasses
import logging
import numbers

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from .._arrays import as_tensor
from .._dispatch import Backend, PassRegistry, cpu_and_cuda, triton_devices

logger = logging.getLogger(__name__)

FIELD = "id"
INT64_MAX = np.iinfo(np.int64).max
SEED_LIMIT = 1 << 64


@dataclasses.dataclass(frozen=True)
class IntPiece:
    """Integer ids of one contiguous run of rows: int64 [n], C-contiguous (numpy, or a torch
    tensor when the caller passed one, possibly on CUDA)."""

    values: np.ndarray | torch.Tensor


@dataclasses.dataclass(frozen=True)
class StrPiece:
    """String ids of one contiguous run of rows, as Arrow lays them out: row i is the UTF-8 bytes
    ``data[offsets[i]:offsets[i + 1]]``. ``offsets`` int32 or int64 [n + 1] (the first is the
    array's own start, not necessarily 0); ``data`` uint8, the whole data buffer."""

    offsets: np.ndarray
    data: np.ndarray


@dataclasses.dataclass(frozen=True)
class DictPiece:
    """Dictionary-encoded ids: the draw of row i is the draw of ``dictionary[indices[i]]``.
    ``indices`` a numpy integer array [n], ``dictionary`` the pieces of the distinct values."""

    indices: np.ndarray
    dictionary: tuple


REGISTRY = PassRegistry(
    pass_name="audit",
    backends={
        "numba": Backend("numba", f"{__name__}.numba_cpu", "audit_uniform_numba", cpu_and_cuda),
        "triton": Backend("triton", f"{__name__}.triton_gpu", "audit_uniform_triton", triton_devices),
        "reference": Backend("reference", f"{__name__}.reference", "audit_uniform_backend", cpu_and_cuda),
    },
    # On CUDA, numba (host compute, one copy of the result) is a far better fallback than the
    # per-row Python reference; the dispatcher logs either fallback.
    preference={"cpu": ("numba", "reference"), "cuda": ("triton", "numba", "reference")},
)


def audit_uniform(ids, seed, *, backend: str | None = None, device=None):
    """The audit draw of every row: ``(XXH64(id bytes, seed) >> 11) * 2**-53``.

    Args:
        ids: [B] prediction ids, none null. A pyarrow Array or ChunkedArray of int64 (other
            integer types are widened to int64; uint64 values above 2**63 - 1 are refused),
            string, large_string, string_view or dictionary-encoded values of those; or a 1-D
            numpy array / torch tensor of integers (CPU or CUDA) for in-process callers.
            Integer ids hash their 8 little-endian int64 bytes, string ids their UTF-8 bytes.
        seed: an int in [0, 2**64), the audit seed of the profile.
        backend: "numba", "triton" or "reference"; default from HITL_TRIAGE_AUDIT_BACKEND,
            else chosen by the device.
        device: where the draws are computed and returned: None (the ids' device: CUDA for a
            CUDA tensor, else the CPU), "cpu" or "cuda" (a torch.device works too).

    Returns:
        float64 [B] in [0, 1) with 53 random bits: a numpy array on the CPU, a torch tensor on
        CUDA. Identical bit for bit on every backend, batch split and process.

    Raises:
        TypeError: ``ids`` of an unsupported type, or ``seed`` not an integer.
        ValueError: null ids (the count is given), uint64 ids above 2**63 - 1, ``seed`` out of
            range, an unknown ``device`` or offsets that fall outside the data buffer.
    """
    seed = _check_seed(seed)
    target = _target_device(ids, device)
    pieces, length = _pieces(ids)
    name, impl = REGISTRY.resolve(target.type, backend)
    logger.debug("audit draw of %d ids on %s with the %s backend", length, target, name)
    parts = [_run(impl, piece, seed, target) for piece in pieces]
    return _concat(parts, target)


def bad_offsets_error(count: int) -> ValueError:
    """The error a backend raises when string offsets point outside the data buffer."""
    return ValueError(
        f"{FIELD}: expected string offsets within the data buffer and non-decreasing, "
        f"found {count} row(s) that are not (corrupt Arrow array?)"
    )


def _check_seed(seed) -> int:
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed: expected an int in [0, 2**64), found {type(seed).__name__} {seed!r}")
    seed = int(seed)
    if not 0 <= seed < SEED_LIMIT:
        raise ValueError(f"seed: expected an int in [0, 2**64), found {seed}")
    return seed


def _target_device(ids, device) -> torch.device:
    if device is None:
        return ids.device if isinstance(ids, torch.Tensor) else torch.device("cpu")
    try:
        target = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device: expected None, 'cpu' or 'cuda', found {device!r}") from exc
    if target.type not in ("cpu", "cuda"):
        raise ValueError(f"device: expected None, 'cpu' or 'cuda', found {device!r}")
    if target.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device: {device!r} requested, but torch sees no CUDA device here")
        if target.index is None:
            target = torch.device("cuda", torch.cuda.current_device())
    return target


# ---------------------------------------------------------------------------------------------
# Input normalisation: every accepted input becomes a list of pieces over the original buffers.


def _pieces(ids) -> tuple[list, int]:
    """Split ``ids`` into pieces the backends understand; returns (pieces, total rows)."""
    if isinstance(ids, pa.ChunkedArray):
        _check_no_nulls(ids)
        pieces = [_arrow_piece(chunk) for chunk in ids.chunks if len(chunk)]
        return pieces, len(ids)
    if isinstance(ids, pa.Array):
        _check_no_nulls(ids)
        return ([_arrow_piece(ids)] if len(ids) else []), len(ids)
    if isinstance(ids, np.ndarray):
        return _dense_piece(ids), ids.shape[0]
    if isinstance(ids, torch.Tensor):
        return _tensor_piece(ids), ids.shape[0]
    raise TypeError(
        f"{FIELD}: expected a pyarrow Array or ChunkedArray, a numpy array or a torch tensor, "
        f"found {type(ids).__name__}"
    )


def _check_no_nulls(ids) -> None:
    count = ids.null_count
    kind = ids.type
    if pa.types.is_dictionary(kind):
        chunks = ids.chunks if isinstance(ids, pa.ChunkedArray) else [ids]
        if any(chunk.dictionary.null_count for chunk in chunks):
            # A valid index that points at a null dictionary entry is a null id too.
            count = int(pc.sum(pc.is_null(ids)).as_py() or 0)
    if count:
        raise ValueError(f"{FIELD}: expected no null ids (ids are required), found {count} null(s)")


def _arrow_piece(arr: pa.Array):
    """One non-null Arrow array as a piece, reading its buffers in place where the type allows."""
    kind = arr.type
    if pa.types.is_integer(kind):
        return IntPiece(_as_int64(arr.to_numpy(zero_copy_only=True), f"Arrow {kind}"))
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        return _string_piece(arr)
    if _is_string_view(kind):
        # The view layout (inline prefixes, several data buffers) is rebuilt as offsets + data
        # by Arrow's own cast; the bytes, hence the hashes, are the same.
        return _string_piece(arr.cast(pa.large_string()))
    if pa.types.is_dictionary(kind):
        if len(arr.dictionary) > len(arr):
            # A short slice of a large dictionary: decoding costs less than hashing every entry.
            return _arrow_piece(arr.dictionary_decode())
        dictionary = arr.dictionary
        _check_value_type(dictionary.type, f"dictionary<values={dictionary.type}>")
        pieces = (_arrow_piece(dictionary),) if len(dictionary) else ()
        return DictPiece(indices=arr.indices.to_numpy(zero_copy_only=True), dictionary=pieces)
    _check_value_type(kind, str(kind))
    raise AssertionError("unreachable")  # pragma: no cover - _check_value_type raised


def _is_string_view(kind) -> bool:
    is_view = getattr(pa.types, "is_string_view", None)  # pyarrow >= 16
    return bool(is_view and is_view(kind))


def _check_value_type(kind, found: str) -> None:
    ok = (
        pa.types.is_integer(kind)
        or pa.types.is_string(kind)
        or pa.types.is_large_string(kind)
        or _is_string_view(kind)
    )
    if not ok:
        raise TypeError(
            f"{FIELD}: expected integer or string ids (int64, string, large_string, string_view "
            f"or a dictionary of those), found {found}"
        )


def _string_piece(arr: pa.Array) -> StrPiece:
    offset_dtype = np.int64 if pa.types.is_large_string(arr.type) else np.int32
    _, offsets_buf, data_buf = arr.buffers()
    for buf in (offsets_buf, data_buf):
        if buf is not None and not buf.is_cpu:
            raise ValueError(f"{FIELD}: expected Arrow buffers in host memory, found a device buffer")
    offsets = np.frombuffer(offsets_buf, dtype=offset_dtype)[arr.offset : arr.offset + len(arr) + 1]
    if offsets.shape[0] != len(arr) + 1:
        raise bad_offsets_error(len(arr))
    data = np.frombuffer(data_buf, dtype=np.uint8) if data_buf is not None else np.empty(0, np.uint8)
    return StrPiece(offsets=offsets, data=data)


def _as_int64(values: np.ndarray, found: str) -> np.ndarray:
    """Widen integer ids to int64 (zero-copy when they already are); refuse uint64 above 2**63-1."""
    if values.dtype == np.uint64 and values.shape[0] and values.max() > INT64_MAX:
        raise ValueError(
            f"{FIELD}: expected integer ids that fit in int64, found {found} value "
            f"{int(values.max())} > 2**63 - 1"
        )
    if values.dtype == np.uint64:
        values = values.view(np.int64)
    # The kernels read aligned, contiguous int64: copy only when the input is not that already.
    return np.require(values, dtype=np.int64, requirements=("C", "A"))


def _dense_piece(values: np.ndarray) -> list:
    if values.ndim != 1:
        raise ValueError(f"{FIELD}: expected a 1-D array of ids, found shape {values.shape}")
    if values.dtype.kind not in "iu":
        raise TypeError(
            f"{FIELD}: expected integer ids (a numpy array of strings goes through pyarrow.array "
            f"first), found numpy dtype {values.dtype}"
        )
    return [IntPiece(_as_int64(values, f"numpy {values.dtype}"))] if values.shape[0] else []


_TORCH_INTS = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def _tensor_piece(values: torch.Tensor) -> list:
    if values.ndim != 1:
        raise ValueError(f"{FIELD}: expected a 1-D tensor of ids, found shape {tuple(values.shape)}")
    if values.dtype in (torch.uint16, torch.uint32, torch.uint64):
        return _dense_piece(values.cpu().numpy())
    if values.dtype not in _TORCH_INTS:
        raise TypeError(f"{FIELD}: expected an integer tensor of ids, found torch dtype {values.dtype}")
    if not values.shape[0]:
        return []
    if values.device.type == "cpu":
        return _dense_piece(values.numpy())
    return [IntPiece(values.to(torch.int64).contiguous())]


# ---------------------------------------------------------------------------------------------
# Running the pieces.


def _run(impl, piece, seed: int, device: torch.device):
    if not isinstance(piece, DictPiece):
        return impl(piece, seed, device)
    indices = piece.indices
    n_values = sum(_piece_length(p) for p in piece.dictionary)
    if indices.shape[0] and (indices.min() < 0 or indices.max() >= n_values):
        raise ValueError(
            f"{FIELD}: expected dictionary indices in [0, {n_values}), "
            f"found range [{int(indices.min())}, {int(indices.max())}]"
        )
    values = _concat([impl(p, seed, device) for p in piece.dictionary], device)
    if device.type == "cpu":
        return values[indices]
    return values[as_tensor(indices, FIELD).to(device=device, dtype=torch.int64)]


def _piece_length(piece) -> int:
    if isinstance(piece, IntPiece):
        return int(piece.values.shape[0])
    if isinstance(piece, StrPiece):
        return int(piece.offsets.shape[0]) - 1
    return int(piece.indices.shape[0])


def _concat(parts: list, device: torch.device):
    if device.type == "cpu":
        if len(parts) == 1:
            return parts[0]
        return np.concatenate(parts) if parts else np.empty(0, dtype=np.float64)
    if len(parts) == 1:
        return parts[0]
    if not parts:
        return torch.empty(0, dtype=torch.float64, device=device)
    return torch.cat(parts)


__all__ = ["audit_uniform", "REGISTRY"]
