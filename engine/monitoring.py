"""Counts over decision batches, split into an update per batch and a merge, so replicas and
row groups can be summed in any order (the torchmetrics shape, STYLE.md)."""

from __future__ import annotations

import collections
import dataclasses
from typing import cast

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .policy import Reason


@dataclasses.dataclass
class TriageSummary:
    """What a batch (or a run, or a fleet) of decisions amounted to."""

    rows: int = 0
    escalated: int = 0
    invalid: int = 0
    no_embedding: int = 0
    by_reason: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    by_tier: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    rows_by_source: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    escalated_by_source: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    audit_by_stratum: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    knn_rows: int = 0
    """Rows scored against a k-NN bank (decisions with an ``ood_rescored`` column)."""
    knn_rescored: int = 0
    """Of those, rows whose k-NN distance was re-scored exactly (near or above the threshold)."""
    seconds: float = 0.0

    def update(self, decisions: pa.RecordBatch | pa.Table, seconds: float = 0.0) -> "TriageSummary":
        """Add one batch of decision columns (the engine's output schema)."""
        self.rows += decisions.num_rows
        self.seconds += seconds
        escalate = decisions.column("escalate")
        self.escalated += pc.sum(escalate).as_py() or 0
        self.invalid += decisions.num_rows - (pc.sum(decisions.column("valid")).as_py() or 0)
        mask = decisions.column("reason_mask").to_numpy()
        ood = decisions.column("ood_score").to_numpy(zero_copy_only=False)
        # ANOMALY with a NaN distance: the row had no usable embedding, so OOD was not evaluated.
        self.no_embedding += int(np.count_nonzero(np.isnan(ood) & ((mask & int(Reason.ANOMALY)) > 0)))
        for reason in Reason:
            self.by_reason[cast(str, reason.name).lower()] += int(np.count_nonzero(mask & int(reason)))
        _add_counts(self.by_tier, decisions.column("tier"))
        if "source" in decisions.schema.names:
            source = decisions.column("source")
            _add_counts(self.rows_by_source, source)
            _add_counts(self.escalated_by_source, pc.filter(source, escalate))
        _add_counts(self.audit_by_stratum, decisions.column("audit_stratum"))
        if "ood_rescored" in decisions.schema.names:
            self.knn_rows += decisions.num_rows
            self.knn_rescored += pc.sum(decisions.column("ood_rescored")).as_py() or 0
        return self

    @property
    def audit_samples(self) -> int:
        return self.by_reason["audit"]

    def merge(self, other: "TriageSummary") -> "TriageSummary":
        """Sum of two summaries (for example two replicas, or two row groups)."""
        out = TriageSummary()
        for field in dataclasses.fields(self):
            mine, theirs = getattr(self, field.name), getattr(other, field.name)
            if isinstance(mine, collections.Counter):
                merged = collections.Counter(mine)
                merged.update(theirs)  # Counter + Counter would drop the zero counts
                setattr(out, field.name, merged)
            else:
                setattr(out, field.name, mine + theirs)
        return out

    @property
    def knn_rescored_share(self) -> float:
        """Share of the k-NN-scored rows re-scored exactly (NaN when none was scored)."""
        return self.knn_rescored / self.knn_rows if self.knn_rows else float("nan")

    @property
    def rows_per_second(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else float("nan")

    def to_dict(self) -> dict:
        return {
            "rows": self.rows,
            "escalated": self.escalated,
            "escalation_rate": self.escalated / self.rows if self.rows else 0.0,
            "invalid": self.invalid,
            "no_embedding": self.no_embedding,
            "audit_samples": self.audit_samples,
            "by_reason": dict(self.by_reason),
            "by_tier": dict(self.by_tier),
            "rows_by_source": dict(self.rows_by_source),
            "escalated_by_source": dict(self.escalated_by_source),
            "audit_by_stratum": dict(self.audit_by_stratum),
            "knn_rows": self.knn_rows,
            "knn_rescored": self.knn_rescored,
            "knn_rescored_share": self.knn_rescored_share,
            "seconds": self.seconds,
            "rows_per_second": self.rows_per_second,
        }


def _add_counts(counter: collections.Counter, column) -> None:
    """Count the non-null values of a string column into ``counter``."""
    counts = pc.value_counts(column.drop_null() if hasattr(column, "drop_null") else column)
    for value, count in zip(counts.field("values").to_pylist(), counts.field("counts").to_pylist()):
        counter[value] += count
