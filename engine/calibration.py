"""Temperature scaling of an ensemble and the calibration metrics reported before and after.

Model. Row i has logits ``z[i, m, c]`` of M members over C classes and a label ``y_i``. With one
temperature T shared by all members, the prediction is the mean of the members' softmaxes,

    p_i(T) = (1/M) * sum_m softmax(z[i, m] / T),

and :func:`fit_temperature` minimises the mean negative log-likelihood of the labels,

    NLL(T) = -(1/N) * sum_i log p_i(T)[y_i],

over ``T`` in ``bounds``, in float64. For M = 1 the NLL is convex in beta = 1/T; the log of a mean
of softmaxes is not, so the fit guards against several local minima (see :func:`fit_temperature`).

Metrics (:func:`calibration_metrics`), all on the ensemble-mean prediction ``p``:

- ECE: 15 equal-width bins on the top-label confidence ``max_c p``; bin b is [b/15, (b+1)/15),
  the last one closed at 1; ECE = sum_b (n_b / N) * |accuracy_b - mean confidence_b|.
- NLL: mean of -log p[y] in nats (from logits it is computed in log space, exactly; from
  probabilities, p[y] is clipped below at float64 epsilon as scikit-learn's ``log_loss`` does).
- Brier: the multi-class Brier score, sum over the C classes of (p_c - 1[y = c])^2, averaged over
  rows (range [0, 2]; half of it is the binary Brier score when C = 2).
- accuracy: share of rows whose ``argmax p`` (lowest index on ties) equals the label.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time

import numpy as np
import torch

from hitl_triage.kernels.calibration import as_numpy, check_labels, check_logits, nll_derivative_sums, row_statistics

logger = logging.getLogger(__name__)

DEFAULT_BINS = 15

# Rows of the seeded subsample on which the coarse grid runs (all rows when there are fewer).
_GRID_ROWS = 16_384
# Grid points over log T between the bounds: about 0.19 apart in log T for the default bounds.
_GRID_POINTS = 33
# Local minima of the grid refined on the full data (the NLL of a mean of softmaxes can have more
# than one basin; the best one after refinement wins).
_MAX_BASINS = 3
# Newton stops when its step in log T is below this (T is then exact to ~1e-8 relative).
_LOG_T_TOL = 1e-8
_MAX_NEWTON = 60
# Largest Newton step in log T on the full data (keeps a step inside the basin it started in).
_MAX_STEP = 0.25


# ------------------------------------------------------------------------------------------------
# Results
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class ReliabilityBins:
    """Reliability-diagram bins on the top-label confidence, each a list of length ``n_bins``.

    ``mean_confidence`` and ``accuracy`` are NaN for an empty bin.
    """

    lower: list[float]
    upper: list[float]
    count: list[int]
    mean_confidence: list[float]
    accuracy: list[float]

    def to_dict(self) -> dict:
        return {
            "lower": [float(v) for v in self.lower],
            "upper": [float(v) for v in self.upper],
            "count": [int(v) for v in self.count],
            "mean_confidence": [float(v) for v in self.mean_confidence],
            "accuracy": [float(v) for v in self.accuracy],
        }


@dataclasses.dataclass
class CalibrationMetrics:
    """Calibration of a set of predictions against their labels (see the module docstring).

    ``ece``, ``accuracy`` in [0, 1]; ``nll`` in nats per row; ``brier`` the multi-class Brier
    score (sum over classes, mean over rows) in [0, 2]. ``rows`` is the number of rows scored;
    ``invalid_rows`` the rows left out because their logits or probabilities were not finite.
    """

    ece: float
    nll: float
    brier: float
    accuracy: float
    rows: int
    invalid_rows: int
    bins: ReliabilityBins

    def to_dict(self) -> dict:
        """Plain floats, ints and lists, ready for ``tomli_w`` (empty bins hold ``nan``)."""
        return {
            "ece": float(self.ece),
            "nll": float(self.nll),
            "brier": float(self.brier),
            "accuracy": float(self.accuracy),
            "rows": int(self.rows),
            "invalid_rows": int(self.invalid_rows),
            "reliability": self.bins.to_dict(),
        }


@dataclasses.dataclass
class TemperatureFit:
    """The fitted temperature(s) and the metrics before (T = 1) and after.

    ``temperature``: the global T, fitted on every usable row. ``per_source``: source -> T for
    every source seen, fitted on that source's rows where it has at least ``min_rows_per_source``
    of them, else the global T; ``fallback_sources`` lists the sources that took the global T
    (empty dict and list without ``sources``). ``source_rows``: usable rows per source;
    ``unsourced_rows``: rows whose source is None (they count in the global fit only).
    ``before``/``after``: metrics on the fitted rows at T = 1 and at the fitted temperature(s)
    (each row at its source's T). ``at_bound``: the global optimum lies on a bound of the search
    (the model wants a T outside it). ``fit_seconds``: wall time of the whole call.
    """

    temperature: float
    per_source: dict
    fallback_sources: list
    source_rows: dict
    before: CalibrationMetrics
    after: CalibrationMetrics
    nll: float
    bounds: tuple[float, float]
    min_rows_per_source: int
    rows: int
    invalid_rows: int
    at_bound: bool
    fit_seconds: float
    unsourced_rows: int = 0

    def temperatures_for(self, sources) -> np.ndarray:
        """Float64 [N] temperature of each row of ``sources`` (its source's T, the global T for a
        source the fit never saw and for a row without a source)."""
        keys, missing = _source_array(sources, "sources")
        out = np.full(len(keys), self.temperature, dtype=np.float64)
        if self.per_source:
            uniq, inverse = np.unique(keys, return_inverse=True)
            table = np.array([self.per_source.get(_plain_key(k), self.temperature) for k in uniq], dtype=np.float64)
            out = np.where(missing, self.temperature, table[inverse])
        return out

    def to_dict(self) -> dict:
        """TOML-friendly: plain floats, ints, bools, strings, lists and dicts (source keys as strings)."""
        return {
            "temperature": float(self.temperature),
            "nll": float(self.nll),
            "bounds": [float(self.bounds[0]), float(self.bounds[1])],
            "at_bound": bool(self.at_bound),
            "rows": int(self.rows),
            "invalid_rows": int(self.invalid_rows),
            "min_rows_per_source": int(self.min_rows_per_source),
            "per_source": {str(k): float(v) for k, v in self.per_source.items()},
            "fallback_sources": [str(k) for k in self.fallback_sources],
            "source_rows": {str(k): int(v) for k, v in self.source_rows.items()},
            "unsourced_rows": int(self.unsourced_rows),
            "fit_seconds": float(self.fit_seconds),
            "before": self.before.to_dict(),
            "after": self.after.to_dict(),
        }


# ------------------------------------------------------------------------------------------------
# The per-row work: the calibration kernel pass (hitl_triage.kernels.calibration)
# ------------------------------------------------------------------------------------------------


def _derivative_sums(logits: np.ndarray, labels: np.ndarray, beta: float) -> np.ndarray:
    """(sum log S_i, sum S_i'/S_i, sum (S_i'/S_i)') at inverse temperature beta (finite rows)."""
    return nll_derivative_sums(logits, labels, beta)


def _statistics(logits: np.ndarray, labels: np.ndarray, betas: np.ndarray):
    """Per-row (confidence, predicted, log p[y], Brier term, valid) of the ensemble mean."""
    return tuple(row_statistics(logits, labels, betas))


# ------------------------------------------------------------------------------------------------
# Input checks
# ------------------------------------------------------------------------------------------------


def _numpy(x, name: str) -> np.ndarray:
    """:func:`hitl_triage.kernels.calibration.as_numpy` of ``x``, a torch tensor first copied to
    the CPU (metrics and fits run there)."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
    return as_numpy(x, name)


def _check_logits(logits) -> np.ndarray:
    return check_logits(logits.detach().cpu() if isinstance(logits, torch.Tensor) else logits)


def _check_labels(labels, rows: int, classes: int) -> np.ndarray:
    return check_labels(labels.detach().cpu() if isinstance(labels, torch.Tensor) else labels, rows, classes)


def _check_bounds(bounds) -> tuple[float, float]:
    try:
        lo, hi = (float(b) for b in bounds)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"bounds: expected two numbers (lowest, highest temperature), found {bounds!r}") from exc
    if not (0 < lo < hi < math.inf):
        raise ValueError(f"bounds: expected 0 < lowest < highest < inf, found ({lo}, {hi})")
    return lo, hi


def _source_array(sources, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(keys, missing): source names (str) or integer codes [N], and a bool [N] mask of rows
    without a source (None, e.g. an Arrow null), whose key is a placeholder never to be used."""
    if hasattr(sources, "to_pylist"):  # a pyarrow Array or ChunkedArray
        sources = np.asarray(sources.to_pylist(), dtype=object)
    s = _numpy(sources, name)
    if s.ndim != 1:
        raise ValueError(f"{name}: expected a one-dimensional array of source names or codes, found shape {s.shape}")
    if s.dtype.kind in "fcb":
        raise TypeError(f"{name}: expected strings or integer codes, found dtype {s.dtype}")
    missing = np.zeros(s.shape[0], dtype=bool)
    if s.dtype.kind == "O":
        missing = np.fromiter((v is None for v in s), dtype=bool, count=s.shape[0])
        s = np.where(missing, "", s).astype(str)
    return s, missing


def _plain_key(k):
    """numpy scalar -> the plain Python str/int used as a dict key."""
    return k.item() if hasattr(k, "item") else k


def _per_row_betas(temperature, rows: int) -> np.ndarray:
    t = np.asarray(_numpy(temperature, "temperature"), dtype=np.float64)
    if t.ndim == 0:
        t = np.full(rows, float(t))
    elif t.shape != (rows,):
        raise ValueError(f"temperature: expected a scalar or one per row ({rows},), found shape {t.shape}")
    bad = ~(np.isfinite(t) & (t > 0))
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise ValueError(f"temperature: expected positive finite values, found {t[first]} at row {first}")
    return 1.0 / t


# ------------------------------------------------------------------------------------------------
# Metrics
# ------------------------------------------------------------------------------------------------


def calibration_metrics(
    logits_or_probabilities,
    labels,
    temperature=1.0,
    temperature_index=None,
    *,
    probabilities: bool = False,
    n_bins: int = DEFAULT_BINS,
    sample_weight=None,
) -> CalibrationMetrics:
    """ECE, NLL, Brier score, accuracy and reliability bins of a set of predictions.

    Args:
        logits_or_probabilities: logits [N, M, C] (or [N, C] for M = 1), any float dtype, numpy
            or torch; or, with ``probabilities=True``, class probabilities [N, C] whose rows sum
            to 1 (within 1e-3).
        labels: int [N] in [0, C).
        temperature: for logits, a positive scalar, a table [K] indexed per row by
            ``temperature_index`` (int [N], as in ``ensemble_signals``), or one T per row [N].
        n_bins: equal-width confidence bins of the ECE (15 by default).
        sample_weight: optional non-negative float [N]: weighted metrics (an audit sample's
            Horvitz-Thompson estimate of the traffic's ECE, NLL, Brier and accuracy).

    Rows whose logits (or probabilities) are not all finite are left out and counted in
    ``invalid_rows``. Definitions are in the module docstring.
    """
    if not isinstance(n_bins, (int, np.integer)) or n_bins < 1:
        raise ValueError(f"n_bins: expected a positive integer, found {n_bins!r}")
    if probabilities:
        p = _numpy(logits_or_probabilities, "probabilities")
        if p.dtype.kind != "f" or p.ndim != 2 or p.shape[1] < 2:
            raise ValueError(f"probabilities: expected a float array [N, C] with C >= 2, found {p.dtype} {p.shape}")
        y = _check_labels(labels, p.shape[0], p.shape[1])
        confidence, correct, log_py, brier, valid = _probability_statistics(p.astype(np.float64), y)
    else:
        if isinstance(logits_or_probabilities, tuple) or type(logits_or_probabilities).__name__ == "EnsembleSignals":
            raise TypeError(
                "logits_or_probabilities: expected logits [N, M, C] (NLL and Brier need every class's "
                f"probability), found {type(logits_or_probabilities).__name__}"
            )
        z = _check_logits(logits_or_probabilities)
        y = _check_labels(labels, z.shape[0], z.shape[2])
        if temperature_index is not None:
            table = np.asarray(_numpy(temperature, "temperature"), dtype=np.float64).reshape(-1)
            index = _numpy(temperature_index, "temperature_index")
            if index.dtype.kind not in "iu" or index.shape != (z.shape[0],):
                raise ValueError(
                    f"temperature_index: expected integers of shape ({z.shape[0]},), found {index.dtype} {index.shape}"
                )
            if len(index) and (index.min() < 0 or index.max() >= len(table)):
                raise ValueError(
                    f"temperature_index: expected values in [0, {len(table)}), found range [{index.min()}, {index.max()}]"
                )
            temperature = table[index]
        elif np.ndim(temperature) == 1 and np.size(temperature) == 1:
            temperature = float(np.asarray(_numpy(temperature, "temperature")).reshape(-1)[0])
        betas = _per_row_betas(temperature, z.shape[0])
        confidence, predicted, log_py, brier, valid = _statistics(z, y, betas)
        correct = predicted == y
    w = None
    if sample_weight is not None:
        w = np.asarray(_numpy(sample_weight, "sample_weight"), dtype=np.float64)
        if w.shape != (len(y),) or not (np.isfinite(w).all() and (w >= 0).all()):
            raise ValueError(f"sample_weight: expected finite non-negative weights of shape ({len(y)},), "
                             f"found shape {w.shape}")
        w = w[valid]
    return _metrics_from_rows(confidence[valid], correct[valid], log_py[valid], brier[valid], int((~valid).sum()),
                              n_bins, w)


def _probability_statistics(p: np.ndarray, y: np.ndarray):
    valid = np.isfinite(p).all(axis=1)
    q = np.where(valid[:, None], p, 0.0)
    if (q < 0).any():
        row = int(np.flatnonzero((q < 0).any(axis=1))[0])
        raise ValueError(f"probabilities: expected non-negative values, found a negative one in row {row}")
    off = np.abs(q.sum(axis=1) - 1.0) > 1e-3
    if (off & valid).any():
        row = int(np.flatnonzero(off & valid)[0])
        raise ValueError(f"probabilities: expected rows summing to 1 (within 1e-3), found {q[row].sum()} in row {row}")
    rows = np.arange(len(y))
    confidence = q.max(axis=1)
    correct = q.argmax(axis=1) == y  # argmax returns the lowest index among ties
    py = q[rows, y]
    log_py = np.log(np.clip(py, np.finfo(np.float64).eps, None))
    brier = (q * q).sum(axis=1) - 2.0 * py + 1.0
    return confidence, correct, log_py, brier, valid


def _metrics_from_rows(confidence, correct, log_py, brier, invalid: int, n_bins: int,
                       weights: np.ndarray | None = None) -> CalibrationMetrics:
    """The metrics of these rows; with ``weights``, every sum and mean weighted (the bins'
    ``count`` stays the number of rows, their means are weighted)."""
    rows = len(confidence)
    w = np.ones(rows) if weights is None else np.asarray(weights, dtype=np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # Bin b holds edges[b] <= confidence < edges[b + 1]; confidence 1 goes to the last bin.
    which = np.clip(np.searchsorted(edges, confidence, side="right") - 1, 0, n_bins - 1)
    count = np.bincount(which, minlength=n_bins)
    mass = count if weights is None else np.bincount(which, weights=w, minlength=n_bins)
    conf_sum = np.bincount(which, weights=confidence * w, minlength=n_bins)
    hit_sum = np.bincount(which, weights=correct.astype(np.float64) * w, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.where(mass > 0, conf_sum / np.where(mass > 0, mass, 1), np.nan)
        accuracy = np.where(mass > 0, hit_sum / np.where(mass > 0, mass, 1), np.nan)
    total = float(w.sum())
    if rows and total > 0:
        ece = float(np.sum(np.abs(hit_sum - conf_sum)) / total)
        average = np.mean if weights is None else (lambda x: np.average(x, weights=w))  # unweighted: as before
        nll = float(-average(log_py))
        brier_mean = float(average(brier))
        acc = float(average(correct))
    else:
        ece = nll = brier_mean = acc = math.nan
    return CalibrationMetrics(
        ece=ece, nll=nll, brier=brier_mean, accuracy=acc, rows=rows, invalid_rows=invalid,
        bins=ReliabilityBins(
            lower=edges[:-1].tolist(), upper=edges[1:].tolist(), count=count.tolist(),
            mean_confidence=mean_conf.tolist(), accuracy=accuracy.tolist(),
        ),
    )


# ------------------------------------------------------------------------------------------------
# The fit
# ------------------------------------------------------------------------------------------------


class _Objective:
    """Mean NLL of ``labels`` and its first two derivatives in u = log T, on a set of rows; with
    ``weights``, the weighted mean sum_i w_i NLL_i / sum_i w_i. Rows are grouped by weight value
    and the kernel's sums of each group are scaled by it (one kernel, unchanged: Horvitz-Thompson
    weights are one 1/rate per audit stratum and age weights one per feedback round, so there are
    few distinct values)."""

    def __init__(self, logits: np.ndarray, labels: np.ndarray, weights: np.ndarray | None = None):
        self.log_members = math.log(logits.shape[1])
        self.evaluations = 0
        if weights is None:
            self.groups = [(1.0, logits, labels)]
            self.rows = float(logits.shape[0])
        else:
            values, inverse = np.unique(weights, return_inverse=True)
            self.groups = [(float(w), np.ascontiguousarray(logits[inverse == g]), labels[inverse == g])
                           for g, w in enumerate(values) if w > 0]
            self.rows = float(sum(w * len(y) for w, _, y in self.groups))

    def __call__(self, u: float) -> tuple[float, float, float]:
        beta = math.exp(-u)
        sums = np.zeros(3)
        for w, z, y in self.groups:
            sums = sums + w * _derivative_sums(z, y, beta)
        self.evaluations += 1
        mean_log, r1, dr1 = sums / self.rows
        f = self.log_members - mean_log
        # F(beta) = -mean log S: F' = -r1, F'' = -dr1; with beta = e^-u, dbeta/du = -beta.
        df_dbeta, d2f_dbeta2 = -r1, -dr1
        return f, -beta * df_dbeta, beta * beta * d2f_dbeta2 + beta * df_dbeta


def _newton(objective: _Objective, u0: float, lo: float, hi: float, a: float, b: float) -> tuple[float, float]:
    """Safeguarded Newton on the derivative in u = log T, from u0, inside [lo, hi].

    [a, b] holds the minimum of u0's basin: an end equal to lo / hi is a hard bound, any other end
    has been seen with the derivative's sign pointing inward. Each evaluation narrows the bracket;
    a Newton step that is not downhill-convex or leaves the bracket is replaced by bisection, or
    by a step to the bound when the bound is the bracket's end. Returns (u, NLL at u).
    """
    u = u0
    best_u, best_f = u0, math.inf
    for _ in range(_MAX_NEWTON):
        f, g, h = objective(u)
        if f < best_f:
            best_u, best_f = u, f
        if g == 0:
            return u, f
        if g > 0:
            b = u
        else:
            a = u
        if (u <= lo and g > 0) or (u >= hi and g < 0):
            return u, f  # the minimum is on the bound (KKT): nothing beyond it is allowed
        # The step always points against the slope, so it heads for the bracket's other end.
        step = -g / h if h > 0 else -math.copysign(_MAX_STEP, g)
        step = max(-_MAX_STEP, min(_MAX_STEP, step))
        candidate = u + step
        if not a < candidate < b:
            end = a if candidate <= a else b
            candidate = end if end in (lo, hi) else 0.5 * (a + b)
        if abs(candidate - u) < _LOG_T_TOL or b - a < _LOG_T_TOL:
            return u, f
        u = candidate
    logger.warning("temperature fit: Newton did not converge in %d steps; keeping the best point", _MAX_NEWTON)
    return best_u, best_f


def _fit_one(logits: np.ndarray, labels: np.ndarray, lo: float, hi: float, seed: int,
             weights: np.ndarray | None = None) -> tuple[float, float, bool]:
    """The temperature minimising the mean NLL on these rows. Returns (T, NLL at T, at_bound).

    1. Coarse: the NLL on a grid of ``_GRID_POINTS`` values of log T over the bounds, on a seeded
       subsample of ``_GRID_ROWS`` rows (cheap), locates the basins (local minima of the grid).
    2. Each of the ``_MAX_BASINS`` lowest basins is refined by safeguarded Newton on the subsample,
       bracketed by its grid neighbours, then on all rows from there (a few full passes, since the
       subsample's optimum is already close); the lowest full-data NLL wins.
    """
    rows = logits.shape[0]
    full = _Objective(logits, labels, weights)
    if rows > _GRID_ROWS:
        pick = np.sort(np.random.default_rng(seed).choice(rows, _GRID_ROWS, replace=False))
        sub = _Objective(np.ascontiguousarray(logits[pick]), labels[pick], None if weights is None else weights[pick])
    else:
        sub = full
    grid = np.linspace(lo, hi, _GRID_POINTS)
    values = [sub(u) for u in grid]
    f = np.array([v[0] for v in values])
    g = np.array([v[1] for v in values])
    basins = [
        i for i in range(_GRID_POINTS)
        if (i == 0 or f[i] <= f[i - 1]) and (i == _GRID_POINTS - 1 or f[i] <= f[i + 1])
    ]
    basins = sorted(basins, key=lambda i: f[i])[:_MAX_BASINS]
    best = (math.inf, math.nan)
    for i in basins:
        # A grid neighbour is a valid bracket end only where the slope there points inward.
        a = grid[i - 1] if i > 0 and g[i - 1] < 0 else lo
        b = grid[i + 1] if i < _GRID_POINTS - 1 and g[i + 1] > 0 else hi
        u, nll = _newton(sub, float(grid[i]), lo, hi, float(a), float(b))
        if sub is not full:
            u, nll = _newton(full, u, lo, hi, lo, hi)
        if nll < best[0]:
            best = (nll, u)
    nll, u = best
    at_bound = u - lo < 1e-6 or hi - u < 1e-6
    logger.debug("temperature fit: %d rows, T=%.6g, NLL=%.6g, %d full and %d subsample evaluations",
                 rows, math.exp(u), nll, full.evaluations, sub.evaluations if sub is not full else 0)
    return math.exp(u), nll, at_bound


def fit_temperature(
    logits,
    labels,
    *,
    sources=None,
    min_rows_per_source: int = 1000,
    bounds: tuple[float, float] = (0.05, 20.0),
    sample_weight=None,
) -> TemperatureFit:
    """Fit the temperature T of ``softmax(z / T)`` shared by the ensemble members (mean of the
    members' probabilities) that minimises the labels' negative log-likelihood, in float64.

    Args:
        logits: [N, M, C] (or [N, C] for M = 1), any float dtype, numpy or torch (any device).
        labels: int [N] in [0, C); the caller has already dropped unknown labels.
        sources: optional [N] source names (strings; None for a row without one) or integer
            codes: each source with at least ``min_rows_per_source`` usable rows gets its own T,
            the others the global one.
        bounds: (lowest, highest) temperature searched.
        sample_weight: optional non-negative float [N]: minimise the weighted mean NLL
            sum_i w_i NLL_i / sum_i w_i instead (feedback's Horvitz-Thompson audit weights times
            the age weight of each row); the metrics ``before``/``after`` are weighted alike.
            Not with ``sources``.

    Rows with a non-finite logit are left out (counted in ``invalid_rows``, logged).

    Method: optimise u = log T (scale-free steps; T > 0 by construction). The NLL and its first
    two derivatives come from one pass over the rows (:func:`hitl_triage.kernels.calibration.
    nll_derivative_sums`: numba, float64, in blocks added in a fixed order so the result does not
    depend on the thread count). A coarse grid on a subsample finds the basins,
    safeguarded Newton refines each on the subsample and then on all rows, and the best basin
    wins (:func:`_fit_one`). The optimum is exact to ~1e-8 in log T; the NLL's own sampling
    noise is far larger.
    """
    started = time.perf_counter()
    lo, hi = _check_bounds(bounds)
    if not isinstance(min_rows_per_source, (int, np.integer)) or min_rows_per_source < 1:
        raise ValueError(f"min_rows_per_source: expected a positive integer, found {min_rows_per_source!r}")
    z = _check_logits(logits)
    y = _check_labels(labels, z.shape[0], z.shape[2])
    keys = missing = None
    w = None
    if sample_weight is not None:
        w = np.asarray(_numpy(sample_weight, "sample_weight"), dtype=np.float64)
        if w.shape != (z.shape[0],):
            raise ValueError(f"sample_weight: expected shape ({z.shape[0]},) to match the logits, found {w.shape}")
        if not (np.isfinite(w).all() and (w >= 0).all()) or not w.sum() > 0:
            raise ValueError("sample_weight: expected finite non-negative weights with a positive sum, found others")
        if sources is not None:
            raise ValueError("sample_weight: expected no sources with weights (per-source weighted fits are not "
                             "supported), found both")
    if sources is not None:
        keys, missing = _source_array(sources, "sources")
        if keys.shape != (z.shape[0],):
            raise ValueError(f"sources: expected shape ({z.shape[0]},) to match the logits, found {keys.shape}")

    ones = np.ones(z.shape[0])
    conf, pred, log_py, brier, valid = _statistics(z, y, ones)
    invalid = int((~valid).sum())
    if invalid:
        logger.warning("temperature fit: %d of %d rows have non-finite logits and are left out", invalid, len(valid))
        conf, pred, log_py, brier = conf[valid], pred[valid], log_py[valid], brier[valid]
        z, y = np.ascontiguousarray(z[valid]), y[valid]
        if w is not None:
            w = w[valid]
        if keys is not None:
            assert missing is not None  # _source_array returns both
            keys, missing = keys[valid], missing[valid]
    if z.shape[0] == 0:
        raise ValueError("logits: expected at least one row with finite logits and a label, found none")
    before = _metrics_from_rows(conf, pred == y, log_py, brier, invalid, DEFAULT_BINS, w)

    log_lo, log_hi = math.log(lo), math.log(hi)
    temperature, nll, at_bound = _fit_one(z, y, log_lo, log_hi, seed=0, weights=w)
    if at_bound:
        logger.warning("temperature fit: the optimum T=%.4g lies on the search bounds %s", temperature, (lo, hi))

    per_source, fallback, source_rows = {}, [], {}
    row_temperature = np.full(z.shape[0], temperature)
    unsourced = int(missing.sum()) if missing is not None else 0
    if keys is not None:
        assert missing is not None  # _source_array returns both
        # Rows without a source count in the global fit only and keep the global T.
        sourced = np.flatnonzero(~missing)
        uniq, inverse, counts = np.unique(keys[sourced], return_inverse=True, return_counts=True)
        order = sourced[np.argsort(inverse, kind="stable")]
        starts = np.concatenate([[0], np.cumsum(counts)])
        for k, key in enumerate(uniq):
            name = _plain_key(key)
            source_rows[name] = int(counts[k])
            if counts[k] < min_rows_per_source:
                per_source[name] = temperature
                fallback.append(name)
                continue
            idx = order[starts[k]:starts[k + 1]]
            t_k, _, bound_k = _fit_one(np.ascontiguousarray(z[idx]), y[idx], log_lo, log_hi, seed=k + 1)
            if bound_k:
                logger.warning("temperature fit: source %r's optimum T=%.4g lies on the bounds", name, t_k)
            per_source[name] = t_k
            row_temperature[idx] = t_k
        if fallback:
            logger.info("temperature fit: %d sources below %d rows use the global T", len(fallback), min_rows_per_source)

    conf, pred, log_py, brier, _ = _statistics(z, y, 1.0 / row_temperature)
    after = _metrics_from_rows(conf, pred == y, log_py, brier, invalid, DEFAULT_BINS, w)
    return TemperatureFit(
        temperature=temperature, per_source=per_source, fallback_sources=fallback, source_rows=source_rows,
        before=before, after=after, nll=nll, bounds=(lo, hi), min_rows_per_source=int(min_rows_per_source),
        rows=int(z.shape[0]), invalid_rows=invalid, at_bound=at_bound, unsourced_rows=unsourced,
        fit_seconds=time.perf_counter() - started,
    )


__all__ = [
    "CalibrationMetrics",
    "DEFAULT_BINS",
    "ReliabilityBins",
    "TemperatureFit",
    "calibration_metrics",
    "fit_temperature",
]
