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
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from hitl_triage.engine.decode import (
    BatchError,
    check_schema,
    common_id_type,
    duplicate_id_error,
    duplicate_keys,
    first_duplicate,
    id_keys,
    with_context,
)
from hitl_triage.engine.engine import DECISION_SCHEMA, TriageEngine
from hitl_triage.engine.monitoring import TriageSummary
from hitl_triage.engine.profile import Profile

from .checks import (
    PartialFile,
    UsageError,
    check_device,
    native_file,
    output_file,
    parquet_schema,
    positive_int,
    read_error,
    same_file,
)
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


@dataclasses.dataclass(frozen=True)
class InputPlan:
    """The inputs of one run, checked: their paths, row counts (from the footers) and the types
    the decisions file gives ``id``, ``source`` and ``category`` (one schema for every input)."""

    paths: list[Path]
    rows: list[int]
    id_type: pa.DataType
    strings: dict[str, pa.DataType]  # source / category -> type, for those any input has

    @property
    def total(self) -> int:
        return sum(self.rows)

    def decision_schema(self) -> pa.Schema:
        """The schema of the decisions file (of an empty one too)."""
        fields = [pa.field("id", self.id_type), *list(DECISION_SCHEMA)[1:]]
        return pa.schema(fields + [pa.field(name, t) for name, t in self.strings.items()])

    def conform(self, decisions: pa.RecordBatch) -> pa.RecordBatch:
        """``decisions`` with this plan's id, source and category types: a file whose ids are
        large_string among string ones is cast, one without ``category`` among files with it gets
        nulls, so every batch fits the one decisions file."""
        names = decisions.schema.names
        columns = [decisions.column(i) for i, n in enumerate(names) if n not in _PASSED_THROUGH]
        fields = [decisions.schema.field(i) for i, n in enumerate(names) if n not in _PASSED_THROUGH]
        if columns[0].type != self.id_type:
            columns[0] = columns[0].cast(self.id_type)
            fields[0] = pa.field("id", self.id_type)
        for name, kind in self.strings.items():
            value = decisions.column(name) if name in names else pa.nulls(decisions.num_rows, kind)
            columns.append(value if value.type == kind else value.cast(kind))
            fields.append(pa.field(name, kind))
        return pa.RecordBatch.from_arrays(columns, schema=pa.schema(fields))


_PASSED_THROUGH = ("source", "category")


def count_rows(paths: list[Path]) -> int:
    """Rows in the Parquet files, from their footers (no data read)."""
    return sum(parquet_schema(p, "input")[1] for p in paths)


def plan_inputs(profile: Profile, inputs: Sequence[str | Path]) -> InputPlan:
    """Check every input against the data contract, the profile and each other, reading only the
    footers: the same file given twice, integer ids in one file and string ids in another, or a
    file the profile cannot triage is refused here, naming the file."""
    paths = [Path(p) for p in inputs]
    if not paths:
        raise UsageError("input: expected at least one Parquet file, found none")
    for i, path in enumerate(paths):
        for earlier in paths[:i]:
            if same_file(earlier, path):
                raise UsageError(f"input {path}: expected each input once, found it is also the input {earlier} "
                                 "(its rows would be triaged twice, with the same ids)")
    has_bank = profile.bank is not None
    embedding = ("required" if profile.config.policy.on_missing_embedding == "error" else "optional") if has_bank else "ignore"
    rows: list[int] = []
    id_types: dict[str, pa.DataType] = {}
    strings: dict[str, list[pa.DataType]] = {}
    for path in paths:
        schema, n = parquet_schema(path, "input")
        try:
            layout = check_schema(schema, members=profile.members, classes=profile.classes,
                                  dim=profile.dim if has_bank else None, embedding=embedding, label="ignore")
        except BatchError as exc:
            raise with_context(exc, str(path)) from None
        rows.append(n)
        id_types[str(path)] = layout.id_type
        for name in _PASSED_THROUGH:
            if name in schema.names:
                kind = schema.field(name).type
                strings.setdefault(name, []).append(pa.string() if pa.types.is_null(kind) else kind)
    unified = {}
    for name in _PASSED_THROUGH:  # in the order the engine appends them
        kinds = strings.get(name)
        if kinds:
            same = len(kinds) == len(paths) and all(k == kinds[0] for k in kinds)
            large = any(pa.types.is_large_string(k.value_type if pa.types.is_dictionary(k) else k) for k in kinds)
            unified[name] = kinds[0] if same else (pa.large_string() if large else pa.string())
    return InputPlan(paths=paths, rows=rows, id_type=common_id_type(id_types), strings=unified)


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
    protect: tuple[Path, ...] = (),
) -> RunResult:
    """Triage every row of ``inputs`` (Parquet files in the data contract) into ``output``.

    Before a row is read: ``device`` and ``batch_rows`` are checked, ``output`` must be a file
    path that is none of the inputs (nor ``protect``'s files, nor inside the profile directory),
    and every file's footer is checked against the profile (:func:`plan_inputs`), so a wrong
    file fails in milliseconds and writes nothing. The decisions are written to
    ``OUTPUT.partial`` (locked: a second run to the same output is refused, one left by a killed
    run is taken over) and renamed onto ``output`` only once every row is decided and the ids of
    the whole run were found unique (:func:`hitl_triage.engine.decode.id_keys`: 8 bytes per row);
    any failure, KeyboardInterrupt included, removes the partial file.

    ``progress(rows_done, rows_total)`` is called once before the first row is read and after each
    batch. With ``time_stages`` the result holds seconds per stage, reading and writing included
    (the stages then run one after another, so the split is real). With ``review_queue``, each
    batch's escalations and audit samples are enqueued before the next batch is read (the queue
    is idempotent on the prediction id, so a rerun adds nothing); the decisions file is still
    written whole or not at all.
    """
    check_device(device)
    batch_rows = positive_int(batch_rows, "--batch-rows")
    input_paths = [Path(p) for p in inputs]
    output = output_file(output, "--out", inputs=[*input_paths, *(("the queue's file", p) for p in protect)],
                         outside=[profile.path] if profile.path is not None else [])
    plan = plan_inputs(profile, input_paths)
    partial = PartialFile(output, "--out")
    partial.claim()
    committed = False
    try:
        result = _run(profile, plan, partial, device=device, batch_rows=batch_rows, progress=progress,
                      time_stages=time_stages, review_queue=review_queue)
        partial.commit()  # the decisions file appears whole or not at all
        committed = True
    finally:
        if not committed:
            partial.discard()
    return result


def _run(profile: Profile, plan: InputPlan, partial: PartialFile, *, device, batch_rows, progress, time_stages,
         review_queue) -> RunResult:
    engine = TriageEngine(profile, device=device, time_stages=time_stages)
    summary = TriageSummary()
    io_seconds = {"read": 0.0, "write": 0.0, "queue": 0.0}
    queued = 0
    started = time.perf_counter()
    # One key per row (an int id's own bits, 64 hash bits of a string id), checked once the last
    # batch is decided: ids repeated across batches or files are refused before the rename.
    keys = np.empty(plan.total, dtype=np.uint64)
    done = 0
    if progress is not None:
        progress(0, plan.total)
    source = _read_batches(plan, batch_rows)
    source = _timed(source, io_seconds, "read") if time_stages else _prefetch(source, depth=2)
    sink = _Writer(partial.path, plan.decision_schema(), io_seconds, threaded=not time_stages)
    try:
        for path, first_row, batch in source:
            t0 = time.perf_counter()
            try:
                decisions = engine.triage(batch)
            except BatchError as exc:
                raise with_context(exc, f"{path}, rows {first_row}-{first_row + batch.num_rows - 1}") from None
            summary.update(decisions, seconds=time.perf_counter() - t0)
            decisions = plan.conform(decisions)
            if done + batch.num_rows > len(keys):  # more rows than the footers said
                keys = np.concatenate([keys[:done], np.empty(done + batch.num_rows - len(keys), np.uint64)])
            keys[done:done + batch.num_rows] = id_keys(decisions.column("id"))
            sink.write(decisions)
            if review_queue is not None:
                t0 = time.perf_counter()
                queued += review_queue.enqueue(decisions, batch)
                io_seconds["queue"] += time.perf_counter() - t0
            done += batch.num_rows
            if progress is not None:
                progress(done, plan.total)
        keys = keys[:done]
        keys.sort()
        _check_unique(plan, duplicate_keys(keys), batch_rows)
        del keys
        sink.close()
    finally:
        sink.abort()
    wall = time.perf_counter() - started
    stages = engine.stage_seconds
    if time_stages:
        stages = {"read": io_seconds["read"], **stages, "write": io_seconds["write"]}
        if review_queue is not None:
            stages["queue"] = io_seconds["queue"]
    return RunResult(summary=summary, output=partial.target, stage_seconds=stages, wall_seconds=wall, queued=queued)


def _read_batches(plan: InputPlan, batch_rows: int, columns: list[str] | None = None):
    """(path, first row in the file, batch) over every input in order; read errors name the file."""
    for path in plan.paths:
        first = 0
        try:
            with native_file(path) as handle, pq.ParquetFile(handle) as reader:
                for batch in reader.iter_batches(batch_size=batch_rows, columns=columns):
                    yield path, first, batch
                    first += batch.num_rows
        except (pa.ArrowException, OSError) as exc:
            raise read_error(path, exc) from None


def _check_unique(plan: InputPlan, repeated: np.ndarray, batch_rows: int) -> None:
    """Raise DuplicateIdError when ids repeat across the run, naming the first repeat's file and
    row and where its id was first seen. ``repeated``: the keys seen more than once; they are
    confirmed against the ids themselves (a second read of the id column only), since two string
    ids can share a 64-bit key."""
    if not len(repeated):
        return
    ids, where = [], []
    for path, first, batch in _read_batches(plan, batch_rows, columns=["id"]):
        hits = np.flatnonzero(np.isin(id_keys(batch.column(0)), repeated))
        if len(hits):
            ids += batch.column(0).take(pa.array(hits)).to_pylist()
            where += [(path, first + int(h)) for h in hits]
    found = first_duplicate(ids)
    if found is not None:
        count, i, j = found
        raise duplicate_id_error(count, ids[i], f"row {where[i][1]} of {where[i][0]}", f"row {where[j][1]} of {where[j][0]}")
    logger.info("%d id keys repeated, all of them hash collisions of different ids", len(repeated))


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
    """Parquet writer, in a background thread unless ``threaded`` is False (stage timing); the
    file takes the first batch's schema, ``empty_schema`` when there is none. :meth:`close`
    finishes the file; :meth:`abort` stops the thread and closes the file whatever state it is in
    (the caller removes it)."""

    def __init__(self, path: Path, empty_schema: pa.Schema, seconds: dict, threaded: bool):
        self.path = path
        self.empty_schema = empty_schema
        self.seconds = seconds
        self.threaded = threaded
        self._writer: pq.ParquetWriter | None = None
        self._file = native_file(path, "wb")  # the writer leaves a file it was given open
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
            self._writer = pq.ParquetWriter(self._file, batch.schema, compression="zstd")
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

    def _stop(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            self._queue.put(_DONE)
            self._thread.join()

    def close(self) -> None:
        self._stop()
        if self._error is not None:
            raise self._error
        if self._writer is None:  # no rows at all: still a valid, empty decisions file
            self._writer = pq.ParquetWriter(self._file, self.empty_schema)
        writer, self._writer = self._writer, None
        writer.close()
        self._file.close()

    def abort(self) -> None:
        self._stop()
        try:
            if self._writer is not None:
                writer, self._writer = self._writer, None
                writer.close()
        except (pa.ArrowException, OSError):  # a file that is thrown away anyway
            pass
        finally:
            self._file.close()
