"""Gold items: known-answer items from labelled calibration data, mixed into every tier's queue so
that each reviewer's accuracy can be measured over time (the seed's "periodic re-calibration
tests to detect annotator drift"), and the draw of blind items.

    queue.gold = GoldPool.from_labelled(engine.triage(calibration), calibration)   # once
    queue.enqueue(decisions, predictions)   # with options.gold_share > 0, gold items come along

A gold item is a calibration row as the engine decided it (its reasons, priority, prediction,
source, category, logits), sent to the tier of the real items it goes with, under an opaque id
(:func:`gold_id`): a claimed gold item has the same columns as any other (the calibration row's
extra columns, a ``uri`` of its input, with its timestamps set to the batch's), so a reviewer
cannot tell them apart but by the id, and the queue keeps its label apart (``gold_label`` in the
verdict export only).
For every batch, each tier with ``n`` new escalations gets about ``n * share / (1 - share)`` gold
items, so they make ``share`` of the tier's items; the draw hashes the batch's first id, so a
re-sent batch brings the same gold items, which the queue stores once.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from hitl_triage.kernels import audit_uniform

# Seed of the id hash that draws blind items (fixed: replicas must agree).
BLIND_SEED = 0x0B11_D5EE


class GoldPool:
    """Labelled rows to draw gold items from: ``decisions`` (the engine's output for them),
    ``predictions`` (the rows: ``id``, ``logits``, ``label``...), row-aligned."""

    def __init__(self, decisions: pa.Table, predictions: pa.Table, *, salt: str = "gold"):
        if decisions.num_rows != predictions.num_rows or decisions.num_rows == 0:
            raise ValueError(f"gold pool: expected as many decisions as labelled rows (at least one), found "
                             f"{decisions.num_rows} and {predictions.num_rows}")
        if "label" not in predictions.schema.names:
            raise ValueError(f"gold pool: expected a 'label' column, found columns {predictions.schema.names}")
        labels = np.asarray(predictions.column("label").fill_null(-1).to_numpy(zero_copy_only=False), np.int64)
        keep = pa.array(labels >= 0)
        if not pc.any(keep).as_py():
            raise ValueError("gold pool: label: expected rows with a known class (>= 0), found none")
        self.decisions = pa.table(decisions).filter(keep)
        self.predictions = pa.table(predictions).filter(keep).drop_columns(["label"])
        self.labels = labels[labels >= 0]
        self.salt = salt

    @classmethod
    def from_labelled(cls, decisions, predictions, **kwargs) -> "GoldPool":
        return cls(pa.table(decisions), pa.table(predictions), **kwargs)

    def draw(self, tier: str, count: int, key: str) -> tuple[pa.Table, pa.Table, dict[str, int]]:
        """``count`` gold items for ``tier``, the same for the same ``key``: (decisions,
        predictions, id -> label), the decisions escalated to ``tier``."""
        rng = np.random.default_rng(int.from_bytes(hashlib.sha256(f"{self.salt}|{tier}|{key}".encode()).digest()[:8], "little"))
        rows = pa.array(rng.integers(0, self.decisions.num_rows, count), pa.int64())
        ids = [gold_id(self.salt, tier, key, i) for i in range(count)]
        decisions = self.decisions.take(rows)
        decisions = _set(decisions, "id", pa.array(ids, pa.string()))
        decisions = _set(decisions, "escalate", pa.array(np.ones(count, bool)))
        decisions = _set(decisions, "tier", pa.array([tier] * count, pa.string()))
        mask = decisions.column("reason_mask").to_numpy(zero_copy_only=False)
        # a calibration row the engine would not escalate gets the confidence reason, so that a
        # gold item never shows up as an audit sample (those are served blind and estimate accuracy)
        decisions = _set(decisions, "reason_mask", pa.array(np.where(mask == 0, 1, mask).astype(np.uint8)))
        predictions = _set(self.predictions.take(rows), "id", pa.array(ids, pa.string()))
        return decisions, predictions, dict(zip(ids, self.labels[rows.to_numpy()].tolist()))

    def mix(self, batches: list, share: float) -> tuple[list, dict[str, int]]:
        """The (decisions, predictions) pairs of gold items that go with ``batches`` at ``share``
        of each tier's items, and their labels."""
        out: list[tuple[pa.Table, pa.Table]] = []
        labels: dict[str, int] = {}
        if share <= 0:
            return out, labels
        for decisions, predictions in batches:
            if decisions.num_rows == 0:
                continue
            escalate = decisions.column("escalate")
            tiers = pc.value_counts(pc.filter(decisions.column("tier"), escalate).drop_null())
            key = str(decisions.column("id")[0].as_py())
            for tier, n in zip(tiers.field("values").to_pylist(), tiers.field("counts").to_pylist()):
                expected = n * share / (1 - share) if share < 1 else float(n)
                u = float(audit_uniform(pa.array([f"{key}|{tier}"]), 0x601D)[0])
                count = int(math.floor(expected)) + (u < expected - math.floor(expected))
                if count:
                    d, p, got = self.draw(tier, count, key)
                    out.append((d, _times_of(p, predictions)))
                    labels.update(got)
        return out, labels


def _times_of(gold: pa.Table, batch) -> pa.Table:
    """``gold`` with every timestamp column the batch also has set to the batch's first value:
    a gold item carries the time of the traffic it is mixed into, not the calibration day's."""
    for i, field in enumerate(gold.schema):
        if pa.types.is_timestamp(field.type) and field.name in batch.schema.names and batch.num_rows:
            value = batch.column(field.name)[0].cast(field.type)
            gold = gold.set_column(i, field.name, pa.array([value.as_py()] * gold.num_rows, field.type))
    return gold


def gold_id(salt: str, tier: str, key: str, i: int) -> str:
    """An opaque id for the i-th gold item drawn for a batch at a tier (32 hex digits)."""
    return hashlib.sha256(f"{salt}|{tier}|{key}|{i}".encode()).hexdigest()[:32]


def blind_draw(ids: pa.Array, share: float) -> np.ndarray:
    """bool [n]: the items drawn to be served blind (a hash of the id under ``share``)."""
    if share <= 0 or len(ids) == 0:
        return np.zeros(len(ids), bool)
    return np.asarray(audit_uniform(ids, BLIND_SEED)) < share


def _set(table: pa.Table, name: str, column) -> pa.Table:
    i = table.schema.get_field_index(name)
    return table.set_column(i, name, column) if i >= 0 else table.append_column(name, column)
