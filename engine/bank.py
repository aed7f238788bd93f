"""The k-NN reference bank of in-distribution embeddings (built at fit time, grown by feedback).

Vectors that cannot be normalised (zero norm, NaN or inf) are dropped and counted rather than
refusing a million-row bank for a handful of bad rows; the count is in the fit report.
"""

from __future__ import annotations

import logging

import numpy as np
import pyarrow as pa
import torch

from hitl_triage.kernels.knn import KnnIndex

from .config import BankConfig
from .decode import BatchError

logger = logging.getLogger(__name__)


def bank_vectors(bank) -> np.ndarray:
    """float32 [N, D] from an Arrow table/batch with an ``embedding`` column, or an array."""
    if isinstance(bank, (pa.Table, pa.RecordBatch)):
        if "embedding" not in bank.schema.names:
            raise BatchError(f"embedding: expected an 'embedding' column in the bank, found columns {bank.schema.names}")
        from .decode import decode_embedding

        vectors, missing = decode_embedding(bank.column("embedding"))
        vectors = np.asarray(vectors)
        if missing is not None:
            vectors = vectors[~np.asarray(missing)]
    else:
        vectors = np.asarray(bank.detach().cpu() if isinstance(bank, torch.Tensor) else bank)
    if vectors.ndim != 2:
        raise BatchError(f"embedding: expected bank vectors of shape [N, D], found {vectors.shape}")
    return np.ascontiguousarray(vectors, dtype=np.float32)


def usable_rows(vectors: np.ndarray) -> np.ndarray:
    """bool [N]: rows that are finite with a non-zero norm."""
    return np.isfinite(vectors).all(axis=1) & (np.abs(vectors).max(axis=1) > 0)


def build_bank(bank, config: BankConfig, progress=None, queries=None) -> tuple[KnnIndex, dict]:
    """Build the index; returns it and a report (rows given, dropped, kept, index kind).

    For an IVF index, ``queries`` (in-distribution embeddings that are not in the bank, e.g. the
    calibration rows) set ``nprobe``: see :func:`tune_nprobe`.
    """
    vectors = bank_vectors(bank)
    keep = usable_rows(vectors)
    dropped = int((~keep).sum())
    if dropped:
        logger.warning("bank: dropped %d of %d vectors with zero norm or non-finite values", dropped, len(vectors))
        vectors = vectors[keep]
    if len(vectors) < config.k:
        raise BatchError(f"embedding: the bank needs at least k={config.k} usable vectors, found {len(vectors)}")
    if progress is not None:
        progress("build bank index", 0, len(vectors))
    index = KnnIndex.build(vectors, kind=config.index)
    if progress is not None:
        progress("build bank index", len(vectors), len(vectors))
    report = {"rows": int(len(keep)), "dropped": dropped, "kept": int(len(vectors)), "kind": index.kind, "dim": index.dim}
    if index.kind == "ivf" and queries is not None:
        if progress is not None:
            progress("tune IVF nprobe", 0, 1)
        report.update(tune_nprobe(index, queries, config.k, config.max_knn_error))
    return index, report


TUNING_QUERIES = 2000


def tune_nprobe(index: KnnIndex, queries, k: int, max_error: float) -> dict:
    """Tune the IVF ``nprobe`` on up to ``TUNING_QUERIES`` usable rows of ``queries`` (a fixed
    sample, so a refit on the same data gives the same profile): :meth:`KnnIndex.tune_nprobe`.
    Approximate search errs most on the rows that matter (PERF-NOTES: it overestimates OOD
    distances), so the error is measured against an exact search, not assumed."""
    queries = np.asarray(queries.detach().cpu() if isinstance(queries, torch.Tensor) else queries, dtype=np.float32)
    queries = queries[usable_rows(queries)]
    if len(queries) > TUNING_QUERIES:
        queries = queries[np.random.default_rng(0).choice(len(queries), TUNING_QUERIES, replace=False)]
    if len(queries) == 0:
        return {"nprobe": index.nprobe, "nlist": index.nlist, "knn_error": float("nan")}
    return index.tune_nprobe(queries, k, max_error)
