"""The k-NN reference bank of in-distribution embeddings (built at fit time, grown by feedback):
building it (:func:`build_bank`), tuning an IVF bank's ``nprobe`` (:func:`tune_nprobe`), and
storing it (:func:`save_bank`, :func:`load_bank`). The index and its search are
:mod:`hitl_triage.kernels.knn`'s; this module decides what is built, tuned and stored.

Vectors that cannot be normalised (zero norm, NaN or inf) are dropped and counted rather than
refusing a million-row bank for a handful of bad rows; the count is in the fit report.

Stored layout (a directory), format version 2: ``meta.json`` (format, version, kind, dim, ntotal,
nlist, nprobe), ``vectors.npy`` (float32 unit rows in storage order) and, for IVF,
``row_ids.npy``, ``centroids.npy``, ``offsets.npy`` (:meth:`KnnIndex.to_arrays`). Version 1
directories (IVF as a FAISS ``ivf.faiss`` file beside id-ordered vectors) still load: their lists
are read from the FAISS file.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from hitl_triage.kernels.knn import KnnIndex, knn_distance

from .config import BankConfig
from .decode import BatchError

logger = logging.getLogger(__name__)


def bank_vectors(bank) -> np.ndarray:
    """float32 [N, D] from an Arrow table/batch with an ``embedding`` column, or an array."""
    if isinstance(bank, (pa.Table, pa.RecordBatch)):
        if "embedding" not in bank.schema.names:
            raise BatchError(f"embedding: expected an 'embedding' column in the bank, found columns {bank.schema.names}")
        from .decode import decode_embedding

        decoded, missing = decode_embedding(bank.column("embedding"))
        vectors = np.asarray(decoded)
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
#: Hard tuning rows per calibration row: midpoints of random pairs of calibration embeddings.
HARD_SHARE = 0.5


def hard_rows(queries: np.ndarray, share: float = HARD_SHARE, seed: int = 1) -> np.ndarray:
    """Rows between the in-distribution ones, float32 [round(share * n), D]: the (unnormalised)
    midpoints of random pairs of ``queries`` (unit rows), mostly of two different classes, so
    they lie between the clusters as unseen classes and drifted inputs do (pairs that cancel are
    dropped). A fixed seed: a refit on the same data gives the same profile.

    Why: the IVF scan errs most on such rows (their neighbours are spread over many lists), and
    tuned on in-distribution calibration rows alone, the error on mixed fleet traffic ended just
    over the bound (issue 19: 0.50-0.53% against 0.5%). On the fleet simulator (100k and 20k
    vectors, k = 10) the midpoints' error was at or above the fleet's OOD rows' at every nprobe."""
    n = len(queries)
    if n < 2 or share <= 0:
        return np.empty((0, queries.shape[1]), np.float32)
    pairs = np.random.default_rng(seed).integers(0, n, (2, max(1, round(share * n))))
    mid = queries[pairs[0]].astype(np.float64) + queries[pairs[1]]
    keep = (pairs[0] != pairs[1]) & (np.linalg.norm(mid, axis=1) > 1e-3)
    return mid[keep].astype(np.float32)


def tune_nprobe(index: KnnIndex, queries, k: int, max_error: float, *, z: float = 2.0,
                hard_share: float = HARD_SHARE) -> dict:
    """Set the IVF ``nprobe`` of ``index`` to the smallest value whose mean relative error of the
    k-th distance, measured against an exact search of the same vectors, is at most ``max_error``
    both on ``queries`` (in-distribution embeddings not in the bank, [n, D]) and on hard rows
    made from them (:func:`hard_rows`, ``hard_share`` of their number; 0 leaves them out);
    returns {"nprobe", "nlist", "knn_error" (the mean on ``queries``), "knn_error_hard" (on the
    hard rows), "knn_error_bound" (the larger upper limit of the two), "knn_error_max",
    "evaluations"} (only the first three, with a NaN error, when no row of ``queries`` is usable).

    Up to :data:`TUNING_QUERIES` usable rows are used (a fixed sample, so a refit on the same
    data gives the same profile). Approximate search errs most on the rows that matter
    (PERF-NOTES: it overestimates OOD distances), so the error is measured, not assumed, on
    traffic that includes hard rows. (The anomaly *decisions* are exact whatever nprobe:
    :func:`~hitl_triage.kernels.knn.knn_distance_certified`; nprobe sets the cost and the
    accuracy of the distances reported below the threshold.)

    The mean is an estimate from n queries: what must stay within ``max_error`` is its upper
    confidence limit, mean + z * standard error (z = 2: about 97.7% one-sided), so that new data
    of the same kind stays within the bound too. (Tuned on the plain mean, 2,000 calibration rows
    gave 0.994% and the fleet's 10,000 rows 1.02% at 100k vectors.)

    The error can only fall as nprobe grows (the lists probed at nprobe are among those probed
    at nprobe + 1, and a search that sees more vectors never finds a farther k-th neighbour), so
    doubling from 1 and then bisecting finds the smallest passing value in about 2 log2(nprobe)
    searches; doubling alone overshoots by up to 2x in cost. The floor of
    :meth:`KnnIndex.search_nprobe` still applies to every search.
    """
    if index.kind != "ivf":
        raise ValueError(f"kind: tune_nprobe needs kind='ivf', found {index.kind!r}")
    if not 0 <= max_error:
        raise ValueError(f"max_error: expected a non-negative number, found {max_error!r}")
    queries = np.asarray(queries.detach().cpu() if isinstance(queries, torch.Tensor) else queries, dtype=np.float32)
    queries = queries[usable_rows(queries)]
    if len(queries) > TUNING_QUERIES:
        queries = queries[np.random.default_rng(0).choice(len(queries), TUNING_QUERIES, replace=False)]
    if len(queries) == 0:
        return {"nprobe": index.nprobe, "nlist": index.nlist, "knn_error": float("nan")}
    unit = queries / np.linalg.norm(queries.astype(np.float64), axis=1, keepdims=True).astype(np.float32)
    sets = [queries, hard_rows(unit, hard_share)]
    sets = [rows for rows in sets if len(rows)]
    exact = [np.asarray(knn_distance(rows, index, k, backend="torch"), np.float64) for rows in sets]
    stats: dict[int, list[tuple[float, float, float]]] = {}

    def bound_at(nprobe: int) -> float:
        if nprobe not in stats:
            index.nprobe = nprobe
            stats[nprobe] = [knn_error(np.asarray(knn_distance(rows, index, k, backend="ivf"), np.float64), ex, z)
                             for rows, ex in zip(sets, exact)]
        return max(bound for _, bound, _ in stats[nprobe])

    nlist = index.nlist
    assert nlist is not None  # kind='ivf' (checked above)
    high = smallest_nprobe(bound_at, nlist, max_error)
    index.nprobe = high
    bound = bound_at(high)
    mean, _, worst = stats[high][0]
    hard = stats[high][1][0] if len(stats[high]) > 1 else float("nan")
    logger.info("IVF nprobe %d of %d lists: k-th distance error %.4f on calibration rows, %.4f on hard rows "
                "(bound %.4f, max %.3f; k=%d, %d + %d queries, %d searches)", high, nlist, mean, hard, bound, worst, k,
                len(sets[0]), len(sets[1]) if len(sets) > 1 else 0, len(stats))
    return {"nprobe": high, "nlist": nlist, "knn_error": mean, "knn_error_hard": hard, "knn_error_bound": bound,
            "knn_error_max": worst, "evaluations": len(stats)}


def smallest_nprobe(bound_at, nlist: int, max_error: float) -> int:
    """The smallest nprobe in [1, nlist] with ``bound_at(nprobe) <= max_error`` (nlist if none),
    for a bound that falls as nprobe grows: doubling from 1, then bisecting."""
    low, high = 0, 1  # bound_at(low) > max_error (0: nothing probed), bound_at(high) to test
    while high < nlist and bound_at(high) > max_error:
        low, high = high, min(nlist, 2 * high)
    while high - low > 1:
        middle = (low + high) // 2
        if bound_at(middle) <= max_error:
            high = middle
        else:
            low = middle
    return high


def knn_error(approx: np.ndarray, exact: np.ndarray, z: float = 2.0) -> tuple[float, float, float]:
    """(mean, mean + z * standard error, max) of the relative error of ``approx`` on the rows
    where ``exact`` is finite; zeros when there are none."""
    usable = np.isfinite(exact)
    rel = np.abs(approx[usable] - exact[usable]) / np.maximum(exact[usable], 1e-6)
    if rel.size == 0:
        return 0.0, 0.0, 0.0
    return float(rel.mean()), float(rel.mean()) + z * float(rel.std()) / math.sqrt(rel.size), float(rel.max())


# ---------------------------------------------------------------------------------------------
# The stored bank

FORMAT_NAME = "hitl-triage-knn-index"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
KINDS = ("flat", "ivf")
IVF_FILES = ("row_ids.npy", "centroids.npy", "offsets.npy")


def save_bank(index: KnnIndex, directory) -> Path:
    """Write ``index`` to ``directory`` (created if missing) in format version 2; returns its path.

    Files are written under temporary names and renamed into place, and ``meta.json`` last, so a
    reader never sees a half-written bank. Files of another kind (IVF files when saving a flat
    bank, a version 1 ``ivf.faiss``) are removed.
    """
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    arrays = index.to_arrays()
    _replace_with(path / "vectors.npy", lambda tmp: _save_npy(tmp, arrays["vectors"]))
    if index.kind == "ivf":
        for name in IVF_FILES:
            array = arrays[name.removesuffix(".npy")]
            _replace_with(path / name, lambda tmp, array=array: _save_npy(tmp, np.asarray(array)))
    stale = ("ivf.faiss",) + (() if index.kind == "ivf" else IVF_FILES)  # ivf.faiss: version 1
    for name in stale:
        if (path / name).exists():
            (path / name).unlink()
    meta = {
        "format": FORMAT_NAME, "version": FORMAT_VERSION, "kind": index.kind, "dim": index.dim,
        "ntotal": index.ntotal, "nlist": index.nlist, "nprobe": index.nprobe,
        "dtype": "float32", "normalised": True,
    }
    _replace_with(path / "meta.json", lambda tmp: tmp.write_text(json.dumps(meta, indent=2) + "\n"))
    return path


def load_bank(directory, mmap: bool = True) -> KnnIndex:
    """Read a bank written by :func:`save_bank` (format version 2) or by earlier releases (1).

    With ``mmap`` the vectors (and an IVF bank's row ids) are memory-mapped read-only: opening is
    instant, pages are read as searches touch them and shared between processes; the first
    :meth:`KnnIndex.add` copies them into memory. A version 1 IVF directory is converted on
    loading (its vectors are re-ordered in memory; save it again to map it next time).
    """
    path = Path(directory)
    meta_path = path / "meta.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"directory: expected a saved KnnIndex with {meta_path}, found no such file")
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != FORMAT_NAME or meta.get("version") not in READABLE_VERSIONS:
        raise ValueError(
            f"{meta_path}: expected format {FORMAT_NAME!r} version {' or '.join(map(str, READABLE_VERSIONS))}, "
            f"found {meta.get('format')!r} version {meta.get('version')!r}"
        )
    if meta.get("kind") not in KINDS:
        raise ValueError(f"{meta_path}: expected kind 'flat' or 'ivf', found {meta.get('kind')!r}")
    mode = "r" if mmap else None
    expected = (meta["ntotal"], meta["dim"])
    stored = _load_npy(path / "vectors.npy", mode, np.float32, expected)
    if meta["kind"] == "flat":
        return KnnIndex.from_arrays(stored)
    if meta["version"] == 1:
        return _load_version_1_ivf(path, np.asarray(stored), meta)
    nlist = meta.get("nlist")
    if isinstance(nlist, bool) or not isinstance(nlist, int) or not 1 <= nlist <= expected[0]:
        raise ValueError(f"{meta_path}: expected nlist an integer in [1, ntotal={expected[0]}], found {nlist!r}")
    row_ids = _load_npy(path / "row_ids.npy", mode, np.int64, (expected[0],))
    centroids = _load_npy(path / "centroids.npy", None, np.float32, (nlist, expected[1]))
    offsets = _load_npy(path / "offsets.npy", None, np.int64, (nlist + 1,))
    if offsets[0] != 0 or offsets[-1] != expected[0] or np.any(np.diff(offsets) < 0):
        raise ValueError(
            f"{path / 'offsets.npy'}: expected non-decreasing offsets from 0 to {expected[0]}, "
            f"found {offsets[0]} .. {offsets[-1]}"
        )
    return KnnIndex.from_arrays(stored, row_ids=row_ids, centroids=centroids, offsets=offsets,
                                nprobe=_stored_nprobe(meta.get("nprobe"), nlist, meta_path))


def _load_version_1_ivf(path: Path, vectors: np.ndarray, meta: dict) -> KnnIndex:
    """A version 1 IVF directory: id-ordered vectors beside a FAISS IndexIVFFlat."""
    from hitl_triage.kernels.knn.faiss_cpu import faiss_module
    from hitl_triage.kernels.knn.ivf_cpu import group_by_list

    faiss = faiss_module()
    index = faiss.read_index(str(path / "ivf.faiss"))
    if (index.ntotal, index.d) != vectors.shape:
        raise ValueError(
            f"{path / 'ivf.faiss'}: expected {vectors.shape[0]} vectors of D={vectors.shape[1]}, "
            f"found {index.ntotal} of D={index.d}"
        )
    ivf = faiss.extract_index_ivf(index)
    centroids = ivf.quantizer.reconstruct_n(0, ivf.nlist)
    assignment = np.empty(vectors.shape[0], dtype=np.int64)
    for lst in range(ivf.nlist):
        size = ivf.invlists.list_size(lst)
        if size:
            assignment[faiss.rev_swig_ptr(ivf.invlists.get_ids(lst), size)] = lst
    order, offsets = group_by_list(assignment, ivf.nlist)
    logger.info("converted a version 1 IVF index (%d vectors, %d lists) from %s", vectors.shape[0], ivf.nlist, path)
    return KnnIndex.from_arrays(vectors[order], row_ids=order, centroids=np.ascontiguousarray(centroids, dtype=np.float32),
                                offsets=offsets, nprobe=_stored_nprobe(meta.get("nprobe"), ivf.nlist, path / "meta.json"))


def _stored_nprobe(nprobe, nlist: int, meta_path: Path) -> int:
    if isinstance(nprobe, bool) or not isinstance(nprobe, (int, np.integer)) or not 1 <= nprobe <= nlist:
        raise ValueError(f"nprobe: expected an integer in [1, nlist={nlist}], found {nprobe!r} in {meta_path}")
    return int(nprobe)


def _load_npy(path: Path, mode, dtype, shape: tuple) -> np.ndarray:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: expected a saved array, found no such file")
    array = np.load(path, mmap_mode=mode, allow_pickle=False)
    if array.dtype != dtype or array.shape != tuple(shape):
        raise ValueError(
            f"{path}: expected {np.dtype(dtype).name} {tuple(shape)}, found {array.dtype} {array.shape}"
        )
    return array


def _save_npy(path: Path, array: np.ndarray) -> None:
    # Through a file object: np.save appends ".npy" to a path that lacks it.
    with open(path, "wb") as f:
        np.save(f, array, allow_pickle=False)


def _replace_with(target: Path, write) -> None:
    """Write through ``write(tmp_path)`` and rename over ``target`` in one step."""
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()
