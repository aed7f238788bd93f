"""The triage.v1 gRPC face end to end: `triage serve` started here in a subprocess on port 0,
called over loopback. Oracles: `triage run` on the same rows (decisions), the review queue read
directly (escalations), and gRPC status codes."""

from __future__ import annotations

from pathlib import Path

import grpc
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from engine_fixtures import one_torch_thread  # noqa: F401  (autouse)
from hitl_triage.serve.proto.triage.v1 import triage_pb2, triage_pb2_grpc
from hitl_triage.serve.queue import open_queue
from hitl_triage.serve.service.ipc import read_batch, write_batch
from service_fixtures import served
from test_cli import run_cli


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("service")
    assert run_cli("simulate", "--rows", 6000, "--out", d / "fleet.parquet", "--calibration-rows", 4000,
                   "--bank-rows", 1000, "--dim", 16, "--sources", 3, "--seed", 4)[0] == 0
    assert run_cli("fit", "--calibration", d / "fleet.calibration.parquet", "--bank", d / "fleet.bank.parquet",
                   "--out", d / "profile")[0] == 0
    assert run_cli("run", "--profile", d / "profile", d / "fleet.parquet", "--out", d / "decisions.parquet")[0] == 0
    return d


@pytest.fixture(scope="module")
def server(world):
    url = f"sqlite:///{world / 'review.db'}"
    with served(world / "profile", url, world) as server:
        channel = grpc.insecure_channel(server.grpc)
        yield triage_pb2_grpc.TriageStub(channel), channel, url, server.process


def fleet_batches(world: Path, size: int) -> list[pa.RecordBatch]:
    table = pq.read_table(world / "fleet.parquet")
    return [table.slice(i, size).combine_chunks().to_batches()[0] for i in range(0, table.num_rows, size)]


def test_unary_and_stream_decide_as_triage_run_does(server, world):
    stub, _, url, _ = server
    offline = pq.read_table(world / "decisions.parquet")
    batches = fleet_batches(world, 700)  # odd sizes: the batcher splits and joins them
    unary = [read_batch(stub.Triage(triage_pb2.TriageRequest(arrow_ipc=write_batch(b))).arrow_ipc) for b in batches]
    stream = [read_batch(r.arrow_ipc) for r in
              stub.TriageStream(iter(triage_pb2.TriageRequest(arrow_ipc=write_batch(b)) for b in batches))]
    for decided in (unary, stream):
        table = pa.Table.from_batches(decided)
        for name in offline.schema.names:
            assert table.column(name).equals(offline.column(name)), name
    # Every escalated row is in the queue once, although each was sent twice.
    escalated = offline.filter(offline.column("escalate"))
    with open_queue(url) as queue:
        assert sum(t["depth"] + t["in_flight"] + t["done"] for t in queue.stats()["tiers"].values()) >= escalated.num_rows
        assert queue.tier_of(str(escalated.column("id")[0].as_py())) == escalated.column("tier")[0].as_py()


def test_report_escalates_every_row_with_the_reported_bit(server, world):
    stub, _, _, _ = server
    batch = fleet_batches(world, 500)[3]
    response = stub.Report(triage_pb2.TriageRequest(arrow_ipc=write_batch(batch)))
    decided = read_batch(response.arrow_ipc)
    assert response.escalated == 500
    assert all(m & 32 for m in decided.column("reason_mask").to_pylist())


def test_verdicts_go_to_the_queue_and_bad_ones_are_refused(server, world):
    stub, _, url, _ = server
    with open_queue(url) as queue:
        item = queue.claim("general", "alice", n=1).to_pylist()[0]
    verdicts = pa.table({"id": [item["id"]], "reviewer": ["alice"], "tier": ["general"], "action": ["confirm"]})
    response = stub.SubmitVerdicts(triage_pb2.VerdictsRequest(arrow_ipc=write_batch(verdicts)))
    assert (response.stored, response.done) == (1, 1)
    again = stub.SubmitVerdicts(triage_pb2.VerdictsRequest(arrow_ipc=write_batch(verdicts)))
    assert (again.stored, again.duplicates) == (0, 1)
    bad = pa.table({"id": ["no-such-id"], "reviewer": ["alice"], "tier": ["general"], "action": ["confirm"]})
    with pytest.raises(grpc.RpcError) as refused:
        stub.SubmitVerdicts(triage_pb2.VerdictsRequest(arrow_ipc=write_batch(bad)))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "id: expected an item" in refused.value.details()


def test_bad_input_is_refused_by_name_and_the_server_keeps_serving(server, world):
    stub, channel, _, _ = server
    batch = fleet_batches(world, 100)[0]
    for data, words in ((write_batch(batch.drop_columns(["logits"])), "logits"), (b"not arrow", "arrow_ipc")):
        with pytest.raises(grpc.RpcError) as refused:
            stub.Triage(triage_pb2.TriageRequest(arrow_ipc=data))
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and words in refused.value.details()
    health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""))
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    with pytest.raises(grpc.RpcError) as late:
        stub.Triage(triage_pb2.TriageRequest(arrow_ipc=write_batch(batch)), timeout=1e-4)
    assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


def test_profile_stats_and_reflection(server, world):
    stub, channel, _, _ = server
    from hitl_triage.engine.profile import Profile

    profile = Profile.load(world / "profile")
    info = stub.GetProfile(triage_pb2.GetProfileRequest())
    assert (info.version, info.members, info.classes, info.dim) == (profile.version, profile.members, profile.classes, profile.dim)
    assert info.thresholds.confidence == pytest.approx(profile.thresholds.confidence)
    stats = stub.Stats(triage_pb2.StatsRequest())
    assert stats.profile_version == profile.version and stats.rows > 0
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    request = reflection_pb2.ServerReflectionRequest(list_services="")
    names = {s.name for r in reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(iter([request]))
             for s in r.list_services_response.service}
    assert {"triage.v1.Triage", "grpc.health.v1.Health"} <= names


def test_a_full_admission_queue_answers_resource_exhausted(world, tmp_path):
    with served(world / "profile", None, tmp_path, "--max-batch-rows", "64", "--max-queue-rows", "128") as server:
        stub = triage_pb2_grpc.TriageStub(grpc.insecure_channel(server.grpc))
        big = fleet_batches(world, 1000)[0]
        with pytest.raises(grpc.RpcError) as refused:
            stub.Triage(triage_pb2.TriageRequest(arrow_ipc=write_batch(big)))
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "admission queue" in refused.value.details()
        small = fleet_batches(world, 100)[0]
        assert stub.Triage(triage_pb2.TriageRequest(arrow_ipc=write_batch(small))).rows == 100


def test_queue_down_answers_unavailable_and_no_decisions(world, tmp_path):
    from hitl_triage.serve.queue.local_redis import RedisNotInstalled, local_redis

    try:
        redis_cm = local_redis(tmp_path)
        url = redis_cm.__enter__()
    except RedisNotInstalled as exc:
        pytest.skip(str(exc))
    try:
        with served(world / "profile", url, tmp_path) as server:
            stub = triage_pb2_grpc.TriageStub(grpc.insecure_channel(server.grpc))
            batch = fleet_batches(world, 500)[1]
            assert stub.Triage(triage_pb2.TriageRequest(arrow_ipc=write_batch(batch))).rows == 500
            redis_cm.__exit__(None, None, None)  # the queue goes away
            redis_cm = None
            with pytest.raises(grpc.RpcError) as down:
                stub.Triage(triage_pb2.TriageRequest(arrow_ipc=write_batch(fleet_batches(world, 500)[2])), timeout=60)
            assert down.value.code() == grpc.StatusCode.UNAVAILABLE and "review queue" in down.value.details()
            channel = grpc.insecure_channel(server.grpc)
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""))
            assert health.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        if redis_cm is not None:
            redis_cm.__exit__(None, None, None)


def test_reload_mid_stream_switches_between_batches_and_loses_no_call(world, tmp_path):
    import shutil

    profile_dir = tmp_path / "profile"
    shutil.copytree(world / "profile", profile_dir)
    with served(profile_dir, None, tmp_path) as server:
        stub = triage_pb2_grpc.TriageStub(grpc.insecure_channel(server.grpc))
        batches = fleet_batches(world, 300)

        def requests():
            for i, b in enumerate(batches):
                if i == len(batches) // 2:
                    # A refit at another budget lands in the directory the server watches.
                    assert run_cli("fit", "--calibration", world / "fleet.calibration.parquet", "--bank",
                                   world / "fleet.bank.parquet", "--out", profile_dir, "--budget", 0.3)[0] == 0
                    stub.ReloadProfile(triage_pb2.ReloadRequest())
                yield triage_pb2.TriageRequest(arrow_ipc=write_batch(b))

        responses = list(stub.TriageStream(requests()))
    assert len(responses) == len(batches) and sum(r.rows for r in responses) == sum(b.num_rows for b in batches)
    versions = [r.profile_version for r in responses]
    assert len(set(versions)) == 2 and versions == sorted(versions, key=versions.index)  # one switch, in order
    for r in responses:  # every decision names the version that made it
        assert set(read_batch(r.arrow_ipc).column("profile_version").to_pylist()) == {r.profile_version}
