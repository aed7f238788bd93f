"""Monitoring statistics (engine/monitoring_*.py) against independent references and simulated
truth: the audited-accuracy interval's coverage over 200 seeded repetitions, kappa against
scikit-learn and a direct Fleiss formula, kappa of agreeing and of random simulated reviewers
on a real queue's overlap items, a drifting simulated source raising its alert while the others
stay quiet, a reviewer whose error rate rises flagged and an accurate one not, and the merge of
two replicas equal to the statistics of the union."""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow as pa
import pytest
from sklearn.metrics import cohen_kappa_score

from hitl_triage.engine.monitoring_estimators import (
    audit_sums, audited_accuracy, cohen_kappa, fleiss_item_agreement, fleiss_kappa, label_free_accuracy, psi,
)
from hitl_triage.engine.monitoring_report import AlertConfig, compute
from hitl_triage.engine.monitoring_stats import MonitorStats, StatsConfig, verdict_sums
from hitl_triage.serve.queue import QueueOptions, open_queue
from hitl_triage.serve.sim.reviewers import SimReviewer, work_queue

from queue_fixtures import decision_batch

# -- audited accuracy ----------------------------------------------------------------------------------


def audit_population(rng, n=20_000):
    """Auto-accepted rows in four strata with their own audit rates and accuracies, an
    overconfident calibrated confidence, and the Bernoulli audit draw."""
    stratum = rng.integers(0, 4, n)
    rate = np.array([0.005, 0.01, 0.02, 0.05])[stratum]
    p_correct = np.array([0.97, 0.9, 0.8, 0.6])[stratum]
    correct = rng.random(n) < p_correct
    confidence = np.clip(p_correct + 0.06 + rng.normal(0, 0.03, n), 0, 1)  # 6 points overconfident
    audited = rng.random(n) < rate
    return 1.0 / rate, correct, confidence, audited


def sums_of(weight, correct, confidence):
    return {k: float(v.sum()) for k, v in audit_sums(weight, correct, confidence).items()}


def test_audited_accuracy_interval_covers_the_truth_in_200_repetitions():
    covered = corrected_covered = 0
    errors, label_free_errors = [], []
    for seed in range(200):
        rng = np.random.default_rng(seed)
        weight, correct, confidence, audited = audit_population(rng)
        truth = correct.mean()  # the accuracy of this day's auto-accepted rows
        s = sums_of(weight[audited], correct[audited], confidence[audited])
        est = audited_accuracy(s)
        cbpe, bias, corrected = label_free_accuracy(float(confidence.sum()), len(confidence), s)
        covered += est.low <= truth <= est.high
        corrected_covered += corrected.low <= truth <= corrected.high
        errors.append(corrected.value - truth)
        label_free_errors.append(cbpe - truth)
    assert covered >= 180 and corrected_covered >= 180, (covered, corrected_covered)
    # the label-free estimate is about 5 points off (6 of overconfidence, less where clipped at 1);
    # the audit measures that bias and removes it
    assert np.mean(label_free_errors) > 0.04
    assert abs(np.mean(errors)) < 0.005


def test_audited_accuracy_covers_a_simulated_days_truth_with_simulated_reviewers():
    """The simulator's own day (OOD rows, a drifting source, calibrated ensemble confidence): the
    rows above a confidence floor are auto-accepted, audited per source at its own rate, and an
    accurate simulated reviewer answers each audit item from the truth; 200 audit draws."""
    from hitl_triage.serve.sim import FleetConfig, generate_fleet_with_truth

    cfg = FleetConfig(rows=40_000, sources=4, dim=16, seed=2, calibration_rows=0, bank_rows=0)
    batch, truth = next(generate_fleet_with_truth(cfg, 40_000))
    z = batch.column("logits").flatten().flatten().to_numpy().reshape(-1, cfg.members, cfg.classes) / 2.4
    e = np.exp(z - z.max(-1, keepdims=True))
    p = (e / e.sum(-1, keepdims=True)).mean(1)
    predicted, confidence = p.argmax(1), p.max(1)
    label = truth.column("label").to_numpy()
    auto = confidence >= 0.6
    source = np.array(batch.column("source").to_pylist())
    rate = np.select([source == s for s in cfg.source_names], [0.01, 0.02, 0.05, 0.08])
    true_accuracy = float((predicted == label)[auto].mean())
    ids = np.array(batch.column("id").to_pylist())
    reviewer = SimReviewer("auditor", "general")
    covered = 0
    for seed in range(200):
        audited = auto & (np.random.default_rng(seed).random(len(rate)) < rate)
        items = pa.table({"id": ids[audited], "predicted_class": pa.array(predicted[audited], pa.int32()),
                          "classes": np.full(int(audited.sum()), cfg.classes)})
        answers = reviewer.answer(items, dict(zip(ids[audited], label[audited].tolist())))
        correct = np.array([a["action"] == "confirm" for a in answers], float)
        est = audited_accuracy(sums_of(1 / rate[audited], correct, confidence[audited]))
        covered += est.low <= true_accuracy <= est.high
    assert covered >= 180, covered


def test_audit_sums_reject_bad_weights():
    with pytest.raises(ValueError, match="audit_weight: expected 1 / rate >= 1"):
        audit_sums(np.array([0.5]), np.array([1.0]), np.array([0.9]))
    with pytest.raises(ValueError, match="audit_weight"):
        audit_sums(np.array([np.nan]), np.array([1.0]), np.array([0.9]))


def test_audit_through_a_verdict_table_equals_the_direct_sums():
    rng = np.random.default_rng(7)
    weight, correct, confidence, audited = audit_population(rng, 5000)
    n = int(audited.sum())
    predicted = rng.integers(0, 4, n)
    label = np.where(correct[audited], predicted, (predicted + 1) % 4)
    table = pa.table({
        "id": [f"a-{i}" for i in range(n)], "label": pa.array(label, pa.int32()), "reviewer": ["r"] * n,
        "tier": ["general"] * n, "action": ["correct"] * n, "ts": pa.array(np.zeros(n), pa.float64()),
        "reason_mask": pa.array(np.full(n, 16), pa.uint8()), "predicted_class": pa.array(predicted, pa.int32()),
        "confidence": pa.array(confidence[audited], pa.float64()), "audit_weight": pa.array(weight[audited], pa.float64()),
        "source": ["cam"] * n, "enqueued_at": np.zeros(n),
    })
    stats = MonitorStats(StatsConfig(classes=4)).update_verdicts(table)
    got = compute(stats)["accuracy"]["sources"]["cam"]["audited"]
    want = audited_accuracy(sums_of(weight[audited], correct[audited], confidence[audited]))
    assert got["value"] == pytest.approx(want.value, rel=1e-12) and got["se"] == pytest.approx(want.se, rel=1e-9)


# -- agreement -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("k,n", [(2, 50), (5, 400), (11, 1000)])
def test_cohen_kappa_equals_scikit_learn(k, n):
    rng = np.random.default_rng(k * n)
    a = rng.integers(0, k, n)
    b = np.where(rng.random(n) < 0.6, a, rng.integers(0, k, n))
    m = np.zeros((k, k))
    np.add.at(m, (a, b), 1)
    assert cohen_kappa(m).value == pytest.approx(cohen_kappa_score(a, b), abs=1e-12)


def naive_fleiss(ratings: list[list[int]], k: int) -> float:
    """Fleiss (1971), equations 1-5, item by item."""
    n_items = len(ratings)
    counts = np.array([[r.count(j) for j in range(k)] for r in ratings], float)
    per_item = [sum(c * (c - 1) for c in row) / (row.sum() * (row.sum() - 1)) for row in counts]
    p_j = counts.sum(0) / counts.sum()
    p_bar = sum(per_item) / n_items
    pe = sum(p * p for p in p_j)
    return (p_bar - pe) / (1 - pe)


@pytest.mark.parametrize("raters", [2, 3, 7])
def test_fleiss_kappa_equals_the_direct_formula(raters):
    rng = np.random.default_rng(raters)
    k = 4
    truth = rng.integers(0, k, 300)
    ratings = [[int(t) if rng.random() < 0.7 else int(rng.integers(0, k)) for _ in range(raters)] for t in truth]
    counts = np.array([[r.count(j) for j in range(k)] for r in ratings])
    p = fleiss_item_agreement(counts)
    got = fleiss_kappa(len(ratings), float(p.sum()), float((p * p).sum()), counts.sum(0))
    assert got.value == pytest.approx(naive_fleiss(ratings, k), abs=1e-12)
    assert got.low < got.value < got.high


@pytest.mark.parametrize("error_rate,expect", [(0.0, 1.0), (0.75, 0.0)])
def test_kappa_of_simulated_reviewers_on_overlap_items(tmp_path, error_rate, expect):
    rng = np.random.default_rng(11)
    decisions, predictions = decision_batch(rng, 1000, escalate_share=0.5, tiers=("general", "general"))
    queue = open_queue(f"sqlite:///{tmp_path / 'q.db'}", QueueOptions(overlap={"general": 1.0}))
    queue.enqueue(decisions, predictions)
    truth = {i: int(rng.integers(0, 4)) for i in decisions.column("id").to_pylist()}
    crew = [SimReviewer("ann", "general", error_rate, seed=1), SimReviewer("bo", "general", error_rate, seed=2),
            SimReviewer("adj", "adjudicator")]
    work_queue(queue, crew, truth)
    agreement = compute(MonitorStats(StatsConfig(classes=4)).update_verdicts(queue.verdicts()))["agreement"]
    queue.close()
    cohen, fleiss = agreement["cohen"]["general|general"], agreement["fleiss"]["general"]
    assert cohen["n"] > 400
    if expect == 1.0:  # agreeing reviewers
        assert cohen["value"] == pytest.approx(1.0) and fleiss["value"] == pytest.approx(1.0)
    else:  # random answers (error (C-1)/C): chance agreement, within 4 standard errors of 0
        for k in (cohen, fleiss):
            assert abs(k["value"]) <= 4 * k["se"] and k["se"] < 0.04 and k["low"] < k["value"] < k["high"], k
    assert "adjudicator|general" in agreement["cohen"] or expect == 1.0  # disagreements went to the adjudicator


# -- reviewer drift -------------------------------------------------------------------------------------


def gold_verdicts(reviewers, windows=10, per_window=60, seed=0) -> pa.Table:
    """Gold verdicts of simulated reviewers, ``per_window`` gold items each per window (window w
    at ts = w), answered by :meth:`SimReviewer.answer` on items like the queue's."""
    rng = np.random.default_rng(seed)
    rows = []
    for w in range(windows):
        for r in reviewers:
            ids = [f"g-{r.name}-{w}-{i}" for i in range(per_window)]
            gold = rng.integers(0, 5, per_window)
            predicted = np.where(rng.random(per_window) < 0.8, gold, rng.integers(0, 5, per_window))
            items = pa.table({"id": ids, "predicted_class": pa.array(predicted, pa.int32()), "classes": [5] * per_window})
            for answer, g, p in zip(r.answer(items, dict(zip(ids, gold.tolist()))), gold, predicted):
                rows.append({**answer, "ts": float(w), "gold_label": int(g), "predicted_class": int(p),
                             "reason_mask": 1, "source": "gold", "audit_weight": 0.0, "confidence": 0.9,
                             "enqueued_at": float(w)})
    return pa.Table.from_pylist(rows)


def first_flag(table: pa.Table, name: str, windows: int) -> int | None:
    ts = table.column("ts").to_numpy()
    for w in range(1, windows):
        stats = MonitorStats(StatsConfig(classes=5, window_s=1.0)).update_verdicts(table.filter(pa.array(ts <= w)))
        if compute(stats)["reviewers"][name]["drifting"]:
            return w
    return None


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_reviewer_whose_error_rises_is_flagged_and_an_accurate_one_is_not(seed):
    # 60 gold items a window each; "drift" goes from 5% to 50% errors over the 600 verdicts
    steady = SimReviewer("steady", "general", error_rate=0.05, seed=seed)
    drift = SimReviewer("drift", "general", error_rate=0.05, error_rate_end=0.5, ramp_verdicts=600, seed=seed)
    table = gold_verdicts([steady, drift], seed=seed)
    assert first_flag(table, "steady", 10) is None
    flagged = first_flag(table, "drift", 10)
    assert flagged is not None and flagged <= 7, flagged  # by window 7: at most 37% errors then
    out = compute(MonitorStats(StatsConfig(classes=5, window_s=1.0)).update_verdicts(table))
    assert [a["reviewer"] for a in out["alerts"] if a["kind"] == "reviewer_drift"] == ["drift"]
    assert out["reviewers"]["steady"]["gold"]["low"] <= 0.95 <= out["reviewers"]["steady"]["gold"]["high"]


# -- data drift -----------------------------------------------------------------------------------------


def sim_decisions(batch: pa.RecordBatch, bank: np.ndarray, members: int, classes: int, dim: int) -> pa.Table:
    """The decision columns drift needs, in numpy: calibrated ensemble confidence and class
    (T = 2.4, about what `triage fit` finds on this world) and the 5th-NN distance to the bank."""
    z = batch.column("logits").flatten().flatten().to_numpy().reshape(batch.num_rows, members, classes) / 2.4
    e = np.exp(z - z.max(-1, keepdims=True))
    p = (e / e.sum(-1, keepdims=True)).mean(1)
    x = batch.column("embedding").flatten().to_numpy().reshape(batch.num_rows, dim)
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    ood = np.partition(np.sqrt(np.maximum(2 - 2 * x @ bank.T, 0)), 4, axis=1)[:, 4]
    n = batch.num_rows
    return pa.table({"escalate": np.zeros(n, bool), "reason_mask": np.zeros(n, np.uint8), "tier": pa.nulls(n, pa.string()),
                     "predicted_class": p.argmax(1).astype(np.int32), "confidence": p.max(1).astype(np.float32),
                     "ood_score": ood.astype(np.float32), "valid": np.ones(n, bool), "source": batch.column("source")})


def test_a_drifting_source_raises_its_alert_while_the_others_stay_quiet():
    from hitl_triage.serve.sim import FleetConfig, generate_bank_batches, generate_calibration_batches, generate_fleet_with_truth

    # 16 batches of 4000 rows through one day; cam-002 drifts from batch 4 (a quarter of the day)
    cfg = FleetConfig(rows=64_000, sources=4, dim=32, seed=0, calibration_rows=8000, bank_rows=2000, drift_source=2,
                      drift_start=0.25, drift_strength=3.0, burst_ood_share=0.0)
    bank = next(generate_bank_batches(cfg, 100_000)).column("embedding").flatten().to_numpy().reshape(-1, cfg.dim)
    bank = bank / np.linalg.norm(bank, axis=1, keepdims=True)
    decide = lambda b: sim_decisions(b, bank, cfg.members, cfg.classes, cfg.dim)  # noqa: E731
    reference = decide(next(generate_calibration_batches(cfg, 100_000)))
    threshold = float(np.quantile(reference.column("ood_score").to_numpy(), 0.95))
    stats = MonitorStats(StatsConfig(classes=cfg.classes, window_s=1.0, ood_threshold=threshold)).set_reference(reference)
    alarms = {}
    for i, (batch, _truth) in enumerate(generate_fleet_with_truth(cfg, 4000)):
        stats.update(decide(batch), float(i))
        for alert in compute(stats)["alerts"]:
            alarms.setdefault(alert.get("source", alert["kind"]), i)
    assert set(alarms) == {"cam-002"}, alarms      # the others never alert, nor the fleet
    assert 4 <= alarms["cam-002"] <= 14, alarms    # within 10 batches of the drift's start


def test_psi_is_zero_for_equal_histograms_and_grows_with_the_shift():
    ref = np.array([100, 200, 300, 400.0])
    assert psi(ref, ref)[0] == pytest.approx(0.0, abs=1e-12) and psi(ref, ref)[1] == pytest.approx(1.0)
    shifted = [psi(np.roll(ref, k) * 3, ref)[0] for k in range(1, 3)]
    p, q = (np.roll(ref, 1) + 0.5) / (ref.sum() + 2), (ref + 0.5) / (ref.sum() + 2)
    assert shifted[0] == pytest.approx(float(np.sum((p - q) * np.log(p / q))), rel=1e-2)
    assert math.isnan(psi(np.zeros(4), ref)[0])


# -- merge ----------------------------------------------------------------------------------------------


def close(a, b, path="") -> None:
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            close(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            close(x, y, f"{path}[{i}]")
    elif isinstance(a, float):
        assert (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, rel=1e-9, abs=1e-12), (path, a, b)
    else:
        assert a == b, (path, a, b)


def test_merge_of_two_replicas_equals_the_union(tmp_path):
    rng = np.random.default_rng(5)
    config = StatsConfig(classes=4, window_s=10.0, keep_windows=3, reference_windows=1)
    union, a, b = MonitorStats(config), MonitorStats(config), MonitorStats(config)
    queue = open_queue(f"sqlite:///{tmp_path / 'q.db'}", QueueOptions(overlap={"general": 0.4}))
    for i in range(8):  # 8 batches over 8 windows: the middle ones pruned alike
        decisions, predictions = decision_batch(rng, int(rng.integers(1, 900)), start=10_000 * i, audit_only_share=0.3)
        queue.enqueue(decisions, predictions)
        union.update(decisions, 10.0 * i + 1)
        (a if rng.random() < 0.5 else b).update(decisions, 10.0 * i + 1)
    truth = {f"p-{i}": int(rng.integers(-1, 4)) for i in range(80_000)}
    work_queue(queue, [SimReviewer("r1", "general", 0.2), SimReviewer("r2", "general", 0.2),
                       SimReviewer("s", "specialist", 0.1), SimReviewer("j", "adjudicator")], truth)
    verdicts = queue.verdicts()
    queue.close()
    union.update_verdicts(verdicts)
    ids = np.array(verdicts.column("id").to_pylist())
    side = np.array([hash(i) % 2 for i in ids]) == 0  # split by item, every verdict of an item on one side
    a.update_verdicts(verdicts.filter(pa.array(side)))
    b.update_verdicts(verdicts.filter(pa.array(~side)))
    merged = a.merge(b)
    assert len(union.windows()) == 4 and merged.windows() == union.windows()
    assert merged.decisions.keys() == union.decisions.keys() and merged.verdicts.keys() == union.verdicts.keys()
    close(compute(merged), compute(union))
    close(compute(MonitorStats.from_json(json.loads(json.dumps(merged.to_json())))), compute(union))
    assert verdict_sums(verdicts.slice(0, 0), config) == {}


def test_a_span_limits_the_rates_to_the_latest_windows():
    rng = np.random.default_rng(9)
    config = StatsConfig(classes=4, window_s=1.0)
    everything, latest = MonitorStats(config), MonitorStats(config)
    for w in range(5):
        decisions, _ = decision_batch(rng, 300, start=1000 * w, escalate_share=0.1 + 0.15 * w)
        everything.update(decisions, float(w))
        if w >= 3:
            latest.update(decisions, float(w))
    spanned, direct = compute(everything, span=2), compute(latest)
    for part in ("fleet", "sources", "slices"):
        close(spanned[part], direct[part])
    assert compute(everything)["fleet"]["rows"] == 1500 and spanned["fleet"]["rows"] == 600
    with pytest.raises(ValueError, match="span: expected a number of windows >= 1"):
        compute(everything, span=0)
