"""Reading items back from the batch blobs both backends store, and the verdict export table."""

from __future__ import annotations

import collections
from typing import Callable, Sequence

import numpy as np
import pyarrow as pa

from .base import VERDICT_SCHEMA
from .items import blind, hide_predictions

# Decision columns the verdict export carries (the item's tier at decision time is `decision_tier`).
EXPORT_COLUMNS = ("reason_mask", "priority", "predicted_class", "confidence", "margin", "mutual_info",
                  "vote_agreement", "ood_score", "audit_weight", "audit_stratum", "profile_version", "source",
                  "category", "classes", "enqueued_at")
# The item's inputs the verdict export carries too, where the item has them (the logits always,
# the embedding when the queue keeps it): what a refit and a training pipeline read.
EXPORT_INPUTS = ("logits", "embedding")


class PayloadReader:
    """Rows of stored batches, by (batch, row) reference, through a small cache of decoded
    batches (claims and exports read the same few recent batches many times)."""

    def __init__(self, read_batch: Callable[[int], pa.Table], cache_batches: int = 64):
        self._read = read_batch
        self._cache: collections.OrderedDict[int, pa.Table] = collections.OrderedDict()
        self._size = cache_batches

    def _batch(self, batch: int) -> pa.Table:
        table = self._cache.get(batch)
        if table is None:
            table = self._read(batch)
            self._cache[batch] = table
            while len(self._cache) > self._size:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(batch)
        return table

    def rows(self, refs: Sequence[tuple[int, int]]) -> pa.Table:
        """The items at ``refs``, in that order (batches with different extra columns are
        unified; a column a batch lacks is null there)."""
        if not refs:
            return self._empty()
        groups: dict[int, list[int]] = collections.defaultdict(list)
        for position, (batch, row) in enumerate(refs):
            groups[batch].append(position)
        parts, order = [], []
        for batch, positions in groups.items():
            parts.append(self._batch(batch).take(pa.array([refs[p][1] for p in positions], pa.int64())))
            order.extend(positions)
        table = pa.concat_tables(parts, promote_options="default") if len(parts) > 1 else parts[0]
        inverse = [0] * len(order)
        for i, position in enumerate(order):
            inverse[position] = i
        return table.take(pa.array(inverse, pa.int64()))

    def _empty(self) -> pa.Table:
        if self._cache:
            return next(iter(self._cache.values())).schema.empty_table()
        return pa.schema([pa.field("id", pa.string()), pa.field("tier", pa.string())]).empty_table()


def claimed_items(payload: PayloadReader, refs: Sequence[tuple[int, int]], tier: str, deliveries: Sequence[int],
                  until: float, history: Sequence[list[str]], blind_audit: bool, blind_share: float = 0.0) -> pa.Table:
    """What ``claim`` returns for the items at ``refs``: the item columns with ``tier`` the tier
    they were claimed at (an item keeps its decision-time tier in its blob), the prediction
    hidden on blind items, ``deliveries``, ``lease_until`` (seconds since the epoch) and
    ``history`` (the item's earlier verdicts, oldest first, as "tier/reviewer: action [label]")."""
    items = payload.rows(refs)
    items = items.set_column(items.schema.get_field_index("tier"), "tier", pa.array([tier] * len(refs), pa.string()))
    items = hide_predictions(items, blind(items, blind_audit, blind_share))
    return items.append_column("deliveries", pa.array(deliveries, pa.int32())) \
                .append_column("lease_until", pa.array([until] * len(refs), pa.float64())) \
                .append_column("history", pa.array(history, pa.list_(pa.string())))


def history_line(tier: str, reviewer: str, action: str, label: int) -> str:
    """One verdict as a claimed item's ``history`` shows it."""
    return f"{tier}/{reviewer}: {action}" + (f" {label}" if label >= 0 else "")


def verdict_table(rows: Sequence[tuple], payload: PayloadReader, options=None,
                  gold: dict[str, int] | None = None) -> pa.Table:
    """The verdict export from ``(id, label, reviewer, tier, action, ts, stored_at, batch, row)``
    rows: the verdict columns of the design, ``stored_at``, the item's decision columns, its
    ``logits`` and ``embedding`` where it kept them, then the fleet's extra columns; with the
    queue's ``options``, ``blind`` (the item was served without the prediction) and
    ``gold_label`` (the known answer of a gold item, null for the others; ``gold``: id -> label)."""
    columns = [list(c) for c in zip(*rows)] if rows else [[] for _ in range(9)]
    ids, labels, reviewers, tiers, actions, ts, stored_at = columns[:7]
    table = pa.table({
        "id": pa.array(ids, pa.string()),
        "label": pa.array(labels, pa.int32()),
        "reviewer": pa.array(reviewers, pa.string()),
        "tier": pa.array(tiers, pa.string()),
        "action": pa.array(actions, pa.string()),
        "ts": pa.array([int(t * 1e6) for t in ts], pa.int64()).cast(VERDICT_SCHEMA.field("ts").type),
        "stored_at": pa.array([int(t * 1e6) for t in stored_at], pa.int64()).cast(pa.timestamp("us", tz="UTC")),
    })
    items = payload.rows([(r[7], r[8]) for r in rows])
    if "tier" in items.schema.names:
        table = table.append_column("decision_tier", items.column("tier"))
    for name in EXPORT_COLUMNS + EXPORT_INPUTS:
        if name in items.schema.names:
            table = table.append_column(name, items.column(name))
    # The fleet's extra columns (a `uri` of the input, a `model_version`...) follow: a training
    # pipeline needs them; one named like a verdict or decision column is left out.
    for name in items.schema.names:
        if name not in table.schema.names and name != "tier":
            table = table.append_column(name, items.column(name))
    if options is not None:
        hidden = blind(items, options.blind_audit, options.blind_share) if rows else np.zeros(0, bool)
        table = table.append_column("blind", pa.array(hidden, pa.bool_()))
        table = table.append_column("gold_label", pa.array([(gold or {}).get(i) for i in ids], pa.int32()))
    return table
