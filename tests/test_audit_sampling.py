"""Stratified audit sampling through the engine (issue 3, item 5).

Independent references: the audit draw recomputed with the ``xxhash`` package (DESIGN.md: the
row is sampled when XXH64(id, seed) >> 11 scaled to [0, 1) falls under its stratum's rate), the
override precedence restated from config.AuditConfig's docstring, exact binomial intervals from
scipy, and the Horvitz-Thompson variance under Poisson sampling.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from scipy.stats import binomtest

from engine_fixtures import (  # noqa: F401  (one_torch_thread: an autouse fixture)
    AUDIT,
    assert_tables_equal,
    audit_uniform_np,
    column,
    contract_table,
    known_ensemble,
    one_torch_thread,
)
from hitl_triage.engine.config import TriageConfig
from hitl_triage.engine.engine import TriageEngine
from hitl_triage.engine.profile import Profile

SOURCES, TRAFFIC = ["src-a", "src-b", "src-c", "src-d"], [0.4, 0.3, 0.2, 0.1]
CATEGORIES, CATEGORY_SHARE = ["general", "legal"], [0.9, 0.1]
EDGES = [0.5, 0.8, 0.95]

AUDITS = {
    # source x predicted_class; a one-column override, a more specific two-column one that must
    # win over it, a later one-column override that wins a tie, and a rate of 0.
    "source-class": {
        "seed": 987_654_321, "base_rate": 0.05, "strata": ["source", "predicted_class"],
        "overrides": [
            {"match": {"source": "src-b"}, "rate": 0.2},
            {"match": {"source": "src-c", "predicted_class": 2}, "rate": 0.5},
            {"match": {"predicted_class": 2}, "rate": 0.01},
            {"match": {"source": "src-d"}, "rate": 0.0},
        ],
    },
    # confidence bin x category: low-confidence rows audited heavily (so a naive mean of audit
    # rows is biased), unscoreable rows (bin len(edges) + 1) always, legal rows more often.
    "confidence-category": {
        "seed": 3, "base_rate": 0.03, "strata": ["confidence_bin", "category"], "confidence_bins": EDGES,
        "overrides": [
            {"match": {"confidence_bin": 0}, "rate": 0.4},
            {"match": {"category": "legal"}, "rate": 0.25},
            {"match": {"confidence_bin": len(EDGES) + 1}, "rate": 1.0},
        ],
    },
}


@pytest.fixture(scope="module")
def fitted():
    rng = np.random.default_rng(20_240_601)
    logits, labels, _ = known_ensemble(rng, 5000, classes=6, spread=3.0)
    return Profile.fit(contract_table([f"cal-{i}" for i in range(5000)], logits, label=labels))


@pytest.fixture(scope="module")
def traffic():
    """40k rows to triage, with their true labels; a few unscoreable rows."""
    rng = np.random.default_rng(7)
    rows = 40_000
    logits, labels, _ = known_ensemble(rng, rows, classes=6, spread=3.0)
    logits[rng.choice(rows, 40, replace=False), 0, 0] = np.nan
    return {
        "logits": logits, "labels": labels,
        "source": rng.choice(SOURCES, rows, p=TRAFFIC), "category": rng.choice(CATEGORIES, rows, p=CATEGORY_SHARE),
        "string_ids": np.array([f"pred-{i:07d}-{rng.integers(1 << 30)}" for i in range(rows)]),
        "int_ids": rng.integers(-(1 << 62), 1 << 62, rows, dtype=np.int64),
    }


def audited_profile(profile, audit: dict):
    config = copy.deepcopy(profile.config.to_dict())
    config["audit"] = copy.deepcopy(audit)
    return dataclasses.replace(profile, config=TriageConfig.from_dict(config), version="")


def batch_of(traffic, ids="string_ids"):
    return contract_table(traffic[ids], traffic["logits"], source=traffic["source"], category=traffic["category"])


def expected_rates(audit: dict, decisions, traffic) -> np.ndarray:
    """float64 [N]: each row's rate by AuditConfig's documented precedence (the override naming
    the most columns wins; among equals, the later one), from the decisions' columns."""
    confidence = column(decisions, "confidence").astype(np.float64)
    bins = np.where(np.isnan(confidence), len(EDGES) + 1, np.searchsorted(EDGES, confidence, side="right"))
    values = {"source": traffic["source"], "category": traffic["category"],
              "predicted_class": column(decisions, "predicted_class"), "confidence_bin": bins}
    rates = np.full(len(confidence), audit["base_rate"])
    best = np.full(len(confidence), -1)
    for i, override in enumerate(audit["overrides"]):
        matched = np.ones(len(confidence), bool)
        for name, value in override["match"].items():
            matched &= values[name].astype(str) == str(value)
        rank = len(override["match"]) * 1000 + i
        take = matched & (rank > best)
        rates[take], best[take] = override["rate"], rank
    return rates


def strata_of(audit: dict, decisions, traffic) -> np.ndarray:
    confidence = column(decisions, "confidence").astype(np.float64)
    bins = np.where(np.isnan(confidence), len(EDGES) + 1, np.searchsorted(EDGES, confidence, side="right"))
    values = {"source": traffic["source"], "category": traffic["category"],
              "predicted_class": column(decisions, "predicted_class"), "confidence_bin": bins}
    return np.array([",".join(f"{name}={values[name][i]}" for name in audit["strata"])
                     for i in range(len(confidence))], dtype=object)


@pytest.fixture(scope="module", params=sorted(AUDITS))
def audited(request, fitted, traffic):
    audit = AUDITS[request.param]
    profile = audited_profile(fitted, audit)
    return audit, profile, TriageEngine(profile, device="cpu").triage(batch_of(traffic))


# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ids", ["string_ids", "int_ids"])
def test_audit_decisions_are_the_documented_hash_draw(fitted, traffic, ids):
    audit = AUDITS["source-class"]
    decisions = TriageEngine(audited_profile(fitted, audit), device="cpu").triage(batch_of(traffic, ids))
    rates = expected_rates(audit, decisions, traffic)
    uniform = audit_uniform_np(list(traffic[ids]))(audit["seed"])
    sampled = uniform < rates
    weight = column(decisions, "audit_weight")
    np.testing.assert_array_equal(weight > 0, sampled)
    np.testing.assert_array_equal((column(decisions, "reason_mask") & AUDIT) > 0, sampled)
    # audit_weight = 1 / rate on sampled rows (float32), exactly 0 elsewhere.
    np.testing.assert_allclose(weight[sampled], 1.0 / rates[sampled], rtol=1e-6)
    assert (weight[~sampled] == 0).all() and weight.dtype == np.float32
    assert sampled.sum() > 1000
    assert not sampled[traffic["source"] == "src-d"].any()  # rate 0: never, and no division by 0


def test_audit_stratum_names_the_strata(audited, traffic):
    audit, _, decisions = audited
    sampled = column(decisions, "audit_weight") > 0
    stratum = column(decisions, "audit_stratum")
    assert all(s is None for s in stratum[~sampled])
    np.testing.assert_array_equal(stratum[sampled], strata_of(audit, decisions, traffic)[sampled])


def test_per_stratum_rates_are_within_a_binomial_interval(audited, traffic):
    audit, _, decisions = audited
    rates = expected_rates(audit, decisions, traffic)
    strata = strata_of(audit, decisions, traffic)
    sampled = column(decisions, "audit_weight") > 0
    names = sorted(set(strata))
    # Exact two-sided binomial test per stratum; Bonferroni over the strata keeps the chance of a
    # false alarm anywhere at 0.1% (the draw is a fixed hash, so this data either passes or not).
    level = 1e-3 / len(names)
    tested = 0
    for name in names:
        rows = strata == name
        n, k = int(rows.sum()), int(sampled[rows].sum())
        rate = np.unique(rates[rows])
        assert rate.size == 1, f"stratum {name} mixes rates {rate}"
        if rate[0] in (0.0, 1.0):
            assert k == (n if rate[0] == 1.0 else 0), name
            continue
        if n < 30:
            continue
        tested += 1
        p = binomtest(k, n, rate[0]).pvalue
        assert p >= level, f"stratum {name}: {k} of {n} sampled at rate {rate[0]} (p = {p:.2g})"
    assert tested >= 8
    # The configured overrides are in force where they should be.
    assert set(np.unique(rates)) == {audit["base_rate"], *(o["rate"] for o in audit["overrides"])}


def test_audit_is_identical_across_batch_splits(audited, traffic):
    _, profile, whole = audited
    batch = batch_of(traffic)
    cuts = [0, 1, 2, 1000, 9_999, 10_000, 27_351, batch.num_rows]  # 7 uneven pieces, one of 1 row
    engine = TriageEngine(profile, device="cpu")
    pieces = [engine.triage(batch.slice(a, b - a)) for a, b in zip(cuts[:-1], cuts[1:])]
    assert len(pieces) == 7
    joined = pa.Table.from_batches(pieces)
    assert_tables_equal(joined, whole)


def test_audit_is_identical_in_another_process(fitted, traffic, tmp_path):
    """Both configurations triaged in one child process (a process start costs seconds)."""
    pq.write_table(batch_of(traffic), tmp_path / "batch.parquet")
    here = {}
    for name, audit in AUDITS.items():
        profile = audited_profile(fitted, audit)
        profile.save(tmp_path / name)
        here[name] = TriageEngine(profile, device="cpu").triage(batch_of(traffic))
    script = textwrap.dedent(f"""
        import pyarrow as pa, pyarrow.parquet as pq
        from hitl_triage.engine.engine import TriageEngine
        from hitl_triage.engine.profile import Profile
        batch = pq.read_table({str(tmp_path / "batch.parquet")!r})
        for name in {sorted(AUDITS)!r}:
            engine = TriageEngine(Profile.load({str(tmp_path)!r} + "/" + name), device="cpu")
            pq.write_table(pa.Table.from_batches([engine.triage(batch)]), {str(tmp_path)!r} + f"/{{name}}.parquet")
    """)
    # The child runs with one OpenMP thread and this process with whatever it has: the decisions
    # must not depend on that either.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-c", script], check=True, timeout=300, env=env)
    for name, decisions in here.items():
        other = pq.read_table(tmp_path / f"{name}.parquet")
        assert_tables_equal(other, decisions, columns=["id", "reason_mask", "audit_weight", "audit_stratum",
                                                       "escalate", "tier", "profile_version"])


def test_another_seed_draws_another_sample(fitted, traffic):
    audit = copy.deepcopy(AUDITS["source-class"])
    first = TriageEngine(audited_profile(fitted, audit), device="cpu").triage(batch_of(traffic))
    audit["seed"] += 1
    second = TriageEngine(audited_profile(fitted, audit), device="cpu").triage(batch_of(traffic))
    a, b = column(first, "audit_weight") > 0, column(second, "audit_weight") > 0
    # Independent draws at rates r overlap on about sum(r^2) rows, far fewer than either sample.
    assert abs(a.sum() - b.sum()) < 0.2 * a.sum() and (a & b).sum() < 0.35 * a.sum()


def test_horvitz_thompson_estimates_accuracy_from_audit_rows(audited, traffic):
    audit, _, decisions = audited
    rates = expected_rates(audit, decisions, traffic)
    correct = (column(decisions, "predicted_class") == traffic["labels"]).astype(np.float64)
    weight = column(decisions, "audit_weight").astype(np.float64)
    sampled = weight > 0
    covered = rates > 0  # rows no stratum can audit are outside any audit-based estimate
    truth = correct[covered].mean()
    estimate = (weight * correct)[covered].sum() / covered.sum()
    # Exact standard deviation of the HT total under Poisson sampling: sum (1 - p) / p * y^2.
    p = rates[covered]
    sd = math.sqrt(np.sum((1 - p) / p * correct[covered] ** 2)) / covered.sum()
    assert abs(estimate - truth) < 4 * sd, (estimate, truth, sd)
    # The weights also estimate the number of rows they stand for.
    sd_rows = math.sqrt(np.sum((1 - p) / p))
    assert abs(weight[covered].sum() - covered.sum()) < 4 * sd_rows
    # Where rates differ by confidence, the unweighted mean of audit rows is biased; the weights
    # are what makes the estimate right.
    if audit["strata"][0] == "confidence_bin":
        naive = correct[sampled & covered].mean()
        assert abs(naive - truth) > 4 * sd, "the design of this case needs a biased naive mean"
