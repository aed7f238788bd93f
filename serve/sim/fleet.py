"""The fleet simulator's generators: the fleet, its truth, the calibration data and the bank as
in-memory record batches (the same rows as :func:`~.parquet.simulate_fleet` writes).

Determinism: rows are generated in fixed blocks of :data:`~.config.GENERATION_BLOCK_ROWS`, each
from its own generator derived from (seed, file stream, block index). The data therefore depend
only on the configuration's data fields, never on batch size, row-group size or threading; the
file layout knobs (``row_group_rows``) change the layout, not a single value.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from typing import Iterator

import pyarrow as pa

from .blocks import Rows, generate_block
from .config import GENERATION_BLOCK_ROWS, STREAM_BANK, STREAM_CALIBRATION, STREAM_FLEET, FleetConfig
from .encode import Encoder

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------
# Block batches, one stream per file


@functools.lru_cache(maxsize=1)
def _blas_controller():
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:  # optional: without it BLAS keeps its own thread count
        logger.debug("threadpoolctl not installed: fleet generation runs BLAS with its default threads")
        return None
    return ThreadpoolController()


@contextlib.contextmanager
def _single_threaded_blas():
    """Run the block's two small GEMMs on one BLAS thread.

    Why: the other core is busy encoding and writing Parquet (or running the caller's code), and
    OpenBLAS's worker threads spin when they find no free core: on the shared 2-core machine a
    16k x 32 x 128 product took 5x longer with 2 threads than with 1. The limit is process-wide
    while it lasts (a block, milliseconds), never held across a ``yield``."""
    controller = _blas_controller()
    if controller is None:
        yield
        return
    with controller.limit(limits=1, user_api="blas"):
        yield


def _block(config: FleetConfig, stream: int, block: int, total: int) -> Rows:
    with _single_threaded_blas():
        return generate_block(config, stream, block, total)


def _blocks(total: int) -> range:
    return range(-(-total // GENERATION_BLOCK_ROWS))


def fleet_block_batches(config: FleetConfig) -> Iterator[tuple[pa.RecordBatch, pa.RecordBatch]]:
    encoder = Encoder(config, STREAM_FLEET, config.rows)
    for block in _blocks(config.rows):
        rows = _block(config, STREAM_FLEET, block, config.rows)
        ids = encoder.ids(rows)
        yield encoder.fleet(rows, ids, with_label=False), encoder.truth(rows, ids)


def calibration_block_batches(config: FleetConfig) -> Iterator[tuple[pa.RecordBatch]]:
    encoder = Encoder(config, STREAM_CALIBRATION, config.calibration_rows)
    for block in _blocks(config.calibration_rows):
        rows = _block(config, STREAM_CALIBRATION, block, config.calibration_rows)
        yield (encoder.fleet(rows, encoder.ids(rows), with_label=True),)


def bank_block_batches(config: FleetConfig) -> Iterator[tuple[pa.RecordBatch]]:
    encoder = Encoder(config, STREAM_BANK, config.bank_rows)
    for block in _blocks(config.bank_rows):
        rows = _block(config, STREAM_BANK, block, config.bank_rows)
        yield (encoder.bank(rows, encoder.ids(rows)),)


def regroup(blocks: Iterator[tuple[pa.RecordBatch, ...]], group_rows: int) -> Iterator[list[list[pa.RecordBatch]]]:
    """Re-cut a stream of parallel batch tuples into groups of exactly ``group_rows`` rows (the last
    one shorter), as lists of zero-copy slices per parallel stream."""
    pending: list[tuple[pa.RecordBatch, ...]] = []
    held = 0
    for batches in blocks:
        offset = 0
        n = batches[0].num_rows
        while offset < n:
            take = min(group_rows - held, n - offset)
            pending.append(tuple(b.slice(offset, take) for b in batches))
            held += take
            offset += take
            if held == group_rows:
                yield [list(parts) for parts in zip(*pending)]
                pending, held = [], 0
    if pending:
        yield [list(parts) for parts in zip(*pending)]


def _one_batch(parts: list[pa.RecordBatch]) -> pa.RecordBatch:
    if len(parts) == 1:
        return parts[0]
    if hasattr(pa, "concat_batches"):  # pyarrow >= 19
        return pa.concat_batches(parts)
    return pa.Table.from_batches(parts).combine_chunks().to_batches()[0]


# ------------------------------------------------------------------------------------------------
# Public generators


def _check_batch_rows(batch_rows: int) -> None:
    if isinstance(batch_rows, bool) or not isinstance(batch_rows, int) or batch_rows < 1:
        raise ValueError(f"batch_rows: expected a positive int, found {batch_rows!r}")


def generate_fleet_batches(config: FleetConfig, batch_rows: int = 65_536) -> Iterator[pa.RecordBatch]:
    """The fleet's predictions in memory, as record batches of ``batch_rows`` rows (the last one
    shorter) with :func:`fleet_schema`. The same rows as :func:`simulate_fleet` writes."""
    for fleet, _ in generate_fleet_with_truth(config, batch_rows):
        yield fleet


def generate_fleet_with_truth(
    config: FleetConfig, batch_rows: int = 65_536
) -> Iterator[tuple[pa.RecordBatch, pa.RecordBatch]]:
    """Pairs (fleet batch, truth batch) of ``batch_rows`` rows, row-aligned; the truth batch has
    :data:`TRUTH_SCHEMA`."""
    _check_batch_rows(batch_rows)
    for fleet, truth in regroup(fleet_block_batches(config), batch_rows):
        yield _one_batch(fleet), _one_batch(truth)


def generate_calibration_batches(config: FleetConfig, batch_rows: int = 65_536) -> Iterator[pa.RecordBatch]:
    """Labelled in-distribution predictions (``calibration_rows`` of them, the day before the
    fleet's day) with :func:`calibration_schema`."""
    _check_batch_rows(batch_rows)
    for (parts,) in regroup(calibration_block_batches(config), batch_rows):
        yield _one_batch(parts)


def generate_bank_batches(config: FleetConfig, batch_rows: int = 65_536) -> Iterator[pa.RecordBatch]:
    """In-distribution reference embeddings (``bank_rows`` of them) with :func:`bank_schema`."""
    _check_batch_rows(batch_rows)
    for (parts,) in regroup(bank_block_batches(config), batch_rows):
        yield _one_batch(parts)
