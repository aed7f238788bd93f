"""The dynamic batcher and the queue writer, in process, with a stand-in engine that records the
batches it was given (the real engine is the faces' tests' business): coalescing, splitting,
order, admission, deadlines, and durability before the answer."""

from __future__ import annotations

import threading
import time

import numpy as np
import pyarrow as pa
import pytest

from hitl_triage.serve.service.batcher import Batcher, Closed, Expired, Overloaded
from hitl_triage.serve.service.writer import QueueUnavailable, QueueWriter


def request(start: int, rows: int) -> pa.RecordBatch:
    return pa.RecordBatch.from_pydict({"id": pa.array([f"r{start + i}" for i in range(rows)]),
                                       "x": pa.array(np.arange(start, start + rows, dtype=np.int64))})


class Recorder:
    """decide(): echoes ids and doubles x, recording each engine batch's size."""

    def __init__(self, delay_s: float = 0.0):
        self.sizes: list[int] = []
        self.delay_s = delay_s

    def __call__(self, batch: pa.RecordBatch, reported: bool) -> pa.RecordBatch:
        self.sizes.append(batch.num_rows)
        time.sleep(self.delay_s)
        return pa.RecordBatch.from_pydict({"id": batch.column("id"), "escalate": pa.array(np.ones(batch.num_rows, bool)),
                                           "y": pa.array(batch.column("x").to_numpy() * 2),
                                           "reported": pa.array([reported] * batch.num_rows)})


class FakeQueue:
    """Stores what it is given; can be made to fail or to stall (a slow disk)."""

    def __init__(self):
        self.stored: list[str] = []
        self.writes = 0
        self.fail = False
        self.gate = threading.Event()
        self.gate.set()

    def enqueue_many(self, pairs):
        self.gate.wait()
        if self.fail:
            raise OSError("disk full")
        self.writes += 1
        for decisions, _ in pairs:
            self.stored.extend(decisions.column("id").to_pylist())
        return sum(d.num_rows for d, _ in pairs)


def make(decide, queue=None, **kw):
    options = {"max_batch_rows": 1000, "max_delay_s": 0.05, "max_queue_rows": 100_000, **kw}
    return Batcher(decide, QueueWriter(queue), **options)


def test_small_requests_are_coalesced_and_answered_in_their_own_order():
    engine = Recorder()
    batcher = make(engine, max_delay_s=0.2)
    futures = [batcher.submit(request(i * 10, 10)) for i in range(50)]
    results = [f.result(5) for f in futures]
    for i, r in enumerate(results):
        assert r.column("id").to_pylist() == [f"r{i * 10 + j}" for j in range(10)]
        assert r.column("y").to_pylist() == [2 * (i * 10 + j) for j in range(10)]
    assert sum(engine.sizes) == 500 and len(engine.sizes) < 10  # far fewer engine calls than requests
    batcher.close()


def test_a_large_request_is_split_and_answered_whole():
    engine = Recorder()
    batcher = make(engine, max_batch_rows=300)
    result = batcher.submit(request(0, 1000)).result(5)
    assert result.column("y").to_pylist() == [2 * i for i in range(1000)]
    assert max(engine.sizes) <= 300 and sum(engine.sizes) == 1000
    batcher.close()


def test_the_delay_starts_at_the_first_request():
    engine = Recorder()
    batcher = make(engine, max_delay_s=0.3)
    t0 = time.monotonic()
    batcher.submit(request(0, 5)).result(5)
    waited = time.monotonic() - t0
    assert 0.25 <= waited < 2.0  # held for max_delay (a full batch would go at once)
    full = time.monotonic()
    batcher.submit(request(0, 1000)).result(5)
    assert time.monotonic() - full < 0.25
    batcher.close()


def test_admission_is_bounded_in_rows():
    engine = Recorder(delay_s=0.3)
    batcher = make(engine, max_batch_rows=100, max_queue_rows=250)
    first = [batcher.submit(request(0, 100)), batcher.submit(request(100, 100))]
    with pytest.raises(Overloaded, match="admission queue: expected room for 100 rows, found 200"):
        batcher.submit(request(200, 100))
    for f in first:
        f.result(5)
    assert batcher.admitted_rows == 0
    batcher.submit(request(300, 100)).result(5)  # room again once answered
    batcher.close()


def test_expired_and_cancelled_calls_are_dropped_before_their_batch_runs():
    engine = Recorder(delay_s=0.3)
    queue = FakeQueue()
    batcher = make(engine, queue, max_batch_rows=10)
    busy = batcher.submit(request(0, 10))  # occupies the engine for 0.3 s
    late = batcher.submit(request(10, 10), deadline=time.monotonic() + 0.05)
    gone = batcher.submit(request(20, 10), alive=lambda: False)
    busy.result(5)
    with pytest.raises(Expired, match="deadline"):
        late.result(5)
    with pytest.raises(Expired, match="cancelled"):
        gone.result(5)
    batcher.close()
    assert sorted(queue.stored) == [f"r{i}" for i in range(10)]  # the dropped rows were never enqueued
    assert sum(engine.sizes) == 10


def test_answers_wait_for_the_queue_and_fail_when_it_cannot_store():
    queue = FakeQueue()
    batcher = make(Recorder(), queue, max_delay_s=0.0)
    queue.gate.clear()  # a stalled disk
    pending = batcher.submit(request(0, 10))
    time.sleep(0.2)
    assert not pending.done()  # decided, but not answered before it is stored
    queue.gate.set()
    assert pending.result(5).num_rows == 10 and queue.stored == [f"r{i}" for i in range(10)]
    queue.fail = True
    with pytest.raises(QueueUnavailable, match="disk full"):
        batcher.submit(request(10, 10)).result(5)
    batcher.close()


def test_writes_are_grouped_while_the_disk_is_busy():
    queue = FakeQueue()
    batcher = make(Recorder(), queue, max_delay_s=0.0, max_batch_rows=10)
    queue.gate.clear()
    futures = [batcher.submit(request(i * 10, 10)) for i in range(20)]
    time.sleep(0.3)  # every batch decided, all waiting on the first write
    queue.gate.set()
    for f in futures:
        f.result(5)
    assert len(queue.stored) == 200 and queue.writes < 20


def test_reported_rows_are_batched_apart_and_marked():
    engine = Recorder()
    batcher = make(engine, max_delay_s=0.1)
    plain = batcher.submit(request(0, 10))
    reported = batcher.submit(request(10, 10), reported=True)
    assert plain.result(5).column("reported").to_pylist() == [False] * 10
    assert reported.result(5).column("reported").to_pylist() == [True] * 10
    batcher.close()


def test_close_answers_what_was_admitted():
    engine = Recorder(delay_s=0.05)
    queue = FakeQueue()
    batcher = make(engine, queue, max_batch_rows=10, max_delay_s=0.0)
    futures = [batcher.submit(request(i * 10, 10)) for i in range(10)]
    batcher.close(timeout=10)
    assert all(f.done() and f.exception() is None for f in futures)
    assert len(queue.stored) == 100
    with pytest.raises(Closed, match="shutting down"):
        batcher.submit(request(0, 1))


def test_two_callers_with_the_same_ids_are_decided_apart():
    """A retry or re-send arriving with the original: the engine refuses repeated ids in one
    batch, so the batcher decides each caller's request on its own (the queue keeps each once)."""
    from hitl_triage.engine.decode import DuplicateIdError

    def decide(batch, reported):
        ids = batch.column("id").to_pylist()
        if len(set(ids)) != len(ids):
            raise DuplicateIdError("expected unique ids, found repeats", count=1, first=ids[0])
        return Recorder()(batch, reported)

    batcher = make(decide, max_delay_s=0.2)
    first, second = batcher.submit(request(0, 10)), batcher.submit(request(0, 10))
    assert first.result(5).column("y").to_pylist() == second.result(5).column("y").to_pylist() == [2 * i for i in range(10)]
    alone = batcher.submit(pa.RecordBatch.from_pydict({"id": ["a", "a"], "x": pa.array([1, 2], pa.int64())}))
    with pytest.raises(DuplicateIdError):
        alone.result(5)  # one caller's own repeats are still refused
    batcher.close()
