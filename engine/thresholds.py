"""Choosing the triggers' thresholds from labelled calibration data.

Conventions (the same as the engine's rules in :mod:`hitl_triage.engine.policy`):

- CONFIDENCE fires when ``confidence < t_conf``.
- DISAGREEMENT fires when ``mutual_info > t_mi``, or when ``vote_agreement < vote_floor``
  (``vote_floor = 0`` turns that part off; ``t_mi = +inf`` turns the mutual-information part off).
- ANOMALY fires when ``ood_score > t_ood`` (``t_ood = +inf``: off, e.g. without a reference bank).
- A NaN score never counts as passing: it fires its trigger whenever that trigger is on (a
  NaN confidence always fires). A row that cannot be scored is never auto-accepted.

Three ways to choose thresholds:

- :func:`ood_threshold`: the anomaly threshold that lets a given share of in-distribution rows
  pass.
- :func:`budget_thresholds` (review-budget mode): escalate about ``budget`` of the traffic,
  shared among the triggers by ``split``.
- :func:`target_risk_thresholds` (target-risk mode): the lowest confidence threshold whose
  auto-accepted rows have an error rate <= alpha with probability >= 1 - delta (selective
  classification with guaranteed risk, Geifman & El-Yaniv 2017; the statistics are in
  :func:`selective_risk_threshold`).

Both return a :class:`~hitl_triage.engine.policy.Thresholds` and a report of how it was chosen;
:func:`choose_thresholds` runs the one a :class:`~hitl_triage.engine.config.ThresholdSelection`
asks for. Both count what fires with the rule itself.

:func:`escalation_rates` gives the share of rows each reason bit fires on under a set of
thresholds, by calling the rule itself (the expected escalation rate a profile reports).
"""

from __future__ import annotations

import dataclasses
import logging
import math

import numpy as np
import torch
from scipy.stats import beta as beta_distribution

from .config import ThresholdSelection
from .policy import CategoryTables, RuleInputs, Thresholds, fire_triggers

logger = logging.getLogger(__name__)

TRIGGERS = ("confidence", "disagreement", "anomaly")


# ------------------------------------------------------------------------------------------------
# Input checks
# ------------------------------------------------------------------------------------------------


def _scores(x, name: str, rows: int | None = None) -> np.ndarray:
    """A one-dimensional float64 copy-free view of a numpy / torch / list score array."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().to(torch.float64).numpy()
    arr = np.asarray(x)
    if arr.dtype.kind not in "fiub":
        raise TypeError(f"{name}: expected numbers, found dtype {arr.dtype}")
    arr = arr.astype(np.float64, copy=False)
    if arr.ndim != 1:
        raise ValueError(f"{name}: expected a one-dimensional array, found shape {arr.shape}")
    if rows is not None and arr.shape[0] != rows:
        raise ValueError(f"{name}: expected {rows} rows to match confidence, found {arr.shape[0]}")
    return arr


def _mask(x, name: str, rows: int) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    arr = np.asarray(x)
    if arr.shape != (rows,):
        raise ValueError(f"{name}: expected shape ({rows},), found {arr.shape}")
    if arr.dtype == np.bool_:
        return arr
    if arr.dtype.kind in "iu" and np.isin(arr, (0, 1)).all():
        return arr.astype(bool)
    raise TypeError(f"{name}: expected booleans (or 0/1), found dtype {arr.dtype} with other values")


def _fraction(value, name: str, *, low_open: bool, high_open: bool) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{name}: expected a number, found {type(value).__name__}") from exc
    lo_ok = v > 0 if low_open else v >= 0
    hi_ok = v < 1 if high_open else v <= 1
    if not (lo_ok and hi_ok):
        interval = ("(" if low_open else "[") + "0, 1" + (")" if high_open else "]")
        raise ValueError(f"{name}: expected a value in {interval}, found {value!r}")
    return v


# ------------------------------------------------------------------------------------------------
# Applying thresholds
# ------------------------------------------------------------------------------------------------


def escalation_rates(inputs: RuleInputs, thresholds: Thresholds, tables: CategoryTables) -> dict:
    """The share of rows on which each reason bit fires under ``thresholds``, from the rule
    itself (:func:`hitl_triage.engine.policy.fire_triggers`), so a run over the same rows fires
    exactly these shares. Keys: each reason's name, ``union_before_policy_and_audit`` (a model
    trigger fired), ``with_audit`` (any bit: the escalation rate) and ``rows``."""
    fired = fire_triggers(inputs, thresholds, tables)
    rows = int(inputs.confidence.shape[0])
    rate = (lambda m: float(m.double().mean())) if rows else (lambda m: math.nan)
    return {
        "confidence": rate(fired.confidence),
        "disagreement": rate(fired.disagreement),
        "policy": rate(fired.policy),
        "anomaly": rate(fired.anomaly),
        "audit": rate(fired.audit),
        "union_before_policy_and_audit": rate(fired.model()),
        "with_audit": rate(fired.reason_mask() > 0),
        "rows": rows,
    }


# ------------------------------------------------------------------------------------------------
# Anomaly threshold
# ------------------------------------------------------------------------------------------------


def ood_threshold(in_distribution_scores, pass_rate: float = 0.95) -> float:
    """The anomaly threshold t under which ``pass_rate`` of in-distribution rows pass (score <= t).

    t is the empirical quantile of type 1 in Hyndman & Fan (1996), "inverted CDF" in numpy: the
    smallest score s with #{scores <= s} >= ceil(pass_rate * n), so at least ``pass_rate`` of the
    n rows pass and t is one of the scores. NaN scores count in n and never pass; where they are
    so many that the rate cannot be met, t = +inf (every scored row passes) and a warning is
    logged. +inf scores are ordinary scores that never pass.
    """
    scores = _scores(in_distribution_scores, "in_distribution_scores")
    rate = _fraction(pass_rate, "pass_rate", low_open=True, high_open=False)
    rows = scores.shape[0]
    if rows == 0:
        raise ValueError("in_distribution_scores: expected at least one score, found none")
    finite = np.sort(scores[~np.isnan(scores)])
    # The small slack keeps 0.95 * 100 from becoming 96 through rounding of the product.
    need = max(1, math.ceil(rate * rows - 1e-9))
    if need > finite.shape[0]:
        logger.warning(
            "ood_threshold: %d of %d in-distribution scores are NaN, so at most %.4f of rows can pass "
            "(asked %.4f); the threshold lets every scored row pass", rows - finite.shape[0], rows,
            finite.shape[0] / rows, rate,
        )
        return math.inf
    return float(finite[need - 1])


# ------------------------------------------------------------------------------------------------
# Budget mode
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Ranked:
    """One trigger as budget mode sees it: ``oriented`` scores (higher = more suspicious) of the
    rows whose firing depends on the threshold, sorted in decreasing order, and ``always`` the
    rows that fire whatever the threshold (NaN scores, votes under the floor)."""

    oriented: np.ndarray
    ordered: np.ndarray
    always: np.ndarray
    cumulative: np.ndarray  # weight of the first j + 1 rows of ``ordered`` (j + 1 without weights)
    always_weight: float

    @property
    def tunable(self) -> bool:
        return self.ordered.shape[0] > 0 and self.ordered[0] > self.ordered[-1]

    def threshold_for(self, fire_weight: float) -> float:
        """Oriented threshold at which the trigger alone fires on about ``fire_weight`` of row
        weight (rows, without weights; exactly when no scores tie): ``always`` plus the rows with
        oriented score > threshold, the most suspicious first while their weight fits."""
        extra = fire_weight - self.always_weight
        if self.ordered.shape[0] == 0:
            return math.inf
        # Unit weights: cumulative = 1, 2, ..., so this is floor(extra): the unweighted rule.
        fits = int(np.searchsorted(self.cumulative, extra + 1e-9, side="right"))
        if fits <= 0:
            return float(self.ordered[0])
        if fits >= self.ordered.shape[0]:
            return -math.inf
        return float(self.ordered[fits])


def _ranked(oriented: np.ndarray, always: np.ndarray, weights: np.ndarray | None = None) -> _Ranked:
    always = always | np.isnan(oriented)
    if weights is None:
        ordered = np.sort(oriented[~always])[::-1]
        cumulative = np.arange(1, ordered.shape[0] + 1, dtype=np.float64)
        return _Ranked(oriented, ordered, always, cumulative, float(always.sum()))
    order = np.argsort(-oriented[~always], kind="stable")
    ordered = oriented[~always][order]
    cumulative = np.cumsum(weights[~always][order])
    return _Ranked(oriented, ordered, always, cumulative, float(weights[always].sum()))


def _float64(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().to(torch.float64).numpy()


def _check_split(split) -> list[float]:
    try:
        weights = [float(w) for w in split]
    except (TypeError, ValueError) as exc:
        raise ValueError(f"split: expected three non-negative weights, found {split!r}") from exc
    if len(weights) != 3 or any(not (w >= 0) or math.isinf(w) for w in weights) or sum(weights) <= 0:
        raise ValueError(
            f"split: expected three non-negative weights (confidence, disagreement, anomaly) with a "
            f"positive sum, found {list(split)}"
        )
    return weights


def budget_thresholds(
    inputs: RuleInputs,
    tables: CategoryTables,
    budget: float,
    split=(0.5, 0.25, 0.25),
    *,
    vote_floor: float = 0.0,
    row_weights=None,
    watch_radius: float | None = None,
) -> tuple[Thresholds, dict]:
    """Thresholds under which the rule escalates about ``budget`` of the calibration rows
    through its model triggers (confidence, disagreement, anomaly), shared among them by ``split``.

    Args:
        inputs: the rule's inputs on the calibration rows (:func:`hitl_triage.engine.scoring.rule_inputs`).
            Mutual information takes part only for an ensemble (M > 1), the anomaly trigger only
            with a bank (``ood_score`` not None).
        tables: the category tables (their confidence floors fire whatever the thresholds).
        budget: share of rows to escalate, in [0, 1].
        split: weights (confidence, disagreement, anomaly), non-negative with a positive sum.
        vote_floor: rows with vote agreement < floor fire the disagreement trigger whatever its
            threshold (the floor is a fixed policy, not fitted).
        row_weights: optional non-negative float [N], the weight of each row in the traffic (feedback's
            Horvitz-Thompson audit weights times age weights): every share below is then a share
            of the total weight W instead of the N rows.
        watch_radius: the watch list's radius (None: none); its hits count in the union, so the
            budget makes room for them (``inputs.watch_distance`` holds the distances).

    Returns the thresholds and a report (``budget``, ``split``, ``shares``, ``scale``,
    ``union_rate``: the share of rows on which the rule fires a model trigger, ``rows``).

    The rule. Let b be the budget and w_i the split normalised over the triggers that have data;
    a trigger without data (no ensemble, no bank, or scores that are all equal and so cannot rank
    rows) gets no threshold (+inf, off) and its weight goes to the others in proportion to theirs.
    For a scale s >= 0, trigger i alone gets the threshold at which it fires on a share
    r_i(s) = min(1, w_i * s * b) of the rows: the order statistic of its scores that leaves
    floor(r_i * N) rows on the firing side (rows that fire regardless, such as invalid rows,
    count towards that number). The union U(s), counted by the rule itself
    (:func:`hitl_triage.engine.policy.fire_triggers`, so category floors, invalid rows and
    missing embeddings are in it), grows with s; bisection on s finds where U crosses b and keeps
    whichever side is closer to b (the lower one on a tie). Without overlaps s = 1 and each
    trigger gets exactly its share; since triggers do overlap (a low confidence row often has
    high mutual information), s > 1 in practice, and every trigger keeps the proportion of the
    split in its solo rate. Scores tie in real data, so U moves in steps and the union rate lands
    as close to b as the data allow.
    """
    rows = int(inputs.confidence.shape[0])
    if rows == 0:
        raise ValueError("confidence: expected at least one row, found none")
    b = _fraction(budget, "budget", low_open=False, high_open=False)
    weights = _check_split(split)
    floor = float(vote_floor)
    if not 0.0 <= floor <= 1.0:
        raise ValueError(f"vote_floor: expected a value in [0, 1], found {vote_floor!r}")

    w = None
    if row_weights is not None:
        w = _scores(row_weights, "row_weights", rows)
        if not (np.isfinite(w).all() and (w >= 0).all() and w.sum() > 0):
            raise ValueError("row_weights: expected finite non-negative weights with a positive sum, found others")
    total_weight = float(rows) if w is None else float(w.sum())
    invalid = ~inputs.valid.cpu().numpy()
    ensemble = inputs.members > 1
    # The scores each trigger ranks rows by (higher = more suspicious); float32 values held in
    # float64, so every order statistic is a float32 value and the rule compares it exactly.
    ranked = {"confidence": _ranked(-_float64(inputs.confidence), invalid, w)}
    if ensemble:
        low_vote = _float64(inputs.vote_agreement) < floor
        ranked["disagreement"] = _ranked(_float64(inputs.mutual_info), invalid | low_vote, w)
    if inputs.ood_score is not None:
        ranked["anomaly"] = _ranked(_float64(inputs.ood_score), np.zeros(rows, dtype=bool), w)
    raw = dict(zip(TRIGGERS, weights))
    # A trigger takes part when it has scores that rank rows and a positive weight; the others
    # are off (threshold +inf) and their weight goes to the ones that take part.
    active = {name: r for name, r in ranked.items() if r.tunable and raw[name] > 0}
    for name, r in ranked.items():
        if not r.tunable and raw[name] > 0:
            logger.info("budget thresholds: the %s trigger has no scores to rank; its share goes to the others", name)
    total = sum(raw[name] for name in active)
    if total <= 0:
        raise ValueError(
            f"split: expected a positive weight for at least one trigger with scores to rank "
            f"({', '.join(n for n, r in ranked.items() if r.tunable) or 'none'}), found {list(split)}"
        )
    shares = {name: (raw[name] / total if name in active else 0.0) for name in TRIGGERS}
    # Oriented thresholds back in the rule's conventions; a trigger that does not take part is off.
    orientation = {"confidence": -1.0, "disagreement": 1.0, "anomaly": 1.0}
    off = {"confidence": -math.inf, "disagreement": math.inf, "anomaly": math.inf}

    def thresholds_at(s: float) -> dict[str, float]:
        return {
            name: r.threshold_for(min(1.0, shares[name] * s * b) * total_weight)
            for name, r in active.items()
        }

    def as_thresholds(oriented: dict[str, float]) -> Thresholds:
        t = {name: orientation[name] * oriented[name] if name in oriented else off[name] for name in TRIGGERS}
        return Thresholds(confidence=t["confidence"], mutual_info=t["disagreement"], vote_floor=floor, ood=t["anomaly"],
                          watch_radius=watch_radius)

    def union_rows(oriented: dict[str, float]) -> float:
        fired = fire_triggers(inputs, as_thresholds(oriented), tables).model()
        return int(fired.sum()) if w is None else float(w[fired.cpu().numpy()].sum())

    target = b * total_weight
    lo = 0.0
    th_lo = thresholds_at(lo)
    u_lo = union_rows(th_lo)
    if b == 0 or u_lo > target:
        if u_lo > target:
            logger.warning(
                "budget thresholds: %d of %d rows fire whatever the thresholds (invalid rows, low votes, "
                "missing embeddings, category floors), more than the budget %.4f", u_lo, rows, b,
            )
        chosen, scale, u_chosen = th_lo, 0.0, u_lo
    else:
        # At hi every active trigger alone fires on every row, so U(hi) = 1 >= b.
        hi = 1.0 / (min(shares[name] for name in active) * b)
        th_hi = thresholds_at(hi)
        u_hi = union_rows(th_hi)
        while hi - lo > 1e-12 * hi:
            mid = 0.5 * (lo + hi)
            th_mid = thresholds_at(mid)
            # U only changes where a threshold does: skip the union when none did.
            u_mid = u_lo if th_mid == th_lo else u_hi if th_mid == th_hi else union_rows(th_mid)
            if u_mid <= target:
                lo, th_lo, u_lo = mid, th_mid, u_mid
            else:
                hi, th_hi, u_hi = mid, th_mid, u_mid
        if u_hi <= target or abs(u_hi - target) < abs(u_lo - target):
            chosen, scale, u_chosen = th_hi, hi, u_hi
        else:
            chosen, scale, u_chosen = th_lo, lo, u_lo

    report = {
        "budget": b,
        "split": weights,
        "shares": shares,
        "scale": float(scale),
        "union_rate": u_chosen / total_weight,
        "rows": rows,
    }
    if w is not None:
        report["weight"] = total_weight
    return as_thresholds(chosen), report


# ------------------------------------------------------------------------------------------------
# Target-risk mode
# ------------------------------------------------------------------------------------------------


def clopper_pearson_upper(errors, trials, level_delta: float):
    """One-sided Clopper-Pearson upper bound on a binomial error rate: the largest p with
    P(Binomial(trials, p) <= errors) >= level_delta, i.e. the (1 - level_delta) quantile of
    Beta(errors + 1, trials - errors); 1 when errors == trials. Works on arrays."""
    e = np.asarray(errors, dtype=np.float64)
    n = np.asarray(trials, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        bound = beta_distribution.ppf(1.0 - level_delta, e + 1.0, np.maximum(n - e, 1e-300))
    return np.where(e >= n, 1.0, bound)


def selective_risk_threshold(confidence, correct, alpha: float, delta: float, *, escalated=None,
                             row_weights=None) -> dict:
    """The lowest confidence threshold whose auto-accepted rows have risk <= alpha w.p. >= 1 - delta.

    Args:
        confidence: float [N] calibrated confidence of the calibration rows.
        correct: bool [N], whether the predicted class equals the label.
        alpha: target error rate among auto-accepted rows, in [0, 1].
        delta: allowed probability that the guarantee fails, in (0, 1).
        escalated: optional bool [N], rows other triggers escalate anyway; they are never
            auto-accepted, so they neither count as accepted nor spend the risk.
        row_weights: optional non-negative float [N] (feedback's Horvitz-Thompson and age weights):
            the accepted rows' risk is then the weighted error share, and the bound is taken at
            Kish's effective sample size n_eff = (sum w)^2 / sum w^2 with n_eff * risk errors (a
            weighted sample is worth n_eff independent rows; unit weights give n and e exactly).

    Auto-accepted at threshold t: rows with confidence >= t that are not escalated (a NaN
    confidence is never accepted). Candidates are the distinct confidences of those rows. For a
    candidate with n accepted rows and e errors, the selective risk is bounded by the one-sided
    Clopper-Pearson upper bound U(e, n, delta') (see :func:`clopper_pearson_upper`).

    Search and multiple testing: as in Geifman & El-Yaniv (2017), "Selective classification for
    deep neural networks" (SGR), a binary search walks from the median candidate towards the
    lowest threshold that passes (U <= alpha), with at most k = ceil(log2(K + 1)) tests for K
    candidates (K + 1 outcomes, including "accept nothing"). Each test is run at
    delta' = delta / k, so by the union bound the probability that any tested threshold passes
    while its true risk exceeds alpha is at most delta, and the returned one (which passed) has
    risk <= alpha with probability >= 1 - delta. Why this and not a scan of all K candidates:
    the scan would need delta / K (Bonferroni), far more conservative than delta / log2 K;
    the binary search is exact when risk grows as the threshold falls, and stays valid (only less
    tight) when it does not, since it only ever returns a threshold that passed its own test.
    Caveat shared with SGR: candidates are the sample's own confidences, so each test is
    conditional on its threshold; the repeated-split test in tests/test_thresholds.py checks the
    guarantee empirically.

    Returns a report: ``threshold`` (auto-accept rows with confidence >= this; +inf when
    ``feasible`` is False: escalate everything rather than raise), ``coverage`` (share of all rows
    auto-accepted), ``accepted_rows``, ``errors``, ``empirical_risk`` (errors / accepted) and
    ``risk_bound`` (the Clopper-Pearson bound at ``delta_per_test``) of the accepted rows (NaN
    when none), ``tests`` (binary-search steps budgeted, ``delta_per_test = delta / tests``),
    ``rows`` and ``eligible_rows`` (finite confidence, not escalated by other triggers).
    """
    c = _scores(confidence, "confidence")
    rows = c.shape[0]
    ok = _mask(correct, "correct", rows)
    a = _fraction(alpha, "alpha", low_open=False, high_open=False)
    d = _fraction(delta, "delta", low_open=True, high_open=True)
    skip = _mask(escalated, "escalated", rows) if escalated is not None else np.zeros(rows, dtype=bool)

    eligible = ~np.isnan(c) & ~skip
    order = np.argsort(-c[eligible], kind="stable")
    conf_sorted = c[eligible][order]
    wrong_cum = np.cumsum(~ok[eligible][order])
    # Last position of each distinct confidence (descending): accepting c >= v takes the prefix
    # up to the last row equal to v.
    ends = np.flatnonzero(np.append(conf_sorted[1:] != conf_sorted[:-1], True)) if conf_sorted.size else np.zeros(0, np.int64)
    candidates = conf_sorted[ends]
    accepted = ends + 1
    errors = wrong_cum[ends]
    if row_weights is not None:
        w = _scores(row_weights, "row_weights", rows)
        if not (np.isfinite(w).all() and (w >= 0).all()):
            raise ValueError("row_weights: expected finite non-negative weights, found others")
        we = w[eligible][order]
        mass, square = np.cumsum(we)[ends], np.cumsum(we * we)[ends]
        wrong_mass = np.cumsum(we * ~ok[eligible][order])[ends]
        with np.errstate(invalid="ignore", divide="ignore"):
            n_eff = np.where(square > 0, mass * mass / np.where(square > 0, square, 1.0), 0.0)
            risk = np.where(mass > 0, wrong_mass / np.where(mass > 0, mass, 1.0), 0.0)
        accepted, errors = n_eff, n_eff * risk
    count = candidates.shape[0]
    tests = max(1, math.ceil(math.log2(count + 1)))
    delta_per_test = d / tests

    # Thresholds accepting fewer than n_min rows cannot pass even with no error, since the bound
    # with e = 0 is 1 - delta'**(1/n). Leaving them out of the search makes the bound fall, then
    # rise, along the candidates rather than rise, fall and rise (a band of passing thresholds
    # that a binary search from the median can miss entirely). It only removes tests.
    if 0 < a < 1:
        n_min = math.ceil(math.log(delta_per_test) / math.log1p(-a) - 1e-9)
    else:
        n_min = 1 if a >= 1 else accepted.shape[0] + 1 if accepted.size else 1
    start = int(np.searchsorted(accepted, n_min))

    # Binary search for the largest index j (lowest threshold) that passes; index start - 1
    # means "accept nothing" and passes trivially.
    lo, hi = start - 1, count - 1
    tested = 0
    while lo < hi:
        mid = (lo + hi + 1) // 2
        bound = float(clopper_pearson_upper(errors[mid], accepted[mid], delta_per_test))
        tested += 1
        if bound <= a:
            lo = mid
        else:
            hi = mid - 1
    assert tested <= tests, "binary search ran more tests than the correction budgeted"

    report = {
        "feasible": lo >= start, "alpha": a, "delta": d, "tests": tests, "delta_per_test": delta_per_test,
        "rows": rows, "eligible_rows": int(eligible.sum()),
        "method": "binary search over calibration confidences, Clopper-Pearson bound at delta / tests",
    }
    coverage_of = (lambda j: float(accepted[j]) / rows) if row_weights is None else \
        (lambda j: float(mass[j]) / float(w.sum()))
    if lo < start:
        logger.warning(
            "target risk: no confidence threshold bounds the risk of %d eligible rows by %.4g at delta %.4g; "
            "escalating everything", int(eligible.sum()), a, d,
        )
        return {**report, "threshold": math.inf, "coverage": 0.0, "accepted_rows": 0, "errors": 0,
                "empirical_risk": math.nan, "risk_bound": math.nan}
    n_acc, n_err = (int(accepted[lo]), int(errors[lo])) if row_weights is None else (float(accepted[lo]), float(errors[lo]))
    return {
        **report, "threshold": float(candidates[lo]), "coverage": coverage_of(lo), "accepted_rows": n_acc,
        "errors": n_err, "empirical_risk": n_err / n_acc if n_acc else math.nan,
        "risk_bound": float(clopper_pearson_upper(n_err, n_acc, delta_per_test)),
    }


def target_risk_thresholds(inputs: RuleInputs, tables: CategoryTables, correct, alpha: float, delta: float,
                           *, others: Thresholds, row_weights=None) -> tuple[Thresholds, dict]:
    """``others`` with the confidence threshold of the target-risk mode
    (:func:`selective_risk_threshold`), and its report. The rows the rule escalates whatever the
    confidence threshold (the other triggers at ``others``, and category floors alone: the rule
    at a confidence threshold of 0) are never auto-accepted, so they do not spend the risk."""
    fired = fire_triggers(inputs, dataclasses.replace(others, confidence=0.0, per_class_confidence=None), tables)
    report = selective_risk_threshold(
        inputs.confidence, correct, alpha, delta, escalated=fired.model().cpu().numpy(), row_weights=row_weights,
    )
    return dataclasses.replace(others, confidence=report["threshold"], per_class_confidence=None), report


# ------------------------------------------------------------------------------------------------
# The configured choice
# ------------------------------------------------------------------------------------------------


def choose_thresholds(inputs: RuleInputs, tables: CategoryTables, correct, selection: ThresholdSelection,
                      *, row_weights=None, split=None, watch_radius: float | None = None) -> tuple[Thresholds, dict]:
    """The thresholds ``selection`` asks for on these calibration rows, and the chooser's report
    (with ``mode``). In target-risk mode the anomaly threshold lets ``ood_pass_rate`` of the rows
    with an embedding pass and the mutual-information threshold is its ``disagreement_quantile``
    (1 turns it off); budget mode fits all three.

    Feedback's refit passes ``row_weights`` (each row's weight in the traffic: see
    :func:`budget_thresholds`; the quantiles of target-risk mode are then weighted quantiles),
    ``split`` (the one it re-chose, instead of ``selection.split``) and ``watch_radius``."""
    if selection.mode == "budget":
        chosen, report = budget_thresholds(inputs, tables, selection.budget, selection.split if split is None else split,
                                           vote_floor=selection.vote_floor, row_weights=row_weights, watch_radius=watch_radius)
        return chosen, {"mode": "budget", **report}
    t_ood = math.inf
    if inputs.ood_score is not None:
        ood = _float64(inputs.ood_score)
        scored = ~np.isnan(ood)
        t_ood = (ood_threshold(ood[scored], selection.ood_pass_rate) if row_weights is None else
                 _weighted_quantile(ood[scored], _scores(row_weights, "row_weights")[scored], selection.ood_pass_rate))
    t_mi = math.inf
    if inputs.members > 1 and selection.disagreement_quantile < 1:
        mi = _float64(inputs.mutual_info)
        t_mi = (float(np.quantile(mi, selection.disagreement_quantile)) if row_weights is None else
                _weighted_quantile(mi, _scores(row_weights, "row_weights"), selection.disagreement_quantile))
    others = Thresholds(confidence=0.0, mutual_info=t_mi, vote_floor=selection.vote_floor, ood=t_ood,
                        watch_radius=watch_radius)
    chosen, report = target_risk_thresholds(inputs, tables, correct, selection.target_risk, selection.delta,
                                            others=others, row_weights=row_weights)
    return chosen, {"mode": "target_risk", **report}


def _weighted_quantile(values: np.ndarray, weights: np.ndarray, q: float) -> float:
    """The smallest value v with weight(values <= v) >= q * total weight (the inverted-CDF
    quantile of :func:`ood_threshold`, weighted; NaN values never pass); +inf when none."""
    keep = ~np.isnan(values)
    order = np.argsort(values[keep], kind="stable")
    v, cumulative = values[keep][order], np.cumsum(weights[keep][order])
    total = float(weights.sum())
    at = int(np.searchsorted(cumulative, q * total - 1e-9 * total, side="left"))
    return float(v[at]) if at < v.shape[0] else math.inf


__all__ = [
    "TRIGGERS",
    "budget_thresholds",
    "choose_thresholds",
    "clopper_pearson_upper",
    "escalation_rates",
    "ood_threshold",
    "selective_risk_threshold",
    "target_risk_thresholds",
]
