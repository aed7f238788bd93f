"""The rows a feedback round refits on, and the edge cases its verdicts name.

From the queue's verdict export (``ReviewQueue.verdicts()``: one row per verdict, oldest first,
with the item's decision columns, logits and, where the queue keeps it, the embedding):

- :func:`final_verdicts`: one row per item, its last verdict that settles it (``escalate``
  verdicts only move an item; after an adjudication the adjudicator's verdict is the last).
- :func:`audit_rows`: the audit-sampled items (``audit_weight`` > 0) as labelled rows with their
  Horvitz-Thompson weight: the only verdicts that are unbiased for the traffic (DESIGN.md).
- :func:`combine`: those rows beside the rows the previous version was fitted on, weighted by the
  age rule (README, "Feedback"): the new round's audit rows carry ``1 - old_share`` of the total
  weight, every older row together ``old_share``, in proportion to the weights they had, so the
  share of a round falls by ``old_share`` with every round after it.
- :func:`edge_cases`: in-scope edge cases (escalated for ANOMALY, then confirmed or corrected:
  they join the bank) and watched cases (out-of-scope verdicts, and corrections of rows escalated
  for ANOMALY: they join the watch list).

Rows are a plain Arrow table (:data:`ROW_COLUMNS`), stored as ``feedback/rows.parquet`` in every
version feedback writes, so the next round finds them.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .policy import Reason

ROWS_FILE = "feedback/rows.parquet"
# label: the true class, -1 for an out-of-scope row (a problem, never a class to fit);
# problem: the model was wrong on the row (a correction, an out-of-scope verdict, or a calibration
# row whose label differs from the prediction at fit time); ood_score: the k-NN distance the
# engine gave the item (used where the row has no embedding); origin: where the row came from.
ROW_COLUMNS = ("id", "logits", "embedding", "source", "label", "problem", "ood_score", "weight", "origin")


class FeedbackError(ValueError):
    """Verdicts or rows a feedback round cannot use (names the column)."""


def final_verdicts(verdicts: pa.Table) -> pa.Table:
    """One row per item id: its last non-``escalate`` verdict (the table is oldest first)."""
    for name in ("id", "action", "label"):
        if name not in verdicts.schema.names:
            raise FeedbackError(f"verdicts: expected a {name!r} column (the queue's verdict export), "
                                f"found columns {verdicts.schema.names}")
    settled = verdicts.filter(pc.not_equal(verdicts.column("action"), "escalate"))
    if settled.num_rows == 0:
        return settled
    ids = settled.column("id").to_pylist()
    last = {item: row for row, item in enumerate(ids)}  # later rows win
    return settled.take(pa.array(sorted(last.values()), pa.int64()))


def problem_of(final: pa.Table) -> np.ndarray:
    """bool [n]: the reviewer found the model wrong (a correction to another class than the
    predicted one, or out of scope). A blind reviewer's ``correct`` to the predicted class is a
    confirmation."""
    action = np.asarray(final.column("action").to_pylist(), dtype=object)
    label = final.column("label").to_numpy(zero_copy_only=False)
    predicted = final.column("predicted_class").fill_null(-1).to_numpy(zero_copy_only=False)
    return (action == "out_of_scope") | ((action == "correct") & (label != predicted))


def audit_rows(final: pa.Table, origin: str) -> pa.Table:
    """The audit-sampled items of ``final`` as rows (:data:`ROW_COLUMNS`), weighted by their
    ``audit_weight`` (1 / the stratum's rate)."""
    if "audit_weight" not in final.schema.names or "logits" not in final.schema.names:
        raise FeedbackError("verdicts: expected 'audit_weight' and 'logits' columns (the queue's verdict export "
                            f"of this release), found columns {final.schema.names}")
    weight = final.column("audit_weight").fill_null(0.0).to_numpy(zero_copy_only=False).astype(np.float64)
    audited = final.filter(pa.array(weight > 0))
    action = np.asarray(audited.column("action").to_pylist(), dtype=object)
    label = audited.column("label").to_numpy(zero_copy_only=False).astype(np.int32)
    label = np.where(action == "out_of_scope", -1, label).astype(np.int32)
    return rows_table(
        ids=audited.column("id"), logits=audited.column("logits"),
        embedding=audited.column("embedding") if "embedding" in audited.schema.names else None,
        source=audited.column("source") if "source" in audited.schema.names else None,
        label=label, problem=problem_of(audited),
        ood_score=audited.column("ood_score").to_numpy(zero_copy_only=False).astype(np.float32)
        if "ood_score" in audited.schema.names else np.full(audited.num_rows, np.nan, np.float32),
        weight=weight[weight > 0], origin=origin,
    )


def rows_table(*, ids, logits, embedding, source, label, problem, ood_score, weight, origin: str) -> pa.Table:
    n = len(ids)
    ids = ids.combine_chunks() if isinstance(ids, pa.ChunkedArray) else ids
    return pa.table({
        "id": pa.array(ids).cast(pa.string()),
        "logits": logits,
        "embedding": embedding if embedding is not None else pa.nulls(n, pa.null()),
        "source": source.cast(pa.string()) if source is not None else pa.nulls(n, pa.string()),
        "label": pa.array(np.asarray(label, np.int32)),
        "problem": pa.array(np.asarray(problem, bool)),
        "ood_score": pa.array(np.asarray(ood_score, np.float32)),
        "weight": pa.array(np.asarray(weight, np.float64)),
        "origin": pa.array([origin] * n, pa.string()),
    })


def combine(old: pa.Table | None, new: pa.Table, old_share: float, min_share: float) -> pa.Table:
    """The rows of this round: ``new`` scaled to ``1 - old_share`` of the total weight, ``old``
    to ``old_share`` (keeping their relative weights); rows weighing less than ``min_share`` of
    an average row (total / rows) are dropped. Without new rows the old ones keep their weights;
    without old rows the new ones take it all."""
    parts = []
    new_total = float(pc.sum(new.column("weight")).as_py() or 0.0) if new.num_rows else 0.0
    old_total = float(pc.sum(old.column("weight")).as_py() or 0.0) if old is not None and old.num_rows else 0.0
    if new_total > 0:
        scale_new = (1.0 - old_share) / new_total if old_total > 0 else 1.0 / new_total
        parts.append(_scaled(new, scale_new))
    if old_total > 0:
        assert old is not None
        parts.append(_scaled(old, (old_share if new_total > 0 else 1.0) / old_total))
    if not parts:
        raise FeedbackError("verdicts: expected audit-sampled verdicts or earlier rows to refit on, found neither")
    rows = pa.concat_tables([_unify(p) for p in parts], promote_options="default")
    keep = pc.greater_equal(rows.column("weight"), min_share / rows.num_rows)  # total weight is 1
    return rows.filter(keep)


def _scaled(rows: pa.Table, factor: float) -> pa.Table:
    weight = rows.column("weight").to_numpy().astype(np.float64) * factor
    return rows.set_column(rows.schema.get_field_index("weight"), "weight", pa.array(weight))


def _unify(rows: pa.Table) -> pa.Table:
    """Column types every part shares (the embedding of a part without one is all null)."""
    if "embedding" not in rows.schema.names:
        return rows
    embedding = rows.column("embedding")
    if pa.types.is_null(embedding.type):
        return rows.drop_columns(["embedding"])
    return rows


def edge_cases(final: pa.Table) -> tuple[pa.Table, pa.Table]:
    """(in-scope edge cases, watched cases) among ``final``'s items that kept their embedding:
    in scope: escalated for ANOMALY and confirmed or corrected; watched: an out-of-scope verdict,
    or a correction (to another class than the predicted one) of a row escalated for ANOMALY."""
    if "embedding" not in final.schema.names or final.num_rows == 0:
        return final.slice(0, 0), final.slice(0, 0)
    has = pc.is_valid(final.column("embedding")).to_numpy(zero_copy_only=False)
    mask = final.column("reason_mask").fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
    anomaly = (mask & int(Reason.ANOMALY)) > 0
    action = np.asarray(final.column("action").to_pylist(), dtype=object)
    problem = problem_of(final)
    in_scope = has & anomaly & np.isin(action, ["confirm", "correct"])
    watched = has & ((action == "out_of_scope") | (anomaly & problem))
    return final.filter(pa.array(in_scope)), final.filter(pa.array(watched))


def embeddings(column) -> np.ndarray:
    """float32 [n, D] from an Arrow fixed-size-list (or tensor) embedding column without nulls."""
    column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if isinstance(column.type, pa.FixedShapeTensorType):
        column = column.storage
    dim = column.type.list_size
    return np.asarray(column.flatten().to_numpy(zero_copy_only=False), np.float32).reshape(-1, dim)


__all__ = ["FeedbackError", "ROWS_FILE", "ROW_COLUMNS", "audit_rows", "combine", "edge_cases", "embeddings",
           "final_verdicts", "problem_of", "rows_table"]
