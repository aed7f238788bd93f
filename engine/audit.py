"""Stratified audit sampling that any replica, rerun or outside auditor reproduces.

Row b is sampled when ``u_b < rate_b`` where ``u_b = audit_uniform(id_b, seed)`` (XXH64 of the id,
see ``hitl_triage.kernels.audit``) and ``rate_b`` is its stratum's rate. Because ``u_b`` depends on
the id and the seed alone, the decision is the same whatever the batch split, process or machine.
A sampled row carries ``audit_weight = 1 / rate_b`` (Horvitz-Thompson), 0 otherwise.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from hitl_triage.kernels import audit_uniform

from .config import AuditConfig


@dataclasses.dataclass
class AuditColumns:
    """The columns strata can be built from, for one batch (tensors on the engine's device)."""

    ids: pa.Array
    source: pa.Array | None
    category: pa.Array | None
    predicted_class: torch.Tensor
    confidence: torch.Tensor


def confidence_bin(confidence: torch.Tensor, edges: list[float]) -> torch.Tensor:
    """Bin index of each confidence: 0 below edges[0], ..., len(edges) at or above the last edge;
    len(edges) + 1 for NaN (rows that could not be scored form their own stratum)."""
    boundaries = torch.tensor(edges, dtype=confidence.dtype, device=confidence.device)
    bins = torch.bucketize(confidence, boundaries, right=True)
    return torch.where(torch.isnan(confidence), torch.full_like(bins, len(edges) + 1), bins)


def stratum_rates(columns: AuditColumns, config: AuditConfig) -> torch.Tensor:
    """float32 [B]: each row's audit rate, the base rate unless an override matches.

    Overrides are applied from least to most specific (number of columns they name; a later
    override wins a tie), so the most specific matching one decides.
    """
    device = columns.confidence.device
    rates = torch.full(columns.confidence.shape, config.base_rate, dtype=torch.float32, device=device)
    order = sorted(range(len(config.overrides)), key=lambda i: (len(config.overrides[i].match), i))
    for i in order:
        override = config.overrides[i]
        matched = torch.ones_like(rates, dtype=torch.bool)
        for column, value in override.match.items():
            matched &= _matches(columns, config, column, value)
        rates = torch.where(matched, torch.full_like(rates, override.rate), rates)
    return rates


def _matches(columns: AuditColumns, config: AuditConfig, column: str, value) -> torch.Tensor:
    device = columns.confidence.device
    if column == "predicted_class":
        return columns.predicted_class == int(value)
    if column == "confidence_bin":
        return confidence_bin(columns.confidence, config.confidence_bins) == int(value)
    array = columns.source if column == "source" else columns.category
    if array is None:
        return torch.zeros(columns.confidence.shape, dtype=torch.bool, device=device)
    equal = pc.equal(array, pa.scalar(str(value))).fill_null(False)
    return torch.from_numpy(equal.to_numpy(zero_copy_only=False)).to(device)


def sample(columns: AuditColumns, config: AuditConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(sampled bool [B], audit_weight float32 [B]) for one batch."""
    rates = stratum_rates(columns, config)
    device = rates.device
    if config.base_rate == 0 and not config.overrides:
        return torch.zeros_like(rates, dtype=torch.bool), torch.zeros_like(rates)
    uniform = audit_uniform(columns.ids, config.seed, device="cuda" if device.type == "cuda" else None)
    uniform = torch.as_tensor(np.asarray(uniform) if not isinstance(uniform, torch.Tensor) else uniform, device=device)
    sampled = uniform < rates.to(torch.float64)
    weight = torch.where(sampled, 1.0 / rates.clamp(min=1e-30), torch.zeros_like(rates))
    return sampled, weight.to(torch.float32)


def stratum_labels(columns: AuditColumns, config: AuditConfig, rows: np.ndarray) -> list[str]:
    """Human-readable stratum of the given rows, e.g. "source=cam-3,predicted_class=2" (reports)."""
    parts = []
    for column in config.strata:
        if column == "predicted_class":
            values = columns.predicted_class.cpu().numpy()[rows].tolist()
        elif column == "confidence_bin":
            values = confidence_bin(columns.confidence, config.confidence_bins).cpu().numpy()[rows].tolist()
        else:
            array = columns.source if column == "source" else columns.category
            values = [None] * len(rows) if array is None else array.take(pa.array(rows)).to_pylist()
        parts.append([f"{column}={v}" for v in values])
    return [",".join(p) for p in zip(*parts)] if parts else ["all"] * len(rows)
