"""One feedback round on a small simulated fleet, through a real SQLite review queue worked by
simulated reviewers (serve/sim/reviewers.py) answering from the simulator's truth.

Set-up (tests/feedback_fixtures.py): the profile was fitted for the model before an update
(logits at overconfidence 1.2); the fleet runs the updated, overconfident model (2.5), with OOD
rows, a burst and a drifting source. Even rows are triaged and reviewed, odd rows are fresh
data of the same day on which every claim is checked against the truth (independent of the
engine: labels, kinds and errors come from the simulator)."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pyarrow as pa
import pytest

from hitl_triage.engine.calibration import calibration_metrics
from hitl_triage.engine.config import FeedbackConfig
from hitl_triage.engine.decode import decode_batch
from hitl_triage.engine.engine import TriageEngine
from hitl_triage.engine.feedback import next_profile
from hitl_triage.engine.profile import Profile
from hitl_triage.kernels.knn import set_faiss_threads
from hitl_triage.serve.cli import main
from hitl_triage.serve.service.engines import EngineHolder

import feedback_fixtures as ff

KNOWN_EDGE_CASE, ANOMALY = 64, 8  # DESIGN.md's bits, restated
MODEL_BITS = 1 | 2 | 8 | 64


@pytest.fixture(scope="module")
def loop(tmp_path_factory):
    # One FAISS thread: on the loaded 2-core machine a second OpenMP thread made the exact k-NN
    # search 7x slower (kernels/knn/faiss_cpu.py says why); the setting is restored after.
    set_faiss_threads(1)
    try:
        yield from _loop(tmp_path_factory)
    finally:
        set_faiss_threads()


def _loop(tmp_path_factory):
    calibration, bank, fleet, truth = ff.world()
    old = ff.fitted_profile(calibration, bank)
    reviewed, fresh = ff.halves(fleet)
    reviewed_truth, fresh_truth = ff.halves(truth)
    tmp = tmp_path_factory.mktemp("loop")
    _, verdicts = ff.reviewed_round(old, reviewed, reviewed_truth, tmp / "queue.db")
    result = next_profile(old, verdicts, calibration=calibration)
    # The same round with the split search taking the best candidate whatever its margin.
    argmax = next_profile(old, verdicts, calibration=calibration, config=FeedbackConfig(split_min_gain_se=0.0))
    fixed = next_profile(old, verdicts, calibration=calibration,
                         config=FeedbackConfig(split_min=(0.5, 0.25, 0.25), split_max=(0.5, 0.25, 0.25)))
    fresh_masks = {name: masks(p, fresh) for name, p in (("old", old), ("new", result.profile),
                                                          ("argmax", argmax.profile), ("fixed", fixed.profile))}
    yield dict(old=old, result=result, argmax=argmax, fixed=fixed, fresh=fresh, truth=fresh_truth, verdicts=verdicts,
               calibration=calibration, tmp=tmp, masks=fresh_masks)


def decide(profile: Profile, rows: pa.Table) -> pa.Table:
    return TriageEngine(profile, device="cpu").triage(rows)


def masks(profile: Profile, rows: pa.Table) -> np.ndarray:
    return decide(profile, rows).column("reason_mask").to_numpy()


def test_calibration_error_on_fresh_data_falls(loop):
    """Top-label ECE (15 bins) of the fresh in-scope rows at the old and the new temperature.

    Why these bounds: with n fresh rows, each bin's accuracy has a standard error of at most
    sqrt(0.25 / n_b), so the ECE estimate's noise is at most sqrt(0.25 / n) (0.0033 at the
    n = 23k in-scope fresh rows); the old temperature (fitted for the model before the update)
    leaves an ECE of 0.033 on this fleet, and the refit on about 1,500 audit verdicts (weight 75%,
    the old calibration rows 25%) removes most of it: measured 0.033 -> 0.014 (T 1.23 -> 1.89).
    The assertion asks for a drop of at least four times the noise bound (0.013) and to at most
    60% of the old value."""
    fresh, truth = loop["fresh"], loop["truth"]
    labels = truth.column("label").to_numpy()
    keep = labels >= 0
    x = decode_batch(fresh.filter(pa.array(keep)), device="cpu", embedding="ignore")
    y = labels[keep].astype(np.int64)
    old = calibration_metrics(x.logits, y, loop["old"].temperature).ece
    new = calibration_metrics(x.logits, y, loop["result"].profile.temperature).ece
    noise = math.sqrt(0.25 / len(y))
    assert old - new >= 4 * noise, (old, new, noise)
    assert new <= 0.6 * old, (old, new)
    # The report's own Horvitz-Thompson estimate on the audit verdicts says the same.
    t = loop["result"].report["temperature"]
    assert t["refit"] and t["audit_ece_new"] < t["audit_ece_old"]


def test_escalation_rate_holds_at_the_budget_on_fresh_data(loop):
    """The model triggers (with known edge cases, which budget mode pays for) escalate the
    budget's share of fresh traffic within three standard errors of a rate estimated from the
    refit rows: sqrt(b (1 - b) / n_eff), n_eff = (sum w)^2 / sum w^2 of their weights (Kish)."""
    rows = loop["result"].rows
    w = rows.column("weight").to_numpy()
    n_eff = w.sum() ** 2 / (w ** 2).sum()
    tolerance = 3 * math.sqrt(ff.BUDGET * (1 - ff.BUDGET) / n_eff)
    new_rate = ((loop["masks"]["new"] & MODEL_BITS) > 0).mean()
    old_rate = ((loop["masks"]["old"] & MODEL_BITS) > 0).mean()
    assert abs(new_rate - ff.BUDGET) <= tolerance, (new_rate, tolerance, n_eff)
    assert old_rate - ff.BUDGET > tolerance, old_rate  # the miscalibrated profile was off the budget


def test_in_scope_edge_cases_stop_escalating_on_every_source(loop):
    """Fresh in-scope rows the old version escalated for ANOMALY: under the new version's
    thresholds, the grown bank (in-scope edge cases added) fires ANOMALY on at most half as many
    of them as the old bank, alike on every source (the bank is shared by the fleet). Out-of-scope
    rows, which the bank did not learn, lose far less (some corrupted inputs, rescaled class
    rows, do lie near the new in-scope rows)."""
    old, new = loop["old"], loop["result"].profile
    assert new.bank.ntotal - old.bank.ntotal == loop["result"].report["bank"]["added"] > 50
    fresh, truth = loop["fresh"], loop["truth"]
    was_anomaly = (loop["masks"]["old"] & ANOMALY) > 0
    in_scope = truth.column("label").to_numpy() >= 0
    rows = fresh.filter(pa.array(was_anomaly & in_scope))
    out_of_scope = fresh.filter(pa.array(was_anomaly & ~in_scope))
    assert rows.num_rows > 100 and out_of_scope.num_rows > 100
    old_bank = dataclasses.replace(new, bank=old.bank, version="")  # the new version without the new rows
    sources = ff.FLEET.source_names
    kept = []
    for source in sources:
        as_source = rows.set_column(rows.schema.get_field_index("source"), "source", pa.array([source] * rows.num_rows))
        before = ((masks(old_bank, as_source) & ANOMALY) > 0).mean()
        after = ((masks(new, as_source) & ANOMALY) > 0).mean()
        assert after <= 0.5 * before and before > 0.3, (source, before, after)
        kept.append(after / before)
    assert max(kept) - min(kept) < 1e-12  # the same on every source
    ood_before = ((masks(old_bank, out_of_scope) & ANOMALY) > 0).mean()
    ood_after = ((masks(new, out_of_scope) & ANOMALY) > 0).mean()
    assert ood_after / ood_before >= 1.4 * kept[0], (ood_before, ood_after, kept[0])


def test_rows_near_a_watched_case_escalate_on_every_source(loop):
    new = loop["result"].profile
    watch, radius = new.watch, new.thresholds.watch_radius
    # At most the old anomaly threshold (the default cap: as far as the bank's k-th neighbour vouches).
    assert watch is not None and 0 < radius <= loop["old"].thresholds.ood
    assert len(watch) == loop["result"].report["watch"]["added"]
    rng = np.random.default_rng(7)
    # Rows a little off watched cases (within half the radius, checked by brute force in numpy),
    # with the logits of fresh rows the new version auto-accepts: only the watch list can fire.
    fresh = loop["fresh"]
    quiet = fresh.filter(pa.array(loop["masks"]["new"] == 0)).slice(0, 300)
    picks = rng.integers(0, len(watch), quiet.num_rows)
    step = rng.normal(size=(quiet.num_rows, watch.dim))
    step *= (0.4 * radius / np.linalg.norm(step, axis=1))[:, None]
    near = (watch.vectors[picks] + step).astype(np.float32)
    unit = near / np.linalg.norm(near, axis=1, keepdims=True)
    assert (np.linalg.norm(unit - watch.vectors[picks], axis=1) <= radius).all()
    embedding = pa.FixedSizeListArray.from_arrays(pa.array(near.reshape(-1)), watch.dim)
    for source in ff.FLEET.source_names:
        rows = quiet.set_column(quiet.schema.get_field_index("embedding"), "embedding", embedding)
        rows = rows.set_column(rows.schema.get_field_index("source"), "source", pa.array([source] * rows.num_rows))
        d = decide(new, rows)
        mask = d.column("reason_mask").to_numpy()
        assert ((mask & KNOWN_EDGE_CASE) > 0).all(), source
        assert (d.column("priority").to_numpy() >= 0.95).all()
        assert set(d.column("tier").to_pylist()) == {new.config.tiers.anomaly}
        assert not ((masks(loop["old"], rows) & KNOWN_EDGE_CASE) > 0).any()  # the old version has no watch list
    # In-distribution fresh rows stay clear as the radius promises (1 - clear_share, with three
    # binomial standard errors of slack); out-of-scope fresh rows are hit far more often.
    truth = loop["truth"]
    hit = (loop["masks"]["new"] & KNOWN_EDGE_CASE) > 0
    kind = np.asarray(truth.column("kind").to_pylist())
    in_dist = kind == "in_distribution"
    share = 1 - FeedbackConfig().watch_clear_share
    assert hit[in_dist].mean() <= share + 3 * math.sqrt(share / in_dist.sum()), hit[in_dist].mean()
    assert hit[kind == "unseen_class"].mean() > 10 * max(hit[in_dist].mean(), share)


def test_rechosen_split_catches_at_least_as_many_problems_per_reviewed_item(loop):
    """On fresh rows, problems (the model wrong, or an out-of-scope input: the simulator's truth)
    per escalated row, for the split the search picked against the configured 0.5/0.25/0.25 (the
    default round keeps it unless a candidate wins by 2 standard errors; the argmax round takes
    the best candidate; on this fleet both pick 0.8/0.1/0.1, 3.5 standard errors ahead on the audit
    verdicts). Measured on the fresh rows: 0.558 against 0.494."""
    assert loop["fixed"].profile.config.thresholds.split == (0.5, 0.25, 0.25)
    truth = loop["truth"]
    problem = truth.column("is_error").to_numpy(zero_copy_only=False) | truth.column("is_ood").to_numpy(zero_copy_only=False)

    def per_item(name):
        fired = (loop["masks"][name] & MODEL_BITS) > 0
        return problem[fired].mean()

    assert loop["argmax"].profile.config.thresholds.split != (0.5, 0.25, 0.25)  # the search moved
    assert per_item("argmax") >= per_item("fixed"), (per_item("argmax"), per_item("fixed"))
    assert per_item("new") >= per_item("fixed"), (per_item("new"), per_item("fixed"))
    search = loop["argmax"].report["split"]
    assert search["problems_per_item_chosen"] >= search["problems_per_item_fixed"]


def test_triage_feedback_writes_the_next_version_and_the_service_switches(loop, capsys):
    """The command on the same queue: a new directory beside the old one with the diff, a
    version that loads and that a server's engine holder switches to without a restart."""
    tmp = loop["tmp"]
    old_dir = loop["old"].save(tmp / "profile")
    calibration = tmp / "calibration.parquet"
    import pyarrow.parquet as pq

    pq.write_table(loop["calibration"], calibration)
    code = main(["feedback", "--profile", str(old_dir), "--queue", f"sqlite:///{tmp / 'queue.db'}",
                 "--calibration", str(calibration)])
    assert code == 0, capsys.readouterr().err
    out = tmp / "profile.g2"
    new = Profile.load(out)
    assert new.generation == 2 and new.parent == loop["old"].version
    assert new.version == loop["result"].profile.version  # the command and the API agree
    diff = (out / "FEEDBACK.md").read_text()
    for words in ("## Temperature", "## Split", "## Reference bank", "## Watch list", new.version):
        assert words in diff
    holder = EngineHolder(old_dir, device="cpu")
    assert holder.reload(out) == (loop["old"].version, new.version)
    # A second round reads only verdicts stored since (none): nothing to refit on is refused,
    # the bank and watch list are kept, and the version directory is never overwritten.
    code = main(["feedback", "--profile", str(out), "--queue", f"sqlite:///{tmp / 'queue.db'}", "--out", str(out)])
    assert code == 2 and "--out" in capsys.readouterr().err
    code = main(["feedback", "--profile", str(out), "--queue", f"sqlite:///{tmp / 'queue.db'}"])
    assert code == 0
    again = Profile.load(tmp / "profile.g3")
    assert again.temperature == new.temperature and again.bank.ntotal == new.bank.ntotal
