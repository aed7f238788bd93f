"""Batch decoding at the engine's boundary: every input form of the data contract, zero-copy,
slices and chunks, nulls, errors, labels, and (GPU only) the pinned side-stream transfer.

Values are compared exactly: decoding moves float values, it never computes on them, so any
difference at all is a bug (no tolerance). The independent references are the numpy arrays the
Arrow inputs are built from, ``np.array(column.to_pylist())`` on sampled rows, and pyarrow's own
``to_numpy_ndarray`` for the tensor extension type.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from hitl_triage.engine.decode import (
    BatchError,
    BatchTypeError,
    BatchValueError,
    MissingColumnError,
    PredictionBatch,
    check_schema,
    decode_batch,
    decode_embedding,
    validate_labels,
)
from hitl_triage.engine.device import HostToDevice, resolve_device

HAS_CUDA = torch.cuda.is_available()
NP_FLOATS = {pa.float16(): np.float16, pa.float32(): np.float32, pa.float64(): np.float64}
TORCH_OF = {np.float16: torch.float16, np.float32: torch.float32, np.float64: torch.float64}

# ---------------------------------------------------------------------------------------------
# Factory: Arrow inputs built here from numpy arrays that are the reference


def float_values(rng, shape, dtype) -> np.ndarray:
    """Random logits-like values, exactly representable in ``dtype`` (so no rounding is involved)."""
    return (rng.standard_normal(shape) * 4).astype(dtype)


def fixed_list(values: np.ndarray) -> pa.Array:
    """[B, *shape] numpy -> nested fixed_size_list array (one level per axis after the first)."""
    arr = pa.array(values.reshape(-1))
    for size in reversed(values.shape[1:]):
        arr = pa.FixedSizeListArray.from_arrays(arr, size)
    return arr


def tensor_ext(values: np.ndarray, permutation=None) -> pa.Array:
    """[B, *logical] numpy -> arrow.fixed_shape_tensor array, physically permuted if asked.

    With a permutation, the physical layout is the logical one with its axes reordered so that
    logical axis i is physical axis permutation[i] (Arrow's canonical definition).
    """
    logical = values.shape[1:]
    if permutation is None:
        typ = pa.fixed_shape_tensor(pa.from_numpy_dtype(values.dtype), list(logical))
        storage = pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), int(np.prod(logical)))
        return pa.ExtensionArray.from_storage(typ, storage)
    inverse = np.argsort(permutation)
    physical = np.ascontiguousarray(values.transpose(0, *(1 + inverse)))
    typ = pa.fixed_shape_tensor(pa.from_numpy_dtype(values.dtype), list(physical.shape[1:]),
                                permutation=list(permutation))
    storage = pa.FixedSizeListArray.from_arrays(pa.array(physical.reshape(-1)), int(np.prod(logical)))
    return pa.ExtensionArray.from_storage(typ, storage)


def make_batch(rng, rows=37, members=3, classes=7, dim=None, *, form="nested", dtype=np.float32,
               ids="string", label=False, source=False, category=False, embedding_form="list"):
    """A RecordBatch in the asked form and the numpy arrays it was built from.

    form: "nested" [M][C] lists, "flat" [C] list (M=1), "tensor" extension [M, C],
    "tensor1" extension [C] (M=1), "tensor_perm" extension [M, C] stored transposed.
    """
    if form in ("flat", "tensor1"):
        members = 1
    logits = float_values(rng, (rows, members, classes), dtype)
    if form == "nested":
        col = fixed_list(logits)
    elif form == "flat":
        col = fixed_list(logits[:, 0])
    elif form == "tensor":
        col = tensor_ext(logits)
    elif form == "tensor1":
        col = tensor_ext(logits[:, 0])
    elif form == "tensor_perm":
        col = tensor_ext(logits, permutation=[1, 0])
    else:
        raise AssertionError(form)
    id_values = [f"pred-{i:05d}-{rng.integers(1 << 30)}" for i in range(rows)]
    if ids == "string":
        id_col = pa.array(id_values, pa.string())
    elif ids == "large_string":
        id_col = pa.array(id_values, pa.large_string())
    else:
        id_col = pa.array(rng.permutation(10 * rows + 5)[:rows].astype(ids))
    columns = {"id": id_col, "logits": col}
    ref = {"logits": logits, "id": id_col.to_pylist()}
    if dim is not None:
        emb = float_values(rng, (rows, dim), dtype)
        columns["embedding"] = fixed_list(emb) if embedding_form == "list" else tensor_ext(emb)
        ref["embedding"] = emb
    if label:
        lab = rng.integers(-1, classes, rows).astype(np.int32)
        columns["label"] = pa.array(lab)
        ref["label"] = lab
    if source:
        columns["source"] = pa.array(rng.choice(["cam-a", "cam-b", "site-7"], rows)).dictionary_encode()
    if category:
        columns["category"] = pa.array(rng.choice(["pii", "medical", "none"], rows), pa.large_string())
    return pa.record_batch(columns), ref


def pylist_rows(arr: pa.Array, rows) -> np.ndarray:
    """A plain reconstruction of some rows: np.array of to_pylist."""
    return np.array([arr[int(r)].as_py() for r in rows], dtype=np.float64)


def assert_raises(exc_type, column, *fragments, fn, **kwargs):
    """Call fn(**kwargs) and check it raises exc_type for ``column`` with every fragment in the message."""
    with pytest.raises(exc_type) as info:
        fn(**kwargs)
    err = info.value
    assert isinstance(err, BatchError), f"{type(err).__name__} is not a BatchError: {err}"
    assert err.column == column, f"error names column {err.column!r}, expected {column!r}: {err}"
    message = str(err)
    assert message.startswith(f"{column}: "), message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return err


def leaf_address(arr: pa.Array) -> int:
    """Address of the first float value of a (possibly nested or extension) fixed-size list array."""
    if isinstance(arr, pa.ExtensionArray):
        arr = arr.storage
    offset = 0
    while pa.types.is_fixed_size_list(arr.type):
        offset = (offset + arr.offset) * arr.type.list_size
        arr = arr.values
    return arr.buffers()[1].address + (offset + arr.offset) * arr.type.bit_width // 8


# ---------------------------------------------------------------------------------------------
# Every input form and float dtype


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("form", ["nested", "flat", "tensor", "tensor1", "tensor_perm"])
def test_logits_forms_and_dtypes(rng, form, dtype):
    rows, members, classes = 29, 3, 7
    rb, ref = make_batch(rng, rows, members, classes, dim=11, form=form, dtype=dtype,
                         embedding_form="tensor" if form.startswith("tensor") else "list")
    b = decode_batch(rb)
    expect_m = 1 if form in ("flat", "tensor1") else members
    assert isinstance(b, PredictionBatch)
    assert (b.num_rows, b.members, b.classes, b.dim) == (rows, expect_m, classes, 11)
    assert b.logits.shape == (rows, expect_m, classes) and b.logits.dtype == TORCH_OF[dtype]
    assert b.logits.is_contiguous() and b.logits.device.type == "cpu"
    np.testing.assert_array_equal(b.logits.numpy(), ref["logits"], err_msg=f"{form} {dtype}")
    np.testing.assert_array_equal(b.embedding.numpy(), ref["embedding"])
    assert b.logits_missing is None and b.embedding_missing is None
    assert b.ids.to_pylist() == ref["id"]
    sample = rng.choice(rows, 5, replace=False)
    if form.startswith("tensor"):
        # pyarrow's own tensor conversion (it honours the permutation) is the reference here
        np.testing.assert_array_equal(b.logits.numpy().reshape(rows, expect_m, classes),
                                      rb.column("logits").to_numpy_ndarray().reshape(rows, expect_m, classes))
    else:
        plain = pylist_rows(rb.column("logits"), sample).reshape(5, expect_m, classes)
        np.testing.assert_array_equal(b.logits.numpy()[sample].astype(np.float64), plain)
        plain = pylist_rows(rb.column("embedding"), sample)
        np.testing.assert_array_equal(b.embedding.numpy()[sample].astype(np.float64), plain)


def test_one_row_and_empty_batches(rng):
    rb, ref = make_batch(rng, rows=1, members=1, classes=2, dim=1)
    b = decode_batch(rb, members=1, classes=2, dim=1)
    assert b.logits.shape == (1, 1, 2) and b.embedding.shape == (1, 1)
    np.testing.assert_array_equal(b.logits.numpy(), ref["logits"])
    empty = rb.slice(0, 0)
    b = decode_batch(empty)
    assert b.num_rows == 0 and b.logits.shape == (0, 1, 2) and b.embedding.shape == (0, 1)


@pytest.mark.parametrize("id_type", ["string", "large_string", np.int64, np.int32, np.int16, np.int8])
def test_id_types(rng, id_type):
    rb, ref = make_batch(rng, rows=23, ids=id_type)
    b = decode_batch(rb)
    if isinstance(id_type, str):
        assert b.ids.type == getattr(pa, id_type)()
    else:
        assert b.ids.type == pa.int64(), "signed integer ids are widened to int64"
    assert b.ids.to_pylist() == ref["id"]


def test_source_category_label_columns(rng):
    rb, ref = make_batch(rng, rows=41, label=True, source=True, category=True)
    b = decode_batch(rb)
    assert pa.types.is_dictionary(b.source.type), "dictionary encoding is kept"
    assert b.source.to_pylist() == rb.column("source").to_pylist()
    assert b.category.type == pa.large_string()
    assert b.category.to_pylist() == rb.column("category").to_pylist()
    assert b.label.dtype == torch.int32
    np.testing.assert_array_equal(b.label.numpy(), ref["label"])
    ignored = decode_batch(rb, label="ignore")
    assert ignored.label is None


@pytest.mark.parametrize("label_type", [pa.int8(), pa.int16(), pa.int64(), pa.uint8()])
def test_label_integer_types_and_nulls(rng, label_type):
    rb, _ = make_batch(rng, rows=19, classes=5)
    values = [int(v) for v in rng.integers(-1, 5, 19)]
    values[3] = None  # a null label means unknown
    rb = rb.append_column("label", pa.array(
        [None if v is None or (v < 0 and pa.types.is_unsigned_integer(label_type)) else v for v in values],
        label_type))
    b = decode_batch(rb, label="required")
    expected = [-1 if v is None else v for v in rb.column("label").to_pylist()]
    assert b.label.dtype == torch.int32 and b.label.tolist() == expected


def test_embedding_and_label_modes(rng):
    rb, _ = make_batch(rng, dim=8)
    assert decode_batch(rb, embedding="ignore").embedding is None
    # an ignored column is not even checked
    bad = rb.set_column(rb.schema.get_field_index("embedding"), "embedding", pa.array(["x"] * rb.num_rows))
    assert decode_batch(bad, embedding="ignore").embedding is None
    no_emb, _ = make_batch(rng)
    assert decode_batch(no_emb).embedding is None
    assert decode_batch(no_emb).dim is None


def test_all_null_source_column(rng):
    rb, _ = make_batch(rng, rows=5)
    rb = rb.append_column("source", pa.nulls(5))
    b = decode_batch(rb)
    assert b.source.type == pa.string() and b.source.null_count == 5


# ---------------------------------------------------------------------------------------------
# Zero-copy, slices, chunks


@pytest.mark.parametrize("form", ["nested", "flat", "tensor"])
def test_zero_copy_views_arrow_buffers(rng, form):
    rb, ref = make_batch(rng, rows=64, members=5, classes=10, dim=16, form=form)
    b = decode_batch(rb, dim=16)
    assert b.logits.data_ptr() == leaf_address(rb.column("logits")), "logits were copied"
    assert b.embedding.data_ptr() == leaf_address(rb.column("embedding")), "embedding was copied"
    np.testing.assert_array_equal(b.logits.numpy(), ref["logits"])


def test_zero_copy_against_numpy_source(rng):
    logits = float_values(rng, (100, 5, 10), np.float32)
    rb = pa.record_batch({"id": pa.array(np.arange(100)), "logits": fixed_list(logits)})
    b = decode_batch(rb)
    assert np.shares_memory(b.logits.numpy(), logits), "pa.array of a float32 numpy array and " \
        "the decode are both zero-copy, so the result must share the numpy memory"


@pytest.mark.parametrize("form", ["nested", "flat", "tensor", "tensor_perm"])
def test_sliced_batches(rng, form):
    rows = 53
    rb, ref = make_batch(rng, rows, members=3, classes=6, dim=5, form=form, label=True, source=True)
    for start, length in [(0, rows), (1, 10), (17, 36), (52, 1), (30, 0)]:
        part = rb.slice(start, length)
        b = decode_batch(part)
        np.testing.assert_array_equal(b.logits.numpy(), ref["logits"][start:start + length],
                                      err_msg=f"slice({start}, {length})")
        np.testing.assert_array_equal(b.embedding.numpy(), ref["embedding"][start:start + length])
        np.testing.assert_array_equal(b.label.numpy(), ref["label"][start:start + length])
        assert b.ids.to_pylist() == ref["id"][start:start + length]
        assert b.source.to_pylist() == rb.column("source").to_pylist()[start:start + length]
        if length and form != "tensor_perm":
            assert b.logits.data_ptr() == leaf_address(part.column("logits")), "slice was copied"


def test_slice_of_a_sliced_child(rng):
    """A list array whose child values are themselves an offset slice (as IPC readers produce)."""
    logits = float_values(rng, (40, 2, 3), np.float32)
    flat = pa.array(np.concatenate([np.zeros(7, np.float32), logits.reshape(-1)])).slice(7)
    col = pa.FixedSizeListArray.from_arrays(pa.FixedSizeListArray.from_arrays(flat, 3), 2)
    rb = pa.record_batch({"id": pa.array(np.arange(40)), "logits": col}).slice(5, 20)
    b = decode_batch(rb)
    np.testing.assert_array_equal(b.logits.numpy(), logits[5:25])


def test_chunked_tables(rng):
    parts = [make_batch(rng, rows, members=2, classes=4, dim=3, label=True, source=True)
             for rows in (13, 1, 22)]
    table = pa.Table.from_batches([rb for rb, _ in parts])
    b = decode_batch(table)
    np.testing.assert_array_equal(b.logits.numpy(), np.concatenate([r["logits"] for _, r in parts]))
    np.testing.assert_array_equal(b.embedding.numpy(), np.concatenate([r["embedding"] for _, r in parts]))
    np.testing.assert_array_equal(b.label.numpy(), np.concatenate([r["label"] for _, r in parts]))
    assert b.ids.to_pylist() == sum((r["id"] for _, r in parts), [])
    # one chunk: no combine, still zero-copy
    single = pa.Table.from_batches([parts[2][0]])
    assert decode_batch(single).logits.data_ptr() == leaf_address(parts[2][0].column("logits"))
    # a sliced table across chunk boundaries
    sliced = table.slice(10, 20)
    b = decode_batch(sliced)
    np.testing.assert_array_equal(b.logits.numpy(), np.concatenate([r["logits"] for _, r in parts])[10:30])


def test_chunked_tensor_extension_table(rng):
    parts = [make_batch(rng, rows, members=2, classes=3, form="tensor_perm") for rows in (4, 9)]
    table = pa.Table.from_batches([rb for rb, _ in parts])
    b = decode_batch(table)
    np.testing.assert_array_equal(b.logits.numpy(), np.concatenate([r["logits"] for _, r in parts]))


# ---------------------------------------------------------------------------------------------
# Nulls


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_null_rows_are_missing_and_nan(rng, dtype):
    rows, members, classes = 12, 3, 4
    logits = float_values(rng, (rows, members, classes), dtype).astype(object)
    py = [[[float(v) for v in member] for member in row] for row in logits]
    py[2] = None                     # the whole entry
    py[5][1] = None                  # one member
    py[9][0][3] = None               # one value
    typ = pa.list_(pa.list_(pa.from_numpy_dtype(dtype), classes), members)
    rb = pa.record_batch({"id": pa.array(range(rows)), "logits": pa.array(py, typ)})
    b = decode_batch(rb)
    missing = np.zeros(rows, bool)
    missing[[2, 5, 9]] = True
    np.testing.assert_array_equal(b.logits_missing.numpy(), missing)
    assert torch.isnan(b.logits[torch.from_numpy(missing)]).all(), "missing rows must be NaN"
    np.testing.assert_array_equal(b.logits.numpy()[~missing].astype(np.float64),
                                  np.array([py[r] for r in np.flatnonzero(~missing)], np.float64))
    # sliced past the first null, the mask follows the slice
    part = decode_batch(rb.slice(3, 7))
    np.testing.assert_array_equal(part.logits_missing.numpy(), missing[3:10])


def test_null_embeddings(rng):
    rows, dim = 9, 4
    emb = [[float(v) for v in r] for r in float_values(rng, (rows, dim), np.float32)]
    emb[0] = None
    emb[7][2] = None
    rb, _ = make_batch(rng, rows)
    rb = rb.append_column("embedding", pa.array(emb, pa.list_(pa.float32(), dim)))
    b = decode_batch(rb, dim=dim)
    assert b.embedding_missing.tolist() == [r in (0, 7) for r in range(rows)]
    assert torch.isnan(b.embedding[[0, 7]]).all()
    assert b.logits_missing is None


def test_null_tensor_extension_entry(rng):
    rb, ref = make_batch(rng, rows=6, members=2, classes=3, form="tensor")
    storage = rb.column("logits").storage
    mask = pa.array([False, False, True, False, False, False])
    with_null = pa.FixedSizeListArray.from_arrays(storage.values, 6, mask=mask)
    col = pa.ExtensionArray.from_storage(rb.column("logits").type, with_null)
    rb = rb.set_column(1, "logits", col)
    b = decode_batch(rb)
    assert b.logits_missing.tolist() == [False, False, True, False, False, False]
    keep = [0, 1, 3, 4, 5]
    np.testing.assert_array_equal(b.logits.numpy()[keep], ref["logits"][keep])


# ---------------------------------------------------------------------------------------------
# In-process mappings


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_mapping_of_torch_tensors(rng, dtype):
    logits = torch.from_numpy(float_values(rng, (21, 4, 5), np.float32)).to(dtype)
    emb = torch.from_numpy(float_values(rng, (21, 6), np.float32)).to(dtype)
    ids = torch.arange(100, 121, dtype=torch.int32)
    b = decode_batch({"id": ids, "logits": logits, "embedding": emb,
                      "label": torch.full((21,), 2), "source": ["s"] * 21},
                     members=4, classes=5, dim=6)
    assert b.logits.dtype == dtype and b.logits.data_ptr() == logits.data_ptr(), "no copy on the CPU"
    assert torch.equal(b.embedding, emb)
    assert b.ids.type == pa.int64() and b.ids.to_pylist() == list(range(100, 121))
    assert b.label.dtype == torch.int32 and b.label.tolist() == [2] * 21
    assert b.source.type == pa.string()


def test_torch_int64_ids_become_arrow_zero_copy(rng):
    ids = torch.from_numpy(rng.permutation(1000)[:40].astype(np.int64))
    b = decode_batch({"id": ids, "logits": torch.zeros(40, 2)})
    assert b.ids.type == pa.int64() and b.ids.buffers()[1].address == ids.data_ptr()
    assert b.ids.to_pylist() == ids.tolist()


def test_mapping_of_numpy_two_dim_logits_and_lists(rng):
    logits = float_values(rng, (15, 3), np.float64)
    ids = np.arange(15, dtype=np.int64)
    b = decode_batch({"id": ids, "logits": logits, "category": ["a", None] * 7 + ["b"],
                      "label": [0, 1, 2, -1, 0] * 3})
    assert b.logits.shape == (15, 1, 3) and np.shares_memory(b.logits.numpy(), logits)
    assert np.shares_memory(b.ids.to_numpy(), ids), "an int64 numpy id array becomes Arrow zero-copy"
    assert b.category.to_pylist() == ["a", None] * 7 + ["b"]
    assert b.label.tolist() == [0, 1, 2, -1, 0] * 3


def test_mapping_of_arrow_arrays_and_string_ids(rng):
    rb, ref = make_batch(rng, rows=10, dim=3, form="tensor_perm")
    data = {name: rb.column(name) for name in rb.schema.names}
    data["id"] = ref["id"]  # a Python list of str
    data["embedding"] = pa.chunked_array([rb.column("embedding").slice(0, 4), rb.column("embedding").slice(4)])
    b = decode_batch(data)
    np.testing.assert_array_equal(b.logits.numpy(), ref["logits"])
    np.testing.assert_array_equal(b.embedding.numpy(), ref["embedding"])
    assert b.ids.type == pa.string() and b.ids.to_pylist() == ref["id"]


class DLPackOnly:
    """An array that speaks only DLPack (as CuPy or JAX arrays do)."""

    def __init__(self, tensor):
        self._t = tensor

    def __dlpack__(self, **kwargs):
        return self._t.__dlpack__(**kwargs)

    def __dlpack_device__(self):
        return self._t.__dlpack_device__()


def test_mapping_of_dlpack_arrays(rng):
    logits = torch.from_numpy(float_values(rng, (8, 2, 3), np.float32))
    b = decode_batch({"id": DLPackOnly(torch.arange(8)), "logits": DLPackOnly(logits)})
    assert b.logits.data_ptr() == logits.data_ptr(), "DLPack import is zero-copy"
    assert b.ids.to_pylist() == list(range(8))


def test_non_contiguous_numpy_logits_come_out_contiguous(rng):
    base = float_values(rng, (9, 4, 6), np.float32)
    view = base[:, :, ::2]
    b = decode_batch({"id": list(range(9)), "logits": view})
    assert b.logits.is_contiguous()
    np.testing.assert_array_equal(b.logits.numpy(), view)


# ---------------------------------------------------------------------------------------------
# Errors: every message names the column, what was expected and what was found


def test_missing_required_columns(rng):
    rb, _ = make_batch(rng)
    err = assert_raises(MissingColumnError, "id", "expected a required column", "found no such column",
                        "logits", fn=decode_batch, data=rb.drop_columns(["id"]))
    assert isinstance(err, ValueError)
    assert_raises(MissingColumnError, "logits", "expected a required column", "found no such column",
                  fn=decode_batch, data=rb.drop_columns(["logits"]))
    assert_raises(MissingColumnError, "embedding", "D=128", "required", "found no such column",
                  fn=decode_batch, data=rb, dim=128, embedding="required")
    assert_raises(MissingColumnError, "label", "required", "found no such column",
                  fn=decode_batch, data=rb, label="required")


def test_null_ids(rng):
    rb, _ = make_batch(rng, rows=8)
    ids = pa.array(["a", None, "c", None, "e", "f", "g", "h"])
    assert_raises(BatchValueError, "id", "expected no nulls", "found 2 null ids", "first at row 1",
                  fn=decode_batch, data=rb.set_column(0, "id", ids))
    assert_raises(BatchValueError, "id", "found 1 null ids", "first at row 0",
                  fn=decode_batch, data={"id": [None, 1], "logits": np.zeros((2, 3), np.float32)})


@pytest.mark.parametrize("typ, fragment", [
    (pa.list_(pa.float32()), "found list<float>, a variable-size list"),
    (pa.large_list(pa.float32()), "found large_list<float>, a variable-size list"),
    (pa.list_(pa.list_(pa.float32()), 5), "found fixed_size_list<list<float>>[5]"),
    (pa.list_(pa.list_(pa.list_(pa.float32(), 2), 2), 2), "nested too deep"),
    (pa.float32(), "found float"),
])
def test_logits_of_wrong_list_kind(typ, fragment):
    schema = pa.schema([("id", pa.int64()), ("logits", typ)])
    assert_raises(BatchTypeError, "logits", "expected fixed_size_list<fixed_size_list<float>[C]>[M]",
                  fragment, fn=check_schema, schema=schema)


def test_ragged_logits_are_refused(rng):
    ragged = pa.array([[0.1, 0.2, 0.3], [0.4, 0.5]], pa.list_(pa.float32()))
    rb = pa.record_batch({"id": pa.array(["a", "b"]), "logits": ragged})
    assert_raises(BatchTypeError, "logits", "found list<float>, a variable-size list",
                  fn=decode_batch, data=rb, classes=3)


@pytest.mark.parametrize("typ, members, classes, found", [
    (pa.list_(pa.float32(), 7), 5, 10, "found fixed_size_list<float>[7] (M=1, C=7)"),
    (pa.list_(pa.list_(pa.float32(), 10), 4), 5, 10, "found fixed_size_list<fixed_size_list<float>[10]>[4] (M=4, C=10)"),
    (pa.list_(pa.list_(pa.float64(), 9), 5), 5, 10, "(M=5, C=9)"),
    (pa.fixed_shape_tensor(pa.float32(), [5, 11]), 5, 10, "arrow.fixed_shape_tensor<float>[shape=[5, 11]] (M=5, C=11)"),
    (pa.fixed_shape_tensor(pa.float32(), [10, 5], permutation=[1, 0]), 5, 10, None),
])
def test_logits_of_wrong_size(typ, members, classes, found):
    schema = pa.schema([("id", pa.string()), ("logits", typ)])
    if found is None:  # physical [10, 5] permuted is logical [5, 10]: accepted
        layout = check_schema(schema, members=members, classes=classes)
        assert (layout.members, layout.classes) == (5, 10)
        return
    assert_raises(BatchValueError, "logits", f"expected [M={members}, C={classes}] per row", found,
                  fn=check_schema, schema=schema, members=members, classes=classes)


def test_logits_size_messages_with_partial_profile():
    schema = pa.schema([("id", pa.string()), ("logits", pa.list_(pa.float32(), 7))])
    assert_raises(BatchValueError, "logits", "expected [M=any, C=10] per row", "[7]",
                  fn=check_schema, schema=schema, classes=10)
    one_class = pa.schema([("id", pa.string()), ("logits", pa.list_(pa.float32(), 1))])
    assert_raises(BatchValueError, "logits", "expected at least 1 member and 2 classes", "C=1",
                  fn=check_schema, schema=one_class)
    three_d = pa.schema([("id", pa.string()), ("logits", pa.fixed_shape_tensor(pa.float32(), [2, 3, 4]))])
    assert_raises(BatchValueError, "logits", "per row (or [C] for M=1)", "shape=[2, 3, 4]",
                  fn=check_schema, schema=three_d)


@pytest.mark.parametrize("value, found", [
    (pa.int32(), "found int32 values"), (pa.string(), "found string values"),
    (pa.bool_(), "found bool values"),
])
def test_logits_of_wrong_element_type(value, found):
    for typ in (pa.list_(value, 4), pa.list_(pa.list_(value, 4), 2)):
        schema = pa.schema([("id", pa.string()), ("logits", typ)])
        assert_raises(BatchTypeError, "logits", "expected float16, float32 or float64 values", found,
                      fn=check_schema, schema=schema)
    schema = pa.schema([("id", pa.string()), ("embedding", pa.list_(value, 4)),
                        ("logits", pa.list_(pa.float32(), 4))])
    assert_raises(BatchTypeError, "embedding", "expected float16, float32 or float64 values", found,
                  fn=check_schema, schema=schema)


def test_other_extension_types_are_refused():
    class Other(pa.ExtensionType):
        def __init__(self):
            super().__init__(pa.list_(pa.float32(), 4), "acme.logits")

        def __arrow_ext_serialize__(self):
            return b""

        @classmethod
        def __arrow_ext_deserialize__(cls, storage_type, serialized):
            return cls()

    schema = pa.schema([("id", pa.string()), ("logits", Other())])
    assert_raises(BatchTypeError, "logits", "expected", "found extension<acme.logits>",
                  fn=check_schema, schema=schema)


def test_embedding_size_and_shape():
    base = [("id", pa.string()), ("logits", pa.list_(pa.float32(), 3))]
    schema = pa.schema(base + [("embedding", pa.list_(pa.float32(), 64))])
    assert_raises(BatchValueError, "embedding", "expected [D=128] per row", "found fixed_size_list<float>[64]",
                  fn=check_schema, schema=schema, dim=128)
    schema = pa.schema(base + [("embedding", pa.list_(pa.list_(pa.float32(), 4), 32))])
    assert_raises(BatchValueError, "embedding", "expected [D=any] per row",
                  "found fixed_size_list<fixed_size_list<float>[4]>[32]", fn=check_schema, schema=schema)
    schema = pa.schema(base + [("embedding", pa.list_(pa.float32()))])
    assert_raises(BatchTypeError, "embedding", "fixed_size_list<float>[D]", "variable-size",
                  fn=check_schema, schema=schema)


@pytest.mark.parametrize("typ", [pa.float64(), pa.uint32(), pa.binary(), pa.dictionary(pa.int8(), pa.string()),
                                 pa.string_view()])
def test_id_of_wrong_type(typ):
    schema = pa.schema([("id", typ), ("logits", pa.list_(pa.float32(), 3))])
    assert_raises(BatchTypeError, "id", "expected string, large_string or a signed integer type",
                  f"found {typ}" if not pa.types.is_dictionary(typ) else "found dictionary<string>",
                  fn=check_schema, schema=schema)


def test_id_of_wrong_type_in_mapping(rng):
    logits = np.zeros((3, 2), np.float32)
    assert_raises(BatchTypeError, "id", "expected string, large_string or a signed integer type",
                  "found float64 array of shape [3]", fn=decode_batch, data={"id": np.ones(3), "logits": logits})
    assert_raises(BatchTypeError, "id", "found uint8", fn=decode_batch,
                  data={"id": torch.arange(3, dtype=torch.uint8), "logits": logits})
    assert_raises(BatchTypeError, "id", "expected a list of str or of int", fn=decode_batch,
                  data={"id": ["a", 1, "c"], "logits": logits})


@pytest.mark.parametrize("column", ["source", "category"])
def test_source_and_category_types(column):
    base = [("id", pa.string()), ("logits", pa.list_(pa.float32(), 3))]
    for typ, found in [(pa.int64(), "found int64"), (pa.binary(), "found binary"),
                       (pa.dictionary(pa.int32(), pa.int64()), "found dictionary<int64>")]:
        schema = pa.schema(base + [(column, typ)])
        assert_raises(BatchTypeError, column, "expected string, large_string or dictionary<string>", found,
                      fn=check_schema, schema=schema)
    assert_raises(BatchTypeError, column, "expected string", "found torch tensor", fn=decode_batch,
                  data={"id": [1, 2], "logits": np.zeros((2, 2), np.float32), column: torch.zeros(2)})
    assert_raises(BatchTypeError, column, "expected string", fn=decode_batch,
                  data={"id": [1, 2], "logits": np.zeros((2, 2), np.float32), column: [1, 2]})


def test_label_type_errors(rng):
    base = [("id", pa.string()), ("logits", pa.list_(pa.float32(), 3))]
    schema = pa.schema(base + [("label", pa.float32())])
    assert_raises(BatchTypeError, "label", "expected an integer type", "found float",
                  fn=check_schema, schema=schema)
    assert_raises(BatchTypeError, "label", "expected an integer type", "found float64 array of shape [2]",
                  fn=decode_batch, data={"id": [1, 2], "logits": np.zeros((2, 3), np.float32),
                                         "label": np.array([0.0, 1.0])})
    assert_raises(BatchValueError, "label", "expected values in [0, 3) or -1", "found 1 rows outside",
                  "id 2", "label 3", fn=decode_batch,
                  data={"id": [1, 2], "logits": np.zeros((2, 3), np.float32), "label": [0, 3]})


def test_mapping_shape_errors(rng):
    assert_raises(BatchValueError, "embedding", "expected 4 rows (as in id)", "found 3", fn=decode_batch,
                  data={"id": [1, 2, 3, 4], "logits": np.zeros((4, 3), np.float32),
                        "embedding": np.zeros((3, 8), np.float32)})
    assert_raises(BatchValueError, "logits", "expected an array of shape [B, M, C] or [B, C]",
                  "found float32 array of shape [4]", fn=decode_batch,
                  data={"id": [1, 2, 3, 4], "logits": np.zeros(4, np.float32)})
    assert_raises(BatchValueError, "logits", "expected [M=any, C=any] per row", "found float32 array of shape [4, 2, 3, 5]",
                  fn=decode_batch, data={"id": [1, 2, 3, 4], "logits": np.zeros((4, 2, 3, 5), np.float32)})
    assert_raises(BatchTypeError, "logits", "expected float16, bfloat16, float32 or float64",
                  "found int64 array of shape [4, 3]", fn=decode_batch,
                  data={"id": [1, 2, 3, 4], "logits": np.zeros((4, 3), np.int64)})
    assert_raises(BatchTypeError, "logits", "expected an Arrow array, numpy array, torch tensor or DLPack array",
                  "found list", fn=decode_batch, data={"id": [1], "logits": [[0.1, 0.9]]})
    assert_raises(BatchValueError, "logits", "expected [M=2, C=3] per row", "(M=1, C=3)", fn=decode_batch,
                  data={"id": [1], "logits": np.zeros((1, 3), np.float32)}, members=2, classes=3)
    assert_raises(BatchValueError, "label", "expected an array of 1 rows", "found a scalar", fn=decode_batch,
                  data={"id": [1], "logits": np.zeros((1, 3), np.float32), "label": torch.tensor(0)})


def test_duplicate_columns_and_bad_arguments(rng):
    schema = pa.schema([("id", pa.string()), ("logits", pa.list_(pa.float32(), 3)),
                        ("logits", pa.list_(pa.float32(), 3))])
    assert_raises(BatchValueError, "logits", "expected one column of that name", "found 2",
                  fn=check_schema, schema=schema)
    rb, _ = make_batch(rng)
    with pytest.raises(ValueError, match="embedding: expected one of"):
        decode_batch(rb, embedding="yes")
    with pytest.raises(ValueError, match="members: expected a positive integer or None, found 0"):
        decode_batch(rb, members=0)
    with pytest.raises(TypeError, match="data: expected a pyarrow RecordBatch or Table"):
        decode_batch([1, 2, 3])
    with pytest.raises(ValueError, match="device: expected 'cpu', 'cuda' or 'cuda:N', found 'mps'"):
        decode_batch(rb, device="mps")


@pytest.mark.skipif(HAS_CUDA, reason="checks the message given where CUDA is absent")
def test_cuda_device_without_cuda(rng):
    rb, _ = make_batch(rng)
    with pytest.raises(ValueError, match="device: expected a CUDA device to be present"):
        decode_batch(rb, device="cuda")


# ---------------------------------------------------------------------------------------------
# check_schema on a Parquet file, before reading any row group


def test_check_schema_refuses_parquet_before_reading(rng, tmp_path):
    rb, _ = make_batch(rng, rows=20, members=5, classes=10, dim=16, label=True, source=True)
    path = tmp_path / "preds.parquet"
    pq.write_table(pa.Table.from_batches([rb]), path)
    schema = pq.read_schema(path)
    layout = check_schema(schema, members=5, classes=10, dim=16, embedding="required", label="required")
    assert (layout.members, layout.classes, layout.dim) == (5, 10, 16)
    assert layout.logits_dtype == torch.float32 and layout.has_label and layout.has_source
    assert not layout.has_category and layout.id_type == pa.string()
    assert_raises(BatchValueError, "logits", "expected [M=3, C=10] per row", "(M=5, C=10)",
                  fn=check_schema, schema=schema, members=3, classes=10)
    # the same file decodes the same way check_schema said it would
    b = decode_batch(pq.read_table(path), members=5, classes=10, dim=16)
    assert (b.members, b.classes, b.dim) == (5, 10, 16)


def test_tensor_extension_survives_parquet(rng, tmp_path):
    rb, ref = make_batch(rng, rows=7, members=2, classes=3, form="tensor_perm")
    path = tmp_path / "t.parquet"
    pq.write_table(pa.Table.from_batches([rb]), path)
    layout = check_schema(pq.read_schema(path), members=2, classes=3)
    assert (layout.members, layout.classes) == (2, 3)
    np.testing.assert_array_equal(decode_batch(pq.read_table(path)).logits.numpy(), ref["logits"])


# ---------------------------------------------------------------------------------------------
# decode_embedding (a bank's column alone) and the error class


@pytest.mark.parametrize("form", ["list", "tensor"])
def test_decode_embedding_column(rng, form):
    emb = float_values(rng, (33, 12), np.float32)
    col = fixed_list(emb) if form == "list" else tensor_ext(emb)
    vectors, missing = decode_embedding(col, dim=12)
    assert missing is None and vectors.data_ptr() == leaf_address(col), "no copy without nulls"
    np.testing.assert_array_equal(vectors.numpy(), emb)
    chunked = pa.chunked_array([col.slice(0, 10), col.slice(10)])
    np.testing.assert_array_equal(decode_embedding(chunked)[0].numpy(), emb)
    with_null = pa.array([list(map(float, emb[0])), None], pa.list_(pa.float32(), 12))
    vectors, missing = decode_embedding(with_null)
    assert missing.tolist() == [False, True] and torch.isnan(vectors[1]).all()
    found = "found fixed_size_list<float>[12]" if form == "list" else "found arrow.fixed_shape_tensor<float>[shape=[12]]"
    assert_raises(BatchValueError, "embedding", "expected [D=16] per row", found,
                  fn=lambda: decode_embedding(col, dim=16))
    assert_raises(BatchTypeError, "embedding", "expected a pyarrow Array", "found ndarray",
                  fn=lambda: decode_embedding(emb))


def test_batch_error_forms():
    two = BatchError("logits", "expected x, found y")
    one = BatchError("embedding: expected a vector for every row, found 2 null rows")
    assert str(two) == "logits: expected x, found y" and two.column == "logits"
    assert one.column == "embedding" and str(one).startswith("embedding: expected")
    assert isinstance(one, ValueError) and isinstance(BatchTypeError("id", "m"), TypeError)


# ---------------------------------------------------------------------------------------------
# validate_labels


def test_validate_labels_returns_known_mask(rng):
    labels = rng.integers(-1, 6, 300)
    known = validate_labels(labels, None, 6)
    assert isinstance(known, np.ndarray) and known.dtype == bool
    np.testing.assert_array_equal(known, labels >= 0)
    t = torch.from_numpy(labels.astype(np.int32))
    known_t = validate_labels(t, None, 6)
    assert isinstance(known_t, torch.Tensor) and torch.equal(known_t, t >= 0)
    known_a = validate_labels(pa.array([0, None, 5, -1], pa.int16()), None, 6)
    np.testing.assert_array_equal(known_a, [True, False, True, False])


@pytest.mark.parametrize("ids_kind", ["arrow", "list", "numpy", "torch", "none"])
def test_validate_labels_names_count_and_first_id(rng, ids_kind):
    rows = 50
    labels = rng.integers(-1, 4, rows)
    bad_rows = np.sort(rng.choice(np.arange(5, rows), 3, replace=False))
    labels[bad_rows] = [4, -2, 100]
    raw_ids = np.arange(1000, 1000 + rows)
    ids = {"arrow": pa.array(raw_ids), "list": raw_ids.tolist(), "numpy": raw_ids,
           "torch": torch.from_numpy(raw_ids), "none": None}[ids_kind]
    first = f"id {int(raw_ids[bad_rows[0]])}" if ids_kind != "none" else f"row {bad_rows[0]}"
    assert_raises(BatchValueError, "label", "expected values in [0, 4) or -1 (unknown)",
                  "found 3 rows outside that range", f"first: {first},", f"label {labels[bad_rows[0]]}",
                  fn=validate_labels, labels=labels, ids=ids, classes=4)


def test_validate_labels_string_ids_and_types():
    err = assert_raises(BatchValueError, "label", "found 1 rows", "first: id 'b'",
                        fn=validate_labels, labels=[0, 7], ids=pa.array(["a", "b"]), classes=3)
    assert isinstance(err, ValueError)
    assert_raises(BatchTypeError, "label", "expected an integer type", "bool",
                  fn=validate_labels, labels=torch.tensor([True]), ids=None, classes=2)


# ---------------------------------------------------------------------------------------------
# Device plumbing that runs everywhere


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    for bad in ("mps", "nonsense", "tpu:0"):
        with pytest.raises(ValueError, match="device: expected 'cpu', 'cuda' or 'cuda:N'"):
            resolve_device(bad)


# ---------------------------------------------------------------------------------------------
# GPU: the pinned side-stream transfer (skipped without CUDA)


@pytest.mark.gpu
@pytest.mark.parametrize("form", ["nested", "tensor_perm"])
def test_gpu_decode_round_trip(rng, form):
    rb, ref = make_batch(rng, rows=1031, members=5, classes=10, dim=128, form=form, label=True)
    transfer = HostToDevice("cuda")
    b = decode_batch(rb, device="cuda", transfer=transfer)
    assert b.logits.is_cuda and b.embedding.is_cuda and b.label.is_cuda
    torch.cuda.synchronize()
    np.testing.assert_array_equal(b.logits.cpu().numpy(), ref["logits"])
    np.testing.assert_array_equal(b.embedding.cpu().numpy(), ref["embedding"])
    np.testing.assert_array_equal(b.label.cpu().numpy(), ref["label"])
    # ... and the same batch decoded on the CPU agrees
    assert torch.equal(decode_batch(rb).logits, b.logits.cpu())


@pytest.mark.gpu
def test_gpu_copies_run_on_the_side_stream():
    transfer = HostToDevice("cuda")
    host = torch.randn(4096, 5, 10)
    torch.cuda.synchronize()
    # Keep the side stream busy: a copy issued on it must queue behind the sleep, and the current
    # stream, told to wait for the side stream, must not finish before it either.
    with torch.cuda.stream(transfer.stream):
        torch.cuda._sleep(1_000_000_000)  # about half a second
    out = transfer(host, "logits")
    current = torch.cuda.current_stream()
    assert not transfer.stream.query(), "the copy did not queue on the side stream"
    assert not current.query(), "the current stream does not wait for the side stream"
    current.synchronize()
    assert torch.equal(out.cpu(), host)


@pytest.mark.gpu
def test_gpu_pinned_buffers_are_reused():
    transfer = HostToDevice("cuda")
    first = torch.randn(3000, 5, 10)
    second = torch.randn(2000, 5, 10)  # smaller: fits in the grown buffer
    a = transfer(first, "logits")
    buf = transfer.staging_buffer("logits")
    assert buf is not None and buf.is_pinned()
    allocations = transfer.stats.pinned_allocations
    b = transfer(second, "logits")
    assert transfer.stats.pinned_allocations == allocations, "a pinned buffer was allocated per batch"
    assert transfer.staging_buffer("logits").data_ptr() == buf.data_ptr()
    torch.cuda.synchronize()
    assert torch.equal(a.cpu(), first) and torch.equal(b.cpu(), second), \
        "reusing the staging buffer overwrote a copy still in flight"
    bigger = torch.randn(9000, 5, 10)
    c = transfer(bigger, "logits")
    assert transfer.stats.pinned_allocations == allocations + 1
    torch.cuda.synchronize()
    assert torch.equal(c.cpu(), bigger)


@pytest.mark.gpu
def test_gpu_tensors_pass_through_and_come_back():
    logits = torch.randn(64, 3, 4, device="cuda")
    b = decode_batch({"id": torch.arange(64, device="cuda"), "logits": logits}, device="cuda")
    assert b.logits.data_ptr() == logits.data_ptr(), "a tensor already on the device was copied"
    assert b.ids.to_pylist() == list(range(64))
    back = decode_batch({"id": list(range(64)), "logits": DLPackOnly(logits)}, device="cpu")
    assert back.logits.device.type == "cpu" and torch.equal(back.logits, logits.cpu())
    pinned = torch.randn(64, 3, 4).pin_memory()
    transfer = HostToDevice("cuda")
    out = transfer(pinned, "logits")
    assert transfer.stats.direct_copies == 1 and transfer.staging_buffer("logits") is None
    torch.cuda.synchronize()
    assert torch.equal(out.cpu(), pinned)
