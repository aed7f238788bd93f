"""The pieces of a feedback round against independent references: the Horvitz-Thompson weighted
temperature fit (scipy's bounded Brent on a numpy float64 weighted NLL; integer weights against
duplicated rows), weighted metrics and weighted thresholds (against duplicated rows), the watch
radius (brute force), the KNOWN_EDGE_CASE rule in the engine (numpy distances), the watch list
in the profile directory, the age rule of the refit rows, and the errors."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pyarrow as pa
import pytest
import torch
from scipy.optimize import minimize_scalar
from scipy.special import logsumexp

from hitl_triage.engine.calibration import calibration_metrics, fit_temperature
from hitl_triage.engine.config import ConfigError, FeedbackConfig, PolicyConfig, TierConfig, TriageConfig
from hitl_triage.engine.engine import TriageEngine
from hitl_triage.engine.feedback import next_profile
from hitl_triage.engine.feedback_rows import FeedbackError, combine, final_verdicts, problem_of, rows_table
from hitl_triage.engine.policy import CategoryTables, RuleInputs
from hitl_triage.engine.profile import Profile, ProfileError
from hitl_triage.engine.thresholds import budget_thresholds, selective_risk_threshold
from hitl_triage.engine.watchlist import WatchList, fit_radius

from engine_fixtures import ANOMALY, KNOWN_EDGE_CASE, contract_table, known_ensemble


def weighted_nll_np(temperature: float, logits: np.ndarray, labels: np.ndarray, weights: np.ndarray) -> float:
    """sum_i w_i * -log mean_m softmax(z_im / T)[y_i] / sum_i w_i, in float64 (DESIGN.md's model)."""
    z = logits.astype(np.float64) / temperature
    log_p = z - logsumexp(z, axis=2, keepdims=True)                      # [N, M, C]
    log_mean = logsumexp(log_p, axis=1) - math.log(logits.shape[1])      # [N, C]
    return float(-(weights * log_mean[np.arange(len(labels)), labels]).sum() / weights.sum())


def brent_temperature(logits, labels, weights) -> float:
    res = minimize_scalar(lambda u: weighted_nll_np(math.exp(u), logits, labels, weights),
                          bounds=(math.log(0.05), math.log(20.0)), method="bounded", options={"xatol": 1e-10})
    return math.exp(res.x)


@pytest.mark.parametrize("distinct", ["strata", "continuous"])
def test_weighted_temperature_matches_brent_on_the_weighted_nll(rng, distinct):
    logits, labels, _ = known_ensemble(rng, 1537, members=3, classes=7, overconfidence=2.2)
    if distinct == "strata":  # Horvitz-Thompson: 1 / rate of a few strata
        weights = rng.choice([10.0, 20.0, 50.0, 100.0], size=len(labels))
    else:
        weights = rng.uniform(0.1, 5.0, size=len(labels))
    got = fit_temperature(logits, labels, sample_weight=weights).temperature
    want = brent_temperature(logits, labels, weights)
    unweighted = fit_temperature(logits, labels).temperature
    assert got == pytest.approx(want, rel=1e-6)
    assert abs(got - unweighted) > 1e-3  # the weights matter (the check would catch them ignored)


def test_integer_weights_equal_duplicated_rows_and_zero_weights_drop_rows(rng):
    logits, labels, _ = known_ensemble(rng, 901, members=4, classes=5)
    weights = rng.integers(0, 4, size=len(labels)).astype(np.float64)
    repeat = np.repeat(np.arange(len(labels)), weights.astype(int))
    fit = fit_temperature(logits, labels, sample_weight=weights)
    dup = fit_temperature(logits[repeat], labels[repeat])
    assert fit.temperature == pytest.approx(dup.temperature, rel=1e-7)
    # Weighted metrics are those of the duplicated rows.
    m = calibration_metrics(logits, labels, 1.7, sample_weight=weights)
    d = calibration_metrics(logits[repeat], labels[repeat], 1.7)
    for name in ("ece", "nll", "brier", "accuracy"):
        assert getattr(m, name) == pytest.approx(getattr(d, name), rel=1e-9, abs=1e-12), name
    with pytest.raises(ValueError, match="sample_weight: expected shape"):
        fit_temperature(logits, labels, sample_weight=weights[:-1])
    with pytest.raises(ValueError, match="sample_weight: expected finite non-negative"):
        fit_temperature(logits, labels, sample_weight=-weights)


def rule_inputs(rng, n: int) -> RuleInputs:
    members = 5
    t = lambda a, dtype=torch.float32: torch.from_numpy(np.asarray(a)).to(dtype)  # noqa: E731
    return RuleInputs(
        confidence=t(rng.uniform(0.2, 1.0, n).round(3)), mutual_info=t(rng.exponential(0.1, n).round(3)),
        vote_agreement=t(rng.choice([0.6, 0.8, 1.0], n)), predicted_class=t(rng.integers(0, 4, n), torch.int32),
        valid=t(rng.random(n) > 0.01, torch.bool), ood_score=t(rng.uniform(0.2, 1.4, n).round(3)),
        category_code=None, audit_sampled=torch.zeros(n, dtype=torch.bool), members=members, classes=4,
    )


def test_weighted_budget_thresholds_equal_the_unweighted_rule_on_duplicated_rows(rng):
    """Rounded scores tie, as real data do; a weight w is w copies of the row."""
    inputs = rule_inputs(rng, 3001)
    weights = rng.integers(1, 5, size=3001)
    repeat = torch.from_numpy(np.repeat(np.arange(3001), weights))
    tables = CategoryTables.build(PolicyConfig(), TierConfig(), "cpu")
    for split in ((0.5, 0.25, 0.25), (0.7, 0.1, 0.2)):
        got, rep = budget_thresholds(inputs, tables, 0.12, split, row_weights=weights.astype(float))
        want, ref = budget_thresholds(inputs.take(repeat), tables, 0.12, split)
        assert got == want and rep["union_rate"] == pytest.approx(ref["union_rate"], abs=1e-12)
    plain, _ = budget_thresholds(inputs, tables, 0.12)
    ones, _ = budget_thresholds(inputs, tables, 0.12, row_weights=np.ones(3001))
    assert plain == ones


def test_weighted_selective_risk_uses_kish_effective_size(rng):
    confidence = rng.uniform(0.3, 1.0, 4000)
    correct = rng.random(4000) < confidence
    plain = selective_risk_threshold(confidence, correct, 0.1, 0.05)
    # Equal weights: n_eff = n and the same errors, whatever the weight.
    doubled = selective_risk_threshold(confidence, correct, 0.1, 0.05, row_weights=np.full(4000, 2.0))
    assert doubled["threshold"] == plain["threshold"] and doubled["coverage"] == pytest.approx(plain["coverage"])
    # Unequal weights: the bound is taken at n_eff = (sum w)^2 / sum w^2 of the accepted rows.
    w = rng.choice([1.0, 10.0], 4000)
    rep = selective_risk_threshold(confidence, correct, 0.1, 0.05, row_weights=w)
    accepted = confidence >= rep["threshold"]
    n_eff = w[accepted].sum() ** 2 / (w[accepted] ** 2).sum()
    assert rep["accepted_rows"] == pytest.approx(n_eff, rel=1e-9)
    assert rep["empirical_risk"] == pytest.approx((w * ~correct)[accepted].sum() / w[accepted].sum(), rel=1e-9)


@pytest.mark.parametrize("clear", [0.999, 0.95, 0.5])
def test_watch_radius_is_the_largest_that_keeps_the_share_clear(rng, clear):
    d = rng.uniform(0, 1, 2003).astype(np.float32).round(2)  # ties
    d[:7] = np.nan
    r = fit_radius(d, clear, max_radius=2.0)
    allowed = math.floor((1 - clear) * len(d) + 1e-9)
    near = lambda radius: int(np.sum(d[~np.isnan(d)] <= radius))  # noqa: E731
    assert near(r) <= allowed
    if r == -1.0:  # the sentinel: even radius 0 would take in too many (tied zero distances)
        assert near(0.0) > allowed
    else:  # and no larger float32 radius would do
        assert near(float(np.nextafter(np.float32(r), np.float32(np.inf)))) > allowed
    assert fit_radius(d, clear, max_radius=0.001) <= 0.001
    assert fit_radius(np.zeros(10, np.float32), 0.95, 0.5) == -1.0  # nothing can be near: the rule never fires


@pytest.fixture(scope="module")
def small_profile():
    rng = np.random.default_rng(11)
    logits, labels, _ = known_ensemble(rng, 800, members=3, classes=4)
    emb = rng.normal(size=(800, 8)).astype(np.float32)
    calibration = contract_table([f"c-{i}" for i in range(800)], logits, embedding=emb, label=labels)
    config = TriageConfig()
    config.policy.on_missing_embedding = "escalate"
    return Profile.fit(calibration, bank=rng.normal(size=(400, 8)).astype(np.float32), config=config)


def with_watch(profile: Profile, vectors: np.ndarray, radius: float) -> Profile:
    watch = WatchList(vectors, [{"id": f"w-{i}"} for i in range(len(vectors))])
    return dataclasses.replace(profile, watch=watch, thresholds=dataclasses.replace(profile.thresholds, watch_radius=radius),
                               version="")


def test_known_edge_case_fires_within_the_radius_on_every_source(rng, small_profile, tmp_path):
    watched = rng.normal(size=(5, 8)).astype(np.float32)
    profile = with_watch(small_profile, watched, 0.3)
    n = 400
    emb = rng.normal(size=(n, 8)).astype(np.float32)
    emb[: n // 2] = watched[rng.integers(0, 5, n // 2)] + 0.08 * rng.normal(size=(n // 2, 8))
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    nearest = np.linalg.norm(unit(emb)[:, None, :] - unit(watched)[None], axis=2).min(axis=1)
    away = np.abs(nearest - 0.3) > 1e-4  # rows on the boundary are left to float32 rounding
    logits, _, _ = known_ensemble(rng, n, members=3, classes=4)
    missing = np.zeros(n, bool)
    missing[-3:] = True
    for source in ("cam-a", "cam-b", "cam-c"):
        rows = contract_table([f"r-{i}" for i in range(n)], logits, embedding=emb, source=[source] * n,
                              embedding_null=missing)
        d = TriageEngine(profile, device="cpu").triage(rows)
        mask = d.column("reason_mask").to_numpy()
        hit = (mask & KNOWN_EDGE_CASE) > 0
        expected = (nearest <= 0.3) & ~missing
        assert (hit[away] == expected[away]).all() and expected.sum() > 150
        assert (d.column("priority").to_numpy()[hit] >= 0.95).all()
        assert set(np.asarray(d.column("tier").to_pylist(), dtype=object)[hit]) == {profile.config.tiers.anomaly}
        assert ((mask[missing] & ANOMALY) > 0).all() and not hit[missing].any()  # NaN is not "near", but escalates
    # The watch list lives in the profile directory, hashed: saved and loaded, it decides alike.
    directory = profile.save(tmp_path / "p")
    loaded = Profile.load(directory)
    assert loaded.version == profile.version != small_profile.version
    np.testing.assert_array_equal(loaded.watch.vectors, profile.watch.vectors)
    np.testing.assert_array_equal(TriageEngine(loaded, device="cpu").triage(rows).column("reason_mask").to_numpy(), mask)
    assert "watch" not in small_profile.to_toml_dict()  # a profile without one hashes as before
    vectors = np.load(directory / "watch" / "vectors.npy")
    vectors[0, 0] += 0.5
    np.save(directory / "watch" / "vectors.npy", vectors)
    with pytest.raises(ProfileError, match="hashes to"):
        Profile.load(directory)


def rows_of(rng, n: int, weight: float, origin: str) -> pa.Table:
    logits = pa.FixedSizeListArray.from_arrays(
        pa.FixedSizeListArray.from_arrays(pa.array(rng.normal(size=n * 6).astype(np.float32)), 3), 2)
    return rows_table(ids=pa.array([f"{origin}-{i}" for i in range(n)]), logits=logits, embedding=None, source=None,
                      label=np.zeros(n), problem=np.zeros(n, bool), ood_score=np.full(n, np.nan),
                      weight=rng.uniform(0.5, 2.0, n) * weight, origin=origin)


def test_the_age_rule_weights_new_audit_rows_against_older_rows(rng):
    old, new = rows_of(rng, 3000, 1.0, "calibration"), rows_of(rng, 200, 50.0, "audit g1")
    rows = combine(old, new, old_share=0.25, min_share=0.01)
    w = rows.column("weight").to_numpy()
    origin = np.asarray(rows.column("origin").to_pylist())
    assert w[origin == "audit g1"].sum() == pytest.approx(0.75) and w[origin == "calibration"].sum() == pytest.approx(0.25)
    ratio = w[origin == "audit g1"] / new.column("weight").to_numpy()
    assert np.allclose(ratio, ratio[0])  # relative Horvitz-Thompson weights kept
    # Three rounds on: round r's rows share 0.75 * 0.25^(age) of the weight (the calibration rows
    # 0.25^age); a row under min_share of an average row is dropped.
    g2, g3, g4 = (rows_of(rng, 200, 1.0, f"audit g{r}") for r in (2, 3, 4))
    later = combine(combine(combine(rows, g2, 0.25, 0.01), g3, 0.25, 0.01), g4, 0.25, 0.01)
    share = {"calibration": 0.25 ** 4, "audit g1": 0.75 * 0.25 ** 3, "audit g2": 0.75 * 0.25 ** 2,
             "audit g3": 0.75 * 0.25, "audit g4": 0.75}
    expected, total = {}, 0
    for part in (old, new, g2, g3, g4):
        w0 = part.column("weight").to_numpy()
        shares = w0 / w0.sum() * share[part.column("origin")[0].as_py()]
        expected.update(zip(part.column("id").to_pylist(), shares))
        total += part.num_rows
    kept = {i for i, w in expected.items() if w >= 0.01 / total}
    # The drop happens round by round (a row dropped earlier changes later averages a little):
    # the rows kept are those the final shares keep, up to rows right at the edge.
    got = set(later.column("id").to_pylist())
    assert len(got ^ kept) <= 0.01 * len(kept), (len(got), len(kept))
    assert not any(i.startswith("calibration") for i in got) and len(got) == 800  # every audit row kept
    assert combine(None, new, 0.25, 0.01).column("weight").to_numpy().sum() == pytest.approx(1.0)


def test_final_verdicts_and_problems():
    verdicts = pa.table({
        "id": ["a", "a", "b", "c", "c"], "action": ["escalate", "correct", "confirm", "correct", "out_of_scope"],
        "label": [-1, 2, 1, 1, -1], "predicted_class": [1, 1, 1, 1, 1],
    })
    final = final_verdicts(verdicts)
    assert final.column("id").to_pylist() == ["a", "b", "c"]
    assert final.column("action").to_pylist() == ["correct", "confirm", "out_of_scope"]
    assert problem_of(final).tolist() == [True, False, True]
    blind = pa.table({"id": ["d"], "action": ["correct"], "label": [1], "predicted_class": [1]})
    assert problem_of(blind).tolist() == [False]  # a blind "correct" to the predicted class confirms


def test_refusals_name_what_is_wrong(small_profile):
    with pytest.raises(FeedbackError, match="expected a 'action' column"):
        final_verdicts(pa.table({"id": ["a"], "label": [1]}))
    empty = pa.table({"id": pa.array([], pa.string()), "action": pa.array([], pa.string()),
                      "label": pa.array([], pa.int32())})
    with pytest.raises(FeedbackError, match="at least 200 audit-sampled verdicts"):
        next_profile(small_profile, empty)
    with pytest.raises(ConfigError, match="feedback.split_min / split_max"):
        FeedbackConfig(split_min=(0.5, 0.5, 0.5)).check()
    with pytest.raises(ConfigError, match="feedback.old_share"):
        FeedbackConfig(old_share=1.5).check()


def test_both_queue_backends_give_feedback_the_same_rows_and_edge_cases(tmp_path, small_profile):
    """The verdict export carries the logits and the kept embeddings on SQLite and on a real
    redis-server alike, so feedback reads the same audit rows and edge cases from either."""
    from hitl_triage.engine.feedback_rows import audit_rows, edge_cases
    from hitl_triage.serve.queue import QueueOptions, open_queue
    from hitl_triage.serve.sim.reviewers import SimReviewer, work_queue

    from queue_fixtures import redis_server

    rng = np.random.default_rng(5)
    n = 1500
    logits, labels, _ = known_ensemble(rng, n, members=3, classes=4)
    emb = rng.normal(size=(n, 8)).astype(np.float32)
    emb[:100] *= 0.02  # near the origin after a shift: far from the bank's directions
    emb[:100] += 3.0
    predictions = contract_table([f"p-{i}" for i in range(n)], logits, embedding=emb, source=["cam-0"] * n)
    profile = dataclasses.replace(small_profile, config=dataclasses.replace(
        small_profile.config, audit=dataclasses.replace(small_profile.config.audit, base_rate=0.2)), version="")
    decisions = TriageEngine(profile, device="cpu").triage(predictions)
    truth = {f"p-{i}": (-1 if i < 50 else int(labels[i])) for i in range(n)}
    options = QueueOptions(keep_embedding=True, blind_audit=False)
    exports = []
    with redis_server(tmp_path) as redis_url:
        for url in (f"sqlite:///{tmp_path / 'q.db'}", redis_url):
            with open_queue(url, options) as queue:
                queue.enqueue(decisions, predictions)
                work_queue(queue, [SimReviewer(f"r-{t}", t) for t in options.tiers], truth)
                exports.append(final_verdicts(queue.verdicts()).sort_by("id"))
    sqlite_final, redis_final = exports
    assert sqlite_final.num_rows == redis_final.num_rows > 200
    for name in ("id", "action", "label", "logits", "embedding", "audit_weight", "reason_mask"):
        assert sqlite_final.column(name).equals(redis_final.column(name)), name
    a, b = audit_rows(sqlite_final, "g1"), audit_rows(redis_final, "g1")
    assert a.num_rows > 100 and a.equals(b)
    for x, y in zip(edge_cases(sqlite_final), edge_cases(redis_final)):
        assert x.column("id").equals(y.column("id"))
    watched = edge_cases(sqlite_final)[1]
    assert watched.num_rows > 0 and set(watched.column("action").to_pylist()) <= {"out_of_scope", "correct"}


def test_a_target_risk_profile_is_refitted_in_its_own_mode(tmp_path):
    """Target-risk mode on the weighted rows: the chosen confidence threshold's Kish-sized
    Clopper-Pearson bound is within the target (recomputed here with scipy), and the version
    saves and loads."""
    from scipy.stats import beta

    from hitl_triage.serve.queue import QueueOptions, open_queue
    from hitl_triage.serve.sim.reviewers import SimReviewer, work_queue

    rng = np.random.default_rng(8)
    n = 6000
    logits, labels, _ = known_ensemble(rng, n + 2000, members=3, classes=4, overconfidence=1.0)
    emb = rng.normal(size=(n + 2000, 8)).astype(np.float32)
    config = TriageConfig()
    config.thresholds.mode, config.thresholds.target_risk = "target_risk", 0.1
    config.audit.base_rate = 0.1
    calibration = contract_table([f"c-{i}" for i in range(2000)], 3 * logits[n:], embedding=emb[n:], label=labels[n:])
    profile = Profile.fit(calibration, bank=rng.normal(size=(500, 8)).astype(np.float32), config=config)
    predictions = contract_table([f"p-{i}" for i in range(n)], logits[:n], embedding=emb[:n], source=["s"] * n)
    decisions = TriageEngine(profile, device="cpu").triage(predictions)
    with open_queue(f"sqlite:///{tmp_path / 'q.db'}", QueueOptions(keep_embedding=True, blind_audit=False)) as queue:
        queue.enqueue(decisions, predictions)
        work_queue(queue, [SimReviewer(f"r-{t}", t) for t in queue.options.tiers], {f"p-{i}": int(labels[i]) for i in range(n)})
        verdicts = queue.verdicts()
    result = next_profile(profile, verdicts, calibration=calibration)
    chosen = result.report["thresholds_report"]
    assert chosen["mode"] == "target_risk" and chosen["feasible"]
    assert result.profile.temperature < 0.6 * profile.temperature  # the fleet's logits are a third as sharp
    n_eff, errors = chosen["accepted_rows"], chosen["errors"]
    bound = beta.ppf(1 - chosen["delta_per_test"], errors + 1, n_eff - errors)
    assert bound == pytest.approx(chosen["risk_bound"], rel=1e-9) and bound <= 0.1
    loaded = Profile.load(result.profile.save(tmp_path / "next"))
    assert loaded.version == result.profile.version and loaded.config.thresholds.mode == "target_risk"


def test_triage_feedback_refuses_bad_input_in_one_line(tmp_path, capsys, small_profile):
    from hitl_triage.serve.cli import main

    code = main(["feedback", "--profile", str(tmp_path / "absent"), "--queue", f"sqlite:///{tmp_path / 'q.db'}"])
    err = capsys.readouterr().err
    assert code == 2 and "profile.toml" in err and len(err.strip().splitlines()) == 1
    directory = small_profile.save(tmp_path / "p")
    code = main(["feedback", "--profile", str(directory), "--queue", "postgres://nowhere"])
    err = capsys.readouterr().err
    assert code == 2 and "queue url" in err
    # An empty queue: nothing to refit on and no earlier rows is refused, and no directory appears.
    code = main(["feedback", "--profile", str(directory), "--queue", f"sqlite:///{tmp_path / 'q.db'}"])
    err = capsys.readouterr().err
    assert code == 2 and "feedback.min_audit_verdicts" in err and not (tmp_path / "p.g2").exists()
