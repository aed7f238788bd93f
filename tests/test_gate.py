"""`triage gate`: a frozen gate set of reviewed items, and a candidate checked on it per slice.

Oracles: the final labels are the verdicts this test submitted (one reviewer per item, so the
label is the verdict's); accuracies are recounted here per (source, class, reason) from the
verdicts; intervals come from scipy's own binomial test (``binomtest(...).proportion_ci``,
exact Clopper-Pearson) for unit weights and from the Beta quantiles written out here for the
audit slices' effective counts; the slice rule is the one serve/gate.py's docstring states."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from scipy import stats

from hitl_triage.serve.gate import GateThresholds, check, load_gate_set, snapshot
from hitl_triage.serve.queue import QueueOptions, open_queue
from hitl_triage.serve.queue.gold import GoldPool

from queue_fixtures import decision_batch
from test_cli import run_cli

BITS = {1: "confidence", 2: "disagreement", 4: "policy", 8: "anomaly", 16: "audit", 32: "reported"}


@pytest.fixture(scope="module")
def reviewed(tmp_path_factory):
    """A SQLite queue whose items all have a final verdict, and what each verdict said."""
    rng = np.random.default_rng(1717)
    d = tmp_path_factory.mktemp("gate")
    url = f"sqlite:///{d / 'review.db'}"
    decisions, predictions = decision_batch(rng, 1500, escalate_share=0.8, audit_only_share=0.2)
    # audit weights that differ between rows, so the audit slices' effective size is not their count
    weight = np.where(decisions.column("reason_mask").to_numpy() & 16, rng.choice([5.0, 20.0, 50.0], 1500), 0.0)
    decisions = decisions.set_column(decisions.schema.get_field_index("audit_weight"), "audit_weight",
                                     pa.array(weight.astype(np.float32)))
    truth = {}
    # Gold items (known answers mixed in to check the reviewers) are reviewed too, and left out.
    gold_decisions, gold_predictions = decision_batch(rng, 200, start=900_000, escalate_share=1.0, uri=False)
    gold_predictions = gold_predictions.append_column("label", pa.array(rng.integers(0, 4, 200).astype(np.int32)))
    with open_queue(url, QueueOptions(gold_share=0.1)) as queue:
        queue.gold = GoldPool(gold_decisions, gold_predictions)
        queue.enqueue(decisions, predictions)
        rows = {r["id"]: r for r in decisions.to_pylist() if r["escalate"]}
        verdicts = []
        for tier in ("general", "specialist"):
            for item in queue.claim(tier, "r", n=5000).to_pylist():
                label = int(rng.integers(4))
                predicted = rows[item["id"]]["predicted_class"] if item["id"] in rows else item["predicted_class"]
                action = "confirm" if label == predicted else "correct"
                verdicts.append({"id": item["id"], "reviewer": "r", "tier": tier, "action": action, "label": label})
                if item["id"] in rows:
                    row = rows[item["id"]]
                    truth[row["id"]] = (label, row["source"], int(row["reason_mask"]), float(row["audit_weight"]))
        queue.submit(verdicts)
        assert len(verdicts) > len(rows) == len(truth)  # gold items among them
        gold_reviewed = queue.verdicts().column("gold_label").null_count < len(verdicts)
        gate_set = snapshot(queue, "edge-test")
    path = d / "edge-test.parquet"
    assert run_cli("gate", "snapshot", "--queue", url, "--name", "edge-test", "--out", path)[0] == 0
    assert gold_reviewed
    return d, url, gate_set, truth, path


def candidate(ids, predicted) -> pa.Table:
    return pa.table({"id": pa.array(ids, pa.string()), "predicted_class": pa.array(predicted, pa.int32())})


def right_answers(truth):
    ids = sorted(truth)
    return ids, [truth[i][0] for i in ids]


def test_snapshot_is_every_reviewed_item_frozen_with_its_hash(reviewed):
    d, url, gate_set, truth, path = reviewed
    written = load_gate_set(path)  # checks the hash
    assert sorted(written.column("id").to_pylist()) == sorted(truth) == written.column("id").to_pylist()
    assert dict(zip(written.column("id").to_pylist(), written.column("final_label").to_pylist())) == \
        {i: t[0] for i, t in truth.items()}
    assert written.column("final_label").to_pylist() == gate_set.column("final_label").to_pylist()
    info = json.loads(written.schema.metadata[b"hitl_triage.gate_set"])
    assert info["name"] == "edge-test" and info["rows"] == len(truth) and len(info["hash"]) == 64
    # Same rows, same hash (the in-memory snapshot and the one the command wrote).
    assert json.loads(gate_set.schema.metadata[b"hitl_triage.gate_set"])["hash"] == info["hash"]


def test_passes_a_candidate_that_gets_them_right_and_fails_one_that_gets_the_edge_cases_wrong(reviewed, tmp_path):
    d, url, gate_set, truth, path = reviewed
    ids, labels = right_answers(truth)
    good, bad = tmp_path / "good.parquet", tmp_path / "bad.parquet"
    pq.write_table(candidate(ids, labels), good)
    # Wrong on every anomaly edge case (another class), right on everything else.
    wrong = [(lab + 1) % 4 if truth[i][2] & 8 else lab for i, lab in zip(ids, labels)]
    pq.write_table(candidate(ids, wrong), bad)
    code, text = run_cli("gate", "--gate-set", path, "--predictions", good, "--report", tmp_path / "good.json")
    assert code == 0 and "GATE PASS" in text
    code, text = run_cli("gate", "--gate-set", path, "--predictions", bad, "--report", tmp_path / "bad.json")
    assert code == 1 and "GATE FAIL" in text
    slices = {(s["source"], s["class"], s["reason"]): s for s in json.loads((tmp_path / "bad.json").read_text())["slices"]}
    assert slices[("*", "*", "anomaly")]["status"] == "FAIL" and slices[("*", "*", "anomaly")]["accuracy"] == 0.0
    for reason in ("confidence", "disagreement"):  # rows escalated only for these stay right
        assert slices[("*", "*", reason)]["accuracy"] == pytest.approx(_share_right(truth, wrong, ids, reason))
    # The same check against the queue as it is now (not frozen) gives the same verdicts.
    code, text = run_cli("gate", "--queue", url, "--predictions", bad)
    assert code == 1 and "GATE FAIL" in text


def _share_right(truth, predicted, ids, reason):
    bit = {v: k for k, v in BITS.items()}[reason]
    rows = [(truth[i][0] == p) for i, p in zip(ids, predicted) if truth[i][2] & bit]
    return sum(rows) / len(rows)


def test_every_slice_recounted_with_scipy_intervals(reviewed, rng):
    d, url, gate_set, truth, path = reviewed
    ids, labels = right_answers(truth)
    right = {"cam-0": 0.99, "cam-1": 0.9, "cam-2": 0.6}  # a source the candidate is bad at
    noisy = [lab if rng.random() < right[truth[i][1]] else (lab + 1 + int(rng.integers(3))) % 4
             for i, lab in zip(ids, labels)]
    thresholds = GateThresholds(min_accuracy=0.85, confidence=0.9, min_rows=8)
    result = check(gate_set, candidate(ids, noisy), thresholds)
    members: dict = {}
    for i, p in zip(ids, noisy):
        label, source, mask, weight = truth[i]
        for bit, reason in BITS.items():
            if mask & bit:
                for key in ((source, str(label), reason), ("*", "*", reason)):
                    members.setdefault(key, []).append((label == p, weight if reason == "audit" else 1.0))
    got = {(s["source"], s["class"], s["reason"]): s for s in result.slices.to_pylist()}
    assert set(got) == set(members)
    alpha = 0.1
    for key, rows in members.items():
        correct = np.array([c for c, _ in rows], dtype=float)
        w = np.array([x for _, x in rows])
        s = got[key]
        accuracy = (w * correct).sum() / w.sum()
        assert s["rows"] == len(rows) and s["accuracy"] == pytest.approx(accuracy, abs=1e-12)
        if (w == w[0]).all():  # unit (or equal) weights: scipy's exact interval on the counts
            ci = stats.binomtest(int(correct.sum()), len(rows)).proportion_ci(confidence_level=0.9, method="exact")
            lower, upper = ci.low, ci.high
        else:  # effective counts, Clopper-Pearson's Beta quantiles
            n = w.sum() ** 2 / (w * w).sum()
            k = accuracy * n
            lower = stats.beta.ppf(alpha / 2, k, n - k + 1) if k > 0 else 0.0
            upper = stats.beta.ppf(1 - alpha / 2, k + 1, n - k) if k < n else 1.0
        assert s["lower"] == pytest.approx(lower, abs=1e-9) and s["upper"] == pytest.approx(upper, abs=1e-9), key
        if len(rows) >= 8 and lower >= 0.85:
            expected = "PASS"
        elif len(rows) >= 8 and upper < 0.85:
            expected = "FAIL"
        else:
            expected = "INSUFFICIENT"
        assert s["status"] == expected, key
    statuses = set(result.slices.column("status").to_pylist())
    assert statuses == {"PASS", "FAIL", "INSUFFICIENT"}  # the draw reached every verdict


def test_insufficient_slices_never_pass(reviewed):
    d, url, gate_set, truth, path = reviewed
    ids, labels = right_answers(truth)
    few = gate_set.slice(0, 12)  # twelve items: every slice too small to show 0.9
    result = check(few, candidate(ids, labels), GateThresholds(min_accuracy=0.9, min_rows=1))
    assert set(result.slices.column("status").to_pylist()) == {"INSUFFICIENT"}
    assert result.status == "INSUFFICIENT" and not result.passed and result.exit_code == 1
    # With every slice decidable but one too small, on_insufficient = "fail" fails the gate.
    full = check(gate_set, candidate(ids, labels), GateThresholds(on_insufficient="fail"))
    assert "INSUFFICIENT" in full.slices.column("status").to_pylist() and full.status == "FAIL"
    assert check(gate_set, candidate(ids, labels)).status == "PASS"
    # A queue with nothing reviewed yet: an empty gate set, which never passes.
    with open_queue(f"sqlite:///{d / 'empty.db'}") as queue:
        empty = snapshot(queue, "nothing-yet")
    assert empty.num_rows == 0
    nothing = check(empty, candidate([], []))
    assert nothing.status == "INSUFFICIENT" and nothing.exit_code == 1 and nothing.slices.num_rows == 0


def test_bad_input_names_the_field(reviewed, tmp_path, capsys):
    d, url, gate_set, truth, path = reviewed
    ids, labels = right_answers(truth)
    cases = {
        "no-class": (pa.table({"id": ids, "label": labels}), "predicted_class"),
        "missing": (candidate(ids[1:], labels[1:]), f"id: expected a prediction for every gate-set item, found 1 of {len(ids)} missing (first '{ids[0]}')"),
        "range": (candidate(ids, [9] + labels[1:]), "predicted_class: expected a class in [0, 4), found 9"),
        "float": (pa.table({"id": ids, "predicted_class": np.array(labels, float)}), "predicted_class: expected integers"),
        "repeated": (candidate(ids + ids[:1], labels + labels[:1]), "id: expected each id once"),
    }
    for name, (table, message) in cases.items():
        pq.write_table(table, tmp_path / f"{name}.parquet")
        code, _ = run_cli("gate", "--gate-set", path, "--predictions", tmp_path / f"{name}.parquet")
        assert code == 2 and message in capsys.readouterr().err, name
    good = tmp_path / "good.parquet"
    pq.write_table(candidate(ids, labels), good)
    # A gate set changed after its snapshot is refused (frozen), and a name is never rewritten.
    table = pq.read_table(path)
    changed = table.set_column(table.schema.get_field_index("final_label"), "final_label",
                               pa.array([(x + 1) % 4 for x in table.column("final_label").to_pylist()], pa.int32()))
    pq.write_table(changed, tmp_path / "changed.parquet")
    assert run_cli("gate", "--gate-set", tmp_path / "changed.parquet", "--predictions", good)[0] == 2
    assert "changed after its snapshot" in capsys.readouterr().err
    assert run_cli("gate", "snapshot", "--queue", url, "--name", "edge-test", "--out", path)[0] == 2
    assert "frozen" in capsys.readouterr().err
    assert run_cli("gate", "--gate-set", path, "--predictions", good, "--min-accuracy", "1.5")[0] == 2
    assert "gate.min_accuracy: expected an accuracy in [0, 1], found 1.5" in capsys.readouterr().err
