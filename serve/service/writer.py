"""The one queue writer of a server process: makes each decided batch's escalations durable.

The engine thread hands over (decisions, predictions) and goes on with the next batch; this
thread stores everything handed over since its last write in one ``enqueue_many`` call (one
transaction, one fsync on SQLite: group commit), then tells each batch's callback. Without a
queue the callbacks run at once. A failed write fails the calls of every batch in it
(:class:`QueueUnavailable`): no call is answered with decisions whose escalations were not stored.
"""

from __future__ import annotations

import threading
from typing import Callable

import pyarrow as pa


class QueueUnavailable(RuntimeError):
    """The review queue could not store a batch's escalations."""


Callback = Callable[[BaseException | None], None]


class QueueWriter:
    def __init__(self, queue, *, max_batches_per_write: int = 16, observe=None):
        self._queue = queue
        self._max = max_batches_per_write
        self._observe = observe
        self._lock = threading.Condition()
        self._pending: list[tuple[pa.RecordBatch, pa.RecordBatch, Callback]] = []
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="triage-queue-writer", daemon=True) if queue else None
        if self._thread is not None:
            self._thread.start()

    def write(self, decisions: pa.RecordBatch, predictions: pa.RecordBatch, done: Callback) -> None:
        if self._queue is None:
            done(None)
            return
        with self._lock:
            self._pending.append((decisions, predictions, done))
            self._lock.notify()

    def close(self) -> None:
        """Store what was handed over, then stop."""
        with self._lock:
            self._closed = True
            self._lock.notify()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._pending and not self._closed:
                    self._lock.wait()
                if not self._pending:
                    return
                work, self._pending = self._pending[: self._max], self._pending[self._max:]
            try:
                self._queue.enqueue_many([(d, p) for d, p, _ in work])
                error: BaseException | None = None
            except BaseException as exc:  # noqa: BLE001 - every call of these batches fails with it
                error = QueueUnavailable(f"review queue: expected the escalations to be stored, found {type(exc).__name__}: {exc}")
            if self._observe is not None:
                self._observe("write", (len(work), error is None))
            for _, _, done in work:
                done(error)
