"""Kills (issue 21, item 4): `triage serve` SIGKILLed at random moments while clients stream
batches over Flight and over triage.v1, restarted on the same ports after each kill; and reviewer
processes SIGKILLed between claim and verdict.

The server: tests/reliability_serve_forker.py forks `triage serve` (the command's own code, on
fixed ports) in about 0.3 s, so that a hundred kills fit in CI: KILLS["sqlite"] + KILLS["redis"]
= 100 per run, each after uniform(0, MAX_LIFE_S) seconds of SERVING. Two client threads (one
Flight DoExchange, one triage.v1 TriageStream) each send batch k, wait for its decisions (its
acknowledgement) and then send k + 1; when the stream breaks they reconnect and send the batch
whose decisions had not come back again, as a client must. Oracles: the decisions each client
received (the escalated ids of every acknowledged batch) and the review queue read directly
(sqlite3 with PRAGMA integrity_check; redis-py on the backend's keys). After each restart every
escalation of every batch acknowledged so far is in the queue exactly once; at the end, once every
batch has been acknowledged, the queue holds exactly the escalations of all of them, once each.

The reviewer: tests/reliability_reviewer.py forks reviewers that claim and are killed before their
verdict; the items come back after the lease, go to the dead letter after max_deliveries such
deliveries, come back from it whole, and an honest verdict then finishes each once.
"""

from __future__ import annotations

import collections
import contextlib
import os
import queue as queues
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pyarrow as pa
import pyarrow.flight as flight
import pytest

from hitl_triage.serve.proto.triage.v1 import triage_pb2, triage_pb2_grpc
from hitl_triage.serve.queue import QueueOptions, open_queue
from hitl_triage.serve.service.ipc import read_batch, write_batch
from queue_fixtures import decision_batch, escalated_ids, redis_server
from reliability_fixtures import shared_world, sqlite_items

KILLS = {"sqlite": 70, "redis": 30}   # 100 kills of the server per run
MAX_LIFE_S = 0.15                     # each server is killed uniform(0, MAX_LIFE_S) s after SERVING
ROWS = 48                             # rows per batch
START_TIMEOUT_S = 10.0                # a forked server is SERVING in about 0.3 s
HERE = Path(__file__).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return shared_world(tmp_path_factory)


class Forker:
    """reliability_serve_forker.py: ``start()`` forks a server and waits until it is SERVING;
    ``kill()`` SIGKILLs it and checks that it died of that, not by itself."""

    def __init__(self, profile: Path, directory: Path):
        self.grpc_port, self.flight_port = free_port(), free_port()
        self.ready = directory / "forker.ready"
        self.log = directory / "forker.log"
        with self.log.open("w") as log:
            self.process = subprocess.Popen(
                [sys.executable, str(HERE / "reliability_serve_forker.py"), str(profile), str(self.grpc_port),
                 str(self.flight_port), str(self.ready)], cwd=HERE, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                stderr=log, text=True)
        assert self._line(120) == "ready"
        self.pid: int | None = None
        self.hung = 0

    def _line(self, timeout: float = START_TIMEOUT_S) -> str:
        assert self.process.stdout is not None
        text = self.process.stdout.readline()
        assert text, f"the forker ended: {self.log.read_text()[-3000:]}"
        return text.strip()

    def start(self, queue_url: str) -> None:
        """Fork a server and wait until it is SERVING. A child forked from the warm parent can
        hang before it serves (the parent's idle pyarrow and numba threads are not forked with
        it: fork-safety of this harness, not of `triage serve`); such a child is killed, counted in
        ``hung`` (its stacks are in the log) and replaced, at most twice a start."""
        for _ in range(3):
            self.ready.unlink(missing_ok=True)
            assert self.process.stdin is not None
            self.process.stdin.write(f"start {queue_url}\n")
            self.process.stdin.flush()
            word, pid = self._line().split()
            assert word == "pid"
            self.pid = int(pid)
            deadline = time.monotonic() + START_TIMEOUT_S
            while not self.ready.exists() and time.monotonic() < deadline:
                time.sleep(0.005)
            if self.ready.exists():
                return
            self.hung += 1
            self.kill()
        raise AssertionError(f"no server SERVING in 3 starts: {self.log.read_text()[-3000:]}")

    def kill(self) -> None:
        assert self.pid is not None
        os.kill(self.pid, signal.SIGKILL)
        word, pid, status = self._line().split()
        assert word == "exit" and int(pid) == self.pid
        assert os.WIFSIGNALED(int(status)) and os.WTERMSIG(int(status)) == signal.SIGKILL, \
            f"the server ended by itself (status {status}): {self.log.read_text()[-3000:]}"
        self.pid = None

    def stop(self) -> None:
        """SIGTERM the server now running (a clean stop), if one is."""
        if self.pid is not None:
            os.kill(self.pid, signal.SIGTERM)
            self._line(60)
            self.pid = None

    def close(self) -> None:
        self.stop()
        assert self.process.stdin is not None
        self.process.stdin.close()
        self.process.wait(60)


class StreamingClient(threading.Thread):
    """Sends batch 0, 1, 2, ... over ``face`` one at a time, each acknowledged by its decisions
    before the next; after a broken stream it reconnects and sends the unacknowledged batch again.
    ``acked[k]``: the escalated ids of batch k's decisions; ``resent``: batches sent again."""

    def __init__(self, face: str, address: str, rows: pa.RecordBatch):
        super().__init__(name=f"client-{face}", daemon=True)
        self.face, self.address, self.rows = face, address, rows
        self.acked: dict[int, set[str]] = {}
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.errors: collections.Counter[str] = collections.Counter()
        self.sent: set[int] = set()
        self.resent: set[int] = set()   # batches sent more than once (in flight at a kill, or sent while down)
        self.failure: BaseException | None = None
        self.last_error = ""

    def make(self, k: int) -> pa.RecordBatch:
        start = (k * ROWS) % (self.rows.num_rows - ROWS)
        return self.rows.slice(start, ROWS).set_column(0, "id", pa.array([f"{self.face}-{k}-{i}" for i in range(ROWS)]))

    def batch(self, k: int) -> pa.RecordBatch:
        """Batch k, to be sent now (counted as resent when it was sent before)."""
        if k in self.sent:
            self.resent.add(k)
        self.sent.add(k)
        return self.make(k)

    def _ack(self, k: int, decisions: pa.RecordBatch) -> None:
        assert decisions.num_rows == ROWS and decisions.column("id")[0].as_py() == f"{self.face}-{k}-0"
        with self.lock:
            self.acked[k] = set(escalated_ids(pa.Table.from_batches([decisions])))

    def snapshot(self) -> dict[int, set[str]]:
        with self.lock:
            return dict(self.acked)

    def run(self) -> None:
        k = 0
        try:
            while True:
                try:
                    k = self._stream(k)
                    return
                except (grpc.RpcError, flight.FlightError, pa.ArrowException, OSError) as exc:
                    code = exc.code() if isinstance(exc, grpc.RpcError) else None
                    self.errors[code.name if code is not None else type(exc).__name__] += 1
                    self.last_error = f"{type(exc).__name__}: {exc}"
                    k = max(self.snapshot(), default=-1) + 1  # the batch in flight, if any, goes again
                    time.sleep(0.02)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.failure = exc

    def _stream(self, k: int) -> int:
        """One connection: batches from k until stopped; returns the next batch number."""
        if self.face == "flight":
            client = flight.FlightClient(f"grpc+tcp://{self.address}")
            try:
                writer, reader = client.do_exchange(flight.FlightDescriptor.for_command(b"triage"),
                                                    flight.FlightCallOptions(timeout=30))
                writer.begin(self.make(0).schema)
                while True:  # stop only after an acknowledgement: a batch sent is sent until answered
                    writer.write_batch(self.batch(k))
                    self._ack(k, reader.read_chunk().data)
                    k += 1
                    if self.stop.is_set():
                        break
                writer.done_writing()
                writer.close()
            finally:
                client.close()
            return k
        requests: queues.Queue = queues.Queue()

        def pending():
            while (item := requests.get()) is not None:
                yield item

        with grpc.insecure_channel(self.address) as channel:
            responses = triage_pb2_grpc.TriageStub(channel).TriageStream(pending(), timeout=60)
            try:
                while True:
                    requests.put(triage_pb2.TriageRequest(arrow_ipc=write_batch(self.batch(k))))
                    self._ack(k, read_batch(next(responses).arrow_ipc))
                    k += 1
                    if self.stop.is_set():
                        break
            finally:
                requests.put(None)
                responses.cancel()
        return k


def redis_items(url: str) -> dict[str, int]:
    """Items per id in the Redis queue, read with redis-py from the backend's keys (the items
    hash, and each id's entries among the open and leased sorted sets of every tier)."""
    import redis

    r = redis.Redis.from_url(url)
    keys = sorted(r.scan_iter("hitl:open:*"))
    pipe = r.pipeline(transaction=True)  # one MULTI: the server may be enqueueing meanwhile
    pipe.hkeys("hitl:items")
    for key in keys:
        pipe.zrange(key, 0, -1)
    ids, *members = pipe.execute()
    counts = {key.decode(): 1 for key in ids}
    for key, open_members in zip(keys, members):
        seen = collections.Counter(member.decode()[16:] for member in open_members)
        twice = [i for i, n in seen.items() if n > 1]
        assert not twice, f"{key!r}: ids open twice {twice[:5]}"
        assert set(seen) <= set(counts), f"{key!r}: open ids without an item"
    return counts


@pytest.fixture(scope="module")
def forker(world, tmp_path_factory):
    forker = Forker(world.profile, tmp_path_factory.mktemp("forker"))
    yield forker
    forker.close()


def kill_loop(world, forker: Forker, queue_url: str, kills: int, read_items) -> dict[str, int]:
    moments = random.Random(int.from_bytes(os.urandom(4), "little"))
    rows = world.table().select(["id", "logits", "embedding", "source"]).combine_chunks().to_batches()[0]
    checked = 0
    try:
        forker.start(queue_url)
        clients = [StreamingClient("flight", f"127.0.0.1:{forker.flight_port}", rows),
                   StreamingClient("grpc", f"127.0.0.1:{forker.grpc_port}", rows)]
        for c in clients:
            c.start()
        for _ in range(kills):
            time.sleep(moments.uniform(0.0, MAX_LIFE_S))
            forker.kill()
            forker.start(queue_url)
            # After each restart: every escalation of every batch acknowledged so far, once.
            acked = [ids for c in clients for ids in c.snapshot().values()]
            items = read_items(queue_url)
            missing = [i for ids in acked for i in ids if items.get(i) != 1]
            assert not missing, f"acknowledged escalations not in the queue exactly once: {missing[:10]}"
            checked += sum(len(ids) for ids in acked)
            assert all(c.failure is None for c in clients), [c.failure for c in clients]
        for c in clients:
            c.stop.set()
        for c in clients:
            c.join(60)
            assert not c.is_alive() and c.failure is None, (c.name, c.failure, dict(c.errors), c.last_error,
                                                            len(c.snapshot()))
    finally:
        forker.stop()
    items = read_items(queue_url)
    expected: collections.Counter[str] = collections.Counter()
    for c in clients:
        acked = c.snapshot()
        assert sorted(acked) == list(range(len(acked))), f"{c.name}: a batch never acknowledged"
        for ids in acked.values():
            expected.update(ids)
    assert set(items) == set(expected) and all(n == 1 for n in items.values()), \
        (len(items), len(expected), sorted(set(items) ^ set(expected))[:10])
    batches = sum(len(c.snapshot()) for c in clients)
    resent = sum(len(c.resent) for c in clients)
    assert resent >= kills // 2, f"only {resent} batches were in flight at {kills} kills: the kills missed the streams"
    report = {"kills": kills, "hung_starts": forker.hung, "batches": batches, "resent": resent, "items": len(items), "checked": checked,
              "errors": dict(sum((c.errors for c in clients), collections.Counter()))}
    print(f"kill loop on {queue_url.split(':')[0]}: {report}")
    return report


@pytest.mark.slow
def test_killed_server_keeps_every_acknowledged_escalation_once_sqlite(world, forker, tmp_path):
    queue_url = f"sqlite:///{tmp_path / 'review.db'}"
    kill_loop(world, forker, queue_url, KILLS["sqlite"], sqlite_items)


@pytest.mark.slow
def test_killed_server_keeps_every_acknowledged_escalation_once_redis(world, forker, tmp_path):
    pytest.importorskip("redis")
    (tmp_path / "redis").mkdir()
    with redis_server(tmp_path / "redis", appendfsync="always") as url:
        kill_loop(world, forker, url, KILLS["redis"], redis_items)


# -- reviewers killed between claim and verdict -----------------------------------------------------

MAX_DELIVERIES = 3
LEASE_S = 1.5                         # long enough to be unexpired when the test looks, on a loaded VM
TIERS = ("general", "specialist", "adjudicator")


@contextlib.contextmanager
def reviewers(url: str, directory: Path):
    log = directory / "reviewer.log"
    with log.open("w") as err:
        process = subprocess.Popen([sys.executable, str(HERE / "reliability_reviewer.py"), url, str(MAX_DELIVERIES),
                                    ",".join(TIERS)], cwd=HERE, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                   stderr=err, text=True)
    assert process.stdout is not None and process.stdin is not None

    def line() -> str:
        text = process.stdout.readline()
        assert text, f"the reviewer process ended: {log.read_text()[-3000:]}"
        return text.strip()

    def claim_and_die(tier: str, reviewer: str) -> set[str]:
        """A reviewer claims every item of ``tier`` it is offered and is SIGKILLed before its verdict."""
        process.stdin.write(f"claim {tier} 1000 {LEASE_S} {reviewer}\n")
        process.stdin.flush()
        words = dict(line().split(" ", 1) for _ in range(2))  # "pid P" and "claimed ..." in either order
        os.kill(int(words["pid"]), signal.SIGKILL)
        word, _, status = line().split()
        assert word == "exit" and os.WTERMSIG(int(status)) == signal.SIGKILL
        return set(filter(None, words["claimed"].split(",")))

    assert line() == "ready"
    try:
        yield claim_and_die
    finally:
        process.stdin.close()
        process.wait(30)


@pytest.mark.parametrize("backend", ["redis"])  # the issue's; the same code runs on "sqlite" (8 s more of CI)
def test_a_reviewer_killed_between_claim_and_verdict_loses_nothing_and_finishes_nothing_twice(backend, tmp_path, rng):
    with contextlib.ExitStack() as stack:
        if backend == "sqlite":
            url = f"sqlite:///{tmp_path / 'review.db'}"
        else:
            pytest.importorskip("redis")
            (tmp_path / "redis").mkdir()
            url = stack.enter_context(redis_server(tmp_path / "redis"))
        options = QueueOptions(tiers=list(TIERS), max_deliveries=MAX_DELIVERIES)
        queue = stack.enter_context(contextlib.closing(open_queue(url, options)))
        decisions, predictions = decision_batch(rng, 60, tiers=TIERS)
        queue.enqueue(decisions, predictions)
        tier_of = {i: t for i, t, e in zip(*(decisions.column(c).to_pylist() for c in ("id", "tier", "escalate"))) if e}
        general = {i for i, t in tier_of.items() if t == "general"}
        assert general
        claim_and_die = stack.enter_context(reviewers(url, tmp_path))

        def accounted() -> None:  # never lost: every item still in the backend's own records, once
            read = sqlite_items if backend == "sqlite" else redis_items
            assert read(url) == {i: 1 for i in tier_of}

        for delivery in range(1, MAX_DELIVERIES + 1):
            asked = time.monotonic()
            claimed = claim_and_die("general", f"doomed-{delivery}")
            answered = time.monotonic()  # the lease began between asked and answered
            assert claimed == general, f"delivery {delivery}: offered {len(claimed)} of {len(general)}"
            accounted()
            if time.monotonic() - asked < LEASE_S * 0.8:  # (a loaded machine may have let the lease run out)
                assert queue.claim("general", "eager", n=1000, lease=LEASE_S).num_rows == 0  # leased: not offered twice
            time.sleep(max(0.0, answered + LEASE_S + 0.1 - time.monotonic()))
        # The lease of the last delivery expired: dead-lettered, not offered, still there.
        assert queue.claim("general", "late", n=1000, lease=LEASE_S).num_rows == 0
        assert queue.stats()["tiers"]["general"]["dead"] == len(general)
        accounted()
        assert queue.requeue_dead() == len(general)
        items = queue.claim("general", "ana", n=1000, lease=60)
        assert set(items.column("id").to_pylist()) == general
        verdicts = pa.table({"id": items.column("id"), "reviewer": ["ana"] * items.num_rows,
                             "tier": ["general"] * items.num_rows, "action": ["confirm"] * items.num_rows,
                             "label": items.column("predicted_class").cast(pa.int32())})
        first, again = queue.submit(verdicts), queue.submit(verdicts)
        assert first["stored"] == len(general) and first["done"] == len(general), first
        assert again["stored"] == 0 and again["duplicates"] == len(general) and again["done"] == 0, again
        assert queue.stats()["tiers"]["general"]["done"] == len(general)
        assert queue.claim("general", "bob", n=1000, lease=60).num_rows == 0
        accounted()
        done_by = collections.Counter(queue.verdicts().column("id").to_pylist())
        assert done_by == {i: 1 for i in general}
