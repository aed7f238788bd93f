"""TriageClient's own mechanics against small fake servers in this process (no engine): order of
answers over several streams, bounded retries that resend only unanswered batches, errors that
are raised once with the server's one-line message, inputs from tables and Parquet files, and
streams that end cleanly when the consumer or the input stops early."""

from __future__ import annotations

import threading
from concurrent import futures

import grpc
import pyarrow as pa
import pyarrow.flight as flight
import pyarrow.parquet as pq
import pytest

from hitl_triage.serve.client import NO_RETRY, Retry, TriageClient, TriageError
from hitl_triage.serve.proto.triage.v1 import triage_pb2, triage_pb2_grpc
from hitl_triage.serve.service.ipc import read_batch, write_batch

FAST = Retry(attempts=3, initial_s=0.001, max_s=0.01)


def rows(n: int, start: int = 0) -> pa.Table:
    return pa.table({"id": pa.array(range(start, start + n), pa.int64()), "x": pa.array([float(i) for i in range(n)])})


class Echo(flight.FlightServerBase):
    """Answers each batch with its ids and the exchange's number; ``fail`` plans the errors:
    {exchange number: (batches answered first, Flight error)}."""

    def __init__(self, fail=None):
        super().__init__("grpc://127.0.0.1:0")
        self.fail = fail or {}
        self.exchanges = 0
        self.received: list[list[int]] = []
        self.lock = threading.Lock()

    def do_exchange(self, context, descriptor, reader, writer):
        with self.lock:
            number = self.exchanges
            self.exchanges += 1
        answered, error = self.fail.get(number, (None, None))
        started = False
        for i, chunk in enumerate(reader):
            if answered is not None and i == answered:
                raise error
            batch = chunk.data
            with self.lock:
                self.received.append(batch.column("id").to_pylist())
            out = pa.record_batch({"id": batch.column("id"), "exchange": pa.array([number] * batch.num_rows, pa.int32())})
            if not started:
                writer.begin(out.schema)
                started = True
            writer.write_batch(out)

    def do_action(self, context, action):
        yield flight.Result(b"SERVING" if action.type == "health" else b'{"rows": 7}')


@pytest.fixture
def echo():
    servers = []

    def make(fail=None) -> Echo:
        server = Echo(fail)
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.shutdown()


def ids(answers) -> list[int]:
    return [i for a in answers for i in a.column("id").to_pylist()]


@pytest.mark.parametrize("streams", [1, 3])
def test_answers_come_back_in_order_one_per_batch(echo, streams):
    server = echo()
    table = rows(1000)
    with TriageClient(f"127.0.0.1:{server.port}", batch_rows=37) as client:  # 28 batches, the last short
        answers = list(client.triage_stream([table], streams=streams))
        assert [a.num_rows for a in answers] == [37] * 27 + [1]
        assert ids(answers) == list(range(1000))
        assert client.triage(table).column("id").to_pylist() == list(range(1000))
        assert client.health() == "SERVING" and client.stats() == {"rows": 7}
    assert server.exchanges == streams + 1


def test_a_retryable_error_resends_only_the_unanswered_batches(echo):
    busy = flight.FlightUnavailableError("admission queue: full", b"RESOURCE_EXHAUSTED")
    server = echo({0: (2, busy), 1: (0, busy)})  # 2 answers then full; then full at once; then fine
    with TriageClient(f"127.0.0.1:{server.port}", batch_rows=10, retry=FAST) as client:
        answers = list(client.triage_stream([rows(50)], window=1))
    assert ids(answers) == list(range(50))
    assert [a.column("exchange")[0].as_py() for a in answers] == [0, 0, 2, 2, 2]
    # The two answered batches were never sent again.
    assert [r[0] for r in server.received] == [0, 10, 20, 30, 40]


def test_retries_are_bounded_and_other_errors_are_not_retried(echo):
    down = flight.FlightUnavailableError("review queue: expected the escalations to be stored, found OSError", b"UNAVAILABLE")
    server = echo({i: (0, down) for i in range(10)})
    with TriageClient(f"127.0.0.1:{server.port}", retry=FAST) as client, pytest.raises(TriageError) as failed:
        client.triage(rows(5))
    assert failed.value.code == "UNAVAILABLE" and failed.value.retryable
    assert str(failed.value) == "review queue: expected the escalations to be stored, found OSError"
    assert server.exchanges == FAST.attempts + 1

    bad = flight.FlightServerError("logits: expected floats, found string", b"INVALID_ARGUMENT")
    server = echo({0: (0, bad)})
    with TriageClient(f"127.0.0.1:{server.port}", retry=FAST) as client, pytest.raises(TriageError) as refused:
        client.triage(rows(5))
    assert (refused.value.code, str(refused.value)) == ("INVALID_ARGUMENT", "logits: expected floats, found string")
    assert server.exchanges == 1


def test_a_retry_goes_to_the_next_address(echo):
    down = flight.FlightUnavailableError("server: shutting down; retry on another replica", b"UNAVAILABLE")
    first, second = echo({0: (0, down)}), echo()
    with TriageClient(f"127.0.0.1:{first.port},127.0.0.1:{second.port}", retry=FAST) as client:
        assert client.triage(rows(20)).num_rows == 20
    assert (first.exchanges, second.exchanges) == (1, 1)


def test_parquet_files_and_tables_stream_as_one_sequence(echo, tmp_path):
    server = echo()
    pq.write_table(rows(120), tmp_path / "a.parquet", row_group_size=50)
    # Another file whose column types differ but convert (int32 ids): cast to the first schema.
    pq.write_table(rows(30, start=120).cast(pa.schema([("id", pa.int32()), ("x", pa.float64())])), tmp_path / "b.parquet")
    with TriageClient(f"127.0.0.1:{server.port}", batch_rows=40) as client:
        answers = list(client.triage_stream([tmp_path / "a.parquet", str(tmp_path / "b.parquet"), rows(5, start=150)]))
    assert ids(answers) == list(range(155))


def test_an_input_that_fails_midway_raises_and_the_stream_ends(echo, tmp_path):
    server = echo()

    def inputs():
        yield rows(20)
        raise OSError("disk gone")

    with TriageClient(f"127.0.0.1:{server.port}", batch_rows=10) as client:
        for streams in (1, 2):
            with pytest.raises(OSError, match="disk gone"):
                list(client.triage_stream(inputs(), streams=streams))
        with pytest.raises(FileNotFoundError):
            list(client.triage_stream([tmp_path / "missing.parquet"]))
        assert client.triage(rows(3)).num_rows == 3  # the connection still serves


def test_a_consumer_that_stops_early_leaves_nothing_hanging(echo):
    server = echo()
    with TriageClient(f"127.0.0.1:{server.port}", batch_rows=10) as client:
        for streams in (1, 3):
            stream = client.triage_stream([rows(10_000)], streams=streams)
            assert next(stream).num_rows == 10
            stream.close()
        assert client.triage(rows(3)).num_rows == 3
    done = threading.Event()
    threading.Thread(target=lambda: (server.shutdown(), done.set()), daemon=True).start()
    assert done.wait(10), "an exchange was left open"


def test_flight_messages_lose_the_transport_noise(echo):
    server = echo({0: (0, flight.FlightUnauthorizedError("/triage.v1.Triage/Triage: expected a token of role fleet, "
                                                         "found one of role reviewer", b"PERMISSION_DENIED"))})
    with TriageClient(f"127.0.0.1:{server.port}", retry=NO_RETRY) as client, pytest.raises(TriageError) as denied:
        client.triage(rows(1))
    assert denied.value.code == "PERMISSION_DENIED"
    assert str(denied.value) == "/triage.v1.Triage/Triage: expected a token of role fleet, found one of role reviewer"
    with TriageClient("127.0.0.1:1", retry=NO_RETRY) as nowhere, pytest.raises(TriageError) as refused:
        nowhere.triage(rows(1))
    assert refused.value.code == "UNAVAILABLE"


class FlakyTriage(triage_pb2_grpc.TriageServicer):
    """triage.v1 with a Triage that answers RESOURCE_EXHAUSTED ``busy`` times first, and echoes ids."""

    def __init__(self, busy: int):
        self.busy = busy
        self.calls = 0
        self.metadata: list = []

    def _echo(self, data: bytes) -> triage_pb2.TriageResponse:
        batch = read_batch(data)
        return triage_pb2.TriageResponse(arrow_ipc=write_batch(batch.select(["id"])), rows=batch.num_rows)

    def Triage(self, request, context):
        self.calls += 1
        self.metadata.append(dict(context.invocation_metadata()))
        if self.calls <= self.busy:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "admission queue: full; retry later")
        return self._echo(request.arrow_ipc)

    def TriageStream(self, request_iterator, context):
        for request in request_iterator:
            yield self._echo(request.arrow_ipc)


@pytest.fixture
def grpc_server():
    servers = []

    def make(servicer) -> int:
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        triage_pb2_grpc.add_TriageServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        servers.append(server)
        return port

    yield make
    for server in servers:
        server.stop(0)


def test_grpc_transport_retries_unary_and_streams_in_order(grpc_server):
    servicer = FlakyTriage(busy=2)
    port = grpc_server(servicer)
    with TriageClient(f"127.0.0.1:{port}", transport="grpc", token="t0k", retry=FAST, batch_rows=64) as client:
        assert client.triage(rows(50)).column("id").to_pylist() == list(range(50))
        assert servicer.calls == 3 and servicer.metadata[0]["authorization"] == "Bearer t0k"
        assert ids(client.triage_stream([rows(1000)])) == list(range(1000))
    servicer = FlakyTriage(busy=100)
    port = grpc_server(servicer)
    with TriageClient(f"127.0.0.1:{port}", transport="grpc", retry=FAST) as client, pytest.raises(TriageError) as full:
        client.triage(rows(5))
    assert full.value.code == "RESOURCE_EXHAUSTED" and str(full.value) == "admission queue: full; retry later"
    assert servicer.calls == FAST.attempts + 1


def test_bad_arguments_are_refused_at_once():
    with pytest.raises(ValueError, match="transport"):
        TriageClient("127.0.0.1:1", transport="http")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="batch_rows"):
        TriageClient("127.0.0.1:1", batch_rows=0)
    with pytest.raises(ValueError, match="address"):
        TriageClient(" , ")
