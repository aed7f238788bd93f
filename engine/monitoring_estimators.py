"""The estimators behind the monitoring figures, on sufficient statistics (sums that add up over
batches and replicas): audited accuracy, the label-free estimate and its audit correction, kappa,
population stability, and the tests that raise alerts. Pure numpy and scipy, no state.

Audited accuracy (Horvitz-Thompson, Hajek form). Row i of the auto-accepted traffic is audited
with known probability pi_i (its stratum's rate; ``audit_weight`` w_i = 1 / pi_i), independently
(Bernoulli sampling). With c_i = 1 when the reviewer's label equals the prediction, both totals
are estimated by Horvitz-Thompson, sum_s w_i c_i and sum_s w_i, and accuracy is their ratio; its
variance by linearisation is sum_s (1 - pi_i) w_i^2 (c_i - acc)^2 / (sum_s w_i)^2 (Sarndal,
Swensson & Wretman, "Model Assisted Survey Sampling", 5.6).

Label-free estimate (NannyML's CBPE for accuracy): the mean calibrated confidence of the
auto-accepted rows, known exactly from the decisions. Its bias is measured on the same audit
sample, b = HT mean of (confidence - c), and the corrected estimate mean_conf - b is the survey
difference estimator: unbiased whatever the calibration, with variance from the residuals
e_i = c_i - confidence_i, smaller than the Hajek estimator's wherever confidence tracks
correctness.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from scipy import stats

Z95 = 1.959963984540054


@dataclasses.dataclass(frozen=True)
class Estimate:
    """A point estimate with its standard error and a two-sided interval; ``n`` the sample size.
    NaN everywhere when the sample is empty."""

    value: float
    se: float
    low: float
    high: float
    n: int

    @classmethod
    def normal(cls, value: float, se: float, n: int, *, z: float = Z95, clip: tuple[float, float] | None = None
               ) -> "Estimate":
        low, high = value - z * se, value + z * se
        if clip is not None:
            low, high = max(clip[0], low), min(clip[1], high)
        return cls(value, se, low, high, n)

    @classmethod
    def empty(cls) -> "Estimate":
        return cls(math.nan, math.nan, math.nan, math.nan, 0)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# -- audited accuracy --------------------------------------------------------------------------------

AUDIT_FIELDS = ("n", "w", "wc", "wconf", "v", "vc", "ve", "vee")
"""Per group of audited auto-accepted rows: count; sum w; sum w c; sum w conf; and with
v_i = (1 - pi_i) w_i^2: sum v; sum v c; sum v e; sum v e^2 (e = c - conf)."""


def audit_sums(weight: np.ndarray, correct: np.ndarray, confidence: np.ndarray) -> dict[str, np.ndarray]:
    """Per-row terms of :data:`AUDIT_FIELDS` (float64 [n] each), to be summed by group.
    ``weight``: audit_weight (>= 1); ``correct``: 0/1; ``confidence``: calibrated confidence."""
    w = np.asarray(weight, np.float64)
    if np.any(~np.isfinite(w)) or np.any(w < 1.0):
        bad = w[~np.isfinite(w) | (w < 1.0)][0]
        raise ValueError(f"audit_weight: expected 1 / rate >= 1 on every audited row, found {bad}")
    c = np.asarray(correct, np.float64)
    conf = np.nan_to_num(np.asarray(confidence, np.float64), nan=0.0)
    v = (w - 1.0) * w  # (1 - 1/w) w^2
    e = c - conf
    return {"n": np.ones_like(w), "w": w, "wc": w * c, "wconf": w * conf, "v": v, "vc": v * c, "ve": v * e,
            "vee": v * e * e}


def audited_accuracy(s: dict[str, float], *, z: float = Z95) -> Estimate:
    """Hajek estimate of accuracy from the sums of :func:`audit_sums`."""
    n, w = int(s.get("n", 0)), s.get("w", 0.0)
    if n == 0 or w <= 0:
        return Estimate.empty()
    acc = s["wc"] / w
    # sum v (c - acc)^2 with c in {0, 1}: sum v c - 2 acc sum v c + acc^2 sum v
    var = (s["vc"] * (1 - 2 * acc) + acc * acc * s["v"]) / (w * w)
    return Estimate.normal(acc, math.sqrt(max(var, 0.0)), n, z=z, clip=(0.0, 1.0))


def label_free_accuracy(conf_sum: float, rows: int, s: dict[str, float], *, z: float = Z95
                        ) -> tuple[float, Estimate, Estimate]:
    """(mean calibrated confidence of the ``rows`` auto-accepted rows, its bias measured on the
    audit sample, the corrected estimate mean_conf - bias), the last two with intervals."""
    cbpe = conf_sum / rows if rows else math.nan
    n, w = int(s.get("n", 0)), s.get("w", 0.0)
    if n == 0 or w <= 0 or not rows:
        return cbpe, Estimate.empty(), Estimate.empty()
    mean_e = (s["wc"] - s["wconf"]) / w  # HT mean of c - conf
    var = (s["vee"] - 2 * mean_e * s["ve"] + mean_e * mean_e * s["v"]) / (w * w)
    se = math.sqrt(max(var, 0.0))
    bias = Estimate.normal(-mean_e, se, n, z=z)
    return cbpe, bias, Estimate.normal(cbpe + mean_e, se, n, z=z, clip=(0.0, 1.0))


# -- agreement ---------------------------------------------------------------------------------------


def cohen_kappa(confusion: np.ndarray, *, z: float = Z95) -> Estimate:
    """Cohen's kappa of a K x K confusion matrix of paired ratings (rows: first rater's category,
    columns: second's), with the large-sample standard error sqrt(po (1 - po) / n) / (1 - pe)."""
    m = np.asarray(confusion, np.float64)
    n = m.sum()
    if n == 0:
        return Estimate.empty()
    po = np.trace(m) / n
    pe = float(m.sum(axis=1) @ m.sum(axis=0)) / (n * n)
    if pe >= 1.0:  # every rating in one category: agreement is complete and kappa undefined
        return Estimate(math.nan, math.nan, math.nan, math.nan, int(n))
    kappa = (po - pe) / (1 - pe)
    se = math.sqrt(po * (1 - po) / n) / (1 - pe)
    return Estimate.normal(kappa, se, int(n), z=z, clip=(-1.0, 1.0))


FLEISS_FIELDS = ("items", "p", "pp")
"""Per group: items with at least two ratings, sum of their agreement P_i, sum of P_i^2 (the
category totals are kept apart, one per category)."""


def fleiss_item_agreement(counts: np.ndarray) -> np.ndarray:
    """P_i = sum_j n_ij (n_ij - 1) / (n_i (n_i - 1)) per item, from an [items, K] count matrix
    (items with fewer than two ratings give NaN)."""
    counts = np.asarray(counts, np.float64)
    n = counts.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n >= 2, (counts * (counts - 1)).sum(axis=1) / (n * (n - 1)), np.nan)


def fleiss_kappa(items: int, p_sum: float, pp_sum: float, category_totals: np.ndarray, *, z: float = Z95) -> Estimate:
    """Fleiss' kappa from per-item agreements and category totals (ratings per category over the
    items); standard error sd(P_i) / sqrt(N) / (1 - Pe), Pe taken as known."""
    if items == 0:
        return Estimate.empty()
    totals = np.asarray(category_totals, np.float64)
    p = totals / totals.sum()
    pe = float(p @ p)
    p_bar = p_sum / items
    if pe >= 1.0:
        return Estimate(math.nan, math.nan, math.nan, math.nan, items)
    var_p = max(pp_sum / items - p_bar * p_bar, 0.0) * items / max(items - 1, 1)
    kappa = (p_bar - pe) / (1 - pe)
    return Estimate.normal(kappa, math.sqrt(var_p / items) / (1 - pe), items, z=z, clip=(-1.0, 1.0))


# -- drift -------------------------------------------------------------------------------------------


def psi(current: np.ndarray, reference: np.ndarray, *, floor: float = 0.5) -> tuple[float, float]:
    """(population stability index, p-value) of two histograms over the same bins. Each count
    gets ``floor`` added (an empty bin would make the index infinite). The p-value: under equal
    distributions PSI * n m / (n + m) is about chi-square with (bins - 1) degrees of freedom
    (PSI is the symmetrised Kullback-Leibler divergence, to second order the two-sample chi-square
    statistic divided by n m / (n + m))."""
    a = np.asarray(current, np.float64) + floor
    b = np.asarray(reference, np.float64) + floor
    n, m = a.sum() - floor * a.size, b.sum() - floor * b.size
    if n <= 0 or m <= 0:
        return math.nan, math.nan
    p, q = a / a.sum(), b / b.sum()
    index = float(np.sum((p - q) * np.log(p / q)))
    dof = max(int(np.count_nonzero((np.asarray(current) + np.asarray(reference)) > 0)) - 1, 1)
    return index, float(stats.chi2.sf(index * n * m / (n + m), dof))


# -- proportions -------------------------------------------------------------------------------------


def wilson(k: float, n: float, *, z: float = Z95) -> Estimate:
    """A proportion k / n with Wilson's score interval."""
    if n <= 0:
        return Estimate.empty()
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return Estimate(p, math.sqrt(p * (1 - p) / n), max(0.0, centre - half), min(1.0, centre + half), int(n))


def drop_pvalue(k_before: float, n_before: float, k_now: float, n_now: float) -> float:
    """One-sided p-value that the proportion fell from k_before / n_before to k_now / n_now
    (Fisher's exact test on the 2 x 2 table; 1.0 when either side is empty)."""
    if n_before <= 0 or n_now <= 0:
        return 1.0
    table = [[int(k_now), int(n_now - k_now)], [int(k_before), int(n_before - k_before)]]
    return float(stats.fisher_exact(table, alternative="less").pvalue)
