"""Corrections become training data: every stored verdict as a labelled example.

    examples = training_examples(queue)            # a pyarrow Table, one row per verdict
    write_parquet(examples, "labels.parquet", "--out")

Each row is one verdict with its provenance (prediction id, source, model and profile version,
reviewer, tier, action, audit weight, reasons, times), what the item kept of its input (logits,
the embedding when the queue keeps it, the fleet's extra columns such as a ``uri``), and the
item's *final* answer after adjudication (``final_*``): the outcome the queue's own rule
(:func:`hitl_triage.serve.queue.base.resolve`) gives the item's verdicts, replayed here in the
order they were stored. The README's "Training data" section is the schema.
"""

from __future__ import annotations

import collections
import datetime as dt
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from hitl_triage.engine.policy import reason_names

from .queue.base import ItemState, QueueError, QueueOptions, ReviewQueue, Verdict, resolve

FORMAT = 1
# Parquet key-value metadata of an export (JSON): the format, when it was written, the row counts.
METADATA_KEY = b"hitl_triage.export"
FINAL_COLUMNS = ("final_state", "final_tier", "final_action", "final_label", "decisive")


def training_examples(queue: ReviewQueue, since: float | None = None) -> pa.Table:
    """Every verdict the queue stored (those stored after ``since``, seconds since the epoch, when
    given), oldest first, as training examples (see the module docstring). The final answer is
    always computed from *all* of an item's verdicts, whatever ``since`` leaves out."""
    verdicts = queue.verdicts()
    table = labelled_examples(verdicts, queue.options)
    if since is not None and table.num_rows:
        cutoff = pa.scalar(int(since * 1e6), pa.int64()).cast(pa.timestamp("us", tz="UTC"))
        table = table.filter(pc.greater(table.column("stored_at"), cutoff))
    return table


def labelled_examples(verdicts: pa.Table, options: QueueOptions) -> pa.Table:
    """The verdict export (``ReviewQueue.verdicts()``) as training examples: ``model_version``
    (null where the fleet sent none) and ``reasons`` after the reason mask, and the final columns."""
    finals = final_outcomes(verdicts, options)
    names = verdicts.schema.names
    table = verdicts
    if "model_version" not in names:
        table = table.append_column("model_version", pa.nulls(table.num_rows, pa.string()))
    if "reason_mask" in names:
        # Names per possible mask (a uint8: 256), then one take: per row it was most of the export's time.
        masks = np.asarray(table.column("reason_mask").fill_null(0).to_numpy(zero_copy_only=False), dtype=np.int64)
        named = pa.array([reason_names(m) for m in range(256)], pa.list_(pa.string()))
        table = table.append_column("reasons", named.take(pa.array(masks)))
    for name in FINAL_COLUMNS:
        table = table.append_column(name, finals.column(name))
    metadata = {METADATA_KEY: json.dumps({
        "format": FORMAT, "written_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "verdicts": table.num_rows, "items": len(set(table.column("id").to_pylist())),
    }).encode()}
    return table.replace_schema_metadata({**(table.schema.metadata or {}), **metadata})


def final_outcomes(verdicts: pa.Table, options: QueueOptions) -> pa.Table:
    """Per verdict row: its item's ``final_state`` ("done" or "open"), ``final_tier`` (the tier
    that holds it now), ``final_action`` and ``final_label`` (null while open; ``final_label``
    -1 for out_of_scope), and ``decisive`` (this verdict is the final answer: one row per done
    item). The item's verdicts are replayed through :func:`resolve` from its decision tier, with
    the reviews each tier needs drawn by ``options`` (the queue's), oldest first. A verdict at a
    tier the replay does not reach means the options differ from those the verdicts were stored
    under: QueueError naming the id."""
    n = verdicts.num_rows
    if n == 0:
        return _final_table([], [], [], [], [])
    for name in ("decision_tier", "predicted_class", "classes"):
        if name not in verdicts.schema.names:
            raise QueueError(f"verdicts: expected a {name!r} column (the items' decision columns), found none")
    ids = verdicts.column("id").to_pylist()
    rows_of: dict[str, list[int]] = collections.defaultdict(list)
    for row, item_id in enumerate(ids):
        rows_of[item_id].append(row)
    labels = verdicts.column("label").to_pylist()
    reviewers = verdicts.column("reviewer").to_pylist()
    tiers = verdicts.column("tier").to_pylist()
    actions = verdicts.column("action").to_pylist()
    start_tier = verdicts.column("decision_tier").to_pylist()
    predicted = verdicts.column("predicted_class").to_pylist()
    classes = verdicts.column("classes").to_pylist()
    # The reviews an item needs at a tier: one hash draw per (tier, items), not per verdict.
    needed_at: dict[str, dict[str, int]] = {}

    def needed(tier: str, item_id: str) -> int:
        if tier not in needed_at:
            unique = list(rows_of)
            needed_at[tier] = dict(zip(unique, options.needed(unique, tier).tolist()))
        return needed_at[tier][item_id]

    state = [""] * n
    final_tier = [""] * n
    final_action: list[str | None] = [None] * n
    final_label: list[int | None] = [None] * n
    decisive = [False] * n
    for item_id, rows in rows_of.items():
        tier = start_tier[rows[0]]
        item = ItemState(tier=tier, needed=needed(tier, item_id), predicted_class=predicted[rows[0]],
                         classes=classes[rows[0]], done=False)
        at_tier: list[Verdict] = []
        settled_by: int | None = None
        for row in rows:
            if item.done or tiers[row] != item.tier:
                raise QueueError(f"verdicts (id {item_id!r}): tier: expected a verdict at {item.tier!r} by the queue's "
                                 f"rule with these options{' (the item was done)' if item.done else ''}, found one at "
                                 f"{tiers[row]!r}; open the queue with the options it was worked under (--config)")
            at_tier.append(Verdict(item_id, labels[row], reviewers[row], tiers[row], actions[row], 0.0))
            outcome = resolve(item, at_tier, options)
            if outcome.kind == "moved":
                need = outcome.needed if outcome.needed > 0 else needed(outcome.tier, item_id)
                item = ItemState(outcome.tier, need, item.predicted_class, item.classes, False)
                at_tier = []
            elif outcome.kind == "done":
                item = ItemState(item.tier, item.needed, item.predicted_class, item.classes, True)
                settled_by = row  # the newest settled verdict (at the adjudicator's tier, the last word)
        for row in rows:
            state[row] = "done" if item.done else "open"
            final_tier[row] = item.tier
            if settled_by is not None:
                final_action[row], final_label[row] = actions[settled_by], labels[settled_by]
        if settled_by is not None:
            decisive[settled_by] = True
    return _final_table(state, final_tier, final_action, final_label, decisive)


def _final_table(state, tier, action, label, decisive) -> pa.Table:
    return pa.table({
        "final_state": pa.array(state, pa.string()), "final_tier": pa.array(tier, pa.string()),
        "final_action": pa.array(action, pa.string()), "final_label": pa.array(label, pa.int32()),
        "decisive": pa.array(decisive, pa.bool_()),
    })


def write_parquet(table: pa.Table, out: str | Path, option: str = "--out") -> Path:
    """Write ``table`` to ``out`` whole (beside it first, renamed into place: a stopped run leaves
    no file that looks finished); its schema metadata is kept."""
    import pyarrow.parquet as pq

    from .checks import PartialFile, native_file, output_file

    output_file(out, option)
    partial = PartialFile(out, option)
    path = partial.claim()
    try:
        with native_file(path, "wb") as handle:
            pq.write_table(table, handle, compression="zstd")
        return partial.commit()
    except BaseException:
        partial.discard()
        raise


__all__ = ["FINAL_COLUMNS", "METADATA_KEY", "final_outcomes", "labelled_examples", "training_examples", "write_parquet"]
