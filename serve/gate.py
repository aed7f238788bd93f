"""Edge cases become a test set that gates redeployment.

    gate_set = snapshot(queue, name="edge-2026-12")     # frozen: the reviewed items, named and hashed
    save_gate_set(gate_set, "gates/edge-2026-12.parquet")
    result = check(load_gate_set("gates/edge-2026-12.parquet"), candidate_predictions, GateThresholds())
    result.passed, result.slices                          # PASS / FAIL, and every slice's verdict

The gate set is every reviewed item with a final answer (the decisive verdict of
:mod:`hitl_triage.serve.export`; the queue's gold items, which test the reviewers, left out): its
final label, source, reason bits, audit weight and what it
kept of its input (logits, embedding, a ``uri``), so a candidate model can be run on it. A slice is
(source, true class, reason): an item counts in one slice per reason bit it was escalated with,
and every reason also has a pooled slice over all sources and classes (``*``). In the ``audit``
slices each item weighs its ``audit_weight`` (Horvitz-Thompson: they estimate accuracy on the
traffic as a whole); elsewhere every item weighs 1.

Per slice: accuracy (weighted), a two-sided Clopper-Pearson interval at ``confidence`` on the
effective sample size (Kish's n_eff = (sum w)^2 / sum w^2; exact Clopper-Pearson for unit weights),
and a verdict against the slice's threshold t:

- PASS: the interval's lower bound >= t (the candidate is shown to meet the threshold);
- FAIL: its upper bound < t (shown to fall short);
- INSUFFICIENT: fewer than ``min_rows`` items, or an interval that holds t (too few items to
  decide either way): the slice says so instead of passing.

The gate passes when no slice fails and at least one passes; with ``on_insufficient = "fail"``
(a gate that must show every slice) an insufficient slice fails it too. The pooled slices are
where a small fleet's evidence adds up.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from hitl_triage.engine.config import ConfigError, from_dict
from hitl_triage.engine.policy import reason_names
from hitl_triage.engine.thresholds import clopper_pearson_upper

from .queue.base import ReviewQueue

FORMAT = 1
METADATA_KEY = b"hitl_triage.gate_set"
ALL = "*"
STATUSES = ("PASS", "FAIL", "INSUFFICIENT")
# The gate set's columns besides what the item kept of its input (the export's names).
GATE_COLUMNS = ("id", "source", "final_label", "final_action", "reason_mask", "audit_weight", "classes",
                "predicted_class", "profile_version", "model_version", "reviewer", "tier", "stored_at")


class GateError(ValueError):
    """A gate set or candidate predictions that cannot be checked (names the field)."""


@dataclasses.dataclass
class GateThresholds:
    """The ``[gate]`` table: ``min_accuracy`` every slice must be shown to meet, overridden per
    reason by ``min_accuracy_by_reason`` (e.g. ``{anomaly = 0.8}``); ``confidence``: the level of
    each slice's two-sided interval; ``min_rows``: fewer items than this say INSUFFICIENT;
    ``on_insufficient``: "ignore" (listed, not counted) or "fail"."""

    min_accuracy: float = 0.9
    min_accuracy_by_reason: dict[str, float] = dataclasses.field(default_factory=dict)
    confidence: float = 0.95
    min_rows: int = 10
    on_insufficient: str = "ignore"

    @classmethod
    def from_dict(cls, table: dict) -> "GateThresholds":
        return from_dict(cls, table, "gate").check()

    def check(self) -> "GateThresholds":
        for name, value in [("min_accuracy", self.min_accuracy),
                            *((f"min_accuracy_by_reason.{k}", v) for k, v in self.min_accuracy_by_reason.items())]:
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"gate.{name}: expected an accuracy in [0, 1], found {value!r}")
        known = set(reason_names(0xFF))
        for reason in self.min_accuracy_by_reason:
            if reason not in known:
                raise ConfigError(f"gate.min_accuracy_by_reason: expected reasons among {sorted(known)}, found {reason!r}")
        if not 0.0 < self.confidence < 1.0:
            raise ConfigError(f"gate.confidence: expected a level in (0, 1), found {self.confidence!r}")
        if self.min_rows < 1:
            raise ConfigError(f"gate.min_rows: expected at least 1, found {self.min_rows!r}")
        if self.on_insufficient not in ("ignore", "fail"):
            raise ConfigError(f"gate.on_insufficient: expected 'ignore' or 'fail', found {self.on_insufficient!r}")
        return self

    def threshold(self, reason: str) -> float:
        return float(self.min_accuracy_by_reason.get(reason, self.min_accuracy))


# ------------------------------------------------------------------------------------------------
# The frozen gate set
# ------------------------------------------------------------------------------------------------


def snapshot(queue: ReviewQueue, name: str) -> pa.Table:
    """The gate set ``name``: every item of ``queue`` with a final answer, one row each (its
    decisive verdict's export row), sorted by id, with its name, time and content hash in the
    schema metadata (:func:`gate_set_info`)."""
    from .export import training_examples

    if not name or any(c in name for c in "/\\\0") or name.startswith("."):
        raise GateError(f"name: expected a gate-set name without '/' (it names a file), found {name!r}")
    examples = training_examples(queue)
    if examples.num_rows:
        keep = examples.column("decisive")
        if "gold_label" in examples.schema.names:  # gold items check the reviewers; they are not the fleet's inputs
            keep = pc.and_(keep, pc.is_null(examples.column("gold_label")))
        examples = examples.filter(keep)
    keep = [c for c in GATE_COLUMNS if c in examples.schema.names]
    keep += [c for c in examples.schema.names if c not in keep and c not in _EXPORT_ONLY]
    table = examples.select(keep).sort_by("id") if examples.num_rows else examples.select(keep)
    table = table.replace_schema_metadata(None)
    info = {"format": FORMAT, "name": name, "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "rows": table.num_rows, "hash": content_hash(table)}
    return table.replace_schema_metadata({METADATA_KEY: json.dumps(info).encode()})


# Export columns a gate set does not keep: per-verdict and in-queue details.
_EXPORT_ONLY = {"label", "action", "ts", "decision_tier", "enqueued_at", "final_state", "final_tier", "decisive",
                "reasons", "priority", "confidence", "margin", "mutual_info", "vote_agreement", "ood_score",
                "audit_stratum", "category"}


def content_hash(table: pa.Table) -> str:
    """SHA-256 of the table's values, column by column (its name, then its values): the same rows
    give the same hash whatever wrote them and however Arrow laid them out (the IPC bytes, and a
    list type's child names, change in a Parquet round trip)."""
    digest = hashlib.sha256()
    for field, column in zip(table.schema, table.columns):
        digest.update(json.dumps(field.name).encode())
        _hash_values(digest, column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column)
    return digest.hexdigest()


def _hash_values(digest, array: pa.Array) -> None:
    """Feed ``array``'s values to ``digest`` in a canonical form: which entries are null, then
    the values (numbers as little-endian bytes with nulls as 0, fixed-size lists through their
    flattened children, anything else as JSON)."""
    digest.update(np.asarray(array.is_null().to_numpy(zero_copy_only=False), dtype=np.uint8).tobytes())
    kind = array.type
    if pa.types.is_fixed_size_list(kind):
        size = kind.list_size
        _hash_values(digest, array.values.slice(array.offset * size, len(array) * size))
    elif pa.types.is_timestamp(kind) or pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_boolean(kind):
        values = array.cast(pa.int64()) if pa.types.is_timestamp(kind) else array
        numbers = np.asarray(values.fill_null(False if pa.types.is_boolean(kind) else 0).to_numpy(zero_copy_only=False))
        numbers = numbers.astype(np.uint8) if numbers.dtype == bool else numbers.astype(numbers.dtype.newbyteorder("<"))
        digest.update(numbers.tobytes())
    else:
        digest.update(json.dumps(array.to_pylist(), default=str).encode())


def gate_set_info(table: pa.Table) -> dict:
    """The gate set's name, created, rows and hash (GateError when the metadata is missing or
    the rows are not the ones it was hashed with: a gate set is frozen)."""
    raw = (table.schema.metadata or {}).get(METADATA_KEY)
    if raw is None:
        raise GateError(f"gate set: expected the {METADATA_KEY.decode()!r} metadata `triage gate snapshot` writes, found none")
    info = json.loads(raw)
    found = content_hash(table)
    if found != info.get("hash"):
        raise GateError(f"gate set {info.get('name')!r}: expected rows with hash {str(info.get('hash'))[:12]}, found "
                        f"{found[:12]}: the file was changed after its snapshot (a gate set is frozen)")
    return info


def save_gate_set(table: pa.Table, out: str | Path, option: str = "--out") -> Path:
    """Write a snapshot; an existing file is never replaced (a name, once taken, stays frozen)."""
    from .export import write_parquet

    out = Path(out)
    if out.exists():
        raise GateError(f"{option} {out}: expected a new gate-set file, found one already there (a gate set is frozen: "
                        "choose another name)")
    return write_parquet(table, out, option)


def load_gate_set(path: str | Path, option: str = "--gate-set") -> pa.Table:
    from .checks import read_table

    table = read_table(path, option)
    gate_set_info(table)
    return table


# ------------------------------------------------------------------------------------------------
# Checking a candidate
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class GateResult:
    slices: pa.Table         # one row per slice: source, class, reason, rows, weight, accuracy, lower, upper, threshold, status
    passed: bool
    status: str              # PASS | FAIL | INSUFFICIENT (no slice could be decided)
    info: dict               # the gate set's name, hash, rows; rows left out and why

    @property
    def exit_code(self) -> int:
        return 0 if self.passed else 1


def check(gate_set: pa.Table, predictions: pa.Table, thresholds: GateThresholds | None = None) -> GateResult:
    """The gate's verdict on a candidate's ``predictions`` (columns ``id`` and ``predicted_class``,
    optionally ``abstain``: bool, the candidate declines the input) over ``gate_set``. Items ruled
    out of scope are right when the candidate abstains; without an ``abstain`` column they are
    left out (and counted in ``info``). GateError names the field of bad predictions."""
    thresholds = (thresholds or GateThresholds()).check()
    info = {k: v for k, v in json.loads((gate_set.schema.metadata or {}).get(METADATA_KEY, b"{}")).items()
            if k in ("name", "hash", "rows", "created")}
    n = gate_set.num_rows
    if n == 0:  # nothing reviewed yet: nothing can be shown (the predictions are still checked)
        _candidate(predictions, pa.chunked_array([], pa.string()), 0)
        return GateResult(slices=SLICE_SCHEMA.empty_table(), passed=False, status="INSUFFICIENT",
                          info={**info, "left_out_out_of_scope": 0})
    for name in ("id", "final_label", "reason_mask", "audit_weight", "classes"):
        if name not in gate_set.schema.names:
            raise GateError(f"gate set: expected a {name!r} column (`triage gate snapshot` writes it), found columns "
                            f"{gate_set.schema.names}")
    classes = int(max(gate_set.column("classes").to_pylist(), default=0))
    predicted, abstain = _candidate(predictions, gate_set.column("id"), classes)
    label = np.asarray(gate_set.column("final_label").to_numpy(zero_copy_only=False), dtype=np.int64)
    out_of_scope = label < 0
    scored = ~out_of_scope if abstain is None else np.ones(n, dtype=bool)
    correct = np.where(out_of_scope, abstain if abstain is not None else False,
                       (predicted == label) & ~(abstain if abstain is not None else False))
    info["left_out_out_of_scope"] = int((~scored).sum())
    sources = [s if s is not None else "" for s in gate_set.column("source").to_pylist()] if "source" in \
        gate_set.schema.names else [""] * n
    masks = gate_set.column("reason_mask").to_pylist()
    weights = np.asarray(gate_set.column("audit_weight").fill_null(0).to_numpy(zero_copy_only=False), dtype=np.float64)
    members: dict[tuple[str, str, str], list[int]] = {}
    for row in np.flatnonzero(scored):
        cls = "out_of_scope" if out_of_scope[row] else str(int(label[row]))
        for reason in reason_names(int(masks[row] or 0)):
            for key in ((sources[row], cls, reason), (ALL, ALL, reason)):
                members.setdefault(key, []).append(int(row))
    records = [_slice(key, np.asarray(rows), correct, weights, thresholds) for key, rows in sorted(members.items())]
    table = pa.Table.from_pylist(records, schema=SLICE_SCHEMA)
    statuses = [r["status"] for r in records]
    decided = [s for s in statuses if s != "INSUFFICIENT"]
    failed = "FAIL" in statuses or (thresholds.on_insufficient == "fail" and "INSUFFICIENT" in statuses)
    if failed:
        status = "FAIL"
    elif not decided:  # nothing shown either way: never a pass
        status = "INSUFFICIENT"
    else:
        status = "PASS"
    return GateResult(slices=table, passed=status == "PASS", status=status, info=info)


SLICE_SCHEMA = pa.schema([
    pa.field("source", pa.string()), pa.field("class", pa.string()), pa.field("reason", pa.string()),
    pa.field("rows", pa.int64()), pa.field("effective_rows", pa.float64()), pa.field("accuracy", pa.float64()),
    pa.field("lower", pa.float64()), pa.field("upper", pa.float64()), pa.field("threshold", pa.float64()),
    pa.field("status", pa.string()),
])


def _slice(key, rows: np.ndarray, correct: np.ndarray, weights: np.ndarray, thresholds: GateThresholds) -> dict:
    source, cls, reason = key
    w = weights[rows] if reason == "audit" else np.ones(len(rows))
    if reason == "audit" and not (w > 0).all():
        w = np.where(w > 0, w, 1.0)  # an audit row without its weight (an old item) counts once
    total = float(w.sum())
    accuracy = float((w * correct[rows]).sum() / total)
    n_eff = total * total / float((w * w).sum())
    lower, upper = clopper_pearson(accuracy * n_eff, n_eff, 1.0 - thresholds.confidence)
    threshold = thresholds.threshold(reason)
    if len(rows) >= thresholds.min_rows and lower >= threshold:
        status = "PASS"
    elif len(rows) >= thresholds.min_rows and upper < threshold:
        status = "FAIL"
    else:
        status = "INSUFFICIENT"  # too few rows, or an interval that holds the threshold: not decided
    return {"source": source, "class": cls, "reason": reason, "rows": int(len(rows)), "effective_rows": n_eff,
            "accuracy": accuracy, "lower": lower, "upper": upper, "threshold": threshold, "status": status}


def clopper_pearson(successes: float, trials: float, alpha: float) -> tuple[float, float]:
    """Two-sided Clopper-Pearson interval at level 1 - alpha for a binomial proportion, from the
    engine's one-sided bound (each tail alpha / 2); counts may be effective (non-integer)."""
    upper = float(clopper_pearson_upper(successes, trials, alpha / 2))
    lower = 1.0 - float(clopper_pearson_upper(trials - successes, trials, alpha / 2))
    return max(0.0, lower), min(1.0, upper)


def _candidate(predictions: pa.Table, ids: pa.ChunkedArray, classes: int) -> tuple[np.ndarray, np.ndarray | None]:
    """The candidate's predicted class (and abstain flag) of every gate-set id, in its order."""
    names = predictions.schema.names
    for name in ("id", "predicted_class"):
        if name not in names:
            raise GateError(f"predictions: expected a {name!r} column, found columns {names}")
    column = predictions.column("predicted_class")
    if not pa.types.is_integer(column.type):
        raise GateError(f"predictions: predicted_class: expected integers, found {column.type}")
    if column.null_count:
        raise GateError(f"predictions: predicted_class: expected a class on every row, found {column.null_count} nulls")
    id_type = predictions.column("id").type
    if not (pa.types.is_string(id_type) or pa.types.is_large_string(id_type) or pa.types.is_integer(id_type)):
        raise GateError(f"predictions: id: expected strings or integers, found {id_type}")
    candidate_ids = predictions.column("id").cast(pa.string())
    if candidate_ids.null_count:
        raise GateError(f"predictions: id: expected no null ids, found {candidate_ids.null_count}")
    counts = pc.value_counts(candidate_ids.combine_chunks())
    repeated = pc.filter(counts.field("values"), pc.greater(counts.field("counts"), 1))
    if len(repeated):
        raise GateError(f"predictions: id: expected each id once, found {len(repeated)} repeated (first {repeated[0].as_py()!r})")
    position = pc.index_in(ids, value_set=candidate_ids.combine_chunks())
    missing = position.is_null()
    if pc.any(missing).as_py():
        absent = pc.filter(ids, missing)
        raise GateError(f"predictions: id: expected a prediction for every gate-set item, found {len(absent)} of "
                        f"{len(ids)} missing (first {absent[0].as_py()!r})")
    predicted = np.asarray(column.take(position).to_numpy(zero_copy_only=False), dtype=np.int64)
    bad = (predicted < 0) | (predicted >= classes)
    if bad.any():
        raise GateError(f"predictions: predicted_class: expected a class in [0, {classes}), found {int(predicted[bad][0])}")
    abstain = None
    if "abstain" in names:
        flag = predictions.column("abstain")
        if not pa.types.is_boolean(flag.type):
            raise GateError(f"predictions: abstain: expected booleans, found {flag.type}")
        abstain = np.asarray(flag.take(position).fill_null(False).to_numpy(zero_copy_only=False), dtype=bool)
    return predicted, abstain


__all__ = ["GateError", "GateResult", "GateThresholds", "check", "clopper_pearson", "content_hash", "gate_set_info",
           "load_gate_set", "save_gate_set", "snapshot"]
