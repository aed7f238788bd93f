"""Issue 19 through the command line: ``triage fit`` then ``triage run`` on an IVF bank decide
anomalies as exact search does, and fit's expected rates are the run's.

A simulated fleet with unseen classes between the seen ones, an OOD burst and drift
(``knn_reference.FLEET``), a bank of 10k vectors (IVF: above the automatic flat limit), k = 5,
10 and 50, everything else as a user gets it (``triage fit`` with a config that only sets k).
Checked against FAISS's flat search re-scored by the spec in numpy (``knn_reference.exact_kth``):

- the ANOMALY bit of every fleet row equals "exact distance > threshold": zero differing bits;
- ``ood_score`` equals the exact distance on every row escalated for anomaly and on every row
  re-scored; every other row lies at or below the threshold and over-estimates, as an IVF scan
  can only do;
- the priority of a row escalated for anomaly alone is the documented severity of its *exact*
  distance, min(1, (d - t) / t) (engine/policy.py), and at least that with other reasons;
- the run's summary counts the rows actually re-scored: every call of the exact re-scoring is
  recorded, and the fleet rows it received are the rows of the ``ood_rescored`` column, each once,
  as many as ``triage run`` prints;
- ``triage fit``'s expected rate of every trigger equals the rate ``triage run`` fires on the same
  (holdout) rows.
"""

from __future__ import annotations

import contextlib
import io
import re
from collections import Counter

import numpy as np
import pyarrow.parquet as pq
import pytest

from engine_fixtures import (  # noqa: F401  (one_torch_thread: an autouse fixture)
    ANOMALY, CONFIDENCE, DISAGREEMENT, POLICY, REPORTED, audit_uniform_np, column, one_torch_thread,
)
from knn_reference import FLEET, exact_kth, unit_spec

#: fit.py's split of the calibration rows (restated: the holdout is the rows whose audit draw at
#: this seed falls below calibration.holdout, 0.5 by default).
SPLIT_SEED = 0x7E57_5EED
HOLDOUT = 0.5


def triage(*argv) -> str:
    """``triage ARGV`` in this process; its printed output (it must exit 0)."""
    from hitl_triage.serve.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main([str(a) for a in argv])
    assert code == 0, out.getvalue()[-2000:]
    return out.getvalue()


def embeddings(table) -> np.ndarray:
    values = table.column("embedding").combine_chunks()
    return values.values.to_numpy().reshape(len(values), -1)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    from hitl_triage.serve.sim import FleetConfig, simulate_fleet

    d = tmp_path_factory.mktemp("knn-cli")
    files = simulate_fleet(d / "fleet.parquet", FleetConfig(rows=12_000, bank_rows=10_000, calibration_rows=6000,
                                                              seed=1919, **FLEET))
    return d, files


@pytest.fixture
def rescoring_calls(monkeypatch):
    """Every query row the exact re-scoring receives (unit rows as bytes), over all its calls."""
    from hitl_triage.kernels.knn import exact

    received: list[bytes] = []
    search = exact.exact_search_cpu

    def recording(q, *args, **kwargs):
        received.extend(np.ascontiguousarray(row).tobytes() for row in q)
        return search(q, *args, **kwargs)

    monkeypatch.setattr(exact, "exact_search_cpu", recording)
    return received


@pytest.mark.parametrize("k", [5, 10, 50])
def test_fit_and_run_decide_anomalies_as_exact_search(k, fleet, rescoring_calls):
    from hitl_triage.engine.profile import Profile

    d, files = fleet
    (d / f"k{k}.toml").write_text(f"[bank]\nk = {k}\n")
    profile_dir = d / f"profile-k{k}"
    triage("fit", "--calibration", files.calibration, "--bank", files.bank, "--out", profile_dir,
           "--config", d / f"k{k}.toml")
    profile = Profile.load(profile_dir)
    assert profile.bank.kind == "ivf" and profile.k == k
    t = np.float32(profile.thresholds.ood)

    # -- the fleet: decisions, distances and priorities against exact search -------------------
    rescoring_calls.clear()
    printed = triage("run", "--profile", profile_dir, files.fleet, "--out", d / f"decisions-k{k}.parquet")
    decisions = pq.read_table(d / f"decisions-k{k}.parquet")
    queries = embeddings(pq.read_table(files.fleet, columns=["embedding"]))
    exact = exact_kth(queries, profile.bank.host_unit(), k)  # FAISS flat over the profile's unit rows
    mask = column(decisions, "reason_mask").astype(np.int64)
    ood = column(decisions, "ood_score")
    rescored = column(decisions, "ood_rescored")
    fired = (mask & ANOMALY) > 0
    differ = np.flatnonzero(fired != (exact > t))
    assert differ.size == 0, f"k={k}: {differ.size} ANOMALY bits differ from exact search (first row {differ[0]})"
    assert 50 < fired.sum() < len(fired) // 2, "the fleet must put rows on both sides of the threshold"
    assert np.array_equal(ood[fired], exact[fired]) and np.array_equal(ood[rescored], exact[rescored])
    left = ~rescored
    assert np.all(ood[left] <= t) and np.all(ood[left] >= exact[left] - 1e-6)
    assert left.sum() > len(left) // 2, "most rows must be left to the approximate search (else nothing is saved)"

    severity = np.clip((exact - t) / np.float32(max(float(t), 1e-6)), 0, 1).astype(np.float32)
    priority = column(decisions, "priority")
    alone = fired & ((mask & (CONFIDENCE | DISAGREEMENT | POLICY | REPORTED)) == 0) & column(decisions, "valid")
    assert alone.sum() > 20 and np.array_equal(priority[alone], severity[alone])
    assert np.all(priority[fired] >= severity[fired])

    # -- the rows actually re-scored, and the count the run prints ------------------------------
    row_of = {row.tobytes(): i for i, row in enumerate(unit_spec(queries))}
    hits = Counter(row_of[r] for r in rescoring_calls if r in row_of)
    assert max(hits.values()) == 1, "a row was re-scored twice"
    assert sorted(hits) == np.flatnonzero(rescored).tolist()
    count = int(re.search(r"k-NN re-scored exactly\s*│\s*([\d,]+)", printed).group(1).replace(",", ""))
    assert count == len(hits) == int(rescored.sum())

    # -- fit's expected rates are the rates the run fires on the holdout rows -------------------
    triage("run", "--profile", profile_dir, files.calibration, "--out", d / f"calibration-k{k}.parquet")
    on_calibration = pq.read_table(d / f"calibration-k{k}.parquet")
    holdout = audit_uniform_np(column(on_calibration, "id"))(SPLIT_SEED) < HOLDOUT
    mask = column(on_calibration, "reason_mask").astype(np.int64)[holdout]
    expected = profile.fit_report["expected_rates"]
    for name, bit in (("confidence", CONFIDENCE), ("disagreement", DISAGREEMENT), ("anomaly", ANOMALY),
                      ("policy", POLICY)):
        fired_count = int(((mask & bit) > 0).sum())
        assert expected[name] == pytest.approx(fired_count / holdout.sum(), abs=1e-12), (name, k)
    assert int(((mask & ANOMALY) > 0).sum()) > 10
