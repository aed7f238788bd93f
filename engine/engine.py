"""The triage engine: a batch of predictions in, a batch of decision columns out.

    engine = TriageEngine(Profile.load("profile/"))
    decisions = engine.triage(record_batch)      # pyarrow.RecordBatch, one row per input row

The engine holds no state between batches beyond the profile: any number of replicas, processes or
machines given the same profile version make the same decisions for the same rows (the audit
draw hashes the id), which is what the gRPC service and the review queue build on.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import time
from typing import cast

import numpy as np
import pyarrow as pa
import torch

from hitl_triage.kernels.audit import REGISTRY as AUDIT_BACKENDS
from hitl_triage.kernels.knn import prepare_knn
from hitl_triage.kernels.signals import prepare_signals

from . import audit
from .decode import BatchError, decode_batch
from .policy import CategoryTables, apply_rules
from .profile import Profile
from .scoring import TemperatureTable, ood_scores, rule_inputs
from .watchlist import watch_distances

DECISION_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string()),  # or int64, as the input's id column
        pa.field("escalate", pa.bool_()),
        pa.field("reason_mask", pa.uint8()),
        pa.field("tier", pa.string()),
        pa.field("priority", pa.float32()),
        pa.field("predicted_class", pa.int32()),
        pa.field("confidence", pa.float32()),
        pa.field("margin", pa.float32()),
        pa.field("mutual_info", pa.float32()),
        pa.field("vote_agreement", pa.float32()),
        pa.field("ood_score", pa.float32()),
        pa.field("audit_weight", pa.float32()),
        pa.field("audit_stratum", pa.string()),
        pa.field("valid", pa.bool_()),
        pa.field("profile_version", pa.string()),
    ]
)
"""Decision columns; with a k-NN bank ``ood_rescored`` (bool: the row's ``ood_score`` was re-scored
exactly because an approximate search put it near or above the anomaly threshold) follows, then
``source`` and ``category`` when the input has them (for routing)."""


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclasses.dataclass
class Decisions:
    """Decision columns of one batch as tensors on the engine's device (see DECISION_SCHEMA)."""

    ids: pa.Array
    escalate: torch.Tensor
    reason_mask: torch.Tensor
    tier_rank: torch.Tensor
    priority: torch.Tensor
    predicted_class: torch.Tensor
    confidence: torch.Tensor
    margin: torch.Tensor
    mutual_info: torch.Tensor
    vote_agreement: torch.Tensor
    ood_score: torch.Tensor
    audit_weight: torch.Tensor
    audit_stratum: pa.Array
    valid: torch.Tensor
    ood_rescored: torch.Tensor | None
    source: pa.Array | None
    category: pa.Array | None
    tier_names: list[str]
    profile_version: str

    def to_arrow(self) -> pa.RecordBatch:
        """The decision columns as an Arrow record batch on the host."""
        n = len(self.ids)
        host = {name: _host(getattr(self, name)) for name in (
            "escalate", "reason_mask", "tier_rank", "priority", "predicted_class", "confidence",
            "margin", "mutual_info", "vote_agreement", "ood_score", "audit_weight", "valid",
        )}
        tier_rank = host["tier_rank"].astype(np.int32)
        tier = pa.array(self.tier_names, pa.string()).take(
            pa.array(np.where(tier_rank < 0, 0, tier_rank), mask=tier_rank < 0)
        )
        columns = {
            "id": self.ids,
            "escalate": pa.array(host["escalate"]),
            "reason_mask": pa.array(host["reason_mask"]),
            "tier": tier,
            "priority": pa.array(host["priority"]),
            "predicted_class": pa.array(host["predicted_class"]),
            "confidence": pa.array(host["confidence"]),
            "margin": pa.array(host["margin"]),
            "mutual_info": pa.array(host["mutual_info"]),
            "vote_agreement": pa.array(host["vote_agreement"]),
            "ood_score": pa.array(host["ood_score"]),
            "audit_weight": pa.array(host["audit_weight"]),
            "audit_stratum": self.audit_stratum,
            "valid": pa.array(host["valid"]),
            "profile_version": pa.repeat(pa.scalar(self.profile_version, pa.string()), n),
        }
        if self.ood_rescored is not None:
            columns["ood_rescored"] = pa.array(_host(self.ood_rescored))
        if self.source is not None:
            columns["source"] = self.source
        if self.category is not None:
            columns["category"] = self.category
        return pa.RecordBatch.from_pydict(columns)


class StageTimer:
    """Seconds spent per stage, accumulated across batches when enabled (CUDA is synchronised
    around each stage so the split is real; off by default because that costs overlap)."""

    def __init__(self, enabled: bool, device: torch.device):
        self.enabled = enabled
        self.device = device
        # Float seconds: a Counter holds any numbers, typeshed's Counter only ints.
        self.seconds = cast("dict[str, float]", collections.Counter())

    @contextlib.contextmanager
    def stage(self, name: str):
        if not self.enabled:
            yield
            return
        self._sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.seconds[name] += time.perf_counter() - start

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


class TriageEngine:
    """Applies a :class:`Profile` to batches of predictions.

    Args:
        profile: the fitted profile (``Profile.load(dir)`` or ``Profile.fit(...)``).
        device: "cpu", "cuda" or "cuda:N"; default CUDA when available.
        time_stages: accumulate seconds per stage in ``stage_seconds`` (decode, signals, knn,
            audit, policy, output).
    """

    def __init__(self, profile: Profile, *, device: str | None = None, time_stages: bool = False):
        self.profile = profile
        self.device = torch.device(device or default_device())
        self._timer = StageTimer(time_stages, self.device)
        self._temperatures = TemperatureTable(profile.temperature, profile.source_temperatures, self.device)
        self._categories = CategoryTables.build(profile.config.policy, profile.config.tiers, self.device)
        prepare_signals(profile.members, profile.classes, self.device)
        # Every kernel a batch calls is compiled (or loaded from numba's cache) now, not on the first batch.
        AUDIT_BACKENDS.resolve(self.device.type)  # imports the audit draw's backend (eagerly compiled kernels)
        if profile.bank is not None:
            prepare_knn(profile.bank, profile.k, self.device)
        self._missing_embedding_ok = profile.config.policy.on_missing_embedding == "escalate"

    @property
    def stage_seconds(self) -> dict[str, float]:
        return dict(self._timer.seconds)

    def triage(self, batch, *, reported: bool = False) -> pa.RecordBatch:
        """Decision columns (DECISION_SCHEMA) for every row of ``batch``, in input order.

        ``batch``: an Arrow RecordBatch or Table in the data contract, or a mapping of column name
        to arrays (numpy, torch, CuPy, pyarrow). Raises ``BatchError`` (naming the column, what was
        expected and what came) for input that cannot be triaged; then no row is decided.
        ``reported``: users challenged these predictions (the service's Report call): every row
        escalates with the REPORTED bit to ``tiers.reported``, whatever the model said.
        """
        decisions = self.decide(batch, reported=reported)
        with self._timer.stage("output"):
            return decisions.to_arrow()

    def decide(self, batch, *, reported: bool = False) -> Decisions:
        """Like :meth:`triage`, but the columns stay tensors on the engine's device."""
        p = self.profile
        t = self._timer
        has_bank = p.bank is not None
        with t.stage("decode"):
            x = decode_batch(
                batch, members=p.members, classes=p.classes, dim=p.dim if has_bank else None,
                device=self.device,
                embedding=("optional" if self._missing_embedding_ok else "required") if has_bank else "ignore",
                label="ignore",
            )
            if has_bank and not self._missing_embedding_ok and x.embedding_missing is not None:
                missing = x.embedding_missing.cpu().numpy()
                if missing.any():
                    first = x.ids[int(np.argmax(missing))].as_py()
                    raise BatchError(
                        f"embedding: expected a vector for every row (the profile has a k-NN bank), found "
                        f"{int(missing.sum())} null rows, first id {first!r}; set policy.on_missing_embedding "
                        f"= \"escalate\" to escalate such rows instead"
                    )

        with t.stage("signals"):
            s = self._temperatures.signals(x.logits, x.source)

        ood = rescored = None
        if has_bank:
            with t.stage("knn"):
                ood, rescored = ood_scores(x, p.bank, p.k, p.thresholds.ood)

        with t.stage("audit"):
            inputs, weight, columns = rule_inputs(
                x, s, ood, self._categories, p.config.audit, members=p.members, classes=p.classes,
                reported=reported,
            )
            inputs.watch_distance = watch_distances(p.watch, x.embedding, p.thresholds.watch_radius,
                                                    x.embedding_missing)
            valid = inputs.valid
            sampled_rows = torch.nonzero(inputs.audit_sampled).flatten().cpu().numpy()
            strata = audit.stratum_labels(columns, p.config.audit, sampled_rows)
            stratum = _scatter_strings(x.num_rows, sampled_rows, strata)

        with t.stage("policy"):
            rules = apply_rules(inputs, p.thresholds, p.config.tiers, self._categories)
        nan = torch.full_like(s.confidence, float("nan"))
        return Decisions(
            ids=x.ids, escalate=rules.reason_mask > 0, reason_mask=rules.reason_mask,
            tier_rank=rules.tier_rank, priority=rules.priority,
            predicted_class=torch.where(valid, s.predicted_class, torch.full_like(s.predicted_class, -1)),
            confidence=torch.where(valid, s.confidence, nan), margin=torch.where(valid, s.margin, nan),
            mutual_info=torch.where(valid, s.mutual_info, nan),
            vote_agreement=torch.where(valid, s.vote_agreement, nan),
            ood_score=ood if ood is not None else nan, audit_weight=weight, audit_stratum=stratum,
            valid=valid, ood_rescored=rescored, source=x.source, category=x.category,
            tier_names=list(p.config.tiers.order), profile_version=p.version,
        )


def _scatter_strings(n: int, rows: np.ndarray, values: list[str]) -> pa.Array:
    """A string column of length n holding values[i] at rows[i] and null elsewhere."""
    positions = np.zeros(n, dtype=np.int32)
    positions[rows] = np.arange(len(rows), dtype=np.int32)
    absent = np.ones(n, dtype=bool)
    absent[rows] = False
    return pa.array(values, pa.string()).take(pa.array(positions, mask=absent))


def _host(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()
