"""calibration: our temperature fit (``hitl_triage.engine.calibration.fit_temperature``) against
netcal's ``TemperatureScaling`` and a plain torch LBFGS fit (the widely copied reference method: one
``LBFGS(lr=0.01, max_iter=50)`` step from T=1.5, which may stop short of the optimum; its ECE shows it),
on the same labelled data, for a single model (M=1: the ensemble's first member) and the ensemble
(M=5).

Per (rows, M, implementation): fit seconds (best of several; rows fitted per second as the
throughput), the fitted temperature, and ECE (15 equal-width bins on the top-label confidence,
computed here, independently of every implementation) and NLL of the calibrated predictions on a
held-out half of the rows, with ECE before calibration (T=1) beside it.

netcal calibrates probabilities, not an ensemble's members: it is given the ensemble-mean
probabilities and fits ``softmax(log p / T)``, a different model from ours for M > 1 (ours and the
LBFGS fit divide each member's logits by T before its softmax and average); the table says so.
Our fit also computes ECE/NLL/Brier before and after inside the timed call; the peers do not.
"""

from __future__ import annotations

import time

import numpy as np

from .. import peers
from ..factories import fleet_data
from ..report import Row
from ..runner import NotAvailableYet
from .common import failure, time_call

SUITE = "calibration"
TABLE_QUALITY = ("T", "ece_before", "ece_after", "nll_after")
TABLE_HIDE = ("dtype", "best s", "compile s")
BINS = 15


def ece(probabilities: np.ndarray, labels: np.ndarray, bins: int = BINS) -> float:
    """Expected calibration error: top-label confidence in ``bins`` equal-width bins [b/bins,
    (b+1)/bins), the last closed at 1; sum over bins of (rows in bin / rows) x |accuracy - mean
    confidence|."""
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == labels
    index = np.minimum((confidence * bins).astype(np.int64), bins - 1)
    total = 0.0
    for b in range(bins):
        in_bin = index == b
        if in_bin.any():
            total += in_bin.mean() * abs(correct[in_bin].mean() - confidence[in_bin].mean())
    return float(total)


def nll(probabilities: np.ndarray, labels: np.ndarray) -> float:
    """Mean -log p[label] in nats (p clipped at float64 epsilon, as scikit-learn's log_loss)."""
    p = probabilities[np.arange(len(labels)), labels]
    return float(-np.log(np.clip(p, np.finfo(np.float64).eps, 1.0)).mean())


def ensemble_probabilities(logits: np.ndarray, temperature: float) -> np.ndarray:
    """mean_m softmax(z_m / T) in float64, [N, C]."""
    z = logits.astype(np.float64) / temperature
    z -= z.max(axis=2, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=2, keepdims=True)
    return p.mean(axis=1)


def _sizes(quick: bool) -> list[int]:
    return [20_000] if quick else [20_000, 200_000]


def run(ctx) -> None:
    try:
        from hitl_triage.engine.calibration import fit_temperature  # noqa: F401
    except ImportError as exc:
        raise NotAvailableYet(f"hitl_triage.engine.calibration: {exc}") from exc
    sizes = _sizes(ctx.quick)
    data = fleet_data(1, bank_rows=0, calibration_rows=max(sizes), seed=ctx.seed + 11)
    ctx.note(f"data: labelled calibration rows of the {data.origin}; fit on one half, ECE/NLL on the other")
    task = ctx.task(SUITE, total=len(sizes) * 2)
    for rows in sizes:
        z_all = data.calibration_logits[:rows]
        y_all = data.calibration_labels[:rows].astype(np.int64)
        half = rows // 2
        for members in (1, 5):
            ctx.progress.update(task, description=f"{SUITE}: {rows:,} rows, M={members}")
            z = np.ascontiguousarray(z_all[:, :members])
            fit_z, fit_y, eval_z, eval_y = z[:half], y_all[:half], z[half:], y_all[half:]
            before = ece(ensemble_probabilities(eval_z, 1.0), eval_y)
            case_rows = [
                _measure(ctx, label, fit, fit_z, fit_y, eval_z, eval_y, before, members)
                for label, fit in _implementations(members)
            ]
            _ratios(case_rows)
            for r in case_rows:
                ctx.add(r)
            ctx.advance(task)
    ctx.progress.remove_task(task)


def _implementations(members: int):
    """(label, fit) where fit(logits, labels) returns predict(eval logits) -> (probabilities, T),
    or (label, "status") for a peer that cannot run."""
    from hitl_triage.engine.calibration import fit_temperature

    def ours(z, y):
        t = fit_temperature(z, y).temperature
        return lambda ez: (ensemble_probabilities(ez, t), t)

    def lbfgs(z, y):
        t = peers.torch_lbfgs_temperature(z, y)
        return lambda ez: (ensemble_probabilities(ez, t), t)

    impls = [("ours: fit_temperature", ours), ("torch LBFGS", lbfgs)]
    try:
        temperature_scaling = peers.load_peer("netcal")

        def netcal_fit(z, y):
            model = temperature_scaling()
            model.fit(ensemble_probabilities(z, 1.0), y, tensorboard=False)
            # netcal multiplies the log-probabilities by its "temperature" (a weight): T = 1 / weight.
            t = 1.0 / float(np.asarray(model.temperature).reshape(-1)[0])

            def predict(ez):
                p = np.asarray(model.transform(ensemble_probabilities(ez, 1.0)), dtype=np.float64)
                return p / p.sum(axis=1, keepdims=True), t
            return predict
        impls.append(("netcal TemperatureScaling" + (" (on mean probs)" if members > 1 else ""), netcal_fit))
    except peers.PeerMissing as exc:
        impls.append(("netcal TemperatureScaling", str(exc)))
    return impls


def _measure(ctx, label, fit, fit_z, fit_y, eval_z, eval_y, before: float, members: int) -> Row:
    rows = len(fit_y)
    row = Row(SUITE, f"{rows:,} fit rows, M={members}", label, {"rows": rows, "M": members, "C": fit_z.shape[2]},
              "float32", unit="rows/s")
    if isinstance(fit, str):
        row.status = fit
        return row
    try:
        t0 = time.perf_counter()
        predict = fit(fit_z, fit_y)
        row.compile_s = time.perf_counter() - t0  # first fit: numba compilation lands here
        # Fits take seconds: quick mode settles for one timed fit after the first when they are slow.
        timing = time_call(ctx, lambda: fit(fit_z, fit_y), warmup=0, budget_s=3.0, quick_min_repeats=1,
                           full_budget_s=20.0)
        probabilities, temperature = predict(eval_z)
    except Exception as exc:  # noqa: BLE001 - a peer that fails is reported, never dropped
        row.status = failure(exc)
        return row
    row.seconds, row.median_s, row.repeats = timing.best, timing.median, timing.repeats
    row.throughput = rows / timing.best
    row.quality = {
        "T": temperature,
        "ece_before": before,
        "ece_after": ece(probabilities, eval_y),
        "nll_after": nll(probabilities, eval_y),
        "fit_s": timing.best,
    }
    return row


def _ratios(rows: list[Row]) -> None:
    """Fit speed-up against netcal and the torch LBFGS fit of the same case."""
    base = {}
    for r in rows:
        if r.ok and r.implementation.startswith("netcal"):
            base["netcal"] = r.seconds
        elif r.ok and r.implementation == "torch LBFGS":
            base["torch LBFGS"] = r.seconds
    for r in rows:
        if r.ok and r.seconds:
            r.ratios = {f"vs {name}": seconds / r.seconds for name, seconds in base.items()}
