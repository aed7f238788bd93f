"""Reliability test set-up (issue 21): one fitted world per test session, `triage serve` started by
service_fixtures.served, and one way to send a batch over each face and read what came back.

    world = shared_world(tmp_path_factory)                     # fleet, profile (M=?, C=?, D=16), oracle
    with reliable_server(world, tmp) as server:                # `triage serve` on the CPU, SQLite queue
        outcome = send("flight", server, batch)               # Outcome(code, message, decisions)

Faces: ``grpc`` (triage.v1 Triage), ``flight`` (DoExchange ``triage``), ``oip`` (the Open Inference
Protocol's ModelInfer: the batch becomes tensors as a Triton client would send them) and ``run``
(``triage run`` on the batch written as a Parquet file; exit 2 reads as INVALID_ARGUMENT with its one
line). Every face's answer becomes an :class:`Outcome` whose ``decisions`` hold the decision
columns all four faces carry (the inference protocol's outputs), so that they compare directly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import time
from pathlib import Path
from typing import Iterator

import grpc
import numpy as np
import pyarrow as pa
import pyarrow.flight as flight
import pyarrow.parquet as pq
from grpc_health.v1 import health_pb2, health_pb2_grpc

from hitl_triage.serve.client import LocalServer, _flight_error
from hitl_triage.serve.proto.inference import grpc_predict_v2_pb2 as oip, grpc_predict_v2_pb2_grpc as oip_grpc
from hitl_triage.serve.proto.triage.v1 import triage_pb2, triage_pb2_grpc
from hitl_triage.serve.service import inference
from hitl_triage.serve.service.ipc import read_batch, write_batch
from service_fixtures import World, make_world, served

FACES = ("grpc", "flight", "oip", "run")
# The decision columns every face answers (the inference protocol's outputs), by column name.
COMMON = tuple(column for _, column in inference.OUTPUTS.values())
_WORLD: dict[str, World] = {}


def shared_world(tmp_path_factory) -> World:
    """One small fitted world for every reliability module of the session (a fit costs seconds)."""
    if "world" not in _WORLD:
        _WORLD["world"] = make_world(tmp_path_factory.mktemp("reliability-world"), rows=1200)
    return _WORLD["world"]


@contextlib.contextmanager
def reliable_server(world: World, tmp: Path, *extra: str, queue_url: str | None = "fresh",
                    config: dict | None = None, profile: Path | None = None) -> Iterator[LocalServer]:
    """`triage serve` of the world's profile (or ``profile``) on the CPU with one torch thread,
    gRPC and Flight on free ports, a fresh SQLite queue in ``tmp`` unless ``queue_url`` names one
    (None: no queue)."""
    tmp.mkdir(parents=True, exist_ok=True)
    if queue_url == "fresh":
        queue_url = f"sqlite:///{tmp / f'review-{time.monotonic_ns()}.db'}"
    with served(profile or world.profile, queue_url, tmp, "--device", "cpu", *extra, config=config,
                env={"OMP_NUM_THREADS": "1"}) as server:
        server.queue_url = queue_url  # type: ignore[attr-defined]
        yield server


@dataclasses.dataclass
class Outcome:
    """``code``: OK or the gRPC status name the face gave; ``message``: its one line;
    ``decisions``: the :data:`COMMON` decision columns (and ``id``) when OK."""

    code: str
    message: str = ""
    decisions: pa.Table | None = None

    def __repr__(self) -> str:
        rows = None if self.decisions is None else self.decisions.num_rows
        return f"Outcome({self.code}, {self.message!r}, rows={rows})"


def bearer(token: str | None) -> list[tuple[str, str]]:
    return [] if token is None else [("authorization", f"Bearer {token}")]


def grpc_channel(address: str, credentials: grpc.ChannelCredentials | None = None, options=()) -> grpc.Channel:
    opts = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20), *options]
    if credentials is not None:
        return grpc.secure_channel(address, credentials, options=opts)
    return grpc.insecure_channel(address, options=opts)


def health(address: str, credentials: grpc.ChannelCredentials | None = None) -> str:
    """grpc.health.v1's overall status of the server at ``address``."""
    with grpc_channel(address, credentials) as channel:
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=10).status
    return health_pb2.HealthCheckResponse.ServingStatus.Name(status)


def _common(decisions: pa.Table | pa.RecordBatch) -> pa.Table:
    table = decisions if isinstance(decisions, pa.Table) else pa.Table.from_batches([decisions])
    names = ["id", *COMMON] if "id" in table.schema.names else list(COMMON)
    return table.select(names)


def via_grpc(address: str, batch: pa.RecordBatch, *, token: str | None = None, method: str = "Triage",
             timeout: float = 60.0) -> Outcome:
    with grpc_channel(address) as channel:
        stub = triage_pb2_grpc.TriageStub(channel)
        try:
            response = getattr(stub, method)(triage_pb2.TriageRequest(arrow_ipc=write_batch(batch)),
                                             metadata=bearer(token), timeout=timeout)
        except grpc.RpcError as exc:
            return Outcome(exc.code().name, " ".join((exc.details() or "").split()))
    if not response.arrow_ipc:
        return Outcome("OK", "", pa.table({name: [] for name in COMMON}))
    return Outcome("OK", "", _common(read_batch(response.arrow_ipc)))


def via_flight(address: str, batch: pa.RecordBatch, *, token: str | None = None, command: bytes = b"triage",
               timeout: float = 60.0) -> Outcome:
    client = flight.FlightClient(f"grpc+tcp://{address}")
    options = flight.FlightCallOptions(timeout=timeout, headers=[(k.encode(), v.encode()) for k, v in bearer(token)])
    try:
        writer, reader = client.do_exchange(flight.FlightDescriptor.for_command(command), options)
        writer.begin(batch.schema)
        writer.write_batch(batch)
        writer.done_writing()
        got = reader.read_all()
        writer.close()
    except Exception as exc:  # noqa: BLE001 - the server's status
        error = _flight_error(exc)
        return Outcome(error.code, str(error))
    finally:
        client.close()
    return Outcome("OK", "", _common(got))


_DATATYPE = {pa.float16(): "FP16", pa.float32(): "FP32", pa.float64(): "FP64", pa.int32(): "INT32",
             pa.int64(): "INT64", pa.int8(): "INT8", pa.bool_(): "BOOL"}


def infer_request(batch: pa.RecordBatch) -> oip.ModelInferRequest:
    """The ModelInferRequest a Triton client would send for ``batch``: a fixed-size-list column
    becomes a tensor [B, ...] of its value type, a string column BYTES [B], an int64 column INT64
    [B]; each column's tensor is named after it in capitals (logits -> LOGITS), raw contents."""
    request = oip.ModelInferRequest(model_name=inference.MODEL)
    for name, column in zip(batch.schema.names, batch.columns):
        shape = [len(column)]
        values = column
        while pa.types.is_fixed_size_list(values.type):
            shape.append(values.type.list_size)
            values = values.flatten()
        if pa.types.is_string(values.type) or pa.types.is_large_string(values.type) or pa.types.is_binary(values.type):
            datatype, raw = "BYTES", inference.write_bytes_tensor(values.cast(pa.binary()))
        else:
            datatype = _DATATYPE[values.type]
            raw = values.to_numpy(zero_copy_only=False).astype(values.type.to_pandas_dtype()).tobytes()
        request.inputs.add(name=name.upper(), datatype=datatype, shape=shape)
        request.raw_input_contents.append(raw)
    return request


def via_oip(address: str, request: oip.ModelInferRequest | pa.RecordBatch, *, token: str | None = None,
            timeout: float = 60.0) -> Outcome:
    if isinstance(request, pa.RecordBatch):
        request = infer_request(request)
    with grpc_channel(address) as channel:
        try:
            response = oip_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, metadata=bearer(token), timeout=timeout)
        except grpc.RpcError as exc:
            return Outcome(exc.code().name, " ".join((exc.details() or "").split()))
    columns = {}
    for output, raw in zip(response.outputs, response.raw_output_contents):
        datatype, column = inference.OUTPUTS[output.name]
        if datatype == "BYTES":
            values = inference.read_bytes_tensor(raw, output.shape[0], output.name).cast(pa.string())
            columns[column] = pa.array([v or None for v in values.to_pylist()], pa.string())  # "" where not escalated
        else:
            columns[column] = pa.array(np.frombuffer(raw, dtype=inference._DATATYPES[datatype][0]))
    return Outcome("OK", "", pa.table({name: columns[name] for name in COMMON}))


def via_run(world: World, batch: pa.RecordBatch, tmp: Path, *, queue_url: str | None = None) -> Outcome:
    """`triage run` of ``batch`` (written as a Parquet file) in this process: exit 0 OK with the
    decisions file, exit 2 INVALID_ARGUMENT with its one line on stderr, anything else its code."""
    from hitl_triage.serve.cli import main

    stamp = time.monotonic_ns()
    path, out = tmp / f"in-{stamp}.parquet", tmp / f"out-{stamp}.parquet"
    pq.write_table(pa.Table.from_batches([batch]), path)
    stdout, stderr = io.StringIO(), io.StringIO()
    argv = ["run", "--profile", str(world.profile), str(path), "--out", str(out), "--device", "cpu"]
    argv += ["--queue", queue_url] if queue_url else []
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = main(argv)
    lines = [line for line in stderr.getvalue().splitlines() if line.strip()]
    if code == 0:
        return Outcome("OK", "", _common(pq.read_table(out)))
    assert len(lines) == 1, f"triage run: expected one line on stderr, found {lines}"
    return Outcome("INVALID_ARGUMENT" if code == 2 else f"EXIT_{code}", lines[0])


def send(face: str, server: LocalServer | None, batch: pa.RecordBatch, *, world: World | None = None,
         tmp: Path | None = None, token: str | None = None) -> Outcome:
    """``batch`` over ``face`` (one of :data:`FACES`); ``run`` needs ``world`` and ``tmp``."""
    if face == "run":
        assert world is not None and tmp is not None
        return via_run(world, batch, tmp)
    assert server is not None
    if face == "grpc":
        return via_grpc(server.grpc, batch, token=token)
    if face == "flight":
        return via_flight(server.flight, batch, token=token)
    if face == "oip":
        return via_oip(server.grpc, batch, token=token)
    raise ValueError(f"face: expected one of {FACES}, found {face!r}")


def same_decisions(got: pa.Table, want: pa.Table) -> list[str]:
    """The columns of :data:`COMMON` where ``got`` differs from ``want`` (bit for bit, NaN equal
    to NaN; tier null and "" alike)."""
    differ = []
    for name in COMMON:
        a, b = got.column(name).combine_chunks(), want.column(name).combine_chunks()
        if pa.types.is_floating(a.type):
            x = a.to_numpy(zero_copy_only=False).astype(np.float32)
            y = b.to_numpy(zero_copy_only=False).astype(np.float32)
            if x.shape != y.shape or not np.array_equal(x, y, equal_nan=True):
                differ.append(name)
        else:
            x, y = a.to_pylist(), b.to_pylist()
            if name == "tier":
                x, y = [v or None for v in x], [v or None for v in y]
            if x != y:
                differ.append(name)
    return differ


def sqlite_items(queue_url: str) -> dict[str, int]:
    """Items per prediction id in an SQLite review queue, every state counted, read with sqlite3
    itself (not through the queue's code), after ``PRAGMA integrity_check`` has passed."""
    import sqlite3

    path = queue_url.removeprefix("sqlite:///")
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=60)) as db:
        check = db.execute("PRAGMA integrity_check").fetchall()
        assert check == [("ok",)], f"{path}: PRAGMA integrity_check found {check[:5]}"
        return dict(db.execute("SELECT id, COUNT(*) FROM items GROUP BY id").fetchall())
