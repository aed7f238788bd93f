"""A Python client of the triage service, over Arrow Flight (default, fast) or ``triage.v1``.

    with TriageClient("127.0.0.1:50052") as client:                 # the Flight port
        decisions = client.triage(table)                            # a pa.Table, one row per input row
        for d in client.triage_stream(["a.parquet", "b.parquet"]):  # one decisions batch per sent batch
            ...
        client.submit_verdicts([{"id": "p-1", "reviewer": "ana", "tier": "general", "action": "confirm"}])

    TriageClient("127.0.0.1:50051", transport="grpc")                # the triage.v1 port instead

    with local_server("profile/", "sqlite:///review.db") as server:  # `triage serve` on free ports
        TriageClient(server.flight).triage(table)

Retries: a call that ends UNAVAILABLE (server restarting, queue briefly down, connection refused)
or RESOURCE_EXHAUSTED (admission queue full) is sent again after an exponential backoff, a bounded
number of times (:class:`Retry`). That is safe because the server is idempotent on prediction ids:
a batch decided twice gives the same decisions and its escalations are stored once. A stream
resends only the batches whose decisions had not come back, so decisions still arrive once each,
in order. Other errors raise :class:`TriageError` at once, with the server's one-line message.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import os
import queue
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Literal, Sequence, Union

import pyarrow as pa
import pyarrow.parquet as pq

Input = Union[pa.RecordBatch, pa.Table, str, Path]
Transport = Literal["flight", "grpc"]
DEFAULT_BATCH_ROWS = 65_536
RETRYABLE = frozenset({"UNAVAILABLE", "RESOURCE_EXHAUSTED"})


class TriageError(RuntimeError):
    """A call the server refused or could not finish. ``code``: the gRPC status name
    (INVALID_ARGUMENT, RESOURCE_EXHAUSTED, UNAVAILABLE, DEADLINE_EXCEEDED, UNAUTHENTICATED,
    PERMISSION_DENIED, ...), the same over Flight and triage.v1; ``str()`` the server's message."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code

    @property
    def retryable(self) -> bool:
        return self.code in RETRYABLE


@dataclasses.dataclass(frozen=True)
class Retry:
    """Up to ``attempts`` retries of a call that ended with one of ``codes``, waiting
    ``initial_s`` * ``multiplier`` ** n (at most ``max_s``, with up to 50% random jitter)."""

    attempts: int = 6
    initial_s: float = 0.05
    multiplier: float = 2.0
    max_s: float = 2.0
    codes: frozenset[str] = RETRYABLE

    def delay(self, attempt: int) -> float:
        base = min(self.max_s, self.initial_s * self.multiplier ** attempt)
        return base * (0.5 + 0.5 * random.random())


NO_RETRY = Retry(attempts=0)


class TriageClient:
    """Connections to a triage server.

    ``address``: ``host:port`` of the face chosen by ``transport`` (the Flight port for
    ``"flight"``, the triage.v1 port for ``"grpc"``); a ``grpc://``, ``grpc+tcp://`` or
    ``grpc+tls://`` URL is accepted too. Several (a list, or comma-separated), such as the Flight
    ports of ``triage serve --workers N`` (Flight cannot share one port between processes): the
    streams of :meth:`triage_stream` are spread over them, and a retry goes to the next. ``token``: sent as ``authorization: Bearer <token>``.
    ``tls``: None (plain TCP), True (TLS, the system's roots) or a CA certificate (PEM bytes or the
    path of a PEM file) to verify the server with. ``timeout_s``: the deadline of each unary call
    (None: none). ``batch_rows``: the largest batch sent; bigger inputs are split.
    """

    def __init__(self, address: str | Sequence[str], *, token: str | None = None, tls: bool | bytes | str | Path | None = None,
                 transport: Transport = "flight", retry: Retry = Retry(), timeout_s: float | None = None,
                 batch_rows: int = DEFAULT_BATCH_ROWS):
        if transport not in ("flight", "grpc"):
            raise ValueError(f"transport: expected 'flight' or 'grpc', found {transport!r}")
        if batch_rows < 1:
            raise ValueError(f"batch_rows: expected at least 1, found {batch_rows}")
        addresses = [a.strip() for a in (address.split(",") if isinstance(address, str) else address) if a.strip()]
        if not addresses:
            raise ValueError(f"address: expected host:port, found {address!r}")
        if any(a.startswith("grpc+tls://") for a in addresses) and tls is None:
            tls = True
        root = Path(tls).read_bytes() if isinstance(tls, (str, Path)) else tls if isinstance(tls, bytes) else None
        headers = [("authorization", f"Bearer {token}")] if token else []
        factory = _FlightTransport if transport == "flight" else _GrpcTransport
        self.addresses = [a.rpartition("://")[2] for a in addresses]
        self._transports = [factory(a, bool(tls), root, headers) for a in self.addresses]
        self.transport = transport
        self.retry = retry
        self.timeout_s = timeout_s
        self.batch_rows = batch_rows

    # -- predictions -----------------------------------------------------------------------------

    def triage(self, batch: pa.RecordBatch | pa.Table) -> pa.Table:
        """The decisions of every row of ``batch``, in its order, once their escalations are
        stored in the server's review queue."""
        return self._whole("triage", batch)

    def report(self, batch: pa.RecordBatch | pa.Table) -> pa.Table:
        """Decide predictions that users challenged: each escalates with the REPORTED reason."""
        return self._whole("report", batch)

    def triage_stream(self, inputs: Iterable[Input], *, streams: int | None = None,
                      window: int = 4) -> Iterator[pa.RecordBatch]:
        """Decisions of a stream of inputs (record batches, tables, or Parquet file paths, split
        into batches of at most ``batch_rows``): one decisions batch per batch sent, in order.
        ``streams`` > 1 spreads the batches over that many concurrent exchanges (the server then
        decides one while it stores another's escalations), stream k on address k mod the
        addresses (default: one stream per address); ``window``: batches sent ahead of their
        answers on each."""
        streams = len(self._transports) if streams is None else streams
        if streams < 1 or window < 1:
            raise ValueError(f"streams, window: expected at least 1, found {streams}, {window}")
        batches = self._batches(inputs)
        if streams == 1:
            return self._retrying("triage", batches, window, None)
        return _spread(lambda part, k: self._retrying("triage", part, window, None, k), batches, streams, window)

    # -- verdicts, profile, stats ----------------------------------------------------------------

    def submit_verdicts(self, verdicts: pa.Table | pa.RecordBatch | Sequence[dict[str, Any]]) -> dict[str, int]:
        """Store reviewers' verdicts (columns id, reviewer, tier, action; label and ts optional);
        returns the counts ``stored``, ``duplicates``, ``done``, ``moved``."""
        if not isinstance(verdicts, (pa.Table, pa.RecordBatch)):
            rows = list(verdicts)
            names = list(dict.fromkeys(k for row in rows for k in row))
            verdicts = pa.table({k: [row.get(k) for row in rows] for k in names})
        totals = {"stored": 0, "duplicates": 0, "done": 0, "moved": 0}
        for counts in self._retrying("verdicts", self._batches([verdicts]), 4, self.timeout_s):
            for key in totals:
                totals[key] += int(counts.column(key)[0].as_py()) if key in counts.schema.names else 0
        return totals

    def profile(self) -> dict[str, Any]:
        """version, members, classes, dim (0 without a bank), class_names, tiers, temperature,
        thresholds, fit_report."""
        return self._call(lambda t: t.profile(self.timeout_s))

    def stats(self) -> dict[str, Any]:
        """profile_version, rows and escalated (decided by the server process since it started),
        by_reason, queue ({"tiers": {tier: depth, in_flight, ...}, "verdicts": {...}}), admitted_rows."""
        return self._call(lambda t: t.stats(self.timeout_s))

    def health(self) -> str:
        """SERVING or NOT_SERVING (no token needed)."""
        return self._call(lambda t: t.health(self.timeout_s))

    def close(self) -> None:
        for transport in self._transports:
            transport.close()

    def __enter__(self) -> "TriageClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- machinery -------------------------------------------------------------------------------

    def _whole(self, kind: str, batch: pa.RecordBatch | pa.Table) -> pa.Table:
        parts = list(self._retrying(kind, self._batches([batch]), 4, self.timeout_s))
        if not parts:
            raise TriageError("INVALID_ARGUMENT", "batch: expected at least one column and a schema, found none")
        return pa.Table.from_batches(parts)

    def _batches(self, inputs: Iterable[Input]) -> Iterator[pa.RecordBatch]:
        for item in inputs:
            if isinstance(item, (str, Path)):
                parquet = pq.ParquetFile(item)
                if parquet.metadata.num_rows == 0:
                    yield pa.RecordBatch.from_pylist([], schema=parquet.schema_arrow)
                yield from parquet.iter_batches(batch_size=self.batch_rows)
            elif isinstance(item, pa.Table):
                if item.num_rows == 0:
                    yield pa.RecordBatch.from_pylist([], schema=item.schema)
                needed = -(-item.num_rows // self.batch_rows)
                if any(column.num_chunks > needed for column in item.columns):  # small chunks: join them (a copy)
                    item = item.combine_chunks()
                yield from item.to_batches(max_chunksize=self.batch_rows)
            elif isinstance(item, pa.RecordBatch):
                for start in range(0, max(item.num_rows, 1), self.batch_rows):
                    yield item.slice(start, self.batch_rows)
            else:
                raise TypeError(f"inputs: expected record batches, tables or Parquet paths, found {type(item).__name__}")

    def _call(self, fn: Callable[[Any], Any]) -> Any:
        attempt = 0
        while True:
            try:
                return fn(self._transports[attempt % len(self._transports)])
            except TriageError as exc:
                if exc.code not in self.retry.codes or attempt >= self.retry.attempts:
                    raise
                time.sleep(self.retry.delay(attempt))
                attempt += 1

    def _retrying(self, kind: str, batches: Iterator[pa.RecordBatch], window: int, timeout_s: float | None,
                  first: int = 0) -> Iterator[pa.RecordBatch]:
        """Answers of ``batches`` in order, from address ``first`` (the next after each retry);
        after a retryable error the batches sent and not answered go again, first, on a new
        exchange."""
        unanswered: collections.deque[pa.RecordBatch] = collections.deque()

        def feed(resend: list[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
            yield from resend
            for batch in batches:
                unanswered.append(batch)
                yield batch

        attempt = 0
        while True:
            try:
                transport = self._transports[(first + attempt) % len(self._transports)]
                for answer in transport.exchange(kind, feed(list(unanswered)), window, timeout_s):
                    unanswered.popleft()
                    attempt = 0
                    yield answer
                return
            except TriageError as exc:
                if exc.code not in self.retry.codes or attempt >= self.retry.attempts:
                    raise
                time.sleep(self.retry.delay(attempt))
                attempt += 1


def _spread(run: Callable[[Iterator[pa.RecordBatch], int], Iterator[pa.RecordBatch]],
            batches: Iterator[pa.RecordBatch], streams: int, window: int) -> Iterator[pa.RecordBatch]:
    """``run(part, k)`` on ``streams`` threads, batch i on stream k = i % streams, answers
    yielded in input order."""
    done = object()
    inboxes: list[queue.Queue] = [queue.Queue(window) for _ in range(streams)]
    outboxes: list[queue.Queue] = [queue.Queue() for _ in range(streams)]
    errors: list[BaseException] = []
    stop = threading.Event()

    def put(box: queue.Queue, item: object) -> bool:
        while not stop.is_set():
            try:
                box.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def parts(inbox: queue.Queue) -> Iterator[pa.RecordBatch]:
        while (item := inbox.get()) is not done:
            yield item

    def work(k: int) -> None:
        try:
            for answer in run(parts(inboxes[k]), k):
                outboxes[k].put(answer)
        except BaseException as exc:  # noqa: BLE001 - raised in the consumer
            errors.append(exc)
            stop.set()
        finally:
            outboxes[k].put(done)

    def distribute() -> None:
        try:
            for i, batch in enumerate(batches):
                if not put(inboxes[i % streams], batch):
                    break
        except BaseException as exc:  # noqa: BLE001 - an input that cannot be read
            errors.append(exc)
            stop.set()
        finally:
            for inbox in inboxes:
                while True:  # the end mark must arrive, even past a full inbox
                    try:
                        inbox.put(done, timeout=0.1)
                        break
                    except queue.Full:
                        try:
                            inbox.get_nowait()  # stopping: drop a batch nobody will answer
                        except queue.Empty:
                            pass

    threads = [threading.Thread(target=work, args=(k,), name=f"triage-stream-{k}", daemon=True) for k in range(streams)]
    threads.append(threading.Thread(target=distribute, name="triage-stream-feed", daemon=True))
    for t in threads:
        t.start()
    try:
        i = 0
        while (item := outboxes[i % streams].get()) is not done:
            yield item
            i += 1
        stop.set()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
    finally:
        stop.set()


@dataclasses.dataclass
class LocalServer:
    """A `triage serve` process started by :func:`local_server`: ``ports`` is its ready file
    (``pid``, ``grpc``, ``flight``, ...), ``log`` the file its output goes to."""

    process: subprocess.Popen
    ports: dict[str, Any]
    log: Path
    host: str = "127.0.0.1"

    @property
    def grpc(self) -> str:
        return f"{self.host}:{self.ports['grpc']}"

    @property
    def flight(self) -> str:
        return f"{self.host}:{self.ports['flight']}"

    @property
    def flight_addresses(self) -> list[str]:
        """Every worker's Flight address (``--workers N`` gives each its own port)."""
        return [f"{self.host}:{p}" for p in self.ports.get("flight_ports", [self.ports["flight"]])]

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self, timeout_s: float = 60.0) -> int:
        """SIGTERM, and the exit code once it has exited (killed, and RuntimeError, past ``timeout_s``)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                return self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
                raise RuntimeError(f"triage serve: expected an exit within {timeout_s} s of SIGTERM, found none; "
                                   f"killed. Output:\n{self.output()[-3000:]}") from None
        return int(self.process.returncode)


@contextlib.contextmanager
def local_server(profile: str | Path, queue_url: str | None = None, *, args: Sequence[str] = (),
                 directory: str | Path | None = None, env: dict[str, str] | None = None,
                 start_timeout_s: float = 180.0, stop_timeout_s: float = 60.0) -> Iterator[LocalServer]:
    """`triage serve` in a subprocess on free loopback ports (gRPC and Flight; metrics off
    unless ``args`` set ``--metrics-port``), yielded once SERVING, stopped with SIGTERM after.
    ``args``: more `triage serve` flags; ``directory``: where its ready file and log go (default
    a temporary directory); ``env``: variables added to this process's environment."""
    with contextlib.ExitStack() as stack:
        where = Path(directory) if directory is not None else Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="triage-serve-")))
        stamp = time.monotonic_ns()
        ready, log = where / f"ready-{stamp}.json", where / f"serve-{stamp}.log"
        argv = [sys.executable, "-m", "hitl_triage.serve.cli", "serve", "--profile", str(profile), "--host", "127.0.0.1",
                "--port", "0", "--flight-port", "0", "--metrics-port", "-1", "--ready-file", str(ready)]
        argv += (["--queue", queue_url] if queue_url else []) + list(args)
        with open(log, "wb") as out:
            process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
        try:
            deadline = time.monotonic() + start_timeout_s
            while not ready.exists():
                if process.poll() is not None or time.monotonic() > deadline:
                    why = f"exit status {process.returncode}" if process.poll() is not None else f"no ready file in {start_timeout_s} s"
                    raise RuntimeError(f"triage serve: expected it SERVING, found {why}. Output:\n"
                                       f"{log.read_text(errors='replace')[-3000:]}")
                time.sleep(0.05)
            server = LocalServer(process, json.loads(ready.read_text()), log)
            yield server
        finally:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(stop_timeout_s)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()


# -- transports --------------------------------------------------------------------------------------


_FLIGHT_CODES = {
    "FlightUnavailableError": "UNAVAILABLE", "FlightTimedOutError": "DEADLINE_EXCEEDED",
    "FlightCancelledError": "CANCELLED", "FlightUnauthenticatedError": "UNAUTHENTICATED",
    "FlightUnauthorizedError": "PERMISSION_DENIED", "FlightInternalError": "INTERNAL",
    "FlightServerError": "UNKNOWN", "ArrowInvalid": "INVALID_ARGUMENT", "ArrowNotImplementedError": "UNIMPLEMENTED",
}


def _flight_error(exc: BaseException) -> TriageError:
    """The server's status and one-line message out of a Flight exception (Flight appends
    '. Detail: ...' and the gRPC debug context; the server puts the status name in extra_info)."""
    extra = getattr(exc, "extra_info", None) or b""
    code = extra.decode("ascii", "replace") if extra else _FLIGHT_CODES.get(type(exc).__name__, "UNKNOWN")
    text = str(exc)
    for marker in (". Detail: ", ". gRPC client debug context: "):
        text = text.split(marker, 1)[0]
    prefix = "Flight returned "
    if text.startswith(prefix) and ", with message: " in text:
        text = text.split(", with message: ", 1)[1]
    return TriageError(code, " ".join(text.split()))


class _FlightTransport:
    def __init__(self, hostport: str, tls: bool, root: bytes | None, headers: list[tuple[str, str]]):
        import pyarrow.flight as flight

        self._flight = flight
        location = f"{'grpc+tls' if tls else 'grpc+tcp'}://{hostport}"
        self._client = flight.FlightClient(location, tls_root_certs=root) if tls else flight.FlightClient(location)
        self._headers = [(k.encode(), v.encode()) for k, v in headers]

    def _options(self, timeout_s: float | None):
        return self._flight.FlightCallOptions(timeout=timeout_s, headers=self._headers)

    def exchange(self, kind: str, batches: Iterator[pa.RecordBatch], window: int,
                 timeout_s: float | None) -> Iterator[pa.RecordBatch]:
        flight = self._flight
        first = next(batches, None)
        if first is None:
            return
        try:
            writer, reader = self._client.do_exchange(flight.FlightDescriptor.for_command(kind.encode()),
                                                      self._options(timeout_s))
        except Exception as exc:  # noqa: BLE001 - the server's status
            raise _flight_error(exc) from None
        room = threading.Semaphore(window)
        stop = threading.Event()
        failed: list[BaseException] = []
        schema = first.schema

        def send() -> None:
            try:
                writer.begin(schema)
                for batch in _chain(first, batches):
                    while not room.acquire(timeout=0.1):
                        if stop.is_set():
                            return
                    if stop.is_set():
                        return
                    writer.write_batch(batch if batch.schema.equals(schema) else _cast(batch, schema))
                writer.done_writing()
            except flight.FlightError:
                pass  # the call ended: the reader gets its status
            except BaseException as exc:  # noqa: BLE001 - an input that cannot be read or sent
                failed.append(exc)
                try:
                    writer.done_writing()  # the server answers what it has and ends the call
                except Exception:  # noqa: BLE001
                    pass

        sender = threading.Thread(target=send, name="flight-send", daemon=True)
        sender.start()
        finished = False
        try:
            while True:
                try:
                    chunk = reader.read_chunk()
                except StopIteration:
                    break
                if chunk.data is None:
                    continue
                room.release()
                yield chunk.data
            finished = True
        except Exception as exc:  # noqa: BLE001 - the server's status
            raise _flight_error(exc) from None
        finally:
            stop.set()
            if not finished:
                reader.cancel()  # the consumer left or the call failed: end it now
            sender.join()
            try:
                writer.close()
            except Exception:  # noqa: BLE001 - the call's status was reported above
                pass
        if failed:
            raise failed[0]

    def _action(self, name: str, timeout_s: float | None) -> bytes:
        try:
            results = list(self._client.do_action(self._flight.Action(name, b""), self._options(timeout_s)))
        except Exception as exc:  # noqa: BLE001 - the server's status
            raise _flight_error(exc) from None
        return results[0].body.to_pybytes() if results else b""

    def profile(self, timeout_s: float | None) -> dict[str, Any]:
        return json.loads(self._action("profile", timeout_s))

    def stats(self, timeout_s: float | None) -> dict[str, Any]:
        return json.loads(self._action("stats", timeout_s))

    def health(self, timeout_s: float | None) -> str:
        return self._action("health", timeout_s).decode()

    def close(self) -> None:
        self._client.close()


def _chain(first: pa.RecordBatch, rest: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
    yield first
    yield from rest


def _cast(batch: pa.RecordBatch, schema: pa.Schema) -> pa.RecordBatch:
    try:
        return pa.Table.from_batches([batch]).select(schema.names).cast(schema).combine_chunks().to_batches()[0] \
            if batch.num_rows else pa.RecordBatch.from_pylist([], schema=schema)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, KeyError) as exc:
        raise TriageError("INVALID_ARGUMENT", f"batch: expected the schema of the stream's first batch ({schema}), "
                          f"found one that does not convert ({batch.schema}): {exc}") from None


class _GrpcTransport:
    def __init__(self, hostport: str, tls: bool, root: bytes | None, headers: list[tuple[str, str]]):
        import grpc

        from hitl_triage.serve.proto.triage.v1 import triage_pb2, triage_pb2_grpc

        self._grpc = grpc
        self._pb = triage_pb2
        options = [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]
        if tls:
            self._channel = grpc.secure_channel(hostport, grpc.ssl_channel_credentials(root), options=options)
        else:
            self._channel = grpc.insecure_channel(hostport, options=options)
        self._stub = triage_pb2_grpc.TriageStub(self._channel)
        self._metadata = headers

    def _error(self, exc: BaseException) -> TriageError:
        if isinstance(exc, self._grpc.RpcError):
            code = exc.code()  # type: ignore[attr-defined]
            details = exc.details() or ""  # type: ignore[attr-defined]
            return TriageError(code.name if code is not None else "UNKNOWN", " ".join(details.split()))
        return TriageError("UNKNOWN", f"{type(exc).__name__}: {exc}")

    def exchange(self, kind: str, batches: Iterator[pa.RecordBatch], window: int,
                 timeout_s: float | None) -> Iterator[pa.RecordBatch]:
        from hitl_triage.serve.service.ipc import write_batch

        pb, stub = self._pb, self._stub
        try:
            if kind != "triage":  # Report and SubmitVerdicts are unary: one call a batch
                for batch in batches:
                    if kind == "report":
                        response = stub.Report(pb.TriageRequest(arrow_ipc=write_batch(batch)), timeout=timeout_s,
                                               metadata=self._metadata)
                        yield self._decisions(response)
                    else:
                        counts = stub.SubmitVerdicts(pb.VerdictsRequest(arrow_ipc=write_batch(batch)),
                                                     timeout=timeout_s, metadata=self._metadata)
                        yield pa.RecordBatch.from_pylist([{k: getattr(counts, k) for k in
                                                           ("stored", "duplicates", "done", "moved")}])
                return
            first = next(batches, None)
            if first is None:
                return
            second = next(batches, None)
            if second is None:  # one batch: the unary call
                yield self._decisions(stub.Triage(pb.TriageRequest(arrow_ipc=write_batch(first)), timeout=timeout_s,
                                                  metadata=self._metadata))
                return
            room = threading.Semaphore(window)
            stop = threading.Event()
            failed: list[BaseException] = []

            def requests() -> Iterator:
                try:
                    for batch in _chain(first, _chain(second, batches)):
                        while not room.acquire(timeout=0.1):
                            if stop.is_set():
                                return
                        yield pb.TriageRequest(arrow_ipc=write_batch(batch))
                except BaseException as exc:  # noqa: BLE001 - grpc would only say CANCELLED
                    failed.append(exc)
                    raise

            call = stub.TriageStream(requests(), timeout=timeout_s, metadata=self._metadata)
            try:
                for response in call:
                    room.release()
                    yield self._decisions(response)
            except self._grpc.RpcError:
                if failed:
                    raise failed[0] from None
                raise
            finally:
                stop.set()
                call.cancel()  # a no-op once the call has ended
        except self._grpc.RpcError as exc:
            raise self._error(exc) from None

    @staticmethod
    def _decisions(response) -> pa.RecordBatch:
        from hitl_triage.serve.service.ipc import read_batch

        if response.rows == 0 and not response.arrow_ipc:
            from hitl_triage.engine.engine import DECISION_SCHEMA

            return pa.RecordBatch.from_pylist([], schema=DECISION_SCHEMA)
        return read_batch(response.arrow_ipc)

    def _unary(self, fn, request, timeout_s: float | None):
        try:
            return fn(request, timeout=timeout_s, metadata=self._metadata)
        except self._grpc.RpcError as exc:
            raise self._error(exc) from None

    def profile(self, timeout_s: float | None) -> dict[str, Any]:
        p = self._unary(self._stub.GetProfile, self._pb.GetProfileRequest(), timeout_s)
        t = p.thresholds
        return {
            "version": p.version, "members": p.members, "classes": p.classes, "dim": p.dim,
            "class_names": list(p.class_names), "tiers": list(p.tiers), "temperature": p.temperature,
            "thresholds": {"confidence": t.confidence, "mutual_info": t.mutual_info, "vote_floor": t.vote_floor, "ood": t.ood},
            "fit_report": json.loads(p.fit_report_json or "{}"),
        }

    def stats(self, timeout_s: float | None) -> dict[str, Any]:
        s = self._unary(self._stub.Stats, self._pb.StatsRequest(), timeout_s)
        tiers = {t.tier: {"depth": t.depth, "in_flight": t.in_flight, "oldest_age_s": t.oldest_age_s,
                          "done": t.done, "dead": t.dead} for t in s.queue}
        return {
            "profile_version": s.profile_version, "rows": s.rows, "escalated": s.escalated,
            "by_reason": dict(s.by_reason), "queue": {"tiers": tiers, "verdicts": dict(s.verdicts)} if tiers else {},
            "admitted_rows": s.admitted_rows,
        }

    def health(self, timeout_s: float | None) -> str:
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        response = self._unary(health_pb2_grpc.HealthStub(self._channel).Check,
                               health_pb2.HealthCheckRequest(service=""), timeout_s)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)

    def close(self) -> None:
        self._channel.close()
