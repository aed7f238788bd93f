"""TriageEngine on a fitted profile: signal columns, reason bits, tiers and priority against an
independent recomputation (issue 3, "reason bits matching an independent recomputation"), and
bad input (NaN/inf logits, missing embeddings, shape mismatches, out-of-range labels).

The references live in tests/engine_fixtures.py: numpy float64 signals, brute-force k-NN, and
the documented rules of engine/policy.py restated in numpy.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re

import numpy as np
import pyarrow as pa
import pytest

from engine_fixtures import (  # noqa: F401  (one_torch_thread: an autouse fixture)
    BITS,
    one_torch_thread,
    ANOMALY,
    AUDIT,
    CONFIDENCE,
    assert_tables_equal,
    DISAGREEMENT,
    POLICY,
    column,
    contract_table,
    embedding_of,
    expected_rules,
    fleet_tables,
    kth_distance_np,
    known_ensemble,
    logits_of,
    signals_np,
)
from hitl_triage.engine.config import TriageConfig
from hitl_triage.engine.decode import BatchError
from hitl_triage.engine.engine import TriageEngine
from hitl_triage.engine.monitoring import TriageSummary
from hitl_triage.engine.policy import Thresholds
from hitl_triage.engine.profile import Profile, ProfileError

# Rules that make every bit and tier path fire on the simulated fleet: a stricter confidence floor
# for "medical", mandatory review of "legal" with its own tier and priority, a vote floor, and an
# audit rate high enough to put audit bits on rows that carry other bits too.
RULES = {
    "policy": {
        "mandatory_categories": ["legal"],
        "category_min_confidence": {"medical": 0.95},
        "category_tier": {"medical": "specialist", "legal": "adjudicator"},
        "category_priority": {"legal": 0.8},
        "on_missing_embedding": "escalate",
    },
    "thresholds": {"vote_floor": 0.8},
    "audit": {"base_rate": 0.03},
}

# Rows of the triaged batch made unscoreable on purpose (positions in the batch).
NAN_ROWS, POSINF_ROWS, NEGINF_ROWS, NULL_LOGITS_ROWS = [3, 500], [7, 900], [11], [13, 1400]
NULL_EMBEDDING_ROWS, ZERO_EMBEDDING_ROWS = [17, 2000, 2001], [19]


@pytest.fixture(scope="module")
def fleet():
    return fleet_tables(12_000)


@pytest.fixture(scope="module")
def profile(fleet):
    _, _, calibration, bank = fleet
    return Profile.fit(calibration, bank=bank, config=TriageConfig.from_dict(copy.deepcopy(RULES)))


def damaged_batch(fleet_table):
    """The fleet with unscoreable logits and missing / zero embeddings at the rows above."""
    logits = logits_of(fleet_table).copy()
    embedding = embedding_of(fleet_table).copy()
    logits[NAN_ROWS, 1, 2] = np.nan
    logits[POSINF_ROWS, 0, 0] = np.inf
    logits[NEGINF_ROWS, -1, -1] = -np.inf
    embedding[ZERO_EMBEDDING_ROWS] = 0.0
    n = len(logits)
    logits_null = np.zeros(n, bool)
    logits_null[NULL_LOGITS_ROWS] = True
    embedding_null = np.zeros(n, bool)
    embedding_null[NULL_EMBEDDING_ROWS] = True
    return contract_table(column(fleet_table, "id"), logits, embedding=embedding,
                          source=column(fleet_table, "source"), category=column(fleet_table, "category"),
                          logits_null=logits_null, embedding_null=embedding_null)


@pytest.fixture(scope="module")
def triaged(fleet, profile):
    batch = damaged_batch(fleet[0])
    return batch, TriageEngine(profile, device="cpu").triage(batch)


def with_config(profile, **changes):
    """The same fitted profile with configuration sections changed (no refit); a new version."""
    config = copy.deepcopy(profile.config)
    for dotted, value in changes.items():
        section, key = dotted.split("__")
        setattr(getattr(config, section), key, value)
    return dataclasses.replace(profile, config=config.check(), version="")


# ------------------------------------------------------------------------------------------------
# Signal columns
# ------------------------------------------------------------------------------------------------


def test_signal_columns_match_the_numpy_reference(triaged, profile, fleet):
    batch, decisions = triaged
    valid = column(decisions, "valid")
    bad = NAN_ROWS + POSINF_ROWS + NEGINF_ROWS + NULL_LOGITS_ROWS
    assert not valid[bad].any() and valid.sum() == len(valid) - len(bad)

    ref = signals_np(logits_of(batch)[valid], profile.temperature)
    # float32 pass with polynomial exp/log (PERF-NOTES): probabilities carry ~1e-6 relative
    # error; mutual information is a difference of two entropies of up to log C = 2.3 nats, so
    # its absolute error is a few 1e-6. 2e-5 is ten times that and far below any threshold gap.
    for name in ("confidence", "margin", "mutual_info", "vote_agreement"):
        np.testing.assert_allclose(column(decisions, name)[valid], ref[name], atol=2e-5, err_msg=name)
    tie = ref["margin"] < 1e-5  # a near tie may resolve either way in float32
    np.testing.assert_array_equal(column(decisions, "predicted_class")[valid][~tie], ref["predicted_class"][~tie])
    assert (column(decisions, "predicted_class")[~valid] == -1).all()
    assert np.isnan(column(decisions, "confidence")[~valid]).all()

    # k-NN distance against a brute-force search of the bank (every bank vector is usable).
    queries = embedding_of(batch)
    has_vector = np.ones(len(queries), bool)
    has_vector[NULL_EMBEDDING_ROWS + ZERO_EMBEDDING_ROWS] = False
    expected = kth_distance_np(queries[has_vector], embedding_of(fleet[3]), profile.k)
    # FAISS works in float32: cos carries ~1e-6 error, d = sqrt(2 - 2 cos) ~ 0.5-1.4 amplifies it
    # by 1/d at most, so 1e-4 bounds it with room.
    np.testing.assert_allclose(column(decisions, "ood_score")[has_vector], expected, atol=1e-4)
    assert np.isnan(column(decisions, "ood_score")[~has_vector]).all()


# ------------------------------------------------------------------------------------------------
# Reason bits, tiers, priority
# ------------------------------------------------------------------------------------------------


def check_rules(decisions, profile, category):
    """Assert the engine's mask, tier and priority equal the numpy restatement; returns the mask."""
    mask, tier, priority = expected_rules(decisions, profile, category)
    got_mask = column(decisions, "reason_mask")
    differ = np.flatnonzero(got_mask != mask)
    assert differ.size == 0, (
        f"{differ.size} rows differ, first row {differ[:1]}: engine {got_mask[differ[:5]]}, expected {mask[differ[:5]]}"
    )
    np.testing.assert_array_equal(column(decisions, "escalate"), mask > 0)
    got_tier = column(decisions, "tier")
    assert [t for t in got_tier] == list(tier)
    got_priority = column(decisions, "priority")
    assert got_priority.dtype == np.float32
    # float32 severities ((t - c) / t and the like) against float64: a few ulp of values <= 1.
    np.testing.assert_allclose(got_priority, priority, atol=1e-6, rtol=0)
    assert ((got_priority >= 0) & (got_priority <= 1)).all()
    assert (got_priority[mask == 0] == 0).all()
    return mask


def test_reason_bits_tiers_and_priority_match_an_independent_recomputation(triaged, profile):
    batch, decisions = triaged
    category = column(batch, "category")
    mask = check_rules(decisions, profile, category)

    # The check is only as good as the rows it covers: every bit, alone and in company.
    for bit in (CONFIDENCE, DISAGREEMENT, POLICY, ANOMALY, AUDIT):
        assert ((mask & bit) > 0).sum() >= 20, f"bit {bit} fired on too few rows to test"
    bits_per_row = np.unpackbits(mask[:, None], axis=1).sum(axis=1)
    assert (bits_per_row >= 2).sum() >= 50 and (bits_per_row >= 3).sum() >= 5
    assert (mask == AUDIT).sum() >= 20, "audit alone must escalate (even when nothing else fired)"
    # POLICY is exactly the mandatory category, whatever the confidence.
    np.testing.assert_array_equal((mask & POLICY) > 0, category == "legal")
    # The medical floor fires where the global threshold would not.
    confidence = column(decisions, "confidence")
    floor_only = (category == "medical") & (confidence >= profile.thresholds.confidence) & (confidence < 0.95)
    assert floor_only.sum() >= 5 and ((mask[floor_only] & CONFIDENCE) > 0).all()
    assert ((mask[(category == "general") & (confidence >= profile.thresholds.confidence)] & CONFIDENCE) == 0).all()
    # Tiers: legal rows go to the adjudicator; the highest tier wins over lower ones.
    tier = column(decisions, "tier")
    assert set(tier[category == "legal"]) == {"adjudicator"}
    assert "general" in set(tier[mask == AUDIT])


def test_per_class_confidence_thresholds(fleet, profile, rng):
    per_class = rng.uniform(0.5, 0.97, profile.classes).round(3).tolist()
    thresholds = dataclasses.replace(profile.thresholds, per_class_confidence=per_class)
    strict = dataclasses.replace(profile, thresholds=thresholds, version="")
    assert strict.version != profile.version  # thresholds are part of the version
    batch = damaged_batch(fleet[0])
    decisions = TriageEngine(strict, device="cpu").triage(batch)
    mask = check_rules(decisions, strict, column(batch, "category"))
    predicted = column(decisions, "predicted_class")
    confidence = column(decisions, "confidence")
    general = column(batch, "category") == "general"
    for c, t in enumerate(per_class):
        rows = general & (predicted == c)
        assert rows.sum() > 0
        np.testing.assert_array_equal((mask[rows] & CONFIDENCE) > 0, confidence[rows] < np.float32(t))


@pytest.mark.parametrize("members, classes", [(1, 2), (3, 7)])
def test_rules_without_a_bank_for_odd_shapes(members, classes, rng):
    """M = 1 (no disagreement possible) and one class pair; M = 3, C = 7 with a vote floor."""
    logits, labels, _ = known_ensemble(rng, 3000, members=members, classes=classes)
    ids = np.arange(3000, dtype=np.int64) * 7919  # int64 ids take the other audit-hash path
    config = TriageConfig.from_dict({"thresholds": {"vote_floor": 0.7}, "audit": {"base_rate": 0.05},
                                     "policy": {"mandatory_categories": ["x"]}})
    profile = Profile.fit(contract_table(ids, logits, label=labels), config=config)
    test_logits, _, _ = known_ensemble(rng, 2000, members=members, classes=classes)
    test_logits[[0, 5]] = np.nan
    category = rng.choice(["x", "y"], 2000, p=[0.05, 0.95])
    batch = contract_table(np.arange(2000, dtype=np.int64), test_logits, category=category)
    decisions = TriageEngine(profile, device="cpu").triage(batch)
    mask = check_rules(decisions, profile, category)
    if members == 1:
        assert ((mask & DISAGREEMENT) == 0).all()
        assert (column(decisions, "vote_agreement")[column(decisions, "valid")] == 1).all()
    else:
        assert ((mask & DISAGREEMENT) > 0).sum() > 10
    assert ((mask & ANOMALY) == 0).all() and np.isnan(column(decisions, "ood_score")).all()
    assert ((mask[[0, 5]] & CONFIDENCE) > 0).all()


def test_category_floor_escalations_have_a_priority_when_the_global_trigger_is_off(fleet):
    """A budget split with no confidence share sets the global threshold to -inf; the medical
    floor still escalates, and those rows must get the documented severity (once they got 0)."""
    _, _, calibration, bank = fleet
    rules = copy.deepcopy(RULES)
    rules["thresholds"]["split"] = [0.0, 0.5, 0.5]  # no budget share for confidence: threshold -inf
    rules["audit"]["base_rate"] = 0.0
    profile = Profile.fit(calibration, bank=bank, config=TriageConfig.from_dict(rules))
    assert profile.thresholds.confidence < 0
    batch = damaged_batch(fleet[0])
    decisions = TriageEngine(profile, device="cpu").triage(batch)
    mask = column(decisions, "reason_mask")
    floor = (mask == CONFIDENCE) & (column(batch, "category") == "medical")
    assert floor.sum() >= 3
    # The documented severity: (t - confidence) / t with t the row's threshold (0.95 here).
    expected = (0.95 - column(decisions, "confidence")[floor]) / 0.95
    np.testing.assert_allclose(column(decisions, "priority")[floor], expected, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------------


def test_unscoreable_logits_are_escalated_never_accepted_and_counted(triaged, profile, fleet):
    batch, decisions = triaged
    bad = np.array(NAN_ROWS + POSINF_ROWS + NEGINF_ROWS + NULL_LOGITS_ROWS)
    assert column(decisions, "escalate")[bad].all()
    assert not column(decisions, "valid")[bad].any()
    mask = column(decisions, "reason_mask")[bad]
    assert ((mask & CONFIDENCE) > 0).all() and ((mask & DISAGREEMENT) > 0).all()
    assert (column(decisions, "priority")[bad] == 1).all()
    order = profile.config.tiers.order
    invalid_rank = order.index(profile.config.tiers.invalid)
    assert all(order.index(t) >= invalid_rank for t in column(decisions, "tier")[bad])

    summary = TriageSummary().update(decisions)
    assert summary.invalid == len(bad)
    assert summary.escalated == int(column(decisions, "escalate").sum())

    # The bad rows do not change anyone else's decision.
    keep = np.setdiff1d(np.arange(batch.num_rows), bad)
    alone = TriageEngine(profile, device="cpu").triage(batch.take(keep))
    for name in ("reason_mask", "tier", "confidence", "mutual_info", "audit_weight"):
        np.testing.assert_array_equal(column(alone, name), column(decisions, name)[keep], err_msg=name)
    # FAISS's float32 GEMM blocks by batch, so a row's k-NN distance may move in the last bits
    # (measured: up to 1.8e-7) with the other rows of its batch; the priority follows it.
    for name in ("ood_score", "priority"):
        np.testing.assert_allclose(column(alone, name), column(decisions, name)[keep], atol=1e-6, err_msg=name)


def test_missing_embedding_column(fleet, profile):
    fleet_table = fleet[0].slice(0, 500)
    without = fleet_table.drop_columns(["embedding"])
    strict = with_config(profile, policy__on_missing_embedding="error")
    with pytest.raises(BatchError, match=r"^embedding:") as error:
        TriageEngine(strict, device="cpu").triage(without)
    assert "D=16" in str(error.value)

    decisions = TriageEngine(profile, device="cpu").triage(without)  # the profile escalates instead
    mask = column(decisions, "reason_mask")
    assert ((mask & ANOMALY) > 0).all() and column(decisions, "escalate").all()
    assert np.isnan(column(decisions, "ood_score")).all()
    assert (column(decisions, "priority") == 1).all()
    assert column(decisions, "valid").all()  # the logits were fine: only the anomaly is unknown


def test_null_embeddings_in_some_rows(fleet, profile):
    n = 600
    base = fleet[0].slice(0, n)
    null = np.zeros(n, bool)
    null[[4, 77, 300]] = True
    batch = contract_table(column(base, "id"), logits_of(base), embedding=embedding_of(base),
                           source=column(base, "source"), category=column(base, "category"), embedding_null=null)
    strict = with_config(profile, policy__on_missing_embedding="error")
    first_id = column(base, "id")[4]
    with pytest.raises(BatchError, match=rf"^embedding:.*\b3 null rows.*{re.escape(first_id)}"):
        TriageEngine(strict, device="cpu").triage(batch)

    decisions = TriageEngine(profile, device="cpu").triage(batch)
    mask = column(decisions, "reason_mask")
    assert ((mask[null] & ANOMALY) > 0).all()
    assert (column(decisions, "priority")[null] == 1).all()
    clean = TriageEngine(profile, device="cpu").triage(base)
    np.testing.assert_array_equal(mask[~null], column(clean, "reason_mask")[~null])


def test_calibration_labels_out_of_range_name_the_count_and_first_id(rng):
    logits, labels, _ = known_ensemble(rng, 500, classes=4)
    labels = labels.copy()
    labels[[30, 31]] = -1  # unknown: allowed
    labels[[41, 100, 250]] = [4, -2, 9]
    ids = [f"row-{i}" for i in range(500)]
    with pytest.raises(BatchError, match=r"^label:.*\b3 rows\b.*'row-41'"):
        Profile.fit(contract_table(ids, logits, label=labels))


@pytest.mark.parametrize("what", ["members", "classes", "dim"])
def test_shape_mismatch_names_both_values(fleet, profile, what):
    base = fleet[0].slice(0, 50)
    logits, embedding = logits_of(base), embedding_of(base)
    if what == "members":
        logits, want, found = logits[:, :3], "M=5", "M=3"
    elif what == "classes":
        logits, want, found = logits[:, :, :7], "C=10", "C=7"
    else:
        embedding, want, found = embedding[:, :8], "D=16", "[8]"
    batch = contract_table(column(base, "id"), logits, embedding=embedding)
    with pytest.raises((BatchError, ProfileError)) as error:
        TriageEngine(profile, device="cpu").triage(batch)
    message = str(error.value)
    assert want in message and found in message, message
    with pytest.raises(ProfileError, match=want.replace("[", r"\[")):
        profile.check_shape(3 if what == "members" else 5, 7 if what == "classes" else 10,
                            8 if what == "dim" else 16)


def test_thresholds_are_finite_or_documented_infinities(profile):
    """A fitted bank profile has every trigger on: a finite threshold for each."""
    t = profile.thresholds
    assert isinstance(t, Thresholds)
    assert 0 < t.confidence < 1 and 0 < t.mutual_info < math.log(5) and 0 < t.ood < 2


# ------------------------------------------------------------------------------------------------
# Odd batch sizes and the summary
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rows", [0, 1, 2])
def test_tiny_batches(fleet, profile, rows):
    batch = fleet[0].slice(0, rows)
    decisions = TriageEngine(profile, device="cpu").triage(batch)
    assert decisions.num_rows == rows
    assert column(decisions, "id").tolist() == column(batch, "id").tolist()
    whole = TriageEngine(profile, device="cpu").triage(fleet[0].slice(0, 100))
    for name in ("reason_mask", "audit_weight", "tier", "confidence"):
        assert column(decisions, name).tolist() == column(whole, name)[:rows].tolist(), name


def test_decisions_do_not_depend_on_the_batch_split(triaged, profile):
    """Every decision column, bit for bit, whether the 12,000 rows (damaged ones included) come
    in one batch or in batches of 1, 7 and 1,999 rows: retries and replicas agree."""
    batch, whole = triaged
    engine = TriageEngine(profile, device="cpu")
    for size in (7, 1999):
        parts = pa.Table.from_batches([engine.triage(batch.slice(i, size)) for i in range(0, batch.num_rows, size)])
        assert_tables_equal(whole, parts)
    singles = pa.Table.from_batches([engine.triage(batch.slice(i, 1)) for i in range(40)])
    assert_tables_equal(whole.slice(0, 40), singles)


def test_integer_ids_come_back_as_int64(fleet, profile):
    base = fleet[0].slice(0, 50)
    ids = np.arange(50, dtype=np.int64) * -977
    decisions = TriageEngine(profile, device="cpu").triage(contract_table(ids, logits_of(base),
                                                                          embedding=embedding_of(base)))
    assert decisions.schema.field("id").type == pa.int64()
    np.testing.assert_array_equal(column(decisions, "id"), ids)


def test_summary_merge_equals_one_summary_of_everything(triaged):
    """TriageSummary: an update per batch and a merge, summed in any order (monitoring.py)."""
    _, decisions = triaged
    whole = TriageSummary().update(decisions)
    pieces = [TriageSummary().update(decisions.slice(a, b - a)) for a, b in ((0, 5000), (5000, 5001), (5001, 12_000))]
    merged = pieces[2].merge(pieces[0]).merge(pieces[1])
    expected, got = whole.to_dict(), merged.to_dict()
    for key in ("rows", "escalated", "invalid", "audit_samples", "by_tier", "rows_by_source",
                "escalated_by_source", "audit_by_stratum"):
        assert got[key] == expected[key], key
    # Independent counts from the columns.
    mask = column(decisions, "reason_mask")
    assert expected["by_reason"] == {name: int(((mask & bit) > 0).sum()) for name, bit in BITS.items()}
    assert got["by_reason"] == expected["by_reason"]


def test_summary_merge_keeps_zero_counts(fleet, profile):
    batch = fleet[0].slice(0, 300)
    batch = batch.set_column(batch.schema.get_field_index("category"), "category",
                             pa.array(["general"] * 300))  # no legal rows: policy fires on none
    decisions = TriageEngine(profile, device="cpu").triage(batch)
    whole = TriageSummary().update(decisions)
    merged = TriageSummary().update(decisions.slice(0, 100)).merge(TriageSummary().update(decisions.slice(100)))
    assert whole.to_dict()["by_reason"]["policy"] == 0
    assert merged.to_dict()["by_reason"] == whole.to_dict()["by_reason"]


# ------------------------------------------------------------------------------------------------
# Another device
# ------------------------------------------------------------------------------------------------


def assert_same_decisions(reference, other, profile, *, ood_tol):
    """Decisions from two devices: the audit (a hash of the ids) and validity identical; signals
    within float32 error (ood within ``ood_tol``, a scalar or one bound per row); reason bits
    identical except on rows whose signal sits within that error of its threshold."""
    for name in ("id", "valid", "audit_weight", "audit_stratum", "profile_version"):
        ref, got = column(reference, name).tolist(), column(other, name).tolist()
        # A bool, not `ref == got`: on a mismatch of long lists pytest's explanation is a
        # quadratic difflib diff, which under CI=true (pytest then always diffs) ran for an hour.
        differ = [i for i, (a, b) in enumerate(zip(ref, got)) if a != b]
        same = len(ref) == len(got) and not differ
        assert same, f"{name}: {len(differ)} of {len(ref)} rows differ (first at {differ[:5]}), lengths {len(ref)}/{len(got)}"
    for name in ("confidence", "margin", "mutual_info", "vote_agreement"):
        np.testing.assert_allclose(column(other, name), column(reference, name), atol=2e-5, err_msg=name)
    ood_ref, ood_other = column(reference, "ood_score"), column(other, "ood_score")
    np.testing.assert_array_equal(np.isnan(ood_ref), np.isnan(ood_other))
    scored = ~np.isnan(ood_ref)
    gap = np.abs(ood_other - ood_ref)
    assert (gap[scored] <= np.broadcast_to(ood_tol, gap.shape)[scored]).all(), gap[scored].max()
    t = profile.thresholds
    near = ((np.abs(column(reference, "confidence") - t.confidence) < 2e-5)
            | (np.abs(column(reference, "mutual_info") - t.mutual_info) < 2e-5)
            | (np.abs(ood_ref - t.ood) <= ood_tol))
    assert near.mean() < 0.01
    differ = column(reference, "reason_mask") != column(other, "reason_mask")
    assert not (differ & ~near).any(), np.flatnonzero(differ & ~near)[:10]


def half_precision_distance_tolerance(distance, dim: int) -> np.ndarray:
    """Bound on a k-NN distance computed from float16 unit vectors (as tests/test_knn.py derives
    it): cosine error c <= (2 D + 8) 2^-24 + 2 * 2^-11, and d^2 = 2 - 2 cos gives
    |d' - d| <= min(sqrt(2 c), 2 c / d), plus 1e-6 for the float32 square root."""
    c = (2 * dim + 8) * 2.0**-24 + 2 * 2.0**-11
    d = np.maximum(np.nan_to_num(distance, nan=1.0), 1e-30)
    return np.minimum(np.sqrt(2 * c), 2 * c / d) + 1e-6


@pytest.mark.gpu
def test_cuda_decides_as_the_cpu(triaged, profile):
    batch, cpu = triaged
    cuda = TriageEngine(profile, device="cuda").triage(batch)
    tol = half_precision_distance_tolerance(column(cpu, "ood_score"), profile.dim)
    assert_same_decisions(cpu, cuda, profile, ood_tol=tol)


def test_same_decisions_helper_accepts_a_rerun_and_rejects_a_change(triaged, profile):
    """The comparison used by the GPU test, exercised here on the CPU."""
    batch, cpu = triaged
    tol = half_precision_distance_tolerance(column(cpu, "ood_score"), profile.dim)
    assert_same_decisions(cpu, TriageEngine(profile, device="cpu").triage(batch), profile, ood_tol=tol)
    shifted = dataclasses.replace(profile, config=copy.deepcopy(profile.config), version="")
    shifted.config.audit.seed += 1
    with pytest.raises(AssertionError, match="audit_weight"):
        assert_same_decisions(cpu, TriageEngine(shifted, device="cpu").triage(batch), profile, ood_tol=tol)
