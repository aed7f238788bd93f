"""Prometheus metrics of a server: what it decided, what it refused, how long things waited.

Served as Prometheus text on ``http://host:metrics_port/metrics`` by prometheus-client's HTTP
server, in the server process (with ``--workers N``, in the parent, which adds up its workers'
files: prometheus-client's multiprocess mode, so one scrape target counts the whole server).
Names follow Prometheus' conventions (base units, ``_total`` counters, histograms); no label
takes per-row values (``source`` is bounded by the fleet, and capped at :data:`MAX_SOURCES`).

| name | type | labels | what |
|---|---|---|---|
| hitl_triage_rows_total | counter | | rows decided |
| hitl_triage_escalations_total | counter | tier, source | rows escalated |
| hitl_triage_escalation_reasons_total | counter | reason | reason bits set in escalated rows (a row with two reasons counts in both) |
| hitl_triage_knn_rescored_rows_total | counter | | rows whose k-NN distance was re-scored exactly (near or above the anomaly threshold) |
| hitl_triage_review_queue_depth | gauge | tier | open items in the review queue |
| hitl_triage_review_queue_oldest_age_seconds | gauge | tier | age of the oldest open item |
| hitl_triage_admitted_rows | gauge | | rows admitted by the batcher, not yet answered |
| hitl_triage_rejected_calls_total | counter | code | calls ended with a status other than OK |
| hitl_triage_request_seconds | histogram | face | call duration (triage.v1, inference); flight: each batch of an exchange |
| hitl_triage_batcher_queue_seconds | histogram | | time a batch's oldest request waited in the batcher |
| hitl_triage_batch_rows | histogram | | rows per engine batch |
| hitl_triage_queue_writes_total | counter | outcome | review-queue writes (ok, failed) |
| hitl_triage_queue_write_batches | histogram | | engine batches stored per write (group commit) |
| hitl_triage_budget_step | gauge | | online budget control's step (0: the profile's thresholds; absent when off) |
| hitl_triage_budget_threshold | gauge | trigger | the threshold in force (confidence, mutual_info, ood) |
| hitl_triage_budget_window_escalation_ratio | gauge | | share of the tracker's window the last step escalates |
| hitl_triage_override_ratio, _audited_accuracy_ratio, _drift_psi ... | gauge | | the monitoring figures: see monitoring_metrics.py |

The gauges are refreshed from ``queue.stats()`` every :data:`REFRESH_S` seconds by a thread.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from wsgiref.simple_server import WSGIServer

import grpc
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from .monitoring_metrics import MonitoringGauges

logger = logging.getLogger(__name__)

REFRESH_S = 2.0
MONITORING_REFRESH_S = 10.0  # the monitoring gauges at most this often (they read the queue's verdicts)
MAX_SOURCES = 256          # distinct source labels per process; more are counted as "other"
WORKER_PID_KEY = "x-triage-worker-pid"  # trailing metadata of every call: the process that answered
REASONS = {1: "confidence", 2: "disagreement", 4: "policy", 8: "anomaly", 16: "audit", 32: "reported",
           64: "known_edge_case"}
FACES = {"/triage.v1.Triage/": "triage.v1", "/inference.GRPCInferenceService/": "inference"}
SECONDS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
ROWS = tuple(float(4 ** i) for i in range(10))  # 1 .. 262,144


class Metrics:
    """The metric objects of one server process, and the hooks that feed them.

    ``observe(name, value)`` is the batcher's and the queue writer's callback; ``decided(decisions)``
    counts an engine batch; ``call(face, seconds, code)`` a finished call; ``watch(service)``
    starts the gauges' refresher. ``registry``: where the metrics register (a private one by
    default, so that several servers can live in one test process).
    """

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = r = registry if registry is not None else CollectorRegistry(auto_describe=True)
        self.rows = Counter("hitl_triage_rows", "Rows decided.", registry=r)
        self.escalations = Counter("hitl_triage_escalations", "Rows escalated to review.", ["tier", "source"], registry=r)
        self.knn_rescored = Counter("hitl_triage_knn_rescored_rows",
                                    "Rows whose k-NN distance was re-scored exactly (near or above the anomaly threshold).",
                                    registry=r)
        self.reasons = Counter("hitl_triage_escalation_reasons",
                               "Reason bits set in escalated rows (a row with two reasons counts in both).",
                               ["reason"], registry=r)
        self.queue_depth = Gauge("hitl_triage_review_queue_depth", "Open items in the review queue.", ["tier"],
                                 registry=r, multiprocess_mode="mostrecent")
        self.queue_age = Gauge("hitl_triage_review_queue_oldest_age_seconds", "Age of the oldest open item.",
                               ["tier"], registry=r, multiprocess_mode="mostrecent")
        self.admitted = Gauge("hitl_triage_admitted_rows", "Rows admitted by the batcher and not yet answered.",
                              registry=r, multiprocess_mode="livesum")
        self.rejected = Counter("hitl_triage_rejected_calls", "Calls ended with a status other than OK.", ["code"],
                                registry=r)
        self.request_seconds = Histogram("hitl_triage_request_seconds", "Call duration.", ["face"], buckets=SECONDS,
                                         registry=r)
        self.batcher_seconds = Histogram("hitl_triage_batcher_queue_seconds",
                                         "Time the oldest request of an engine batch waited in the batcher.",
                                         buckets=SECONDS, registry=r)
        self.batch_rows = Histogram("hitl_triage_batch_rows", "Rows per engine batch.", buckets=ROWS, registry=r)
        self.writes = Counter("hitl_triage_queue_writes", "Review-queue writes.", ["outcome"], registry=r)
        self.write_batches = Histogram("hitl_triage_queue_write_batches", "Engine batches stored per queue write.",
                                       buckets=(1, 2, 4, 8, 16, 32), registry=r)
        self.budget_step = Gauge("hitl_triage_budget_step", "Online budget control's step (0: the profile's thresholds).",
                                 registry=r, multiprocess_mode="mostrecent")
        self.budget_threshold = Gauge("hitl_triage_budget_threshold", "Threshold in force under online budget control.",
                                      ["trigger"], registry=r, multiprocess_mode="mostrecent")
        self.budget_window = Gauge("hitl_triage_budget_window_escalation_ratio",
                                   "Share of the budget tracker's window that the last step's thresholds escalate.",
                                   registry=r, multiprocess_mode="mostrecent")
        self.monitoring = MonitoringGauges(r)  # the monitoring figures' gauges (monitoring_metrics.py)
        self._sources: set[str] = set()
        self._stop = threading.Event()
        self._http: WSGIServer | None = None

    # -- hooks ---------------------------------------------------------------------------------------

    def observe(self, name: str, value) -> None:
        """The batcher's ``("batch", (rows, seconds waited))`` and the writer's ``("write",
        (batches, ok))``."""
        if name == "batch":
            rows, waited = value
            self.batch_rows.observe(rows)
            self.batcher_seconds.observe(max(0.0, waited))
        elif name == "write":
            batches, ok = value
            self.writes.labels("ok" if ok else "failed").inc()
            self.write_batches.observe(batches)

    def decided(self, decisions: pa.RecordBatch) -> None:
        """Count one engine batch: its rows, and its escalated rows by tier and source and by
        reason bit. Rows are not counted by source: hashing every row's source cost about 2 ms a
        64k-row batch on the 2-core VM (5% of the engine); the escalated rows are a tenth of that."""
        n = decisions.num_rows
        if n == 0:
            return
        self.rows.inc(n)
        if "ood_rescored" in decisions.schema.names:  # a profile with a k-NN bank
            self.knn_rescored.inc(int(pc.sum(decisions.column("ood_rescored")).as_py() or 0))
        escalate = decisions.column("escalate")
        escalated = int(pc.sum(escalate).as_py() or 0)
        if escalated == 0:
            return
        mask = np.asarray(pc.filter(decisions.column("reason_mask"), escalate).to_numpy(zero_copy_only=False),
                          dtype=np.uint8)
        per_mask = np.bincount(mask, minlength=256)
        for bit, reason in REASONS.items():
            fired = int(per_mask[(np.arange(256) & bit) != 0].sum())
            if fired:
                self.reasons.labels(reason).inc(fired)
        tiers = _codes(pc.filter(decisions.column("tier"), escalate))
        if "source" in decisions.schema.names:
            sources = _codes(pc.filter(decisions.column("source"), escalate))
        else:
            sources = (np.zeros(escalated, dtype=np.int64), ["unknown"])
        width = len(sources[1])
        counts = np.bincount(tiers[0] * width + sources[0], minlength=len(tiers[1]) * width)
        for k in np.flatnonzero(counts):
            tier, source = tiers[1][k // width], sources[1][k % width]
            self.escalations.labels(tier, self._source_label(source)).inc(int(counts[k]))

    def _source_label(self, value: str) -> str:
        if value in self._sources:
            return value
        if len(self._sources) >= MAX_SOURCES:
            return "other"
        self._sources.add(value)
        if len(self._sources) == MAX_SOURCES:
            logger.warning("metrics: %d distinct sources; further ones are counted as source=\"other\"", MAX_SOURCES)
        return value

    def call(self, face: str | None, seconds: float, code: grpc.StatusCode | str | None) -> None:
        """A finished call: its duration by face (None: not timed, e.g. health) and, when its
        status was not OK, the status name."""
        if face is not None:
            self.request_seconds.labels(face).observe(seconds)
        name = getattr(code, "name", code)
        if name is not None and name != "OK":
            self.rejected.labels(name).inc()

    # -- gauges --------------------------------------------------------------------------------------

    def refresh(self, service) -> None:
        self.admitted.set(service.batcher.admitted_rows)
        budget = service.budget.state() if getattr(service, "budget", None) is not None else {}
        if "step" in budget:
            self.budget_step.set(budget["step"])
            for trigger in ("confidence", "mutual_info", "ood"):
                self.budget_threshold.labels(trigger).set(budget["thresholds"][trigger])
            self.budget_window.set(budget["window_rate"])
        if getattr(service, "monitor", None) is not None:
            self.monitoring.set(service.monitor.figures(max_age_s=MONITORING_REFRESH_S))
        if service.queue is None:
            return
        for tier, entry in service.queue.stats().get("tiers", {}).items():
            self.queue_depth.labels(tier).set(entry.get("depth", 0))
            self.queue_age.labels(tier).set(entry.get("oldest_age_s", 0.0) or 0.0)

    def watch(self, service, every_s: float = REFRESH_S) -> None:
        """Refresh the gauges now and every ``every_s`` seconds until :meth:`close`."""

        def loop() -> None:
            while True:
                try:
                    self.refresh(service)
                except Exception:  # a queue that cannot answer now may answer later
                    logger.warning("metrics: queue stats failed; the queue gauges keep their last values",
                                   exc_info=True)
                if self._stop.wait(every_s):
                    return

        threading.Thread(target=loop, name="metrics-refresh", daemon=True).start()

    def serve(self, host: str, port: int) -> int:
        """Serve these metrics over HTTP on host:port (0: any free port) until :meth:`close`;
        returns the bound port."""
        self._http, bound = serve_metrics(host, port, self.registry)
        return bound

    def close(self) -> None:
        self._stop.set()
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()


# -- the HTTP endpoint -----------------------------------------------------------------------------


def _codes(values: pa.Array) -> tuple[np.ndarray, list[str]]:
    """(int64 codes [n], the distinct values they index), nulls as "unknown"."""
    encoded = pc.dictionary_encode(pc.fill_null(values.cast(pa.string()), "unknown"))
    return encoded.indices.to_numpy(zero_copy_only=False).astype(np.int64), encoded.dictionary.to_pylist()


def serve_metrics(host: str, port: int, registry) -> tuple[WSGIServer, int]:
    """prometheus-client's HTTP server for ``registry`` on host:port (0: any free port), in a
    daemon thread; returns (server, bound port)."""
    from prometheus_client import start_http_server

    try:
        server, _thread = start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        raise OSError(f"serve.metrics_port: expected to bind {host}:{port}, found it taken or not allowed ({exc})") from exc
    return server, server.server_port


def multiprocess_registry(directory: str) -> CollectorRegistry:
    """A registry that adds up the metric files the workers write into ``directory``
    (PROMETHEUS_MULTIPROC_DIR in their environment)."""
    from prometheus_client import multiprocess

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=directory)
    return registry


# -- the gRPC side ---------------------------------------------------------------------------------


def face_of(method: str) -> str | None:
    for prefix, face in FACES.items():
        if method.startswith(prefix):
            return face
    return None


class CallInterceptor(grpc.ServerInterceptor):
    """Times every call of the gRPC port and counts those that end with an error status (into
    ``metrics``, when given), and names the answering process in the trailing metadata
    :data:`WORKER_PID_KEY` (with ``--workers N``, which worker answered). Put it first, so that it
    sees the refusals of the interceptors after it."""

    def __init__(self, metrics: Metrics | None):
        self.metrics = metrics
        self._pid = ((WORKER_PID_KEY, str(os.getpid())),)

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        face = face_of(handler_call_details.method)
        kind = (handler.request_streaming, handler.response_streaming)
        behavior = {(False, False): handler.unary_unary, (False, True): handler.unary_stream,
                    (True, False): handler.stream_unary, (True, True): handler.stream_stream}[kind]
        wrap = self._wrap_stream if handler.response_streaming else self._wrap_unary
        make = {(False, False): grpc.unary_unary_rpc_method_handler, (False, True): grpc.unary_stream_rpc_method_handler,
                (True, False): grpc.stream_unary_rpc_method_handler, (True, True): grpc.stream_stream_rpc_method_handler}[kind]
        return make(wrap(behavior, face), request_deserializer=handler.request_deserializer,
                    response_serializer=handler.response_serializer)

    def _finish(self, face, started: float, context, failed: BaseException | None) -> None:
        if self.metrics is None:
            return
        code = _code_of(context, failed)
        self.metrics.call(face, time.perf_counter() - started, code)

    def _wrap_unary(self, behavior: Callable, face):
        def call(request, context):
            started = time.perf_counter()
            context.set_trailing_metadata(self._pid)
            try:
                response = behavior(request, context)
            except BaseException as exc:
                self._finish(face, started, context, exc)
                raise
            self._finish(face, started, context, None)
            return response

        return call

    def _wrap_stream(self, behavior: Callable, face):
        def call(request, context):
            started = time.perf_counter()
            context.set_trailing_metadata(self._pid)
            try:
                yield from behavior(request, context)
            except BaseException as exc:
                self._finish(face, started, context, exc)
                raise
            self._finish(face, started, context, None)

        return call


def _code_of(context, failed: BaseException | None):
    """The status a call ends with: the one set by abort/set_code, else OK, UNKNOWN for an
    exception the handler let out, CANCELLED when the client went away."""
    code = context.code() if hasattr(context, "code") else None
    if code is not None:
        return code
    if isinstance(failed, GeneratorExit) or (failed is not None and not context.is_active()):
        return grpc.StatusCode.CANCELLED
    if failed is not None:
        return grpc.StatusCode.UNKNOWN
    return grpc.StatusCode.OK
