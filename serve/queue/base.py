"""The review queue's contract, and the parts of it that do not depend on where it is stored.

Every backend (:mod:`.sqlite`, :mod:`.redis`) implements :class:`ReviewQueue` with the same
semantics, which the parametrised suite in ``tests/test_queue.py`` holds them to:

- ``enqueue(decisions, predictions)`` stores every escalated row (audit samples included) as one
  review item, once per prediction id whoever sends it and however often; it returns only when
  the items are durable (see the README for what each backend promises on a crash).
- ``claim(tier, reviewer, n, lease)`` leases the highest-priority open items of a tier to a
  reviewer (ties in arrival order). A lease that expires offers the item again, its delivery
  count raised; an item whose lease expires after ``max_deliveries`` deliveries goes to the dead
  letter list, where ``requeue_dead`` brings it back.
- ``submit(verdicts)`` stores verdicts, idempotent per (id, tier, reviewer), all or nothing: a
  verdict for an unknown id, from a tier that does not hold the item, with a bad action or a label
  outside [0, C) refuses the whole call, naming the row. What a verdict does to its item is
  :func:`resolve`, the same for every backend.
- Overlap: ``overlap[tier]`` of a tier's items (drawn by a hash of the id, so every replica draws
  alike) need two distinct reviewers before they are done; two verdicts that disagree send the
  item to the adjudicator tier.
"""

from __future__ import annotations

import abc
import dataclasses
import math
from typing import Any, Iterable

import numpy as np
import pyarrow as pa

from hitl_triage.engine.config import TIER_NAMES, from_dict
from hitl_triage.kernels import audit_uniform

ACTIONS = ("confirm", "correct", "escalate", "out_of_scope")
# Seed of the id hash that draws overlap items (fixed: replicas must agree).
OVERLAP_SEED = 0x0FE2_1A95
VERDICT_SCHEMA = pa.schema([
    pa.field("id", pa.string()),
    pa.field("label", pa.int32()),
    pa.field("reviewer", pa.string()),
    pa.field("tier", pa.string()),
    pa.field("action", pa.string()),
    pa.field("ts", pa.timestamp("us", tz="UTC")),
])


class QueueError(ValueError):
    """A call the queue refuses (names the field, what was expected and what was found); nothing
    of the call was stored."""


@dataclasses.dataclass
class QueueOptions:
    """How a queue behaves (the ``[queue]`` section of ``triage.toml``).

    ``tiers``: reviewer tiers, lowest first (an ``escalate`` verdict moves an item one up);
    ``adjudicator``: the tier that settles disagreeing overlap verdicts (default the highest);
    ``overlap``: per tier, the share of items served to two distinct reviewers;
    ``max_deliveries``: leases an item may have expire before it is dead-lettered;
    ``keep_embedding``: store the embedding in the item (off: items stay small);
    ``blind_audit``: serve audit samples with no other reason without the model's prediction;
    ``blind_share``: the share of all other items served so too (drawn by a hash of the id), so
    that override rates can be compared between blind and shown items (:mod:`.gold`);
    ``gold_share``: the share of each tier's items that are gold items (known answers from the
    calibration data, :mod:`.gold`), once the queue has a ``gold`` pool; ``gold_pool``: a
    labelled Parquet file (a calibration file) that a server draws them from.
    """

    tiers: list[str] = dataclasses.field(default_factory=lambda: list(TIER_NAMES))
    adjudicator: str = ""
    overlap: dict[str, float] = dataclasses.field(default_factory=dict)
    max_deliveries: int = 5
    keep_embedding: bool = False
    blind_audit: bool = True
    blind_share: float = 0.0
    gold_share: float = 0.0
    gold_pool: str = ""

    @classmethod
    def from_dict(cls, table: dict, **defaults) -> "QueueOptions":
        """From a ``[queue]`` table (unknown keys are refused by name); ``defaults`` fill the keys
        the table leaves out (for example the profile's tier order)."""
        return from_dict(cls, {**defaults, **table}, "queue").check()

    def check(self) -> "QueueOptions":
        if not self.tiers or len(set(self.tiers)) != len(self.tiers):
            raise QueueError(f"queue.tiers: expected distinct tier names, found {self.tiers}")
        if not self.adjudicator:
            self.adjudicator = self.tiers[-1]
        if self.adjudicator not in self.tiers:
            raise QueueError(f"queue.adjudicator: expected one of {self.tiers}, found {self.adjudicator!r}")
        for tier, share in self.overlap.items():
            if tier not in self.tiers:
                raise QueueError(f"queue.overlap: expected tiers among {self.tiers}, found {tier!r}")
            if not 0.0 <= float(share) <= 1.0:
                raise QueueError(f"queue.overlap.{tier}: expected a share in [0, 1], found {share!r}")
        for name in ("blind_share", "gold_share"):
            share = getattr(self, name)
            if not (isinstance(share, (int, float)) and 0.0 <= float(share) < 1.0):
                raise QueueError(f"queue.{name}: expected a share in [0, 1), found {share!r}")
        if not (isinstance(self.max_deliveries, int) and self.max_deliveries >= 1):
            raise QueueError(f"queue.max_deliveries: expected an integer >= 1, found {self.max_deliveries!r}")
        return self

    def needed(self, ids: Iterable[str] | pa.Array, tier: str) -> np.ndarray:
        """int8 [n]: reviews each item needs at ``tier`` (2 for the overlap draw, else 1)."""
        share = float(self.overlap.get(tier, 0.0))
        ids = ids if isinstance(ids, pa.Array) else pa.array(list(ids), pa.string())
        if share <= 0 or len(ids) == 0:
            return np.ones(len(ids), np.int8)
        return np.where(np.asarray(audit_uniform(ids, OVERLAP_SEED)) < share, 2, 1).astype(np.int8)

    def tier_above(self, tier: str) -> str | None:
        i = self.tiers.index(tier)
        return self.tiers[i + 1] if i + 1 < len(self.tiers) else None


@dataclasses.dataclass(frozen=True)
class Verdict:
    id: str
    label: int       # -1: none (escalate, out_of_scope)
    reviewer: str
    tier: str
    action: str
    ts: float        # seconds since the epoch

    def agrees_with(self, other: "Verdict") -> bool:
        return (self.action, self.label) == (other.action, other.label)


@dataclasses.dataclass(frozen=True)
class ItemState:
    """What :func:`resolve` needs of an item."""

    tier: str
    needed: int
    predicted_class: int
    classes: int
    done: bool


@dataclasses.dataclass(frozen=True)
class Outcome:
    """What a verdict does: the item stays open at its tier, is done, or moves to ``tier`` (with
    ``needed`` reviews there)."""

    kind: str            # "open" | "done" | "moved"
    tier: str
    needed: int = 1


def check_verdict(v: Verdict, item: ItemState | None, options: QueueOptions, row: int) -> Verdict:
    """The verdict as stored (a confirm takes the predicted class as its label), or QueueError
    naming the row."""
    where = f"verdicts row {row} (id {v.id!r})"
    if item is None:
        raise QueueError(f"{where}: id: expected an item in the queue, found none with this id")
    if v.action not in ACTIONS:
        raise QueueError(f"{where}: action: expected one of {list(ACTIONS)}, found {v.action!r}")
    if not v.reviewer:
        raise QueueError(f"{where}: reviewer: expected a reviewer name, found none")
    if v.tier != item.tier:
        raise QueueError(f"{where}: tier: expected {item.tier!r}, the tier that holds the item, found {v.tier!r}")
    if item.done:
        raise QueueError(f"{where}: id: expected an open item, found one already done")
    if v.action == "escalate" and options.tier_above(item.tier) is None:
        raise QueueError(f"{where}: action: expected confirm, correct or out_of_scope at the top tier "
                         f"{item.tier!r}, found escalate (no tier above)")
    label = v.label
    if v.action == "confirm":
        if label not in (-1, item.predicted_class):
            raise QueueError(f"{where}: label: expected the predicted class {item.predicted_class} (or none) for "
                             f"confirm, found {label}; use action correct")
        label = item.predicted_class
    elif v.action == "correct":
        if not 0 <= label < item.classes:
            raise QueueError(f"{where}: label: expected a class in [0, {item.classes}) for correct, found {label}")
    elif label != -1:
        raise QueueError(f"{where}: label: expected none for {v.action}, found {label}")
    return dataclasses.replace(v, label=label)


def check_resubmission(v: Verdict, action: str, label: int, row: int) -> None:
    """``v`` comes again for the (id, tier, reviewer) whose stored verdict is ``action`` with
    ``label``: a resubmission of it (a confirm may leave its label out) changes nothing; a
    different verdict is QueueError naming the row (a verdict cannot be changed)."""
    if v.action == action and (v.label == label or (action == "confirm" and v.label == -1)):
        return
    raise QueueError(f"verdicts row {row} (id {v.id!r}): expected the verdict {v.reviewer!r} already submitted at tier "
                     f"{v.tier!r} ({action} {label}), found a different one ({v.action} {v.label}); a verdict cannot be "
                     f"changed")


def resolve(item: ItemState, verdicts_at_tier: list[Verdict], options: QueueOptions) -> Outcome:
    """What the verdicts an item has at its tier (the newest last) do to it. An ``escalate``
    moves it one tier up at once; otherwise it is done once it has ``needed`` verdicts, unless
    two of them disagree, which sends it to the adjudicator (needing one verdict there)."""
    newest = verdicts_at_tier[-1]
    if newest.action == "escalate":
        above = options.tier_above(item.tier)
        assert above is not None, "check_verdict refuses escalate at the top tier"
        return Outcome("moved", above, -1)  # -1: the overlap draw of the new tier decides
    settled = [v for v in verdicts_at_tier if v.action != "escalate"]
    if len(settled) < item.needed:
        return Outcome("open", item.tier, item.needed)
    if any(not v.agrees_with(settled[0]) for v in settled[1:]) and item.tier != options.adjudicator:
        return Outcome("moved", options.adjudicator, 1)
    return Outcome("done", item.tier)


def verdict_rows(verdicts: pa.Table | pa.RecordBatch | list[dict[str, Any]]) -> list[Verdict]:
    """Verdicts from an Arrow table (the verdict columns of the design) or a list of dicts;
    ``label`` and ``ts`` may be absent or null. Refuses a missing column or a bad type by name."""
    if isinstance(verdicts, list):
        names = list(dict.fromkeys(k for row in verdicts for k in row))  # every row's keys, in order
        verdicts = pa.table({k: [row.get(k) for row in verdicts] for k in names}) if verdicts else VERDICT_SCHEMA.empty_table()
    names = verdicts.schema.names
    for name in ("id", "reviewer", "tier", "action"):
        if name not in names:
            raise QueueError(f"verdicts: expected a {name!r} column, found columns {names}")
    n = verdicts.num_rows
    ids = _strings(verdicts.column("id"), "id")
    labels = [-1] * n
    if "label" in names:
        column = verdicts.column("label")
        if not (pa.types.is_integer(column.type) or pa.types.is_null(column.type)):
            raise QueueError(f"verdicts: label: expected integers, found {column.type}")
        labels = [-1 if v is None else int(v) for v in column.to_pylist()]
    ts = [math.nan] * n
    if "ts" in names:
        column = verdicts.column("ts")
        if pa.types.is_timestamp(column.type):
            column = column.cast(pa.timestamp("us", tz="UTC")).cast(pa.int64())
            ts = [math.nan if v is None else v / 1e6 for v in column.to_pylist()]
        elif pa.types.is_floating(column.type) or pa.types.is_integer(column.type):
            ts = [math.nan if v is None else float(v) for v in column.to_pylist()]
        elif not pa.types.is_null(column.type):
            raise QueueError(f"verdicts: ts: expected a timestamp, found {column.type}")
    reviewers = _strings(verdicts.column("reviewer"), "reviewer")
    tiers = _strings(verdicts.column("tier"), "tier")
    actions = _strings(verdicts.column("action"), "action")
    return [Verdict(*row) for row in zip(ids, labels, reviewers, tiers, actions, ts)]


def _strings(column, name: str) -> list[str]:
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if pa.types.is_dictionary(column.type):
        column = column.dictionary_decode()
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type) or pa.types.is_integer(column.type)):
        raise QueueError(f"verdicts: {name}: expected strings, found {column.type}")
    values = column.cast(pa.string()).to_pylist()
    for row, value in enumerate(values):
        if value is None:
            raise QueueError(f"verdicts row {row}: {name}: expected a value, found null")
    return values


@dataclasses.dataclass
class PreparedBatch:
    """One decision batch's review items, ready for a backend to store: the item table and its
    IPC blob, and per item the id, tier, priority, predicted class, C and reviews needed."""

    items: pa.Table
    blob: bytes
    ids: list[str]
    tiers: list[str]
    priorities: list[float]
    predicted: list[int]
    classes: list[int]
    needed: list[int]
    enqueued_at: float


def prepare_batch(decisions, predictions, options: QueueOptions, now: float | None = None) -> PreparedBatch | None:
    """The review items of a decision batch (None when it escalated nothing), with the tiers
    checked against ``options``; ``now`` their ``enqueued_at`` (default this machine's clock)."""
    from .items import review_items, to_ipc

    items = review_items(decisions, predictions, keep_embedding=options.keep_embedding, now=now)
    if items.num_rows == 0:
        return None
    ids = items.column("id").to_pylist()
    tiers = items.column("tier").to_pylist()
    unknown = sorted(set(tiers) - set(options.tiers), key=str)
    if unknown:
        raise QueueError(f"decisions: tier: expected tiers among {options.tiers}, found {unknown}")
    if options.overlap:
        column = items.column("id").combine_chunks()
        per_tier = {t: options.needed(column, t) for t in set(tiers)}
        needed = [int(per_tier[t][i]) for i, t in enumerate(tiers)]
    else:
        needed = [1] * len(ids)
    return PreparedBatch(
        items=items, blob=to_ipc(items), ids=ids, tiers=tiers, priorities=items.column("priority").to_pylist(),
        predicted=items.column("predicted_class").to_pylist(), classes=items.column("classes").to_pylist(),
        needed=needed, enqueued_at=float(items.column("enqueued_at")[0].as_py()),
    )


class ReviewQueue(abc.ABC):
    """See the module docstring. Every method is safe to call from several processes at once."""

    options: QueueOptions
    gold = None
    """A :class:`.gold.GoldPool` to draw gold items from (with ``options.gold_share`` > 0)."""

    def _with_gold(self, batches) -> tuple[list, dict[str, int]]:
        """``batches`` and the gold items that go with them, and the gold items' labels."""
        batches = list(batches)
        if self.gold is None or self.options.gold_share <= 0:
            return batches, {}
        extra, labels = self.gold.mix(batches, self.options.gold_share)
        return batches + extra, labels

    @abc.abstractmethod
    def enqueue(self, decisions, predictions) -> int:
        """Store the review items of one decision batch; returns how many were new. Durable
        when it returns."""

    def enqueue_many(self, batches) -> int:
        """``enqueue`` of several (decisions, predictions) pairs, stored together where the
        backend can (one transaction, one fsync: what a server's queue writer does with the
        batches that arrived while the previous write was on disk). Returns the new items."""
        return sum(self.enqueue(decisions, predictions) for decisions, predictions in batches)

    @abc.abstractmethod
    def claim(self, tier: str, reviewer: str, n: int = 1, lease: float = 300.0) -> pa.Table:
        """Lease up to ``n`` items of ``tier`` to ``reviewer`` for ``lease`` seconds: the item
        columns (:func:`.items.review_items`), ``blind``, ``deliveries`` and ``lease_until``."""

    @abc.abstractmethod
    def submit(self, verdicts) -> dict:
        """Store verdicts (see the module docstring); returns counts: ``stored``,
        ``duplicates``, ``done``, ``moved``."""

    @abc.abstractmethod
    def stats(self) -> dict:
        """Per tier: ``depth`` (open items not leased), ``in_flight`` (leased), ``oldest_age_s``
        (age of the oldest open item), ``done``, ``dead``; and ``verdicts`` by action."""

    @abc.abstractmethod
    def verdicts(self, since: float | None = None) -> pa.Table:
        """Stored verdicts (those stored after ``since``, seconds since the epoch, when given),
        oldest first, with their items' decision columns, ``stored_at``, and the items' ``logits``
        and ``embedding`` where they kept them (:func:`.payload.verdict_table`)."""

    def tier_of(self, item_id: str) -> str | None:
        """The tier that holds the item now, None for an unknown id."""
        raise NotImplementedError(f"{type(self).__name__}.tier_of")

    @abc.abstractmethod
    def requeue_dead(self) -> int:
        """Offer every dead-lettered item again (deliveries reset); returns how many."""

    @abc.abstractmethod
    def close(self) -> None:
        ...

    def __enter__(self) -> "ReviewQueue":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def check_claim(tier: str, reviewer: str, n: int, lease: float, options: QueueOptions) -> None:
    if tier not in options.tiers:
        raise QueueError(f"tier: expected one of {options.tiers}, found {tier!r}")
    if not reviewer:
        raise QueueError("reviewer: expected a reviewer name, found none")
    if not (isinstance(n, int) and n >= 1):
        raise QueueError(f"n: expected an integer >= 1, found {n!r}")
    if not (isinstance(lease, (int, float)) and 0 < lease < math.inf):
        raise QueueError(f"lease: expected a positive number of seconds, found {lease!r}")


__all__ = [
    "ACTIONS", "ItemState", "Outcome", "PreparedBatch", "QueueError", "prepare_batch", "QueueOptions", "ReviewQueue", "VERDICT_SCHEMA",
    "Verdict", "check_claim", "check_resubmission", "check_verdict", "resolve", "verdict_rows",
]
