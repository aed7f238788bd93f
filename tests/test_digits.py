"""A real dataset a Python package ships: scikit-learn's handwritten digits (issue 3, "How it is
shown"), through serve/sim/digits.make_digits_files: a 5-member MLP ensemble trained here on digits
0-7 (8 and 9 held out as "unseen_class", plus corrupted scans), its calibration, bank and fleet
files, a profile fitted on them and the fleet triaged.

Figures measured on the shared 2-core machine for seeds 0-5 (make_digits_files' seed), used to
set the floors below:

    seed            0      1      2      3      4      5
    T             0.94   0.72   0.99   0.97   0.86   0.72
    ECE before   .0196  .0181  .0274  .0198  .0192  .0215   (holdout, 15 bins)
    ECE after    .0152  .0148  .0270  .0189  .0162  .0203
    AUROC unseen  .911   .891   .902   .893   .902   .904   (k-NN ood_score, unseen vs in-dist.)
"""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
from sklearn.metrics import roc_auc_score

from engine_fixtures import (  # noqa: F401  (one_torch_thread: an autouse fixture)
    column,
    ece_np,
    embedding_of,
    kth_distance_np,
    logits_of,
    one_torch_thread,
    signals_np,
    torch_threads,
)
from hitl_triage.engine.engine import TriageEngine
from hitl_triage.engine.profile import Profile
from hitl_triage.serve.sim.digits import make_digits_files

SEED = 0


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    directory = tmp_path_factory.mktemp("digits")
    with torch_threads(1):  # see engine_fixtures.torch_threads: 45 s against 1 s a member
        files = make_digits_files(directory / "fleet.parquet", seed=SEED)
    calibration = pq.read_table(files.calibration)
    bank = pq.read_table(files.bank, columns=["embedding"])
    profile = Profile.fit(calibration, bank=bank)
    fleet = pq.read_table(files.fleet)
    truth = pq.read_table(files.truth)
    decisions = TriageEngine(profile, device="cpu").triage(fleet)
    return {"profile": profile, "fleet": fleet, "truth": truth, "bank": bank, "decisions": decisions}


def test_temperature_scaling_lowers_holdout_ece(digits):
    report = digits["profile"].fit_report["calibration"]
    before, after = report["holdout_before"]["ece"], report["holdout_after"]["ece"]
    # This ensemble is close to calibrated already (T = 0.72-0.99 over seeds: averaging bootstrap
    # members makes it a little underconfident), so the gain is small: 0.0004-0.0044 over six
    # seeds, every one positive. The large-gain case is test_profile's overconfident ensemble.
    assert after < before, (before, after)
    assert 0.5 < digits["profile"].temperature < 1.5


def test_calibrated_ece_on_the_fleet_matches_the_fit_report_scale(digits):
    """Independently of the fit report: numpy ECE of the engine's confidence on the fleet's
    in-distribution rows (which neither the temperature nor the thresholds saw)."""
    truth, decisions = digits["truth"], digits["decisions"]
    inside = column(truth, "kind") == "in_distribution"
    label = column(truth, "label")[inside]
    ece = ece_np(column(decisions, "confidence")[inside], column(decisions, "predicted_class")[inside] == label)
    # ~1800 rows: ECE's sampling noise is ~0.01; the holdout ECE after scaling is ~0.015.
    assert ece < 0.04, ece
    accuracy = np.mean(column(decisions, "predicted_class")[inside] == label)
    assert accuracy > 0.9, accuracy


def test_knn_ood_score_separates_the_held_out_digits(digits):
    truth, decisions = digits["truth"], digits["decisions"]
    kind = column(truth, "kind")
    ood = column(decisions, "ood_score")
    chosen = (kind == "in_distribution") | (kind == "unseen_class")
    auroc = roc_auc_score(kind[chosen] == "unseen_class", ood[chosen])
    # Floor 0.85: measured 0.891-0.911 over six seeds (0.911 at seed 0). The Hanley-McNeil
    # standard error with ~180 unseen rows (36 images x 5 shifts, so fewer independent ones) and
    # ~1800 in-distribution rows is ~0.012, so 0.85 is more than 3 standard errors under the
    # lowest seed, and 30 above chance (0.5). A broken score (wrong k, unnormalised vectors,
    # distances to the wrong bank) falls well below it.
    assert auroc > 0.85, auroc

    # The engine's score is the k-th neighbour distance of DESIGN.md: check against brute force.
    expected = kth_distance_np(embedding_of(digits["fleet"]), embedding_of(digits["bank"]), digits["profile"].k)
    assert roc_auc_score(kind[chosen] == "unseen_class", expected[chosen]) == pytest.approx(auroc, abs=1e-3)
    np.testing.assert_allclose(ood, expected, atol=1e-4)

    # Corrupted scans (noise, blanked pixels) are far easier: measured 0.993-0.996.
    corrupted = (kind == "in_distribution") | (kind == "corrupted")
    assert roc_auc_score(kind[corrupted] == "corrupted", ood[corrupted]) > 0.95


def test_escalations_catch_the_held_out_digits(digits):
    """End to end: the default budget policy escalates far more of the unseen and corrupted rows
    than of the in-distribution ones."""
    truth, decisions = digits["truth"], digits["decisions"]
    kind = column(truth, "kind")
    escalate = column(decisions, "escalate")
    rate_in = escalate[kind == "in_distribution"].mean()
    rate_unseen = escalate[kind == "unseen_class"].mean()
    rate_corrupted = escalate[kind == "corrupted"].mean()
    assert rate_in < 0.25, rate_in  # the default budget is 10% of in-distribution traffic
    # Measured at seed 0: 12% of in-distribution, 79% of unseen and 97% of corrupted rows.
    assert rate_unseen > 3 * rate_in and rate_corrupted > 5 * rate_in, (rate_in, rate_unseen, rate_corrupted)
    valid = column(decisions, "valid")
    assert valid.all()
    reference = signals_np(logits_of(digits["fleet"]), digits["profile"].temperature)
    np.testing.assert_allclose(column(decisions, "confidence"), reference["confidence"], atol=2e-5)
