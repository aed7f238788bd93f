"""queue: how fast the review queue takes escalations in and hands them to reviewers.

Data: one simulated day of the fleet, triaged by ``TriageEngine`` with a default budget-mode
profile (no bank) in decision batches of 10,000 rows, about a tenth of them escalated (audit
samples included): the batches the service and ``triage run --queue`` enqueue. Each timed pass
enqueues every batch under fresh ids (a second pass over the same ids would be a no-op).

Rows, per backend (SQLite in a temporary file with WAL and synchronous=FULL; a private
redis-server started here with appendfsync always):

- ``enqueue``: review items stored per second, one ``enqueue`` call (one durable write) per
  decision batch, with the ratio to ``raw insert``: the same ids and priorities written by the
  backend's plainest bulk write, one durable write per batch (SQLite executemany of (id,
  priority) rows in one transaction; one ZADD), the floor any queue on that backend pays;
- ``enqueue, 8 per write``: ``enqueue_many`` of 8 batches at a time (one transaction, one
  fsync), what a server's queue writer does with the batches that arrived during the last write;
- ``claim + verdict``: items reviewed per second by 8 reviewer processes at once, each looping
  claim(n=50) then submit(50 confirms) until the tier is empty; every item is one claim and one
  verdict.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import tempfile
import time
from pathlib import Path

from ..factories import fleet_data
from ..report import Row
from ..runner import NotAvailableYet
from .common import failure, time_call

SUITE = "queue"
TABLE_QUALITY = ("items", "batches", "reviewers")
TABLE_HIDE = ("dtype", "compile s")
BATCH_ROWS = 10_000
REVIEWERS = 8
CLAIM_N = 50


def run(ctx) -> None:
    try:
        from hitl_triage.engine.config import AuditConfig, TriageConfig  # noqa: F401
        from hitl_triage.engine.engine import TriageEngine  # noqa: F401
        from hitl_triage.serve.queue import open_queue  # noqa: F401
    except ImportError as exc:
        raise NotAvailableYet(f"hitl_triage.serve.queue: {exc}") from exc
    rows = 100_000 if ctx.quick else 500_000
    task = ctx.task(SUITE, total=5)
    ctx.progress.update(task, description=f"{SUITE}: triaging {rows:,} fleet rows into decision batches")
    batches = _decision_batches(rows, ctx.seed + 41)
    items = sum(int(d.column("escalate").to_numpy(zero_copy_only=False).sum()) for d, _ in batches)
    ctx.note(f"data: {rows:,} fleet rows (hitl_triage.serve.sim), default budget profile without a bank, "
             f"{len(batches)} decision batches of {BATCH_ROWS:,} rows, {items:,} escalated ({items / rows:.1%})")
    ctx.advance(task)
    with tempfile.TemporaryDirectory(prefix="hitl-bench-queue-") as tmp:
        ctx.note(f"this disk: one fsynced SQLite commit (WAL, synchronous=FULL) takes {_commit_ms(Path(tmp)):.2f} ms, "
                 "which bounds durable writes per second on one file")
        for backend in ("sqlite", "redis"):
            ctx.progress.update(task, description=f"{SUITE}: {backend} enqueue")
            with _backend(backend, Path(tmp) / backend) as (url, status):
                if url is None:
                    for case in ("enqueue", "enqueue, 8 per write", "raw insert", "claim + verdict"):
                        ctx.add(Row(SUITE, case, backend, status=status))
                    ctx.advance(task, None)
                    ctx.advance(task, None)
                    continue
                _enqueue_rows(ctx, backend, url, batches, items)
                ctx.advance(task)
                ctx.progress.update(task, description=f"{SUITE}: {backend} claim + verdict, {REVIEWERS} reviewers")
                _review_row(ctx, backend, url, batches)
                ctx.advance(task)
    ctx.progress.remove_task(task)


def _decision_batches(rows: int, seed: int):
    import pyarrow as pa

    from hitl_triage.engine.config import TriageConfig
    from hitl_triage.engine.engine import TriageEngine
    from hitl_triage.engine.profile import Profile

    data = fleet_data(rows, bank_rows=0, calibration_rows=10_000, dim=16, seed=seed)
    profile = Profile.fit(data.calibration, config=TriageConfig())
    engine = TriageEngine(profile, device="cpu")
    out = []
    for start in range(0, rows, BATCH_ROWS):
        predictions = data.fleet.slice(start, BATCH_ROWS).drop_columns(["embedding"])
        predictions = predictions.append_column("uri", pa.array([f"s3://fleet/{i}" for i in predictions.column("id").to_pylist()]))
        out.append((pa.Table.from_batches([engine.triage(predictions.to_batches(max_chunksize=BATCH_ROWS)[0])]), predictions))
    return out


@contextlib.contextmanager
def _backend(name: str, directory: Path):
    directory.mkdir(parents=True, exist_ok=True)
    if name == "sqlite":
        yield f"sqlite:///{directory / 'review.db'}", ""
        return
    try:
        from hitl_triage.serve.queue.local_redis import RedisNotInstalled, local_redis
        import hitl_triage.serve.queue.redis  # noqa: F401
    except ImportError as exc:
        yield None, failure(exc, "not available yet")
        return
    try:
        with local_redis(directory, appendfsync="always") as url:
            yield url, ""
    except RedisNotInstalled as exc:
        yield None, failure(exc, "not installed")


def _renamed(batches, prefix: str):
    """The batches under ids prefixed with ``prefix`` (fresh items for the queue)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    out = []
    for decisions, predictions in batches:
        ids = pc.binary_join_element_wise(prefix, decisions.column("id").cast(pa.string()), "")
        out.append((decisions.set_column(0, "id", ids), predictions.set_column(predictions.schema.get_field_index("id"), "id", ids)))
    return out


def _enqueue_rows(ctx, backend: str, url: str, batches, items: int) -> None:
    from hitl_triage.serve.queue import open_queue

    raw = _raw_insert(backend, url, batches)
    for case, per_write in (("enqueue", 1), ("enqueue, 8 per write", 8)):
        # Each call (one warm-up, at most five timed) needs fresh ids: renamed copies made up front.
        copies = [_renamed(batches, f"{case}-{i}-") for i in range(6)]
        with open_queue(url) as queue:
            def one_pass():
                work = copies.pop()
                for start in range(0, len(work), per_write):
                    queue.enqueue_many(work[start:start + per_write])

            try:
                timing = time_call(ctx, one_pass, budget_s=4.0)
            except Exception as exc:  # noqa: BLE001 - reported in the row
                ctx.add(Row(SUITE, case, backend, status=failure(exc)))
                continue
        ctx.add(Row(SUITE, case, backend, {"batch_rows": BATCH_ROWS, "batches_per_write": per_write}, unit="items/s",
                    throughput=items / timing.best, seconds=timing.best, median_s=timing.median,
                    repeats=timing.repeats, ratios={"vs raw insert": raw / timing.best},
                    quality={"items": items, "batches": len(batches)}))
    ctx.add(Row(SUITE, "raw insert", backend, {"batch_rows": BATCH_ROWS, "batches_per_write": 1}, unit="items/s",
                throughput=items / raw, seconds=raw, quality={"items": items, "batches": len(batches)},
                notes="plainest durable bulk write of (id, priority), one per batch"))


def _raw_insert(backend: str, url: str, batches) -> float:
    """Seconds for the backend's plainest durable bulk write of the same items' ids and priorities."""
    import pyarrow.compute as pc

    pairs = []
    for decisions, _ in _renamed(batches, "raw-"):
        escalated = decisions.filter(decisions.column("escalate"))
        pairs.append(list(zip(pc.cast(escalated.column("id"), "string").to_pylist(), escalated.column("priority").to_pylist())))
    if backend == "sqlite":
        import sqlite3

        path = url[len("sqlite:///"):] + ".raw"
        db = sqlite3.connect(path, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute("CREATE TABLE raw (id TEXT PRIMARY KEY, priority REAL)")
        t0 = time.perf_counter()
        for rows in pairs:
            db.execute("BEGIN IMMEDIATE")
            db.executemany("INSERT OR IGNORE INTO raw VALUES (?, ?)", rows)
            db.execute("COMMIT")
        seconds = time.perf_counter() - t0
        db.close()
        return seconds
    import redis

    client = redis.Redis.from_url(url)
    t0 = time.perf_counter()
    for rows in pairs:
        client.zadd("raw", {i: -p for i, p in rows})
    seconds = time.perf_counter() - t0
    client.delete("raw")
    return seconds


def _commit_ms(directory: Path) -> float:
    import sqlite3

    db = sqlite3.connect(directory / "fsync.db", isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute("CREATE TABLE t (a)")
    t0 = time.perf_counter()
    for i in range(100):
        db.execute("BEGIN IMMEDIATE")
        db.execute("INSERT INTO t VALUES (?)", (i,))
        db.execute("COMMIT")
    seconds = (time.perf_counter() - t0) / 100
    db.close()
    return seconds * 1e3


def _review_row(ctx, backend: str, url: str, batches) -> None:
    from hitl_triage.serve.queue import open_queue

    # A queue of its own (the enqueue passes left tens of thousands of items in the first).
    url = url.replace("review.db", "review-claims.db") if backend == "sqlite" else url.rsplit("/", 1)[0] + "/1"
    fresh = _renamed(batches, "review-")
    with open_queue(url) as queue:
        for decisions, predictions in fresh:
            queue.enqueue(decisions, predictions)
        tiers = [t for t, s in queue.stats()["tiers"].items() if s["depth"]]
    spawn = multiprocessing.get_context("spawn")
    try:
        with spawn.Pool(REVIEWERS) as pool:
            pool.map(_noop, range(REVIEWERS))  # start the workers before the clock does
            t0 = time.perf_counter()
            counts = pool.starmap(_review, [(url, f"reviewer-{i}", tiers) for i in range(REVIEWERS)])
            seconds = time.perf_counter() - t0
    except Exception as exc:  # noqa: BLE001 - reported in the row
        ctx.add(Row(SUITE, "claim + verdict", backend, status=failure(exc)))
        return
    reviewed = sum(counts)
    ctx.add(Row(SUITE, "claim + verdict", backend, {"claim_n": CLAIM_N}, unit="items/s", throughput=reviewed / seconds,
                seconds=seconds, repeats=1, quality={"items": reviewed, "reviewers": REVIEWERS},
                notes="each item: one claim and one verdict"))


def _noop(_):
    """Warm a worker: import the queue (and torch under it) before the clock starts."""
    import hitl_triage.serve.queue.sqlite  # noqa: F401

    try:
        import hitl_triage.serve.queue.redis  # noqa: F401
    except ImportError:
        pass
    return None


def _review(url: str, reviewer: str, tiers: list[str]) -> int:
    from hitl_triage.serve.queue import open_queue

    done = 0
    with open_queue(url) as queue:
        for tier in tiers:
            while True:
                items = queue.claim(tier, reviewer, n=CLAIM_N, lease=600)
                if items.num_rows == 0:
                    break
                queue.submit([{"id": i, "reviewer": reviewer, "tier": tier, "action": "confirm"}
                              for i in items.column("id").to_pylist()])
                done += items.num_rows
    return done
