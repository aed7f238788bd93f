"""The calibration pass in plain float64 torch: the spec the fast backends are tested against.

Row i has logits z[i, m, c] of M members over C classes and a label y_i; at inverse temperature
beta the member probabilities are softmax(beta * z[i, m]). Written for reading, not speed: every
quantity is a whole-array expression, the sums over rows are torch's (pairwise) float64 sums.

Registered as backend "reference" (:data:`KERNELS`); the checked public functions are in
:mod:`hitl_triage.kernels.calibration`.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from . import CalibrationKernels


def _float64(logits) -> torch.Tensor:
    return torch.as_tensor(np.asarray(logits)).to(torch.float64)


def _member_log_softmax(z: torch.Tensor, beta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(d, log softmax(beta * z)) with d = z - max_c z, both [N, M, C]; beta is [N, 1, 1] or a scalar.

    Shifting before scaling keeps beta * d finite for any finite logits."""
    d = z - z.amax(dim=2, keepdim=True)
    return d, torch.log_softmax(beta * d, dim=2)


def _at_label(x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """x[i, m, y_i] as [N, M]."""
    index = labels.view(-1, 1, 1).expand(-1, x.shape[1], 1)
    return x.gather(2, index).squeeze(2)


def nll_derivative_sums_reference(logits, labels, beta: float) -> np.ndarray:
    """float64 [3]: (sum_i log S_i, sum_i S_i'/S_i, sum_i (S_i'/S_i)'), ' being d/d beta, where

        S_i(beta) = sum_m a_im,   a_im = softmax(beta * z[i, m])[y_i]

    (a sum, not a mean, of the members' label probabilities: the mean NLL is log M - mean log S).
    With g_im = z[i, m, y_i] - E_im[z] and v_im = Var_im[z] under member m's softmax, and weights
    w_im = a_im / S_i: S'/S = sum_m w g and (S'/S)' = sum_m w (g^2 - v) - (S'/S)^2.
    Every row must be finite.
    """
    z = _float64(logits)
    y = torch.as_tensor(np.asarray(labels), dtype=torch.int64)
    d, logp = _member_log_softmax(z, torch.tensor(float(beta), dtype=torch.float64))
    p = logp.exp()
    log_a = _at_label(logp, y)                      # [N, M] log a_im
    log_s = torch.logsumexp(log_a, dim=1)           # [N] log S_i, exact in log space
    w = torch.exp(log_a - log_s[:, None])           # [N, M] a_im / S_i
    mean = (p * d).sum(dim=2)                       # E_im[z] - max (the shift cancels in g and v)
    g = _at_label(d, y) - mean
    v = (p * (d - mean[..., None]) ** 2).sum(dim=2)
    r1 = (w * g).sum(dim=1)
    dr1 = (w * (g * g - v)).sum(dim=1) - r1 * r1
    return np.array([float(log_s.sum()), float(r1.sum()), float(dr1.sum())], dtype=np.float64)


def row_statistics_reference(logits, labels, betas):
    """Per row of the ensemble mean p_i = (1/M) sum_m softmax(betas[i] * z[i, m]):

    - confidence max_c p_ic (float64), predicted argmax_c p_ic (int64, lowest index on ties),
    - log p_i[y_i] = logsumexp_m(log softmax(betas[i] z[i, m])[y_i]) - log M (float64, log space),
    - brier sum_c (p_ic - 1[c = y_i])^2 (float64),
    - valid: every logit of the row finite (bool). Invalid rows get NaN, -1, NaN, NaN.

    Returns the tuple (confidence, predicted, log_py, brier, valid) of numpy arrays [N].
    """
    z = _float64(logits)
    y = torch.as_tensor(np.asarray(labels), dtype=torch.int64)
    b = torch.as_tensor(np.asarray(betas), dtype=torch.float64).view(-1, 1, 1)
    valid = torch.isfinite(z).all(dim=2).all(dim=1)
    z = torch.where(valid.view(-1, 1, 1), z, torch.zeros((), dtype=torch.float64))
    _, logp = _member_log_softmax(z, b)
    p = logp.exp().mean(dim=1)                      # [N, C]
    predicted = p.argmax(dim=1)                     # the first maximal index
    confidence = p.gather(1, predicted[:, None]).squeeze(1)
    log_py = torch.logsumexp(_at_label(logp, y), dim=1) - math.log(z.shape[1])
    onehot = torch.nn.functional.one_hot(y, z.shape[2]).to(torch.float64)
    brier = ((p - onehot) ** 2).sum(dim=1)
    nan = torch.tensor(math.nan, dtype=torch.float64)
    return (
        torch.where(valid, confidence, nan).numpy(),
        torch.where(valid, predicted, torch.tensor(-1)).numpy(),
        torch.where(valid, log_py, nan).numpy(),
        torch.where(valid, brier, nan).numpy(),
        valid.numpy(),
    )


KERNELS = CalibrationKernels(nll_derivative_sums_reference, row_statistics_reference)

__all__ = ["KERNELS", "nll_derivative_sums_reference", "row_statistics_reference"]
