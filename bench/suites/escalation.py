"""escalation: how much of what matters each policy sends to review at a 5%, 10% and 20% budget.

Data: one simulated day of the fleet (``hitl_triage.serve.sim`` defaults: a few percent of
out-of-distribution rows, an OOD burst on one source, drift on another), its labelled calibration
rows and its reference bank; the truth file says which rows the ensemble got wrong and which are OOD.

Policies, each escalating about the budget's share of the day's rows:

- single signals: the rows with the lowest calibrated confidence, lowest margin, highest total
  entropy, highest mutual information, or largest k-NN distance (computed with our kernels at the
  fitted temperature and with the profile's bank and k), exactly ``ceil(budget x rows)`` of them;
- ours: ``Profile.fit`` in budget mode at that budget (audit sampling off, so only the triggers
  count), then ``TriageEngine.triage`` on the day. The budget is met on the calibration data; on
  a day with drift and a burst the achieved share differs, so the table gives it ("escalated").

Quality per row: ``escalated`` share of rows, ``caught_err`` share of the in-distribution rows the
ensemble got wrong that were escalated, ``caught_ood`` share of OOD rows escalated, ``caught_any``
share of rows that were wrong or OOD escalated. For ours, rows/s of the triage call as throughput,
and ``best_single_any``: the best single signal's ``caught_any`` when it escalates the same share
as our policy achieved (``best_single`` names it), the like-for-like comparison.
"""

from __future__ import annotations

import math
import time

import numpy as np

from ..factories import fleet_data
from ..report import Row
from ..runner import NotAvailableYet
from .common import failure

SUITE = "escalation"
TABLE_QUALITY = ("escalated", "caught_err", "caught_ood", "caught_any", "best_single_any", "best_single")
TABLE_HIDE = ("sizes", "dtype", "best s", "compile s")
BUDGETS = (0.05, 0.10, 0.20)


def run(ctx) -> None:
    try:
        from hitl_triage.engine.config import AuditConfig, ThresholdSelection, TriageConfig  # noqa: F401
        from hitl_triage.engine.engine import TriageEngine  # noqa: F401
        from hitl_triage.engine.profile import Profile  # noqa: F401
    except ImportError as exc:
        raise NotAvailableYet(f"hitl_triage.engine (Profile.fit, TriageEngine): {exc}") from exc
    rows, bank_rows, calib_rows = _sizes(ctx.quick)
    ctx.console.print(f"  generating a day of {rows:,} rows, bank {bank_rows:,}, calibration {calib_rows:,} ...")
    data = fleet_data(rows, bank_rows=bank_rows, calibration_rows=calib_rows, seed=ctx.seed + 23)
    in_dist_errors = data.is_error & ~data.is_ood
    ctx.note(
        f"data: {data.origin}: {rows:,} rows, {in_dist_errors.mean():.1%} in-distribution errors, "
        f"{data.is_ood.mean():.1%} OOD"
    )
    task = ctx.task(SUITE, total=len(BUDGETS) + 1)
    profiles = {}
    for budget in BUDGETS:
        ctx.progress.update(task, description=f"{SUITE}: Profile.fit + TriageEngine at budget {budget:.0%}")
        profiles[budget] = _combined(ctx, data, budget, rows)
        ctx.advance(task)
    ctx.progress.update(task, description=f"{SUITE}: single signals")
    fitted = next((p for p, _ in profiles.values() if p is not None), None)
    scores, how = _single_signal_scores(data, fitted)
    ctx.note(how)
    for budget in BUDGETS:
        for name, score in scores.items():
            escalate = _top_share(score, budget)
            ctx.add(Row(SUITE, f"budget {budget:.0%}", name, {"rows": rows}, quality=_caught(escalate, data)))
        combined = profiles[budget][1]
        if combined.ok:
            # The policy's achieved share can differ from the budget: compare it with every single
            # signal escalating that same share.
            rate = combined.quality["escalated"]
            best = max(scores, key=lambda name: _caught(_top_share(scores[name], rate), data)["caught_any"])
            combined.quality["best_single_any"] = _caught(_top_share(scores[best], rate), data)["caught_any"]
            combined.quality["best_single"] = best
        ctx.add(combined)
    ctx.advance(task)
    ctx.progress.remove_task(task)


def _sizes(quick: bool) -> tuple[int, int, int]:
    """(day rows, bank rows, calibration rows)."""
    return (20_000, 10_000, 10_000) if quick else (500_000, 100_000, 50_000)


def _combined(ctx, data, budget: float, rows: int):
    """(profile or None, row) for our policy at ``budget``."""
    from hitl_triage.engine.config import AuditConfig, ThresholdSelection, TriageConfig
    from hitl_triage.engine.engine import TriageEngine
    from hitl_triage.engine.profile import Profile

    row = Row(SUITE, f"budget {budget:.0%}", "ours: combined policy", {"rows": rows}, unit="rows/s")
    try:
        config = TriageConfig(thresholds=ThresholdSelection(mode="budget", budget=budget), audit=AuditConfig(base_rate=0.0))
        t0 = time.perf_counter()
        profile = Profile.fit(data.calibration, bank=data.bank, config=config)
        fit_s = time.perf_counter() - t0
        engine = TriageEngine(profile, device="cpu")
        t0 = time.perf_counter()
        decisions = engine.triage(data.fleet)
        row.seconds = time.perf_counter() - t0
    except Exception as exc:  # noqa: BLE001 - reported in the table
        row.status = failure(exc)
        return None, row
    escalate = decisions.column("escalate").to_numpy(zero_copy_only=False)
    row.throughput = rows / row.seconds
    row.quality = {**_caught(escalate, data), "fit_s": fit_s, "T": profile.temperature}
    row.notes = "one call, first of the run (compilation included)" if budget == BUDGETS[0] else "one call"
    return profile, row


def _single_signal_scores(data, profile):
    """Score per row for each single signal, larger = escalate first; and a sentence on how."""
    from hitl_triage.kernels import ensemble_signals
    from hitl_triage.kernels.knn import KnnIndex, knn_distance

    if profile is not None:
        temperature, index, k = profile.temperature, profile.bank, profile.k
        how = f"single signals at the profile's temperature T={temperature:.3g}, its bank and k={k}"
    else:
        from hitl_triage.engine.calibration import fit_temperature

        temperature = fit_temperature(data.calibration_logits, data.calibration_labels).temperature
        index, k = KnnIndex.build(data.bank_embedding), 10
        how = f"single signals at T={temperature:.3g} (fit_temperature) with k={k} (Profile.fit failed)"
    s = ensemble_signals(data.logits, temperature)
    scores = {
        "confidence": -np.asarray(s.confidence, np.float64),
        "margin": -np.asarray(s.margin, np.float64),
        "entropy": np.asarray(s.total_entropy, np.float64),
        "mutual information": np.asarray(s.mutual_info, np.float64),
    }
    try:
        scores["k-NN distance"] = np.asarray(knn_distance(data.embedding, index, k), np.float64)
    except Exception as exc:  # noqa: BLE001
        how += f"; k-NN distance unavailable ({failure(exc)})"
    return scores, how


def _top_share(score: np.ndarray, share: float) -> np.ndarray:
    """bool mask of the ceil(share x N) rows with the largest score (NaN first: unscoreable rows
    are always escalated)."""
    n = len(score)
    take = min(n, math.ceil(share * n))
    order = np.argsort(np.where(np.isnan(score), np.inf, score), kind="stable")[::-1]
    mask = np.zeros(n, dtype=bool)
    mask[order[:take]] = True
    return mask


def _caught(escalate: np.ndarray, data) -> dict:
    errors = data.is_error & ~data.is_ood
    return {
        "escalated": float(escalate.mean()),
        "caught_err": float(escalate[errors].mean()) if errors.any() else float("nan"),
        "caught_ood": float(escalate[data.is_ood].mean()) if data.is_ood.any() else float("nan"),
        "caught_any": float(escalate[data.is_error].mean()) if data.is_error.any() else float("nan"),
    }
