"""Online budget control (engine/budget_control.py): a sliding-window quantile tracker per trigger
that keeps the escalation rate at the budget while the traffic drifts.

Oracles, independent of the code under test: the window rebuilt here from the stream (every
``sample_every``-th row by stream position, the last ``window_rows``), its exact order statistics
in float64 numpy, and the escalation rule restated in numpy (DESIGN.md: confidence < t, mutual
information > t, k-NN distance > t, unscoreable rows and missing embeddings always)."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest

from hitl_triage.engine.budget_control import BudgetControl
from hitl_triage.engine.config import ConfigError, PolicyConfig, TierConfig, TriageConfig
from hitl_triage.engine.policy import CategoryTables, Thresholds
from hitl_triage.engine.profile import Profile

from engine_fixtures import one_torch_thread  # noqa: F401  (autouse)


def decisions(confidence, mutual_info=None, ood=None, valid=None) -> pa.Table:
    n = len(confidence)
    valid = np.ones(n, bool) if valid is None else valid
    return pa.table({
        "confidence": pa.array(np.where(valid, confidence, np.nan).astype(np.float32)),
        "mutual_info": pa.array((np.zeros(n) if mutual_info is None else np.where(valid, mutual_info, np.nan)).astype(np.float32)),
        "vote_agreement": pa.array(np.ones(n, np.float32)),
        "predicted_class": pa.array(np.zeros(n, np.int32)),
        "valid": pa.array(valid),
        "ood_score": pa.array((np.full(n, np.nan) if ood is None else ood).astype(np.float32)),
    })


def control(thresholds, *, budget, split, members=1, anomaly=False, **options):
    tables = CategoryTables.build(PolicyConfig(), TierConfig(), "cpu")
    return BudgetControl(thresholds, budget=budget, split=split, vote_floor=0.0, tables=tables, members=members,
                         classes=4, anomaly=anomaly, **options)


def fires(t: Thresholds, d: pa.Table, *, members: int, anomaly: bool) -> np.ndarray:
    """The model triggers of the rule, restated in numpy (float32 comparisons, as the engine)."""
    conf = d.column("confidence").to_numpy(zero_copy_only=False)
    mi = d.column("mutual_info").to_numpy(zero_copy_only=False)
    ood = d.column("ood_score").to_numpy(zero_copy_only=False)
    invalid = ~d.column("valid").to_numpy(zero_copy_only=False)
    out = (conf < np.float32(t.confidence)) | invalid
    if members > 1:
        out |= (mi > np.float32(t.mutual_info)) | invalid
    if anomaly:
        out |= (ood > np.float32(t.ood)) | np.isnan(ood)
    return out


@pytest.mark.parametrize("sample_every", [1, 3])
def test_each_step_is_the_exact_order_statistic_of_the_window(rng, sample_every):
    """One trigger (M=1, no bank): the threshold at each step leaves exactly floor(b * W) of the
    window's rows below it, the invalid rows (NaN confidence, which always fire) included."""
    window, budget = 1000, 0.1  # b * W = 100 rows, an integer: no rounding to argue about
    c = control(Thresholds(confidence=0.5), budget=budget, split=(1, 0, 0), window_rows=window,
                sample_every=sample_every, step_rows=700)
    stream_conf, stream_valid, steps = [], [], 0
    for size in rng.integers(1, 900, 40):  # odd batch sizes, some smaller than the stride
        conf = rng.beta(5, 2, size)
        valid = rng.random(size) > 0.02
        stream_conf.append(conf)
        stream_valid.append(valid)
        if not c.observe(decisions(conf, valid=valid)):
            continue
        steps += 1
        allc, allv = np.concatenate(stream_conf), np.concatenate(stream_valid)
        picked = np.arange(0, len(allc), sample_every)[-window:]  # the window, rebuilt from the stream
        wc = allc[picked].astype(np.float32).astype(np.float64)
        wv = allv[picked]
        assert np.array_equal(c.window()["valid"], wv)
        np.testing.assert_array_equal(c.window()["confidence"][wv], wc[wv].astype(np.float32))
        k = int(budget * window)
        expected = np.sort(wc[wv])[k - int((~wv).sum())]  # the invalid rows are the first to fire
        assert c.thresholds.confidence == expected
        assert int(((wc < c.thresholds.confidence) & wv).sum() + (~wv).sum()) == k
        assert c.step == steps and c.history()[-1].thresholds.confidence == expected
    assert steps >= 5


def test_three_triggers_share_the_budget_by_the_split_on_the_window(rng):
    window, budget, split = 4000, 0.12, (0.5, 0.25, 0.25)
    c = control(Thresholds(confidence=0.5, mutual_info=0.3, ood=1.0), budget=budget, split=split, members=5,
                anomaly=True, window_rows=window, sample_every=1, step_rows=window)
    n = window
    conf, mi, ood = rng.beta(5, 2, n), rng.exponential(0.1, n), rng.normal(1.0, 0.2, n)
    ood[rng.random(n) < 0.01] = np.nan  # missing embeddings: always anomalous
    batch = decisions(conf, mi, ood)
    assert c.observe(batch)
    t = c.thresholds
    union = fires(t, batch, members=5, anomaly=True).mean()
    assert abs(union - budget) <= 2 / n
    # every threshold is one of the window's own values (an order statistic)
    assert np.float32(t.confidence) in batch.column("confidence").to_numpy()
    assert np.float32(t.mutual_info) in batch.column("mutual_info").to_numpy()
    assert np.float32(t.ood) in batch.column("ood_score").to_numpy()
    solo = {"confidence": (conf.astype(np.float32) < np.float32(t.confidence)).mean(),
            "disagreement": (mi.astype(np.float32) > np.float32(t.mutual_info)).mean(),
            "anomaly": ((ood.astype(np.float32) > np.float32(t.ood)) | np.isnan(ood)).mean()}
    # the solo rates keep the split's proportions (one row of rounding each)
    assert solo["confidence"] / solo["disagreement"] == pytest.approx(2.0, abs=4 / (solo["disagreement"] * n))
    assert solo["disagreement"] / solo["anomaly"] == pytest.approx(1.0, abs=4 / (solo["anomaly"] * n))
    assert c.window_rate() == pytest.approx(union, abs=1e-12)


def drifting_batch(rng, tau: float, rows: int) -> pa.Table:
    """Traffic at time tau in [0, 1]: confidences fall, mutual information and k-NN distances rise."""
    conf = rng.beta(6 - 1.5 * tau, 2, rows)
    mi = rng.exponential(0.05 * (1 + 0.75 * tau), rows)
    ood = rng.normal(1.0 + 0.15 * tau, 0.15, rows)
    return decisions(conf, mi, ood)


def test_a_drifting_stream_stays_at_the_budget_where_fixed_thresholds_drift_away(rng):
    """Batches of 4096 rows, a window of 8192 sampled rows (every 2nd: 16384 rows of traffic), a
    step after every batch, budget 0.1. Tolerance, from the stream itself: a batch's own rate has
    a binomial sd of sqrt(0.1 * 0.9 / 4096) = 0.0047 and the window's estimate one of
    sqrt(0.09 / 8192) = 0.0033; and a window lags the traffic it is applied to by its mean age,
    half its span plus the batch (8192 + 4096 rows: 3 batches), over which the rate moves by at
    most the fixed thresholds' drift per batch. So each batch after the warm-up within that lag
    bias + 4 sd of the budget, and the mean error within the bias + 1 sd."""
    budget, rows, batches, members = 0.1, 4096, 60, 5
    window, every = 8192, 2
    start = control(Thresholds(confidence=0.5, mutual_info=0.3, ood=1.0), budget=budget, split=(0.5, 0.25, 0.25),
                    members=members, anomaly=True, window_rows=8192, sample_every=1, step_rows=8192)
    start.observe(drifting_batch(rng, 0.0, 8192))  # the "fit": thresholds of the traffic at tau = 0
    fixed = start.thresholds
    c = control(fixed, budget=budget, split=(0.5, 0.25, 0.25), members=members, anomaly=True, window_rows=window,
                sample_every=every, step_rows=rows)
    controlled, static = [], []
    for i in range(batches):
        batch = drifting_batch(rng, i / (batches - 1), rows)
        controlled.append(fires(c.thresholds, batch, members=members, anomaly=True).mean())  # decided, then observed
        static.append(fires(fixed, batch, members=members, anomaly=True).mean())
        c.observe(batch)
    assert static[-1] >= 0.25 and static[0] <= 0.13  # fixed thresholds drift far from the budget
    sd = math.sqrt(budget * (1 - budget) / rows + budget * (1 - budget) / window)
    lag_batches = (window * every / 2 + rows) / rows
    bias = (max(static) - min(static)) / batches * lag_batches
    warm = window * every // rows  # the window fills after 4 batches
    errors = np.abs(np.array(controlled[warm:]) - budget)
    assert errors.max() <= bias + 4 * sd and errors.mean() <= bias + sd, (errors.max(), errors.mean(), bias, sd)
    assert abs(static[-1] - budget) > 5 * (bias + 4 * sd)  # the tolerance is far from what fixed ones do
    assert c.step == batches - warm + 1 and math.isnan(c.history()[0].window_rate)


def test_from_profile_needs_budget_mode_and_options_are_checked(rng):
    config = TriageConfig()
    config.thresholds.mode, config.thresholds.budget = "budget", 0.2
    profile = Profile(members=1, classes=4, dim=None, temperature=1.0, thresholds=Thresholds(confidence=0.4),
                      config=config)
    c = BudgetControl.from_profile(profile, window_rows=64, step_rows=64, sample_every=1)
    assert c.budget == 0.2 and c.profile_version == profile.version and c.state()["step"] == 0
    assert c.state()["thresholds"]["confidence"] == 0.4
    config.thresholds.mode = "target_risk"
    with pytest.raises(ConfigError, match="thresholds.mode: expected 'budget'.*found 'target_risk'"):
        BudgetControl.from_profile(profile)
    with pytest.raises(ConfigError, match="budget_control.window_rows: expected an integer >= 16, found 3"):
        control(Thresholds(confidence=0.4), budget=0.1, split=(1, 0, 0), window_rows=3)
    with pytest.raises(ValueError, match="decisions: expected a 'valid' column"):
        c.observe(decisions(rng.random(10)).drop_columns(["valid"]))


# ------------------------------------------------------------------------------------------------
# The service's hook: steps between batches, each decision names its step, Stats and metrics
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def budget_profile(tmp_path_factory):
    """A budget-mode profile (b = 0.15, bank of D=16) fitted on a small simulated fleet, saved."""
    from engine_fixtures import fleet_tables

    directory = tmp_path_factory.mktemp("budget")
    fleet, _, calibration, bank = fleet_tables(6000, calibration_rows=3000, bank_rows=1000)
    config = TriageConfig()
    config.thresholds.mode, config.thresholds.budget = "budget", 0.15
    profile = Profile.fit(calibration, bank=bank, config=config)
    profile.save(directory / "profile")
    return directory, fleet, profile


def test_service_steps_between_batches_and_each_step_reproduces_its_decisions(budget_profile, tmp_path):
    import dataclasses

    from hitl_triage.engine.engine import TriageEngine
    from hitl_triage.serve.proto.triage.v1 import triage_pb2
    from hitl_triage.serve.service.config import ServeConfig
    from hitl_triage.serve.service.engines import EngineHolder
    from hitl_triage.serve.service.grpc_server import TriageServicer
    from hitl_triage.serve.service.metrics import Metrics
    from hitl_triage.serve.service.server import Service

    directory, fleet, profile = budget_profile
    (tmp_path / "profile").symlink_to(directory / "profile")
    serve = ServeConfig.from_toml(None, budget_control={"enabled": True, "window_rows": 1024, "sample_every": 2,
                                                        "step_rows": 1500})
    service = Service(EngineHolder(tmp_path / "profile", device="cpu"), None, serve)
    try:
        decided = []
        for start in range(0, fleet.num_rows, 1000):
            batch = fleet.slice(start, 1000).combine_chunks().to_batches()[0]
            decided.append((batch, service.decide(batch)))
        history = {s.step: s.thresholds for s in service.budget.control.history()}
        steps = [int(d.column("budget_step")[0].as_py()) for _, d in decided]
        # window full after 2048 rows, then a step every 1500: batches 0-2 at step 0, 3-4 at 1, ...
        assert steps == [0, 0, 0, 1, 1, 2]
        assert history[0] == profile.thresholds and history[1] != history[0]
        base = Profile.load(tmp_path / "profile")
        for batch, decisions in decided:
            step = int(decisions.column("budget_step")[0].as_py())
            again = TriageEngine(dataclasses.replace(base, thresholds=history[step]), device="cpu").triage(batch)
            assert decisions.drop_columns(["budget_step"]).equals(again), step  # the step names its thresholds
        state = service.stats()["budget"]
        assert state["enabled"] and state["step"] == 2 and state["profile_version"] == profile.version
        assert state["thresholds"]["confidence"] == service.budget.control.thresholds.confidence
        answer = TriageServicer(service).Stats(triage_pb2.StatsRequest(), None)
        assert answer.budget.enabled and answer.budget.step == 2 and answer.budget.budget == 0.15
        assert answer.budget.thresholds.ood == state["thresholds"]["ood"]
        metrics = Metrics()
        metrics.refresh(service)
        assert metrics.registry.get_sample_value("hitl_triage_budget_step") == 2
        assert metrics.registry.get_sample_value("hitl_triage_budget_threshold", {"trigger": "mutual_info"}) == \
            pytest.approx(state["thresholds"]["mutual_info"])
        # A reload starts again at step 0; a profile budget control cannot hold (target-risk mode)
        # is served at its own thresholds, its batches still naming step 0.
        import copy

        risk = copy.deepcopy(base.config)
        risk.thresholds.mode = "target_risk"
        dataclasses.replace(base, config=risk, version="", generation=2).save(tmp_path / "risk")
        service.engines.reload(tmp_path / "risk")
        batch = fleet.slice(0, 500).combine_chunks().to_batches()[0]
        decisions = service.decide(batch)
        assert set(decisions.column("budget_step").to_pylist()) == {0}
        assert service.stats()["budget"] == {"enabled": False}
        assert not TriageServicer(service).Stats(triage_pb2.StatsRequest(), None).budget.enabled
        service.engines.reload(tmp_path / "profile")
        service.decide(batch)
        assert service.stats()["budget"]["step"] == 0 and service.budget.control.rows_seen == 500
    finally:
        service.batcher.close()
    with pytest.raises(ConfigError, match="thresholds.mode: expected 'budget'"):  # at the start, not per batch
        Service(EngineHolder(tmp_path / "risk", device="cpu"), None, serve)


def test_triage_serve_with_budget_control_shows_it_in_stats_and_metrics(budget_profile, tmp_path):
    """A real `triage serve` with [serve.budget_control] from its triage.toml: decisions name
    their step over triage.v1, Stats and the Prometheus endpoint show the step it reached."""
    import time

    import grpc

    from hitl_triage.serve.proto.triage.v1 import triage_pb2, triage_pb2_grpc
    from hitl_triage.serve.service.ipc import read_batch, write_batch

    from service_fixtures import scrape, served

    directory, fleet, profile = budget_profile
    options = {"enabled": True, "window_rows": 512, "sample_every": 1, "step_rows": 1000}
    with served(directory / "profile", None, tmp_path, "--flight-port", "-1", "--device", "cpu", "--metrics-port", "0",
                config={"budget_control": options}, env={"OMP_NUM_THREADS": "1"}) as server:
        with grpc.insecure_channel(server.grpc) as channel:
            stub = triage_pb2_grpc.TriageStub(channel)
            steps = []
            for start in range(0, 4000, 1000):
                batch = fleet.slice(start, 1000).combine_chunks().to_batches()[0]
                decisions = read_batch(stub.Triage(triage_pb2.TriageRequest(arrow_ipc=write_batch(batch))).arrow_ipc)
                steps.append(set(decisions.column("budget_step").to_pylist()))
            stats = stub.Stats(triage_pb2.StatsRequest())
        assert steps == [{0}, {1}, {2}, {3}]  # a step after every 1000 rows once 512 are in the window
        assert stats.budget.enabled and stats.budget.step == 4 and stats.budget.rows_seen == 4000
        assert stats.budget.profile_version == profile.version and stats.budget.window_rows == 512
        deadline = time.monotonic() + 30
        while True:  # the gauges are refreshed every 2 s
            samples = scrape(server.ports["metrics"])
            if samples.get(("hitl_triage_budget_step", ())) == 4 or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert samples[("hitl_triage_budget_step", ())] == 4
        assert samples[("hitl_triage_budget_threshold", (("trigger", "confidence"),))] == \
            pytest.approx(stats.budget.thresholds.confidence)
