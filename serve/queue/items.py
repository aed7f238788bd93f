"""Review items: what a reviewer needs of each escalated or audit-sampled row, as Arrow.

An item is one row of the engine's decisions (the decision columns, ``source`` and ``category``)
joined with its prediction: the logits, the embedding when the queue keeps them, and every other
column the fleet sent (for example a ``uri`` of the original image), which passes through
untouched. Both queue backends store a batch's items as one Arrow IPC blob and keep their own
state (tier, lease, verdicts) per item id, so the item encoding lives here, once.
"""

from __future__ import annotations

import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from hitl_triage.engine.policy import Reason

# Input columns of the data contract that are not passed through as extras.
CONTRACT_COLUMNS = ("id", "logits", "embedding", "source", "category", "label")
# The decision columns an item carries (besides id); `escalate` is always true for an item and
# `valid` is implied by the reasons, so neither is kept.
DECISION_COLUMNS = (
    "tier", "reason_mask", "priority", "predicted_class", "confidence", "margin", "mutual_info",
    "vote_agreement", "ood_score", "audit_weight", "audit_stratum", "profile_version", "source", "category",
    "budget_step",  # the service's online budget control step, where it is on (its thresholds decided the row)
)
# Columns hidden from the reviewer of a blind item (an audit sample served without the model's
# opinion, so the verdict is not anchored on it).
PREDICTION_COLUMNS = ("predicted_class", "confidence", "margin", "mutual_info", "vote_agreement", "logits")


class ItemError(ValueError):
    """Decisions and predictions that cannot become review items (names the field)."""


def review_items(decisions: pa.RecordBatch | pa.Table, predictions: pa.RecordBatch | pa.Table, *,
                 keep_embedding: bool = False, now: float | None = None) -> pa.Table:
    """The review items of one decision batch: its escalated rows (audit samples included),
    with ``id`` as a string (the queue's key), the decision columns, ``classes`` (C, to check a
    verdict's label), ``enqueued_at`` (seconds since the epoch, float64), ``logits``, the
    embedding when ``keep_embedding``, and the predictions' other columns.

    ``decisions`` must be the engine's output for ``predictions``: same rows, same order, same
    ids (checked, so a mismatched pair is refused rather than stored wrong)."""
    if decisions.num_rows != predictions.num_rows:
        raise ItemError(
            f"predictions: expected {decisions.num_rows} rows to match the decisions, found {predictions.num_rows}"
        )
    for name in ("id", "escalate", "tier", "reason_mask", "priority", "predicted_class"):
        if name not in decisions.schema.names:
            raise ItemError(f"decisions: expected a {name!r} column (the engine's decision columns), found none")
    if "id" not in predictions.schema.names or "logits" not in predictions.schema.names:
        raise ItemError("predictions: expected the 'id' and 'logits' columns of the data contract")
    ids = _string_ids(decisions.column("id"))
    if not pc.all(pc.equal(ids, _string_ids(predictions.column("id")))).as_py() and decisions.num_rows:
        raise ItemError("predictions: expected the same ids in the same order as the decisions, found others")
    picked = np.flatnonzero(_numpy_bool(decisions.column("escalate")))
    rows = pa.array(picked, pa.int64())
    columns: dict[str, pa.Array | pa.ChunkedArray] = {"id": ids.take(rows)}
    for name in DECISION_COLUMNS:
        if name in decisions.schema.names:
            columns[name] = decisions.column(name).take(rows)
    logits = _taken(predictions.column("logits"), rows)
    columns["classes"] = pa.array(np.full(len(picked), _classes(logits.type), np.int32))
    columns["enqueued_at"] = pa.array(np.full(len(picked), time.time() if now is None else now, np.float64))
    columns["logits"] = logits
    if keep_embedding and "embedding" in predictions.schema.names:
        columns["embedding"] = _taken(predictions.column("embedding"), rows)
    for name in predictions.schema.names:
        if name not in CONTRACT_COLUMNS and name not in columns:
            columns[name] = _taken(predictions.column(name), rows)
    return pa.table(columns)


def _taken(column: pa.Array | pa.ChunkedArray, rows: pa.Array) -> pa.Array:
    """``column.take(rows)`` on a column that may be a slice (the batcher's engine batches are
    slices of the requests). pyarrow 26's take and filter of a sliced list of fixed-size lists
    (the logits) ignore the slice's offset in the nested child: they return other rows' values,
    and can read past the end of the buffers (a segfault of the server). A sliced nested column
    is copied to offset 0 first (``concat_arrays``, which handles offsets right)."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if array.offset and pa.types.is_nested(array.type):
        array = pa.concat_arrays([array])
    return array.take(rows)


def blind(items: pa.Table, blind_audit: bool, blind_share: float = 0.0) -> np.ndarray:
    """bool [n]: the items served blind (audit samples with no other reason, when configured,
    and the share ``blind_share`` of the others drawn by :func:`.gold.blind_draw`)."""
    from .gold import blind_draw

    if items.num_rows == 0:
        return np.zeros(items.num_rows, dtype=bool)
    hidden = blind_draw(items.column("id").combine_chunks() if isinstance(items.column("id"), pa.ChunkedArray)
                        else items.column("id"), blind_share)
    if blind_audit:
        hidden |= items.column("reason_mask").to_numpy(zero_copy_only=False) == int(Reason.AUDIT)
    return hidden


def hide_predictions(items: pa.Table, hidden: np.ndarray) -> pa.Table:
    """``items`` with the model's prediction set to null on the ``hidden`` rows, and a ``blind``
    column saying which those are."""
    if hidden.any():
        keep = pa.array(~hidden)
        for name in PREDICTION_COLUMNS:
            if name in items.schema.names:
                column = items.column(name)
                nulls = pa.nulls(len(column), column.type)
                items = items.set_column(items.schema.get_field_index(name), name,
                                         pc.if_else(keep, column, nulls))
    return items.append_column("blind", pa.array(hidden))


def to_ipc(items: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, items.schema) as writer:
        writer.write_table(items)
    return sink.getvalue().to_pybytes()


def from_ipc(blob: bytes) -> pa.Table:
    return pa.ipc.open_stream(pa.py_buffer(blob)).read_all()


def _string_ids(column) -> pa.Array:
    column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if pa.types.is_dictionary(column.type):
        column = column.dictionary_decode()
    if column.null_count:
        raise ItemError("id: expected no null ids, found nulls")
    return column.cast(pa.string())


def _numpy_bool(column) -> np.ndarray:
    column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    return np.asarray(column.fill_null(False).to_numpy(zero_copy_only=False), dtype=bool)


def _classes(logits_type: pa.DataType) -> int:
    """C of a logits column: the innermost list size (or the tensor extension's last dim)."""
    if isinstance(logits_type, pa.FixedShapeTensorType):
        return int(logits_type.shape[-1])
    t = logits_type
    while pa.types.is_fixed_size_list(t.value_type):
        t = t.value_type
    return int(t.list_size)


__all__ = ["ItemError", "blind", "from_ipc", "hide_predictions", "review_items", "to_ipc"]
