"""The ``triage.v1`` gRPC face, with the standard health service and reflection on its port.

Each handler decodes, hands the batch to the shared batcher (so rows from every face are decided
alike, by one engine, and their escalations written by one queue writer) and waits for its
decisions; errors map to gRPC codes: bad input INVALID_ARGUMENT, a full admission queue
RESOURCE_EXHAUSTED, a passed deadline DEADLINE_EXCEEDED, a queue that cannot store UNAVAILABLE.
"""

from __future__ import annotations

import json
import time
from concurrent import futures

import grpc
import pyarrow as pa
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from hitl_triage.engine.decode import BatchError
from hitl_triage.serve.proto.triage.v1 import triage_pb2, triage_pb2_grpc

from .batcher import Closed, Expired, Overloaded
from .ipc import read_batch, write_batch
from .monitoring import figures_json
from .writer import QueueUnavailable

TRIAGE_SERVICE = triage_pb2.DESCRIPTOR.services_by_name["Triage"].full_name
# The keepalive policy, stated rather than left to grpc's defaults: a client may ping at most
# every 10 s while no call carries data; the third ping too soon ends its connection (GOAWAY
# ENHANCE_YOUR_CALM "too_many_pings"), so ping floods cost the server nothing. The server pings
# an idle connection every 60 s and drops it after 20 s without an answer (a client that died
# without closing frees its calls and its admitted rows).
KEEPALIVE_POLICY = (
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.http2.max_ping_strikes", 2),
    ("grpc.keepalive_permit_without_calls", 0),
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.keepalive_timeout_ms", 20_000),
)


def abort_for(context: grpc.ServicerContext, exc: BaseException):
    """End the call with the status that says what went wrong."""
    from hitl_triage.serve.queue import QueueError

    if isinstance(exc, Overloaded):
        context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
    if isinstance(exc, Expired):
        context.abort(grpc.StatusCode.DEADLINE_EXCEEDED if "deadline" in str(exc) else grpc.StatusCode.CANCELLED, str(exc))
    if isinstance(exc, (QueueUnavailable, Closed)):
        context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
    if isinstance(exc, (BatchError, QueueError, ValueError, TypeError)):
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
    context.abort(grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}")


class TriageServicer(triage_pb2_grpc.TriageServicer):
    def __init__(self, service):
        self.service = service  # serve.service.server.Service: engine holder, batcher, queue, counters

    # -- deciding --------------------------------------------------------------------------------

    def _decide(self, data: bytes, context, *, reported: bool = False) -> triage_pb2.TriageResponse:
        try:
            batch = read_batch(data)
            remaining = context.time_remaining()  # a huge number when the call has no deadline
            deadline = None if remaining is None or remaining > 1e8 else time.monotonic() + remaining
            decisions = self.service.decide(batch, deadline=deadline, alive=context.is_active, reported=reported)
        except Exception as exc:  # noqa: BLE001 - mapped to a status
            abort_for(context, exc)
        if decisions is None:
            return triage_pb2.TriageResponse(rows=0, profile_version=self.service.engines.profile.version)
        escalated = int(pa.compute.sum(decisions.column("escalate")).as_py() or 0)
        return triage_pb2.TriageResponse(
            arrow_ipc=write_batch(decisions), rows=decisions.num_rows, escalated=escalated,
            profile_version=decisions.column("profile_version")[0].as_py(),
        )

    def Triage(self, request, context):
        return self._decide(request.arrow_ipc, context)

    def TriageStream(self, request_iterator, context):
        for request in request_iterator:
            yield self._decide(request.arrow_ipc, context)

    def Report(self, request, context):
        return self._decide(request.arrow_ipc, context, reported=True)

    # -- the queue and the profile -----------------------------------------------------------------

    def SubmitVerdicts(self, request, context):
        if self.service.queue is None:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "verdicts: expected a server with a review queue (--queue URL), found none")
        from .auth import AuthError, metadata_token

        try:
            verdicts = read_batch(request.arrow_ipc)
            authorizer = getattr(self.service, "authorizer", None)
            if authorizer is not None:  # a token bound to a reviewer or tiers may name only those
                authorizer.check_verdicts(metadata_token(context.invocation_metadata()), verdicts)
            counts = self.service.queue.submit(verdicts)
        except AuthError as exc:
            context.abort(exc.code, str(exc))
        except Exception as exc:  # noqa: BLE001 - mapped to a status
            abort_for(context, exc)
        return triage_pb2.VerdictsResponse(**counts)

    def GetProfile(self, request, context):
        p = self.service.engines.profile
        t = p.thresholds
        return triage_pb2.ProfileInfo(
            version=p.version, members=p.members, classes=p.classes, dim=p.dim or 0,
            class_names=list(p.class_names), tiers=list(p.config.tiers.order), temperature=p.temperature,
            thresholds=triage_pb2.Thresholds(confidence=t.confidence, mutual_info=t.mutual_info,
                                             vote_floor=t.vote_floor, ood=t.ood),
            fit_report_json=json.dumps(p.fit_report, default=str),
        )

    def Stats(self, request, context):
        s = self.service.stats()
        return triage_pb2.StatsResponse(
            profile_version=s["profile_version"], rows=s["rows"], escalated=s["escalated"], by_reason=s["by_reason"],
            queue=[triage_pb2.TierStats(tier=tier, **entry) for tier, entry in s["queue"].get("tiers", {}).items()],
            verdicts=s["queue"].get("verdicts", {}), admitted_rows=s["admitted_rows"], budget=_budget(s["budget"]),
            monitoring_json=figures_json(s["monitoring"]),
        )

    def ReloadProfile(self, request, context):
        try:
            previous, version = self.service.engines.reload(request.path or None)
        except Exception as exc:  # noqa: BLE001 - mapped to a status
            abort_for(context, exc)
        return triage_pb2.ReloadResponse(previous_version=previous, version=version)


def _budget(state: dict) -> triage_pb2.BudgetControl:
    if not state.get("enabled") or "step" not in state:
        return triage_pb2.BudgetControl(enabled=False)
    return triage_pb2.BudgetControl(
        enabled=True, step=state["step"], budget=state["budget"], thresholds=triage_pb2.Thresholds(**state["thresholds"]),
        rows_seen=state["rows_seen"], window_rows=state["window_rows"], window_rate=state["window_rate"],
        profile_version=state["profile_version"])


def build_grpc_server(service, *, host: str, port: int, max_message_bytes: int, threads: int = 32,
                      interceptors=(), credentials=None, extra_servicers=(), reflection_on: bool = True
                      ) -> tuple[grpc.Server, int, health.HealthServicer, list[str]]:
    """A started-to-be gRPC server with triage.v1, health and reflection (unless not
    ``reflection_on``: ``[serve] reflection = false``) (and ``extra_servicers``:
    callables ``add(server)`` returning their service names) bound to host:port; returns the
    server, the bound port, the health servicer and the names of the services it serves."""
    options = [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.so_reuseport", 1),
        *KEEPALIVE_POLICY,
    ]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=threads, thread_name_prefix="grpc"),
                         options=options, interceptors=list(interceptors))
    triage_pb2_grpc.add_TriageServicer_to_server(TriageServicer(service), server)
    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = [TRIAGE_SERVICE, health.SERVICE_NAME] + ([reflection.SERVICE_NAME] if reflection_on else [])
    for add in extra_servicers:
        names.extend(add(server))
    if reflection_on:
        reflection.enable_server_reflection(names, server)
    address = f"{host}:{port}"
    bound = server.add_secure_port(address, credentials) if credentials is not None else server.add_insecure_port(address)
    if bound == 0:
        raise OSError(f"serve.port: expected to bind {address}, found it taken or not allowed")
    for name in ["", *names]:
        health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    return server, bound, health_servicer, names
