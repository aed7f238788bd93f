"""The spec of the ensemble-signal pass, written for clarity in float64 torch.

For row b with logits z[m, c] (M members, C classes) and temperature T (the row's entry of the
temperature table):

    p_m          = softmax(z_m / T)                          member probabilities
    p            = mean_m p_m                                ensemble prediction
    predicted    = argmax_c p            (lowest index on ties)
    confidence   = max_c p
    margin       = top-1 minus top-2 of p
    total        = H(p)            = -sum_c p_c log p_c      (nats, 0 log 0 = 0)
    expected     = mean_m H(p_m)
    mutual_info  = max(0, total - expected)                  BALD's epistemic term
    vote         = fraction of members m with argmax_c z_mc == predicted  (lowest index on ties)
    valid        = every z[m, c] of the row is finite

A row that is not valid gets predicted = -1 and NaN for every float signal.
"""

from __future__ import annotations

import torch


def ensemble_signals_reference(logits, temperatures: torch.Tensor, temperature_index: torch.Tensor | None):
    """Float64 signals of :func:`hitl_triage.kernels.ensemble_signals` (same arguments, already
    validated: logits [B, M, C], temperatures [K] float, temperature_index [B] int or None).
    Returns an ``EnsembleSignals`` of float64 / int64 / bool torch tensors on the logits' device."""
    from . import EnsembleSignals

    z = torch.as_tensor(logits).to(torch.float64)
    temps = torch.as_tensor(temperatures, device=z.device).to(torch.float64)
    t = temps[temperature_index.long()] if temperature_index is not None else temps.expand(z.shape[0])
    members = z.shape[1]

    valid = torch.isfinite(z).all(dim=(1, 2))
    z = torch.where(valid[:, None, None], z, torch.zeros((), dtype=z.dtype, device=z.device))

    member_probs = torch.softmax(z / t[:, None, None], dim=2)
    p = member_probs.mean(dim=1)
    top2 = torch.topk(p, k=2, dim=1).values
    predicted = _first_argmax(p)
    confidence = top2[:, 0]
    margin = top2[:, 0] - top2[:, 1]
    total = _entropy(p)
    expected = _entropy(member_probs).mean(dim=1)
    mutual_info = torch.clamp(total - expected, min=0.0)
    votes = (_first_argmax(z) == predicted[:, None]).sum(dim=1)
    vote = votes.to(torch.float64) / members

    nan = torch.tensor(float("nan"), dtype=torch.float64, device=z.device)

    def masked(x):
        return torch.where(valid, x, nan)

    return EnsembleSignals(
        predicted_class=torch.where(valid, predicted, torch.full_like(predicted, -1)),
        confidence=masked(confidence),
        margin=masked(margin),
        total_entropy=masked(total),
        expected_entropy=masked(expected),
        mutual_info=masked(mutual_info),
        vote_agreement=masked(vote),
        valid=valid,
    )


def ensemble_signals_backend(logits, temperatures, temperature_index):
    """The reference as a dispatchable backend (exact, slow): float64 inside, cast by the caller."""
    return ensemble_signals_reference(logits, temperatures, temperature_index)


def _entropy(p: torch.Tensor) -> torch.Tensor:
    """Entropy in nats over the last axis, with 0 log 0 = 0."""
    logp = torch.log(torch.where(p > 0, p, torch.ones_like(p)))
    return -(p * logp).sum(dim=-1)


def _first_argmax(x: torch.Tensor) -> torch.Tensor:
    """Argmax over the last axis, lowest index among ties (torch.argmax does not promise which)."""
    is_max = x == x.max(dim=-1, keepdim=True).values
    index = torch.arange(x.shape[-1], device=x.device)
    return torch.where(is_max, index, torch.full_like(index, x.shape[-1])).min(dim=-1).values
