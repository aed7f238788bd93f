"""The review queue's semantics, the same suite against every backend (SQLite and a real
redis-server started here). Oracles: the rows' own priorities sorted by numpy, ids counted by
hand, and the verdict rules written out in each test."""

from __future__ import annotations

import multiprocessing
import time

import numpy as np
import pyarrow as pa
import pytest

from hitl_triage.serve.queue import QueueError, QueueOptions, open_queue

from queue_fixtures import decision_batch, escalated_ids, redis_server

BACKENDS = ["sqlite", "redis"]


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    with redis_server(tmp_path_factory.mktemp("redis")) as url:
        yield url


@pytest.fixture(params=BACKENDS)
def queue_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'review.db'}"
    url = request.getfixturevalue("redis_url")
    redis = pytest.importorskip("redis")
    redis.Redis.from_url(url).flushall()
    return url


def opened(url, **options):
    return open_queue(url, QueueOptions(**options))


def test_enqueue_stores_each_escalated_row_once_with_its_prediction(queue_url, rng):
    decisions, predictions = decision_batch(rng, 500)
    expected = escalated_ids(decisions)
    with opened(queue_url) as queue:
        assert queue.enqueue(decisions, predictions) == len(expected)
        assert queue.enqueue(decisions, predictions) == 0  # the same batch again: nothing new
    with opened(queue_url) as other:  # a second writer (another replica) sends it too
        assert other.enqueue(decisions, predictions) == 0
        depth = sum(t["depth"] for t in other.stats()["tiers"].values())
        assert depth == len(expected)
        items = pa.concat_tables([other.claim(t, "r", n=1000) for t in ("general", "specialist")])
    assert sorted(items.column("id").to_pylist()) == sorted(expected)
    by_id = {r["id"]: r for r in items.to_pylist()}
    source = {r["id"]: r for r in decisions.to_pylist()}
    logits = dict(zip(predictions.column("id").to_pylist(), predictions.column("logits").to_pylist()))
    for item_id in expected:
        item = by_id[item_id]
        assert item["uri"] == f"s3://bucket/{item_id}.jpg"  # extra columns pass through
        assert item["logits"] == logits[item_id] or item["blind"]
        for name in ("tier", "reason_mask", "priority", "source", "profile_version", "audit_weight"):
            assert item[name] == source[item_id][name], name
        assert item["classes"] == 4 and item["deliveries"] == 1


def test_two_writers_at_once_store_each_item_once(queue_url, rng):
    batches = [decision_batch(rng, 400, start=i * 200) for i in range(6)]  # overlapping ids
    expected = set().union(*(escalated_ids(d) for d, _ in batches))
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(2) as pool:
        added = pool.starmap(_enqueue_all, [(queue_url, batches), (queue_url, batches[::-1])])
    with opened(queue_url) as queue:
        stats = queue.stats()["tiers"]
        assert sum(t["depth"] for t in stats.values()) == len(expected) == sum(added)


def _enqueue_all(url, batches):
    with opened(url) as queue:
        return sum(queue.enqueue(d, p) for d, p in batches)


def test_claims_come_in_priority_order_ties_in_arrival_order(queue_url, rng):
    rows = 300
    priorities = rng.choice([0.1, 0.5, 0.5, 0.9, 0.25], rows)  # many ties
    first = decision_batch(rng, rows, priorities=priorities, escalate_share=1.0, tiers=("general", "general"))
    second = decision_batch(rng, rows, start=rows, priorities=priorities, escalate_share=1.0, tiers=("general", "general"))
    with opened(queue_url) as queue:
        queue.enqueue(*first)
        queue.enqueue(*second)
        got = []
        while True:
            batch = queue.claim("general", "alice", n=37)
            if batch.num_rows == 0:
                break
            got += batch.column("id").to_pylist()
    arrival = np.concatenate([priorities, priorities]).astype(np.float32)
    order = np.lexsort((np.arange(2 * rows), -arrival))  # priority descending, then arrival
    assert got == [f"p-{i}" for i in order]


def test_claim_checks_its_arguments(queue_url):
    with opened(queue_url) as queue:
        with pytest.raises(QueueError, match="tier: expected one of"):
            queue.claim("nobody", "alice")
        with pytest.raises(QueueError, match="n: expected an integer >= 1"):
            queue.claim("general", "alice", n=0)
        with pytest.raises(QueueError, match="lease: expected a positive"):
            queue.claim("general", "alice", lease=-1)


def test_expired_leases_are_offered_again_then_dead_lettered(queue_url, rng):
    decisions, predictions = decision_batch(rng, 40, escalate_share=1.0, tiers=("general", "general"))
    with opened(queue_url, max_deliveries=3) as queue:
        queue.enqueue(decisions, predictions)
        for delivery in (1, 2, 3):
            items = queue.claim("general", f"r{delivery}", n=100, lease=0.2)
            assert items.num_rows == 40 and set(items.column("deliveries").to_pylist()) == {delivery}
            assert queue.claim("general", "someone-else", n=100).num_rows == 0  # all leased
            assert queue.stats()["tiers"]["general"]["in_flight"] == 40
            time.sleep(0.3)
        # The third lease expired: every item has had its 3 deliveries and is dead-lettered.
        assert queue.claim("general", "r4", n=100).num_rows == 0
        stats = queue.stats()["tiers"]["general"]
        assert stats["dead"] == 40 and stats["depth"] == 0 and stats["in_flight"] == 0
        assert queue.requeue_dead() == 40
        again = queue.claim("general", "r5", n=100)
        assert again.num_rows == 40 and set(again.column("deliveries").to_pylist()) == {1}


def test_a_lease_held_is_not_offered_and_a_verdict_ends_it(queue_url, rng):
    decisions, predictions = decision_batch(rng, 10, escalate_share=1.0, tiers=("general", "general"))
    with opened(queue_url) as queue:
        queue.enqueue(decisions, predictions)
        mine = queue.claim("general", "alice", n=4, lease=60)
        assert queue.claim("general", "bob", n=100).num_rows == 6
        verdicts = [{"id": i, "reviewer": "alice", "tier": "general", "action": "confirm"} for i in mine.column("id").to_pylist()]
        assert queue.submit(verdicts) == {"stored": 4, "duplicates": 0, "done": 4, "moved": 0}
        stats = queue.stats()
        assert stats["tiers"]["general"]["done"] == 4 and stats["verdicts"]["confirm"] == 4


def test_escalate_moves_the_item_up_with_its_history(queue_url, rng):
    decisions, predictions = decision_batch(rng, 5, escalate_share=1.0, tiers=("general", "general"))
    with opened(queue_url) as queue:
        queue.enqueue(decisions, predictions)
        item_id = queue.claim("general", "alice").column("id")[0].as_py()
        assert queue.submit([{"id": item_id, "reviewer": "alice", "tier": "general", "action": "escalate"}])["moved"] == 1
        up = queue.claim("specialist", "sam", n=10)
        assert up.column("id").to_pylist() == [item_id]
        assert up.column("history").to_pylist() == [["general/alice: escalate"]]
        # The general tier no longer holds it: a verdict from there is refused.
        with pytest.raises(QueueError, match="tier: expected 'specialist'"):
            queue.submit([{"id": item_id, "reviewer": "bob", "tier": "general", "action": "confirm"}])
        queue.submit([{"id": item_id, "reviewer": "sam", "tier": "specialist", "action": "escalate"}])
        top = queue.claim("adjudicator", "ada")
        assert top.column("history").to_pylist() == [["general/alice: escalate", "specialist/sam: escalate"]]
        with pytest.raises(QueueError, match="no tier above"):
            queue.submit([{"id": item_id, "reviewer": "ada", "tier": "adjudicator", "action": "escalate"}])
        queue.submit([{"id": item_id, "reviewer": "ada", "tier": "adjudicator", "action": "correct", "label": 2}])
        assert queue.stats()["tiers"]["adjudicator"]["done"] == 1


def test_overlap_items_need_two_reviewers_and_disagreement_goes_to_the_adjudicator(queue_url, rng):
    decisions, predictions = decision_batch(rng, 60, escalate_share=1.0, tiers=("general", "general"))
    predicted = dict(zip(decisions.column("id").to_pylist(), decisions.column("predicted_class").to_pylist()))
    with opened(queue_url, overlap={"general": 1.0}) as queue:
        queue.enqueue(decisions, predictions)
        alice = queue.claim("general", "alice", n=100).column("id").to_pylist()
        assert len(alice) == 60
        assert queue.claim("general", "alice", n=100).num_rows == 0  # never twice to one reviewer
        bob = queue.claim("general", "bob", n=100).column("id").to_pylist()
        assert sorted(bob) == sorted(alice)
        assert queue.claim("general", "carol", n=100).num_rows == 0  # two reviewers each, no more
        first = [{"id": i, "reviewer": "alice", "tier": "general", "action": "confirm"} for i in alice]
        assert queue.submit(first)["done"] == 0  # one verdict of two
        agree, disagree = alice[:40], alice[40:]
        second = [{"id": i, "reviewer": "bob", "tier": "general", "action": "confirm"} for i in agree]
        second += [{"id": i, "reviewer": "bob", "tier": "general", "action": "correct",
                    "label": (predicted[i] + 1) % 4} for i in disagree]
        assert queue.submit(second) == {"stored": 60, "duplicates": 0, "done": 40, "moved": 20}
        adjudicate = queue.claim("adjudicator", "ada", n=100)
        assert sorted(adjudicate.column("id").to_pylist()) == sorted(disagree)


def test_overlap_draw_takes_the_configured_share(queue_url, rng):
    decisions, predictions = decision_batch(rng, 4000, escalate_share=1.0, tiers=("general", "general"), uri=False)
    with opened(queue_url, overlap={"general": 0.25}) as queue:
        queue.enqueue(decisions, predictions)
        first = queue.claim("general", "alice", n=5000).num_rows
        twice = queue.claim("general", "bob", n=5000).num_rows  # only the overlap items
    assert first == 4000
    # Binomial(4000, 0.25): 5 standard deviations.
    assert abs(twice - 1000) < 5 * np.sqrt(4000 * 0.25 * 0.75)


def test_verdicts_are_idempotent_per_reviewer(queue_url, rng):
    decisions, predictions = decision_batch(rng, 10, escalate_share=1.0, tiers=("general", "general"))
    with opened(queue_url) as queue:
        queue.enqueue(decisions, predictions)
        item = queue.claim("general", "alice").to_pylist()[0]
        verdict = {"id": item["id"], "reviewer": "alice", "tier": "general", "action": "correct",
                   "label": (item["predicted_class"] + 1) % 4}
        assert queue.submit([verdict])["stored"] == 1
        assert queue.submit([verdict, verdict]) == {"stored": 0, "duplicates": 2, "done": 0, "moved": 0}
        assert queue.verdicts().num_rows == 1
        with pytest.raises(QueueError, match="cannot be changed"):
            queue.submit([{**verdict, "label": item["predicted_class"]}])


def test_bad_verdicts_are_refused_whole_and_name_the_field(queue_url, rng):
    decisions, predictions = decision_batch(rng, 10, escalate_share=1.0, tiers=("general", "general"))
    with opened(queue_url) as queue:
        queue.enqueue(decisions, predictions)
        items = queue.claim("general", "alice", n=2).to_pylist()
        good = {"id": items[0]["id"], "reviewer": "alice", "tier": "general", "action": "confirm"}
        cases = [
            ({"id": "no-such-id", "reviewer": "alice", "tier": "general", "action": "confirm"}, "id: expected an item"),
            ({**good, "id": items[1]["id"], "tier": "specialist"}, "tier: expected 'general'"),
            ({**good, "id": items[1]["id"], "action": "correct", "label": 4}, r"label: expected a class in \[0, 4\)"),
            ({**good, "id": items[1]["id"], "action": "correct", "label": -3}, r"label: expected a class in \[0, 4\)"),
            ({**good, "id": items[1]["id"], "action": "maybe"}, "action: expected one of"),
            ({**good, "id": items[1]["id"], "action": "confirm", "label": (items[1]["predicted_class"] + 1) % 4},
             "label: expected the predicted class"),
            ({**good, "id": items[1]["id"], "reviewer": ""}, "reviewer: expected"),
        ]
        for bad, message in cases:
            with pytest.raises(QueueError, match=message):
                queue.submit([good, bad])  # the good row first: it must not be stored either
        assert queue.verdicts().num_rows == 0
        with pytest.raises(QueueError, match="verdicts: expected a 'action' column"):
            queue.submit(pa.table({"id": ["x"], "reviewer": ["a"], "tier": ["general"]}))
        assert queue.submit([good])["stored"] == 1


def test_blind_audit_items_hide_the_prediction(queue_url, rng):
    decisions, predictions = decision_batch(rng, 200, escalate_share=1.0, audit_only_share=0.5,
                                            tiers=("general", "general"))
    reason = dict(zip(decisions.column("id").to_pylist(), decisions.column("reason_mask").to_pylist()))
    with opened(queue_url) as queue:
        queue.enqueue(decisions, predictions)
        items = queue.claim("general", "alice", n=500).to_pylist()
    assert len(items) == 200
    for item in items:
        audit_only = reason[item["id"]] == 16
        assert item["blind"] == audit_only
        assert (item["predicted_class"] is None) == audit_only and (item["logits"] is None) == audit_only
        assert item["audit_weight"] == (20.0 if reason[item["id"]] & 16 else 0.0)


def test_verdict_export_carries_the_decision_columns(queue_url, rng):
    decisions, predictions = decision_batch(rng, 50, escalate_share=1.0, tiers=("general", "general"))
    with opened(queue_url) as queue:
        queue.enqueue(decisions, predictions)
        items = queue.claim("general", "alice", n=10).to_pylist()
        queue.submit([{"id": i["id"], "reviewer": "alice", "tier": "general", "action": "out_of_scope"} for i in items[:6]])
        cut = time.time()
        time.sleep(0.01)
        queue.submit([{"id": i["id"], "reviewer": "alice", "tier": "general", "action": "confirm"} for i in items[6:]])
        everything, recent = queue.verdicts(), queue.verdicts(since=cut)
    assert everything.num_rows == 10 and recent.num_rows == 4
    assert everything.column("action").to_pylist() == ["out_of_scope"] * 6 + ["confirm"] * 4
    rows = {r["id"]: r for r in decisions.to_pylist()}
    for row in everything.to_pylist():
        assert row["audit_weight"] == rows[row["id"]]["audit_weight"]
        assert row["decision_tier"] == rows[row["id"]]["tier"] and row["priority"] == rows[row["id"]]["priority"]
        expected_label = rows[row["id"]]["predicted_class"] if row["action"] == "confirm" else -1
        assert row["label"] == expected_label
    for name in ("id", "label", "reviewer", "tier", "action", "ts"):
        assert name in everything.schema.names


def test_reviewers_in_several_processes_finish_every_item_once(queue_url, rng):
    decisions, predictions = decision_batch(rng, 2000, escalate_share=0.5, tiers=("general", "general"), uri=False)
    expected = escalated_ids(decisions)
    with opened(queue_url) as queue:
        queue.enqueue(decisions, predictions)
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(4) as pool:
        reviewed = pool.starmap(_review_until_empty, [(queue_url, f"reviewer-{i}") for i in range(4)])
    flat = [i for ids in reviewed for i in ids]
    assert sorted(flat) == sorted(expected)  # each item reviewed by exactly one reviewer
    with opened(queue_url) as queue:
        stats = queue.stats()["tiers"]["general"]
        assert stats["done"] == len(expected) and stats["depth"] == 0 and stats["in_flight"] == 0


def _review_until_empty(url, reviewer):
    done = []
    with opened(url) as queue:
        while True:
            items = queue.claim("general", reviewer, n=25, lease=60)
            if items.num_rows == 0:
                return done
            ids = items.column("id").to_pylist()
            queue.submit([{"id": i, "reviewer": reviewer, "tier": "general", "action": "confirm"} for i in ids])
            done += ids


def test_open_queue_refuses_unknown_urls(tmp_path):
    with pytest.raises(QueueError, match="expected a sqlite:/// or redis:// url"):
        open_queue("postgres://x")
    with pytest.raises(QueueError, match="queue.overlap: expected tiers among"):
        open_queue(f"sqlite:///{tmp_path}/q.db", QueueOptions(overlap={"nobody": 0.5}))
