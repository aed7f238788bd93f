"""Online budget control: between refits, keep the escalation rate at the profile's budget under drift.

    control = BudgetControl.from_profile(profile, window_rows=16384, sample_every=4, step_rows=65536)
    thresholds = control.thresholds          # what the next batch is decided with
    control.observe(decisions)               # after each batch: True when a step changed them

A streaming quantile tracker per trigger (confidence, disagreement, anomaly): a sliding window of
the most recent traffic (every ``sample_every``-th decided row, the last ``window_rows`` of them),
whose order statistics are the thresholds. The three are solved together by the fit's own budget
rule, :func:`hitl_triage.engine.thresholds.budget_thresholds`, on the window: each trigger fires
on its share of the profile's ``split`` and their union (counted by the escalation rule itself,
category floors, unscoreable rows and missing embeddings included) on ``budget`` of the window's
rows. So when the traffic drifts (confidences fall, mutual information or k-NN distances rise) the
thresholds follow it and the escalation rate stays at the budget, where fixed ones drift away.

Reproducibility: the thresholds change only at a *step*, between two batches, once ``step_rows``
rows have been decided since the last one and the window is full; step 0 is the profile's own
thresholds. A step's thresholds are a function of the profile version and of the rows decided
before it, in the order they were decided (the window is a fixed subsample of that order, and the
rule is deterministic), and :meth:`BudgetControl.history` keeps every step's thresholds: the
decisions of a batch are reproduced by the profile version and the step it was decided at.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pyarrow as pa
import torch

from .config import ConfigError
from .policy import CategoryTables, RuleInputs, Thresholds, category_codes
from .profile import Profile
from .thresholds import budget_thresholds, escalation_rates

# The decision columns a step reads (``category`` too, when the batch has one).
COLUMNS = ("confidence", "mutual_info", "vote_agreement", "predicted_class", "valid", "ood_score")


@dataclasses.dataclass(frozen=True)
class BudgetStep:
    """One step: its number, the decided rows before it, the thresholds it chose, and the share
    of the window's rows they escalate (model triggers, the union the budget counts)."""

    step: int
    rows_seen: int
    thresholds: Thresholds
    window_rate: float


class BudgetControl:
    """See the module docstring. ``budget``, ``split`` and ``vote_floor`` are the profile's
    budget mode (``thresholds`` its fitted thresholds, step 0); ``tables`` its category rules;
    ``members`` / ``classes`` its M and C; ``anomaly``: the profile has a bank."""

    def __init__(self, thresholds: Thresholds, *, budget: float, split, vote_floor: float, tables: CategoryTables,
                 members: int, classes: int, anomaly: bool, profile_version: str = "", window_rows: int = 16384,
                 sample_every: int = 4, step_rows: int = 65536, keep_history: int = 1000):
        for name, value, low in (("window_rows", window_rows, 16), ("sample_every", sample_every, 1),
                                 ("step_rows", step_rows, 1), ("keep_history", keep_history, 1)):
            if not (isinstance(value, int) and value >= low):
                raise ConfigError(f"budget_control.{name}: expected an integer >= {low}, found {value!r}")
        if thresholds.per_class_confidence is not None:
            raise ConfigError("thresholds.per_class_confidence: expected one confidence threshold for budget control "
                              "(budget mode fits one), found a table per class")
        self.budget, self.split, self.vote_floor = float(budget), tuple(split), float(vote_floor)
        self.tables, self.members, self.classes, self.anomaly = tables, members, classes, anomaly
        self.profile_version = profile_version
        self.window_rows, self.sample_every, self.step_rows = window_rows, sample_every, step_rows
        self.thresholds = thresholds
        self.step = 0
        self.rows_seen = 0
        self._since_step = 0
        self._offset = 0  # position in the stream of the next row, modulo sample_every
        self._filled = 0
        self._next = 0    # ring position
        self._window = {
            "confidence": np.zeros(window_rows, np.float32), "mutual_info": np.zeros(window_rows, np.float32),
            "vote_agreement": np.zeros(window_rows, np.float32), "predicted_class": np.zeros(window_rows, np.int32),
            "valid": np.zeros(window_rows, bool), "ood_score": np.zeros(window_rows, np.float32),
            "category_code": np.zeros(window_rows, np.int64),
        }
        self._history = [BudgetStep(0, 0, thresholds, math.nan)]
        self._keep = keep_history

    @classmethod
    def from_profile(cls, profile: Profile, **options) -> "BudgetControl":
        """Budget control of a budget-mode profile (ConfigError naming the field otherwise)."""
        selection = profile.config.thresholds
        if selection.mode != "budget":
            raise ConfigError(f"thresholds.mode: expected 'budget' for budget control (it holds the escalation rate "
                              f"at the budget), found {selection.mode!r} in profile {profile.version}")
        tables = CategoryTables.build(profile.config.policy, profile.config.tiers, "cpu")
        return cls(profile.thresholds, budget=selection.budget, split=selection.split, vote_floor=selection.vote_floor,
                   tables=tables, members=profile.members, classes=profile.classes, anomaly=profile.bank is not None,
                   profile_version=profile.version, **options)

    # -- the stream ----------------------------------------------------------------------------------

    def observe(self, decisions: pa.RecordBatch | pa.Table) -> bool:
        """Take in one decided batch (the engine's decision columns); steps, and returns True, when
        ``step_rows`` rows have come since the last step and the window is full."""
        n = decisions.num_rows
        if n == 0:
            return False
        picked = np.arange((-self._offset) % self.sample_every, n, self.sample_every)
        self._offset = (self._offset + n) % self.sample_every
        self.rows_seen += n
        self._since_step += n
        if len(picked):
            self._append(_columns(decisions, picked, self.tables))
        if self._filled < self.window_rows or self._since_step < self.step_rows:
            return False
        self._step()
        return True

    def _append(self, values: dict[str, np.ndarray]) -> None:
        k = len(values["confidence"])
        if k >= self.window_rows:  # only the newest rows fit
            values = {name: v[k - self.window_rows:] for name, v in values.items()}
            k = self.window_rows
        where = (self._next + np.arange(k)) % self.window_rows
        for name, v in values.items():
            self._window[name][where] = v
        self._next = (self._next + k) % self.window_rows
        self._filled = min(self.window_rows, self._filled + k)

    def window(self) -> dict[str, np.ndarray]:
        """The window's rows, oldest first (copies)."""
        order = (self._next + np.arange(self._filled)) % self.window_rows if self._filled == self.window_rows \
            else np.arange(self._filled)
        return {name: v[order].copy() for name, v in self._window.items()}

    def _inputs(self) -> RuleInputs:
        w = self.window()
        n = len(w["confidence"])
        return RuleInputs(
            confidence=torch.from_numpy(w["confidence"]), mutual_info=torch.from_numpy(w["mutual_info"]),
            vote_agreement=torch.from_numpy(w["vote_agreement"]), predicted_class=torch.from_numpy(w["predicted_class"]),
            valid=torch.from_numpy(w["valid"]), ood_score=torch.from_numpy(w["ood_score"]) if self.anomaly else None,
            category_code=torch.from_numpy(w["category_code"]) if len(self.tables.names) > 1 else None,
            audit_sampled=torch.zeros(n, dtype=torch.bool), members=self.members, classes=self.classes,
        )

    def _step(self) -> None:
        inputs = self._inputs()
        chosen, report = budget_thresholds(inputs, self.tables, self.budget, self.split, vote_floor=self.vote_floor)
        self.thresholds = chosen
        self.step += 1
        self._since_step = 0
        self._history.append(BudgetStep(self.step, self.rows_seen, chosen, float(report["union_rate"])))
        del self._history[:-self._keep]

    # -- what it says ----------------------------------------------------------------------------------

    def window_rate(self, thresholds: Thresholds | None = None) -> float:
        """Share of the window's rows a model trigger fires on under ``thresholds`` (default: the
        ones in force), by the rule itself; NaN on an empty window."""
        if self._filled == 0:
            return math.nan
        return float(escalation_rates(self._inputs(), thresholds or self.thresholds, self.tables)
                     ["union_before_policy_and_audit"])

    def history(self) -> list[BudgetStep]:
        """The last ``keep_history`` steps, oldest first (step 0 is the profile's thresholds)."""
        return list(self._history)

    def state(self) -> dict:
        """What Stats and the metrics show: the step and the thresholds in force, the budget, the
        rows seen and in the window, and the window's rate at the last step."""
        t = self.thresholds
        return {"profile_version": self.profile_version, "step": self.step, "budget": self.budget,
                "rows_seen": self.rows_seen, "window_rows": self._filled,
                "window_rate": self._history[-1].window_rate,
                "thresholds": {"confidence": t.confidence, "mutual_info": t.mutual_info, "vote_floor": t.vote_floor,
                               "ood": t.ood}}


def _columns(decisions, rows: np.ndarray, tables: CategoryTables) -> dict[str, np.ndarray]:
    """The rule's inputs of ``rows`` of a decision batch, as the window stores them."""
    names = decisions.schema.names
    for name in COLUMNS:
        if name not in names:
            raise ValueError(f"decisions: expected a {name!r} column (the engine's decision columns), found none")
    take = pa.array(rows, pa.int64())

    def numpy(name: str, dtype) -> np.ndarray:
        column = decisions.column(name).take(take)
        if isinstance(column, pa.ChunkedArray):
            column = column.combine_chunks()
        return np.asarray(column.to_numpy(zero_copy_only=False), dtype=dtype)

    out = {"confidence": numpy("confidence", np.float32), "mutual_info": numpy("mutual_info", np.float32),
           "vote_agreement": numpy("vote_agreement", np.float32), "predicted_class": numpy("predicted_class", np.int32),
           "valid": numpy("valid", bool), "ood_score": numpy("ood_score", np.float32)}
    codes = None
    if "category" in names:
        codes = category_codes(decisions.column("category").take(take), tables, "cpu")
    out["category_code"] = codes.numpy().astype(np.int64) if codes is not None else np.zeros(len(rows), np.int64)
    return out


__all__ = ["BudgetControl", "BudgetStep", "COLUMNS"]
