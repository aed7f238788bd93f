"""Compute kernels: one public function per fused pass, each with a readable reference (the spec),
a numba CPU implementation and a Triton GPU implementation behind one dispatch (see ``_dispatch``).

Imports nothing of ``hitl_triage.engine`` or ``hitl_triage.serve``.
"""

import os

# torch, numba and FAISS each run their own OpenMP thread pool; by default idle OpenMP workers
# spin, and on a small or shared CPU three spinning pools starve each other (measured on 2 cores:
# the engine's policy step took 0.59 s instead of 0.003 s for 40k rows). Passive waiting costs
# nothing measurable here. Only a default: an explicit setting wins, and it must be in place
# before the first of those libraries starts its pool, which is why it sits at this import.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from ._dispatch import BackendUnavailable  # noqa: E402
from .audit import audit_uniform
from .calibration import RowStatistics, nll_derivative_sums, row_statistics
from .knn import KnnIndex, knn_distance, knn_search
from .signals import EnsembleSignals, ensemble_signals

__all__ = [
    "BackendUnavailable", "EnsembleSignals", "KnnIndex", "RowStatistics", "audit_uniform", "ensemble_signals",
    "knn_distance", "knn_search", "nll_derivative_sums", "row_statistics",
]
