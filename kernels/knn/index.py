"""The reference bank as an index built once and searched many times.

:class:`KnnIndex` normalises its vectors once (at build and add), refuses rows that cannot be
normalised, and keeps:

- the unit vectors as **float32 on the host**, one C-contiguous [N, D] array. FAISS's CPU kernels
  need float32, the saved file is exact, and the exact re-search of IVF misses reads it. A flat
  index is exactly this array, searched with FAISS's brute-force inner-product kernel (the code
  ``IndexFlatIP.search`` runs) rather than a copy inside an ``IndexFlatIP``: one copy in memory,
  memory-mappable by numpy, and no views into FAISS-owned storage that an ``add`` could free.
- for ``kind="ivf"``, a FAISS ``IndexIVFFlat`` (inner product, spherical k-means centroids) over
  the same vectors, for the CPU. It holds a second copy of the vectors in its inverted lists, so
  an IVF bank takes twice the host memory of a flat one (1M x 128: 2 x 512 MB).
- on demand, one **float16** copy per GPU for the exact GPU search (``triton``, ``torch`` and
  FAISS-GPU): half the device memory and bandwidth, and the operand type the tensor cores take.
  Unit-vector components rounded to float16 move a cosine by at most 2 * 2**-11 (about 1e-3).

Search any index with :func:`hitl_triage.kernels.knn.knn_search` (or :meth:`KnnIndex.search`).
An IVF index is approximate only on the CPU "faiss" backend; the other backends search its
stored vectors exactly.

Saved layout (a directory): ``meta.json`` (format, version, kind, dim, ntotal, nlist, nprobe),
``vectors.npy`` (float32 unit rows) and, for IVF, ``ivf.faiss`` (FAISS's own format).
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
from .reference import unit_rows

logger = logging.getLogger(__name__)

#: ``kind="auto"`` builds a flat (exact) index up to this many vectors and IVF beyond. On the CPU,
#: k-NN is by far the costliest stage of triage (exact search is a GEMM against the whole bank:
#: 0.07 s per 1000 queries at 10k vectors, 0.8 s at 100k, PERF-NOTES), and already at 20k vectors
#: IVF was 3.7x faster at a 0.5% mean error of the k-th distance (fleet simulator, nlist 128,
#: nprobe 16; measured while tuning the engine). The engine tunes ``nprobe`` at fit time to a
#: measured error bound. The GPU backends search exactly whatever the kind.
AUTO_IVF_MIN_VECTORS = 16_384

#: FAISS's k-means warns below 39 training points per centroid; nlist is capped accordingly.
MIN_POINTS_PER_LIST = 39

BANK_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

FORMAT_NAME = "hitl-triage-knn-index"
FORMAT_VERSION = 1


def default_nlist(n: int) -> int:
    """Inverted lists for ``n`` vectors: the power of two nearest sqrt(n), capped so that every
    list has at least 39 training points (256 lists at 100k vectors, 1024 at 1M).

    Measured on clustered synthetic data (100k x 128, 10 classes, 2-core CPU): 256 lists probed
    16 at a time erred by 0.3-0.5% on the k-th distance at 6x the exact speed, where 1024 lists
    needed 64 probes for the same error at half that speed, and trained 3.5x longer.
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
    """Lists probed per query: a sixteenth of the lists, at least 8 (all when fewer).

    The mean relative error of the k-th distance against exact search follows the probed
    fraction: on the data above 1/32 gave 1.0-1.5%, 1/16 0.3-0.5%, 1/8 under 0.05% (k = 5 and
    50). nprobe=1 misses neighbours outright (PERF-NOTES); raise ``nprobe`` for harder data.
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
    """Unit vectors copied to a device in a dtype, made on first use and kept."""

    def __init__(self):
        self._copies: dict[tuple[str, torch.dtype], torch.Tensor] = {}

    def get(self, key, make) -> torch.Tensor:
        if key not in self._copies:
            self._copies[key] = make()
        return self._copies[key]

    def clear(self) -> None:
        self._copies.clear()


class RawBank:
    """A bank passed as a plain array: validated and normalised for one call, searched exactly."""

    kind = "flat"
    ivf = None
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


class KnnIndex:
    """A reference bank of L2-normalised vectors, built once, searched many times.

    Build with :meth:`build`, grow with :meth:`add`, persist with :meth:`save` / :meth:`load`,
    search with :meth:`search` or :func:`~hitl_triage.kernels.knn.knn_search`. Row ids are the
    order of insertion (0 .. ntotal-1), across builds, adds and save/load. Not thread-safe for
    concurrent ``add`` and search.
    """

    def __init__(self, vectors: np.ndarray, kind: str, ivf=None, nlist: int | None = None,
                 nprobe: int | None = None, mapped: bool = False):
        """Internal: use :meth:`build` or :meth:`load`."""
        self._vectors = vectors
        self._size = vectors.shape[0]
        self._kind = kind
        self._ivf = ivf
        self._nlist = nlist
        self._nprobe = nprobe
        self._mapped = mapped
        self._copies = _DeviceCopies()

    # ------------------------------------------------------------------ construction

    @classmethod
    def build(cls, vectors, kind: str = "auto", nlist: int | None = None,
              nprobe: int | None = None) -> "KnnIndex":
        """Normalise ``vectors`` [N, D] (any float dtype, numpy / torch / DLPack) and index them.

        Args:
            kind: "flat" (exact), "ivf" (FAISS IVF-Flat on the CPU) or "auto": flat up to
                :data:`AUTO_IVF_MIN_VECTORS` vectors, IVF beyond.
            nlist: IVF inverted lists (default :func:`default_nlist`); at most N / 39.
            nprobe: IVF lists probed per query (default :func:`default_nprobe`); changeable later
                through the ``nprobe`` property.

        Raises ValueError when a row is non-finite or all zero (counted, the first row named).
        """
        x = as_bank_tensor(vectors, "vectors")
        n, dim = x.shape
        if kind not in ("auto", "flat", "ivf"):
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
        if not isinstance(nlist, (int, np.integer)) or not 1 <= nlist <= max_nlist:
            raise ValueError(
                f"nlist: expected an integer in [1, {max_nlist}] (N / {MIN_POINTS_PER_LIST} for "
                f"N={n}: FAISS's k-means needs {MIN_POINTS_PER_LIST} training points per list), "
                f"found {nlist!r}"
            )
        nlist = int(nlist)
        nprobe = default_nprobe(nlist) if nprobe is None else _check_nprobe(nprobe, nlist)
        ivf = _train_ivf(unit, nlist)
        ivf.add(unit)
        logger.info("built an IVF-Flat index: %d vectors, D=%d, nlist=%d, nprobe=%d", n, dim, nlist, nprobe)
        return cls(unit, "ivf", ivf=ivf, nlist=nlist, nprobe=nprobe)

    def add(self, vectors) -> np.ndarray:
        """Normalise and append ``vectors`` [M, D]; returns their ids (int64 [M]).

        An IVF index files the new vectors under its existing centroids (no re-training): rebuild
        when the bank has grown several times over. A memory-mapped index is first copied into
        memory (FAISS cannot grow mapped storage).
        """
        x = as_bank_tensor(vectors, "vectors", dim=self.dim)
        unit = _unit_host(x)
        start, m = self._size, unit.shape[0]
        if self._mapped:
            logger.info("copying a memory-mapped index (%d vectors) into memory before add()", start)
        self._grow(m)
        self._vectors[start:start + m] = unit
        self._size = start + m
        if self._ivf is not None:
            if self._mapped:
                faiss = _faiss()
                self._ivf = faiss.deserialize_index(faiss.serialize_index(self._ivf))
            self._ivf.add(unit)
        self._mapped = False
        self._copies.clear()
        return np.arange(start, start + m, dtype=np.int64)

    def _grow(self, extra: int) -> None:
        """Make room for ``extra`` rows, doubling the capacity so repeated adds cost O(1) each."""
        needed = self._size + extra
        if needed <= self._vectors.shape[0] and not self._mapped:
            return
        capacity = needed if self._mapped else max(needed, 2 * self._vectors.shape[0], 16)
        grown = np.empty((capacity, self.dim), dtype=np.float32)
        grown[: self._size] = self._vectors[: self._size]
        self._vectors = grown

    # ------------------------------------------------------------------ persistence

    def save(self, directory) -> Path:
        """Write the index to ``directory`` (created if missing); returns its path.

        Files are written under temporary names and renamed into place, and ``meta.json`` last,
        so a reader never sees a half-written index.
        """
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        _replace_with(path / "vectors.npy", lambda tmp: _save_npy(tmp, self.vectors))
        ivf_path = path / "ivf.faiss"
        if self._ivf is not None:
            faiss = _faiss()
            _replace_with(ivf_path, lambda tmp: faiss.write_index(self._ivf, str(tmp)))
        elif ivf_path.exists():
            ivf_path.unlink()
        meta = {
            "format": FORMAT_NAME, "version": FORMAT_VERSION, "kind": self.kind, "dim": self.dim,
            "ntotal": self.ntotal, "nlist": self._nlist, "nprobe": self._nprobe,
            "dtype": "float32", "normalised": True,
        }
        _replace_with(path / "meta.json", lambda tmp: tmp.write_text(json.dumps(meta, indent=2) + "\n"))
        return path

    @classmethod
    def load(cls, directory, mmap: bool = True) -> "KnnIndex":
        """Read an index written by :meth:`save`.

        With ``mmap`` the vectors (and IVF lists) are memory-mapped read-only: opening is
        instant, pages are read as searches touch them and shared between processes; the first
        :meth:`add` copies them into memory.
        """
        path = Path(directory)
        meta_path = path / "meta.json"
        if not meta_path.is_file():
            raise FileNotFoundError(f"directory: expected a saved KnnIndex with {meta_path}, found no such file")
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != FORMAT_NAME or meta.get("version") != FORMAT_VERSION:
            raise ValueError(
                f"{meta_path}: expected format {FORMAT_NAME!r} version {FORMAT_VERSION}, found "
                f"{meta.get('format')!r} version {meta.get('version')!r}"
            )
        vectors = np.load(path / "vectors.npy", mmap_mode="r" if mmap else None, allow_pickle=False)
        expected = (meta["ntotal"], meta["dim"])
        if vectors.dtype != np.float32 or vectors.shape != expected:
            raise ValueError(
                f"{path / 'vectors.npy'}: expected float32 {expected}, found {vectors.dtype} {vectors.shape}"
            )
        ivf = None
        if meta["kind"] == "ivf":
            faiss = _faiss()
            ivf = faiss.read_index(str(path / "ivf.faiss"), faiss.IO_FLAG_MMAP_IFC if mmap else 0)
            if (ivf.ntotal, ivf.d) != expected:
                raise ValueError(
                    f"{path / 'ivf.faiss'}: expected {expected[0]} vectors of D={expected[1]}, "
                    f"found {ivf.ntotal} of D={ivf.d}"
                )
        elif meta["kind"] != "flat":
            raise ValueError(f"{meta_path}: expected kind 'flat' or 'ivf', found {meta['kind']!r}")
        return cls(vectors, meta["kind"], ivf=ivf, nlist=meta.get("nlist"), nprobe=meta.get("nprobe"),
                   mapped=mmap)

    # ------------------------------------------------------------------ properties

    @property
    def ntotal(self) -> int:
        """Number of vectors in the bank."""
        return self._size

    @property
    def dim(self) -> int:
        """Dimension D of the vectors."""
        return self._vectors.shape[1]

    @property
    def kind(self) -> str:
        """"flat" or "ivf"."""
        return self._kind

    @property
    def nlist(self) -> int | None:
        """IVF inverted lists (None for flat)."""
        return self._nlist

    @property
    def nprobe(self) -> int | None:
        """IVF lists probed per query on the CPU (None for flat); a search for many neighbours
        may probe more (see :meth:`search_nprobe`)."""
        return self._nprobe

    @nprobe.setter
    def nprobe(self, value: int) -> None:
        if self._kind != "ivf":
            raise ValueError(f"nprobe: only meaningful for kind='ivf', found kind={self._kind!r}")
        self._nprobe = _check_nprobe(value, self._nlist)

    def search_nprobe(self, k: int) -> int | None:
        """Lists an IVF search for ``k`` neighbours probes: ``nprobe``, raised so that about
        :data:`MIN_SCANNED_PER_NEIGHBOUR` * k vectors are scanned (None for flat)."""
        if self._kind != "ivf":
            return None
        floor = math.ceil(MIN_SCANNED_PER_NEIGHBOUR * k * self._nlist / max(self._size, 1))
        return min(self._nlist, max(self._nprobe, floor))

    @property
    def ivf(self):
        """The FAISS IVF-Flat index (None for flat)."""
        return self._ivf

    @property
    def vectors(self) -> np.ndarray:
        """The stored unit vectors, float32 [ntotal, D], read-only view."""
        view = self._vectors[: self._size].view()
        view.flags.writeable = False
        return view

    def __repr__(self) -> str:
        extra = f", nlist={self._nlist}, nprobe={self._nprobe}" if self._kind == "ivf" else ""
        return f"KnnIndex(kind={self._kind!r}, ntotal={self.ntotal}, dim={self.dim}{extra})"

    # ------------------------------------------------------------------ search

    def search(self, queries, k: int, *, backend: str | None = None):
        """Same as ``knn_search(queries, self, k, backend=backend)``."""
        from . import knn_search

        return knn_search(queries, self, k, backend=backend)

    def host_unit(self) -> np.ndarray:
        """Internal: the float32 unit vectors, C-contiguous [ntotal, D] (FAISS's input)."""
        return self._vectors[: self._size]

    def unit_on(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """Internal: the unit vectors on ``device`` in ``dtype`` (host float32 is a view)."""
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
    if not isinstance(nprobe, (int, np.integer)) or not 1 <= nprobe <= nlist:
        raise ValueError(f"nprobe: expected an integer in [1, nlist={nlist}], found {nprobe!r}")
    return int(nprobe)


def _faiss():
    from .faiss_cpu import faiss_module

    return faiss_module()


def _train_ivf(unit: np.ndarray, nlist: int):
    """An untrained-then-trained IVF-Flat index for inner product on unit vectors."""
    faiss = _faiss()
    dim = unit.shape[1]
    index = faiss.index_factory(dim, f"IVF{nlist},Flat", faiss.METRIC_INNER_PRODUCT)
    # Spherical k-means keeps centroids on the unit sphere, where cosine assignment is meaningful.
    faiss.extract_index_ivf(index).cp.spherical = True
    index.train(unit)
    return index


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
