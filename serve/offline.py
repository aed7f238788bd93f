"""Offline triage of Parquet files: stream row groups through the engine into a decisions file.

Reading, triage and writing overlap in three threads joined by bounded queues (Arrow's Parquet
reader and writer release the GIL), so memory stays bounded by a few batches whatever the size of
the input, and decisions are written in input order.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from hitl_triage.engine.decode import check_schema
from hitl_triage.engine.engine import TriageEngine
from hitl_triage.engine.monitoring import TriageSummary
from hitl_triage.engine.profile import Profile

from .queue import ReviewQueue

logger = logging.getLogger(__name__)

DEFAULT_BATCH_ROWS = 262_144  # rows per engine batch: amortises per-batch costs, bounded memory
_DONE = object()


@dataclasses.dataclass
class RunResult:
    summary: TriageSummary
    output: Path
    stage_seconds: dict[str, float]
    wall_seconds: float
    queued: int = 0  # review items new to the queue (0 without one)


def count_rows(paths: list[Path]) -> int:
    """Rows in the Parquet files, from their footers (no data read)."""
    return sum(pq.ParquetFile(p).metadata.num_rows for p in paths)


def run_offline(
    profile: Profile,
    inputs: list[str | Path],
    output: str | Path,
    *,
    device: str | None = None,
    batch_rows: int = DEFAULT_BATCH_ROWS,
    progress=None,
    time_stages: bool = False,
    review_queue: ReviewQueue | None = None,
) -> RunResult:
    """Triage every row of ``inputs`` (Parquet files in the data contract) into ``output``.

    Every file's schema is checked against the profile before any row is read, so a wrong file
    fails in milliseconds and writes nothing. ``progress(rows_done, rows_total)`` is called after
    each batch. With ``time_stages`` the result holds seconds per stage, reading and writing
    included (the stages then run one after another, so the split is real). With ``review_queue``, each
    batch's escalations and audit samples are enqueued before the next batch is read (the queue
    is idempotent on the prediction id, so a rerun adds nothing); the decisions file is still
    written whole or not at all.
    """
    paths = [Path(p) for p in inputs]
    needs_embedding = "required" if profile.bank is not None and profile.config.policy.on_missing_embedding == "error" else "optional"
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"input: expected a Parquet file, found no file at {path}")
        check_schema(
            pq.read_schema(path), members=profile.members, classes=profile.classes,
            dim=profile.dim if profile.bank is not None else None,
            embedding=needs_embedding if profile.bank is not None else "ignore", label="ignore",
        )
    total = count_rows(paths)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    engine = TriageEngine(profile, device=device, time_stages=time_stages)
    summary = TriageSummary()
    io_seconds = {"read": 0.0, "write": 0.0, "queue": 0.0}
    queued = 0
    started = time.perf_counter()

    def read_batches():
        for path in paths:
            reader = pq.ParquetFile(path)
            for batch in reader.iter_batches(batch_size=batch_rows):
                yield batch

    tmp = output.with_name(output.name + ".partial")
    writer = None
    try:
        if time_stages:
            source = _timed(read_batches(), io_seconds, "read")
        else:
            source = _prefetch(read_batches(), depth=2)
        sink = _Writer(tmp, io_seconds, threaded=not time_stages)
        writer = sink
        done = 0
        for batch in source:
            t0 = time.perf_counter()
            decisions = engine.triage(batch)
            summary.update(decisions, seconds=time.perf_counter() - t0)
            sink.write(decisions)
            if review_queue is not None:
                t0 = time.perf_counter()
                queued += review_queue.enqueue(decisions, batch)
                io_seconds["queue"] += time.perf_counter() - t0
            done += batch.num_rows
            if progress is not None:
                progress(done, total)
        sink.close()
        writer = None
        tmp.replace(output)  # the decisions file appears whole or not at all
    finally:
        if writer is not None:
            writer.abort()
    wall = time.perf_counter() - started
    stages = engine.stage_seconds
    if time_stages:
        stages = {"read": io_seconds["read"], **stages, "write": io_seconds["write"]}
        if review_queue is not None:
            stages["queue"] = io_seconds["queue"]
    return RunResult(summary=summary, output=output, stage_seconds=stages, wall_seconds=wall, queued=queued)


def _timed(iterator, seconds: dict, key: str):
    while True:
        t0 = time.perf_counter()
        try:
            item = next(iterator)
        except StopIteration:
            return
        seconds[key] += time.perf_counter() - t0
        yield item


def _prefetch(iterator, depth: int):
    """Run ``iterator`` in a thread, ``depth`` items ahead; re-raise its errors here."""
    items: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce():
        try:
            for item in iterator:
                while not stop.is_set():
                    try:
                        items.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            items.put(_DONE)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            items.put(exc)

    thread = threading.Thread(target=produce, name="parquet-reader", daemon=True)
    thread.start()
    try:
        while True:
            item = items.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()


class _Writer:
    """Parquet writer, in a background thread unless ``threaded`` is False (stage timing)."""

    def __init__(self, path: Path, seconds: dict, threaded: bool):
        self.path = path
        self.seconds = seconds
        self.threaded = threaded
        self._writer: pq.ParquetWriter | None = None
        self._queue: queue.Queue = queue.Queue(maxsize=2)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._drain, name="parquet-writer", daemon=True) if threaded else None
        if self._thread is not None:
            self._thread.start()

    def write(self, batch: pa.RecordBatch) -> None:
        if self._error is not None:
            raise self._error
        if self.threaded:
            self._queue.put(batch)
        else:
            self._write(batch)

    def _write(self, batch: pa.RecordBatch) -> None:
        t0 = time.perf_counter()
        if self._writer is None:
            self._writer = pq.ParquetWriter(self.path, batch.schema, compression="zstd")
        self._writer.write_batch(batch)
        self.seconds["write"] += time.perf_counter() - t0

    def _drain(self) -> None:
        while True:
            batch = self._queue.get()
            if batch is _DONE:
                return
            if self._error is None:
                try:
                    self._write(batch)
                except BaseException as exc:  # noqa: BLE001 - re-raised in write/close
                    self._error = exc

    def close(self) -> None:
        if self._thread is not None:
            self._queue.put(_DONE)
            self._thread.join()
        if self._error is not None:
            raise self._error
        if self._writer is None:  # no rows at all: still write a valid, empty decisions file
            from hitl_triage.engine.engine import DECISION_SCHEMA

            self._writer = pq.ParquetWriter(self.path, DECISION_SCHEMA)
        self._writer.close()

    def abort(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            self._queue.put(_DONE)
            self._thread.join()
        if self._writer is not None:
            self._writer.close()
        self.path.unlink(missing_ok=True)
