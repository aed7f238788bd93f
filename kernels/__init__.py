"""Compute kernels: one public function per fused pass, each with a readable reference (the spec),
a numba CPU implementation and a Triton GPU implementation behind one dispatch (see ``_dispatch``).

Imports nothing of ``hitl_triage.engine`` or ``hitl_triage.serve``.
"""

from ._dispatch import BackendUnavailable
from .audit import audit_uniform
from .knn import KnnIndex, knn_distance, knn_search
from .signals import EnsembleSignals, ensemble_signals

__all__ = [
    "BackendUnavailable", "EnsembleSignals", "KnnIndex", "audit_uniform", "ensemble_signals", "knn_distance",
    "knn_search",
]
