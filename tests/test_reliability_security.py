"""Security (issue 21, item 6), on one `triage serve` with tokens, mutual TLS and reflection off.

- Token roles on every call of the faces test_service_ops.py does not cover (it checks triage.v1
  and the inference protocol's ServerMetadata): every Flight exchange and action, and every call
  of the Open Inference Protocol, for no token, an unknown one and each role (health exempt).
- A reviewer token bound to a reviewer and tiers (``{role = "reviewer", reviewer = "ana", tiers =
  [...]}``): a verdict that names another reviewer or tier is PERMISSION_DENIED on triage.v1 and
  Flight, and nothing of it is stored.
- TLS and mutual TLS with certificates made here (``cryptography``): a CA, the server's certificate
  and a client's signed by it, and a client certificate of another CA. Both ports refuse a client
  without a certificate or with the stranger's.
- ``[serve] reflection = false``: reflection is not served (UNIMPLEMENTED), health still answers.
- Tokens and payloads never appear in the server's log (its whole output, read after SIGTERM).
"""

from __future__ import annotations

import datetime
import ipaddress
import json
from pathlib import Path

import grpc
import pyarrow as pa
import pyarrow.flight as flight
import pytest

from engine_fixtures import one_torch_thread  # noqa: F401  (autouse)
from hitl_triage.serve.client import _flight_error
from hitl_triage.serve.proto.inference import grpc_predict_v2_pb2 as oip, grpc_predict_v2_pb2_grpc as oip_grpc
from hitl_triage.serve.proto.triage.v1 import triage_pb2, triage_pb2_grpc
from hitl_triage.serve.service.ipc import read_batch, write_batch
from reliability_fixtures import infer_request, reliable_server, shared_world

TOKENS = {"fleet-tok-8c1f": "fleet", "reviewer-tok-42aa": "reviewer", "admin-tok-91bd": "admin"}
BOUND = "ana-tok-77e3"           # reviewer "ana", at one tier (chosen below from the queue's items)
SECRET_PREFIX = "payload-zq7x"   # the ids sent: must not appear in the log


def _certificates(directory: Path) -> dict[str, Path]:
    """A CA; the server's certificate (localhost, 127.0.0.1) and a client's, both signed by it;
    a client certificate signed by another CA (a stranger). PEM files."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    out: dict[str, Path] = {}

    def write(name: str, key, cert) -> None:
        out[f"{name}.key"] = directory / f"{name}.key"
        out[f"{name}.crt"] = directory / f"{name}.crt"
        out[f"{name}.key"].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                         serialization.NoEncryption()))
        out[f"{name}.crt"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))

    def make(name: str, issuer=None, *, ca: bool = False, san=None):
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        issuer_key, issuer_name = (key, subject) if issuer is None else issuer
        builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer_name).public_key(key.public_key())
                   .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
                   .not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if san:
            builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
        cert = builder.sign(issuer_key, hashes.SHA256())
        write(name, key, cert)
        return key, subject

    ca = make("ca", ca=True)
    make("server", ca, san=[x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    make("client", ca)
    stranger_ca = make("stranger-ca", ca=True)
    make("stranger", stranger_ca)
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return shared_world(tmp_path_factory)


@pytest.fixture(scope="module")
def secure(world, tmp_path_factory):
    pytest.importorskip("cryptography")
    d = tmp_path_factory.mktemp("security")
    certs = _certificates(d)
    toml = d / "triage.toml"  # written by hand: the bound token is an inline table
    toml.write_text("\n".join([
        "[serve]", f"tls_cert = {json.dumps(str(certs['server.crt']))}", f"tls_key = {json.dumps(str(certs['server.key']))}",
        f"tls_client_ca = {json.dumps(str(certs['ca.crt']))}", "reflection = false", "", "[serve.tokens]",
        *(f"{json.dumps(token)} = {json.dumps(role)}" for token, role in TOKENS.items()),
        f'{json.dumps(BOUND)} = {{role = "reviewer", reviewer = "ana", tiers = ["specialist"]}}', ""]))
    with reliable_server(world, d, "--config", str(toml)) as server:
        yield server, certs


def grpc_credentials(certs, who: str | None = "client") -> grpc.ChannelCredentials:
    if who is None:
        return grpc.ssl_channel_credentials(root_certificates=certs["ca.crt"].read_bytes())
    return grpc.ssl_channel_credentials(root_certificates=certs["ca.crt"].read_bytes(),
                                        private_key=certs[f"{who}.key"].read_bytes(),
                                        certificate_chain=certs[f"{who}.crt"].read_bytes())


def flight_client(server, certs, who: str | None = "client") -> flight.FlightClient:
    mutual = {} if who is None else {"cert_chain": certs[f"{who}.crt"].read_bytes(),
                                     "private_key": certs[f"{who}.key"].read_bytes()}
    return flight.FlightClient(f"grpc+tls://localhost:{server.ports['flight']}",
                               tls_root_certs=certs["ca.crt"].read_bytes(), **mutual)


def channel(server, certs, who: str | None = "client") -> grpc.Channel:
    return grpc.secure_channel(f"localhost:{server.ports['grpc']}", grpc_credentials(certs, who))


def rows(world, prefix: str, n: int = 32) -> pa.RecordBatch:
    batch = world.table().select(["id", "logits", "embedding", "source"]).slice(0, n).combine_chunks().to_batches()[0]
    return batch.set_column(0, "id", pa.array([f"{SECRET_PREFIX}-{prefix}-{i}" for i in range(n)]))


def headers(token: str | None) -> list[tuple[bytes, bytes]]:
    return [] if token is None else [(b"authorization", f"Bearer {token}".encode())]


def metadata(token: str | None) -> list[tuple[str, str]]:
    return [] if token is None else [("authorization", f"Bearer {token}")]


# What each call of these faces stands for in the role table (auth.py, restated): fleet triages,
# reports and reads; reviewers submit verdicts and read; admin everything.
FLIGHT_CALLS = {
    "exchange triage": {"fleet", "admin"}, "exchange report": {"fleet", "admin"},
    "exchange verdicts": {"reviewer", "admin"}, "action stats": {"fleet", "reviewer", "admin"},
    "action profile": {"fleet", "reviewer", "admin"}, "action reload": {"admin"}, "action health": "exempt",
}
OIP_CALLS = {"ModelInfer": {"fleet", "admin"}, "ModelMetadata": {"fleet", "admin"}, "ServerMetadata": {"fleet", "admin"},
             "ServerLive": "exempt", "ServerReady": "exempt", "ModelReady": "exempt"}


def flight_call(server, certs, world, what: str, token: str | None) -> str:
    kind, name = what.split()
    client = flight_client(server, certs)
    options = flight.FlightCallOptions(timeout=30, headers=headers(token))
    try:
        if kind == "action":
            list(client.do_action(flight.Action(name, b""), options))
            return "OK"
        batch = rows(world, f"role-{name}") if name != "verdicts" else pa.record_batch(
            {"id": ["nobody"], "reviewer": ["x"], "tier": ["general"], "action": ["confirm"], "label": pa.array([0], pa.int32())})
        writer, reader = client.do_exchange(flight.FlightDescriptor.for_command(name.encode()), options)
        writer.begin(batch.schema)
        writer.write_batch(batch)
        writer.done_writing()
        reader.read_all()
        return "OK"
    except Exception as exc:  # noqa: BLE001 - its status
        return _flight_error(exc).code
    finally:
        client.close()


def oip_call(server, certs, world, name: str, token: str | None) -> str:
    with channel(server, certs) as ch:
        stub = oip_grpc.GRPCInferenceServiceStub(ch)
        requests = {"ModelInfer": lambda: infer_request(rows(world, "oip")), "ModelMetadata": lambda: oip.ModelMetadataRequest(name="triage"),
                    "ServerMetadata": oip.ServerMetadataRequest, "ServerLive": oip.ServerLiveRequest,
                    "ServerReady": oip.ServerReadyRequest, "ModelReady": lambda: oip.ModelReadyRequest(name="triage")}
        try:
            getattr(stub, name)(requests[name](), metadata=metadata(token), timeout=30)
        except grpc.RpcError as exc:
            return exc.code().name
    return "OK"


def test_roles_on_every_flight_and_inference_call(secure, world):
    server, certs = secure
    by_role = {role: token for token, role in TOKENS.items()}
    callers = {None: None, "unknown": "no-such-token", **by_role}
    wrong = []
    for face, calls, make in (("flight", FLIGHT_CALLS, flight_call), ("oip", OIP_CALLS, oip_call)):
        for what, allowed in calls.items():
            for caller, token in callers.items():
                code = make(server, certs, world, what, token)
                if allowed == "exempt":
                    ok = code == "OK"
                elif caller in (None, "unknown"):
                    ok = code == "UNAUTHENTICATED"
                elif caller in allowed:
                    ok = code not in ("UNAUTHENTICATED", "PERMISSION_DENIED")
                else:
                    ok = code == "PERMISSION_DENIED"
                if not ok:
                    wrong.append(f"{face} {what} as {caller}: {code}")
    assert not wrong, "\n".join(wrong)


def test_a_verdict_naming_a_reviewer_or_tier_the_token_does_not_hold_is_permission_denied(secure, world):
    server, certs = secure
    with channel(server, certs) as ch:
        stub = triage_pb2_grpc.TriageStub(ch)
        decided = read_batch(stub.Triage(triage_pb2.TriageRequest(arrow_ipc=write_batch(rows(world, "verdicts", 200))),
                                         metadata=metadata("fleet-tok-8c1f"), timeout=60).arrow_ipc)
        special = [i for i, t in zip(decided.column("id").to_pylist(), decided.column("tier").to_pylist()) if t == "specialist"]
        assert len(special) >= 3, decided.column("tier").value_counts()

        def verdict(i: str, reviewer: str = "ana", tier: str = "specialist") -> pa.RecordBatch:
            return pa.record_batch({"id": [i], "reviewer": [reviewer], "tier": [tier], "action": ["confirm"],
                                    "label": pa.array([None], pa.int32())})  # confirm: the predicted class

        def stored() -> int:
            return sum(stub.Stats(triage_pb2.StatsRequest(), metadata=metadata("admin-tok-91bd"), timeout=30).verdicts.values())

        before = stored()
        for bad, word in ((verdict(special[0], reviewer="bob"), "'ana'"), (verdict(special[0], tier="general"), "'specialist'")):
            with pytest.raises(grpc.RpcError) as refused:
                stub.SubmitVerdicts(triage_pb2.VerdictsRequest(arrow_ipc=write_batch(bad)), metadata=metadata(BOUND), timeout=30)
            assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED and word in refused.value.details()
            client = flight_client(server, certs)
            try:
                writer, reader = client.do_exchange(flight.FlightDescriptor.for_command(b"verdicts"),
                                                    flight.FlightCallOptions(timeout=30, headers=headers(BOUND)))
                writer.begin(bad.schema)
                writer.write_batch(bad)
                writer.done_writing()
                with pytest.raises(Exception) as flight_refused:
                    reader.read_all()
            finally:
                client.close()
            assert _flight_error(flight_refused.value).code == "PERMISSION_DENIED", flight_refused.value
        assert stored() == before  # nothing of a refused submission
        ok = stub.SubmitVerdicts(triage_pb2.VerdictsRequest(arrow_ipc=write_batch(verdict(special[1]))),
                                 metadata=metadata(BOUND), timeout=30)
        assert ok.stored == 1 and stored() == before + 1
        # an unbound reviewer token may name anyone
        other = stub.SubmitVerdicts(triage_pb2.VerdictsRequest(arrow_ipc=write_batch(verdict(special[2], reviewer="bob"))),
                                    metadata=metadata("reviewer-tok-42aa"), timeout=30)
        assert other.stored == 1


def test_mutual_tls_refuses_clients_without_a_certificate_of_the_ca(secure):
    server, certs = secure
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    def grpc_health(who) -> str:
        with channel(server, certs, who) as ch:
            try:
                health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
            except grpc.RpcError as exc:
                return exc.code().name
        return "OK"

    def flight_health(who) -> str:
        client = flight_client(server, certs, who)
        try:
            list(client.do_action(flight.Action("health", b""), flight.FlightCallOptions(timeout=10)))
        except Exception as exc:  # noqa: BLE001 - its status
            return _flight_error(exc).code
        finally:
            client.close()
        return "OK"

    assert grpc_health("client") == "OK" and flight_health("client") == "OK"
    for who in (None, "stranger"):
        assert grpc_health(who) == "UNAVAILABLE", who
        assert flight_health(who) != "OK", who
    with grpc.insecure_channel(f"localhost:{server.ports['grpc']}") as plain:  # no TLS at all
        with pytest.raises(grpc.RpcError):
            health_pb2_grpc.HealthStub(plain).Check(health_pb2.HealthCheckRequest(), timeout=10)


def test_reflection_switched_off_is_not_served(secure):
    server, certs = secure
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with channel(server, certs) as ch:
        with pytest.raises(grpc.RpcError) as refused:
            next(reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10))
        assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_tokens_and_payloads_never_appear_in_the_log(secure, world):
    """Last in the module: it stops the server to read its whole log. Before that, a bad batch
    (its ids repeated), a refused token and a reload make the server log what it logs."""
    server, certs = secure
    with channel(server, certs) as ch:
        stub = triage_pb2_grpc.TriageStub(ch)
        bad = rows(world, "dup", 8).set_column(0, "id", pa.array([f"{SECRET_PREFIX}-dup"] * 8))
        with pytest.raises(grpc.RpcError):
            stub.Triage(triage_pb2.TriageRequest(arrow_ipc=write_batch(bad)), metadata=metadata("fleet-tok-8c1f"), timeout=30)
        with pytest.raises(grpc.RpcError):
            stub.Triage(triage_pb2.TriageRequest(arrow_ipc=write_batch(bad)), metadata=metadata("wrong-tok-5555"), timeout=30)
        stub.ReloadProfile(triage_pb2.ReloadRequest(), metadata=metadata("admin-tok-91bd"), timeout=60)
    assert server.stop() == 0
    log = server.output()
    assert "triage serve" in log or "authentication" in log  # the log was read: it holds the start lines
    secrets = [*TOKENS, BOUND, "wrong-tok-5555", SECRET_PREFIX, certs["client.key"].read_text().splitlines()[1]]
    found = [s for s in secrets if s in log]
    assert not found, f"the server's log holds {found}"
    assert json.dumps(TOKENS)[:10] not in log
