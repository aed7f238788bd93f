"""The dynamic batcher: requests of any size in, engine batches of up to ``max_batch_rows`` out.

A request waits at most ``max_delay`` from the moment the first request of its batch arrived;
a request larger than a batch is split into consecutive batches and answered whole. Requests with
the same Arrow schema share a batch (a fleet sends one schema; a different one waits for the
next). Admission is bounded in rows: past ``max_queue_rows`` a call is refused at once
(:class:`Overloaded`), so memory and latency stay bounded under any load.

Two threads: the engine thread coalesces and decides; the queue writer
(:class:`~.writer.QueueWriter`) makes each batch's escalations durable, several batches per
write under load, while the engine decides the next. A caller's future completes only after its
rows' escalations are committed: durable before acknowledged. A request whose deadline passed or
whose caller went away before its batch ran is dropped, never decided and never enqueued.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
import time
from concurrent.futures import Future
from typing import Callable

import pyarrow as pa

from hitl_triage.engine.decode import DuplicateIdError


class Overloaded(RuntimeError):
    """The admission queue is full (the client should back off and retry)."""


class Closed(RuntimeError):
    """The server is shutting down: the call should go to another replica."""


class Expired(RuntimeError):
    """The caller's deadline passed (or it cancelled) before its batch ran."""


@dataclasses.dataclass
class _Request:
    batch: pa.RecordBatch
    future: Future
    deadline: float | None          # time.monotonic() seconds, None: none
    alive: Callable[[], bool]        # False once the caller has gone away
    arrived: float
    reported: bool                   # rows users reported (Report): decided as such, batched apart
    parts: list = dataclasses.field(default_factory=list)   # decisions of the slices answered so far
    pending_slices: int = 0
    done_rows: int = 0


@dataclasses.dataclass
class _Slice:
    request: _Request
    offset: int
    length: int


class Batcher:
    """``submit(batch)`` -> a Future of the batch's decisions (a RecordBatch, same rows, same
    order). ``decide(batch, reported) -> decisions`` is the engine call; ``writer`` a
    :class:`~.writer.QueueWriter`."""

    def __init__(self, decide: Callable[[pa.RecordBatch, bool], pa.RecordBatch], writer, *, max_batch_rows: int,
                 max_delay_s: float, max_queue_rows: int, observe=None):
        self._decide = decide
        self._writer = writer
        self.max_batch_rows = max_batch_rows
        self.max_delay_s = max_delay_s
        self.max_queue_rows = max_queue_rows
        self._observe = observe  # callback(name, value) for metrics, or None
        self._lock = threading.Condition()
        self._waiting: collections.deque[_Slice] = collections.deque()
        self._admitted_rows = 0
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="triage-batcher", daemon=True)
        self._thread.start()

    @property
    def admitted_rows(self) -> int:
        return self._admitted_rows

    def submit(self, batch: pa.RecordBatch, *, deadline: float | None = None,
               alive: Callable[[], bool] = lambda: True, reported: bool = False) -> Future:
        future: Future = Future()
        rows = batch.num_rows
        now = time.monotonic()
        request = _Request(batch, future, deadline, alive, now, reported)
        if rows == 0:
            future.set_result(None)
            return future
        with self._lock:
            if self._closed:
                raise Closed("the server is shutting down and takes no new calls; retry on another replica")
            if self._admitted_rows + rows > self.max_queue_rows:
                raise Overloaded(
                    f"admission queue: expected room for {rows:,} rows, found {self._admitted_rows:,} of "
                    f"{self.max_queue_rows:,} rows already waiting; retry later"
                )
            self._admitted_rows += rows
            for offset in range(0, rows, self.max_batch_rows):
                length = min(self.max_batch_rows, rows - offset)
                self._waiting.append(_Slice(request, offset, length))
                request.pending_slices += 1
            self._lock.notify_all()
        return future

    def close(self, timeout: float | None = None) -> None:
        """Stop taking requests; finish those admitted (their calls are answered), then stop."""
        with self._lock:
            self._closed = True
            self._lock.notify_all()
        self._thread.join(timeout)

    # -- the engine thread ---------------------------------------------------------------------

    def _take(self) -> list[_Slice] | None:
        """The next batch: slices of one schema, up to max_batch_rows, once full or once its
        first slice has waited max_delay (None when closed and drained)."""
        with self._lock:
            while not self._waiting:
                if self._closed:
                    return None
                self._lock.wait()
            first = self._waiting[0]
            until = first.request.arrived + self.max_delay_s
            while not self._closed and self._rows_like(first) < self.max_batch_rows:
                left = until - time.monotonic()
                if left <= 0:
                    break
                self._lock.wait(left)
            taken: list[_Slice] = []
            rows = 0
            keep: collections.deque[_Slice] = collections.deque()
            while self._waiting:
                s = self._waiting.popleft()
                if _alike(s, first) and rows + s.length <= self.max_batch_rows:
                    taken.append(s)
                    rows += s.length
                else:
                    keep.append(s)
            keep.extend(self._waiting)
            self._waiting = keep
            return taken

    def _rows_like(self, first: _Slice) -> int:
        return sum(s.length for s in self._waiting if _alike(s, first))

    def _run(self) -> None:
        while True:
            taken = self._take()
            if taken is None:
                self._writer.close()
                return
            live = [s for s in taken if self._still_wanted(s)]
            if not live:
                continue
            self._decide_and_write(live)

    def _decide_and_write(self, live: list[_Slice]) -> None:
        started = time.monotonic()
        try:
            batch = _combine([s.request.batch.slice(s.offset, s.length) for s in live])
            decisions = self._decide(batch, live[0].request.reported)
        except DuplicateIdError as exc:
            requests = list(dict.fromkeys(id(s.request) for s in live))
            if len(requests) > 1:
                # Two callers sent the same ids at once (a retry, a re-send): each is a valid call
                # on its own, so decide each apart (the queue keeps each item once).
                for key in requests:
                    self._decide_and_write([s for s in live if id(s.request) == key])
                return
            self._fail_all(live, exc)
            return
        except BaseException as exc:  # noqa: BLE001 - the callers get the error, the server goes on
            self._fail_all(live, exc)
            return
        if self._observe is not None:
            self._observe("batch", (batch.num_rows, started - min(s.request.arrived for s in live)))
        self._writer.write(decisions, batch, lambda error, d=decisions, l=live: self._answer(l, d, error))

    def _fail_all(self, live: list[_Slice], exc: BaseException) -> None:
        for s in live:
            self._fail(s.request, exc)
            self._release(s.length)

    def _still_wanted(self, s: _Slice) -> bool:
        request = s.request
        if request.future.done():
            self._release(s.length)
            return False
        expired = request.deadline is not None and time.monotonic() > request.deadline
        if expired or not request.alive():
            self._fail(request, Expired("the call's deadline passed before its batch ran" if expired
                                        else "the caller cancelled before its batch ran"))
            self._release(s.length)
            return False
        return True

    def _answer(self, live: list[_Slice], decisions: pa.RecordBatch, error: BaseException | None) -> None:
        """The writer committed (error None) or failed: complete the slices' requests."""
        start = 0
        for s in live:
            self._release(s.length)
            if error is not None:
                self._fail(s.request, error)
                start += s.length
                continue
            request = s.request
            request.parts.append((s.offset, decisions.slice(start, s.length)))
            start += s.length
            request.pending_slices -= 1
            if request.pending_slices == 0 and not request.future.done():
                parts = [p for _, p in sorted(request.parts, key=lambda item: item[0])]
                request.future.set_result(_combine(parts))

    def _fail(self, request: _Request, error: BaseException) -> None:
        if not request.future.done():
            request.future.set_exception(error)

    def _release(self, rows: int) -> None:
        with self._lock:
            self._admitted_rows -= rows


def _alike(a: _Slice, b: _Slice) -> bool:
    """Slices that may share an engine batch: one schema, one kind."""
    return a.request.reported == b.request.reported and a.request.batch.schema.equals(b.request.batch.schema)


def _combine(batches: list[pa.RecordBatch]) -> pa.RecordBatch:
    if len(batches) == 1:
        return batches[0]
    return pa.Table.from_batches(batches).combine_chunks().to_batches()[0]
