"""Temperature scaling and calibration metrics against independent float64 computations.

References used here and nowhere in the library: a torch float64 NLL of the mean of softmaxes
(log_softmax + logsumexp over members), a dense grid search over log T, scikit-learn's
``log_loss``, the Brier formula written out, and an ECE loop over rows and bins.
"""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest
import torch
from sklearn.metrics import log_loss

from hitl_triage.engine.calibration import calibration_metrics, fit_temperature
from hitl_triage.kernels.calibration import numba_cpu as calibration_numba

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


# ------------------------------------------------------------------------------------------------
# Independent references
# ------------------------------------------------------------------------------------------------


def reference_nll(logits, labels, temperatures) -> np.ndarray:
    """Mean NLL of the labels under mean_m softmax(z_m / T), float64 torch, for each T of a [K]
    array (or, given a [1, N] array, with row i at its own temperature)."""
    z = torch.as_tensor(np.asarray(logits, dtype=np.float64))
    if z.ndim == 2:
        z = z[:, None, :]
    y = torch.as_tensor(np.asarray(labels, dtype=np.int64))
    t = torch.as_tensor(np.asarray(temperatures, dtype=np.float64))
    t = t.reshape(-1, 1, 1, 1) if t.ndim <= 1 else t.reshape(t.shape[0], -1, 1, 1)
    rows, members, _ = z.shape
    batch = max(1, 4_000_000 // z.numel())  # several temperatures per call, bounded memory
    out = []
    for k in range(0, t.shape[0], batch):
        logp = torch.log_softmax(z[None] / t[k:k + batch], dim=3)
        index = y[None, :, None, None].expand(logp.shape[0], rows, members, 1)
        lp_y = logp.gather(3, index)[..., 0]
        out.append(-(torch.logsumexp(lp_y, dim=2) - math.log(members)).mean(dim=1))
    return torch.cat(out).numpy()


def grid_optimum(logits, labels, bounds=(0.05, 20.0)) -> float:
    """Global minimiser of the reference NLL over log T by grid search: 121 points over the
    bounds (0.05 apart in log T: finds the best basin), then five zooms of 21 points over +-2
    steps around the best point, each 5x finer, down to a step of ~1.6e-5 in log T, well under
    the 1e-4 relative asked of the fit."""
    lo, hi = math.log(bounds[0]), math.log(bounds[1])
    grid = np.linspace(lo, hi, 121)
    for _ in range(6):
        best = grid[int(np.argmin(reference_nll(logits, labels, np.exp(grid))))]
        step = grid[1] - grid[0]
        grid = np.linspace(max(lo, best - 2 * step), min(hi, best + 2 * step), 21)
    return float(np.exp(best))


def sample_labels(rng, probabilities: np.ndarray) -> np.ndarray:
    return (probabilities.cumsum(axis=1) > rng.random((probabilities.shape[0], 1))).argmax(axis=1)


def mean_softmax(z: np.ndarray, temperature=1.0) -> np.ndarray:
    t = torch.as_tensor(np.asarray(temperature, dtype=np.float64))  # float64: a Python float would become float32
    t = t.reshape(-1, 1, 1) if t.ndim else t
    p = torch.softmax(torch.as_tensor(z, dtype=torch.float64) / t, dim=2)
    return p.mean(dim=1).numpy()


def overconfident_ensemble(rng, rows, members, classes, scale, spread=1.5, noise=0.5):
    """Logits of a well-specified ensemble, multiplied by ``scale``.

    Member logits ``z = base + noise`` define the true model: labels are drawn from the mean of
    the members' softmax(z). The returned logits are ``scale * z``, so temperature ``scale`` is
    exactly the truth and the raw ensemble (T = 1) is overconfident when scale > 1.
    """
    base = rng.normal(size=(rows, 1, classes)) * spread
    z = base + rng.normal(size=(rows, members, classes)) * noise
    labels = sample_labels(rng, mean_softmax(z))
    return z * scale, labels


def log_t_standard_error(logits, labels, temperature) -> float:
    """Standard error of the maximum-likelihood log T: 1 / sqrt(N * d2 NLL / d(log T)^2) at the
    true T (the inverse Fisher information of a well-specified model), by torch autograd."""
    z = torch.as_tensor(np.asarray(logits, dtype=np.float64))
    y = torch.as_tensor(labels)
    u = torch.tensor(math.log(temperature), dtype=torch.float64, requires_grad=True)

    def nll(u):
        logp = torch.log_softmax(z / u.exp(), dim=2)
        lp_y = logp.gather(2, y[:, None, None].expand(-1, z.shape[1], 1))[..., 0]
        return -(torch.logsumexp(lp_y, dim=1) - math.log(z.shape[1])).mean()

    (grad,) = torch.autograd.grad(nll(u), u, create_graph=True)
    (curvature,) = torch.autograd.grad(grad, u)
    return 1.0 / math.sqrt(len(labels) * float(curvature))


def hand_ece(confidence, correct, n_bins=15):
    """ECE and bins by a loop over bins and rows: bin b holds b/n <= conf < (b+1)/n, conf = 1 in
    the last bin."""
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    total, counts, confs, accs = 0.0, [], [], []
    for b in range(n_bins):
        members = [
            i for i in range(len(confidence))
            if edges[b] <= confidence[i] < edges[b + 1] or (b == n_bins - 1 and confidence[i] == 1.0)
        ]
        counts.append(len(members))
        if members:
            conf = sum(confidence[i] for i in members) / len(members)
            acc = sum(bool(correct[i]) for i in members) / len(members)
            total += len(members) / len(confidence) * abs(acc - conf)
            confs.append(conf)
            accs.append(acc)
        else:
            confs.append(math.nan)
            accs.append(math.nan)
    return total, counts, confs, accs


# ------------------------------------------------------------------------------------------------
# The fit
# ------------------------------------------------------------------------------------------------


def test_overconfident_ensemble_recovers_the_true_scale_and_calibrates(rng):
    scale = 2.5
    z, y = overconfident_ensemble(rng, 20_000, 5, 10, scale)
    fit = fit_temperature(z.astype(np.float32), y)
    # Well-specified model: the MLE of log T is normal around log(scale) with this standard error;
    # 5 standard errors fail a correct fit with probability < 1e-6.
    se = log_t_standard_error(z, y, scale)
    assert abs(math.log(fit.temperature) - math.log(scale)) < 5 * se, (fit.temperature, scale, se)
    assert fit.after.ece < fit.before.ece, (fit.before.ece, fit.after.ece)
    assert fit.after.nll < fit.before.nll
    # ECE of a calibrated model on 20k rows is sampling noise, a few 1e-3; overconfidence by 2.5x
    # costs far more.
    assert fit.after.ece < 0.02 < fit.before.ece
    assert not fit.at_bound and fit.rows == 20_000 and fit.invalid_rows == 0


CASES = [
    # (rows, members, classes, scale, dtype): odd sizes, M = 1, two classes, one row, a subsample
    # (rows > the grid's subsample) and under-confident logits (scale < 1).
    (3, 1, 2, 1.0, np.float64),
    (257, 1, 2, 3.0, np.float64),
    (1000, 3, 7, 0.4, np.float32),
    (2049, 5, 10, 2.0, np.float64),
    (17_000, 2, 4, 1.7, np.float32),
]


@pytest.mark.parametrize("rows,members,classes,scale,dtype", CASES, ids=lambda v: getattr(v, "__name__", str(v)))
def test_optimum_matches_a_dense_grid_search(rows, members, classes, scale, dtype, rng):
    z, y = overconfident_ensemble(rng, rows, members, classes, scale)
    z = z.astype(dtype)
    fit = fit_temperature(z, y)
    best = grid_optimum(z, y)
    # Asked accuracy: 1e-4 relative in T. The fit must also be at least as good as the grid point.
    assert abs(fit.temperature / best - 1) < 1e-4, (fit.temperature, best)
    assert reference_nll(z, y, [fit.temperature])[0] <= reference_nll(z, y, [best])[0] + 1e-12
    assert fit.nll == pytest.approx(reference_nll(z, y, [fit.temperature])[0], rel=1e-10)


def _two_basins(deep_at_low_t: bool):
    """M=2, C=2 rows whose NLL in T has two local minima, at T ~ 0.094 and T ~ 12.
    Each group alone has one optimum: members (a, 0) and (0, b) with a > b and label 0 have
    p(T) = (sigmoid(a/T) + sigmoid(-b/T)) / 2, largest at a T proportional to a."""
    def group(n, a, b):
        z = np.zeros((n, 2, 2))
        z[:, 0, 0], z[:, 1, 1] = a, b
        return z

    low = group(200 if deep_at_low_t else 150, 0.2, 0.1)
    high = group(1000, 20.0, 18.0)
    z = np.concatenate([low, high])
    return z, np.zeros(len(z), dtype=np.int64)


@pytest.mark.parametrize("deep_at_low_t", [True, False])
@pytest.mark.parametrize("repeat", [1, 15], ids=["small", "subsampled"])
def test_the_deeper_of_two_basins_wins(deep_at_low_t, repeat):
    small_z, small_y = _two_basins(deep_at_low_t)
    grid = np.exp(np.linspace(math.log(0.05), math.log(20), 400))
    f = reference_nll(small_z, small_y, grid)
    minima = [i for i in range(1, len(f) - 1) if f[i] < f[i - 1] and f[i] < f[i + 1]]
    assert len(minima) == 2, "the data must have two basins for this test to mean anything"
    # Repeating every row leaves the mean NLL, hence the optimum, unchanged; 15 copies make more
    # rows than the coarse grid's subsample, so the subsample-then-full path runs.
    z, y = np.tile(small_z, (repeat, 1, 1)), np.tile(small_y, repeat)
    fit = fit_temperature(z, y)
    best = grid_optimum(small_z, small_y)
    assert (best < 1) == deep_at_low_t
    assert abs(fit.temperature / best - 1) < 1e-4, (fit.temperature, best)


def test_labels_unrelated_to_the_logits_push_t_to_the_upper_bound(rng):
    # The best prediction is uniform, T -> infinity: the fit stops at the bound and says so.
    z = rng.normal(size=(2000, 3, 4)) * 3
    y = rng.integers(0, 4, 2000)
    fit = fit_temperature(z, y, bounds=(0.1, 5.0))
    assert fit.at_bound and fit.temperature == pytest.approx(5.0, rel=1e-9)


def test_per_source_temperatures_and_fallback(rng):
    za, ya = overconfident_ensemble(rng, 4000, 3, 4, 3.0)
    zb, yb = overconfident_ensemble(rng, 3000, 3, 4, 0.7)
    zc, yc = overconfident_ensemble(rng, 300, 3, 4, 1.5)
    z = np.concatenate([za, zb, zc]).astype(np.float32)
    y = np.concatenate([ya, yb, yc])
    sources = np.array(["a"] * 4000 + ["b"] * 3000 + ["c"] * 300, dtype=object)
    shuffle = rng.permutation(len(y))
    z, y, sources = z[shuffle], y[shuffle], sources[shuffle]
    fit = fit_temperature(z, y, sources=sources, min_rows_per_source=1000)

    assert fit.fallback_sources == ["c"]
    assert fit.source_rows == {"a": 4000, "b": 3000, "c": 300}
    assert fit.per_source["c"] == fit.temperature
    # The per-source fit is the global fit on that source's rows (checked against the grid in
    # test_optimum_matches_a_dense_grid_search); one source against the grid suffices here.
    rows_b = sources == "b"
    assert abs(fit.per_source["b"] / grid_optimum(z[rows_b], y[rows_b]) - 1) < 1e-4
    for name, scale in (("a", 3.0), ("b", 0.7)):
        rows = sources == name
        se = log_t_standard_error(z[rows], y[rows], scale)
        assert abs(math.log(fit.per_source[name]) - math.log(scale)) < 5 * se, (name, fit.per_source[name])

    # "after" scores each row at its own source's temperature.
    per_row = fit.temperatures_for(sources)
    np.testing.assert_array_equal(per_row[sources == "c"], fit.temperature)
    assert fit.after.nll == pytest.approx(reference_nll(z, y, per_row[None, :])[0], rel=1e-10)
    # A source the fit never saw takes the global temperature.
    assert fit.temperatures_for(np.array(["zzz"]))[0] == fit.temperature


def test_integer_source_codes(rng):
    z, y = overconfident_ensemble(rng, 3000, 2, 3, 2.0)
    codes = rng.integers(0, 3, 3000)
    codes[:2000] = 7  # one large source; the rest split in two small ones
    fit = fit_temperature(z, y, sources=codes, min_rows_per_source=1000)
    assert set(fit.per_source) == {0, 1, 2, 7} and sorted(fit.fallback_sources) == sorted({0, 1, 2} & set(codes[2000:]))
    assert fit.to_dict()["per_source"].keys() == {"0", "1", "2", "7"}


def test_rows_without_a_source_keep_the_global_temperature(rng):
    import pyarrow as pa

    z, y = overconfident_ensemble(rng, 2500, 2, 3, 2.0)
    names = ["north" if i < 1500 else None if i % 2 else "south" for i in range(2500)]
    fit = fit_temperature(z, y, sources=pa.array(names), min_rows_per_source=400)
    assert fit.unsourced_rows == 500 and fit.source_rows == {"north": 1500, "south": 500}
    assert set(fit.per_source) == {"north", "south"} and fit.fallback_sources == []
    per_row = fit.temperatures_for(np.array(names, dtype=object))
    assert (per_row[1501::2] == fit.temperature).all()
    assert fit.after.nll == pytest.approx(reference_nll(z, y, per_row[None, :])[0], rel=1e-10)


def test_non_finite_rows_are_left_out(rng):
    z, y = overconfident_ensemble(rng, 3000, 3, 5, 2.0)
    bad = z.copy()
    bad[5, 1, 2] = np.nan
    bad[17, 0, 0] = np.inf
    bad[40, 2, 4] = -np.inf
    keep = np.ones(3000, dtype=bool)
    keep[[5, 17, 40]] = False
    fit = fit_temperature(bad, y)
    clean = fit_temperature(z[keep], y[keep])
    assert fit.invalid_rows == 3 and fit.rows == 2997
    assert fit.temperature == pytest.approx(clean.temperature, rel=1e-12)
    metrics = calibration_metrics(bad, y, fit.temperature)
    assert metrics.invalid_rows == 3 and metrics.rows == 2997
    assert metrics.nll == pytest.approx(calibration_metrics(z[keep], y[keep], fit.temperature).nll, rel=1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_torch_inputs_of_any_float_dtype(dtype, rng):
    z, y = overconfident_ensemble(rng, 2000, 3, 4, 2.0)
    zt = torch.as_tensor(z).to(dtype)
    fit = fit_temperature(zt, torch.as_tensor(y))
    # The same (rounded) values in float64 numpy are the same data set: the same optimum.
    same = fit_temperature(zt.to(torch.float64).numpy(), y)
    assert fit.temperature == pytest.approx(same.temperature, rel=1e-9)


def test_result_does_not_depend_on_the_thread_count(rng, monkeypatch):
    z, y = overconfident_ensemble(rng, 30_000, 3, 5, 2.0)
    reference = fit_temperature(z, y)
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=1) as single:
        monkeypatch.setattr(calibration_numba, "_POOL", single)
        again = fit_temperature(z, y)
    assert again.temperature == reference.temperature and again.after.nll == reference.after.nll


def test_same_optimum_as_a_torch_lbfgs_peer_on_one_member(rng):
    z, y = overconfident_ensemble(rng, 2000, 1, 6, 1.8)
    zt = torch.as_tensor(z[:, 0, :])
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], max_iter=100, tolerance_grad=1e-10, tolerance_change=1e-12, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(zt / log_t.exp(), torch.as_tensor(y))
        loss.backward()
        return loss

    opt.step(closure)
    fit = fit_temperature(z[:, 0, :], y)  # [N, C] means M = 1
    assert abs(fit.temperature / float(log_t.detach().exp()) - 1) < 1e-3


def test_to_dict_is_toml_ready(rng):
    import tomli_w

    z, y = overconfident_ensemble(rng, 2000, 2, 3, 2.0)
    sources = np.where(np.arange(2000) < 1500, "north", "south")
    fit = fit_temperature(z, y, sources=sources)
    text = tomli_w.dumps(fit.to_dict())
    back = tomllib.loads(text)
    assert back["temperature"] == fit.temperature
    assert back["per_source"]["north"] == fit.per_source["north"]
    assert back["fallback_sources"] == ["south"]
    assert back["after"]["ece"] == fit.after.ece
    assert len(back["before"]["reliability"]["count"]) == 15
    assert sum(back["before"]["reliability"]["count"]) == 2000


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda z, y: (z, y.astype(np.float64)), "labels: expected integer"),
        (lambda z, y: (z, np.where(np.arange(len(y)) == 3, 9, y)), r"labels: expected values in \[0, 4\)"),
        (lambda z, y: (z, y[:-1]), r"labels: expected shape \(50,\)"),
        (lambda z, y: (z[..., :1], y * 0), "logits: expected at least 2 classes"),
        (lambda z, y: (z[None], y), "logits: expected shape"),
        (lambda z, y: (z.astype(np.int32), y), "logits: expected a floating-point array"),
    ],
)
def test_bad_inputs_name_the_field(change, message, rng):
    z, y = overconfident_ensemble(rng, 50, 2, 4, 1.0)
    z, y = change(z, y)
    with pytest.raises((ValueError, TypeError), match=message):
        fit_temperature(z, y)


def test_bad_options_name_the_field(rng):
    z, y = overconfident_ensemble(rng, 50, 2, 4, 1.0)
    with pytest.raises(ValueError, match="bounds"):
        fit_temperature(z, y, bounds=(2.0, 1.0))
    with pytest.raises(ValueError, match="sources: expected shape"):
        fit_temperature(z, y, sources=np.zeros(49, dtype=int))
    with pytest.raises(ValueError, match="min_rows_per_source"):
        fit_temperature(z, y, min_rows_per_source=0)
    with pytest.raises(ValueError, match="logits: expected at least one row"):
        fit_temperature(np.full((3, 2, 4), np.nan), y[:3])


# ------------------------------------------------------------------------------------------------
# Metrics
# ------------------------------------------------------------------------------------------------


def _hand_metrics(p: np.ndarray, y: np.ndarray):
    confidence = p.max(axis=1)
    correct = p.argmax(axis=1) == y
    onehot = np.eye(p.shape[1])[y]
    brier = float(np.mean(np.sum((p - onehot) ** 2, axis=1)))
    return confidence, correct, brier


@pytest.mark.parametrize("rows,classes", [(1, 2), (200, 2), (333, 7)])
def test_metrics_from_probabilities_match_sklearn_and_hand_loops(rows, classes, rng):
    p = rng.dirichlet(np.full(classes, 0.7), size=rows)
    y = rng.integers(0, classes, rows)
    if classes == 2 and rows >= 100:
        # Confidences exactly on bin edges k/15 must fall in the upper bin, as the loop says.
        k = np.arange(8, 16)
        p[: len(k), 0] = k / 15
        p[: len(k), 1] = 1 - k / 15
    m = calibration_metrics(p, y, probabilities=True)
    confidence, correct, brier = _hand_metrics(p, y)
    ece, counts, confs, accs = hand_ece(confidence, correct)
    # Same float64 quantities summed in a different order: agreement to a few ulps.
    assert m.nll == pytest.approx(log_loss(y, p, labels=list(range(classes))), rel=1e-12)
    assert m.brier == pytest.approx(brier, rel=1e-12)
    assert m.ece == pytest.approx(ece, rel=1e-12, abs=1e-15)
    assert m.accuracy == pytest.approx(correct.mean())
    assert m.bins.count == counts
    np.testing.assert_allclose(m.bins.mean_confidence, confs, rtol=1e-12)
    np.testing.assert_allclose(m.bins.accuracy, accs, rtol=1e-12)
    assert m.rows == rows and m.invalid_rows == 0


@pytest.mark.parametrize("members,classes,dtype", [(1, 2, np.float64), (5, 10, np.float32), (3, 7, np.float64)])
def test_metrics_from_logits_match_independent_probabilities(members, classes, dtype, rng):
    z, y = overconfident_ensemble(rng, 500, members, classes, 2.0)
    z = z.astype(dtype)
    temperature = 1.7
    m = calibration_metrics(z, y, temperature)
    p = mean_softmax(z.astype(np.float64), temperature)
    confidence, correct, brier = _hand_metrics(p, y)
    ece, counts, _, _ = hand_ece(confidence, correct)
    # The library works in log space and with its own exp (~5e-16 relative): a few ulps of
    # difference per row, far below these tolerances.
    assert m.nll == pytest.approx(log_loss(y, p, labels=list(range(classes))), rel=1e-10)
    assert m.brier == pytest.approx(brier, rel=1e-10)
    assert m.ece == pytest.approx(ece, rel=1e-9, abs=1e-12)
    assert m.accuracy == pytest.approx(correct.mean())
    assert m.bins.count == counts


def test_metrics_with_a_temperature_table_and_index(rng):
    z, y = overconfident_ensemble(rng, 400, 3, 4, 2.0)
    index = rng.integers(0, 3, 400)
    table = np.array([0.8, 1.6, 3.0])
    m = calibration_metrics(z, y, table, index)
    per_row = calibration_metrics(z, y, table[index])
    assert m.nll == per_row.nll == pytest.approx(reference_nll(z, y, table[index][None, :])[0], rel=1e-10)


def test_metrics_reject_bad_inputs(rng):
    p = rng.dirichlet(np.ones(3), size=10)
    y = rng.integers(0, 3, 10)
    with pytest.raises(ValueError, match="probabilities: expected rows summing to 1"):
        calibration_metrics(p * 2, y, probabilities=True)
    with pytest.raises(ValueError, match="probabilities: expected non-negative"):
        calibration_metrics(p - 0.5, y, probabilities=True)
    with pytest.raises(ValueError, match="temperature: expected positive"):
        calibration_metrics(p[:, None, :], y, -1.0)
    with pytest.raises(ValueError, match="temperature_index"):
        calibration_metrics(p[:, None, :], y, np.array([1.0, 2.0]), np.full(10, 2))
    from hitl_triage.kernels import EnsembleSignals

    signals = EnsembleSignals(*[np.zeros(10)] * len(EnsembleSignals.FIELDS))
    with pytest.raises(TypeError, match="expected logits"):
        calibration_metrics(signals, y)
