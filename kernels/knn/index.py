"""The reference bank as an index built once and searched many times.

:class:`KnnIndex` normalises its vectors once (at build and add), refuses rows that cannot be
normalised, and keeps the unit vectors once, as **float32 on the host** in one C-contiguous
[N, D] array: FAISS's CPU kernels and the IVF scan need float32, and a stored copy (written by
:mod:`hitl_triage.engine.bank` from :meth:`KnnIndex.to_arrays`) is exact and can be memory-mapped
back in (:meth:`KnnIndex.from_arrays`). Two kinds:

- ``"flat"``: the vectors in id order, searched exactly (FAISS's brute-force inner-product
  kernel, the code ``IndexFlatIP.search`` runs, directly on this array: no second copy).
- ``"ivf"``: an inverted file. Spherical k-means (FAISS) splits the vectors into ``nlist`` lists;
  they are stored list after list, with ``row_ids`` mapping each stored row to its id, and a query
  scans the ``nprobe`` lists with the nearest centroids. On the CPU the "ivf" backend scans them
  with the batched kernel of :mod:`.ivf_cpu` (exact float32 inner products within the probed
  lists; at the same lists and nprobe 1.5-2x faster than FAISS's IndexIVFFlat at 20k vectors,
  3-3.5x at 100k, 4.5-5.5x at 1M, two threads); every other backend ("faiss" included) searches
  all stored vectors exactly. Memory: the vectors once plus 8 bytes per vector of row ids
  and the centroids: 1M x 128 takes 520 MB (FAISS's IndexIVFFlat beside the vectors took 1 GB).

On demand, one **float16** copy per GPU serves the exact GPU search (``triton``, ``torch`` and
FAISS-GPU): half the device memory and bandwidth, and the operand type the tensor cores take.
Unit-vector components rounded to float16 move a cosine by at most 2 * 2**-11 (about 1e-3).

Ids are the order of insertion (0 .. ntotal-1) whatever the storage order: backends search the
stored rows (:meth:`KnnIndex.host_unit`, :meth:`KnnIndex.unit_on`) and
:func:`~hitl_triage.kernels.knn.knn_search` maps rows to ids (:meth:`KnnIndex.rows_to_ids`).
"""

from __future__ import annotations

import logging
import math
from typing import cast

import numpy as np
import torch

from .._arrays import as_tensor
from .exact import Prefilter, build_prefilter, no_head
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
    """Arrays copied to a device (in a dtype), and the pre-filter, made on first use and kept."""

    def __init__(self):
        self._copies: dict[tuple, torch.Tensor] = {}
        self._prefilter: Prefilter | None = None

    def get(self, key, make) -> torch.Tensor:
        if key not in self._copies:
            self._copies[key] = make()
        return self._copies[key]

    def prefilter(self, make) -> Prefilter:
        if self._prefilter is None:
            self._prefilter = make()
        return self._prefilter

    def clear(self) -> None:
        self._copies.clear()
        self._prefilter = None


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

    def prefilter(self) -> Prefilter:
        """No projected head for a bank searched once: every vector is checked by its dot product."""
        return self._copies.prefilter(lambda: no_head(self.host_unit()))

    def rows_to_ids(self, rows: torch.Tensor) -> torch.Tensor:
        return rows


class KnnIndex:
    """A reference bank of L2-normalised vectors, built once, searched many times.

    Build with :meth:`build`, grow with :meth:`add`, search with :meth:`search` or
    :func:`~hitl_triage.kernels.knn.knn_search`; :meth:`to_arrays` / :meth:`from_arrays` hand its
    state out and back (the engine stores banks: :mod:`hitl_triage.engine.bank`). Ids are the
    order of insertion (0 .. ntotal-1), across builds, adds and a store / load. Not thread-safe for
    concurrent ``add`` and search.
    """

    def __init__(self, stored: np.ndarray, kind: str, *, size: int | None = None, lists: IvfLists | None = None,
                 row_ids: np.ndarray | None = None, nprobe: int | None = None, mapped: bool = False):
        """Internal: use :meth:`build` or :meth:`from_arrays`. ``stored`` holds the unit vectors in
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

    # ------------------------------------------------------------------ arrays in, arrays out

    @classmethod
    def from_arrays(cls, vectors: np.ndarray, *, row_ids: np.ndarray | None = None,
                    centroids: np.ndarray | None = None, offsets: np.ndarray | None = None,
                    nprobe: int | None = None) -> "KnnIndex":
        """An index over arrays that already hold its state, as :meth:`to_arrays` returns them
        (how a stored bank is built back: :func:`hitl_triage.engine.bank.load_bank`). Nothing is
        copied or normalised again: a memory map stays mapped, and is copied into memory by the
        first :meth:`add`.

        Args:
            vectors: float32 [N, D] unit rows, C-contiguous, in storage order (id order for a
                flat index, list after list for IVF).
            row_ids, centroids, offsets, nprobe: all four for an IVF index, none for a flat one:
                int64 [N] the id of each stored row, float32 [nlist, D] unit centroids, int64
                [nlist + 1] where each list starts (0 .. N, non-decreasing), and the lists probed
                per query (1 <= nprobe <= nlist).
        """
        if not isinstance(vectors, np.ndarray) or vectors.dtype != np.float32 or vectors.ndim != 2 \
                or not vectors.flags.c_contiguous or vectors.shape[1] < 1:
            found = f"{vectors.dtype} {vectors.shape}" if isinstance(vectors, np.ndarray) else type(vectors).__name__
            raise ValueError(f"vectors: expected a C-contiguous float32 array [N, D], found {found}")
        mapped = isinstance(vectors, np.memmap) or isinstance(vectors.base, np.memmap)
        ivf = (row_ids, centroids, offsets, nprobe)
        if all(a is None for a in ivf):
            return cls(vectors, "flat", mapped=mapped)
        if any(a is None for a in ivf):
            missing = [name for name, a in zip(("row_ids", "centroids", "offsets", "nprobe"), ivf) if a is None]
            raise ValueError(f"{', '.join(missing)}: an IVF index needs row_ids, centroids, offsets and nprobe, "
                             f"found {', '.join(missing)} missing")
        n, dim = vectors.shape
        if not isinstance(row_ids, np.ndarray) or row_ids.dtype != np.int64 or row_ids.shape != (n,):
            raise ValueError(f"row_ids: expected int64 ({n},), found {_describe(row_ids)}")
        if not isinstance(centroids, np.ndarray) or centroids.dtype != np.float32 or centroids.ndim != 2 \
                or centroids.shape[1] != dim or not 1 <= centroids.shape[0] <= max(n, 1):
            raise ValueError(f"centroids: expected float32 [nlist, {dim}] with 1 <= nlist <= {n}, found {_describe(centroids)}")
        nlist = centroids.shape[0]
        if not isinstance(offsets, np.ndarray) or offsets.dtype != np.int64 or offsets.shape != (nlist + 1,):
            raise ValueError(f"offsets: expected int64 ({nlist + 1},), found {_describe(offsets)}")
        if offsets[0] != 0 or offsets[-1] != n or np.any(np.diff(offsets) < 0):
            raise ValueError(f"offsets: expected non-decreasing offsets from 0 to {n}, found {offsets[0]} .. {offsets[-1]}")
        return cls(vectors, "ivf", lists=IvfLists(centroids, offsets), row_ids=row_ids,
                   nprobe=_check_nprobe(nprobe, nlist), mapped=mapped)

    def to_arrays(self) -> dict[str, np.ndarray]:
        """The arrays :meth:`from_arrays` takes back (without ``nprobe``): "vectors" (float32
        unit rows in storage order, a view) and, for IVF, "row_ids", "centroids", "offsets"."""
        arrays = {"vectors": self.host_unit()}
        if self._lists is not None:
            assert self._row_ids is not None  # an IVF index has lists and row ids
            arrays.update(row_ids=self._row_ids, centroids=self._lists.centroids, offsets=self._lists.offsets)
        return arrays

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
        may probe more (see :meth:`search_nprobe`). The engine tunes it at fit time
        (:func:`hitl_triage.engine.bank.tune_nprobe`)."""
        return self._nprobe

    @nprobe.setter
    def nprobe(self, value: int) -> None:
        if self._kind != "ivf":
            raise ValueError(f"nprobe: only meaningful for kind='ivf', found kind={self._kind!r}")
        self._nprobe = _check_nprobe(value, cast(int, self.nlist))  # kind='ivf': nlist is set

    def search_nprobe(self, k: int) -> int | None:
        """Lists an IVF search for ``k`` neighbours probes: ``nprobe``, raised so that about
        :data:`MIN_SCANNED_PER_NEIGHBOUR` * k vectors are scanned (None for flat)."""
        if self._kind != "ivf":
            return None
        nlist, nprobe = self.nlist, self._nprobe
        assert nlist is not None and nprobe is not None  # both set for kind='ivf'
        floor = math.ceil(MIN_SCANNED_PER_NEIGHBOUR * k * nlist / max(self._size, 1))
        return min(nlist, max(nprobe, floor))

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
            assert self._row_ids is not None  # an IVF index has lists and row ids
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

    def prefilter(self) -> Prefilter:
        """Internal: the pre-filter of the exact re-scoring (:func:`~.exact.build_prefilter`),
        made on first use (about 1 s at 1M x 128) and kept until the next :meth:`add`."""
        return self._copies.prefilter(lambda: build_prefilter(self.host_unit()))


def _check_nprobe(nprobe, nlist: int) -> int:
    if isinstance(nprobe, bool) or not isinstance(nprobe, (int, np.integer)) or not 1 <= nprobe <= nlist:
        raise ValueError(f"nprobe: expected an integer in [1, nlist={nlist}], found {nprobe!r}")
    return int(nprobe)


def _describe(a) -> str:
    return f"{a.dtype} {a.shape}" if isinstance(a, np.ndarray) else type(a).__name__
