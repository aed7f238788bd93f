"""Hostile Arrow (issue 21, item 2): truncated streams, corrupted buffers, offsets and lengths past
the end, a batch that claims 2^31 rows, dictionary and extension types the contract does not
name, a thousand columns, and a fuzz run that mutates valid streams. The server validates every
incoming batch in full (serve/service/ipc.py ``validated``: ``RecordBatch.validate(full=True)``)
before it reads a value, answers INVALID_ARGUMENT, and never crashes: after every case its process
is alive, SERVING, and decides a valid batch as before.

Two ways in: triage.v1's ``arrow_ipc`` bytes, and Arrow Flight's own wire messages (FlightData
protobufs written here by hand, header and body mutated, sent with grpcio to the Flight port), so
the bytes reach the server's Flight reader as an attacker would send them, not through pyarrow's
client, which will not write a broken message.

Arrow's fuzzing corpus (apache/arrow-testing, ``data/arrow-ipc-stream/crash-*``) does not ship in
the pyarrow wheel (its ``pyarrow/tests/data`` holds feather, orc and parquet files only); this module
replays none of it and says so. pyarrow here is at or above 14.0.1, the CVE-2023-47248 fix (checked).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import grpc
import numpy as np
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from engine_fixtures import one_torch_thread  # noqa: F401  (autouse)
from hitl_triage.serve.proto.triage.v1 import triage_pb2, triage_pb2_grpc
from hitl_triage.serve.service.ipc import write_batch
from reliability_fixtures import grpc_channel, health, reliable_server, same_decisions, shared_world, via_flight, via_grpc

FUZZ_CASES = 300          # mutated streams per way in (about 10 ms each on loopback, a loaded 2-core VM)
ROWS = 777                # a row count whose int64 is easy to find in a record batch's header
DO_EXCHANGE = "/arrow.flight.protocol.FlightService/DoExchange"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return shared_world(tmp_path_factory)


@pytest.fixture(scope="module")
def server(world, tmp_path_factory):
    with reliable_server(world, tmp_path_factory.mktemp("arrow-server")) as server:
        yield server


@pytest.fixture(scope="module")
def valid(world) -> pa.RecordBatch:
    table = world.table().select(["id", "logits", "embedding", "source"]).slice(0, ROWS)
    return table.combine_chunks().to_batches()[0]


@pytest.fixture(scope="module")
def reference(server, valid) -> pa.Table:
    """The decisions of the valid batch before any hostile input (compared with those after)."""
    got = via_grpc(server.grpc, valid)
    assert got.code == "OK", got
    return got.decisions


def test_pyarrow_has_the_cve_2023_47248_fix_and_no_fuzz_corpus():
    major, minor, patch = (int(x) for x in pa.__version__.split(".")[:3])
    assert (major, minor, patch) >= (14, 0, 1), pa.__version__
    shipped = Path(pa.__file__).parent / "tests" / "data"
    found = [p for p in shipped.rglob("*") if "crash" in p.name or "arrow-ipc" in str(p)] if shipped.exists() else []
    assert not found, f"pyarrow ships Arrow IPC fuzz files now: replay them here ({found[:3]})"


# -- raw Flight messages ---------------------------------------------------------------------------


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def flight_data(header: bytes, body: bytes = b"", command: bytes | None = None) -> bytes:
    """A FlightData protobuf (Flight.proto: descriptor = 1, data_header = 2, data_body = 1000)."""
    out = b""
    if command is not None:
        out += _field(1, b"\x08\x02" + _field(2, command))  # FlightDescriptor{type: CMD, cmd}
    return out + _field(2, header) + (_field(1000, body) if body else b"")


def ipc_messages(stream: bytes) -> list[tuple[bytes, bytes]]:
    """(flatbuffer header, body) of each message of an IPC stream: what FlightData carries."""
    reader = pa.ipc.MessageReader.open_stream(pa.py_buffer(stream))
    out = []
    while True:
        try:
            message = reader.read_next_message()
        except StopIteration:
            return out
        out.append((message.metadata.to_pybytes(), message.body.to_pybytes() if message.body is not None else b""))


def raw_exchange(address: str, messages: list[bytes], timeout: float = 30.0) -> str:
    """Send FlightData messages on a DoExchange; the status the call ends with (OK or a name)."""
    with grpc_channel(address) as channel:
        call = channel.stream_stream(DO_EXCHANGE, request_serializer=lambda b: b, response_deserializer=lambda b: b)
        try:
            for _ in call(iter(messages), timeout=timeout):
                pass
        except grpc.RpcError as exc:
            return exc.code().name
    return "OK"


def flight_messages(stream: bytes) -> list[bytes]:
    (schema, _), *rest = ipc_messages(stream)
    return [flight_data(schema, command=b"triage")] + [flight_data(h, b) for h, b in rest]


def send_raw_ipc(address: str, data: bytes) -> tuple[str, str]:
    with grpc_channel(address) as channel:
        try:
            triage_pb2_grpc.TriageStub(channel).Triage(triage_pb2.TriageRequest(arrow_ipc=data), timeout=30)
        except grpc.RpcError as exc:
            return exc.code().name, exc.details() or ""
    return "OK", ""


# -- hostile streams, by name ----------------------------------------------------------------------


def _replace(data: bytes, old: bytes, new: bytes, start: int = 0) -> bytes:
    i = data.find(old, start)
    assert i >= 0, "pattern not in the stream"
    return data[:i] + new + data[i + len(old):]


def string_offsets_past_the_end(valid: pa.RecordBatch) -> bytes:
    ids = pa.array([f"o{i}" for i in range(8)])
    batch = valid.slice(0, 8).set_column(0, "id", ids)
    data = write_batch(batch)
    offsets = np.frombuffer(ids.buffers()[1], np.int32)[:9]
    bad = offsets.copy()
    bad[-1] = 1 << 30
    return _replace(data, offsets.tobytes(), bad.tobytes())


def claims_2_31_rows(valid: pa.RecordBatch) -> bytes:
    data = write_batch(valid)
    (schema_header, _), (header, _) = ipc_messages(data)
    start = data.find(header)
    huge = np.int64(2**31).tobytes()
    patched = header.replace(np.int64(ROWS).tobytes(), huge)
    assert patched != header
    return data[:start] + patched + data[start + len(header):]


def dictionary_indices_out_of_range(valid: pa.RecordBatch) -> bytes:
    source = pa.DictionaryArray.from_arrays(pa.array(np.zeros(8, np.int32)), pa.array(["cam-a", "cam-b"]))
    batch = valid.slice(0, 8).set_column(3, "source", source)
    data = write_batch(batch)
    return _replace(data, np.zeros(8, np.int32).tobytes(), np.full(8, 1 << 20, np.int32).tobytes())


def truncated(valid: pa.RecordBatch, keep: float) -> bytes:
    data = write_batch(valid)
    return data[: int(len(data) * keep)]


class UnknownLogits(pa.ExtensionType):
    """An extension type the server has never heard of, over the contract's logits storage."""

    def __init__(self, storage: pa.DataType):
        super().__init__(storage, "acme.secret_logits")

    def __arrow_ext_serialize__(self) -> bytes:
        return b"{}"

    @classmethod
    def __arrow_ext_deserialize__(cls, storage_type, serialized):
        return cls(storage_type)


HOSTILE = {
    "truncated in the schema": (lambda v: truncated(v, 0.01), "INVALID_ARGUMENT", "arrow_ipc"),
    "truncated in the batch header": (lambda v: truncated(v, 0.05), "INVALID_ARGUMENT", "arrow_ipc"),
    "truncated in the body": (lambda v: truncated(v, 0.6), "INVALID_ARGUMENT", "arrow_ipc"),
    "string offsets past the end": (string_offsets_past_the_end, "INVALID_ARGUMENT", "validation"),
    "a batch claiming 2^31 rows": (claims_2_31_rows, "INVALID_ARGUMENT", "arrow_ipc"),
    "dictionary indices out of range": (dictionary_indices_out_of_range, "INVALID_ARGUMENT", "validation"),
    "garbage bytes": (lambda v: os.urandom(4096), "INVALID_ARGUMENT", "arrow_ipc"),
    "a continuation marker and a huge length": (lambda v: b"\xff\xff\xff\xff" + np.int32(2**31 - 1).tobytes() + b"\0" * 64,
                                                "INVALID_ARGUMENT", "arrow_ipc"),
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_streams_are_refused_on_both_ways_in(name, server, valid, reference):
    build, code, word = HOSTILE[name]
    data = build(valid)
    got, details = send_raw_ipc(server.grpc, data)
    assert got == code and word in details, (got, details)
    try:
        messages = flight_messages(data)
    except (pa.ArrowInvalid, OSError):  # the test itself cannot split it: send it as one header
        messages = [flight_data(data[:1024], data[1024:], command=b"triage")]
    assert raw_exchange(server.flight, messages) != "OK"
    assert server.process.poll() is None and health(server.grpc) == "SERVING"


def test_types_the_contract_does_not_name_get_their_documented_answer(server, valid):
    """Dictionary strings in a string column are read as their values (as `triage run` does);
    a dictionary id, an extension type nobody registered (it arrives as its storage type with
    its name in the field's metadata, Arrow's rule) or a known one the contract does not name are
    judged by their type: refused naming the column, or decided when the storage is the contract's."""
    small = valid.slice(0, 8)
    source = pa.DictionaryArray.from_arrays(pa.array(np.arange(8) % 2, pa.int32()), pa.array(["cam-a", "cam-b"]))
    plain = small.set_column(3, "source", source.cast(pa.string()))
    want = via_grpc(server.grpc, plain)
    assert want.code == "OK"
    for face in (via_grpc, via_flight):
        got = face(server.grpc if face is via_grpc else server.flight, small.set_column(3, "source", source))
        assert got.code == "OK" and not same_decisions(got.decisions, want.decisions), got
    dictionary_ids = pa.DictionaryArray.from_arrays(pa.array(np.arange(8), pa.int32()), small.column("id"))
    cases = {
        "dictionary ids": (small.set_column(0, "id", dictionary_ids), "id"),
        "uuid ids (arrow.uuid)": (small.set_column(0, "id", pa.ExtensionArray.from_storage(
            pa.uuid(), pa.array([os.urandom(16) for _ in range(8)], pa.binary(16)))), "id"),
        "json logits (arrow.json)": (small.set_column(1, "logits", pa.ExtensionArray.from_storage(
            pa.json_(), pa.array(["[]"] * 8))), "logits"),
    }
    for what, (batch, column) in cases.items():
        for face in (via_grpc, via_flight):
            got = face(server.grpc if face is via_grpc else server.flight, batch)
            assert got.code == "INVALID_ARGUMENT" and column in got.message and "expected" in got.message, (what, got)
    pa.register_extension_type(UnknownLogits(small.schema.field("logits").type))
    try:
        unknown = small.set_column(1, "logits", pa.ExtensionArray.from_storage(
            UnknownLogits(small.schema.field("logits").type), small.column("logits")))
        data = write_batch(unknown)
    finally:
        pa.unregister_extension_type("acme.secret_logits")
    got, details = send_raw_ipc(server.grpc, data)
    assert got == "OK", details  # the server reads its storage: the contract's logits
    assert server.process.poll() is None and health(server.grpc) == "SERVING"


def test_a_thousand_columns_are_decided_and_pass_through(server, valid):
    """Columns the contract does not name pass through to the review item (README): a thousand
    of them are decided like the batch without them, in bounded time."""
    small = valid.slice(0, 64)
    wide = small
    for i in range(1000):
        wide = wide.append_column(f"extra_{i}", pa.array(np.full(64, i, np.float32)))
    started = time.monotonic()
    got, want = via_grpc(server.grpc, wide), via_grpc(server.grpc, small)
    assert got.code == want.code == "OK", (got, want)
    assert not same_decisions(got.decisions, want.decisions)
    assert time.monotonic() - started < 30
    assert health(server.grpc) == "SERVING"


# -- fuzz: mutations of valid streams --------------------------------------------------------------

INTERESTING = [0, 1, -1, 2**31 - 1, -(2**31), 2**31 - 8, 777, 778, 1 << 20]


@st.composite
def mutations(draw, size: int):
    """A list of edits of a byte string of ``size`` bytes: truncate, set a byte, set an aligned
    int32 to an interesting value, insert bytes."""
    edits = []
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["byte", "int32", "int32", "truncate", "insert"]))
        at = draw(st.integers(0, size - 1))
        if kind == "byte":
            edits.append((kind, at, draw(st.integers(0, 255))))
        elif kind == "int32":
            edits.append((kind, at - at % 4, draw(st.sampled_from(INTERESTING))))
        elif kind == "truncate":
            edits.append((kind, at, 0))
        else:
            edits.append((kind, at, draw(st.binary(min_size=1, max_size=16))))
    return edits


def mutate(data: bytes, edits) -> bytes:
    out = bytearray(data)
    for kind, at, value in edits:
        at = min(at, max(len(out) - 1, 0))
        if kind == "byte" and out:
            out[at] = value
        elif kind == "int32" and len(out) >= at + 4:
            out[at:at + 4] = np.int32(np.int64(value).astype(np.int32)).tobytes()
        elif kind == "truncate":
            del out[at:]
        elif kind == "insert":
            out[at:at] = value
    return bytes(out)


def test_fuzzed_streams_never_crash_the_server(server, valid, reference):
    small = valid.slice(0, 40)
    data = write_batch(small)
    (schema, _), (header, body) = ipc_messages(data)
    seen = {"ipc": 0, "flight": 0}
    codes: dict[str, int] = {}

    @settings(max_examples=FUZZ_CASES, deadline=None, database=None, derandomize=True,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
    @given(edits=mutations(len(data)))
    def over_triage_v1(edits):
        code, _ = send_raw_ipc(server.grpc, mutate(data, edits))
        assert code in ("OK", "INVALID_ARGUMENT"), code  # never INTERNAL, never a dead server
        codes[code] = codes.get(code, 0) + 1
        seen["ipc"] += 1

    @settings(max_examples=FUZZ_CASES, deadline=None, database=None, derandomize=True,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
    @given(which=st.sampled_from(["header", "body", "schema"]), edits=mutations(max(len(header), len(body))))
    def over_flight(which, edits):
        parts = {"schema": schema, "header": header, "body": body}
        parts[which] = mutate(parts[which], edits)
        code = raw_exchange(server.flight, [flight_data(parts["schema"], command=b"triage"),
                                            flight_data(parts["header"], parts["body"])])
        assert code != "UNAVAILABLE" or server.process.poll() is None, "the Flight face went away"
        seen["flight"] += 1

    over_triage_v1()
    over_flight()
    assert seen == {"ipc": FUZZ_CASES, "flight": FUZZ_CASES}
    assert server.process.poll() is None, server.output()[-3000:]
    assert health(server.grpc) == "SERVING"
    after = via_grpc(server.grpc, valid)
    assert after.code == "OK" and not same_decisions(after.decisions, reference)
    print(f"fuzz: {seen} mutated streams; triage.v1 answers {codes}")
