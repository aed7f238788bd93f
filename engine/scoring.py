"""From a decoded batch to the per-row inputs of the escalation rule.

One place computes what the rule reads (signals at the profile's temperatures, the k-NN distance,
the category codes, the audit draw), so that fit time, when it chooses thresholds and reports the
expected trigger rates, and run time, when it decides, see the same float32 values for the same
rows: a row that sits on a threshold falls on the same side in both.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch

from hitl_triage.kernels import EnsembleSignals, ensemble_signals
from hitl_triage.kernels.knn import knn_distance_certified

from . import audit
from .config import AuditConfig
from .decode import PredictionBatch
from .lookup import lookup_codes
from .policy import CategoryTables, RuleInputs, category_codes


class TemperatureTable:
    """The temperatures as the signal kernel reads them: entry 0 the global temperature, then one
    entry per source in sorted order; a row's entry is its source's, or 0 for a source without
    its own temperature (or no source)."""

    def __init__(self, temperature: float, per_source: dict[str, float], device: torch.device | str = "cpu"):
        self.sources = sorted(per_source)
        self._code = {name: i + 1 for i, name in enumerate(self.sources)}
        self.values = torch.tensor(
            [temperature] + [per_source[s] for s in self.sources], dtype=torch.float32, device=device
        )

    def codes(self, source: pa.Array | None) -> np.ndarray | None:
        """int32 [B] entry of each row, or None when every row takes the global temperature."""
        if not self._code or source is None:
            return None
        return lookup_codes(source, self._code).astype(np.int32)

    def signals(self, logits: torch.Tensor, source: pa.Array | None) -> EnsembleSignals[torch.Tensor]:
        """The fused signal pass over ``logits`` [B, M, C] at each row's temperature."""
        codes = self.codes(source)
        if codes is None:
            return ensemble_signals(logits, self.values[:1])
        index = torch.from_numpy(codes).to(self.values.device)
        return ensemble_signals(logits, self.values, temperature_index=index)


def ood_scores(x: PredictionBatch, bank, k: int, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(float32 [B] k-NN distance per row, bool [B] rows re-scored exactly) on the logits' device;
    NaN where the embedding is missing (or zero, from the kernel).

    ``threshold`` is the anomaly threshold (the rule fires on ``distance > threshold``): every
    row an approximate search (an IVF bank, a GPU's float16 search) could put above it is
    re-scored exactly (:func:`~hitl_triage.kernels.knn.knn_distance_certified`), so the anomaly
    decision of every row, and the distance of every re-scored row, equal an exact search's.
    -inf re-scores every row (fit time scores its threshold rows exactly), +inf none."""
    device = x.logits.device
    if x.embedding is None:
        nothing = torch.zeros(x.num_rows, dtype=torch.bool, device=device)
        return torch.full((x.num_rows,), float("nan"), dtype=torch.float32, device=device), nothing
    distances, rescored = knn_distance_certified(x.embedding, bank, k, threshold)
    scores = torch.as_tensor(distances, device=device).to(torch.float32)
    rescored = torch.as_tensor(rescored, device=device)
    if x.embedding_missing is not None:
        scores = torch.where(x.embedding_missing, torch.full_like(scores, float("nan")), scores)
        rescored = rescored & ~x.embedding_missing
    return scores, rescored


def valid_rows(x: PredictionBatch, s: EnsembleSignals[torch.Tensor]) -> torch.Tensor:
    """bool [B]: the row could be scored (finite logits, none missing)."""
    return s.valid if x.logits_missing is None else s.valid & ~x.logits_missing


def rule_inputs(x: PredictionBatch, s: EnsembleSignals[torch.Tensor], ood: torch.Tensor | None, tables: CategoryTables,
                audit_config: AuditConfig, *, members: int, classes: int, reported: bool = False
                ) -> tuple[RuleInputs, torch.Tensor, audit.AuditColumns]:
    """The rule's inputs for the rows of ``x`` with signals ``s`` and k-NN distances ``ood`` (None
    without a bank), the audit weight of each row (0 where not sampled) and the audit columns
    (for the stratum labels of the sampled rows). ``reported``: every row was reported by users."""
    columns = audit.AuditColumns(x.ids, x.source, x.category, s.predicted_class, s.confidence)
    sampled, weight = audit.sample(columns, audit_config)
    inputs = RuleInputs(
        confidence=s.confidence, mutual_info=s.mutual_info, vote_agreement=s.vote_agreement,
        predicted_class=s.predicted_class, valid=valid_rows(x, s), ood_score=ood,
        category_code=category_codes(x.category, tables, s.confidence.device),
        audit_sampled=sampled, members=members, classes=classes,
        reported=torch.ones_like(sampled) if reported else None,
    )
    return inputs, weight, columns
