"""The Open Inference Protocol v2 face: KServe's ``inference.GRPCInferenceService``, which Triton
Inference Server and KServe clients (``tritonclient``, ``kserve``) speak, on the triage.v1 port.

One model, ``triage``, whose version is the serving profile's. ModelInfer tensors in (B rows):

============  ====================  ================  ==========================================
name          datatype              shape             meaning
============  ====================  ================  ==========================================
LOGITS        FP32, FP16 or FP64    [B, M, C]         raw logits ([B, C] too when M = 1)
EMBEDDING     FP32, FP16 or FP64    [B, D]            required when the profile has a bank
ID            BYTES (UTF-8), INT64  [B] or [B, 1]     the prediction id
SOURCE        BYTES (UTF-8)         [B] or [B, 1]     optional
CATEGORY      BYTES (UTF-8)         [B] or [B, 1]     optional
============  ====================  ================  ==========================================

and out, all [B]: ESCALATE BOOL, REASON_MASK UINT8, TIER BYTES ("" where not escalated),
PRIORITY FP32, PREDICTED_CLASS INT32, CONFIDENCE FP32, OOD_SCORE FP32 (NaN without an
embedding), AUDIT_WEIGHT FP32; the outputs asked for, or all of them. Outputs travel in
``raw_output_contents`` when the request's inputs came in ``raw_input_contents`` (what
tritonclient sends), in typed ``contents`` otherwise.

The tensors become the data contract's Arrow batch (logits ``fixed_size_list<fixed_size_list<
float>[C]>[M]``, embedding ``fixed_size_list<float>[D]``, id string or int64; raw numeric tensors
are viewed in place, not copied) and go through :meth:`Service.decide`, the batcher and the queue
writer every face shares, so a row gets the decision it gets on triage.v1, Flight or ``triage
run``, durable before it is answered. Errors: a tensor of the wrong name, datatype or shape, a
missing input and malformed contents give INVALID_ARGUMENT naming the tensor, what was expected
and what was found; another model name or a version not serving, NOT_FOUND; the rest as on
triage.v1 (:func:`~.grpc_server.abort_for`).
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import math
import struct
import time
from typing import Callable, Sequence

import grpc
import numpy as np
import pyarrow as pa

from hitl_triage.engine.decode import BatchError, BatchTypeError, BatchValueError, MissingColumnError
from hitl_triage.serve.proto.inference import grpc_predict_v2_pb2 as pb, grpc_predict_v2_pb2_grpc as pb_grpc

from .grpc_server import abort_for

MODEL = "triage"
_LENGTH = struct.Struct("<I")  # the length before each element of a raw BYTES tensor
PLATFORM = "hitl-triage"
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name

# datatype -> (numpy dtype of its raw little-endian layout, InferTensorContents field); BYTES raw
# is a 4-byte little-endian length before each element; FP16 has no typed field (raw only).
_DATATYPES: dict[str, tuple[str | None, str | None]] = {
    "BOOL": ("?", "bool_contents"), "UINT8": ("u1", "uint_contents"), "UINT16": ("<u2", "uint_contents"),
    "UINT32": ("<u4", "uint_contents"), "UINT64": ("<u8", "uint64_contents"), "INT8": ("i1", "int_contents"),
    "INT16": ("<i2", "int_contents"), "INT32": ("<i4", "int_contents"), "INT64": ("<i8", "int64_contents"),
    "FP16": ("<f2", None), "FP32": ("<f4", "fp32_contents"), "FP64": ("<f8", "fp64_contents"),
    "BYTES": (None, "bytes_contents"),
}
_FLOATS = ("FP32", "FP16", "FP64")
# input -> (datatypes accepted, the data contract's column)
INPUTS: dict[str, tuple[tuple[str, ...], str]] = {
    "LOGITS": (_FLOATS, "logits"), "EMBEDDING": (_FLOATS, "embedding"), "ID": (("BYTES", "INT64"), "id"),
    "SOURCE": (("BYTES",), "source"), "CATEGORY": (("BYTES",), "category"),
}
_TENSOR_OF_COLUMN = {column: name for name, (_, column) in INPUTS.items()}
# output -> (datatype, decision column)
OUTPUTS: dict[str, tuple[str, str]] = {
    "ESCALATE": ("BOOL", "escalate"), "REASON_MASK": ("UINT8", "reason_mask"), "TIER": ("BYTES", "tier"),
    "PRIORITY": ("FP32", "priority"), "PREDICTED_CLASS": ("INT32", "predicted_class"),
    "CONFIDENCE": ("FP32", "confidence"), "OOD_SCORE": ("FP32", "ood_score"), "AUDIT_WEIGHT": ("FP32", "audit_weight"),
}


class ModelNotFound(LookupError):
    """A model name or version this server does not serve (NOT_FOUND)."""


@dataclasses.dataclass(frozen=True)
class ModelShape:
    """What the serving profile expects: M members, C classes, D embedding width (None: no bank),
    and whether rows without an embedding are escalated rather than refused."""

    members: int
    classes: int
    dim: int | None
    embedding_optional: bool = False

    @classmethod
    def of(cls, profile) -> "ModelShape":
        has_bank = profile.bank is not None
        return cls(profile.members, profile.classes, profile.dim if has_bank else None,
                   profile.config.policy.on_missing_embedding == "escalate")


@dataclasses.dataclass
class _Tensor:
    name: str
    datatype: str
    shape: list[int]
    values: np.ndarray | pa.Array  # numeric: numpy, flat, row-major; BYTES: a binary Arrow array


# -- tensors in ----------------------------------------------------------------------------------


def _shape_text(shape: Sequence[int]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def read_bytes_tensor(buffer: bytes, count: int, name: str) -> pa.Array:
    """A raw BYTES tensor (each element: a 4-byte little-endian length, then that many bytes) as a
    binary Arrow array of ``count`` elements. Equal-length elements (the usual ids) are read
    without a Python loop."""
    size = len(buffer)
    raw = np.frombuffer(buffer, dtype=np.uint8)
    if count == 0:
        if size:
            raise BatchValueError(name, f"expected no bytes for 0 BYTES elements, found {size}")
        return pa.array([], pa.binary())
    if size >= 4:
        width = int.from_bytes(buffer[:4], "little")
        if size == count * (4 + width):
            records = raw.reshape(count, 4 + width)
            if (records[:, :4].copy().view("<u4") == width).all():
                offsets = np.arange(count + 1, dtype=np.int32) * width
                data = np.ascontiguousarray(records[:, 4:])
                return pa.Array.from_buffers(pa.binary(), count, [None, pa.py_buffer(offsets), pa.py_buffer(data)])
    # Each element's place depends on every length before it: one pass in Python (about 0.3 us an
    # element), then the lengths and the bytes gathered in vectorised steps.
    unpack = _LENGTH.unpack_from
    heads: list[int] = []
    append = heads.append
    position = 0
    try:
        for _ in range(count):
            append(position)
            position += 4 + unpack(buffer, position)[0]
    except struct.error:
        raise BatchValueError(name, f"expected {count} BYTES elements (each a 4-byte length, then its bytes), "
                                    f"found the bytes ending after {len(heads) - 1}") from None
    starts = np.asarray(heads, dtype=np.int64) + 4
    lengths = raw[starts[:, None] - 4 + np.arange(4)].view("<u4").ravel().astype(np.int64)
    if position > size:
        i = int(np.argmax(starts + lengths > size))
        raise BatchValueError(name, f"expected element {i} to hold {lengths[i]} bytes, found {size - starts[i]} left")
    if position != size:
        raise BatchValueError(name, f"expected {count} BYTES elements in {position} bytes, found {size - position} more")
    offsets = np.zeros(count + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    # byte j of element i sits at starts[i] + j
    gather = np.repeat(starts - offsets[:-1], lengths) + np.arange(offsets[-1])
    return pa.Array.from_buffers(pa.large_binary(), count, [None, pa.py_buffer(offsets), pa.py_buffer(raw[gather])])


def write_bytes_tensor(array: pa.Array) -> bytes:
    """A string or binary Arrow array (nulls read as empty) in the raw BYTES layout."""
    array = array.fill_null("") if array.null_count else array
    n = len(array)
    if n == 0:
        return b""
    large = pa.types.is_large_string(array.type) or pa.types.is_large_binary(array.type)
    array = array.cast(pa.large_binary() if large else pa.binary())  # zero-copy: the same buffers
    offset_type = np.int64 if large else np.int32
    _, offsets_buffer, data_buffer = array.buffers()
    offsets = np.frombuffer(offsets_buffer, dtype=offset_type)[array.offset:array.offset + n + 1].astype(np.int64)
    lengths = np.diff(offsets)
    total = int(offsets[-1] - offsets[0])
    out = np.empty(4 * n + total, dtype=np.uint8)
    heads = offsets[:-1] - offsets[0] + 4 * np.arange(n)
    out[heads[:, None] + np.arange(4)] = lengths.astype("<u4").view(np.uint8).reshape(n, 4)
    if total:
        data = np.frombuffer(data_buffer, dtype=np.uint8)[offsets[0]:offsets[-1]]
        out[np.arange(total) + 4 * np.repeat(np.arange(1, n + 1), lengths)] = data
    return out.tobytes()


def _read_tensor(tensor, raw: bytes | None) -> _Tensor:
    name, datatype = tensor.name, tensor.datatype
    accepted, _ = INPUTS[name]
    if datatype not in accepted:
        raise BatchTypeError(name, f"expected datatype {' or '.join(accepted)}, found {datatype or 'none'!r}")
    shape = list(tensor.shape)
    if any(d < 0 for d in shape):
        raise BatchValueError(name, f"expected a shape of sizes >= 0, found {_shape_text(shape)}")
    count = math.prod(shape)
    dtype, field = _DATATYPES[datatype]
    if raw is not None:
        if dtype is None:
            return _Tensor(name, datatype, shape, read_bytes_tensor(raw, count, name))
        itemsize = np.dtype(dtype).itemsize
        if len(raw) != count * itemsize:
            raise BatchValueError(name, f"expected {itemsize} x {count} = {count * itemsize} bytes of raw {datatype} "
                                        f"for shape {_shape_text(shape)}, found {len(raw)}")
        return _Tensor(name, datatype, shape, np.frombuffer(raw, dtype=dtype).astype(np.dtype(dtype).newbyteorder("="), copy=False))
    if field is None:
        raise BatchTypeError(name, f"expected {datatype} values in raw_input_contents (InferTensorContents has no "
                                   f"{datatype} field), found typed contents")
    contents = tensor.contents
    others = [f.name for f, _ in contents.ListFields() if f.name != field]
    if others:
        raise BatchTypeError(name, f"expected {datatype} values in contents.{field}, found {', '.join(others)}")
    values = getattr(contents, field)
    if len(values) != count:
        raise BatchValueError(name, f"expected {count} values in contents.{field} for shape {_shape_text(shape)}, "
                                    f"found {len(values)}")
    if dtype is None:
        return _Tensor(name, datatype, shape, pa.array(list(values), pa.binary()))
    return _Tensor(name, datatype, shape, np.asarray(values, dtype=np.dtype(dtype).newbyteorder("=")))


def _read_inputs(request) -> dict[str, _Tensor]:
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise BatchValueError("raw_input_contents", f"expected one entry per input ({len(request.inputs)}), found {len(raw)}")
    tensors: dict[str, _Tensor] = {}
    for i, tensor in enumerate(request.inputs):
        if tensor.name not in INPUTS:
            raise BatchValueError("inputs", f"expected names among {list(INPUTS)}, found {tensor.name!r}")
        if tensor.name in tensors:
            raise BatchValueError(tensor.name, "expected once among the inputs, found twice")
        if raw and tensor.HasField("contents"):
            raise BatchValueError(tensor.name, "expected its values in raw_input_contents (the request uses it), "
                                               "found typed contents too")
        tensors[tensor.name] = _read_tensor(tensor, raw[i] if raw else None)
    return tensors


def _rows_of(tensor: _Tensor, rows: int) -> None:
    """A 1-d input must be [B] (or [B, 1], as Triton models with a batch dimension send)."""
    if tensor.shape not in ([rows], [rows, 1]):
        raise BatchValueError(tensor.name, f"expected shape [B] or [B, 1] with B = {rows} (the rows of LOGITS), "
                                           f"found {_shape_text(tensor.shape)}")


def _strings(tensor: _Tensor) -> pa.Array:
    values = tensor.values
    assert isinstance(values, pa.Array)  # BYTES tensors are read as binary arrays
    try:
        return values.cast(pa.large_string() if pa.types.is_large_binary(values.type) else pa.string())
    except pa.ArrowInvalid as exc:
        raise BatchValueError(tensor.name, f"expected UTF-8 strings, found bytes that are not ({exc})") from exc


def request_batch(request, model: ModelShape) -> pa.RecordBatch:
    """The data contract's Arrow batch of a ModelInferRequest's tensors (B rows, B >= 0)."""
    tensors = _read_inputs(request)
    for required in ("LOGITS", "ID"):
        if required not in tensors:
            raise MissingColumnError(required, f"expected an input tensor {required}, found inputs {list(tensors)}")
    m, c = model.members, model.classes
    logits = tensors["LOGITS"]
    shape = logits.shape
    if not ((len(shape) == 3 and shape[1:] == [m, c]) or (m == 1 and len(shape) == 2 and shape[1] == c)):
        forms = f"[B, {m}, {c}]" + (f" or [B, {c}]" if m == 1 else "")
        raise BatchValueError("LOGITS", f"expected shape {forms} (B rows, M = {m} members, C = {c} classes), "
                                        f"found {_shape_text(shape)}")
    rows = shape[0]
    flat = pa.array(logits.values)
    columns: dict[str, pa.Array] = {"logits": pa.FixedSizeListArray.from_arrays(pa.FixedSizeListArray.from_arrays(flat, c), m)}

    ids = tensors["ID"]
    _rows_of(ids, rows)
    columns["id"] = _strings(ids) if ids.datatype == "BYTES" else pa.array(ids.values)

    embedding = tensors.get("EMBEDDING")
    if model.dim is not None:  # without a bank the engine takes no embedding: one sent is not read
        if embedding is None:
            if not model.embedding_optional:
                raise MissingColumnError("EMBEDDING", f"expected an input tensor EMBEDDING [B, {model.dim}] (the profile "
                                                      f"has a k-NN reference bank), found inputs {list(tensors)}")
        elif embedding.shape != [rows, model.dim]:
            raise BatchValueError("EMBEDDING", f"expected shape [{rows}, {model.dim}] (B = {rows} rows of LOGITS, "
                                               f"D = {model.dim}), found {_shape_text(embedding.shape)}")
        else:
            columns["embedding"] = pa.FixedSizeListArray.from_arrays(pa.array(embedding.values), model.dim)
    for name in ("SOURCE", "CATEGORY"):
        if name in tensors:
            _rows_of(tensors[name], rows)
            columns[INPUTS[name][1]] = _strings(tensors[name])
    return pa.RecordBatch.from_pydict(columns)


def requested_outputs(request) -> list[str]:
    """The outputs a request asks for, in its order (each once), or every output."""
    names: list[str] = []
    for output in request.outputs:
        if output.name not in OUTPUTS:
            raise BatchValueError("outputs", f"expected names among {list(OUTPUTS)}, found {output.name!r}")
        if "classification" in output.parameters:
            raise BatchValueError(output.name, "expected no 'classification' parameter (this server has no "
                                               "classification extension), found one")
        if output.name not in names:
            names.append(output.name)
    return names or list(OUTPUTS)


# -- tensors out ---------------------------------------------------------------------------------


def _empty(datatype: str) -> pa.Array:
    return pa.array([], pa.string() if datatype == "BYTES" else pa.from_numpy_dtype(np.dtype(_DATATYPES[datatype][0])))


def infer_response(decisions: pa.RecordBatch | None, outputs: Sequence[str], *, raw: bool, version: str,
                   request_id: str = ""):
    """The ModelInferResponse holding ``outputs`` of ``decisions`` (None: zero rows), in
    raw_output_contents when ``raw``, typed contents otherwise."""
    response = pb.ModelInferResponse(model_name=MODEL, model_version=version, id=request_id)
    rows = 0 if decisions is None else decisions.num_rows
    for name in outputs:
        datatype, column_name = OUTPUTS[name]
        column = _empty(datatype) if decisions is None else decisions.column(column_name)
        out = response.outputs.add(name=name, datatype=datatype, shape=[rows])
        if datatype == "BYTES":
            if raw:
                response.raw_output_contents.append(write_bytes_tensor(column))
            else:
                out.contents.bytes_contents.extend(column.fill_null("").cast(pa.binary()).to_pylist())
            continue
        values = column.to_numpy(zero_copy_only=False)
        if raw:
            response.raw_output_contents.append(values.astype(_DATATYPES[datatype][0], copy=False).tobytes())
        else:
            getattr(out.contents, str(_DATATYPES[datatype][1])).extend(values.tolist())
    return response


# -- the servicer --------------------------------------------------------------------------------


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, service):
        self.service = service  # serve.service.server.Service

    def _ready(self) -> bool:
        return not self.service._stopped.is_set()  # set by Service.stop: NOT_SERVING from then on

    def _version(self, name: str, version: str, profile=None) -> str:
        """The serving version, when ``name``/``version`` ask for it (an empty version: whichever serves)."""
        serving = (profile or self.service.engines.profile).version
        if name != MODEL:
            raise ModelNotFound(f"model {name!r}: not served here; expected {MODEL!r}")
        if version and version != serving:
            raise ModelNotFound(f"model {MODEL!r} version {version!r}: not served; expected {serving!r} "
                                f"(or no version: the one serving)")
        return serving

    def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=self._ready())

    def ModelReady(self, request, context):
        try:
            self._version(request.name, request.version)
        except ModelNotFound:
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=self._ready())

    def ServerMetadata(self, request, context):
        try:
            version = importlib.metadata.version("hitl-triage")
        except importlib.metadata.PackageNotFoundError:  # pragma: no cover - run from a bare checkout
            version = "unknown"
        return pb.ServerMetadataResponse(name="hitl-triage", version=version, extensions=[])

    def ModelMetadata(self, request, context):
        profile = self.service.engines.profile  # one read: a reload between two would mix versions
        try:
            version = self._version(request.name, request.version, profile)
        except ModelNotFound as exc:
            context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
        model = ModelShape.of(profile)
        tensor = pb.ModelMetadataResponse.TensorMetadata
        inputs = [tensor(name="LOGITS", datatype="FP32", shape=[-1, model.members, model.classes])]
        if model.dim is not None:
            inputs.append(tensor(name="EMBEDDING", datatype="FP32", shape=[-1, model.dim]))
        inputs += [tensor(name=name, datatype="BYTES", shape=[-1]) for name in ("ID", "SOURCE", "CATEGORY")]
        outputs = [tensor(name=name, datatype=datatype, shape=[-1]) for name, (datatype, _) in OUTPUTS.items()]
        return pb.ModelMetadataResponse(name=MODEL, versions=[version], platform=PLATFORM, inputs=inputs, outputs=outputs)

    def ModelInfer(self, request, context):
        try:
            version = self._version(request.model_name, request.model_version)
        except ModelNotFound as exc:
            context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
        try:
            outputs = requested_outputs(request)
            batch = request_batch(request, ModelShape.of(self.service.engines.profile))
            decisions = None
            if batch.num_rows:
                remaining = context.time_remaining()  # a huge number when the call has no deadline
                deadline = None if remaining is None or remaining > 1e8 else time.monotonic() + remaining
                decisions = self.service.decide(batch, deadline=deadline, alive=context.is_active)
        except BatchError as exc:
            abort_for(context, _named(exc))
        except Exception as exc:  # noqa: BLE001 - mapped to a status
            abort_for(context, exc)
        if decisions is not None:
            version = decisions.column("profile_version")[0].as_py()
        return infer_response(decisions, outputs, raw=bool(request.raw_input_contents), version=version,
                              request_id=request.id)


def _named(exc: BatchError) -> BatchError:
    """The engine's error about a column, reworded to name the tensor the client sent."""
    tensor = _TENSOR_OF_COLUMN.get(exc.column)
    text = str(exc)
    if tensor is None or not text.startswith(f"{exc.column}:"):
        return exc
    renamed = type(exc).__new__(type(exc))
    renamed.__dict__.update(exc.__dict__)
    renamed.args = (f"{tensor} (column {exc.column}){text[len(exc.column):]}",)
    return renamed


def add_inference_servicer(service) -> Callable[[grpc.Server], list[str]]:
    """For ``build_grpc_server(extra_servicers=...)``: registers the inference protocol on a
    server and returns its service name (for reflection and health)."""

    def add(server: grpc.Server) -> list[str]:
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceServicer(service), server)
        return [SERVICE_NAME]

    return add
