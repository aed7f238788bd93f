"""The Redis queue against the SQLite one: a random sequence of enqueues (overlapping ids, several
batches per write), claims (short leases that expire, so redelivery and dead letters happen),
verdict batches (duplicates, changed and refused verdicts, escalations, overlap disagreements,
an adjudicator below the top tier) and requeues, run on both. Oracle: the SQLite backend, whose
answers (claimed ids in order, deliveries, history, blind flags, counts, error messages, stats,
the verdict export) the Redis one must give too. The oldest age, which that comparison cannot hold
to the second (the two queues' clocks are read at different moments), has a test of its own."""

from __future__ import annotations

import random
import time

import numpy as np
import pytest

from hitl_triage.serve.queue import QueueError, QueueOptions, open_queue

from queue_fixtures import decision_batch, redis_server

STEPS = 120
TIERS = ("general", "specialist", "adjudicator")


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    pytest.importorskip("redis")
    with redis_server(tmp_path_factory.mktemp("redis")) as url:
        yield url


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_redis_answers_as_sqlite_does(seed, redis_url, tmp_path):
    import redis

    redis.Redis.from_url(redis_url).flushall()
    moves = random.Random(seed)
    rng = np.random.default_rng(seed)
    options = dict(overlap={"general": 0.5, "specialist": 0.3, "adjudicator": 0.3},
                   max_deliveries=moves.choice([1, 2, 3]), adjudicator=moves.choice(["specialist", "adjudicator"]),
                   blind_audit=moves.random() < 0.5)
    queues = [open_queue(f"sqlite:///{tmp_path / 'q.db'}", QueueOptions(**options)),
              open_queue(redis_url, QueueOptions(**options))]
    claimed: list[tuple[str, str, str, int | None]] = []
    try:
        for step in range(STEPS):
            op = moves.choice(["enqueue", "claim", "claim", "claim", "submit", "submit", "submit", "requeue", "stats"])
            if op == "enqueue":
                batches = [decision_batch(rng, moves.randrange(1, 60), start=moves.randrange(0, 300), escalate_share=0.6,
                                          audit_only_share=0.3) for _ in range(moves.randrange(1, 3))]
                answers = [q.enqueue_many(batches) for q in queues]
            elif op == "claim":
                tier, reviewer, short = moves.choice(TIERS), moves.choice("abc"), moves.random() < 0.3
                n = moves.randrange(1, 15)
                tables = [q.claim(tier, reviewer, n=n, lease=0.02 if short else 1000) for q in queues]
                answers = [t.select(["id", "deliveries", "history", "blind", "tier", "predicted_class"]).to_pylist()
                           if t.num_rows else [] for t in tables]
                if short:
                    time.sleep(0.05)  # past the lease on both, whichever clock
                claimed += [(r["id"], reviewer, tier, r["predicted_class"]) for r in answers[0]]
            elif op == "submit":
                rows = [_verdict(moves, claimed) for _ in range(moves.randrange(1, 6))]
                answers = [_submitted(q, rows) for q in queues]
            elif op == "requeue":
                answers = [q.requeue_dead() for q in queues]
            else:
                answers = [_stats(q) for q in queues]
            assert answers[0] == answers[1], f"seed {seed} step {step} ({op}): sqlite {answers[0]}, redis {answers[1]}"
        columns = ["id", "label", "reviewer", "tier", "action", "decision_tier", "priority", "audit_weight"]
        exports = [q.verdicts().select(columns).to_pylist() for q in queues]
        assert exports[0] == exports[1]
    finally:
        for q in queues:
            q.close()


def _verdict(moves: random.Random, claimed: list) -> dict:
    """A verdict on a claimed item, most of the time by its reviewer, else on any id by anyone."""
    if claimed and moves.random() < 0.9:
        item_id, reviewer, tier, predicted = moves.choice(claimed)
    else:
        item_id, reviewer, tier, predicted = f"p-{moves.randrange(400)}", "a", moves.choice(TIERS[:2]), None
    if moves.random() < 0.2:
        reviewer = moves.choice("abc")
    action = moves.choice(["confirm", "confirm", "correct", "escalate", "out_of_scope"])
    row = {"id": item_id, "reviewer": reviewer, "tier": tier, "action": action}
    if action == "correct":
        row["label"] = moves.randrange(0, 5)  # 4 is out of range: refused
    if action == "confirm" and moves.random() < 0.3:
        row["label"] = 0 if predicted is None else predicted
    return row


def _submitted(queue, rows):
    try:
        return queue.submit(rows)
    except QueueError as error:
        return str(error)


def _stats(queue) -> dict:
    stats = queue.stats()
    for tier in stats["tiers"].values():
        tier["oldest_age_s"] = tier["oldest_age_s"] > 0  # the clocks differ; whether there is an oldest does not
    return stats


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
def test_oldest_age_is_that_of_the_oldest_open_item(backend, request, tmp_path, rng):
    url = f"sqlite:///{tmp_path / 'q.db'}" if backend == "sqlite" else request.getfixturevalue("redis_url")
    if backend == "redis":
        import redis

        redis.Redis.from_url(url).flushall()
    first = decision_batch(rng, 20, escalate_share=1.0, tiers=("general", "general"))
    second = decision_batch(rng, 20, start=20, escalate_share=1.0, tiers=("general", "general"))
    with open_queue(url) as queue:
        queue.enqueue(*first)
        time.sleep(0.5)
        queue.enqueue(*second)
        assert queue.stats()["tiers"]["general"]["oldest_age_s"] >= 0.5
        older = set(first[0].column("id").to_pylist())
        leased = queue.claim("general", "alice", n=40, lease=60).column("id").to_pylist()
        assert queue.stats()["tiers"]["general"]["oldest_age_s"] >= 0.5  # leased items are still open
        queue.submit([{"id": i, "reviewer": "alice", "tier": "general", "action": "confirm"} for i in leased if i in older])
        assert queue.stats()["tiers"]["general"]["oldest_age_s"] < 0.5  # the first batch is done: the second is oldest
        queue.submit([{"id": i, "reviewer": "alice", "tier": "general", "action": "escalate"} for i in leased if i not in older])
        tiers = queue.stats()["tiers"]
        assert tiers["general"]["oldest_age_s"] == 0.0 and 0 < tiers["specialist"]["oldest_age_s"] < 0.5
