"""Where prediction batches enter the engine: decoding and validation of the data contract.

Public: :func:`decode_batch` (Arrow batch or mapping of arrays -> :class:`PredictionBatch`),
:func:`check_schema` (the same checks on a schema alone, so a Parquet file can be refused before a
row group is read), :func:`check_bank_schema`, :func:`validate_labels`, the id rules
(:func:`check_unique_ids`, which decoding applies to every batch; :func:`id_keys` for checks across
batches; :func:`common_id_type` for one output made of several inputs), and the errors, all
subclasses of :class:`BatchError`.

The contract (DESIGN.md, "Data contract"), one row per prediction:

=============  ==================================================================  ==============
column         type                                                                required
=============  ==================================================================  ==============
``id``         string, large_string or int64 (other signed ints are widened)        yes
``logits``     ``fixed_size_list<fixed_size_list<float>[C]>[M]``,                   yes
               ``fixed_size_list<float>[C]`` (M = 1) or ``arrow.fixed_shape_tensor``
               [M, C] / [C]; values float16, float32 or float64
``embedding``  ``fixed_size_list<float>[D]`` or ``arrow.fixed_shape_tensor`` [D]      per profile
``source``     string, large_string or dictionary<string>                           no
``category``   string, large_string or dictionary<string>                           no
``label``      an integer type (read as int32); -1 or null = unknown                calibration
=============  ==================================================================  ==============

Decoding is zero-copy wherever Arrow allows: float values without nulls are viewed in place (any
slice offset), so on the CPU a batch of a million rows decodes in microseconds. Copies happen only
for a multi-chunk table (combined), nulls (missing rows are filled with NaN), a permuted tensor
extension type (put in logical order), widened integer ids, and the copy to a GPU.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import warnings
from typing import Any, Mapping

import numpy as np
import pyarrow as pa
import torch

from .device import HostToDevice, resolve_device, to_device

logger = logging.getLogger(__name__)

MODES = ("optional", "required", "ignore")

_ARROW_FLOATS = {
    pa.float16(): torch.float16,
    pa.float32(): torch.float32,
    pa.float64(): torch.float64,
}
_TORCH_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_FLOATS_EXPECTED = "float16, float32 or float64 values"
_LOGITS_FORMS = ("fixed_size_list<fixed_size_list<float>[C]>[M], fixed_size_list<float>[C] "
                 "or arrow.fixed_shape_tensor [M, C] / [C]")
_EMBEDDING_FORMS = "fixed_size_list<float>[D] or arrow.fixed_shape_tensor [D]"
_ID_EXPECTED = "string, large_string or a signed integer type (read as int64)"
_STRING_EXPECTED = "string, large_string or dictionary<string>"


# --------------------------------------------------------------------------------------------
# Errors


class BatchError(ValueError):
    """A prediction batch that breaks the data contract. ``column`` names the offending column.

    The boundary raises :class:`BatchValueError` or :class:`BatchTypeError` (also a TypeError),
    so callers can catch one class for all, and generic code can keep catching the builtins.
    The base is itself a ValueError, since engine code raises it directly for value problems.

    ``BatchError(column, message)`` reads ``"column: message"``; ``BatchError("column: message")``
    takes the column from the text before the first colon.
    """

    def __init__(self, column: str, message: str | None = None):
        if message is None:
            text = column
            column = text.split(":", 1)[0] if ":" in text else ""
        else:
            text = f"{column}: {message}"
        super().__init__(text)
        self.column = column


class BatchValueError(BatchError, ValueError):
    """A column with the wrong shape, size, nulls or values."""


class BatchTypeError(BatchError, TypeError):
    """A column of the wrong type (element type, list kind, Python object)."""


class MissingColumnError(BatchValueError):
    """A required column is absent."""


class DuplicateIdError(BatchValueError):
    """Ids repeat: ``count`` rows carry an id that an earlier row already had; ``first`` is the
    first such id (in row order). Ids are the idempotency and audit-sampling key, so "one decision
    row per input row" and the audit sample only hold when they are unique."""

    def __init__(self, message: str, *, count: int, first):
        super().__init__("id", message)
        self.count = count
        self.first = first


def with_context(exc: BatchError, where: str) -> BatchError:
    """A copy of ``exc`` (same class, same ``column``) whose message ends with ``(in WHERE)``, for
    callers that know which file or request a batch came from."""
    new = type(exc).__new__(type(exc))  # not __init__: subclasses take other arguments
    new.__dict__.update(exc.__dict__)
    new.args = (f"{exc} (in {where})",)
    return new


# --------------------------------------------------------------------------------------------
# Results


@dataclasses.dataclass(frozen=True)
class BatchLayout:
    """What :func:`check_schema` found: the shapes and types a batch with this schema decodes to.

    ``members``/``classes``: M and C of the logits; ``dim``: D of the embedding (None when the
    embedding is absent or ignored); dtypes are torch dtypes; ``has_*`` say which optional columns
    will be decoded.
    """

    members: int
    classes: int
    dim: int | None
    logits_dtype: torch.dtype
    embedding_dtype: torch.dtype | None
    id_type: pa.DataType
    has_label: bool
    has_source: bool
    has_category: bool


@dataclasses.dataclass
class PredictionBatch:
    """One decoded batch of B predictions, its tensors on the engine's device.

    Attributes:
        num_rows: B.
        ids: pyarrow Array [B] of int64 or string/large_string, never null (audit-hash key).
        logits: torch [B, M, C] on the device, contiguous, dtype as provided (float16, bfloat16,
            float32 or float64). On the CPU it may view read-only Arrow memory: never write into it.
        logits_missing: bool [B] on the device, True where the logits entry or a value in it was
            null (those rows hold NaN, so they can never look confident); None when no nulls.
        embedding: torch [B, D] on the device, or None; embedding_missing likewise.
        source, category: pyarrow string arrays [B] (dictionary-encoded when they came so), or None.
        label: int32 [B] on the device, -1 where unknown, or None.
    """

    num_rows: int
    ids: pa.Array
    logits: torch.Tensor
    logits_missing: torch.Tensor | None = None
    embedding: torch.Tensor | None = None
    embedding_missing: torch.Tensor | None = None
    source: pa.Array | None = None
    category: pa.Array | None = None
    label: torch.Tensor | None = None

    @property
    def members(self) -> int:
        """M, the number of ensemble members."""
        return self.logits.shape[1]

    @property
    def classes(self) -> int:
        """C, the number of classes."""
        return self.logits.shape[2]

    @property
    def dim(self) -> int | None:
        """D, the embedding width, or None without an embedding."""
        return None if self.embedding is None else self.embedding.shape[1]

    @property
    def device(self) -> torch.device:
        """The device every tensor of the batch lives on."""
        return self.logits.device

    def take(self, rows: torch.Tensor) -> "PredictionBatch":
        """The batch of the given rows (int64 indices on the host), in that order."""
        arrow_rows = pa.array(rows.numpy())
        tensor = lambda t: None if t is None else t[rows.to(t.device)]  # noqa: E731
        column = lambda a: None if a is None else a.take(arrow_rows)  # noqa: E731
        return PredictionBatch(
            num_rows=int(rows.shape[0]), ids=self.ids.take(arrow_rows), logits=self.logits[rows.to(self.logits.device)],
            logits_missing=tensor(self.logits_missing), embedding=tensor(self.embedding),
            embedding_missing=tensor(self.embedding_missing), source=column(self.source),
            category=column(self.category), label=tensor(self.label),
        )


# --------------------------------------------------------------------------------------------
# Column descriptions: what was found, from an Arrow type or an in-process array


@dataclasses.dataclass(frozen=True)
class _ArraySpec:
    """A float tensor column described per row: logical ``shape`` (without the batch axis),
    ``dtype``, the physical shape and permutation of a tensor extension type (or None), and the
    text used in messages."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    found: str
    physical: tuple[int, ...] | None = None
    permutation: tuple[int, ...] | None = None


@dataclasses.dataclass(frozen=True)
class _TensorInfo:
    """An in-process array column (numpy, torch, DLPack): its full shape and dtype."""

    shape: tuple[int, ...]
    dtype: torch.dtype


def _describe(t) -> str:
    """Arrow type as written in the data contract, e.g. ``fixed_size_list<float>[7]``."""
    if isinstance(t, _TensorInfo):
        return f"{str(t.dtype).removeprefix('torch.')} array of shape {list(t.shape)}"
    if isinstance(t, pa.FixedShapeTensorType):
        perm = _permutation(t)
        extra = f", permutation={list(perm)}" if perm is not None else ""
        return f"arrow.fixed_shape_tensor<{t.value_type}>[shape={list(t.shape)}{extra}]"
    if isinstance(t, pa.BaseExtensionType):
        return f"extension<{t.extension_name}> over {_describe(t.storage_type)}"
    if pa.types.is_fixed_size_list(t):
        return f"fixed_size_list<{_describe(t.value_type)}>[{t.list_size}]"
    if pa.types.is_list(t):
        return f"list<{_describe(t.value_type)}>"
    if pa.types.is_large_list(t):
        return f"large_list<{_describe(t.value_type)}>"
    if pa.types.is_list_view(t) or pa.types.is_large_list_view(t):
        return f"{'large_' if pa.types.is_large_list_view(t) else ''}list_view<{_describe(t.value_type)}>"
    if pa.types.is_dictionary(t):
        return f"dictionary<{_describe(t.value_type)}>"
    return str(t)


def _permutation(t: pa.FixedShapeTensorType) -> tuple[int, ...] | None:
    """The tensor type's permutation, or None when it is absent or the identity."""
    perm = t.permutation
    if perm is None or list(perm) == list(range(len(perm))):
        return None
    return tuple(int(p) for p in perm)


def _is_variable_list(t) -> bool:
    return (pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_list_view(t)
            or pa.types.is_large_list_view(t))


def _arrow_spec(column: str, t: pa.DataType, forms: str) -> _ArraySpec:
    """Parse a float tensor column's Arrow type, or raise naming what is wrong with it."""
    found = _describe(t)
    if isinstance(t, pa.FixedShapeTensorType):
        physical = tuple(int(s) for s in t.shape)
        perm = _permutation(t)
        # Arrow's canonical tensor type stores `shape` in physical order; logical axis i is
        # physical axis permutation[i].
        shape = physical if perm is None else tuple(physical[p] for p in perm)
        value = t.value_type
    elif isinstance(t, pa.BaseExtensionType):
        raise BatchTypeError(column, f"expected {forms}, found {found}")
    elif pa.types.is_fixed_size_list(t):
        value = t.value_type
        if pa.types.is_fixed_size_list(value):
            shape = (t.list_size, value.list_size)
            value = value.value_type
        else:
            shape = (t.list_size,)
        physical, perm = None, None
        if pa.types.is_fixed_size_list(value) or _is_variable_list(value) or pa.types.is_struct(value):
            raise BatchTypeError(column, f"expected {forms}, found {found} (lists nested too deep "
                                         "or of variable size)")
    elif _is_variable_list(t):
        raise BatchTypeError(column, f"expected {forms}, found {found}, a variable-size list "
                                     "(cast it to a fixed-size list of the profile's sizes)")
    else:
        raise BatchTypeError(column, f"expected {forms}, found {found}")
    if value not in _ARROW_FLOATS:
        raise BatchTypeError(column, f"expected {_FLOATS_EXPECTED}, found {value} values ({found})")
    return _ArraySpec(shape, _ARROW_FLOATS[value], found, physical, perm)


def _tensor_spec(column: str, info: _TensorInfo, forms: str) -> _ArraySpec:
    """The per-row spec of an in-process array ([B, ...])."""
    found = _describe(info)
    if len(info.shape) < 2:
        raise BatchValueError(column, f"expected an array of shape {forms}, found {found}")
    if info.dtype not in _TORCH_FLOATS:
        raise BatchTypeError(column, f"expected float16, bfloat16, float32 or float64 values, "
                                     f"found {found}")
    return _ArraySpec(tuple(info.shape[1:]), info.dtype, found)


def _spec(column: str, found, arrow_forms: str, tensor_forms: str) -> _ArraySpec:
    if isinstance(found, _TensorInfo):
        return _tensor_spec(column, found, tensor_forms)
    return _arrow_spec(column, found, arrow_forms)


def _expected_sizes(**sizes) -> str:
    return "[" + ", ".join(f"{k}={'any' if v is None else v}" for k, v in sizes.items()) + "]"


def _check_logits(found, members: int | None, classes: int | None) -> tuple[int, int, _ArraySpec]:
    spec = _spec("logits", found, _LOGITS_FORMS, "[B, M, C] or [B, C]")
    expected = _expected_sizes(M=members, C=classes)
    if len(spec.shape) not in (1, 2):
        raise BatchValueError("logits", f"expected {expected} per row (or [C] for M=1), found {spec.found}")
    m, c = (1, spec.shape[0]) if len(spec.shape) == 1 else spec.shape
    if (members is not None and m != members) or (classes is not None and c != classes):
        raise BatchValueError("logits", f"expected {expected} per row, found {spec.found} "
                                        f"(M={m}, C={c})")
    if m < 1 or c < 2:
        raise BatchValueError("logits", f"expected at least 1 member and 2 classes per row, found "
                                        f"{spec.found} (M={m}, C={c})")
    return m, c, spec


def _check_embedding(found, dim: int | None) -> _ArraySpec:
    spec = _spec("embedding", found, _EMBEDDING_FORMS, "[B, D]")
    expected = _expected_sizes(D=dim)
    if len(spec.shape) != 1 or (dim is not None and spec.shape[0] != dim) or spec.shape[0] < 1:
        raise BatchValueError("embedding", f"expected {expected} per row, found {spec.found}")
    return spec


def _check_id_type(t) -> None:
    if isinstance(t, pa.DataType) and (pa.types.is_string(t) or pa.types.is_large_string(t)
                                       or pa.types.is_signed_integer(t)):
        return
    raise BatchTypeError("id", f"expected {_ID_EXPECTED}, found {_describe(t)}")


def _check_string_type(column: str, t) -> None:
    if isinstance(t, pa.DataType):
        value = t.value_type if pa.types.is_dictionary(t) else t
        if pa.types.is_string(value) or pa.types.is_large_string(value) or pa.types.is_null(t):
            return
    raise BatchTypeError(column, f"expected {_STRING_EXPECTED}, found {_describe(t)}")


def _check_label_type(t) -> None:
    if isinstance(t, _TensorInfo):
        ok = not t.dtype.is_floating_point and not t.dtype.is_complex and t.dtype != torch.bool
    else:
        ok = pa.types.is_integer(t) or pa.types.is_null(t)
    if not ok:
        raise BatchTypeError("label", f"expected an integer type (read as int32), found {_describe(t)}")


def _check_mode(name: str, mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"{name}: expected one of {MODES}, found {mode!r}")


def _check_size(name: str, value) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, np.integer))
                              or value < 1):
        raise ValueError(f"{name}: expected a positive integer or None, found {value!r}")


def _build_layout(found: Mapping[str, Any], *, members, classes, dim, embedding, label) -> tuple[BatchLayout, dict]:
    """The checks shared by :func:`check_schema` and :func:`decode_batch`.

    ``found`` maps column names to an Arrow type or a :class:`_TensorInfo`. Returns the layout and
    the parsed array specs of ``logits`` and ``embedding`` (the latter None when not decoded).
    """
    for name, value in (("members", members), ("classes", classes), ("dim", dim)):
        _check_size(name, value)
    _check_mode("embedding", embedding)
    _check_mode("label", label)
    present = ", ".join(found) or "none"
    for column, what in (("id", _ID_EXPECTED), ("logits", _LOGITS_FORMS)):
        if column not in found:
            raise MissingColumnError(column, f"expected a required column of {what}, found no such "
                                             f"column (columns: {present})")
    _check_id_type(found["id"])
    m, c, logits_spec = _check_logits(found["logits"], members, classes)

    embedding_spec = None
    if embedding != "ignore":
        if "embedding" in found:
            embedding_spec = _check_embedding(found["embedding"], dim)
        elif embedding == "required":
            raise MissingColumnError("embedding", f"expected a column of {_EMBEDDING_FORMS} "
                                                  f"(D={'any' if dim is None else dim}; required "
                                                  f"by the profile), found no such column "
                                                  f"(columns: {present})")
    has_label = False
    if label != "ignore":
        if "label" in found:
            _check_label_type(found["label"])
            has_label = True
        elif label == "required":
            raise MissingColumnError("label", "expected an integer column of true classes (required "
                                              f"for calibration data), found no such column "
                                              f"(columns: {present})")
    for column in ("source", "category"):
        if column in found:
            _check_string_type(column, found[column])
    layout = BatchLayout(
        members=m, classes=c,
        dim=None if embedding_spec is None else embedding_spec.shape[0],
        logits_dtype=logits_spec.dtype,
        embedding_dtype=None if embedding_spec is None else embedding_spec.dtype,
        id_type=pa.int64() if pa.types.is_integer(found["id"]) else found["id"],
        has_label=has_label, has_source="source" in found, has_category="category" in found,
    )
    return layout, {"logits": logits_spec, "embedding": embedding_spec}


def check_schema(schema: pa.Schema, *, members: int | None = None, classes: int | None = None,
                 dim: int | None = None, embedding: str = "optional", label: str = "optional") -> BatchLayout:
    """Validate a schema against the data contract and the profile, without reading any row.

    Args:
        schema: the Arrow schema of a batch, an IPC stream or a Parquet file.
        members, classes: M and C the profile expects (None: any).
        dim: embedding width D the profile expects (None: any).
        embedding, label: "optional" (checked when present), "required" (absent is an error) or
            "ignore" (never checked nor decoded).

    Returns the :class:`BatchLayout` a batch of this schema decodes to. Raises a
    :class:`BatchError` naming the column, what was expected and what was found.
    """
    return _check_schema(schema, members=members, classes=classes, dim=dim,
                         embedding=embedding, label=label)[0]


def check_bank_schema(schema: pa.Schema, *, dim: int | None = None) -> int:
    """Validate a reference bank's schema (an ``embedding`` column of ``fixed_size_list<float>[D]``
    or ``arrow.fixed_shape_tensor`` [D]; other columns are ignored) and return its D.

    ``dim``: the D the bank must have (the calibration data's, or a profile's), None for any.
    Raises a :class:`BatchError` on ``embedding`` that says it is the bank's.
    """
    if not isinstance(schema, pa.Schema):
        raise TypeError(f"schema: expected a pyarrow.Schema, found {type(schema).__name__}")
    _check_size("dim", dim)
    if "embedding" not in schema.names:
        raise MissingColumnError("embedding", f"expected the bank to have a column of {_EMBEDDING_FORMS}, "
                                              f"found no such column (columns: {', '.join(schema.names) or 'none'})")
    try:
        spec = _check_embedding(schema.field("embedding").type, None)
    except BatchError as exc:
        raise with_context(exc, "the bank") from None
    if dim is not None and spec.shape[0] != dim:
        raise BatchValueError("embedding", f"expected the bank's vectors to have the calibration data's "
                                           f"D={dim}, found D={spec.shape[0]} ({spec.found})")
    return spec.shape[0]


def _check_schema(schema, *, members, classes, dim, embedding, label) -> tuple[BatchLayout, dict]:
    """:func:`check_schema`, also returning the parsed specs that :func:`decode_batch` uses."""
    if not isinstance(schema, pa.Schema):
        raise TypeError(f"schema: expected a pyarrow.Schema, found {type(schema).__name__}")
    for column in ("id", "logits", "embedding", "label", "source", "category"):
        count = len(schema.get_all_field_indices(column))
        if count > 1:
            raise BatchValueError(column, f"expected one column of that name, found {count}")
    found = {field.name: field.type for field in schema}
    return _build_layout(found, members=members, classes=classes, dim=dim,
                         embedding=embedding, label=label)


# --------------------------------------------------------------------------------------------
# Arrow arrays -> tensors


def _from_numpy(a: np.ndarray) -> torch.Tensor:
    """torch view of a numpy array that may be read-only (Arrow memory)."""
    if a.flags.writeable:
        return torch.from_numpy(a)
    with warnings.catch_warnings():
        # The engine never writes into its inputs; torch only warns that writing is undefined.
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(a)


def _null_rows(arr: pa.Array, rows: int) -> np.ndarray | None:
    """bool [rows]: rows of which at least one of ``arr``'s len(arr)/rows elements is null."""
    if arr.null_count == 0:
        return None
    nulls = arr.is_null().to_numpy(zero_copy_only=False)
    return nulls.reshape(rows, -1).any(axis=1) if rows else np.zeros(0, dtype=bool)


def _arrow_floats(column: str, arr: pa.Array, spec: _ArraySpec) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Decode a float tensor column: (torch [B, *spec.shape] on the CPU, missing bool [B] or None).

    Zero-copy unless there are nulls or a permutation: the fixed-size lists are walked down to
    their float values by offset arithmetic alone (``FixedSizeListArray.values`` ignores the
    parent's slice offset, so the child range is sliced by hand).
    """
    rows = len(arr)
    if isinstance(arr, pa.ExtensionArray):
        arr = arr.storage
        assert spec.physical is not None  # set for a tensor extension type
        sizes = [math.prod(spec.physical)]
    else:
        sizes = list(spec.shape)
    missing = _null_rows(arr, rows)
    level = arr
    for size in sizes:
        level = level.values.slice(level.offset * size, len(level) * size)
        below = _null_rows(level, rows)
        if below is not None:
            missing = below if missing is None else missing | below
    if missing is None:
        values = level.to_numpy(zero_copy_only=True)
    else:
        # Null slots hold undefined values: NaN marks the whole row unusable downstream.
        logger.debug("%s: %d rows with nulls filled with NaN (a copy)", column, int(missing.sum()))
        values = level.to_numpy(zero_copy_only=False)
        if not values.flags.writeable:
            values = values.copy()
        values.reshape(rows, -1)[missing] = np.nan
    if spec.permutation is not None:
        assert spec.physical is not None  # a permutation comes with a tensor type's physical shape
        values = values.reshape(rows, *spec.physical)
        values = np.ascontiguousarray(values.transpose(0, *(1 + p for p in spec.permutation)))
    values = values.reshape(rows, *spec.shape)
    return _from_numpy(values), None if missing is None else torch.from_numpy(missing)


def _arrow_ids(arr: pa.Array) -> pa.Array:
    if arr.null_count:
        first = int(np.flatnonzero(arr.is_null().to_numpy(zero_copy_only=False))[0])
        raise BatchValueError("id", f"expected no nulls, found {arr.null_count} null ids "
                                    f"(first at row {first})")
    if pa.types.is_integer(arr.type) and arr.type != pa.int64():
        arr = arr.cast(pa.int64())
    return arr


# --------------------------------------------------------------------------------------------
# Ids: unique within a batch, and one type across the batches of one output


_KEY_SEEDS = (0x1DE9_0001, 0x1DE9_0002)  # fixed: equal ids give equal keys in every process


def id_keys(ids) -> np.ndarray:
    """uint64 [B] keys of non-null ids, for duplicate checks across batches at 8 bytes per row.

    An integer id's key is its own int64 bits (exact: two keys are equal only when the ids are).
    A string id's key is 64 bits of two XXH64 hashes of its UTF-8 bytes (string and large_string
    alike), so different ids share a key with probability about 2**-64 per pair: callers confirm
    an equal key against the ids themselves before calling it a duplicate.
    """
    from hitl_triage.kernels import audit_uniform

    ids = _single("id", ids)
    if pa.types.is_integer(ids.type):
        return np.ascontiguousarray(ids.cast(pa.int64()).to_numpy(zero_copy_only=False)).view(np.uint64)
    # The audit draw is (XXH64 >> 11) * 2**-53: times 2**53 it is the hash's top 53 bits, exactly.
    high, low = ((audit_uniform(ids, seed) * 2.0**53).astype(np.uint64) for seed in _KEY_SEEDS)
    return (high << np.uint64(11)) | (low >> np.uint64(42))


def batch_keys(ids: pa.Array) -> np.ndarray:
    """uint32 [B]: the top 32 bits of XXH64 of each id (integer ids hashed too, so that ids 2**32
    apart do not share a key), for the check within one batch."""
    from hitl_triage.kernels import audit_uniform

    return (audit_uniform(ids, _KEY_SEEDS[0]) * 2.0**32).astype(np.uint32)


def duplicate_keys(sorted_keys: np.ndarray) -> np.ndarray:
    """The distinct values that occur more than once in ``sorted_keys`` (sorted uint64 [N])."""
    repeated = sorted_keys[1:][sorted_keys[1:] == sorted_keys[:-1]]
    return np.unique(repeated)


def first_duplicate(ids, rows=None) -> tuple[int, int, int] | None:
    """Exact check of candidate rows: (count, row, first_seen_row) of the rows whose id repeats an
    earlier row's, or None when the ids are distinct. ``ids``: the candidates' ids in row order;
    ``rows``: their row numbers (default 0 .. len-1)."""
    values = ids.to_pylist() if isinstance(ids, (pa.Array, pa.ChunkedArray)) else list(ids)
    rows = range(len(values)) if rows is None else [int(r) for r in rows]
    seen: dict = {}
    count, first = 0, None
    for row, value in zip(rows, values):
        if value in seen:
            count += 1
            if first is None:
                first = (row, seen[value])
        else:
            seen[value] = row
    return None if first is None else (count, *first)


def duplicate_id_error(count: int, value, where: str, first_seen: str) -> DuplicateIdError:
    """The error for ``count`` repeated ids, the first being ``value`` at ``where``."""
    return DuplicateIdError(
        f"expected unique ids (the idempotency and audit-sampling key: one decision row per input "
        f"row), found {count} row(s) repeating an earlier row's id (first: id {value!r} at {where}, "
        f"first seen at {first_seen})", count=count, first=value,
    )


def check_unique_ids(ids: pa.Array) -> None:
    """Raise :class:`DuplicateIdError` naming the first repeated id and the count when ``ids``
    (non-null, one batch) are not unique.

    Strictly increasing integer ids pass in one scan. Other ids are hashed to 32 bits and sorted
    (two stable 16-bit passes, which numpy sorts by radix: about 1 ns per row, where sorting 64-bit
    keys costs 40); rows sharing a hash (a few per million rows by chance) are confirmed against
    the ids themselves.
    """
    n = len(ids)
    if n < 2:
        return
    if pa.types.is_integer(ids.type):
        values = ids.to_numpy(zero_copy_only=False)
        if bool(np.all(values[1:] > values[:-1])):
            return
    keys = batch_keys(ids)
    low_first = keys[np.argsort((keys & np.uint32(0xFFFF)).astype(np.uint16), kind="stable")]
    ordered = low_first[np.argsort((low_first >> np.uint32(16)).astype(np.uint16), kind="stable")]
    repeated = duplicate_keys(ordered)
    if not len(repeated):
        return
    rows = np.flatnonzero(np.isin(keys, repeated))
    found = first_duplicate(ids.take(pa.array(rows)), rows)
    if found is not None:
        count, row, seen = found
        raise duplicate_id_error(count, ids[row].as_py(), f"row {row}", f"row {seen}")


def common_id_type(types: Mapping[str, pa.DataType]) -> pa.DataType:
    """The id type of one output made from inputs whose id columns have ``types`` (name -> type).

    Integer ids become int64, string ids string (large_string when any input has it). Integer and
    string ids never mix: the audit draw hashes an int64 id's 8 bytes and a string id's UTF-8
    bytes, so ``7`` and ``"7"`` are different predictions with different draws; the error names
    one input of each kind.
    """
    ints = [name for name, t in types.items() if pa.types.is_integer(t)]
    strings = [name for name, t in types.items() if not pa.types.is_integer(t)]
    if ints and strings:
        raise BatchTypeError(
            "id", f"expected one id type in every input (integer and string ids hash differently in "
                  f"the audit draw), found {_describe(types[ints[0]])} in {ints[0]} and "
                  f"{_describe(types[strings[0]])} in {strings[0]}")
    if ints:
        return pa.int64()
    return pa.large_string() if any(pa.types.is_large_string(types[n]) for n in strings) else pa.string()


def _arrow_labels(arr: pa.Array) -> np.ndarray:
    """Integer labels as numpy (int32 or int64), null -> -1 (unknown)."""
    if pa.types.is_null(arr.type):
        return np.full(len(arr), -1, dtype=np.int32)
    if arr.type not in (pa.int32(), pa.int64()):
        try:
            arr = arr.cast(pa.int64())
        except pa.ArrowInvalid as exc:
            raise BatchValueError("label", f"expected class indices that fit int64, found {exc}") from exc
    if arr.null_count:
        arr = arr.fill_null(-1)
    return arr.to_numpy(zero_copy_only=False)


def _arrow_strings(arr: pa.Array) -> pa.Array:
    return arr.cast(pa.string()) if pa.types.is_null(arr.type) else arr


# --------------------------------------------------------------------------------------------
# In-process mappings -> Arrow arrays and tensors


def _single(column: str, value) -> pa.Array:
    """One Arrow array from an Array or ChunkedArray (combining chunks copies)."""
    if isinstance(value, pa.ChunkedArray):
        if value.num_chunks == 1:
            return value.chunk(0)
        logger.debug("%s: combining %d chunks (a copy)", column, value.num_chunks)
        return value.combine_chunks()
    return value


def _as_tensor(column: str, value) -> torch.Tensor:
    """A torch view of a numpy array, torch tensor or DLPack array (CUDA ones stay on the GPU)."""
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in "biuf":
            raise BatchTypeError(column, f"expected a numeric array, found numpy dtype {value.dtype}")
        return _from_numpy(value)
    if hasattr(value, "__dlpack__"):
        try:
            return torch.from_dlpack(value)
        except (RuntimeError, TypeError, BufferError) as exc:
            raise BatchTypeError(column, f"expected a DLPack array torch can import, found "
                                         f"{type(value).__name__} ({exc})") from exc
    raise BatchTypeError(column, f"expected an Arrow array, numpy array, torch tensor or DLPack "
                                 f"array, found {type(value).__name__}")


def _mapping_ids(value) -> pa.Array:
    if isinstance(value, (pa.Array, pa.ChunkedArray)):
        return _single("id", value)
    if isinstance(value, (list, tuple)):
        try:
            return pa.array(value)
        except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
            raise BatchTypeError("id", f"expected a list of str or of int, found {exc}") from exc
    if isinstance(value, np.ndarray) and value.dtype.kind in "UO":
        return pa.array(value)
    t = _as_tensor("id", value)
    if t.dtype.is_floating_point or t.dtype.is_complex or not t.dtype.is_signed:
        raise BatchTypeError("id", f"expected {_ID_EXPECTED}, found {_describe(_TensorInfo(tuple(t.shape), t.dtype))}")
    if t.ndim != 1:
        raise BatchValueError("id", f"expected a 1-d array, found shape {list(t.shape)}")
    # pa.array views an int64 numpy array without copying; narrower integers are widened (a copy).
    return pa.array(t.cpu().to(torch.int64).numpy())


def _mapping_strings(column: str, value) -> pa.Array:
    if isinstance(value, (pa.Array, pa.ChunkedArray)):
        return _single(column, value)
    if isinstance(value, (list, tuple)) or (isinstance(value, np.ndarray) and value.dtype.kind in "UO"):
        try:
            return pa.array(value, type=pa.string())
        except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
            raise BatchTypeError(column, f"expected {_STRING_EXPECTED} (or a list of str), found "
                                         f"{exc}") from exc
    kind = type(value).__name__
    if isinstance(value, np.ndarray):
        kind = f"numpy array of {value.dtype}"
    elif isinstance(value, torch.Tensor):
        kind = f"torch tensor of {value.dtype}"
    raise BatchTypeError(column, f"expected {_STRING_EXPECTED} (or a list of str), found {kind}")


def _mapping_value(column: str, value):
    """Arrow array (kept as Arrow) or torch tensor for a float/label column of a mapping."""
    if isinstance(value, (pa.Array, pa.ChunkedArray)):
        return _single(column, value)
    if column == "label" and isinstance(value, (list, tuple)):
        value = np.asarray(value)
    return _as_tensor(column, value)


def _found(value):
    if isinstance(value, pa.Array):
        return value.type
    return _TensorInfo(tuple(value.shape), value.dtype)


# --------------------------------------------------------------------------------------------
# The boundary


def decode_batch(data, *, members: int | None = None, classes: int | None = None,
                 dim: int | None = None, device="cpu", embedding: str = "optional",
                 label: str = "optional", transfer: HostToDevice | None = None) -> PredictionBatch:
    """Validate a batch of predictions and decode it into tensors on ``device``.

    Args:
        data: a pyarrow RecordBatch or Table (a Table of several chunks is combined, which copies
            it), or a mapping of column name -> array for in-process callers: pyarrow arrays,
            numpy arrays, torch tensors (CPU or CUDA) or any DLPack array (CuPy...; imported
            zero-copy, staying on its GPU), and Python lists for ``id``, ``source``,
            ``category`` (and ``label``). In a mapping, ``logits`` is [B, M, C] or [B, C] (M=1)
            and ``embedding`` [B, D].
        members, classes, dim: M, C and D the profile expects (None: any).
        device: "cpu", "cuda" or "cuda:N": where the tensors of the result live.
        embedding, label: "optional", "required" or "ignore" (see :func:`check_schema`).
        transfer: the :class:`~hitl_triage.engine.device.HostToDevice` for a CUDA device
            (default: the device's shared one).

    Returns a :class:`PredictionBatch`. Raises a :class:`BatchError` (ValueError or TypeError)
    naming the column, what was expected and what was found.
    """
    dev = resolve_device(device)
    if isinstance(data, (pa.Table, pa.RecordBatch)):
        layout, specs = _check_schema(data.schema, members=members, classes=classes, dim=dim,
                                      embedding=embedding, label=label)
        columns = {name: _single(name, data.column(name))
                   for name in _wanted(data.schema.names, embedding, label)}
    elif isinstance(data, Mapping):
        _check_mode("embedding", embedding)
        _check_mode("label", label)
        columns = _mapping_columns(data, embedding, label)
        found = {name: _found(value) for name, value in columns.items()}
        layout, specs = _build_layout(found, members=members, classes=classes, dim=dim,
                                      embedding=embedding, label=label)
    else:
        raise TypeError(f"data: expected a pyarrow RecordBatch or Table, or a mapping of column "
                        f"name -> array, found {type(data).__name__}")

    ids = _arrow_ids(columns["id"])
    check_unique_ids(ids)
    rows = len(ids)
    for name, value in columns.items():
        if isinstance(value, pa.Array):
            n = len(value)
        elif value.ndim == 0:
            raise BatchValueError(name, f"expected an array of {rows} rows (as in id), found a scalar")
        else:
            n = value.shape[0]
        if n != rows:
            raise BatchValueError(name, f"expected {rows} rows (as in id), found {n}")

    host: dict[str, torch.Tensor | None] = {}
    logits, logits_missing = _floats("logits", columns["logits"], specs["logits"])
    if logits.ndim == 2:
        logits = logits.unsqueeze(1)
    host["logits"], host["logits_missing"] = logits, logits_missing
    if specs["embedding"] is not None:
        host["embedding"], host["embedding_missing"] = _floats(
            "embedding", columns["embedding"], specs["embedding"])
    labels = None
    if layout.has_label:
        value = columns["label"]
        labels = _from_numpy(_arrow_labels(value)) if isinstance(value, pa.Array) else value
        if labels.ndim != 1:
            raise BatchValueError("label", f"expected an array of shape [B], found shape {list(labels.shape)}")
        validate_labels(labels, ids, layout.classes)
        host["label"] = labels.to(torch.int32)
    moved = to_device({k: v.contiguous() if v is not None else None for k, v in host.items()},
                      dev, transfer=transfer)
    assert moved["logits"] is not None  # only None passes through as None
    return PredictionBatch(
        num_rows=rows,
        ids=ids,
        logits=moved["logits"],
        logits_missing=moved["logits_missing"],
        embedding=moved.get("embedding"),
        embedding_missing=moved.get("embedding_missing"),
        source=_arrow_strings(columns["source"]) if layout.has_source else None,
        category=_arrow_strings(columns["category"]) if layout.has_category else None,
        label=moved.get("label"),
    )


_COLUMNS = ("id", "logits", "embedding", "label", "source", "category")


def _wanted(names, embedding: str, label: str) -> list[str]:
    """The contract's columns present in ``names``, less those the caller ignores."""
    ignored = {"embedding"} if embedding == "ignore" else set()
    if label == "ignore":
        ignored.add("label")
    return [name for name in _COLUMNS if name in names and name not in ignored]


def _mapping_columns(data: Mapping, embedding: str, label: str) -> dict:
    columns: dict[str, Any] = {}
    for name in _wanted(list(data), embedding, label):
        value = data[name]
        if value is None:
            continue
        if name == "id":
            columns[name] = _mapping_ids(value)
        elif name in ("source", "category"):
            columns[name] = _mapping_strings(name, value)
        else:
            columns[name] = _mapping_value(name, value)
    return columns


def _floats(column: str, value, spec: _ArraySpec) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(value, pa.Array):
        return _arrow_floats(column, value, spec)
    return value, None


def decode_embedding(column, *, dim: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Decode an embedding column alone (a reference bank, say) on the CPU.

    Args:
        column: a pyarrow Array or ChunkedArray of ``fixed_size_list<float>[D]`` or
            ``arrow.fixed_shape_tensor`` [D] (chunks are combined, which copies).
        dim: the D expected (None: any).

    Returns (vectors [N, D] torch on the CPU, dtype as stored, zero-copy without nulls; missing
    bool [N] where the entry or a value was null, those rows NaN, or None without nulls).
    """
    if not isinstance(column, (pa.Array, pa.ChunkedArray)):
        raise BatchTypeError("embedding", f"expected a pyarrow Array or ChunkedArray, found "
                                          f"{type(column).__name__}")
    _check_size("dim", dim)
    arr = _single("embedding", column)
    return _arrow_floats("embedding", arr, _check_embedding(arr.type, dim))


# --------------------------------------------------------------------------------------------
# Labels


def validate_labels(labels, ids, classes: int):
    """Check true-class labels and return the mask of known ones.

    Args:
        labels: integer [B] (torch on any device, numpy, pyarrow or a list); -1 means unknown.
        ids: the rows' ids [B] (pyarrow array, list, numpy or torch), used to name the first
            offending row; None names it by row index.
        classes: C; valid labels are 0 .. C-1.

    Returns bool [B], True where the label is known (>= 0): a torch tensor on the labels' device
    for torch input, else numpy. Raises :class:`BatchValueError` naming how many rows are out of
    range and the first offending id; :class:`BatchTypeError` for non-integer labels.
    """
    numpy_out = not isinstance(labels, torch.Tensor)
    if isinstance(labels, (pa.Array, pa.ChunkedArray)):
        arr = _single("label", labels)
        _check_label_type(arr.type)
        labels = _arrow_labels(arr)
    elif isinstance(labels, (list, tuple)):
        labels = np.asarray(labels)
    t = _as_tensor("label", labels)
    _check_label_type(_TensorInfo(tuple(t.shape), t.dtype))
    if not t.dtype.is_signed:
        t = t.to(torch.int64)  # comparisons are not implemented for every unsigned dtype
    if not isinstance(classes, (int, np.integer)) or isinstance(classes, bool) or classes < 1:
        raise ValueError(f"classes: expected a positive integer, found {classes!r}")
    known = t >= 0
    bad = ~((known & (t < classes)) | (t == -1))
    count = int(bad.sum())
    if count:
        first = int(torch.nonzero(bad.reshape(-1))[0, 0])
        value = int(t.reshape(-1)[first])
        raise BatchValueError("label", f"expected values in [0, {classes}) or -1 (unknown), found "
                                       f"{count} rows outside that range (first: {_id_at(ids, first)}, "
                                       f"label {value})")
    return known.cpu().numpy() if numpy_out else known


def _id_at(ids, row: int) -> str:
    if ids is None:
        return f"row {row}"
    if isinstance(ids, (pa.Array, pa.ChunkedArray)):
        value = ids[row].as_py()
    elif isinstance(ids, torch.Tensor):
        value = ids[row].item()
    else:
        value = ids[row]
        value = value.item() if isinstance(value, np.generic) else value
    return f"id {value!r}"


__all__ = [
    "BatchError", "BatchLayout", "BatchTypeError", "BatchValueError", "DuplicateIdError",
    "MissingColumnError", "PredictionBatch", "check_bank_schema", "check_schema", "check_unique_ids",
    "common_id_type", "decode_batch", "decode_embedding", "id_keys", "validate_labels", "with_context",
]
