"""The Open Inference Protocol v2 face (issue 22): a fleet that speaks Triton / KServe calls
``triage serve`` with the client it has, and each row gets the decision ``triage run`` gives it.

The outside client is ``tritonclient[grpc]`` from PyPI. Since 2.42 its grpc extra pins
protobuf below 7 (2.73: ``protobuf>=6.30,<7``) while the project's stubs come from grpcio-tools
1.85.1 and need protobuf >= 7.35.1, so the two cannot share an environment: the client lives in
a virtual environment of its own (built once, about 20 s, under ``~/.cache/hitl-triage``, or
``$XDG_CACHE_HOME/hitl-triage``), driven by a small script (:data:`DRIVER`)
that reads one JSON command a line and answers one JSON line. Tensors cross as ``.npy``
files; whole requests built here with the project's own ``inference`` messages cross as
serialized bytes, parsed and sent there by tritonclient's message classes and stub (so typed
``contents`` and deliberately malformed requests travel through Triton's definitions too).

The server: ``triage serve`` in a subprocess on port 0 with a small fitted profile (M = 5,
C = 10, a bank of D = 16) and an SQLite queue, from ``service_fixtures`` as the other faces' tests. Oracles: ``triage run`` on the same rows (string
ids) and the triage.v1 ``Triage`` call on the same rows (int64 ids); grpc.health.v1 and server
reflection for "still SERVING" and the listed services. The conversions themselves (raw BYTES
both ways, [B, C] logits for M = 1, FP16, typed contents) are also checked in process, without
a server.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pyarrow as pa
import pytest

from engine_fixtures import one_torch_thread  # noqa: F401  (autouse)
from hitl_triage.serve.proto.inference import grpc_predict_v2_pb2 as pb
from hitl_triage.serve.service import inference
from hitl_triage.serve.service.ipc import read_batch, write_batch
from service_fixtures import make_world, served
from tool_cache import Unavailable, venv_with

TRITONCLIENT = "tritonclient[grpc]==2.73.0"
INSTALL_TIMEOUT_S = 600
ROWS = 240  # rows of the fleet file sent through the protocol
M, C, D = 5, 10, 16  # the simulated fleet's members, classes and embedding width (make_world's defaults)

# -- the client's environment and its driver -------------------------------------------------------

DRIVER = r'''
import json, sys
import grpc
import numpy as np
import tritonclient.grpc as triton
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

address = sys.argv[1]
client = triton.InferenceServerClient(address)
stub = service_pb2_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(address))


def run(op, args):
    if op == "live":
        return client.is_server_live()
    if op == "ready":
        return client.is_server_ready()
    if op == "model_ready":
        return client.is_model_ready(args["name"], args.get("version", ""))
    if op == "server_metadata":
        return client.get_server_metadata(as_json=True)
    if op == "model_metadata":
        return client.get_model_metadata(args["name"], args.get("version", ""), as_json=True)
    if op == "infer":
        inputs = []
        for spec in args["inputs"]:
            values = np.load(spec["file"])
            if spec["datatype"] == "BYTES":
                values = values.astype(object)  # bytes objects: np.bytes_ would drop trailing NULs
            tensor = triton.InferInput(spec["name"], list(spec.get("shape", values.shape)), spec["datatype"])
            tensor.set_data_from_numpy(values)
            inputs.append(tensor)
        outputs = None if args.get("outputs") is None else [triton.InferRequestedOutput(n) for n in args["outputs"]]
        result = client.infer(args["model"], inputs, model_version=args.get("version", ""), outputs=outputs)
        response = result.get_response()
        arrays = {}
        for out in response.outputs:
            value = result.as_numpy(out.name)
            arrays[out.name] = value.astype("S") if out.datatype == "BYTES" else value
        np.savez(args["out"], **arrays)
        return {"model_name": response.model_name, "model_version": response.model_version,
                "outputs": [[o.name, o.datatype, list(o.shape)] for o in response.outputs],
                "raw": len(response.raw_output_contents)}
    if op == "request":  # a serialized ModelInferRequest, sent as is; the response's bytes back
        with open(args["file"], "rb") as handle:
            request = service_pb2.ModelInferRequest.FromString(handle.read())
        response = stub.ModelInfer(request)
        with open(args["out"], "wb") as handle:
            handle.write(response.SerializeToString())
        return True
    raise ValueError(op)


for line in sys.stdin:
    command = json.loads(line)
    try:
        answer = {"ok": run(command["op"], command.get("args", {}))}
    except InferenceServerException as exc:
        answer = {"error": {"code": str(exc.status()).replace("StatusCode.", ""), "message": exc.message()}}
    except grpc.RpcError as exc:
        answer = {"error": {"code": exc.code().name, "message": exc.details()}}
    print(json.dumps(answer), flush=True)
'''


def tritonclient_python() -> Path:
    """The python of a virtual environment holding :data:`TRITONCLIENT`, built when missing
    (tests/tool_cache.py), or a skip saying why it cannot be had."""
    try:
        return venv_with("tritonclient-" + TRITONCLIENT.split("==")[1], TRITONCLIENT, INSTALL_TIMEOUT_S)
    except Unavailable as why:
        pytest.skip(str(why))


class TritonClient:
    """tritonclient in its own environment: ``call(op, **args)`` -> its answer, or the
    ``{"code", "message"}`` of the error it got."""

    def __init__(self, python: Path, address: str, workdir: Path):
        self.workdir = workdir
        script = workdir / "triton_driver.py"
        script.write_text(DRIVER)
        self.process = subprocess.Popen([str(python), str(script), address], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        text=True, bufsize=1)
        self._files = 0

    def call(self, op: str, **args):
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(json.dumps({"op": op, "args": args}) + "\n")
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the tritonclient driver exited ({self.process.wait()})")
        answer = json.loads(line)
        return answer["ok"] if "ok" in answer else Error(**answer["error"])

    def path(self, suffix: str) -> Path:
        self._files += 1
        return self.workdir / f"t{self._files}{suffix}"

    def infer(self, tensors: dict[str, tuple[str, np.ndarray]], *, model: str = "triage", **args):
        """tritonclient's ``infer`` with InferInput tensors {name: (datatype, values)}: (answer,
        {output: numpy array}) or an :class:`Error`."""
        specs = []
        for name, (datatype, values) in tensors.items():
            file = self.path(".npy")
            np.save(file, values)
            specs.append({"name": name, "datatype": datatype, "file": str(file)})
        out = self.path(".npz")
        answer = self.call("infer", model=model, inputs=specs, out=str(out), **args)
        if isinstance(answer, Error):
            return answer
        with np.load(out) as arrays:
            return answer, {name: arrays[name] for name in arrays.files}

    def request(self, request: pb.ModelInferRequest):
        """A request built with the project's messages, sent by tritonclient's stub: the response
        parsed back with the project's messages, or an :class:`Error`."""
        file, out = self.path(".pb"), self.path(".pb")
        file.write_bytes(request.SerializeToString())
        answer = self.call("request", file=str(file), out=str(out))
        return answer if isinstance(answer, Error) else pb.ModelInferResponse.FromString(out.read_bytes())

    def close(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()
        self.process.wait(10)


class Error:
    def __init__(self, code: str, message: str):
        self.code, self.message = code, message

    def __repr__(self) -> str:
        return f"Error({self.code}: {self.message})"


# -- the server ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """(directory, fleet rows, triage run's decisions of them, the server's address, a client)."""
    made = make_world(tmp_path_factory.mktemp("inference"), rows=ROWS)
    fleet = made.table()
    logits, embedding = fleet.schema.field("logits").type, fleet.schema.field("embedding").type
    assert (logits.list_size, logits.value_type.list_size, embedding.list_size) == (M, C, D)
    python = tritonclient_python()
    with served(made.profile, made.queue_url, made.dir, "--flight-port", "-1", env={"OMP_NUM_THREADS": "1"}) as server:
        client = TritonClient(python, server.grpc, made.dir)
        try:
            yield made.dir, fleet, made.offline(), server.grpc, client
        finally:
            client.close()


def tensors_of(rows: pa.Table, *, ids: str = "BYTES") -> dict[str, tuple[str, np.ndarray]]:
    """The protocol's input tensors of fleet rows."""
    logits = np.asarray(rows.column("logits").combine_chunks().flatten().flatten(), dtype=np.float32).reshape(-1, M, C)
    embedding = np.asarray(rows.column("embedding").combine_chunks().flatten(), dtype=np.float32).reshape(-1, D)
    strings = lambda name: np.array([s.encode() for s in rows.column(name).to_pylist()], dtype="S")  # noqa: E731
    out = {"LOGITS": ("FP32", logits), "EMBEDDING": ("FP32", embedding),
           "ID": ("BYTES", strings("id")) if ids == "BYTES" else ("INT64", np.arange(rows.num_rows, dtype=np.int64) + 7000)}
    out["SOURCE"] = ("BYTES", strings("source"))
    out["CATEGORY"] = ("BYTES", strings("category"))
    return out


def expected_outputs(decisions: pa.Table) -> dict[str, np.ndarray]:
    """The eight outputs as the protocol carries them, from decision columns."""
    out = {}
    for name, (datatype, column) in inference.OUTPUTS.items():
        values = decisions.column(column)
        if datatype == "BYTES":
            out[name] = np.array([(t or "").encode() for t in values.to_pylist()], dtype="S")
        else:
            out[name] = values.to_numpy()
    return out


def assert_outputs_equal(got: dict[str, np.ndarray], want: dict[str, np.ndarray], names=None) -> None:
    for name in names or want:
        g, w = got[name], want[name]
        assert g.shape == w.shape, (name, g.shape, w.shape)
        if g.dtype.kind == "f":
            np.testing.assert_array_equal(g, w, err_msg=name)  # NaN == NaN here (OOD_SCORE without a bank)
        else:
            mismatch = np.flatnonzero(g != w)
            assert mismatch.size == 0, f"{name}: {mismatch.size} rows differ, first {mismatch[:5]}: {g[mismatch[:5]]} vs {w[mismatch[:5]]}"


def health_status(address: str) -> str:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)


# -- end to end, through tritonclient --------------------------------------------------------------


def test_health_and_metadata(world):
    _, _, decisions, _, client = world
    version = decisions.column("profile_version")[0].as_py()
    assert client.call("live") is True and client.call("ready") is True
    assert client.call("model_ready", name="triage") is True
    assert client.call("model_ready", name="triage", version=version) is True
    assert client.call("model_ready", name="triage", version="no-such-version") is False
    assert client.call("model_ready", name="resnet50") is False
    server = client.call("server_metadata")
    assert server["name"] == "hitl-triage" and server["version"]
    meta = client.call("model_metadata", name="triage")
    assert meta["name"] == "triage" and meta["versions"] == [version] and meta["platform"] == "hitl-triage"
    shapes = lambda tensors: {t["name"]: (t["datatype"], [int(s) for s in t["shape"]]) for t in tensors}  # noqa: E731
    assert shapes(meta["inputs"]) == {"LOGITS": ("FP32", [-1, M, C]), "EMBEDDING": ("FP32", [-1, D]),
                                      "ID": ("BYTES", [-1]), "SOURCE": ("BYTES", [-1]), "CATEGORY": ("BYTES", [-1])}
    assert shapes(meta["outputs"]) == {name: (datatype, [-1]) for name, (datatype, _) in inference.OUTPUTS.items()}
    missing = client.call("model_metadata", name="resnet50")
    assert isinstance(missing, Error) and missing.code == "NOT_FOUND" and "resnet50" in missing.message


def test_infer_raw_with_bytes_ids_matches_triage_run(world):
    _, fleet, decisions, _, client = world
    answer, got = client.infer(tensors_of(fleet))
    assert answer["model_name"] == "triage"
    assert answer["model_version"] == decisions.column("profile_version")[0].as_py()
    assert answer["raw"] == len(inference.OUTPUTS)  # raw in, raw out
    assert [o[0] for o in answer["outputs"]] == list(inference.OUTPUTS)
    assert all(o[2] == [ROWS] for o in answer["outputs"])
    want = expected_outputs(decisions)
    assert_outputs_equal(got, want)
    assert 0 < got["ESCALATE"].sum() < ROWS  # a real mix, not a trivial agreement
    # a slice of the rows, in another batch, decides the same
    answer, part = client.infer(tensors_of(fleet.slice(17, 5)))
    assert_outputs_equal(part, {k: v[17:22] for k, v in want.items()})


def test_infer_int64_ids_and_typed_contents_match_the_triage_call(world):
    from hitl_triage.serve.proto.triage.v1 import triage_pb2, triage_pb2_grpc

    _, fleet, _, address, client = world
    rows = fleet.slice(0, 64)
    tensors = tensors_of(rows, ids="INT64")
    # The triage.v1 oracle: the same rows, int64 ids, as an Arrow batch.
    batch = rows.select(["logits", "embedding", "source", "category"]).append_column("id", pa.array(tensors["ID"][1]))
    with grpc.insecure_channel(address) as channel:
        answer = triage_pb2_grpc.TriageStub(channel).Triage(triage_pb2.TriageRequest(arrow_ipc=write_batch(batch)), timeout=60)
    want = expected_outputs(pa.Table.from_batches([read_batch(answer.arrow_ipc)]))

    _, got = client.infer(tensors)
    assert_outputs_equal(got, want)

    # Typed contents (no raw_input_contents): typed outputs back, the asked ones only, in that order.
    request = pb.ModelInferRequest(model_name="triage", id="req-7")
    for name, (datatype, values) in tensors.items():
        tensor = request.inputs.add(name=name, datatype=datatype, shape=list(values.shape))
        field = {"FP32": "fp32_contents", "INT64": "int64_contents", "BYTES": "bytes_contents"}[datatype]
        getattr(tensor.contents, field).extend(values.ravel().tolist())
    for name in ("TIER", "CONFIDENCE", "ESCALATE", "TIER"):
        request.outputs.add(name=name)
    response = client.request(request)
    assert not isinstance(response, Error), response
    assert response.id == "req-7" and not response.raw_output_contents
    assert [(o.name, o.datatype, list(o.shape)) for o in response.outputs] == [
        ("TIER", "BYTES", [64]), ("CONFIDENCE", "FP32", [64]), ("ESCALATE", "BOOL", [64])]
    typed = {"TIER": np.array(response.outputs[0].contents.bytes_contents, dtype="S"),
             "CONFIDENCE": np.array(response.outputs[1].contents.fp32_contents, dtype=np.float32),
             "ESCALATE": np.array(response.outputs[2].contents.bool_contents, dtype=bool)}
    assert_outputs_equal(typed, want, names=["TIER", "CONFIDENCE", "ESCALATE"])


def test_requested_outputs_and_zero_rows(world):
    _, fleet, decisions, _, client = world
    answer, got = client.infer(tensors_of(fleet.slice(0, 8)), outputs=["PRIORITY", "REASON_MASK"])
    assert [o[0] for o in answer["outputs"]] == ["PRIORITY", "REASON_MASK"] and set(got) == {"PRIORITY", "REASON_MASK"}
    assert_outputs_equal(got, {k: v[:8] for k, v in expected_outputs(decisions).items()}, names=["PRIORITY", "REASON_MASK"])
    empty = {name: (datatype, values[:0]) for name, (datatype, values) in tensors_of(fleet).items()}
    answer, got = client.infer(empty)
    assert all(o[2] == [0] for o in answer["outputs"]) and all(v.size == 0 for v in got.values())


def test_bad_requests_name_the_tensor_and_leave_the_server_serving(world):
    _, fleet, decisions, address, client = world
    good = tensors_of(fleet.slice(0, 4))

    def with_(**changes):
        tensors = dict(good)
        for name, value in changes.items():
            if value is None:
                tensors.pop(name)
            else:
                tensors[name] = value
        return tensors

    cases = [
        # (what, tensors, model, code, words the message must hold)
        ("logits: wrong C", with_(LOGITS=("FP32", np.zeros((4, M, C - 1), np.float32))), "triage", "INVALID_ARGUMENT",
         ["LOGITS", f"[B, {M}, {C}]", f"[4, {M}, {C - 1}]"]),
        ("logits: [B, C] with M > 1", with_(LOGITS=("FP32", np.zeros((4, C), np.float32))), "triage", "INVALID_ARGUMENT",
         ["LOGITS", f"[B, {M}, {C}]", f"[4, {C}]"]),
        ("logits: integers", with_(LOGITS=("INT32", np.zeros((4, M, C), np.int32))), "triage", "INVALID_ARGUMENT",
         ["LOGITS", "FP32", "INT32"]),
        ("no embedding, a bank", with_(EMBEDDING=None), "triage", "INVALID_ARGUMENT", ["EMBEDDING", f"[B, {D}]", "bank"]),
        ("embedding: wrong D", with_(EMBEDDING=("FP32", np.zeros((4, D + 1), np.float32))), "triage", "INVALID_ARGUMENT",
         ["EMBEDDING", f"[4, {D}]", f"[4, {D + 1}]"]),
        ("ids: one short", with_(ID=("BYTES", good["ID"][1][:3])), "triage", "INVALID_ARGUMENT", ["ID", "B = 4", "[3]"]),
        ("ids: missing", with_(ID=None), "triage", "INVALID_ARGUMENT", ["ID", "found inputs"]),
        ("ids: repeated", with_(ID=("BYTES", np.array([b"a", b"b", b"a", b"c"], dtype="S"))), "triage",
         "INVALID_ARGUMENT", ["ID"]),
        ("an unknown input", with_(PIXELS=("FP32", np.zeros((4, 3), np.float32))), "triage", "INVALID_ARGUMENT",
         ["LOGITS", "PIXELS"]),
        ("another model", good, "resnet50", "NOT_FOUND", ["resnet50", "triage"]),
    ]
    for what, tensors, model, code, words in cases:
        error = client.infer(tensors, model=model)
        assert isinstance(error, Error), what
        assert error.code == code, (what, error)
        for word in words:
            assert word in error.message, (what, word, error.message)

    error = client.infer(good, version="no-such-version")
    assert isinstance(error, Error) and error.code == "NOT_FOUND" and "no-such-version" in error.message
    error = client.infer(good, outputs=["LOGITS"])
    assert isinstance(error, Error) and error.code == "INVALID_ARGUMENT" and "ESCALATE" in error.message

    # Malformed raw contents, sent through tritonclient's own message classes.
    request = pb.ModelInferRequest(model_name="triage")
    for name, (datatype, values) in good.items():
        request.inputs.add(name=name, datatype=datatype, shape=list(values.shape))
        request.raw_input_contents.append(inference.write_bytes_tensor(pa.array(values.tolist(), pa.binary()))
                                          if datatype == "BYTES" else values.tobytes())
    short = pb.ModelInferRequest()
    short.CopyFrom(request)
    short.raw_input_contents[0] = short.raw_input_contents[0][:-4]
    one_less = pb.ModelInferRequest()
    one_less.CopyFrom(request)
    del one_less.raw_input_contents[-1]
    for what, bad, words in [("raw logits 4 bytes short", short, ["LOGITS", f"{4 * 4 * M * C} bytes", f"found {4 * 4 * M * C - 4}"]),
                             ("one raw entry missing", one_less, ["raw_input_contents", "5", "found 4"])]:
        error = client.request(bad)
        assert isinstance(error, Error) and error.code == "INVALID_ARGUMENT", (what, error)
        assert all(word in error.message for word in words), (what, words, error.message)

    assert health_status(address) == "SERVING"
    assert client.call("ready") is True
    _, got = client.infer(good)  # and it still decides
    assert_outputs_equal(got, {k: v[:4] for k, v in expected_outputs(decisions).items()})


def test_reflection_lists_the_inference_service(world):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    address = world[3]
    with grpc.insecure_channel(address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        answers = list(stub.ServerReflectionInfo(iter([
            reflection_pb2.ServerReflectionRequest(list_services=""),
            reflection_pb2.ServerReflectionRequest(file_containing_symbol="inference.GRPCInferenceService"),
        ]), timeout=10))
    names = {s.name for s in answers[0].list_services_response.service}
    assert {"inference.GRPCInferenceService", "triage.v1.Triage", "grpc.health.v1.Health"} <= names
    assert answers[1].HasField("file_descriptor_response")  # a generic client can build its stubs from it


# -- the conversions, in process -------------------------------------------------------------------


@pytest.mark.parametrize("values", [["a", "bb", ""], ["abc"] * 5, [], ["é", "x" * 300, "", "yz"], ["", ""]],
                         ids=["mixed", "equal", "none", "unicode", "empty-strings"])
def test_bytes_tensors_round_trip(values):
    raw = inference.write_bytes_tensor(pa.array(values, pa.string()))
    assert len(raw) == sum(4 + len(v.encode()) for v in values)
    assert inference.read_bytes_tensor(raw, len(values), "ID").to_pylist() == [v.encode() for v in values]


def test_bytes_tensor_of_a_sliced_array_with_nulls_and_its_errors():
    array = pa.array(["q", None, "rr", "s"]).slice(1)
    assert inference.read_bytes_tensor(inference.write_bytes_tensor(array), 3, "TIER").to_pylist() == [b"", b"rr", b"s"]
    raw = inference.write_bytes_tensor(pa.array(["ab", "c"]))
    for count, buffer, words in [(3, raw, "after 2"), (1, raw, "more"), (2, raw[:-1], "element 1")]:
        with pytest.raises(ValueError, match=words):
            inference.read_bytes_tensor(buffer, count, "ID")


def _request(tensors: dict[str, tuple[str, np.ndarray]], raw: bool = True) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="triage")
    for name, (datatype, values) in tensors.items():
        tensor = request.inputs.add(name=name, datatype=datatype, shape=list(values.shape))
        if raw:
            request.raw_input_contents.append(inference.write_bytes_tensor(pa.array(values.ravel().tolist(), pa.binary()))
                                              if datatype == "BYTES" else values.tobytes())
        else:
            getattr(tensor.contents, inference._DATATYPES[datatype][1]).extend(values.ravel().tolist())
    return request


def test_logits_forms_and_float_types_decode_to_the_contract():
    rng = np.random.default_rng(3)
    ids = ("BYTES", np.array([b"a", b"b", b"c"], dtype="S"))
    logits = rng.normal(size=(3, 1, 4)).astype(np.float32)
    nested = inference.request_batch(_request({"LOGITS": ("FP32", logits), "ID": ids}), inference.ModelShape(1, 4, None))
    flat = inference.request_batch(_request({"LOGITS": ("FP32", logits[:, 0]), "ID": ids}), inference.ModelShape(1, 4, None))
    assert nested.equals(flat)  # [B, C] for M = 1 is [B, 1, C]
    assert nested.schema.field("logits").type == pa.list_(pa.list_(pa.float32(), 4), 1)
    assert nested.column("id").to_pylist() == ["a", "b", "c"]
    for datatype, dtype, arrow in [("FP16", np.float16, pa.float16()), ("FP64", np.float64, pa.float64())]:
        batch = inference.request_batch(_request({"LOGITS": (datatype, logits.astype(dtype)), "ID": ids}), inference.ModelShape(1, 4, None))
        assert batch.schema.field("logits").type.value_type.value_type == arrow
        np.testing.assert_array_equal(np.asarray(batch.column("logits").flatten().flatten()), logits.astype(dtype).ravel())
    typed = inference.request_batch(_request({"LOGITS": ("FP32", logits), "ID": ("INT64", np.arange(3))}, raw=False),
                                    inference.ModelShape(1, 4, None))
    assert typed.column("id").type == pa.int64() and typed.column("logits").equals(nested.column("logits"))
    # without a bank an embedding is not read (as on the Arrow faces), with one it must fit
    embedding = ("FP32", np.ones((3, 2), np.float32))
    batch = inference.request_batch(_request({"LOGITS": ("FP32", logits), "ID": ids, "EMBEDDING": embedding}),
                                    inference.ModelShape(1, 4, None))
    assert "embedding" not in batch.schema.names
    batch = inference.request_batch(_request({"LOGITS": ("FP32", logits), "ID": ids, "EMBEDDING": embedding}),
                                    inference.ModelShape(1, 4, 2))
    assert batch.schema.field("embedding").type == pa.list_(pa.float32(), 2)
    # a bank whose policy escalates rows without an embedding takes a request without one
    batch = inference.request_batch(_request({"LOGITS": ("FP32", logits), "ID": ids}), inference.ModelShape(1, 4, 2, True))
    assert "embedding" not in batch.schema.names


def test_malformed_contents_are_refused_by_name():
    ids = ("BYTES", np.array([b"a", b"b"], dtype="S"))
    logits = ("FP32", np.zeros((2, 2, 3), np.float32))
    model = inference.ModelShape(2, 3, None)
    mixed = _request({"LOGITS": logits, "ID": ids})
    mixed.inputs[1].contents.bytes_contents.extend([b"a", b"b"])
    wrong_field = _request({"LOGITS": logits, "ID": ids}, raw=False)
    wrong_field.inputs[0].contents.ClearField("fp32_contents")
    wrong_field.inputs[0].contents.fp64_contents.extend([0.0] * 12)
    short = _request({"LOGITS": logits, "ID": ids}, raw=False)
    del short.inputs[0].contents.fp32_contents[-1]
    twice = _request({"LOGITS": logits, "ID": ids})
    twice.inputs.add(name="ID", datatype="BYTES", shape=[2])
    twice.raw_input_contents.append(twice.raw_input_contents[1])
    bad_utf8 = _request({"LOGITS": logits, "ID": ("BYTES", np.array([b"\xff", b"b"], dtype="S"))})
    fp16 = pb.ModelInferRequest()
    fp16.inputs.add(name="LOGITS", datatype="FP16", shape=[2, 2, 3])
    for what, request, words in [
        ("raw and typed", mixed, ["ID", "raw_input_contents", "typed contents too"]),
        ("the wrong typed field", wrong_field, ["LOGITS", "fp32_contents", "fp64_contents"]),
        ("one value short", short, ["LOGITS", "12 values", "found 11"]),
        ("an input twice", twice, ["ID", "twice"]),
        ("ids not UTF-8", bad_utf8, ["ID", "UTF-8"]),
        ("typed FP16", fp16, ["LOGITS", "FP16", "raw_input_contents"]),
    ]:
        with pytest.raises(ValueError) as caught:
            inference.request_batch(request, model)
        for word in words:
            assert word in str(caught.value), (what, word, str(caught.value))


def test_outputs_raw_and_typed_carry_the_decisions():
    decisions = pa.RecordBatch.from_pydict({
        "escalate": pa.array([True, False]), "reason_mask": pa.array([9, 0], pa.uint8()),
        "tier": pa.array(["specialist", None]), "priority": pa.array([0.5, 0.0], pa.float32()),
        "predicted_class": pa.array([3, -1], pa.int32()), "confidence": pa.array([0.25, float("nan")], pa.float32()),
        "ood_score": pa.array([1.5, float("nan")], pa.float32()), "audit_weight": pa.array([0.0, 20.0], pa.float32()),
    })
    raw = inference.infer_response(decisions, list(inference.OUTPUTS), raw=True, version="v1")
    typed = inference.infer_response(decisions, list(inference.OUTPUTS), raw=False, version="v1")
    assert len(raw.raw_output_contents) == 8 and not typed.raw_output_contents
    for i, (name, (datatype, column)) in enumerate(inference.OUTPUTS.items()):
        assert (raw.outputs[i].name, raw.outputs[i].datatype, list(raw.outputs[i].shape)) == (name, datatype, [2])
        want = decisions.column(column)
        if datatype == "BYTES":
            got_raw = inference.read_bytes_tensor(raw.raw_output_contents[i], 2, name).to_pylist()
            assert got_raw == list(typed.outputs[i].contents.bytes_contents) == [b"specialist", b""]
            continue
        dtype = inference._DATATYPES[datatype][0]
        got = np.frombuffer(raw.raw_output_contents[i], dtype=dtype)
        np.testing.assert_array_equal(got, want.to_numpy(zero_copy_only=False), err_msg=name)
        typed_values = np.array(getattr(typed.outputs[i].contents, inference._DATATYPES[datatype][1]), dtype=dtype)
        np.testing.assert_array_equal(typed_values, got, err_msg=name)
