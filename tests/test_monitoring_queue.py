"""Gold items and blind review in the review queue (serve/queue/gold.py and the monitoring parts
of both backends), on SQLite and a real redis-server. Oracles: the pool's own labels, the id hash
drawn again here, counts made by hand, and simulated reviewers' known error rates."""

from __future__ import annotations

import datetime as dt
import time

import numpy as np
import pyarrow as pa
import pytest

from hitl_triage.engine.monitoring_report import compute
from hitl_triage.engine.monitoring_stats import MonitorStats, StatsConfig
from hitl_triage.kernels import audit_uniform
from hitl_triage.serve.queue import QueueError, QueueOptions, open_queue
from hitl_triage.serve.queue.gold import BLIND_SEED, GoldPool
from hitl_triage.serve.sim.reviewers import SimReviewer, work_queue

from queue_fixtures import decision_batch, escalated_ids, queue_url, redis_url  # noqa: F401  (fixtures)


def gold_pool(rng, rows=300) -> tuple[GoldPool, dict]:
    """A pool from labelled rows (the calibration data's part), with its labels by prediction id."""
    decisions, predictions = decision_batch(rng, rows, start=900_000, escalate_share=0.5, uri=False)
    labels = rng.integers(0, 4, rows).astype(np.int32)
    predictions = predictions.append_column("label", pa.array(labels)).append_column(
        "ts_input", pa.array([dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc)] * rows, pa.timestamp("ms", tz="UTC")))
    return GoldPool(decisions, predictions), dict(zip(predictions.column("id").to_pylist(), labels.tolist()))


def test_blind_share_hides_the_prediction_of_the_drawn_items_and_the_export_says_so(queue_url, rng):
    decisions, predictions = decision_batch(rng, 1500, escalate_share=0.5, audit_only_share=0.1)
    with open_queue(queue_url, QueueOptions(blind_share=0.3)) as queue:
        queue.enqueue(decisions, predictions)
        items = pa.concat_tables([queue.claim(t, "r", n=5000, lease=0.3) for t in ("general", "specialist")])
        ids = items.column("id")
        drawn = np.asarray(audit_uniform(ids.combine_chunks(), BLIND_SEED)) < 0.3
        audit_only = items.column("reason_mask").to_numpy() == 16
        blind = items.column("blind").to_numpy(zero_copy_only=False)
        assert np.array_equal(blind, drawn | audit_only)
        assert 0.24 < drawn.mean() < 0.36
        assert items.filter(pa.array(blind)).column("predicted_class").null_count == int(blind.sum())
        assert items.filter(pa.array(~blind)).column("predicted_class").null_count == 0
        truth = {i: int(rng.integers(0, 4)) for i in decisions.column("id").to_pylist()}
    time.sleep(0.4)  # r's leases expire: the crew gets every item
    with open_queue(queue_url, QueueOptions(blind_share=0.3)) as queue:
        work_queue(queue, [SimReviewer("a", "general"), SimReviewer("b", "specialist")], truth)
        export = queue.verdicts()
    by_id = dict(zip(ids.to_pylist(), blind.tolist()))
    assert export.column("blind").to_pylist() == [by_id[i] for i in export.column("id").to_pylist()]
    overrides = compute(MonitorStats(StatsConfig(classes=4)).update_verdicts(export))["overrides"]["by_view"]
    assert overrides["blind"]["verdicts"] == int(blind.sum()) and overrides["shown"]["verdicts"] == int((~blind).sum())


def test_gold_items_make_their_share_of_each_tier_look_like_the_rest_and_keep_their_answer(queue_url, rng):
    pool, labels = gold_pool(rng)
    options = QueueOptions(gold_share=0.2)
    real = 0
    with open_queue(queue_url, options) as queue:
        queue.gold = pool
        for i in range(6):
            decisions, predictions = decision_batch(rng, 500, start=1000 * i, uri=False)
            predictions = predictions.append_column("ts_input", pa.array(
                [dt.datetime(2025, 6, 2, i, tzinfo=dt.timezone.utc)] * 500, pa.timestamp("ms", tz="UTC")))
            queue.enqueue(decisions, predictions)
            real += len(escalated_ids(decisions))
            assert queue.enqueue(decisions, predictions) == 0  # re-sent: the same gold items, stored once
        items = {t: queue.claim(t, "r", n=10_000) for t in ("general", "specialist")}
        claimed = pa.concat_tables(items.values())
        verdicts = [{"id": r["id"], "reviewer": "r", "tier": r["tier"], "action": "out_of_scope"} for r in claimed.to_pylist()]
        queue.submit(verdicts)
        export = queue.verdicts()
    gold_rows = [g is not None for g in export.column("gold_label").to_pylist()]
    n_gold = sum(gold_rows)
    # about share / (1 - share) of the real items, tier by tier
    assert claimed.num_rows == real + n_gold
    assert abs(n_gold - real * 0.25) < 4 * np.sqrt(real * 0.25), (n_gold, real)
    for tier, table in items.items():
        gold_here = [g is not None for g, t in zip(export.column("gold_label").to_pylist(), export.column("tier").to_pylist()) if t == tier]
        assert 0.1 < np.mean(gold_here) < 0.3, (tier, np.mean(gold_here))
        assert table.schema == claimed.schema  # same columns for gold and real items
    # a gold item's answer is the label of the calibration row it came from (found by its logits)
    for row, is_gold in zip(export.to_pylist(), gold_rows):  # the time of the traffic they came with
        assert row["ts_input"].year == 2025, (is_gold, row["ts_input"])  # the pool's rows are from 2024
    label_of_logits = {str(lg): labels[i] for i, lg in zip(pool.predictions.column("id").to_pylist(),
                                                         pool.predictions.column("logits").to_pylist())}
    for row, is_gold in zip(export.to_pylist(), gold_rows):
        if is_gold:
            assert row["gold_label"] == label_of_logits[str(row["logits"])]
    gold_ids = [i for i, g in zip(export.column("id").to_pylist(), gold_rows) if g]
    assert all(len(i) == 32 for i in gold_ids) and not set(gold_ids) & set(f"p-{k}" for k in range(6000))
    assert all(m != 16 for m, g in zip(export.column("reason_mask").to_pylist(), gold_rows) if g)  # never an audit sample


def test_gold_options_are_checked():
    with pytest.raises(QueueError, match=r"queue.gold_share: expected a share in \[0, 1\), found 1.5"):
        QueueOptions(gold_share=1.5).check()
    with pytest.raises(QueueError, match="queue.blind_share"):
        QueueOptions(blind_share=-0.1).check()
    with pytest.raises(ValueError, match="gold pool: expected a 'label' column"):
        d, p = decision_batch(np.random.default_rng(0), 10)
        GoldPool(d, p)


def test_a_drifting_reviewer_is_flagged_from_gold_items_in_the_queue(queue_url, rng):
    pool, _ = gold_pool(rng)
    labels = dict(zip(pool.decisions.column("id").to_pylist(), pool.labels.tolist()))
    crew = [SimReviewer("steady", "general", error_rate=0.05, seed=1),
            SimReviewer("drift", "general", error_rate=0.05, error_rate_end=0.6, ramp_verdicts=500, seed=2),
            SimReviewer("s", "specialist", seed=3)]
    with open_queue(queue_url, QueueOptions(gold_share=0.3)) as queue:
        queue.gold = pool
        truth: dict[str, int] = {}
        for w in range(8):  # a window per round: a batch in, the crew works it
            decisions, predictions = decision_batch(rng, 300, start=1000 * w, escalate_share=0.7, uri=False)
            truth.update({i: int(rng.integers(0, 4)) for i in decisions.column("id").to_pylist()})
            queue.enqueue(decisions, predictions)
            gold_draws = [pool.draw(t, 400, str(decisions.column("id")[0].as_py())) for t in ("general", "specialist")]
            for _, _, got in gold_draws:  # the world knows the gold answers (the reviewers do not)
                truth.update(got)
            work_queue(queue, crew, truth, batch=16, ts=100.0 * w)
        export = queue.verdicts()
    out = compute(MonitorStats(StatsConfig(classes=4, window_s=100.0)).update_verdicts(export))
    reviewers = out["reviewers"]
    assert reviewers["drift"]["drifting"] and not reviewers["steady"]["drifting"], reviewers
    assert reviewers["steady"]["gold"]["n"] >= 40
    assert [a["reviewer"] for a in out["alerts"] if a["kind"] == "reviewer_drift"] == ["drift"]
