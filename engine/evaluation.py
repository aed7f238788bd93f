"""How much of what matters the escalations caught, where the truth is known (simulations,
labelled audits, benchmarks): errors and out-of-distribution rows caught against budget spent."""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass
class CatchRates:
    """Share of rows escalated (the review budget spent) and of errors / OOD rows among them."""

    rows: int
    escalated: int
    errors: int
    errors_caught: int
    ood: int
    ood_caught: int

    @property
    def budget(self) -> float:
        return self.escalated / self.rows if self.rows else 0.0

    @property
    def error_recall(self) -> float:
        return self.errors_caught / self.errors if self.errors else float("nan")

    @property
    def ood_recall(self) -> float:
        return self.ood_caught / self.ood if self.ood else float("nan")

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "budget": self.budget, "error_recall": self.error_recall,
                "ood_recall": self.ood_recall}


def catch_rates(escalate, is_error, is_ood) -> CatchRates:
    """Counts for a boolean escalation mask against the truth (all arrays [N] bool)."""
    escalate, is_error, is_ood = (np.asarray(a, dtype=bool) for a in (escalate, is_error, is_ood))
    if not escalate.shape == is_error.shape == is_ood.shape:
        raise ValueError(
            f"escalate, is_error, is_ood: expected equal shapes, found {escalate.shape}, {is_error.shape}, {is_ood.shape}"
        )
    return CatchRates(
        rows=int(escalate.size), escalated=int(escalate.sum()),
        errors=int(is_error.sum()), errors_caught=int((escalate & is_error).sum()),
        ood=int(is_ood.sum()), ood_caught=int((escalate & is_ood).sum()),
    )


def escalate_top(score, fraction: float, *, higher_is_riskier: bool = True) -> np.ndarray:
    """bool [N]: the ``fraction`` of rows a single score ranks riskiest (a one-signal policy at a
    given budget). NaN scores rank riskiest, as the engine treats them; ties are broken by
    position so exactly round(fraction * N) rows are chosen."""
    score = np.asarray(score, dtype=np.float64)
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction: expected a value in [0, 1], found {fraction}")
    risk = score if higher_is_riskier else -score
    risk = np.where(np.isnan(risk), np.inf, risk)
    count = int(round(fraction * risk.size))
    chosen = np.zeros(risk.size, dtype=bool)
    if count:
        chosen[np.argsort(-risk, kind="stable")[:count]] = True
    return chosen
