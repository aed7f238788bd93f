"""Checks of the benchmark machinery itself (run with ``python -m pytest bench``): the clock, the
report files, and the baselines the ratios are taken against. A wrong baseline would make every
speed-up in the report wrong, so the numpy and torch versions are held to the float64 spec,
degenerate rows included."""

from __future__ import annotations

import csv
import json
import time

import numpy as np
import pytest
import torch

from bench import peers
from bench.factories import make_logits, rows_for
from bench.report import Row, free_stem, write_reports
from bench.timing import measure


def test_measure_times_the_call_not_the_loop():
    # A 30 ms sleep: best must be at least the sleep and not wildly above (scheduler slack on a
    # shared machine can add a few ms, never 3x).
    t = measure(lambda: time.sleep(0.03), repeats=3, min_repeats=3)
    assert 0.03 <= t.best < 0.09, t
    assert t.repeats == 3 and t.best <= t.median


def test_measure_batches_fast_calls():
    calls = []
    t = measure(lambda: calls.append(1), repeats=3, min_repeats=3, min_sample_s=0.01, warmup=0)
    # The first (calibration) sample is dropped, then each sample holds many calls.
    assert len(calls) > 3 * 2 and t.repeats == 3
    assert t.best < 1e-3


def test_measure_stops_on_budget():
    t = measure(lambda: time.sleep(0.02), repeats=50, min_repeats=2, budget_s=0.05, warmup=0)
    assert 2 <= t.repeats < 10


def test_reports_round_trip(tmp_path):
    rows = [
        Row("s", "c", "impl", {"B": 10}, "float32", "rows/s", 1.5e6, 0.1, ratios={"vs numpy": 3.0},
            quality={"err": float("nan")}),
        Row("s", "c", "peer", status="not installed: because"),
    ]
    stem = free_stem(tmp_path, "m-2026-01-01")
    json_path, csv_path = write_reports({"run": {"mode": "quick"}}, rows, tmp_path, stem)
    data = json.loads(json_path.read_text())
    assert data["rows"][0]["quality"]["err"] is None  # NaN is not JSON
    assert data["rows"][1]["status"] == "not installed: because"
    with csv_path.open() as handle:
        lines = list(csv.DictReader(handle))
    assert [r["implementation"] for r in lines] == ["impl", "peer"]
    assert lines[0]["ratios"] == "vs numpy=3" and lines[0]["sizes"] == "B=10"
    assert free_stem(tmp_path, "m-2026-01-01") == "m-2026-01-01-2"


def _degenerate(z):
    z[0] = 0.75                    # all equal
    z[1, 0, 0] = np.nan
    z[2, -1, 1] = np.inf
    z[3, 0, -1] = -np.inf
    z[4] = 1e4 * np.sign(z[4])     # huge, finite
    return z


@pytest.mark.parametrize("shape", [(257, 5, 10), (33, 1, 1000), (64, 7, 3)])
@pytest.mark.parametrize("baseline", ["numpy", "torch"])
def test_baselines_follow_the_spec(baseline, shape):
    from hitl_triage.kernels.signals.reference import ensemble_signals_reference

    z = _degenerate(make_logits(*shape, seed=sum(shape)))
    t = torch.tensor([1.5])
    ref = ensemble_signals_reference(torch.from_numpy(z), t, None)
    out = peers.numpy_signals(z, 1.5) if baseline == "numpy" else peers.torch_signals(torch.from_numpy(z), 1.5)
    got = {k: (v.numpy() if isinstance(v, torch.Tensor) else np.asarray(v)) for k, v in out.items()}
    np.testing.assert_array_equal(got["valid"], ref.valid.numpy())
    valid = ref.valid.numpy()
    # Exact classes except near-ties (float32 vs float64): none in these draws beyond the huge row.
    assert (got["predicted_class"][valid] == ref.predicted_class.numpy()[valid]).mean() > 0.98
    assert (got["predicted_class"][~valid] == -1).all()
    # float32 formulas against float64: entropies of C <= 1000 classes in nats stay within 1e-5.
    for name in ("confidence", "margin", "total_entropy", "expected_entropy", "mutual_info", "vote_agreement"):
        np.testing.assert_allclose(got[name][valid], getattr(ref, name).numpy()[valid], atol=1e-5, rtol=0,
                                   err_msg=f"{baseline} {name}")
        assert np.isnan(got[name][~valid]).all(), f"{baseline} {name}: invalid rows must be NaN"


def test_rows_for_caps_elements():
    assert rows_for(10, 1000, 1_000_000, 10_000_000) == 1000
    assert rows_for(5, 10, 1000, 10_000_000) == 1000


def test_exact_kth_distance_matches_brute_force_float64():
    from bench.factories import normalise
    from bench.suites.knn import exact_kth_distance

    rng = np.random.default_rng(7)
    bank = rng.standard_normal((3000, 24)).astype(np.float32)
    queries = rng.standard_normal((257, 24)).astype(np.float32)
    b, q = normalise(bank).astype(np.float64), normalise(queries).astype(np.float64)
    brute = np.sort(np.sqrt(np.maximum(0, 2 - 2 * q @ b.T)), axis=1)
    for k in (1, 5, 50):
        # float64 on both sides: only summation order differs.
        np.testing.assert_allclose(exact_kth_distance(queries, bank, k, chunk=100), brute[:, k - 1], atol=1e-12, rtol=0)
