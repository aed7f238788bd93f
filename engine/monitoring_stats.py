"""Mergeable monitoring statistics: an update per decision batch or verdict table, a merge, and
the sums :mod:`.monitoring_report` computes figures from (the torchmetrics shape, STYLE.md).

Everything is a sum in a :class:`Sums` table keyed by tuples that start with a kind and, for
what changes over time, a window index (``floor(time / window_s)``): replicas add theirs, and the
merge of two equals the statistics of the union. Decision statistics are per replica and merge by
rows; verdict statistics come from a queue's verdict export and merge by items (an item's
verdicts must arrive in one update: its agreement and its final label need all of them).

Keys (``w`` window, ``s`` source, ``t`` tier):

- decisions: ``("rows"|"escalated"|"auto"|"auto_conf", w, s)``, ``("reason", w, s, name)``,
  ``("tier", w, s, t)``, ``("hist", w, s, feature, bin)`` for the drift features, and
  ``("slice", w, s, predicted, category, "rows"|"errors")`` (errors: sum of 1 - confidence);
- verdicts: ``("override", w, t, s, reason_mask, blind, "n"|"corrected"|"oos")``,
  ``("audit", w, s, field)`` (:data:`.monitoring_estimators.AUDIT_FIELDS`, window of the item's
  decision), ``("cohen", t1, t2, label1, label2)``, ``("fleiss", t, field)`` and
  ``("fleiss_cat", t, label)``, ``("gold", w, reviewer, "n"|"correct")``, ``("adjudicated", w,
  reviewer, "n"|"agree")``, ``("reviewed", w, reviewer)`` (settled verdicts on real items). A label
  of -1 is out of scope.
"""

from __future__ import annotations

import collections
import dataclasses
import math
from typing import Any, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .monitoring_estimators import AUDIT_FIELDS, audit_sums, fleiss_item_agreement
from .policy import Reason

AUDIT = int(Reason.AUDIT)
REASON_NAMES = {int(r): str(r.name).lower() for r in Reason}
EDGE_CASE_REASONS = ("anomaly", "known_edge_case", "reported")
DRIFT_FEATURES = ("confidence", "predicted_class", "ood_score")
NO_SOURCE = "(none)"
DECISION_COLUMNS = ("escalate", "reason_mask", "tier", "predicted_class", "confidence", "ood_score")


class Sums(dict[Any, float]):
    """A table of float sums (keyed by tuples here; any key in the report's tallies): a missing
    key reads 0, ``add`` adds another table in place (zero entries kept), ``+`` makes a new one."""

    def __missing__(self, key) -> float:
        return 0.0

    def add(self, other: "dict[Any, float]") -> "Sums":
        for key, value in other.items():
            self[key] = self.get(key, 0.0) + value
        return self

    def __add__(self, other: "dict[Any, float]") -> "Sums":  # type: ignore[override]
        return Sums(self).add(other)

    def merge(self, other: "Sums") -> "Sums":
        return self + other

    def select(self, kind: str) -> Iterable[tuple[tuple, float]]:
        return ((k, v) for k, v in self.items() if k[0] == kind)


@dataclasses.dataclass(frozen=True)
class StatsConfig:
    """What the statistics are binned by. ``window_s``: seconds per window; ``classes``: C;
    ``confidence_bins``: equal-width bins on [0, 1]; ``ood_edges``: inner edges of the OOD-score
    bins in units of ``ood_threshold`` (the profile's anomaly threshold; NaN scores get a bin of
    their own); ``keep_windows``: recent windows kept besides the first ``reference_windows``."""

    classes: int
    window_s: float = 3600.0
    confidence_bins: int = 10
    ood_threshold: float = 1.0
    ood_edges: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 4.0)
    keep_windows: int = 48
    reference_windows: int = 2

    def __post_init__(self) -> None:
        if not (isinstance(self.classes, int) and self.classes >= 2):
            raise ValueError(f"monitoring.classes: expected an integer >= 2, found {self.classes!r}")
        if not (self.window_s > 0 and math.isfinite(self.window_s)):
            raise ValueError(f"monitoring.window_s: expected a positive number of seconds, found {self.window_s!r}")
        if not (math.isfinite(self.ood_threshold) and self.ood_threshold > 0):
            raise ValueError(f"monitoring.ood_threshold: expected a positive distance, found {self.ood_threshold!r}")

    def bins(self, feature: str) -> int:
        return {"confidence": self.confidence_bins, "predicted_class": self.classes,
                "ood_score": len(self.ood_edges) + 2}[feature]

    def window(self, t: float) -> int:
        return int(math.floor(t / self.window_s))


# -- decisions -------------------------------------------------------------------------------------


def decision_sums(decisions: pa.RecordBatch | pa.Table, config: StatsConfig, now: float) -> Sums:
    """The sums of one decision batch (the engine's output columns), all in the window of ``now``
    (seconds). On the hot path of a server: a few bincounts over codes, one dictionary encoding
    of ``source`` and of ``category``, then one dict entry per non-zero count."""
    out = Sums()
    names = decisions.schema.names
    missing = [c for c in DECISION_COLUMNS if c not in names]
    if missing:
        raise ValueError(f"decisions: expected the engine's decision columns {list(DECISION_COLUMNS)}, found none named "
                         f"{missing} among {names}")
    n = decisions.num_rows
    if n == 0:
        return out
    if not math.isfinite(now):
        raise ValueError(f"now: expected a finite time in seconds, found {now!r}")
    w = config.window(now)
    src, sources = _codes(decisions.column("source") if "source" in names else None, n)
    cat, categories = _codes(decisions.column("category") if "category" in names else None, n)
    s_count = len(sources)
    mask = _numpy(decisions.column("reason_mask"), np.int64)
    escalate = _numpy(decisions.column("escalate"), bool)
    valid = _numpy(decisions.column("valid"), bool) if "valid" in names else np.ones(n, bool)
    conf = _numpy(decisions.column("confidence"), np.float64)
    predicted = _numpy(decisions.column("predicted_class"), np.int64)
    finite = np.isfinite(conf)
    conf_ok = np.where(finite, conf, 0.0)
    # auto-accepted: valid and nothing but the audit draw fired (the audit is a check on them)
    auto = valid & ((mask & ~AUDIT) == 0)

    def put(keys, counts: np.ndarray) -> None:  # the keys of one kind are distinct: no sums needed
        nz = np.flatnonzero(counts)
        out.update(zip((keys(int(k)) for k in nz), counts[nz].tolist()))

    per_source = np.stack([np.bincount(src, minlength=s_count).astype(np.float64),
                           np.bincount(src, weights=escalate, minlength=s_count),
                           np.bincount(src, weights=auto, minlength=s_count),
                           np.bincount(src, weights=np.where(auto, conf_ok, 0.0), minlength=s_count)])
    for kind, counts in zip(("rows", "escalated", "auto", "auto_conf"), per_source):
        put(lambda k, kind=kind: (kind, w, sources[k]), counts)
    per_mask = np.bincount(src * 256 + (mask & 255), minlength=s_count * 256).reshape(s_count, 256)
    for bit, name in REASON_NAMES.items():
        put(lambda k, name=name: ("reason", w, sources[k], name), per_mask[:, _HAS_BIT[bit]].sum(axis=1))
    if escalate.any():
        tier, tiers = _codes(pc.filter(decisions.column("tier"), pa.array(escalate)), int(escalate.sum()))
        t = len(tiers)
        put(lambda k: ("tier", w, sources[k // t], tiers[k % t]), np.bincount(src[escalate] * t + tier, minlength=s_count * t))
    ok = valid & (predicted >= 0) & (predicted < config.classes)
    if not ok.all():
        src, cat, predicted, conf_ok, finite = src[ok], cat[ok], predicted[ok], conf_ok[ok], finite[ok]
        ood = _numpy(decisions.column("ood_score"), np.float64)[ok]
    else:
        ood = _numpy(decisions.column("ood_score"), np.float64)
    for feature, bins in zip(DRIFT_FEATURES, _bins(conf_ok, predicted, ood, config)):
        b = config.bins(feature)
        put(lambda k, feature=feature, b=b: ("hist", w, sources[k // b], feature, k % b),
            np.bincount(src * b + bins, minlength=s_count * b))
    c, cs = config.classes, len(categories)
    key = (src * c + predicted) * cs + cat
    size = s_count * c * cs

    def slice_key(k: int, field: str) -> tuple:
        s, rest = divmod(k, c * cs)
        return ("slice", w, sources[s], rest // cs, categories[rest % cs], field)

    rows = np.bincount(key, minlength=size).astype(np.float64)
    put(lambda k: slice_key(k, "rows"), rows)
    errors = np.bincount(key, weights=1.0 - conf_ok, minlength=size)
    nz = np.flatnonzero(rows)  # a slice with rows has an errors entry, even a zero one
    out.update(zip((slice_key(int(k), "errors") for k in nz), errors[nz].tolist()))
    return out


_HAS_BIT = {bit: (np.arange(256) & bit) != 0 for bit in REASON_NAMES}


def _bins(conf: np.ndarray, predicted: np.ndarray, ood: np.ndarray, config: StatsConfig
          ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Bin indices (int64 [n]) of confidence (NaN counted as 0), predicted class and OOD score
    (NaN: a bin of its own)."""
    cb = np.minimum((conf * config.confidence_bins).astype(np.int64), config.confidence_bins - 1)
    np.maximum(cb, 0, out=cb)
    edges = np.asarray(config.ood_edges) * config.ood_threshold
    ob = np.searchsorted(edges, ood, side="right")  # NaN sorts last: len(edges)
    ob[np.isnan(ood)] = len(edges) + 1
    return cb, predicted, ob.astype(np.int64)


def feature_bins(decisions, config: StatsConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Bin indices (int64 [n]) of confidence, predicted class and OOD score of a decision batch."""
    conf = _numpy(decisions.column("confidence"), np.float64)
    predicted = np.clip(_numpy(decisions.column("predicted_class"), np.int64), 0, config.classes - 1)
    return _bins(np.where(np.isfinite(conf), conf, 0.0), predicted, _numpy(decisions.column("ood_score"), np.float64),
                 config)


# -- verdicts --------------------------------------------------------------------------------------


def verdict_sums(verdicts: pa.Table, config: StatsConfig) -> Sums:
    """The sums of a verdict export (``ReviewQueue.verdicts()``: the verdict columns and the
    item's decision columns, with ``blind`` and ``gold_label`` where the queue has them), in
    stored order; every item's verdicts must be in the table."""
    out = Sums()
    if verdicts.num_rows == 0:
        return out
    rows = verdicts.to_pydict()
    n = verdicts.num_rows
    names = verdicts.schema.names
    ts = _seconds(verdicts.column("ts"))
    enqueued = np.asarray(rows["enqueued_at"], np.float64) if "enqueued_at" in names else ts
    gold = rows.get("gold_label") or [None] * n
    blind = rows.get("blind") or [False] * n
    source = [s if s is not None else NO_SOURCE for s in (rows.get("source") or [None] * n)]
    by_item: dict[str, list[int]] = collections.defaultdict(list)
    for i in range(n):
        if rows["action"][i] != "escalate":
            by_item[rows["id"][i]].append(i)
    for i in range(n):
        action, label, reviewer = rows["action"][i], rows["label"][i], rows["reviewer"][i]
        w = config.window(ts[i])
        if gold[i] is not None and gold[i] >= 0:
            if action != "escalate":
                out[("gold", w, reviewer, "n")] += 1
                out[("gold", w, reviewer, "correct")] += float(action != "out_of_scope" and label == gold[i])
            continue
        if action == "escalate":
            continue
        out[("reviewed", w, reviewer)] += 1
        key = ("override", w, rows["tier"][i], source[i], int(rows["reason_mask"][i] or 0), bool(blind[i]))
        out[key + ("n",)] += 1
        out[key + ("corrected",)] += float(action == "correct" and label != rows["predicted_class"][i])
        out[key + ("oos",)] += float(action == "out_of_scope")
    for item, idx in by_item.items():
        final = idx[-1]  # the last settled verdict: the adjudicator's when the item went there
        first = idx[0]
        if gold[first] is not None and gold[first] >= 0:
            continue
        labels = [_category(rows["action"][i], rows["label"][i]) for i in idx]
        if int(rows["reason_mask"][first] or 0) == AUDIT and rows["audit_weight"][first]:
            correct = labels[-1] >= 0 and labels[-1] == rows["predicted_class"][first]
            terms = audit_sums(np.array([rows["audit_weight"][first]]), np.array([float(correct)]),
                               np.array([rows["confidence"][first] if rows["confidence"][first] is not None else math.nan]))
            w = config.window(enqueued[first])
            for field in AUDIT_FIELDS:
                out[("audit", w, source[first], field)] += float(terms[field][0])
        for i, label in zip(idx[:-1], labels[:-1]):  # each earlier verdict against the final label
            if rows["reviewer"][i] != rows["reviewer"][final]:
                w = config.window(ts[final])
                out[("adjudicated", w, rows["reviewer"][i], "n")] += 1
                out[("adjudicated", w, rows["reviewer"][i], "agree")] += float(label == labels[-1])
        _agreement(out, [rows["tier"][i] for i in idx], [rows["reviewer"][i] for i in idx], labels)
    return out


def _agreement(out: Sums, tiers: list[str], reviewers: list[str], labels: list[int]) -> None:
    """Cohen pairs (every two verdicts of distinct reviewers, tiers in sorted order) and the
    item's Fleiss terms at each tier where it has two or more verdicts."""
    for a in range(len(labels)):
        for b in range(a + 1, len(labels)):
            if reviewers[a] == reviewers[b]:
                continue
            (t1, l1), (t2, l2) = sorted([(tiers[a], labels[a]), (tiers[b], labels[b])], key=lambda x: x[0])
            out[("cohen", t1, t2, l1, l2)] += 1
    for tier in set(tiers):
        at = [l for t, l in zip(tiers, labels) if t == tier]
        if len(at) < 2:
            continue
        cats = sorted(set(at))
        counts = np.array([[at.count(c) for c in cats]])
        p = float(fleiss_item_agreement(counts)[0])
        out[("fleiss", tier, "items")] += 1
        out[("fleiss", tier, "p")] += p
        out[("fleiss", tier, "pp")] += p * p
        for c in at:
            out[("fleiss_cat", tier, c)] += 1


def _category(action: str, label) -> int:
    return -1 if action == "out_of_scope" or label is None else int(label)


# -- the pair of them ----------------------------------------------------------------------------


@dataclasses.dataclass
class MonitorStats:
    """Decision and verdict sums of one replica (or of several, merged), and an optional
    reference (histograms ``("hist", 0, source or "*", feature, bin)`` of reference traffic,
    for example the calibration data's decisions; without one each source's first
    ``reference_windows`` windows are its reference)."""

    config: StatsConfig
    decisions: Sums = dataclasses.field(default_factory=Sums)
    verdicts: Sums = dataclasses.field(default_factory=Sums)
    reference: Sums = dataclasses.field(default_factory=Sums)

    def update(self, decisions: pa.RecordBatch | pa.Table, now: float) -> "MonitorStats":
        """Add one decision batch decided at ``now`` (seconds)."""
        self.decisions.add(decision_sums(decisions, self.config, now))
        self._prune()
        return self

    def update_verdicts(self, verdicts: pa.Table) -> "MonitorStats":
        """Add a verdict export (every verdict of the items it holds)."""
        self.verdicts.add(verdict_sums(verdicts, self.config))
        return self

    def set_reference(self, decisions: pa.RecordBatch | pa.Table) -> "MonitorStats":
        """Use the histograms of ``decisions`` (pooled over sources) as every source's reference."""
        ref = Sums()
        for key, value in decision_sums(decisions, self.config, 0.0).select("hist"):
            ref[("hist", 0, "*", key[3], key[4])] += value
        self.reference = ref
        return self

    def merge(self, other: "MonitorStats") -> "MonitorStats":
        if other.config != self.config:
            raise ValueError(f"monitoring: expected statistics binned alike to merge, found {self.config} and {other.config}")
        out = MonitorStats(self.config, self.decisions.merge(other.decisions), self.verdicts.merge(other.verdicts),
                           self.reference if self.reference else other.reference)
        out._prune()
        return out

    def windows(self) -> list[int]:
        return sorted({k[1] for k in self.decisions if k[0] in ("rows", "hist")})

    def _prune(self) -> None:
        """Keep the first ``reference_windows`` windows and the last ``keep_windows`` ones."""
        windows = self.windows()
        if len(windows) <= self.config.reference_windows + self.config.keep_windows:
            return
        keep = set(windows[: self.config.reference_windows]) | set(windows[-self.config.keep_windows:])
        for key in [k for k in self.decisions if k[1] not in keep]:
            del self.decisions[key]

    # -- serialisation (the Stats call and the report read it as JSON) --------------------------------

    def to_json(self) -> dict:
        return {"config": {**dataclasses.asdict(self.config), "ood_edges": list(self.config.ood_edges)},
                "decisions": _pairs(self.decisions), "verdicts": _pairs(self.verdicts),
                "reference": _pairs(self.reference)}

    @classmethod
    def from_json(cls, doc: dict) -> "MonitorStats":
        config = StatsConfig(**{**doc["config"], "ood_edges": tuple(doc["config"]["ood_edges"])})
        return cls(config, _unpairs(doc["decisions"]), _unpairs(doc["verdicts"]), _unpairs(doc.get("reference", [])))


def _pairs(sums: Sums) -> list:
    return [[list(k), v] for k, v in sums.items()]


def _unpairs(pairs: list) -> Sums:
    return Sums({tuple(k): v for k, v in pairs})


def _codes(column, n: int) -> tuple[np.ndarray, list]:
    """(int64 codes [n], the distinct values they index); a missing column is one value."""
    if column is None:
        return np.zeros(n, np.int64), [NO_SOURCE]
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if not pa.types.is_dictionary(column.type):
        if column.null_count or not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
            column = pc.fill_null(column.cast(pa.string()), NO_SOURCE)
        column = pc.dictionary_encode(column)
    else:
        column = pa.DictionaryArray.from_arrays(pc.fill_null(column.indices, 0), column.dictionary)
    return column.indices.to_numpy(zero_copy_only=False).astype(np.int64), column.dictionary.to_pylist()


def _numpy(column, dtype) -> np.ndarray:
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if dtype is bool:
        return np.asarray(column.fill_null(False).to_numpy(zero_copy_only=False), bool)
    if dtype is np.int64:
        if column.null_count:
            column = column.cast(pa.int64()).fill_null(-1)
        return np.asarray(column.to_numpy(zero_copy_only=False), np.int64)
    return np.asarray(column.to_numpy(zero_copy_only=False), np.float64)


def _seconds(column) -> np.ndarray:
    column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if pa.types.is_timestamp(column.type):
        return column.cast(pa.timestamp("us", tz="UTC")).cast(pa.int64()).to_numpy(zero_copy_only=False) / 1e6
    return np.asarray(column.to_numpy(zero_copy_only=False), np.float64)
