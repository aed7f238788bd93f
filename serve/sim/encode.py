"""Arrow side of the simulated fleet: the four files' schemas (fleet, calibration, bank, truth) and
the conversion of row blocks into record batches (zero-copy where the layout allows).

Internal to :mod:`hitl_triage.serve.sim`, apart from the schemas.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from .blocks import Rows
from .config import CORRUPTED, KINDS, STREAM_CALIBRATION, STREAM_FLEET, UNSEEN, FleetConfig


# ------------------------------------------------------------------------------------------------
# Schemas


#: The truth file's schema: what really happened to each fleet row (read by tests and reports only).
TRUTH_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("label", pa.int32(), nullable=False),
        pa.field("is_ood", pa.bool_(), nullable=False),
        pa.field("is_error", pa.bool_(), nullable=False),
        pa.field("kind", pa.string(), nullable=False),
    ]
)


def fleet_schema(config: FleetConfig) -> pa.Schema:
    """The fleet file's schema: the data contract with M, C and D fixed."""
    return pa.schema(
        [
            pa.field("id", pa.string(), nullable=False),
            pa.field("logits", pa.list_(pa.list_(pa.float32(), config.classes), config.members), nullable=False),
            pa.field("embedding", pa.list_(pa.float32(), config.dim), nullable=False),
            pa.field("source", pa.string(), nullable=False),
            pa.field("category", pa.string(), nullable=False),
            pa.field("ts", pa.timestamp("ms", tz="UTC"), nullable=False),
        ]
    )


def calibration_schema(config: FleetConfig) -> pa.Schema:
    """The calibration file's schema: the fleet's columns plus ``label`` (int32)."""
    return fleet_schema(config).append(pa.field("label", pa.int32(), nullable=False))


def bank_schema(config: FleetConfig) -> pa.Schema:
    """The bank file's schema: id, embedding [D], label (int32)."""
    return pa.schema(
        [
            pa.field("id", pa.string(), nullable=False),
            pa.field("embedding", pa.list_(pa.float32(), config.dim), nullable=False),
            pa.field("label", pa.int32(), nullable=False),
        ]
    )


# ------------------------------------------------------------------------------------------------
# Record batches (zero-copy where the layout allows)


def _ids(prefixes: np.ndarray, code: np.ndarray, index: np.ndarray, digits: int) -> pa.Array:
    """Fixed-width string ids ``prefix[code] + zero-padded index``, built as one byte buffer.

    prefixes: [K, P] uint8 (all prefixes the same width). Formatting ten million ids in Python
    would take seconds; this is a few vectorised passes."""
    n = index.size
    width = prefixes.shape[1] + digits
    buf = np.empty((n, width), dtype=np.uint8)
    buf[:, : prefixes.shape[1]] = prefixes[code]
    rest = index.copy()
    for pos in range(width - 1, prefixes.shape[1] - 1, -1):
        buf[:, pos] = 48 + rest % 10
        rest //= 10
    offsets = np.arange(0, (n + 1) * width, width, dtype=np.int32)
    return pa.StringArray.from_buffers(n, pa.py_buffer(offsets), pa.py_buffer(buf))


def _prefix_table(names: list[str]) -> np.ndarray:
    encoded = [s.encode() for s in names]
    if len({len(b) for b in encoded}) != 1:
        raise ValueError(f"id prefixes: expected equal widths, found {names[:4]}...")
    return np.frombuffer(b"".join(encoded), dtype=np.uint8).reshape(len(encoded), -1)


def _fixed_list(values: np.ndarray, *sizes: int) -> pa.Array:
    """A (nested) fixed-size list array over a flat float32 buffer, without copying it."""
    arr = pa.array(values.reshape(-1))
    for size in reversed(sizes):
        arr = pa.FixedSizeListArray.from_arrays(arr, size)
    return arr


def _timestamps(ts_ms: np.ndarray) -> pa.Array:
    return pa.Array.from_buffers(pa.timestamp("ms", tz="UTC"), ts_ms.size, [None, pa.py_buffer(ts_ms)])


class Encoder:
    """Turns row blocks into record batches for one file stream (tables built once per stream)."""

    def __init__(self, config: FleetConfig, stream: int, total: int):
        self.config = config
        digits = max(9, len(str(max(total - 1, 0))))
        self.digits = digits
        names = config.source_names
        if stream == STREAM_FLEET:
            self.prefixes = _prefix_table([f"{s}-" for s in names])
        elif stream == STREAM_CALIBRATION:
            self.prefixes = _prefix_table(["cal-"])
        else:
            self.prefixes = _prefix_table(["bank-"])
        self.stream = stream
        self.fleet_schema = fleet_schema(config)
        self.calibration_schema = calibration_schema(config)
        self.bank_schema = bank_schema(config)
        self.source_names = pa.array(names, pa.string())
        self.category_names = pa.array(config.categories, pa.string())
        self.kind_names = pa.array(KINDS, pa.string())

    def ids(self, rows: Rows) -> pa.Array:
        code = rows.source if self.stream == STREAM_FLEET else np.zeros(rows.index.size, dtype=np.int32)
        return _ids(self.prefixes, code, rows.index, self.digits)

    def fleet(self, rows: Rows, ids: pa.Array, with_label: bool) -> pa.RecordBatch:
        cfg = self.config
        columns = [
            ids,
            _fixed_list(rows.logits, cfg.members, cfg.classes),
            _fixed_list(rows.embedding, cfg.dim),
            self.source_names.take(pa.array(rows.source)),
            self.category_names.take(pa.array(rows.category)),
            _timestamps(rows.ts_ms),
        ]
        if with_label:
            columns.append(pa.array(rows.label))
            return pa.RecordBatch.from_arrays(columns, schema=self.calibration_schema)
        return pa.RecordBatch.from_arrays(columns, schema=self.fleet_schema)

    def truth(self, rows: Rows, ids: pa.Array) -> pa.RecordBatch:
        columns = [
            ids,
            pa.array(rows.label),
            pa.array((rows.kind == UNSEEN) | (rows.kind == CORRUPTED)),
            pa.array(rows.is_error),
            self.kind_names.take(pa.array(rows.kind)),
        ]
        return pa.RecordBatch.from_arrays(columns, schema=TRUTH_SCHEMA)

    def bank(self, rows: Rows, ids: pa.Array) -> pa.RecordBatch:
        columns = [ids, _fixed_list(rows.embedding, self.config.dim), pa.array(rows.label)]
        return pa.RecordBatch.from_arrays(columns, schema=self.bank_schema)
