"""The reference bank as an index built once and searched many times.

:class:`KnnIndex` normalises its vectors once (at build and add), refuses rows that cannot be
normalised, and keeps the unit vectors once, as **float32 on the host** in one C-contiguous
[N, D] array: FAISS's CPU kernels and the IVF scan need float32, the saved file is exact and can
be memory-mapped. Two kinds:

- ``"flat"``: the vectors in id order, searched exactly (FAISS's brute-force inner-product
  kernel, the code ``IndexFlatIP.search`` runs, directly on this array: no second copy).
- ``"ivf"``: an inverted file. Spherical k-means (FAISS) splits the vectors into ``nlist`` lists;
  they are stored list after list, with ``row_ids`` mapping each stored row to its id, and a query
  scans the ``nprobe`` lists with the nearest centroids. On the CPU the "faiss" backend scans them
  with the batched kernel of :mod:`.ivf_cpu` (exact float32 inner products within the probed
  lists; at the same lists and nprobe 1.5-2x faster than FAISS's IndexIVFFlat at 20k vectors,
  3-3.5x at 100k, 4.5-5.5x at 1M, two threads); every other backend searches all stored vectors
  exactly. Memory: the vectors once plus 8 bytes per vector of row ids
  and the centroids: 1M x 128 takes 520 MB (FAISS's IndexIVFFlat beside the vectors took 1 GB).

On demand, one **float16** copy per GPU serves the exact GPU search (``triton``, ``torch`` and
FAISS-GPU): half the device memory and bandwidth, and the operand type the tensor cores take.
Unit-vector components rounded to float16 move a cosine by at most 2 * 2**-11 (about 1e-3).

Ids are the order of insertion (0 .. ntotal-1) whatever the storage order: backends search the
stored rows (:meth:`KnnIndex.host_unit`, :meth:`KnnIndex.unit_on`) and
:func:`~hitl_triage.kernels.knn.knn_search` maps rows to ids (:meth:`KnnIndex.rows_to_ids`).

Saved layout (a directory), format version 2: ``meta.json`` (format, version, kind, dim, ntotal,
nlist, nprobe), ``vectors.npy`` (float32 unit rows in storage order) and, for IVF,
``row_ids.npy``, ``centroids.npy``, ``offsets.npy``. Version 1 directories (IVF as a FAISS
``ivf.faiss`` file beside id-ordered vectors) still load: their lists are read from the FAISS file.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

import numpy as np
import torch

from .._arrays import as_tensor
from .ivf_cpu import IvfLists, assign, group_by_list, merged_order, train_centroids
from .reference import unit_rows

logger = logging.getLogger(__name__)

#: ``kind="auto"`` builds a flat (exact) index up to this many vectors and IVF beyond. On the CPU
#: the k-NN score is the costliest stage of triage. Measured on the fleet simulator (one thread,
#: nprobe tuned to <= 1% mean error of the k-th distance on calibration rows), the IVF scan
#: against FAISS's exact search: 2k vectors 1.6x (k=10) and 0.9x (k=50), 5k 1.9x / 1.1x, 10k
#: 3.1x / 1.4x, 16k 3.9x / 2.1x, 32k 4.4x / 2.0x. The GPU backends search exactly whatever the kind.
AUTO_IVF_MIN_VECTORS = 8_192

#: FAISS's k-means warns below 39 training points per centroid; nlist is capped accordingly.
MIN_POINTS_PER_LIST = 39

BANK_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

FORMAT_NAME = "hitl-triage-knn-index"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
KINDS = ("flat", "ivf")


def default_nlist(n: int) -> int:
    """Inverted lists for ``n`` vectors: the power of two nearest sqrt(n), capped so that every
    list has at least 39 training points (128 lists at 20k vectors, 256 at 100k, 1024 at 1M).

    Measured with the batched scan on the fleet simulator (one thread, the first nprobe in a
    doubling sequence that reached <= 1% mean error of the k-th distance at k = 10 and 50): from
    sqrt(n) to 8 sqrt(n) lists the cost per query stayed within 30% of the best, fewer lists
    scanned more vectors, more lists spent longer probing and training (1M vectors: 10 s to
    train 1024 lists, 45 s for 2048).
    """
    if n < MIN_POINTS_PER_LIST:
        return 1
    target = 2 ** round(math.log2(math.sqrt(n)))
    return max(1, min(target, n // MIN_POINTS_PER_LIST))


#: An IVF search probes at least enough lists to scan this many vectors per neighbour asked for
#: (on average): large k from a small bank needs more lists than the default nprobe. On 20k
#: clustered vectors (128 lists of ~156) k=50 erred by 0.85% at nprobe=8 and 0.05% at 16; the
#: floor of 64 * k vectors lifts nprobe to 21 there and leaves 100k-vector banks at the default.
MIN_SCANNED_PER_NEIGHBOUR = 64


def default_nprobe(nlist: int) -> int:
    """Lists probed per query before tuning: a sixteenth of the lists, at least 8 (all when fewer).

    The mean relative error of the k-th distance against exact search follows the probed
    fraction and the data: on the fleet simulator (mixed in-distribution and OOD queries) 1/16
    erred by 0.7-1.5%, 1/8 by 0.2-0.6% (20k-100k vectors, k = 10 and 50), and at 1M 1/32 by
    0.9-1.3%, 1/16 by 0.4-0.6%. nprobe=1 misses neighbours outright. The engine doubles nprobe
    from here until its measured error is within its bound, so this is a floor to start from.
    """
    return min(nlist, max(8, nlist // 16))


def check_bank_rows(x: torch.Tensor, field: str) -> None:
    """Refuse rows that cannot be normalised, counting them and naming the first."""
    finite = torch.isfinite(x).all(dim=1)
    nonzero = (x != 0).any(dim=1)
    bad = ~(finite & nonzero)
    n_bad = int(bad.sum())
    if n_bad:
        first = int(torch.nonzero(bad)[0, 0])
        n_nonfinite = int((~finite).sum())
        raise ValueError(
            f"{field}: expected finite vectors with a nonzero norm; found {n_bad} invalid rows "
            f"({n_nonfinite} non-finite, {n_bad - n_nonfinite} zero-norm), the first at row {first}"
        )


def as_bank_tensor(vectors, field: str, dim: int | None = None) -> torch.Tensor:
    """Validate a bank array [N, D] (numpy, torch or DLPack) and view it as a torch tensor."""
    x = as_tensor(vectors, field)
    if x.ndim != 2:
        raise ValueError(f"{field}: expected shape [N, D], found {tuple(x.shape)}")
    if x.dtype not in BANK_DTYPES:
        raise TypeError(f"{field}: expected float16, bfloat16, float32 or float64, found {x.dtype}")
    if x.shape[1] < 1:
        raise ValueError(f"{field}: expected at least 1 dimension, found D={x.shape[1]}")
    if dim is not None and x.shape[1] != dim:
        raise ValueError(f"{field}: expected D={dim} (the index's dimension), found D={x.shape[1]}")
    check_bank_rows(x, field)
    return x


def _unit_host(x: torch.Tensor) -> np.ndarray:
    """float32 unit rows on the host, C-contiguous and owned."""
    return np.ascontiguousarray(unit_rows(x, torch.float32).cpu().numpy())


class _DeviceCopies:
    """Arrays copied to a device (in a dtype), made on first use and kept."""

    def __init__(self):
        self._copies: dict[tuple, torch.Tensor] = {}

    def get(self, key, make) -> torch.Tensor:
        if key not in self._copies:
            self._copies[key] = make()
        return self._copies[key]

    def clear(self) -> None:
        self._copies.clear()


class RawBank:
    """A bank passed as a plain array: validated and normalised for one call, searched exactly."""

    kind = "flat"
    lists = None
    nprobe = None

    def __init__(self, vectors):
        self._raw = as_bank_tensor(vectors, "bank")
        self._copies = _DeviceCopies()

    @property
    def ntotal(self) -> int:
        return self._raw.shape[0]

    @property
    def dim(self) -> int:
        return self._raw.shape[1]

    @property
    def device(self) -> torch.device:
        return self._raw.device

    def host_unit(self) -> np.ndarray:
        return self._copies.get(("host", torch.float32), lambda: _unit_host(self._raw))

    def unit_on(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        def make():
            return unit_rows(self._raw, torch.float32).to(device=device, dtype=dtype).contiguous()

        return self._copies.get((str(device), dtype), make)

    def reference_vectors(self, device: torch.device) -> torch.Tensor:
        return self._raw.to(device)

    def rows_to_ids(self, rows: torch.Tensor) -> torch.Tensor:
        return rows


class KnnIndex:
    """A reference bank of L2-normalised vectors, built once, searched many times.

    Build with :meth:`build`, grow with :meth:`add`, persist with :meth:`save` / :meth:`load`,
    search with :meth:`search` or :func:`~hitl_triage.kernels.knn.knn_search`. Ids are the order
    of insertion (0 .. ntotal-1), across builds, adds and save/load. Not thread-safe for
    concurrent ``add`` and search.
    """

    def __init__(self, stored: np.ndarray, kind: str, *, size: int | None = None, lists: IvfLists | None = None,
                 row_ids: np.ndarray | None = None, nprobe: int | None = None, mapped: bool = False):
        """Internal: use :meth:`build` or :meth:`load`. ``stored`` holds the unit vectors in
        storage order (its first ``size`` rows; a flat index keeps spare capacity for adds)."""
        self._stored = stored
        self._size = stored.shape[0] if size is None else size
        self._kind = kind
        self._lists = lists
        self._row_ids = row_ids
        self._nprobe = nprobe
        self._mapped = mapped
        self._copies = _DeviceCopies()

    # ------------------------------------------------------------------ construction

    @classmethod
    def build(cls, vectors, kind: str = "auto", nlist: int | None = None,
              nprobe: int | None = None) -> "KnnIndex":
        """Normalise ``vectors`` [N, D] (any float dtype, numpy / torch / DLPack) and index them.

        Args:
            kind: "flat" (exact), "ivf" (inverted file, see the module docstring) or "auto": flat
                up to :data:`AUTO_IVF_MIN_VECTORS` vectors, IVF beyond.
            nlist: IVF inverted lists (default :func:`default_nlist`); at most N / 39.
            nprobe: IVF lists probed per query (default :func:`default_nprobe`); changeable later
                through the ``nprobe`` property.

        Raises ValueError when a row is non-finite or all zero (counted, the first row named).
        Building IVF trains spherical k-means on at most 2**18 of the vectors and files every
        vector under its nearest centroid: about 2 s at 100k x 128 and 10 s at 1M x 128 with
        1024 lists on two cores.
        """
        x = as_bank_tensor(vectors, "vectors")
        n, dim = x.shape
        if kind not in ("auto",) + KINDS:
            raise ValueError(f"kind: expected 'auto', 'flat' or 'ivf', found {kind!r}")
        if kind == "auto":
            kind = "ivf" if n > AUTO_IVF_MIN_VECTORS else "flat"
        unit = _unit_host(x)
        if kind == "flat":
            if nlist is not None or nprobe is not None:
                raise ValueError(
                    f"nlist/nprobe: only meaningful for kind='ivf', found nlist={nlist}, "
                    f"nprobe={nprobe} with kind='flat'"
                )
            return cls(unit, "flat")
        max_nlist = n // MIN_POINTS_PER_LIST
        if max_nlist < 1:
            raise ValueError(
                f"vectors: kind='ivf' needs at least {MIN_POINTS_PER_LIST} vectors to train its "
                f"lists, found N={n}"
            )
        if nlist is None:
            nlist = default_nlist(n)
        if isinstance(nlist, bool) or not isinstance(nlist, (int, np.integer)) or not 1 <= nlist <= max_nlist:
            raise ValueError(
                f"nlist: expected an integer in [1, {max_nlist}] (N / {MIN_POINTS_PER_LIST} for "
                f"N={n}: FAISS's k-means needs {MIN_POINTS_PER_LIST} training points per list), "
                f"found {nlist!r}"
            )
        nlist = int(nlist)
        nprobe = default_nprobe(nlist) if nprobe is None else _check_nprobe(nprobe, nlist)
        centroids = train_centroids(unit, nlist)
        order, offsets = group_by_list(assign(unit, centroids), nlist)
        stored = unit[order]
        del unit
        logger.info("built an IVF index: %d vectors, D=%d, nlist=%d, nprobe=%d", n, dim, nlist, nprobe)
        return cls(stored, "ivf", lists=IvfLists(centroids, offsets), row_ids=order, nprobe=nprobe)

    def add(self, vectors) -> np.ndarray:
        """Normalise and append ``vectors`` [M, D]; returns their ids (int64 [M]).

        A flat index grows its array by doubling (amortised O(M) per call). An IVF index files
        the new vectors under its existing centroids (no re-training: rebuild when the bank has
        grown several times over) and rewrites its list-ordered storage, O(N + M) per call:
        add in batches. A memory-mapped index is first copied into memory.
        """
        x = as_bank_tensor(vectors, "vectors", dim=self.dim)
        unit = _unit_host(x)
        start, m = self._size, unit.shape[0]
        if self._mapped:
            logger.info("copying a memory-mapped index (%d vectors) into memory before add()", start)
        if self._lists is None:
            self._grow(m)
            self._stored[start:start + m] = unit
        else:
            old_pos, new_pos, offsets = merged_order(self._lists.offsets, assign(unit, self._lists.centroids))
            stored = np.empty((start + m, self.dim), dtype=np.float32)
            stored[old_pos] = self._stored[:start]
            stored[new_pos] = unit
            row_ids = np.empty(start + m, dtype=np.int64)
            row_ids[old_pos] = self._row_ids
            row_ids[new_pos] = np.arange(start, start + m, dtype=np.int64)
            self._stored, self._row_ids = stored, row_ids
            self._lists = IvfLists(self._lists.centroids, offsets)
        self._size = start + m
        self._mapped = False
        self._copies.clear()
        return np.arange(start, start + m, dtype=np.int64)

    def _grow(self, extra: int) -> None:
        """Make room for ``extra`` rows, doubling the capacity so repeated adds cost O(1) each."""
        needed = self._size + extra
        if needed <= self._stored.shape[0] and not self._mapped:
            return
        capacity = needed if self._mapped else max(needed, 2 * self._stored.shape[0], 16)
        grown = np.empty((capacity, self.dim), dtype=np.float32)
        grown[: self._size] = self._stored[: self._size]
        self._stored = grown

    # ------------------------------------------------------------------ persistence

    def save(self, directory) -> Path:
        """Write the index to ``directory`` (created if missing); returns its path.

        Files are written under temporary names and renamed into place, and ``meta.json`` last,
        so a reader never sees a half-written index.
        """
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        _replace_with(path / "vectors.npy", lambda tmp: _save_npy(tmp, self.host_unit()))
        ivf_names = ("row_ids.npy", "centroids.npy", "offsets.npy")
        if self._lists is not None:
            arrays = (self._row_ids, self._lists.centroids, self._lists.offsets)
            for name, array in zip(ivf_names, arrays):
                _replace_with(path / name, lambda tmp, array=array: _save_npy(tmp, np.asarray(array)))
        stale = ("ivf.faiss",) + (() if self._lists is not None else ivf_names)  # ivf.faiss: version 1
        for name in stale:
            if (path / name).exists():
                (path / name).unlink()
        meta = {
            "format": FORMAT_NAME, "version": FORMAT_VERSION, "kind": self.kind, "dim": self.dim,
            "ntotal": self.ntotal, "nlist": self.nlist, "nprobe": self._nprobe,
            "dtype": "float32", "normalised": True,
        }
        _replace_with(path / "meta.json", lambda tmp: tmp.write_text(json.dumps(meta, indent=2) + "\n"))
        return path

    @classmethod
    def load(cls, directory, mmap: bool = True) -> "KnnIndex":
        """Read an index written by :meth:`save`.

        With ``mmap`` the vectors (and an IVF index's row ids) are memory-mapped read-only:
        opening is instant, pages are read as searches touch them and shared between processes;
        the first :meth:`add` copies them into memory. A version 1 IVF directory is converted on
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
            return cls(stored, "flat", mapped=mmap)
        if meta["version"] == 1:
            return cls._from_faiss_ivf(path, np.asarray(stored), meta)
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
        return cls(stored, "ivf", lists=IvfLists(centroids, offsets), row_ids=row_ids,
                   nprobe=_check_nprobe(meta.get("nprobe"), nlist), mapped=mmap)

    @classmethod
    def _from_faiss_ivf(cls, path: Path, vectors: np.ndarray, meta: dict) -> "KnnIndex":
        """A version 1 IVF directory: id-ordered vectors beside a FAISS IndexIVFFlat."""
        from .faiss_cpu import faiss_module

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
        return cls(vectors[order], "ivf", lists=IvfLists(np.ascontiguousarray(centroids, dtype=np.float32), offsets),
                   row_ids=order, nprobe=_check_nprobe(meta.get("nprobe"), ivf.nlist))

    # ------------------------------------------------------------------ properties

    @property
    def ntotal(self) -> int:
        """Number of vectors in the bank."""
        return self._size

    @property
    def dim(self) -> int:
        """Dimension D of the vectors."""
        return self._stored.shape[1]

    @property
    def kind(self) -> str:
        """"flat" or "ivf"."""
        return self._kind

    @property
    def nlist(self) -> int | None:
        """IVF inverted lists (None for flat)."""
        return None if self._lists is None else self._lists.nlist

    @property
    def nprobe(self) -> int | None:
        """IVF lists probed per query on the CPU (None for flat); a search for many neighbours
        may probe more (see :meth:`search_nprobe`). The engine tunes it at fit time."""
        return self._nprobe

    @nprobe.setter
    def nprobe(self, value: int) -> None:
        if self._kind != "ivf":
            raise ValueError(f"nprobe: only meaningful for kind='ivf', found kind={self._kind!r}")
        self._nprobe = _check_nprobe(value, self.nlist)

    def tune_nprobe(self, queries, k: int, max_error: float, *, z: float = 2.0) -> dict:
        """Set ``nprobe`` to the smallest value whose mean relative error of the k-th distance on
        ``queries`` (in-distribution embeddings not in the bank, [n, D]) is at most ``max_error``,
        measured against an exact search of the same vectors; returns {"nprobe", "nlist",
        "knn_error" (the mean), "knn_error_bound", "knn_error_max", "evaluations"}.

        The mean is an estimate from n queries: what must stay within ``max_error`` is its upper
        confidence limit, mean + z * standard error (z = 2: about 97.7% one-sided), so that new
        data of the same kind stays within the bound too. (Tuned on the plain mean, 2,000
        calibration rows gave 0.994% and the fleet's 10,000 rows 1.02% at 100k vectors.)

        The error can only fall as nprobe grows (the lists probed at nprobe are among those probed
        at nprobe + 1, and a search that sees more vectors never finds a farther k-th neighbour),
        so doubling from 1 and then bisecting finds the smallest passing value in about
        2 log2(nprobe) searches; doubling alone overshoots by up to 2x in cost. The floor of
        :meth:`search_nprobe` still applies to every search.
        """
        from . import knn_distance

        if self._kind != "ivf":
            raise ValueError(f"kind: tune_nprobe needs kind='ivf', found {self._kind!r}")
        if not 0 <= max_error:
            raise ValueError(f"max_error: expected a non-negative number, found {max_error!r}")
        exact = np.asarray(knn_distance(queries, self, k, backend="torch"), np.float64)
        usable = np.isfinite(exact)
        stats: dict[int, tuple[float, float, float]] = {}

        def bound_at(nprobe: int) -> float:
            if nprobe not in stats:
                self._nprobe = nprobe
                approx = np.asarray(knn_distance(queries, self, k, backend="faiss"), np.float64)
                rel = np.abs(approx[usable] - exact[usable]) / np.maximum(exact[usable], 1e-6)
                if rel.size == 0:
                    stats[nprobe] = (0.0, 0.0, 0.0)
                else:
                    spread = z * float(rel.std()) / math.sqrt(rel.size)
                    stats[nprobe] = (float(rel.mean()), float(rel.mean()) + spread, float(rel.max()))
            return stats[nprobe][1]

        low, high = 0, 1  # bound_at(low) > max_error (0: nothing probed), bound_at(high) to test
        while high < self.nlist and bound_at(high) > max_error:
            low, high = high, min(self.nlist, 2 * high)
        while high - low > 1:
            middle = (low + high) // 2
            if bound_at(middle) <= max_error:
                high = middle
            else:
                low = middle
        self._nprobe = high
        bound_at(high)
        mean, bound, worst = stats[high]
        logger.info("IVF nprobe %d of %d lists: k-th distance error %.4f (bound %.4f, max %.3f; k=%d, %d queries, "
                    "%d searches)", high, self.nlist, mean, bound, worst, k, int(usable.sum()), len(stats))
        return {"nprobe": high, "nlist": self.nlist, "knn_error": mean, "knn_error_bound": bound,
                "knn_error_max": worst, "evaluations": len(stats)}

    def search_nprobe(self, k: int) -> int | None:
        """Lists an IVF search for ``k`` neighbours probes: ``nprobe``, raised so that about
        :data:`MIN_SCANNED_PER_NEIGHBOUR` * k vectors are scanned (None for flat)."""
        if self._kind != "ivf":
            return None
        floor = math.ceil(MIN_SCANNED_PER_NEIGHBOUR * k * self.nlist / max(self._size, 1))
        return min(self.nlist, max(self._nprobe, floor))

    @property
    def lists(self) -> IvfLists | None:
        """The IVF lists (centroids and offsets into the stored rows), None for flat."""
        return self._lists

    @property
    def vectors(self) -> np.ndarray:
        """The unit vectors in id order, float32 [ntotal, D], read-only: a view for a flat index,
        a copy (ordered by id) for an IVF index, which stores them list after list."""
        if self._row_ids is None:
            view = self._stored[: self._size].view()
        else:
            view = np.empty((self._size, self.dim), dtype=np.float32)
            view[self._row_ids] = self._stored
        view.flags.writeable = False
        return view

    @property
    def nbytes(self) -> int:
        """Host memory the index holds: vectors, row ids, centroids and offsets (bytes)."""
        total = self._size * self.dim * 4
        if self._lists is not None:
            total += self._row_ids.nbytes + self._lists.centroids.nbytes + self._lists.offsets.nbytes
        return total

    def __repr__(self) -> str:
        extra = f", nlist={self.nlist}, nprobe={self._nprobe}" if self._kind == "ivf" else ""
        return f"KnnIndex(kind={self._kind!r}, ntotal={self.ntotal}, dim={self.dim}{extra})"

    # ------------------------------------------------------------------ search

    def search(self, queries, k: int, *, backend: str | None = None):
        """Same as ``knn_search(queries, self, k, backend=backend)``."""
        from . import knn_search

        return knn_search(queries, self, k, backend=backend)

    def host_unit(self) -> np.ndarray:
        """Internal: the float32 unit vectors in storage order, C-contiguous [ntotal, D] (what the
        backends search; map the rows they find with :meth:`rows_to_ids`)."""
        return self._stored[: self._size]

    def rows_to_ids(self, rows: torch.Tensor) -> torch.Tensor:
        """Internal: ids of stored rows (int64 tensor, any device; -1 stays -1)."""
        if self._row_ids is None:
            return rows
        table = self._copies.get(("row_ids", str(rows.device)),
                                 lambda: torch.from_numpy(np.array(self._row_ids)).to(rows.device))
        return torch.where(rows >= 0, table[rows.clamp(min=0)], rows)

    def unit_on(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """Internal: the stored unit vectors on ``device`` in ``dtype`` (host float32 is a view)."""
        device = torch.device(device)
        if device.type == "cpu" and dtype == torch.float32:
            return as_tensor(self.host_unit(), "vectors")

        def make():
            logger.info(
                "copying the bank (%d x %d) to %s as %s (%.0f MB); kept until the next add()",
                self.ntotal, self.dim, device, dtype,
                self.ntotal * self.dim * torch.finfo(dtype).bits / 8 / 1e6,
            )
            host = as_tensor(self.host_unit(), "vectors")
            return host.to(device=device, dtype=dtype).contiguous()

        return self._copies.get((str(device), dtype), make)

    def reference_vectors(self, device: torch.device) -> torch.Tensor:
        """Internal: the stored vectors for the float64 reference backend."""
        return self.unit_on(device, torch.float32)


def _check_nprobe(nprobe, nlist: int) -> int:
    if isinstance(nprobe, bool) or not isinstance(nprobe, (int, np.integer)) or not 1 <= nprobe <= nlist:
        raise ValueError(f"nprobe: expected an integer in [1, nlist={nlist}], found {nprobe!r}")
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
