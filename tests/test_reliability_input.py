"""Bad input on every face (issue 21, item 1): triage.v1, Arrow Flight, the Open Inference Protocol
and `triage run` get the same rows and must give the same answer, a decision or INVALID_ARGUMENT
whose one line names the field, what was expected and what was found; the server stays SERVING.

One `triage serve` (SQLite queue) for the module, the world of reliability_fixtures (M = 5,
C = 10, a bank of D = 16). Oracles: `triage run` on the same rows for the decided cases (every
face's decision columns equal to it bit for bit), the data contract's rule that a row whose
logits are not finite is escalated (never auto-accepted), and the SQLite queue read with sqlite3.

Where a face cannot express a case (the inference protocol has no null and no ragged tensor) it
is left out of that case and the table says so; where the faces differ by design (an extra column
passes through to the review item on the Arrow faces; the inference protocol refuses a tensor it
does not name) the table holds each face's answer.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from engine_fixtures import one_torch_thread  # noqa: F401  (autouse)
from reliability_fixtures import FACES, health, reliable_server, same_decisions, send, shared_world, sqlite_items

M, C, D = 5, 10, 16
ROWS = 24


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return shared_world(tmp_path_factory)


@pytest.fixture(scope="module")
def server(world, tmp_path_factory):
    d = tmp_path_factory.mktemp("input-server")
    with reliable_server(world, d) as server:
        yield server


@pytest.fixture(scope="module")
def base(world) -> pa.RecordBatch:
    """ROWS rows of the fleet in the data contract's columns the inference protocol also has."""
    table = world.table().select(["id", "logits", "embedding", "source", "category"]).slice(0, ROWS)
    return table.combine_chunks().to_batches()[0]


# -- building bad batches --------------------------------------------------------------------------


def _set(batch: pa.RecordBatch, name: str, column: pa.Array | None) -> pa.RecordBatch:
    names, columns = list(batch.schema.names), list(batch.columns)
    if name in names:
        i = names.index(name)
        if column is None:
            del names[i], columns[i]
        else:
            columns[i] = column
    elif column is not None:
        names.append(name)
        columns.append(column)
    return pa.RecordBatch.from_arrays(columns, names=names)


def _logits(values: np.ndarray, value_type=pa.float32(), mask=None) -> pa.Array:
    n, m, c = values.shape
    inner = pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1), type=value_type), c)
    return pa.FixedSizeListArray.from_arrays(inner, m, mask=mask)


def _embedding(values: np.ndarray, value_type=pa.float32()) -> pa.Array:
    return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1), type=value_type), values.shape[1])


def logits_of(batch: pa.RecordBatch) -> np.ndarray:
    return batch.column("logits").flatten().flatten().to_numpy().reshape(batch.num_rows, M, C).astype(np.float64)


def embedding_of(batch: pa.RecordBatch) -> np.ndarray:
    return batch.column("embedding").flatten().to_numpy().reshape(batch.num_rows, D).astype(np.float64)


def with_logit_values(rows: dict[int, float]) -> Callable[[pa.RecordBatch], pa.RecordBatch]:
    """Row r's first member's first logit set to rows[r] (float32)."""
    def build(batch):
        values = logits_of(batch).astype(np.float32)
        for r, v in rows.items():
            values[r, 0, 0] = v
        return _set(batch, "logits", _logits(values))
    return build


def with_embedding_values(rows: dict[int, float], whole: bool = False) -> Callable[[pa.RecordBatch], pa.RecordBatch]:
    def build(batch):
        values = embedding_of(batch).astype(np.float32)
        for r, v in rows.items():
            if whole:
                values[r, :] = v
            else:
                values[r, 0] = v
        return _set(batch, "embedding", _embedding(values))
    return build


def names_all(message: str, words: tuple[str, ...]) -> bool:
    """Every word in ``message`` (case aside); "a|b": either (the Arrow faces say ``double``,
    the inference protocol ``FP64``)."""
    text = message.lower()
    return all(any(w.lower() in text for w in word.split("|")) for word in words)


@dataclasses.dataclass
class Case:
    """``build(base) -> batch``. ``refused``: the words INVALID_ARGUMENT's message must hold on
    each face (None: decided, as `triage run` decides it). ``faces``: those that can express it.
    ``oip_refused``: the inference protocol's words where it refuses what the Arrow faces decide."""

    name: str
    build: Callable[[pa.RecordBatch], pa.RecordBatch]
    refused: tuple[str, ...] | None = None
    faces: tuple[str, ...] = FACES
    oip_refused: tuple[str, ...] | None = None
    nonfinite_rows: tuple[int, ...] = ()   # rows whose logits are not finite: must be escalated
    anomaly_rows: tuple[int, ...] = ()     # rows whose embedding cannot be normalised: escalated ANOMALY


SUB = float(np.finfo(np.float32).smallest_subnormal)
CASES = [
    # missing, extra and wrongly typed columns
    Case("missing logits", lambda b: _set(b, "logits", None), ("logits", "expected", "found")),
    Case("missing id", lambda b: _set(b, "id", None), ("id", "expected", "found")),
    Case("missing embedding (the profile has a bank)", lambda b: _set(b, "embedding", None),
         ("mbedding", "expected", "found")),
    Case("an extra column", lambda b: _set(b, "uri", pa.array([f"s3://x/{i}" for i in range(b.num_rows)])),
         oip_refused=("inputs", "expected", "URI")),
    Case("logits of int32", lambda b: _set(b, "logits", _logits(logits_of(b).astype(np.int32), pa.int32())),
         ("logits", "expected", "int32")),
    Case("logits of strings", lambda b: _set(b, "logits", pa.FixedSizeListArray.from_arrays(pa.FixedSizeListArray.from_arrays(
        pa.array([str(v) for v in logits_of(b).reshape(-1)]), C), M)), ("logits", "expected", "found")),
    Case("ids of float64", lambda b: _set(b, "id", pa.array(np.arange(b.num_rows, dtype=np.float64))),
         ("id", "expected", "double|FP64")),
    Case("source of int64", lambda b: _set(b, "source", pa.array(np.arange(b.num_rows))), ("source", "expected", "int64")),
    Case("embedding of int8", lambda b: _set(b, "embedding", _embedding(np.ones((b.num_rows, D), np.int8), pa.int8())),
         ("mbedding", "expected", "int8")),
    Case("logits ragged (a variable-size list)", lambda b: _set(b, "logits", pa.array(
        [[[1.0] * C] * (M if i % 2 else M - 1) for i in range(b.num_rows)], pa.list_(pa.list_(pa.float32())))),
         ("logits", "expected", "found"), faces=("grpc", "flight", "run")),
    # sizes that disagree with the profile
    Case("M + 1 members", lambda b: _set(b, "logits", _logits(np.zeros((b.num_rows, M + 1, C), np.float32))),
         ("logits", "expected", str(M), str(M + 1))),
    Case("C - 1 classes", lambda b: _set(b, "logits", _logits(np.zeros((b.num_rows, M, C - 1), np.float32))),
         ("logits", "expected", str(C), str(C - 1))),
    Case("D + 1 embedding", lambda b: _set(b, "embedding", _embedding(np.ones((b.num_rows, D + 1), np.float32))),
         ("mbedding", "expected", str(D), str(D + 1))),
    # sizes of the batch
    Case("an empty batch", lambda b: b.slice(0, 0)),
    Case("a batch of one row", lambda b: b.slice(3, 1)),
    # ids
    Case("ids repeated inside the batch", lambda b: _set(b, "id", pa.array(
        [f"dup-{i % (b.num_rows - 2)}" for i in range(b.num_rows)])), ("id", "expected", "dup-0")),
    Case("null ids", lambda b: _set(b, "id", pa.array([None if i == 5 else f"n-{i}" for i in range(b.num_rows)])),
         ("id", "expected", "null"), faces=("grpc", "flight", "run")),
    # values
    Case("NaN logits", with_logit_values({1: float("nan"), 7: float("nan")}), nonfinite_rows=(1, 7)),
    Case("+inf and -inf logits", with_logit_values({2: float("inf"), 9: float("-inf")}), nonfinite_rows=(2, 9)),
    Case("subnormal logits", with_logit_values({0: SUB, 4: -SUB, 11: SUB * 3})),
    Case("+-1e38 logits", with_logit_values({3: 1e38, 6: -1e38, 13: 3.4e38})),
    Case("null logits", lambda b: _set(b, "logits", _logits(logits_of(b).astype(np.float32), mask=pa.array(
        [i == 8 for i in range(b.num_rows)]))), nonfinite_rows=(8,), faces=("grpc", "flight", "run")),
    Case("NaN embedding", with_embedding_values({2: float("nan")}), anomaly_rows=(2,)),
    Case("+inf and -inf embedding", with_embedding_values({4: float("inf"), 5: float("-inf")}), anomaly_rows=(4, 5)),
    Case("subnormal embedding (a whole row)", with_embedding_values({6: SUB}, whole=True)),
    Case("+-1e38 embedding (a whole row: its norm overflows float32)", with_embedding_values({7: 1e38, 8: -1e38}, whole=True)),
    Case("zero embedding", with_embedding_values({9: 0.0}, whole=True), anomaly_rows=(9,)),
    Case("float16 logits that overflowed (65520 and more read as inf)", lambda b: _set(b, "logits", _logits(
        np.where(np.arange(b.num_rows)[:, None, None] == 10, 7e4, logits_of(b)).astype(np.float16), pa.float16())),
         nonfinite_rows=(10,)),
    Case("float16 logits at float16's largest finite value", lambda b: _set(b, "logits", _logits(
        np.where(np.arange(b.num_rows)[:, None, None] == 12, 65504.0, logits_of(b)).astype(np.float16), pa.float16()))),
    Case("float64 logits beyond float32's range", lambda b: _set(b, "logits", _logits(
        np.where(np.arange(b.num_rows)[:, None, None] == 14, 1e300, logits_of(b)), pa.float64())), nonfinite_rows=()),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_every_face_gives_the_same_decision_or_names_the_field(case, world, server, base, tmp_path):
    with np.errstate(over="ignore"):  # the float16 cases overflow on purpose
        batch = case.build(base)
    outcomes = {face: send(face, server, batch, world=world, tmp=tmp_path) for face in case.faces}
    wrong = []
    if case.refused is not None:
        for face, outcome in outcomes.items():
            if outcome.code != "INVALID_ARGUMENT" or not names_all(outcome.message, case.refused):
                wrong.append(f"{face}: expected INVALID_ARGUMENT naming {case.refused}, found {outcome!r}")
    else:
        oracle = outcomes["run"]
        assert oracle.code == "OK", oracle
        assert oracle.decisions.num_rows == batch.num_rows
        for face, outcome in outcomes.items():
            if face == "oip" and case.oip_refused is not None:
                if outcome.code != "INVALID_ARGUMENT" or not all(w in outcome.message for w in case.oip_refused):
                    wrong.append(f"oip: expected INVALID_ARGUMENT naming {case.oip_refused}, found {outcome!r}")
                continue
            if outcome.code != "OK":
                wrong.append(f"{face}: expected the decisions of triage run, found {outcome!r}")
                continue
            differ = same_decisions(outcome.decisions, oracle.decisions)
            if differ:
                wrong.append(f"{face}: decisions differ from triage run's in {differ}")
        escalate = oracle.decisions.column("escalate").to_pylist()
        for row in case.nonfinite_rows:
            assert escalate[row], f"row {row}: non-finite logits, expected escalated, found auto-accepted"
        reasons = oracle.decisions.column("reason_mask").to_pylist()
        for row in case.anomaly_rows:
            assert escalate[row] and reasons[row] & 8, f"row {row}: embedding not finite, expected the ANOMALY bit"
        # every row is either escalated or has finite, valid signals: nothing unscoreable accepted
        confidence = oracle.decisions.column("confidence").to_numpy(zero_copy_only=False)
        for row, (e, c) in enumerate(zip(escalate, confidence)):
            assert e or np.isfinite(c), f"row {row}: auto-accepted with confidence {c}"
    assert not wrong, "\n".join(wrong)
    assert health(server.grpc) == "SERVING"


def test_ids_repeated_across_batches_are_decided_again_and_stored_once(world, server, base, tmp_path):
    """A batch that repeats ids of one answered before (a resend, a retry) is decided again, with
    the same decisions, on every face; the review queue keeps one item per id. `triage run`: two
    runs into one queue alike (one run refuses ids repeated across its own files: README)."""
    first = base.slice(0, 16)
    second = pa.Table.from_batches([base.slice(8, 16)]).combine_chunks().to_batches()[0]  # rows 8..23: 8 repeated
    for face in ("grpc", "flight", "oip"):
        prefix = f"x{face}-"
        a, b = (_set(x, "id", pa.array([prefix + i for i in x.column("id").to_pylist()])) for x in (first, second))
        got_a, got_b = send(face, server, a), send(face, server, b)
        assert got_a.code == got_b.code == "OK", (face, got_a, got_b)
        assert not same_decisions(got_a.decisions.slice(8, 8), got_b.decisions.slice(0, 8)), face
    run_queue = f"sqlite:///{tmp_path / 'run-queue.db'}"
    from reliability_fixtures import via_run

    run_a, run_b = via_run(world, first, tmp_path, queue_url=run_queue), via_run(world, second, tmp_path, queue_url=run_queue)
    assert run_a.code == run_b.code == "OK"
    escalated = {i for i, e in zip(base.column("id").to_pylist(), run_a.decisions.column("escalate").to_pylist()
                                   + run_b.decisions.column("escalate").to_pylist()[8:]) if e}
    assert set(sqlite_items(run_queue)) == escalated
    served = sqlite_items(server.queue_url)
    for face in ("grpc", "flight", "oip"):
        mine = {i.removeprefix(f"x{face}-"): n for i, n in served.items() if i.startswith(f"x{face}-")}
        assert mine == {i: 1 for i in escalated}, face
    assert health(server.grpc) == "SERVING"


# -- property: no non-finite logit is ever auto-accepted, on any face --------------------------------

SPECIAL = st.sampled_from([float("nan"), float("inf"), float("-inf"), 0.0, SUB, -SUB, 1e38, -1e38, 3.4e38, 1.0, -7.5])


@st.composite
def batches(draw, base):
    rows = draw(st.integers(1, 12))
    start = draw(st.integers(0, ROWS - rows))
    batch = base.slice(start, rows)
    values = logits_of(batch).astype(np.float32)
    for _ in range(draw(st.integers(0, 3 * rows))):
        values[draw(st.integers(0, rows - 1)), draw(st.integers(0, M - 1)), draw(st.integers(0, C - 1))] = draw(SPECIAL)
    value_type = draw(st.sampled_from([pa.float16(), pa.float32(), pa.float64()]))
    stamp = draw(st.integers(0, 2**40))
    ids = pa.array([f"h{stamp}-{i}" for i in range(rows)])
    with np.errstate(over="ignore"):  # float16 overflows to inf: one of the cases
        return _set(_set(batch, "logits", _logits(values.astype(value_type.to_pandas_dtype()), value_type)), "id", ids)


@pytest.mark.parametrize("face", FACES)
def test_no_row_with_a_non_finite_logit_is_auto_accepted(face, world, server, base, tmp_path):
    @settings(max_examples=12, deadline=None, database=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
    @given(batch=batches(base))
    def check(batch):
        got = send(face, server, batch, world=world, tmp=tmp_path)
        assert got.code == "OK", got
        finite = np.isfinite(logits_of(batch)).all(axis=(1, 2))
        escalate = np.asarray(got.decisions.column("escalate").to_pylist())
        assert escalate[~finite].all(), f"{face}: rows {np.flatnonzero(~finite & ~escalate)} non-finite and auto-accepted"

    check()
    assert health(server.grpc) == "SERVING"
