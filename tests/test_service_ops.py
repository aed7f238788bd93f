"""Operating `triage serve` (issue 22, item 4): token roles, TLS, the message-size limit,
`--workers N` on one port, graceful SIGTERM.

Every server is `triage serve` started here in a subprocess on port 0 (service_fixtures.served;
tokens and TLS from a TOML `[serve]` table), with a small fitted profile (M = 3, C = 4, no bank) and an SQLite review
queue; calls go over loopback with grpcio. Oracles: the role table as the issue states it
(restated here, not imported), the status codes and what their messages must say,
grpc.health.v1 (SERVING after every refusal; NOT_SERVING once SIGTERM arrives, seen on a Watch
opened before it), the review queue read directly (every escalation of every acknowledged batch
stored, nothing else), the trailing metadata ``x-triage-worker-pid``, and exit statuses.

test_service_metrics.py (Prometheus) and test_node_client.py (Node.js) use the helpers here.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import os
import queue as queues
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pyarrow as pa
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from engine_fixtures import contract_table, known_ensemble, one_torch_thread  # noqa: F401  (autouse)
from hitl_triage.engine.profile import Profile
from hitl_triage.serve.proto.triage.v1 import triage_pb2, triage_pb2_grpc
from hitl_triage.serve.queue import open_queue
from hitl_triage.serve.service.ipc import read_batch, write_batch
from service_fixtures import scrape, served, total

M, C = 3, 4
TOKENS = {"fleet-secret": "fleet", "reviewer-secret": "reviewer", "admin-secret": "admin"}
PID_KEY = "x-triage-worker-pid"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING

# -- helpers shared with test_service_metrics.py and test_node_client.py ----------------------------


@pytest.fixture(scope="module")
def profile_dir(tmp_path_factory) -> Path:
    """A profile fitted on 3,000 rows of a known overconfident ensemble (M = 3, C = 4, no bank)."""
    d = tmp_path_factory.mktemp("ops-profile")
    rng = np.random.default_rng(22)
    logits, labels, _ = known_ensemble(rng, 3000, members=M, classes=C)
    Profile.fit(contract_table([f"cal-{i}" for i in range(3000)], logits, label=labels)).save(d / "profile")
    return d / "profile"


def predictions(n: int, *, prefix: str, seed: int = 0, sources: int = 3, source: bool = True) -> pa.RecordBatch:
    """n rows in the data contract: string ids ``prefix-i``, logits [n, M, C], a source column
    (``camera-0`` ...) unless ``source`` is False (another schema: the batcher keeps it apart)."""
    logits, _, _ = known_ensemble(np.random.default_rng(seed), n, members=M, classes=C)
    table = contract_table([f"{prefix}-{i}" for i in range(n)], logits,
                           source=[f"camera-{i % sources}" for i in range(n)] if source else None)
    return table.combine_chunks().to_batches()[0]


def request(batch: pa.RecordBatch | pa.Table) -> triage_pb2.TriageRequest:
    return triage_pb2.TriageRequest(arrow_ipc=write_batch(batch))


def bearer(token: str | None) -> list[tuple[str, str]] | None:
    return None if token is None else [("authorization", f"Bearer {token}")]


def fresh_queue(workdir: Path) -> str:
    return f"sqlite:///{workdir / f'review-{time.monotonic_ns()}.db'}"


@contextlib.contextmanager
def serving(profile: Path, queue_url: str | None, workdir: Path, *args: str, config: dict | None = None):
    """service_fixtures.served as these tests run it: on the CPU with one torch thread, Flight off
    unless ``args`` turn it on (``--flight-port 0``)."""
    workdir.mkdir(parents=True, exist_ok=True)
    with served(profile, queue_url, workdir, "--flight-port", "-1", "--device", "cpu", *args, config=config,
                env={"OMP_NUM_THREADS": "1"}) as server:
        yield server


def channel_to(server, credentials: grpc.ChannelCredentials | None = None, *, own_connection: bool = False) -> grpc.Channel:
    """A channel to the server's gRPC port (``own_connection``: a TCP connection of its own, not
    one shared with the process's other channels, so that SO_REUSEPORT may pick another worker)."""
    options = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]
    if own_connection:
        options.append(("grpc.use_local_subchannel_pool", 1))
    if credentials is not None:
        return grpc.secure_channel(server.grpc, credentials, options=options)
    return grpc.insecure_channel(server.grpc, options=options)


def health_status(channel: grpc.Channel, service: str = "") -> int:
    return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status


def self_signed_certificate(directory: Path) -> tuple[Path, Path]:
    """A certificate for localhost and 127.0.0.1, valid a day, and its key (PEM files): made with
    the ``cryptography`` package where it is installed, else with ``openssl``."""
    cert, key = directory / "server.crt", directory / "server.key"
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID
    except ImportError:
        if shutil.which("openssl") is None:
            pytest.skip("neither the cryptography package nor openssl is here to make a test certificate")
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                        "-nodes", "-days", "1", "-subj", "/CN=localhost", "-keyout", str(key), "-out", str(cert),
                        "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"], check=True, capture_output=True)
        return cert, key
    private = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(private.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                    x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(private, hashes.SHA256())
    )
    cert.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key.write_bytes(private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    return cert, key


# -- tokens, TLS and the message size: one server with all three ------------------------------------


@pytest.fixture(scope="module")
def secure(profile_dir, tmp_path_factory):
    """(server, TLS channel credentials): tokens, TLS from a self-signed certificate, 1 MB messages,
    metrics on (to count the refusals)."""
    d = tmp_path_factory.mktemp("secure")
    cert, key = self_signed_certificate(d)
    config = {"max_message_mb": 1, "tls_cert": str(cert), "tls_key": str(key), "tokens": TOKENS}
    with serving(profile_dir, fresh_queue(d), d, "--metrics-port", "0", config=config) as server:
        yield server, grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())


# Who may call what, as issue 22 states it: fleet triages and reports; reviewers submit verdicts;
# both read the profile and stats; admin does everything, reload included.
MAY_CALL = {
    "Triage": {"fleet", "admin"},
    "TriageStream": {"fleet", "admin"},
    "Report": {"fleet", "admin"},
    "SubmitVerdicts": {"reviewer", "admin"},
    "GetProfile": {"fleet", "reviewer", "admin"},
    "Stats": {"fleet", "reviewer", "admin"},
    "ReloadProfile": {"admin"},
    "inference.ServerMetadata": {"fleet", "admin"},
}
# Health probes answer anyone: grpc.health.v1, reflection, and the inference protocol's liveness
# and readiness (Kubernetes and KServe probe them without credentials).
EXEMPT_CALLS = ("inference.ServerLive", "inference.ServerReady", "inference.ModelReady")


def call_as(channel: grpc.Channel, method: str, metadata) -> grpc.StatusCode:
    """Make ``method``'s call with ``metadata``: OK, or the status it ended with."""
    from hitl_triage.serve.proto.inference import grpc_predict_v2_pb2 as oip
    from hitl_triage.serve.proto.inference import grpc_predict_v2_pb2_grpc as oip_grpc

    stub = triage_pb2_grpc.TriageStub(channel)
    one = request(predictions(4, prefix=f"auth-{method}"))
    calls = {
        "Triage": lambda: stub.Triage(one, metadata=metadata, timeout=30),
        "TriageStream": lambda: list(stub.TriageStream(iter([one]), metadata=metadata, timeout=30)),
        "Report": lambda: stub.Report(one, metadata=metadata, timeout=30),
        "SubmitVerdicts": lambda: stub.SubmitVerdicts(triage_pb2.VerdictsRequest(), metadata=metadata, timeout=30),
        "GetProfile": lambda: stub.GetProfile(triage_pb2.GetProfileRequest(), metadata=metadata, timeout=30),
        "Stats": lambda: stub.Stats(triage_pb2.StatsRequest(), metadata=metadata, timeout=30),
        "ReloadProfile": lambda: stub.ReloadProfile(triage_pb2.ReloadRequest(), metadata=metadata, timeout=30),
        "inference.ServerMetadata": lambda: oip_grpc.GRPCInferenceServiceStub(channel).ServerMetadata(
            oip.ServerMetadataRequest(), metadata=metadata, timeout=30),
        "inference.ServerLive": lambda: oip_grpc.GRPCInferenceServiceStub(channel).ServerLive(
            oip.ServerLiveRequest(), metadata=metadata, timeout=30),
        "inference.ServerReady": lambda: oip_grpc.GRPCInferenceServiceStub(channel).ServerReady(
            oip.ServerReadyRequest(), metadata=metadata, timeout=30),
        "inference.ModelReady": lambda: oip_grpc.GRPCInferenceServiceStub(channel).ModelReady(
            oip.ModelReadyRequest(name="triage"), metadata=metadata, timeout=30),
    }
    try:
        calls[method]()
    except grpc.RpcError as exc:
        return exc.code(), exc.details()
    return grpc.StatusCode.OK, ""


def test_roles_allow_what_the_issue_says_and_refuse_the_rest_with_a_message(secure):
    server, tls = secure
    channel = channel_to(server, tls)
    by_role = {role: token for token, role in TOKENS.items()}
    callers = {None: None, "unknown token": bearer("no-such-token"), "not a bearer": [("authorization", "Basic Zm9v")],
               **{role: bearer(token) for role, token in by_role.items()}}
    wrong = []
    for method, allowed in MAY_CALL.items():
        for caller, metadata in callers.items():
            code, details = call_as(channel, method, metadata)
            if caller not in by_role:
                ok = code == grpc.StatusCode.UNAUTHENTICATED and "expected" in details and "authorization" in details \
                    if caller is None or caller == "not a bearer" else \
                    code == grpc.StatusCode.UNAUTHENTICATED and "expected a token listed in serve.tokens" in details
            elif caller in allowed:
                ok = code not in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)
            else:
                ok = (code == grpc.StatusCode.PERMISSION_DENIED and f"found one of role {caller}" in details
                      and all(role in details for role in allowed))
            if not ok:
                wrong.append(f"{method} as {caller}: {code.name} {details!r}")
    assert not wrong, "\n".join(wrong)
    for method in EXEMPT_CALLS:  # no token, or a token that is not known: answered all the same
        for metadata in (None, bearer("no-such-token")):
            assert call_as(channel, method, metadata) == (grpc.StatusCode.OK, ""), method
    # Health and reflection answer without a token; the refusals left the server SERVING.
    assert health_status(channel) == SERVING
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    answer = next(reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10))
    assert "triage.v1.Triage" in {s.name for s in answer.list_services_response.service}
    # Every refusal is counted by its code.
    refused = {"UNAUTHENTICATED": 3 * len(MAY_CALL),
               "PERMISSION_DENIED": sum(3 - len(allowed) for allowed in MAY_CALL.values())}
    samples = scrape(server.ports["metrics"])
    for code, count in refused.items():
        assert total(samples, "hitl_triage_rejected_calls_total", code=code) == count, code


def test_tls_is_required_when_certificates_are_given(secure):
    server, tls = secure
    with pytest.raises(grpc.RpcError) as plain:
        health_status(channel_to(server))
    assert plain.value.code() == grpc.StatusCode.UNAVAILABLE
    assert health_status(channel_to(server, tls)) == SERVING


def float16_int_id_predictions(n: int) -> pa.RecordBatch:
    """n rows with int64 ids and float16 logits: 32 bytes a row in, about three times that out."""
    logits, _, _ = known_ensemble(np.random.default_rng(5), n, members=M, classes=C)
    inner = pa.FixedSizeListArray.from_arrays(pa.array(logits.astype(np.float16).reshape(-1)), C)
    return pa.record_batch({"id": pa.array(np.arange(n, dtype=np.int64) + 10**9),
                            "logits": pa.FixedSizeListArray.from_arrays(inner, M)})


def test_messages_past_max_message_mb_get_resource_exhausted_either_way(secure):
    server, tls = secure
    channel = channel_to(server, tls)
    stub = triage_pb2_grpc.TriageStub(channel)
    fleet = bearer("fleet-secret")
    # In: a request of more than 1 MB is refused before any row is decided, by grpc's own check.
    big = request(predictions(20_000, prefix="big"))
    assert big.ByteSize() > 1 << 20
    with pytest.raises(grpc.RpcError) as refused:
        stub.Triage(big, metadata=fleet, timeout=60)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    # grpc's words, with both sizes in bytes: "Received message larger than max (N vs. 1048576)".
    assert f"Received message larger than max ({big.ByteSize()} vs. {1 << 20})" in refused.value.details(), \
        refused.value.details()
    # Out: a request under the limit whose decisions are over it.
    small = request(float16_int_id_predictions(20_000))
    assert small.ByteSize() < 1 << 20
    with pytest.raises(grpc.RpcError) as too_long:
        stub.Triage(small, metadata=fleet, timeout=60)
    assert too_long.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, too_long.value.details()
    assert "larger than max" in too_long.value.details() and str(1 << 20) in too_long.value.details()
    # The server goes on: SERVING, and a request in bounds is answered.
    assert health_status(channel) == SERVING
    assert stub.Triage(request(predictions(1000, prefix="fits")), metadata=fleet, timeout=60).rows == 1000


# -- graceful SIGTERM ------------------------------------------------------------------------------


def test_sigterm_during_a_stream_finishes_admitted_calls_and_loses_nothing_acknowledged(profile_dir, tmp_path):
    """Batches of 2,000 rows fill an engine batch at once; the unary call has another schema, so
    it waits in the batcher (max_delay 5 s) and is still admitted when SIGTERM comes."""
    queue_url = fresh_queue(tmp_path)
    with serving(profile_dir, queue_url, tmp_path, "--max-batch-rows", "2000", "--max-delay-ms", "5000") as server:
        channel = channel_to(server)
        stub = triage_pb2_grpc.TriageStub(channel)
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""))
        assert next(watch).status == SERVING
        outbox: queues.Queue = queues.Queue()
        stream = stub.TriageStream(iter(outbox.get, None))
        acknowledged: list[pa.RecordBatch] = []
        for b in range(3):
            outbox.put(request(predictions(2000, prefix=f"s{b}", seed=b)))
            acknowledged.append(read_batch(next(stream).arrow_ipc))
        waiting = stub.Triage.future(request(predictions(100, prefix="unary", seed=9, source=False)), timeout=120)
        admitted_at_least(stub, 100)
        outbox.put(request(predictions(2000, prefix="s3", seed=3)))
        admitted_at_least(stub, 2100)

        server.process.send_signal(signal.SIGTERM)
        assert next(watch).status == NOT_SERVING
        watch.cancel()
        # The calls admitted before the signal are answered whole.
        unary = read_batch(waiting.result().arrow_ipc)
        assert unary.num_rows == 100
        acknowledged.append(read_batch(next(stream).arrow_ipc))
        acknowledged.append(unary)
        # A batch sent after it is refused, not half done; then the process exits 0.
        outbox.put(request(predictions(2000, prefix="late", seed=4)))
        with pytest.raises(grpc.RpcError) as late:
            next(stream)
        # UNAVAILABLE: the status a client retries on another replica.
        assert late.value.code() == grpc.StatusCode.UNAVAILABLE, late.value
        outbox.put(None)
        assert server.stop() == 0, server.output()[-3000:]  # a second SIGTERM while it drains changes nothing
    # Every escalation of every acknowledged batch is in the queue, and nothing else.
    decided = pa.Table.from_batches([b.select(["id", "escalate", "tier"]) for b in acknowledged])
    escalated = decided.filter(decided.column("escalate"))
    assert escalated.num_rows > 0
    with open_queue(queue_url) as queue:
        missing = [i for i, tier in zip(escalated.column("id").to_pylist(), escalated.column("tier").to_pylist())
                   if queue.tier_of(i) != tier]
        stored = sum(t["depth"] + t["in_flight"] + t["done"] + t["dead"] for t in queue.stats()["tiers"].values())
    assert not missing, f"{len(missing)} acknowledged escalations are not in the queue, e.g. {missing[:3]}"
    assert stored == escalated.num_rows


def admitted_at_least(stub, rows: int, timeout: float = 30.0) -> None:
    """Wait until the server's batcher holds at least ``rows`` admitted rows."""
    deadline = time.monotonic() + timeout
    while stub.Stats(triage_pb2.StatsRequest(), timeout=10).admitted_rows < rows:
        assert time.monotonic() < deadline, f"the batcher never held {rows} rows"
        time.sleep(0.02)


# -- --workers N -----------------------------------------------------------------------------------


def worker_pids_answering(server, clients: int, rows: int) -> list[str]:
    """``clients`` callers, each on a connection of its own, one Triage call each (at once, from
    threads): the worker pid each answer names."""
    pids: list[str] = []
    lock = threading.Lock()

    def one(i: int) -> None:
        with channel_to(server, own_connection=True) as channel:
            response, call = triage_pb2_grpc.TriageStub(channel).Triage.with_call(
                request(predictions(rows, prefix=f"w{i}", seed=i)), timeout=60)
            assert response.rows == rows
            with lock:
                pids.append(dict(call.trailing_metadata())[PID_KEY])

    threads = [threading.Thread(target=one, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(pids) == clients, "a client failed (see the warnings above)"
    return pids


def gone(pid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


def test_workers_share_the_port_add_up_their_metrics_and_stop_on_sigterm(profile_dir, tmp_path):
    with serving(profile_dir, fresh_queue(tmp_path), tmp_path, "--workers", "2", "--metrics-port", "0") as server:
        workers = server.ports["workers"]
        assert len(set(workers)) == 2 and server.ports["pid"] not in workers
        pids = worker_pids_answering(server, clients=16, rows=200)
        assert set(pids) == {str(p) for p in workers}, f"answered by {sorted(set(pids))}, workers {workers}"
        # One scrape of the parent counts the rows of both workers.
        assert total(scrape(server.ports["metrics"]), "hitl_triage_rows_total") == 16 * 200
        assert health_status(channel_to(server)) == SERVING
        assert server.stop() == 0, server.output()[-3000:]
    assert all(gone(pid) for pid in workers), f"workers {workers} outlived the parent"
    assert "Traceback" not in server.output(), server.output()[-3000:]


def test_a_dead_worker_ends_the_server_with_a_message(profile_dir, tmp_path):
    with serving(profile_dir, None, tmp_path, "--workers", "2") as server:
        victim, other = server.ports["workers"]
        os.kill(victim, signal.SIGKILL)
        assert server.process.wait(60) == 1
        assert gone(other), "the other worker outlived the server"
    assert f"worker {victim} exited with status -9" in server.output() and "not restarted" in server.output(), server.output()
