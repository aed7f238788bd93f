"""The Arrow Flight face: the fast path for fleets (record batches on the wire, no protobuf copy).

``DoExchange`` takes a stream of prediction batches and answers one decisions batch per input
batch, in order. Each batch goes through ``service.decide``, like a ``triage.v1`` call: the one
dynamic batcher coalesces it with other clients' rows, and its escalations are stored by the one
queue writer before its decisions are written back (durable before acknowledged). The
descriptor's command (or first path element) says what the stream carries:

- ``triage`` (or empty): predictions in, decisions out;
- ``report``: predictions users challenged, decided with the REPORTED reason (``Report``);
- ``verdicts``: reviewers' verdicts in (the verdict columns), one row of counts out per batch
  (``stored``, ``duplicates``, ``done``, ``moved``; ``SubmitVerdicts``).

``DoAction``: ``health`` (``SERVING`` / ``NOT_SERVING``, never asks for a token), ``stats`` and
``profile`` (JSON, the fields of ``Stats`` and ``GetProfile``), ``reload`` (body: a profile
directory or empty; JSON of the previous and new versions).

Errors carry the message the ``triage.v1`` face gives and, in ``extra_info``, the name of the
gRPC status that face would answer (Flight cannot send RESOURCE_EXHAUSTED or INVALID_ARGUMENT
itself): bad input ``FlightServerError`` (INVALID_ARGUMENT), a full admission queue
``FlightUnavailableError`` (RESOURCE_EXHAUSTED), a review queue that cannot store
``FlightUnavailableError`` (UNAVAILABLE), a passed deadline ``FlightTimedOutError``, a cancelled
call ``FlightCancelledError``, a server shutting down ``FlightUnavailableError`` (UNAVAILABLE).

Authentication: an ``authorization: Bearer <token>`` header, read by the middleware registered
as :data:`AUTH_MIDDLEWARE`; each call asks ``authorize(token, method)`` (``auth.Authorizer.check``)
where ``method`` is the ``triage.v1`` method the call stands for (:data:`METHODS`), so one role
table serves both faces.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from typing import Any, Callable, Iterator

import pyarrow as pa
import pyarrow.flight as flight

from hitl_triage.engine.decode import BatchError

from .batcher import Expired, Overloaded
from .ipc import validated
from .writer import QueueUnavailable

logger = logging.getLogger(__name__)

AUTH_MIDDLEWARE = "auth"
# What each Flight call stands for, as the triage.v1 method an authorizer knows.
METHODS = {
    "triage": "/triage.v1.Triage/Triage",
    "report": "/triage.v1.Triage/Report",
    "verdicts": "/triage.v1.Triage/SubmitVerdicts",
    "stats": "/triage.v1.Triage/Stats",
    "profile": "/triage.v1.Triage/GetProfile",
    "reload": "/triage.v1.Triage/ReloadProfile",
}
EXCHANGES = ("triage", "report", "verdicts")
ACTIONS = {
    "health": "SERVING or NOT_SERVING (no token needed)",
    "stats": "JSON: rows and escalations decided by this process, queue depth per tier, admitted rows",
    "profile": "JSON: version, members, classes, dim, class names, tiers, temperature, thresholds, fit report",
    "reload": "switch to the profile directory's current version (body: another directory, or empty); JSON",
}
VERDICT_COUNTS = pa.schema([(name, pa.int64()) for name in ("stored", "duplicates", "done", "moved")])

# authorize(token or None, triage.v1 method), raising to refuse (auth.Authorizer.check): an
# exception whose ``code`` is grpc.StatusCode.PERMISSION_DENIED (or that name) or a PermissionError
# ends PERMISSION_DENIED, any other UNAUTHENTICATED. What it returns (the role) is not used.
Authorize = Callable[[str | None, str], object]


class _TokenMiddleware(flight.ServerMiddleware):
    def __init__(self, token: str | None):
        self.token = token


class _TokenMiddlewareFactory(flight.ServerMiddlewareFactory):
    """Keeps the call's bearer token for the handler, which knows what the call asks for."""

    def start_call(self, info, headers):
        from .auth import bearer_token

        return _TokenMiddleware(bearer_token(headers.get("authorization")))


class _Alive:
    """``alive()`` for the batcher: False once the client cancelled or its deadline passed.

    Asked at most every ``interval_s`` (answered from the last look in between), and never in
    the first ``interval_s`` after the batch arrived: pyarrow's ``ServerCallContext.is_cancelled``
    holds the GIL while gRPC polls the call, about a millisecond, which with the batcher asking
    for every request of every batch stopped the whole server (64 clients sending 64-row
    batches: 47% of the GIL's time went there).
    """

    __slots__ = ("_context", "_interval", "_checked", "_alive")

    def __init__(self, context, interval_s: float = 0.1):
        self._context = context
        self._interval = interval_s
        self._checked = time.monotonic()
        self._alive = True

    def __call__(self) -> bool:
        now = time.monotonic()
        if self._alive and now - self._checked >= self._interval:
            self._alive = not self._context.is_cancelled()
            self._checked = now
        return self._alive


def flight_error(exc: BaseException, *, stopping: bool = False) -> flight.FlightError:
    """The Flight error for what went wrong, with the triage.v1 face's message and status name."""
    from hitl_triage.serve.queue import QueueError

    text = str(exc)
    if isinstance(exc, flight.FlightError):
        return exc
    if isinstance(exc, Overloaded):
        return flight.FlightUnavailableError(text, b"RESOURCE_EXHAUSTED")
    if isinstance(exc, Expired):
        if "deadline" in text:
            return flight.FlightTimedOutError(text, b"DEADLINE_EXCEEDED")
        return flight.FlightCancelledError(text, b"CANCELLED")
    if isinstance(exc, QueueUnavailable):
        return flight.FlightUnavailableError(text, b"UNAVAILABLE")
    if isinstance(exc, (BatchError, QueueError, ValueError, TypeError)):
        return flight.FlightServerError(text, b"INVALID_ARGUMENT")
    if stopping:
        return flight.FlightUnavailableError(f"server: shutting down ({text}); retry on another replica", b"UNAVAILABLE")
    return flight.FlightInternalError(f"{type(exc).__name__}: {exc}", b"INTERNAL")


def _refusal(exc: BaseException) -> flight.FlightError:
    code = getattr(exc, "code", None)
    code = getattr(code, "name", code)  # a grpc.StatusCode, or its name
    text = str(exc) or type(exc).__name__
    if code == "PERMISSION_DENIED" or (code is None and isinstance(exc, PermissionError)):
        return flight.FlightUnauthorizedError(text, b"PERMISSION_DENIED")
    return flight.FlightUnauthenticatedError(text, b"UNAUTHENTICATED")


def profile_info(profile) -> dict[str, Any]:
    """What ``GetProfile`` answers, as a dict (the ``profile`` action's JSON)."""
    t = profile.thresholds
    return {
        "version": profile.version, "members": profile.members, "classes": profile.classes, "dim": profile.dim or 0,
        "class_names": list(profile.class_names), "tiers": list(profile.config.tiers.order),
        "temperature": profile.temperature,
        "thresholds": {"confidence": t.confidence, "mutual_info": t.mutual_info, "vote_floor": t.vote_floor, "ood": t.ood},
        "fit_report": profile.fit_report,
    }


class FlightTriageServer(flight.FlightServerBase):
    """The Flight face of one :class:`~.server.Service`, serving from construction on.

    ``authorize``: see :data:`Authorize`. Without one, a server whose ``[serve] tokens`` are set
    refuses every call but ``health`` (fail closed), and one without tokens lets every call in.
    ``max_message_bytes``: the largest input batch accepted (Flight itself takes any size).
    """

    def __init__(self, service, location: str, *, authorize: Authorize | None = None,
                 tls_certificates: list[tuple[bytes, bytes]] | None = None, max_message_bytes: int = 256 << 20,
                 client_ca: bytes | None = None):
        super().__init__(location, tls_certificates=tls_certificates, verify_client=client_ca is not None,
                         root_certificates=client_ca, middleware={AUTH_MIDDLEWARE: _TokenMiddlewareFactory()})
        self.service = service
        self.authorize = authorize
        self.max_message_bytes = max_message_bytes
        self._stopping = threading.Event()

    # -- helpers -----------------------------------------------------------------------------------

    def _check(self, context, what: str) -> None:
        """Refuse the call unless its token may do ``what`` (a key of METHODS)."""
        middleware = context.get_middleware(AUTH_MIDDLEWARE)
        token = middleware.token if middleware is not None else None
        if self.authorize is None:
            if self.service.config.tokens:
                raise flight.FlightUnauthenticatedError(
                    "flight: expected an authorizer for the configured [serve] tokens, found none; "
                    "every call but health is refused", b"UNAUTHENTICATED")
            return
        try:
            self.authorize(token, METHODS[what])
        except Exception as exc:  # noqa: BLE001 - any refusal becomes its status
            raise self._counted(_refusal(exc)) from None

    def _counted(self, error: flight.FlightError) -> flight.FlightError:
        """``error``, counted among the rejected calls by its status name (the extra info every
        error of this face carries)."""
        if self.service.metrics is not None:
            info = error.extra_info or b""
            self.service.metrics.call(None, 0.0, info.decode("ascii", "replace") or type(error).__name__)
        return error

    def _refuse_if_stopping(self) -> None:
        if self._stopping.is_set():
            raise flight.FlightUnavailableError("server: shutting down; retry on another replica", b"UNAVAILABLE")

    @staticmethod
    def _kind(descriptor) -> str:
        if descriptor.descriptor_type == flight.DescriptorType.PATH:
            raw = descriptor.path[0] if descriptor.path else b""
        else:
            raw = descriptor.command or b""
        kind = (raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)).strip().lower() or "triage"
        if kind not in EXCHANGES:
            raise flight.FlightServerError(
                f"descriptor: expected a command among {list(EXCHANGES)}, found {kind!r}", b"INVALID_ARGUMENT")
        return kind

    def _check_size(self, batch: pa.RecordBatch) -> None:
        size = batch.nbytes
        if size > self.max_message_bytes:
            raise flight.FlightServerError(
                f"message: expected a batch of at most {self.max_message_bytes / 2**20:.0f} MiB (serve.max_message_mb), "
                f"found {size / 2**20:.1f} MiB in {batch.num_rows:,} rows; send smaller batches", b"INVALID_ARGUMENT")

    # -- DoExchange --------------------------------------------------------------------------------

    def do_exchange(self, context, descriptor, reader, writer):
        kind = self._kind(descriptor)
        self._check(context, kind)
        started = False
        for batch in self._incoming(reader):
            arrived = time.monotonic()
            try:
                self._refuse_if_stopping()
                validated(batch, "batch")  # offsets, lengths, UTF-8: before anything reads its values
                self._check_size(batch)
                out = self._answer(kind, batch, _Alive(context), context)
            except Exception as exc:  # noqa: BLE001 - mapped to a Flight error
                raise self._counted(flight_error(exc, stopping=self._stopping.is_set())) from None
            if not started:
                writer.begin(out.schema)
                started = True
            writer.write_batch(out)
            if self.service.metrics is not None:  # an exchange is long-lived: each batch is timed
                self.service.metrics.call("flight", time.monotonic() - arrived, None)

    def _incoming(self, reader) -> Iterator[pa.RecordBatch]:
        """The record batches the client sends; a message Arrow cannot read ends the call
        INVALID_ARGUMENT (the reader's words), not as an unknown error."""
        chunks = iter(reader)
        while True:
            try:
                chunk = next(chunks)
            except StopIteration:
                return
            except flight.FlightError:
                raise
            except (pa.ArrowException, OSError) as exc:
                detail = " ".join(str(exc).split())
                raise self._counted(flight.FlightServerError(
                    f"batch: expected an Arrow IPC message, found one that cannot be read ({detail})",
                    b"INVALID_ARGUMENT")) from None
            if chunk.data is not None:  # metadata only: nothing to decide
                yield chunk.data

    def _answer(self, kind: str, batch: pa.RecordBatch, alive: Callable[[], bool], context=None) -> pa.RecordBatch:
        if kind == "verdicts":
            queue = self.service.queue
            if queue is None:
                raise flight.FlightServerError(
                    "verdicts: expected a server with a review queue (--queue URL), found none", b"FAILED_PRECONDITION")
            authorizer = getattr(self.service, "authorizer", None)
            if authorizer is not None and context is not None:  # a token bound to a reviewer or tiers
                middleware = context.get_middleware(AUTH_MIDDLEWARE)
                try:
                    authorizer.check_verdicts(middleware.token if middleware is not None else None, batch)
                except Exception as exc:  # noqa: BLE001 - the refusal's status
                    raise _refusal(exc) from None
            counts = queue.submit(batch) if batch.num_rows else {}
            return pa.RecordBatch.from_pylist([{k: int(counts.get(k, 0)) for k in VERDICT_COUNTS.names}],
                                              schema=VERDICT_COUNTS)
        decisions = self.service.decide(batch, alive=alive, reported=kind == "report")
        if decisions is None:  # zero rows: nothing to queue, but the stream still answers in kind
            decisions = self.service.engines.engine.triage(batch)
        return decisions

    # -- DoAction ----------------------------------------------------------------------------------

    def list_actions(self, context):
        return list(ACTIONS.items())

    def do_action(self, context, action) -> Iterator[flight.Result]:
        name = action.type
        if name == "health":
            yield flight.Result(b"NOT_SERVING" if self._stopping.is_set() else b"SERVING")
            return
        if name not in ACTIONS:
            raise flight.FlightServerError(f"action: expected one of {sorted(ACTIONS)}, found {name!r}", b"INVALID_ARGUMENT")
        self._check(context, name)
        try:
            if name == "stats":
                body: Any = self.service.stats()
            elif name == "profile":
                body = profile_info(self.service.engines.profile)
            else:
                path = action.body.to_pybytes().decode() if action.body is not None else ""
                previous, version = self.service.engines.reload(path or None)
                body = {"previous_version": previous, "version": version}
        except Exception as exc:  # noqa: BLE001 - mapped to a Flight error
            raise flight_error(exc) from None
        yield flight.Result(json.dumps(body, default=str).encode())

    # -- life cycle --------------------------------------------------------------------------------

    def stop(self, grace_s: float) -> threading.Event:
        """Health NOT_SERVING and new batches refused at once (UNAVAILABLE: the client retries
        elsewhere); the batches being decided are answered; then the port closes. Returns an
        event set once it has (an exchange left open by an idle client can hold the port up to
        ``grace_s``; the caller moves on after waiting that long)."""
        self._stopping.set()
        done = threading.Event()

        def shut() -> None:
            try:
                self.shutdown()  # waits for the handlers running now
            finally:
                done.set()

        threading.Thread(target=shut, name="flight-shutdown", daemon=True).start()
        return done


def start_flight_server(service, config, *, authorize: Authorize | None = None) -> FlightTriageServer:
    """The Flight face of ``service`` on ``config.host:config.flight_port`` (0: any free port),
    over TLS when ``config.tls_cert`` / ``tls_key`` are set. Arrow Flight turns SO_REUSEPORT off
    (arrow/flight/transport/grpc/grpc_server.cc), so two processes cannot share its port."""
    from .auth import client_ca_pem

    tls = None
    scheme = "grpc+tcp"
    if config.tls_cert:
        with open(config.tls_cert, "rb") as cert, open(config.tls_key, "rb") as key:
            tls = [(cert.read(), key.read())]
        scheme = "grpc+tls"
    host = f"[{config.host}]" if ":" in config.host else config.host
    location = f"{scheme}://{host}:{config.flight_port}"
    try:
        return FlightTriageServer(service, location, authorize=authorize, tls_certificates=tls,
                                  max_message_bytes=config.max_message_mb << 20, client_ca=client_ca_pem(config))
    except (pa.ArrowException, OSError) as exc:
        raise OSError(f"serve.flight_port: expected to bind {config.host}:{config.flight_port}, "
                      f"found it taken or not allowed ({exc})") from exc

