"""Writing a simulated fleet as Parquet: the four files (fleet, calibration, bank, truth), their
names, metadata and encoding, written row group by row group with generation and writing
overlapping on two threads.

Speed, measured on the shared 2-core VM (M=5, C=10, D=128): about 1.1 us of CPU per row to
generate and 1.6 us to encode and write as Parquet (pyarrow's nested-list encoding is most of it),
the two overlapping on two threads; 10M rows are 7.4 GB.
"""

from __future__ import annotations

import json
import logging
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pyarrow as pa
import pyarrow.parquet as pq

from .config import FleetConfig
from .encode import TRUTH_SCHEMA, bank_schema, calibration_schema, fleet_schema
from .fleet import bank_block_batches, calibration_block_batches, fleet_block_batches, regroup

logger = logging.getLogger(__name__)

# Parquet key-value metadata key under which each file records the configuration that made it.
METADATA_KEY = b"hitl_triage.fleet"


@dataclass(frozen=True)
class FleetFiles:
    """Where :func:`simulate_fleet` wrote the four files."""

    fleet: Path
    """Predictions: id, logits, embedding, source, category, ts."""
    calibration: Path
    """Labelled in-distribution predictions: the fleet's columns + label."""
    bank: Path
    """In-distribution reference embeddings: id, embedding, label."""
    truth: Path
    """What really happened to each fleet row: id, label, is_ood, is_error, kind."""

    def __iter__(self):
        return iter((self.fleet, self.calibration, self.bank, self.truth))


def fleet_paths(out_path: str | Path) -> FleetFiles:
    """The four file names for ``out_path``: FLEET.parquet and, beside it, FLEET.calibration.parquet,
    FLEET.bank.parquet and FLEET.truth.parquet."""
    out = Path(out_path)
    stem = out.with_suffix("") if out.suffix == ".parquet" else out
    fleet = out if out.suffix == ".parquet" else out.with_name(out.name + ".parquet")
    return FleetFiles(
        fleet=fleet,
        calibration=stem.with_name(stem.name + ".calibration.parquet"),
        bank=stem.with_name(stem.name + ".bank.parquet"),
        truth=stem.with_name(stem.name + ".truth.parquet"),
    )


# Compression, by measurement on the 2-core machine (262k rows, M=5, C=10, D=128): the float
# columns are noise to any codec (lz4 saved 4% of the file, zstd 12%, at 15% and 35% lower write
# speed), so they are stored plain; the string and timestamp columns, a few percent of the bytes,
# are worth lz4 (ids share long prefixes) and source/category/kind are dictionary-encoded.
_COMPRESSED_COLUMNS = ("id", "source", "category", "ts", "label", "kind")
_DICTIONARY_COLUMNS = ["source", "category", "kind"]


def _writer(path: Path, schema: pa.Schema, config: FleetConfig, role: str) -> pq.ParquetWriter:
    metadata = {METADATA_KEY: json.dumps({"role": role, "config": json.loads(config.to_json())}).encode()}
    names = set(schema.names)
    return pq.ParquetWriter(
        path,
        schema.with_metadata(metadata),
        compression={name: "lz4" for name in _COMPRESSED_COLUMNS if name in names} or "none",
        use_dictionary=[name for name in _DICTIONARY_COLUMNS if name in names],
        # Statistics only where a reader can prune with them (time windows, id ranges, sources);
        # min/max over millions of random floats cost write time and prune nothing.
        write_statistics=[name for name in ("id", "source", "category", "ts", "label", "kind") if name in names],
    )


def simulate_fleet(
    out_path: str | Path,
    config: FleetConfig | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> FleetFiles:
    """Write a simulated fleet's four Parquet files and return where they went.

    ``out_path`` names the fleet file (FLEET.parquet); the calibration, bank and truth files go
    beside it (see :func:`fleet_paths`). Files are written row group by row group
    (``config.row_group_rows``), so memory stays at about two row groups whatever the size; the
    next group is generated while the previous one is written. ``progress(done, total)`` is
    called after every row group with rows done over all four files' generated rows
    (fleet + calibration + bank)."""
    config = config or FleetConfig()
    files = fleet_paths(out_path)
    files.fleet.parent.mkdir(parents=True, exist_ok=True)
    total = config.rows + config.calibration_rows + config.bank_rows
    done = 0

    def advance(n: int) -> None:
        nonlocal done
        done += n
        if progress is not None:
            progress(done, total)

    plan = [
        (
            fleet_block_batches(config),
            [(files.fleet, fleet_schema(config), "fleet"), (files.truth, TRUTH_SCHEMA, "truth")],
        ),
        (calibration_block_batches(config), [(files.calibration, calibration_schema(config), "calibration")]),
        (bank_block_batches(config), [(files.bank, bank_schema(config), "bank")]),
    ]
    if progress is not None:
        progress(0, total)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="fleet-writer") as pool:
        for blocks, targets in plan:
            writers = [_writer(path, schema, config, role) for path, schema, role in targets]
            pending = None  # (future of the group being written, its rows)
            try:
                # Generation (numpy releases the GIL in its loops) overlaps with Parquet encoding
                # and I/O on the writer thread (pyarrow releases it too); one group in flight, so
                # memory stays at about two row groups.
                for group in regroup(blocks, config.row_group_rows):
                    rows = sum(batch.num_rows for batch in group[0])
                    if pending is not None:
                        pending[0].result()
                        advance(pending[1])
                    pending = (pool.submit(_write_group, writers, group, config.row_group_rows), rows)
                if pending is not None:
                    pending[0].result()
                    advance(pending[1])
                    pending = None
            finally:
                if pending is not None:
                    wait([pending[0]])  # never close a writer under the writing thread
                for writer in writers:
                    writer.close()
    logger.info("simulated fleet: %s", ", ".join(str(p) for p in files))
    return files


def _write_group(writers: list[pq.ParquetWriter], group: list[list[pa.RecordBatch]], group_rows: int) -> None:
    for writer, parts in zip(writers, group):
        writer.write_table(pa.Table.from_batches(parts), row_group_size=group_rows)
