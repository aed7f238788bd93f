"""Simulated reviewers (serve/sim/reviewers.py) working a real SQLite queue. Oracles: the truth
mapping drawn here, the queue's own verdict export, and binomial bounds on the error counts."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from hitl_triage.serve.queue import QueueOptions, open_queue
from hitl_triage.serve.sim.reviewers import SimReviewer, truth_labels, work_queue

from queue_fixtures import decision_batch


def filled_queue(tmp_path, rng, rows=1200, **options):
    decisions, predictions = decision_batch(rng, rows, escalate_share=0.6, audit_only_share=0.2)
    queue = open_queue(f"sqlite:///{tmp_path / 'q.db'}", QueueOptions(**options))
    queue.enqueue(decisions, predictions)
    truth = {i: int(rng.integers(-1, 4)) for i in decisions.column("id").to_pylist()}
    return queue, decisions, truth


def test_accurate_reviewers_answer_the_truth_blind_or_not(tmp_path, rng):
    queue, decisions, truth = filled_queue(tmp_path, rng)
    crew = [SimReviewer("ann", "general"), SimReviewer("sam", "specialist")]
    counts = work_queue(queue, crew, truth, batch=50)
    verdicts = queue.verdicts().to_pylist()
    assert counts["stored"] == len(verdicts) == int(np.sum(decisions.column("escalate").to_numpy(zero_copy_only=False)))
    blind = 0
    for v in verdicts:
        y = truth[v["id"]]
        blind += v["reason_mask"] == 16
        if y < 0:
            assert v["action"] == "out_of_scope", v
        else:
            assert v["label"] == y and v["action"] == ("confirm" if y == v["predicted_class"] else "correct"), v
    assert blind > 20  # blind audit items were answered (confirm or correct found by the queue)
    queue.close()


@pytest.mark.parametrize("rate", [0.1, 0.3, 0.75])
def test_error_rate_is_what_was_asked(tmp_path, rng, rate):
    queue, decisions, truth = filled_queue(tmp_path, rng, rows=2000)
    truth = {k: abs(v) for k, v in truth.items()}  # known classes only: a wrong answer is a wrong label
    work_queue(queue, [SimReviewer("r", "general", error_rate=rate, seed=3), SimReviewer("s", "specialist", error_rate=rate)],
               truth)
    verdicts = queue.verdicts().to_pylist()
    wrong = sum(v["label"] != truth[v["id"]] for v in verdicts)
    lo, hi = stats.binom.ppf([1e-4, 1 - 1e-4], len(verdicts), rate)
    assert lo <= wrong <= hi, (wrong, len(verdicts), rate)
    queue.close()


def test_error_rate_ramps_and_arguments_are_checked():
    r = SimReviewer("d", "general", error_rate=0.05, error_rate_end=0.45, ramp_verdicts=200)
    assert r.error_at(0) == pytest.approx(0.05) and r.error_at(100) == pytest.approx(0.25)
    assert r.error_at(10_000) == pytest.approx(0.45)
    with pytest.raises(ValueError, match="error_rate: expected a probability"):
        SimReviewer("x", "general", error_rate=1.5)
    with pytest.raises(KeyError, match="p-0"):
        import pyarrow as pa
        SimReviewer("x", "general").answer(pa.table({"id": ["p-0"], "predicted_class": [1], "classes": [4]}), {})


def test_escalations_move_items_up_and_truth_tables_merge(tmp_path, rng):
    import pyarrow as pa
    queue, decisions, truth = filled_queue(tmp_path, rng, rows=600)
    crew = [SimReviewer("a", "general", escalate_share=0.5), SimReviewer("b", "specialist"), SimReviewer("c", "adjudicator")]
    counts = work_queue(queue, crew, truth)
    assert counts["moved"] > 0
    final = {}
    for v in queue.verdicts().to_pylist():
        final[v["id"]] = v
    assert all(v["action"] != "escalate" for v in final.values())  # every item ended at a tier that settled it
    merged = truth_labels(pa.table({"id": ["x", "y"], "label": [1, -1]}), {"y": 2})
    assert merged == {"x": 1, "y": 2}
    queue.close()
