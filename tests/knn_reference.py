"""The independent reference of the k-NN tests (issue 19): exact k-th distances by FAISS's flat
brute force re-scored in numpy by the exact spec restated from ``kernels/knn/reference.py``'s
docstring (float32 unit queries with a float64 norm summed in index order; float64 similarities
summed in index order, which ``np.cumsum`` does; the k-th as a float32 distance). It imports
nothing of the code under test.

Each reference row is itself checked: its (k + 16)-th FAISS similarity must lie clear below its
k-th re-scored one, so no true neighbour can have been left out.
"""

from __future__ import annotations

import numpy as np

REFERENCE_EXTRA = 16

#: The fleet simulator's settings of the issue's traffic: 15% OOD rows, 70% of them from unseen
#: classes only 0.3 class separations off the class subspace (between the seen classes), the rest
#: corrupted inputs; a burst of unseen-class rows on one source (60% of its rows from 40% to 60%
#: of the day); one source drifting 1.5 class separations from a fifth of the day.
FLEET = dict(ood_share=0.15, unseen_fraction=0.7, unseen_offset=0.3, burst_kind="unseen_class",
             burst_ood_share=0.6, burst_start=0.4, burst_end=0.6, drift_strength=1.5, drift_start=0.2)


def unit_spec(x: np.ndarray) -> np.ndarray:
    """The spec's unit rows restated in numpy: u = x / max|x| (float32 division; float64 for
    float64 input, then rounded), n = sqrt of the float64 sum of u^2 in index order, u / n in
    float64 rounded to float32."""
    x = np.asarray(x)
    if x.dtype == np.float64:
        u = (x / np.abs(x).max(axis=1, keepdims=True)).astype(np.float32)
    else:
        x32 = x.astype(np.float32)
        u = x32 / np.abs(x32).max(axis=1, keepdims=True)
    u64 = u.astype(np.float64)
    n = np.sqrt(np.cumsum(u64 * u64, axis=1)[:, -1])
    return (u64 / n[:, None]).astype(np.float32)


def exact_kth(queries: np.ndarray, vectors: np.ndarray, ks, chunk: int = 1024, whole: bool = False) -> dict:
    """Exact k-th distances {k: float32 [n]} of raw ``queries`` among the unit rows ``vectors``
    (``whole``: re-score the whole bank, for banks with more ties than FAISS's candidates hold)."""
    import faiss

    ks = [ks] if isinstance(ks, int) else list(ks)
    q = unit_spec(queries)
    extra = vectors.shape[0] if whole else min(vectors.shape[0], max(ks) + REFERENCE_EXTRA)
    out = {k: np.empty(len(q), np.float32) for k in ks}
    for a in range(0, len(q), chunk):
        qc = q[a:a + chunk]
        sims32, cand = faiss.knn(qc, vectors, extra, metric=faiss.METRIC_INNER_PRODUCT)
        b = vectors[cand].astype(np.float64)  # [n, extra, D]
        s = np.cumsum(qc.astype(np.float64)[:, None, :] * b, axis=2)[:, :, -1]
        s = -np.sort(-s, axis=1)
        if extra < vectors.shape[0]:
            # Every vector outside the candidates has a float32 similarity <= the last one's
            # (float32 error ~1e-6): the k-th must clear it for the reference to be exact.
            assert np.all(sims32[:, -1] + 1e-5 < s[:, max(ks) - 1]), "reference: too many near-ties to be sure"
        for k in ks:
            out[k][a:a + chunk] = np.sqrt(np.maximum(2.0 - 2.0 * s[:, k - 1], 0.0)).astype(np.float32)
    return out if len(ks) > 1 else out[ks[0]]
