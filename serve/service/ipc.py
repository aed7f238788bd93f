"""Arrow IPC bytes <-> record batches at the service's boundary, with errors that name the field."""

from __future__ import annotations

import pyarrow as pa

from hitl_triage.engine.decode import BatchError


def read_batch(data: bytes, field: str = "arrow_ipc") -> pa.RecordBatch:
    """The one record batch of an Arrow IPC stream (several batches are joined; zero rows allowed)."""
    if not data:
        raise BatchError(f"{field}: expected an Arrow IPC stream, found no bytes")
    try:
        table = pa.ipc.open_stream(pa.py_buffer(data)).read_all()
    except (pa.ArrowInvalid, OSError) as exc:
        raise BatchError(f"{field}: expected an Arrow IPC stream, found bytes that are not one ({exc})") from exc
    if table.num_rows == 0:
        return pa.RecordBatch.from_pylist([], schema=table.schema)
    return table.combine_chunks().to_batches()[0]


def write_batch(batch: pa.RecordBatch | pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, batch.schema) as writer:
        writer.write(batch)
    return sink.getvalue().to_pybytes()
