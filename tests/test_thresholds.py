"""Threshold selection: anomaly quantile, review budget, target risk, escalation rates.

Independent references: numpy's quantile, masks written out by hand, scipy's exact binomial
confidence interval, and a generative model whose selective risk is known in closed form.
"""

from __future__ import annotations

import dataclasses
import math
import sys

import numpy as np
import pytest
from scipy.stats import binom, binomtest

import torch

from hitl_triage.engine.config import PolicyConfig, TierConfig
from hitl_triage.engine.policy import CategoryTables, RuleInputs, Thresholds
from hitl_triage.engine.config import ThresholdSelection
from hitl_triage.engine.thresholds import (
    budget_thresholds,
    choose_thresholds,
    clopper_pearson_upper,
    escalation_rates,
    ood_threshold,
    selective_risk_threshold,
    target_risk_thresholds,
)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def signals(rng, rows, *, members=5):
    """Calibration-like signals with realistic overlaps: low confidence comes with high mutual
    information more often than not, and out-of-distribution rows are a little less confident."""
    ood = rng.gamma(2.0, 0.5, rows)
    confidence = np.clip(rng.beta(6, 1.5, rows) - 0.05 * ood, 0.1, 1.0)
    mutual_info = np.abs(0.4 * (1 - confidence) + rng.normal(0, 0.05, rows)) if members > 1 else np.zeros(rows)
    votes = np.clip(np.round((confidence + rng.normal(0, 0.1, rows)) * members) / members, 1 / members, 1.0)
    return confidence, mutual_info, ood, votes


# ------------------------------------------------------------------------------------------------
# Anomaly threshold
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rows", [1, 7, 1000, 1001])
@pytest.mark.parametrize("rate", [0.5, 0.9, 0.95, 0.999, 1.0])
def test_ood_threshold_is_the_inverted_cdf_quantile(rows, rate, rng):
    scores = rng.normal(size=rows)
    t = ood_threshold(scores, rate)
    assert t == np.quantile(scores, rate, method="inverted_cdf")
    # The smallest score that lets at least `rate` of rows pass.
    assert np.mean(scores <= t) >= rate - 1e-12
    below = scores[scores < t]
    if below.size:
        assert np.mean(scores <= below.max()) < rate


def test_ood_threshold_pass_rate_holds_on_fresh_in_distribution_data(rng):
    t = ood_threshold(rng.gamma(2.0, 1.0, 20_000), 0.95)
    fresh = np.mean(rng.gamma(2.0, 1.0, 20_000) <= t)
    # Fresh pass rate = F(t); F(t) moves by ~sqrt(.95 * .05 / 20000) = 0.0015 with the fit sample
    # and the fresh one each: 5 standard deviations of the difference is 0.011.
    assert abs(fresh - 0.95) < 5 * math.sqrt(2 * 0.95 * 0.05 / 20_000)


def test_ood_threshold_counts_nan_as_failing(rng):
    scores = rng.normal(size=1000)
    scores[:20] = np.nan
    t = ood_threshold(scores, 0.95)
    passed = np.sum(scores <= t)  # NaN <= t is False
    assert passed >= 950 and passed == math.ceil(0.95 * 1000)
    scores[:80] = np.nan  # 8% NaN: 95% cannot pass
    assert ood_threshold(scores, 0.95) == math.inf


def test_ood_threshold_rejects_bad_input():
    with pytest.raises(ValueError, match="pass_rate"):
        ood_threshold(np.ones(3), 0.0)
    with pytest.raises(ValueError, match="in_distribution_scores: expected at least one"):
        ood_threshold(np.array([]), 0.9)
    with pytest.raises(ValueError, match="one-dimensional"):
        ood_threshold(np.ones((2, 2)), 0.9)


# ------------------------------------------------------------------------------------------------
# Escalation rates
# ------------------------------------------------------------------------------------------------


def oracle_masks(th, c, mi=None, ood=None, votes=None, predicted=None):
    """The trigger conventions written out in numpy (the module docstring): NaN never passes."""
    t_conf = np.asarray(th.confidence, np.float64)
    if getattr(th, "per_class_confidence", None) is not None:
        t_conf = np.asarray(th.per_class_confidence, np.float64)[predicted]
    with np.errstate(invalid="ignore"):
        conf = ~(c >= t_conf)
        dis = np.zeros(len(c), bool)
        if mi is not None and th.mutual_info < math.inf:
            dis |= ~(mi <= th.mutual_info)
        if votes is not None and th.vote_floor > 0:
            dis |= ~(votes >= th.vote_floor)
        anomaly = np.zeros(len(c), bool) if ood is None or th.ood == math.inf else ~(ood <= th.ood)
    return {"confidence": conf, "disagreement": dis, "anomaly": anomaly}


NO_CATEGORIES = CategoryTables.build(PolicyConfig(), TierConfig(), "cpu")


def inputs_of(c, mi=None, ood=None, votes=None, predicted=None, category_code=None):
    """The rule's inputs from float32 copies of numpy signals; a row with a NaN signal is an
    invalid row, as the signal kernel reports it. ``mi=None``: M = 1; ``ood=None``: no bank."""
    rows = len(c)
    f32 = lambda a: torch.from_numpy(np.asarray(a, np.float32))  # noqa: E731
    valid = ~np.isnan(c) & (np.ones(rows, bool) if mi is None else ~np.isnan(mi))
    valid &= np.ones(rows, bool) if votes is None else ~np.isnan(votes)
    return RuleInputs(
        confidence=f32(c), mutual_info=f32(np.zeros(rows) if mi is None else mi),
        vote_agreement=f32(np.ones(rows) if votes is None else votes),
        predicted_class=torch.from_numpy(np.zeros(rows, np.int32) if predicted is None else predicted.astype(np.int32)),
        valid=torch.from_numpy(valid), ood_score=None if ood is None else f32(ood),
        category_code=None if category_code is None else torch.from_numpy(category_code),
        audit_sampled=torch.zeros(rows, dtype=torch.bool), members=1 if mi is None else 5, classes=10,
    )


def rule_rates(th, c, mi=None, ood=None, votes=None, predicted=None):
    """``escalation_rates`` (the engine's rule) on the signals."""
    return escalation_rates(inputs_of(c, mi, ood, votes, predicted), th, NO_CATEGORIES)


def f32_signals(rng, rows, **kwargs):
    """:func:`signals` rounded to float32, the precision the rule compares in."""
    return tuple(a.astype(np.float32).astype(np.float64) for a in signals(rng, rows, **kwargs))


def test_rates_come_from_the_rule_and_nan_never_passes(rng):
    c, mi, ood, votes = (a.astype(np.float32).astype(np.float64) for a in signals(rng, 500))
    c[3], mi[4], ood[5], votes[6] = np.nan, np.nan, np.nan, np.nan
    th = Thresholds(confidence=0.7, mutual_info=0.1, ood=2.0, vote_floor=0.6)
    masks = oracle_masks(th, c, mi, ood, votes)
    invalid = np.isnan(c) | np.isnan(mi) | np.isnan(votes)
    # An invalid row fires every model trigger that could fire; a NaN distance (no embedding)
    # fires the anomaly trigger.
    masks["confidence"] |= invalid
    masks["disagreement"] |= invalid
    rates = rule_rates(th, c, mi, ood, votes)
    union = masks["confidence"] | masks["disagreement"] | masks["anomaly"]
    assert rates["union_before_policy_and_audit"] == union.mean()
    for name in ("confidence", "disagreement", "anomaly"):
        assert rates[name] == masks[name].mean(), name
    # Triggers that are off never fire, except ANOMALY for rows without an embedding, which the
    # bank could not vouch for (the engine's documented rule): M = 1, anomaly threshold off.
    clean = ~np.isnan(c)
    off = rule_rates(Thresholds(confidence=0.7), c[clean], None, np.where(np.arange(clean.sum()) < 7, np.nan, 1.0))
    assert off["disagreement"] == 0.0 and off["anomaly"] == 7 / clean.sum()


def test_rates_apply_per_class_confidence(rng):
    c, mi, _, _ = (a.astype(np.float32).astype(np.float64) for a in signals(rng, 300))
    predicted = rng.integers(0, 3, 300)
    th = Thresholds(confidence=0.5, mutual_info=0.2, vote_floor=0.0, ood=math.inf, per_class_confidence=[0.6, 0.7, 0.8])
    rates = rule_rates(th, c, mi, None, None, predicted)
    expected = c < np.array([0.6, 0.7, 0.8], np.float32)[predicted]
    assert rates["confidence"] == expected.mean()


# ------------------------------------------------------------------------------------------------
# Budget mode
# ------------------------------------------------------------------------------------------------


def budget(c, mi=None, ood=None, b=0.1, split=(0.5, 0.25, 0.25), *, votes=None, vote_floor=0.0,
           category_code=None, tables=NO_CATEGORIES):
    """``budget_thresholds`` on numpy signals: the thresholds, the report, and the rule's rates."""
    inputs = inputs_of(c, mi, ood, votes, category_code=category_code)
    chosen, report = budget_thresholds(inputs, tables, b, split, vote_floor=vote_floor)
    return chosen, report, escalation_rates(inputs, chosen, tables)


@pytest.mark.parametrize("b", [0.02, 0.1, 0.3])
@pytest.mark.parametrize("split", [(0.5, 0.25, 0.25), (1, 1, 1), (0.2, 0.0, 0.8)])
def test_budget_union_rate_holds_on_fresh_data(b, split, rng):
    rows = 20_000
    c, mi, ood, _ = f32_signals(rng, rows)
    chosen, report, rates = budget(c, mi, ood, b, split)
    # On the calibration rows the union lands within one row of the budget (continuous scores).
    assert abs(report["union_rate"] - b) <= 1.5 / rows
    assert report["union_rate"] == rates["union_before_policy_and_audit"]
    # Solo rates keep the split's proportions: each is floor(share * s * b * N) rows.
    for name, share in report["shares"].items():
        assert abs(rates[name] - share * report["scale"] * b) <= 1.0 / rows, name
    assert report["scale"] >= 1.0  # overlaps only ever push s up
    # The oracle agrees with the rule on these rows, and on fresh rows the union holds.
    masks = oracle_masks(chosen, c, mi, ood)
    assert (masks["confidence"] | masks["disagreement"] | masks["anomaly"]).mean() == report["union_rate"]
    fresh_c, fresh_mi, fresh_ood, _ = signals(rng, rows)
    fresh_masks = oracle_masks(chosen, fresh_c, fresh_mi, fresh_ood)
    fresh_union = (fresh_masks["confidence"] | fresh_masks["disagreement"] | fresh_masks["anomaly"]).mean()
    # Fresh union rate = the thresholds' true rate (within ~sqrt(b(1-b)/N) of b, from fitting)
    # plus the fresh sample's own binomial noise: 5 standard deviations of both.
    tolerance = 5 * math.sqrt(2 * b * (1 - b) / rows)
    assert abs(fresh_union - b) < tolerance, (fresh_union, b, tolerance)


def test_budget_triggers_without_data_hand_their_share_on(rng):
    c, mi, ood, _ = f32_signals(rng, 5000, members=1)
    # M = 1 (no mutual information) and no bank: the confidence trigger takes the whole budget.
    alone, report, rates = budget(c, None, None, 0.1)
    assert report["shares"] == {"confidence": 1.0, "disagreement": 0.0, "anomaly": 0.0}
    assert alone.mutual_info == math.inf and alone.ood == math.inf
    assert rates["confidence"] == pytest.approx(0.1, abs=1 / 5000)
    assert np.mean(c < alone.confidence) == report["union_rate"]
    # All-zero mutual information (what M = 1 signals look like) cannot rank rows either.
    _, zeros, _ = budget(c, mi, ood, 0.1, split=(0.5, 0.25, 0.25))
    assert zeros["shares"] == {"confidence": pytest.approx(2 / 3), "disagreement": 0.0, "anomaly": pytest.approx(1 / 3)}
    with pytest.raises(ValueError, match="split: expected a positive weight"):
        budget(c, None, None, 0.1, split=(0, 1, 0))


def test_budget_counts_invalid_rows_low_votes_and_missing_embeddings_as_firing(rng):
    rows = 10_000
    c, mi, ood, votes = f32_signals(rng, rows)
    c[:150] = np.nan      # invalid rows
    ood[150:200] = np.nan  # missing embeddings
    chosen, report, _ = budget(c, mi, ood, 0.1, votes=votes, vote_floor=0.4)
    assert 0 < np.mean(votes < 0.4) < 0.05  # some rows fire on their votes alone
    masks = oracle_masks(chosen, c, mi, ood, votes)
    union = masks["confidence"] | masks["disagreement"] | masks["anomaly"]
    assert union[:200].all()
    assert report["union_rate"] == union.mean()
    assert abs(report["union_rate"] - 0.1) <= 1.5 / rows
    # A budget below what fires regardless: nothing more fires, and the result says how much.
    _, tight, _ = budget(c, mi, ood, 0.01)
    assert tight["scale"] == 0.0 and tight["union_rate"] == pytest.approx(200 / rows)


def test_budget_counts_category_floors_in_its_union(rng):
    """A category floor raises the confidence threshold of its rows above the fitted one: the
    bisection counts those rows, so the union the rule fires still lands on the budget."""
    rows = 10_000
    c, mi, ood, _ = f32_signals(rng, rows)
    tables = CategoryTables.build(PolicyConfig(category_min_confidence={"medical": 0.95}), TierConfig(), "cpu")
    code = np.where(rng.random(rows) < 0.1, 1, 0).astype(np.int64)  # 10% of rows are "medical"
    chosen, report, rates = budget(c, mi, ood, 0.15, category_code=code, tables=tables)
    floor_rows = (code == 1) & (c < 0.95)
    assert floor_rows.mean() > 0.02  # the floor alone fires on a real share of rows
    masks = oracle_masks(chosen, c, mi, ood)
    union = masks["confidence"] | masks["disagreement"] | masks["anomaly"] | floor_rows
    assert report["union_rate"] == union.mean() == rates["union_before_policy_and_audit"]
    assert abs(report["union_rate"] - 0.15) <= 1.5 / rows
    # Without the floors the same budget gives looser thresholds: the floors spent part of it.
    plain, _, _ = budget(c, mi, ood, 0.15)
    assert plain.confidence > chosen.confidence


def test_budget_zero_and_one(rng):
    c, mi, ood, _ = f32_signals(rng, 2000)
    assert budget(c, mi, ood, 0.0)[1]["union_rate"] == 0.0
    assert budget(c, mi, ood, 1.0)[1]["union_rate"] == 1.0


def test_budget_with_tied_scores_gets_as_close_as_the_data_allow(rng):
    # Votes-like confidence on 5 levels: the union can only move in big steps.
    rows = 5000
    c = rng.choice([0.2, 0.4, 0.6, 0.8, 1.0], size=rows, p=[0.05, 0.05, 0.1, 0.3, 0.5]).astype(np.float32).astype(np.float64)
    _, report, _ = budget(c, None, None, 0.12)
    achievable = [np.mean(c < t) for t in np.array([0.2, 0.4, 0.6, 0.8, 1.0], np.float32)]
    assert report["union_rate"] == min(achievable, key=lambda r: abs(r - 0.12))


def test_budget_report_is_toml_and_bad_input_is_named(rng):
    import tomli_w

    c, mi, ood, _ = f32_signals(rng, 1000)
    chosen, report, _ = budget(c, None, ood, 0.1)
    back = tomllib.loads(tomli_w.dumps(report))
    assert chosen.mutual_info == math.inf and back["shares"]["disagreement"] == 0.0
    with pytest.raises(ValueError, match="budget"):
        budget(c, mi, ood, 1.5)
    with pytest.raises(ValueError, match="split"):
        budget(c, mi, ood, 0.1, split=(1, -1, 0))
    with pytest.raises(ValueError, match="vote_floor"):
        budget(c, mi, ood, 0.1, vote_floor=2.0)


# ------------------------------------------------------------------------------------------------
# Target-risk mode
# ------------------------------------------------------------------------------------------------


def test_clopper_pearson_matches_scipy_exact_interval():
    for errors, trials, delta in [(0, 10, 0.05), (3, 50, 0.01), (49, 50, 0.1), (50, 50, 0.05), (120, 4000, 0.002)]:
        # The two-sided exact interval at level 1 - 2 delta has the one-sided bound as its top.
        expected = binomtest(errors, trials).proportion_ci(confidence_level=1 - 2 * delta, method="exact").high
        assert float(clopper_pearson_upper(errors, trials, delta)) == pytest.approx(expected, rel=1e-9)


def calibrated_rows(rng, rows, low=0.6):
    """Confidence ~ Uniform(low, 1), correct ~ Bernoulli(confidence). The selective risk of
    threshold t >= low is E[1 - C | C >= t] = (1 - t) / 2 exactly."""
    c = rng.uniform(low, 1.0, rows)
    return c, rng.random(rows) < c


def true_risk(t):
    return (1.0 - t) / 2.0


def test_guarantee_holds_across_repeated_splits(rng):
    alpha, delta, splits, rows = 0.08, 0.1, 200, 5000
    violations, naive_violations, coverages = 0, 0, []
    for k in range(splits):
        c, ok = calibrated_rows(rng, 2 * rows)
        half = rng.permutation(2 * rows)[:rows]
        escalated = (rng.random(rows) < 0.1) if k % 2 else None  # other triggers, at random
        chosen = selective_risk_threshold(c[half], ok[half], alpha, delta, escalated=escalated)
        assert chosen["feasible"]
        violations += true_risk(chosen["threshold"]) > alpha
        coverages.append(chosen["coverage"])
        # The same search with no bound (empirical risk <= alpha) shows the test can fail.
        order = np.sort(c[half])[::-1]
        emp = np.cumsum(~ok[half][np.argsort(-c[half])]) / np.arange(1, rows + 1)
        naive_t = order[np.flatnonzero(emp <= alpha).max()]
        naive_violations += true_risk(naive_t) > alpha
    # If the guarantee holds, violations ~ Binomial(200, p) with p <= delta; its 0.999 quantile
    # (34 for delta = 0.1) is the slack: a correct method fails this at most 1 time in 1000.
    slack = binom.ppf(0.999, splits, delta)
    assert violations <= slack, (violations, slack)
    assert naive_violations > slack, "the naive threshold should violate often: otherwise this test has no power"
    # Not vacuous: the threshold accepts a real share of traffic (the ideal t = 0.84 accepts 40%).
    assert np.mean(coverages) > 0.2


def test_held_out_empirical_risk_stays_within_the_bound(rng):
    # The held-out error rate among accepted rows rarely exceeds alpha by more than its own noise.
    alpha, delta = 0.08, 0.1
    exceed = 0
    for _ in range(50):
        c, ok = calibrated_rows(rng, 20_000)
        chosen = selective_risk_threshold(c[:10_000], ok[:10_000], alpha, delta)
        accepted = c[10_000:] >= chosen["threshold"]
        held_out = 1 - ok[10_000:][accepted].mean()
        exceed += held_out > alpha
    # True risk <= alpha w.p. >= 0.9 and the bound keeps it well below; the held-out estimate
    # then exceeds alpha in few of 50 runs: Binomial(50, 0.1)'s 0.999 quantile is 13.
    assert exceed <= binom.ppf(0.999, 50, delta)


def test_returned_threshold_passed_its_test_and_rows_are_counted(rng):
    c, ok = calibrated_rows(rng, 3000)
    c[:30] = np.nan
    escalated = np.zeros(3000, dtype=bool)
    escalated[30:330] = True
    chosen = selective_risk_threshold(c, ok, 0.08, 0.05, escalated=escalated)
    accepted = (c >= chosen["threshold"]) & ~escalated  # NaN >= t is False
    assert chosen["accepted_rows"] == accepted.sum() and chosen["errors"] == (~ok[accepted]).sum()
    assert chosen["coverage"] == accepted.sum() / 3000 and chosen["eligible_rows"] == 3000 - 330
    assert chosen["tests"] == math.ceil(math.log2(np.unique(c[30:][~escalated[30:]]).size + 1))
    expected = binomtest(int(chosen["errors"]), int(chosen["accepted_rows"])).proportion_ci(
        confidence_level=1 - 2 * chosen["delta_per_test"], method="exact").high
    assert chosen["risk_bound"] == pytest.approx(expected, rel=1e-9) and chosen["risk_bound"] <= 0.08


def test_infeasible_target_escalates_everything(rng):
    import tomli_w

    c, ok = calibrated_rows(rng, 500, low=0.3)
    chosen = selective_risk_threshold(c, ok, 0.001, 0.05)
    assert not chosen["feasible"] and chosen["threshold"] == math.inf and chosen["coverage"] == 0.0
    back = tomllib.loads(tomli_w.dumps(chosen))
    assert back["feasible"] is False and math.isnan(back["risk_bound"])
    empty = selective_risk_threshold(np.full(5, np.nan), np.ones(5, dtype=bool), 0.1, 0.1)
    assert not empty["feasible"]


def test_target_risk_rejects_bad_input(rng):
    c, ok = calibrated_rows(rng, 10)
    with pytest.raises(ValueError, match="delta"):
        selective_risk_threshold(c, ok, 0.1, 0.0)
    with pytest.raises(ValueError, match="alpha"):
        selective_risk_threshold(c, ok, 1.5, 0.1)
    with pytest.raises(TypeError, match="correct: expected booleans"):
        selective_risk_threshold(c, c, 0.1, 0.1)
    with pytest.raises(ValueError, match=r"escalated: expected shape \(10,\)"):
        selective_risk_threshold(c, ok, 0.1, 0.1, escalated=np.zeros(3, dtype=bool))


def test_target_risk_finds_a_passing_band_the_median_start_would_miss():
    """1000 rows sorted by confidence; the first 119 are right, then errors at ranks 120-130 and
    densely beyond 200. With alpha = 0.05, delta = 0.05 and ceil(log2 1001) = 10 tests
    (delta' = 0.005), accepting the top 104-119 rows passes (0 errors), fewer rows cannot pass
    even with no error (1 - 0.005**(1/n) > 0.05 for n < 104), more rows carry too many errors.
    A binary search started at the median walks into the small-n region and gives up; leaving
    the n < 104 candidates out of the search finds the band."""
    rows = 1000
    confidence = np.linspace(1.0, 0.0, rows, endpoint=False)
    correct = np.ones(rows, dtype=bool)
    correct[119:130] = False
    correct[200::2] = False
    result = selective_risk_threshold(confidence, correct, 0.05, 0.05)
    assert result["feasible"], result
    assert 104 <= result["accepted_rows"] <= 119 and result["errors"] == 0
    assert result["risk_bound"] <= 0.05


def test_target_risk_leaves_out_rows_the_rule_escalates_anyway(rng):
    """Rows that other triggers or a category floor escalate are never auto-accepted, so the
    risk search does not count them; the oracle names them by hand."""
    rows = 6000
    c, ok = calibrated_rows(rng, rows)
    c = c.astype(np.float32).astype(np.float64)
    mi = rng.gamma(1.0, 0.05, rows)
    ood = np.where(rng.random(rows) < 0.02, np.nan, rng.gamma(2.0, 0.5, rows))
    code = np.where(rng.random(rows) < 0.1, 1, 0).astype(np.int64)
    tables = CategoryTables.build(PolicyConfig(category_min_confidence={"medical": 0.97}), TierConfig(), "cpu")
    inputs = inputs_of(c, mi, ood, category_code=code)
    others = Thresholds(confidence=0.0, mutual_info=0.2, ood=2.5)
    chosen, report = target_risk_thresholds(inputs, tables, ok, 0.08, 0.05, others=others)
    mi32, ood32 = mi.astype(np.float32), ood.astype(np.float32)
    with np.errstate(invalid="ignore"):
        escalated = (mi32 > np.float32(0.2)) | ~(ood32 <= np.float32(2.5)) | ((code == 1) & (c < np.float32(0.97)))
    expected = selective_risk_threshold(c, ok, 0.08, 0.05, escalated=escalated)
    assert report == expected and report["eligible_rows"] == rows - escalated.sum()
    assert chosen == dataclasses.replace(others, confidence=expected["threshold"])


@pytest.mark.parametrize("mode", ["budget", "target_risk"])
def test_choose_thresholds_runs_the_configured_mode(mode, rng):
    rows = 4000
    c, ok = calibrated_rows(rng, rows)
    mi, ood = rng.gamma(1.0, 0.05, rows), rng.gamma(2.0, 0.5, rows)
    inputs = inputs_of(c, mi, ood)
    selection = ThresholdSelection(mode=mode, budget=0.2, ood_pass_rate=0.9, disagreement_quantile=0.95)
    chosen, report = choose_thresholds(inputs, NO_CATEGORIES, ok, selection)
    assert report["mode"] == mode
    if mode == "budget":
        assert (chosen, {k: v for k, v in report.items() if k != "mode"}) == budget_thresholds(inputs, NO_CATEGORIES, 0.2)
    else:
        ood32, mi32 = ood.astype(np.float32).astype(np.float64), mi.astype(np.float32).astype(np.float64)
        assert chosen.ood == ood_threshold(ood32, 0.9)
        assert chosen.mutual_info == np.quantile(mi32, 0.95)
        assert report["threshold"] == chosen.confidence and report["feasible"]
