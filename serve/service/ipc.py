"""Arrow IPC bytes <-> record batches at the service's boundary, with errors that name the field.

Every batch that comes in is validated in full (``RecordBatch.validate(full=True)``: offsets,
lengths, dictionary indices, UTF-8, child array sizes) before anything reads its values. Arrow's
IPC reader checks only that a message parses; a stream whose offsets or lengths point past its
buffers would otherwise make the engine read memory that is not the batch's.
"""

from __future__ import annotations

import pyarrow as pa

from hitl_triage.engine.decode import BatchError


def validated(batch: pa.RecordBatch, field: str = "arrow_ipc") -> pa.RecordBatch:
    """``batch``, once Arrow's full validation passes; a BatchError naming ``field`` if not."""
    try:
        batch.validate(full=True)
    except (pa.ArrowInvalid, pa.ArrowException) as exc:
        detail = " ".join(str(exc).split())
        raise BatchError(f"{field}: expected a valid Arrow record batch, found one that fails Arrow's "
                         f"validation ({detail})") from None
    return batch


def read_batch(data: bytes, field: str = "arrow_ipc") -> pa.RecordBatch:
    """The one record batch of an Arrow IPC stream (several batches are joined; zero rows allowed)."""
    if not data:
        raise BatchError(f"{field}: expected an Arrow IPC stream, found no bytes")
    try:
        reader = pa.ipc.open_stream(pa.py_buffer(data))
        batches = [validated(batch, field) for batch in reader]  # each checked before it is joined
        schema = reader.schema
    except (pa.ArrowInvalid, pa.ArrowException, OSError) as exc:
        detail = " ".join(str(exc).split())
        raise BatchError(f"{field}: expected an Arrow IPC stream, found bytes that are not one ({detail})") from None
    rows = sum(batch.num_rows for batch in batches)
    if rows == 0:
        return pa.RecordBatch.from_pylist([], schema=schema)
    if len(batches) == 1:
        return batches[0]
    return pa.Table.from_batches(batches, schema=schema).combine_chunks().to_batches()[0]


def write_batch(batch: pa.RecordBatch | pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, batch.schema) as writer:
        writer.write(batch)
    return sink.getvalue().to_pybytes()
