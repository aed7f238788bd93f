"""Review-queue test set-up: decision batches made by hand, and real servers started on free
loopback ports (a redis-server in a temporary directory, stopped after)."""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from hitl_triage.engine.engine import DECISION_SCHEMA
from hitl_triage.engine.policy import Reason
from hitl_triage.serve.queue.local_redis import RedisNotInstalled, free_port, local_redis  # noqa: F401

TIERS = ("general", "specialist", "adjudicator")


def decision_batch(rng, rows: int, *, start: int = 0, escalate_share: float = 0.3, members: int = 3,
                   classes: int = 4, tiers=TIERS, priorities=None, audit_only_share: float = 0.0,
                   uri: bool = True) -> tuple[pa.Table, pa.Table]:
    """(decisions, predictions) as the engine would return and receive them: ids
    ``p-{start}``..., a share of rows escalated to random tiers with random priorities (or the
    ``priorities`` given, one per row), and a ``uri`` extra column that must pass through."""
    ids = [f"p-{i}" for i in range(start, start + rows)]
    escalate = rng.random(rows) < escalate_share
    reason = np.where(escalate, rng.choice([1, 2, 8, 1 | 16], rows), 0).astype(np.uint8)
    audit_only = escalate & (rng.random(rows) < audit_only_share)
    reason[audit_only] = int(Reason.AUDIT)
    priority = (rng.random(rows) if priorities is None else np.asarray(priorities)).astype(np.float32)
    priority[~escalate] = 0
    tier = np.where(escalate, rng.choice(list(tiers[:2]), rows), "")
    logits = rng.normal(size=(rows, members, classes)).astype(np.float32)
    predicted = logits.mean(axis=1).argmax(axis=1).astype(np.int32)
    columns = {
        "id": pa.array(ids), "escalate": pa.array(escalate), "reason_mask": pa.array(reason),
        "tier": pa.array([t or None for t in tier], pa.string()), "priority": pa.array(priority),
        "predicted_class": pa.array(predicted), "confidence": pa.array(rng.random(rows).astype(np.float32)),
        "margin": pa.array(rng.random(rows).astype(np.float32)), "mutual_info": pa.array(rng.random(rows).astype(np.float32)),
        "vote_agreement": pa.array(np.ones(rows, np.float32)), "ood_score": pa.array(rng.random(rows).astype(np.float32)),
        "audit_weight": pa.array(np.where(reason & 16, 20.0, 0.0).astype(np.float32)),
        "audit_stratum": pa.array([("source=a" if r & 16 else None) for r in reason], pa.string()),
        "valid": pa.array(np.ones(rows, bool)), "profile_version": pa.array(["v-test"] * rows),
    }
    decisions = pa.table({f.name: columns[f.name].cast(f.type) for f in DECISION_SCHEMA})
    decisions = decisions.append_column("source", pa.array([f"cam-{i % 3}" for i in range(rows)]))
    flat = pa.array(logits.reshape(-1))
    predictions = pa.table({
        "id": pa.array(ids),
        "logits": pa.FixedSizeListArray.from_arrays(pa.FixedSizeListArray.from_arrays(flat, classes), members),
        "source": decisions.column("source"),
        **({"uri": pa.array([f"s3://bucket/{i}.jpg" for i in ids])} if uri else {}),
    })
    return decisions, predictions


def escalated_ids(decisions: pa.Table) -> list[str]:
    return [i for i, e in zip(decisions.column("id").to_pylist(), decisions.column("escalate").to_pylist()) if e]


@contextlib.contextmanager
def redis_server(directory: Path, *, appendfsync: str = "always"):
    """A real redis-server on a free loopback port, data in ``directory``, AOF on; yields its URL
    (skips the test where redis-server is not installed)."""
    try:
        with local_redis(directory, appendfsync=appendfsync) as url:
            yield url
    except RedisNotInstalled as exc:
        pytest.skip(f"{exc}; .ci/run installs it")


# The same test on both backends: a SQLite file, or a real redis-server (flushed per test).
@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    with redis_server(tmp_path_factory.mktemp("redis")) as url:
        yield url


@pytest.fixture(params=["sqlite", "redis"])
def queue_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'review.db'}"
    url = request.getfixturevalue("redis_url")
    pytest.importorskip("redis").Redis.from_url(url).flushall()
    return url
