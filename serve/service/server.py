"""One server process: the engine, the dynamic batcher, the queue writer and the faces over them.

    service = Service.start(profile_dir, queue_url, config)   # binds the ports, SERVING
    service.wait()                                            # until SIGTERM / SIGINT / stop()

Shutdown (SIGTERM): health turns NOT_SERVING, new calls are refused, the calls already admitted
are decided and their escalations written, then the ports close; nothing acknowledged is lost.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pyarrow as pa

from hitl_triage.engine.monitoring import TriageSummary

from .batcher import Batcher
from .budget import BudgetHook
from .config import ServeConfig
from .engines import EngineHolder
from .monitoring import ServiceMonitor, attach_gold
from .writer import QueueWriter

logger = logging.getLogger(__name__)
RELOAD_POLL_S = 2.0


class Service:
    """What every face calls: ``decide`` (through the batcher), ``queue``, ``engines``, ``stats``."""

    def __init__(self, engines: EngineHolder, queue, config: ServeConfig, metrics=None):
        self.engines = engines
        self.queue = queue
        self.config = config
        self.metrics = metrics  # metrics.Metrics, or None: metrics off
        self.summary = TriageSummary()
        self._summary_lock = threading.Lock()
        self.budget = BudgetHook(config.budget_control) if config.budget_control.enabled else None
        if self.budget is not None:
            self.budget.prepare(engines.engine)  # a profile it cannot hold is refused now, not per batch
        self.monitor = ServiceMonitor(engines.profile, queue)  # the monitoring figures (monitoring.py)
        observe = metrics.observe if metrics is not None else None
        self.writer = QueueWriter(queue, observe=observe)
        self.batcher = Batcher(self._decide_batch, self.writer, max_batch_rows=config.max_batch_rows,
                               max_delay_s=config.max_delay_s, max_queue_rows=config.max_queue_rows, observe=observe)
        self.authorizer: Any = None  # auth.Authorizer when tokens are set: verdicts check the token's binding
        self.grpc_server = None
        self.flight_server = None
        self.health = None
        self.health_names: tuple[str, ...] = ("triage.v1.Triage",)  # every service the gRPC port serves
        self.ports: dict[str, int] = {}
        self._stopped = threading.Event()
        self._finished = threading.Event()  # set once stop() has closed everything

    # -- deciding ----------------------------------------------------------------------------------

    def _decide_batch(self, batch: pa.RecordBatch, reported: bool) -> pa.RecordBatch:
        engine = self.engines.engine if self.budget is None else self.budget.prepare(self.engines.engine)
        if reported:
            decisions = engine.triage(batch, reported=True)
        else:
            decisions = engine.triage(batch)
        if self.budget is not None:
            decisions = self.budget.observe(decisions, reported=reported)
        with self._summary_lock:
            self.summary.update(decisions)
        if self.metrics is not None:
            self.metrics.decided(decisions)
        self.monitor.decided(decisions)
        return decisions

    def decide(self, batch: pa.RecordBatch, *, deadline: float | None = None, alive=lambda: True,
               reported: bool = False) -> pa.RecordBatch | None:
        """The decisions of ``batch`` once its escalations are stored (None for zero rows)."""
        future = self.batcher.submit(batch, deadline=deadline, alive=alive, reported=reported)
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic()) + 30.0
        return future.result(timeout)

    def stats(self) -> dict:
        with self._summary_lock:
            s = self.summary
            by_reason = {k: int(v) for k, v in s.by_reason.items()}
            rows, escalated = int(s.rows), int(s.escalated)
        return {
            "profile_version": self.engines.profile.version, "rows": rows, "escalated": escalated,
            "by_reason": by_reason, "queue": self.queue.stats() if self.queue is not None else {},
            "admitted_rows": self.batcher.admitted_rows,
            "budget": self.budget.state() if self.budget is not None else {"enabled": False},
            "monitoring": self.monitor.figures(),
        }

    # -- life cycle --------------------------------------------------------------------------------

    @classmethod
    def start(cls, profile_dir: str | Path, queue_url: str | None, config: ServeConfig, *, device: str | None = None,
              queue_config: Path | None = None, worker: bool = False) -> "Service":
        """``worker``: one of ``--workers N`` processes (its metrics go to the parent, which serves them)."""
        from hitl_triage.serve.commands.queue import open_from_args

        from . import auth
        from . import metrics as ops_metrics
        from .grpc_server import build_grpc_server
        from .inference import add_inference_servicer

        engines = EngineHolder(profile_dir, device=device)
        queue = open_from_args(queue_url, queue_config, tiers=engines.profile.config.tiers.order) if queue_url else None
        service = cls(engines, queue, config, metrics=ops_metrics.Metrics() if config.metrics_port >= 0 else None)
        attach_gold(queue, engines.engine, service.monitor)  # gold items and the drift reference ([queue] gold_pool)
        authorizer = auth.Authorizer(config.tokens)
        service.authorizer = authorizer if authorizer.enabled else None  # verdicts check the token's reviewer, tiers
        auth.log_mode(config.tokens)
        interceptors = [ops_metrics.CallInterceptor(service.metrics)] + ([auth.AuthInterceptor(authorizer)] if authorizer.enabled else [])
        server, port, health_servicer, served_names = build_grpc_server(
            service, host=config.host, port=config.port, max_message_bytes=config.max_message_mb << 20,
            interceptors=interceptors, credentials=auth.server_credentials(config),
            extra_servicers=(add_inference_servicer(service),),  # the Open Inference Protocol, same port
            reflection_on=config.reflection,
        )
        service.grpc_server, service.health = server, health_servicer
        service.health_names = tuple(served_names)
        service.ports["grpc"] = port
        if config.flight_port >= 0:  # the Flight face (flight_server.py); -1: off
            from .flight_server import start_flight_server

            flight_server = start_flight_server(service, config, authorize=authorizer.check)
            service.flight_server, service.ports["flight"] = flight_server, flight_server.port  # type: ignore[assignment]
        if service.metrics is not None:
            service.metrics.watch(service)
            if not worker:
                service.ports["metrics"] = service.metrics.serve(config.host, config.metrics_port)
        server.start()
        service._set_serving(True)
        threading.Thread(target=service._watch_profile, name="profile-watch", daemon=True).start()
        if config.feedback_every_s > 0 and queue is not None and not worker:  # [serve] feedback_every_s
            from hitl_triage.serve.commands.feedback import scheduled_feedback

            threading.Thread(target=scheduled_feedback, args=(service, config.feedback_every_s, queue_config),
                             name="feedback", daemon=True).start()
        return service

    def _set_serving(self, serving: bool) -> None:
        from grpc_health.v1 import health_pb2

        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        if self.health is not None:
            for name in ("", *self.health_names):
                self.health.set(name, status)

    def _watch_profile(self) -> None:
        while not self._stopped.wait(RELOAD_POLL_S):
            if self.engines.changed_on_disk():
                try:
                    self.engines.reload()
                except Exception:  # noqa: BLE001 - keep serving the version we have
                    logger.exception("profile reload failed; still serving %s", self.engines.profile.version)

    def stop(self, grace_s: float = 30.0) -> None:
        """NOT_SERVING, finish what was admitted, close the ports."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        try:
            self._shut_down(grace_s)
        finally:
            self._finished.set()

    def _shut_down(self, grace_s: float) -> None:
        self._set_serving(False)
        stopped = self.grpc_server.stop(grace_s) if self.grpc_server is not None else None
        flight_stopped = self.flight_server.stop(grace_s) if self.flight_server is not None else None
        self.batcher.close(grace_s)  # decides and writes what was admitted
        if stopped is not None:
            stopped.wait(grace_s)
        if flight_stopped is not None:
            flight_stopped.wait(grace_s)
        if self.queue is not None:
            self.queue.close()
        if self.metrics is not None:
            self.metrics.close()

    def wait(self) -> None:
        """Until stop() has finished (a SIGTERM's admitted calls answered, the ports closed): the
        main thread stays here, so a second signal meanwhile reaches our handler, not the default."""
        self._finished.wait()

    def install_signal_handlers(self) -> None:
        def handle(signum, frame):
            logger.warning("signal %d: finishing admitted calls, then stopping", signum)
            threading.Thread(target=self.stop, name="shutdown").start()

        signal.signal(signal.SIGTERM, handle)
        signal.signal(signal.SIGINT, handle)

    def write_ready_file(self, path: Path) -> None:
        """The bound ports as JSON, written whole once the server is SERVING (tests and the demo
        read it to find a server started on port 0)."""
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps({"pid": os.getpid(), **self.ports}))
        tmp.replace(path)
