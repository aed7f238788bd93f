"""The watch list: cases reviewers marked out of scope or wrong, which every source escalates again.

A profile may hold a watch list: the unit embeddings of watched cases (an ``out_of_scope``
verdict, or a ``correct`` on an escalated row) and one radius. A row whose L2-normalised embedding
lies within the radius of any watched case (Euclidean distance between unit vectors, as the k-NN
bank's) fires KNOWN_EDGE_CASE (:class:`hitl_triage.engine.policy.Reason`), at high priority, on
every source: the seed's "an edge case encountered by one instance is labeled once and benefits
all instances".

The distance is a flat k = 1 search against the watched vectors, by the k-NN kernels
(:func:`~hitl_triage.kernels.knn.knn_distance_certified`: the decision "distance > radius" is
exact whatever the backend). The radius (:func:`fit_radius`) is the largest one that leaves
``clear_share`` of in-distribution rows (the calibration rows) outside every watched ball, capped
at ``max_radius``.

Stored in the profile directory as ``watch/vectors.npy`` (float32 [W, D] unit rows) and
``watch/cases.json`` (per case: id, source, action, label, reasons of the verdict that put it
there); the radius is ``thresholds.watch_radius`` in ``profile.toml``.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import torch

from hitl_triage.kernels.knn import KnnIndex, knn_distance, knn_distance_certified

WATCH_DIR = "watch"


@dataclasses.dataclass
class WatchList:
    """Watched cases: ``vectors`` float32 [W, D] unit rows; ``cases`` one dict per row (why it
    is watched)."""

    vectors: np.ndarray
    cases: list[dict]
    unit: bool = dataclasses.field(default=False, repr=False)  # the rows are stored unit rows: kept bit for bit

    def __post_init__(self) -> None:
        v = np.asarray(self.vectors, dtype=np.float32)
        if v.ndim != 2 or v.shape[0] == 0:
            raise ValueError(f"watch.vectors: expected a non-empty array [W, D], found shape {v.shape}")
        if len(self.cases) != v.shape[0]:
            raise ValueError(f"watch.cases: expected one entry per vector ({v.shape[0]}), found {len(self.cases)}")
        norms = np.linalg.norm(v.astype(np.float64), axis=1)
        if not (np.isfinite(v).all() and (norms > 0).all()):
            raise ValueError("watch.vectors: expected finite vectors with a non-zero norm, found others")
        # Normalised once: dividing unit float32 rows again can change their last bits (and the
        # profile's content hash with them).
        self.vectors = np.ascontiguousarray(v if self.unit else v / norms[:, None].astype(np.float32))
        self.unit = True
        self._index: KnnIndex | None = None

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    def __len__(self) -> int:
        return int(self.vectors.shape[0])

    @property
    def index(self) -> KnnIndex:
        if self._index is None:
            self._index = KnnIndex.build(self.vectors, kind="flat")
        return self._index

    def distances(self, embedding, radius: float | None = None):
        """Distance of each row of ``embedding`` [B, D] to its nearest watched case (float32 [B];
        NaN for a missing or zero embedding); numpy in, numpy out, torch in, torch out. With a
        ``radius``, every row an approximate search could put on the wrong side of it is
        re-scored exactly."""
        if radius is None:
            return knn_distance(embedding, self.index, 1)
        distances, _ = knn_distance_certified(embedding, self.index, 1, float(radius))
        return distances

    def extended(self, vectors: np.ndarray, cases: list[dict]) -> "WatchList":
        """A new list with ``vectors`` and their ``cases`` appended (this one is unchanged)."""
        added = WatchList(vectors, list(cases))
        return WatchList(np.concatenate([self.vectors, added.vectors]), self.cases + added.cases, unit=True)

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / WATCH_DIR
        path.mkdir(parents=True, exist_ok=True)
        tmp = path / ".vectors.npy.tmp"
        with open(tmp, "wb") as handle:
            np.save(handle, self.vectors, allow_pickle=False)
        tmp.replace(path / "vectors.npy")
        tmp = path / ".cases.json.tmp"
        tmp.write_text(json.dumps(self.cases, indent=1) + "\n")
        tmp.replace(path / "cases.json")
        return path

    @classmethod
    def load(cls, directory: str | Path, rows: int, dim: int) -> "WatchList":
        """The list saved in ``directory`` (a profile directory), checked against the ``rows`` and
        ``dim`` its profile.toml records."""
        path = Path(directory) / WATCH_DIR
        vectors = np.load(path / "vectors.npy", allow_pickle=False)
        if vectors.dtype != np.float32 or vectors.shape != (rows, dim):
            raise ValueError(f"{path / 'vectors.npy'}: expected float32 ({rows}, {dim}), found "
                             f"{vectors.dtype} {vectors.shape}")
        cases = json.loads((path / "cases.json").read_text())
        return cls(vectors, cases, unit=True)


def fit_radius(in_distribution: np.ndarray, clear_share: float, max_radius: float) -> float:
    """The watch radius: the largest float32 r <= ``max_radius`` with at most
    floor((1 - clear_share) * n) of the n in-distribution distances ``<= r`` (so at least
    ``clear_share`` of those rows stay clear of every watched case). NaN distances (rows without
    an embedding) count in n and are always clear. Returns -1.0 (nothing is near) when even the
    nearest in-distribution row forbids any radius >= 0."""
    if not 0.0 < clear_share <= 1.0:
        raise ValueError(f"clear_share: expected a share in (0, 1], found {clear_share!r}")
    d = np.sort(np.asarray(in_distribution, dtype=np.float32))
    d = d[~np.isnan(d)]
    n = int(np.asarray(in_distribution).shape[0])
    allowed = math.floor((1.0 - clear_share) * n + 1e-9)
    cap = np.float32(max_radius)
    if float(cap) > max_radius:  # the largest float32 not above the cap
        cap = np.nextafter(cap, np.float32(-np.inf), dtype=np.float32)
    if allowed >= d.shape[0]:
        return float(cap)
    # Rows strictly below d[allowed] are at most `allowed`; the float32 just below it is the radius.
    below = np.nextafter(d[allowed], np.float32(-np.inf), dtype=np.float32)
    radius = min(cap, below)
    return float(radius) if radius >= 0 else -1.0


def watch_distances(watch: WatchList | None, embedding: torch.Tensor | None, radius: float | None,
                    missing: torch.Tensor | None = None) -> torch.Tensor | None:
    """The rule's ``watch_distance`` input for a decoded batch (None without a watch list or
    without embeddings); NaN where the embedding is missing."""
    if watch is None or embedding is None or radius is None:
        return None
    d = torch.as_tensor(watch.distances(embedding, radius), device=embedding.device).to(torch.float32)
    if missing is not None:
        d = torch.where(missing, torch.full_like(d, float("nan")), d)
    return d


__all__ = ["WATCH_DIR", "WatchList", "fit_radius", "watch_distances"]
