"""Profile.fit end to end: calibration on overconfident ensembles, the target-risk guarantee on
held-out data across repeated random splits, and the profile directory (round trip, readable
TOML, refusing edited or truncated files).

The ensembles are built here from a model whose true posterior is known row by row
(engine_fixtures.known_ensemble), and from the fleet simulator (overconfidence 2.5 by default).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from engine_fixtures import (  # noqa: F401  (one_torch_thread: an autouse fixture)
    one_torch_thread,
    assert_tables_equal,
    column,
    contract_table,
    ece_np,
    fleet_tables,
    known_ensemble,
    logits_of,
    signals_np,
)
from hitl_triage.engine.config import TriageConfig
from hitl_triage.engine.engine import TriageEngine
from hitl_triage.engine.profile import Profile, ProfileError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROUND_TRIP_CONFIG = {
    "class_names": [f"class-{c}" for c in range(10)],
    "calibration": {"per_source": True, "min_rows_per_source": 500},
    "bank": {"k": 7},
    "policy": {"mandatory_categories": ["legal"], "category_min_confidence": {"medical": 0.9},
               "category_tier": {"legal": "adjudicator"}, "on_missing_embedding": "escalate"},
    "audit": {"seed": 12345, "base_rate": 0.02, "strata": ["source", "predicted_class"],
              "overrides": [{"match": {"source": "cam-001"}, "rate": 0.1}]},
}


# ------------------------------------------------------------------------------------------------
# Calibration on overconfident ensembles
# ------------------------------------------------------------------------------------------------


def test_temperature_scaling_lowers_ece_of_a_known_overconfident_ensemble(rng):
    # Members are the true model sharpened 3x (plus noise): T should come out near 3, and the
    # raw ensemble is badly calibrated (ECE ~0.1 on this model).
    logits, labels, _ = known_ensemble(rng, 20_000, spread=5.0, overconfidence=3.0)
    ids = [f"cal-{i}" for i in range(len(labels))]
    profile = Profile.fit(contract_table(ids, logits, label=labels))
    report = profile.fit_report["calibration"]
    before, after = report["holdout_before"], report["holdout_after"]
    # The member noise (0.3 on logits of spread 5) makes members a little sharper than the truth,
    # so T lands somewhat below 3; 2.5..3.5 still tells "found the sharpening" from "did nothing".
    assert 2.5 < profile.temperature < 3.5
    # ~10k holdout rows: ECE's sampling noise is ~0.005, the miscalibration ~0.1; asking for a
    # fivefold drop leaves a wide margin both ways.
    assert before["ece"] > 0.05
    assert after["ece"] < before["ece"] / 5
    assert after["nll"] < before["nll"] and after["brier"] < before["brier"]

    # Independently, on fresh rows from the same model: numpy ECE of the raw ensemble against the
    # engine's calibrated confidence.
    fresh, fresh_labels, _ = known_ensemble(rng, 20_000, spread=5.0, overconfidence=3.0)
    decisions = TriageEngine(profile, device="cpu").triage(contract_table(np.arange(20_000), fresh))
    raw = signals_np(fresh, 1.0)
    ece_raw = ece_np(raw["confidence"], raw["predicted_class"] == fresh_labels)
    ece_cal = ece_np(column(decisions, "confidence"), column(decisions, "predicted_class") == fresh_labels)
    assert ece_raw > 0.05 and ece_cal < ece_raw / 5, (ece_raw, ece_cal)


def test_temperature_scaling_lowers_ece_on_the_simulated_fleet(round_trip_profile):
    """The fleet simulator's ensemble is overconfident by construction (logits x 2.5)."""
    profile, _ = round_trip_profile
    report = profile.fit_report["calibration"]
    assert profile.temperature > 1.5
    # ~4k holdout rows, ECE noise ~0.01: the raw ECE is ~0.03 on this fleet; after < before is
    # what the issue asks, and NLL (the objective) must fall too.
    assert report["holdout_after"]["ece"] < report["holdout_before"]["ece"]
    assert report["holdout_after"]["nll"] < report["holdout_before"]["nll"]


# ------------------------------------------------------------------------------------------------
# Target-risk guarantee across repeated random splits
# ------------------------------------------------------------------------------------------------


def test_target_risk_guarantee_holds_on_held_out_rows_across_random_splits(rng):
    alpha, delta, splits = 0.05, 0.05, 40
    rows, calibration_rows = 30_000, 8_000
    logits, labels, posterior = known_ensemble(rng, rows, spread=5.0)
    ids = np.arange(rows, dtype=np.int64)
    config = TriageConfig.from_dict({"thresholds": {"mode": "target_risk", "target_risk": alpha, "delta": delta}})
    base_error = np.mean(signals_np(logits, 3.0)["predicted_class"] != labels)
    assert base_error > 3 * alpha, "the model must be wrong often enough that a threshold is needed"

    violations, risks, coverages = 0, [], []
    for _ in range(splits):
        order = rng.permutation(rows)
        cal, held = order[:calibration_rows], order[calibration_rows:]
        profile = Profile.fit(contract_table(ids[cal], logits[cal], label=labels[cal]), config=config)
        decisions = TriageEngine(profile, device="cpu").triage(contract_table(ids[held], logits[held]))
        accepted = ~column(decisions, "escalate")
        predicted = column(decisions, "predicted_class")[accepted]
        # The risk of the accepted rows, from the known posterior: E[1 - P(y = predicted | x)].
        # Averaging the exact conditional error instead of 0/1 label errors keeps the estimate's
        # noise (~0.0004 over ~12k accepted rows) far below the gaps that matter.
        risk = float(np.mean(1.0 - posterior[held][accepted, predicted]))
        risks.append(risk)
        coverages.append(accepted.mean())
        violations += risk > alpha
    # If the guarantee held with no slack at all, violations would be Binomial(40, delta = 0.05):
    # mean 2, P(> 5) = 1.4%. Allowing 5 keeps a false alarm that rare, and still catches a method
    # without the guarantee: the plain empirical threshold (the lowest whose calibration error rate
    # is <= alpha) violated in 7 of 20 such splits when measured. This one: 0 of 40, risks
    # 0.029-0.045, coverage 0.51-0.59.
    assert violations <= 5, (violations, np.round(risks, 4))
    # Not met by escalating everything: an oracle ranking by the true posterior accepts 62% of
    # rows at this risk.
    assert min(coverages) > 0.3, np.round(coverages, 3)


# ------------------------------------------------------------------------------------------------
# The profile directory
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def round_trip_profile(tmp_path_factory):
    _, _, calibration, bank = fleet_tables(12_000)
    profile = Profile.fit(calibration, bank=bank, config=TriageConfig.from_dict(copy.deepcopy(ROUND_TRIP_CONFIG)))
    directory = profile.save(tmp_path_factory.mktemp("profile") / "p")
    return profile, directory


def test_round_trip_gives_identical_decisions_and_version(round_trip_profile):
    profile, directory = round_trip_profile
    loaded = Profile.load(directory)
    assert loaded.version == profile.version
    assert loaded.temperature == profile.temperature
    assert loaded.source_temperatures == profile.source_temperatures
    assert loaded.thresholds == profile.thresholds
    assert loaded.config == profile.config
    assert (loaded.members, loaded.classes, loaded.dim, loaded.k) == (5, 10, 16, 7)
    assert loaded.bank.ntotal == profile.bank.ntotal

    fleet = fleet_tables(12_000)[0]
    before = TriageEngine(profile, device="cpu").triage(fleet)
    after = TriageEngine(loaded, device="cpu").triage(fleet)
    assert_tables_equal(before, after)
    assert set(column(after, "profile_version")) == {profile.version}


def test_per_source_temperatures_are_applied_per_row(round_trip_profile):
    profile, _ = round_trip_profile
    temps = profile.source_temperatures
    fallback = profile.fit_report["calibration"]["temperature"]["fallback_sources"]
    assert len(temps) == 4 and len(fallback) >= 1  # the smallest source has < 500 fit rows
    assert all(temps[s] == profile.temperature for s in fallback)
    assert len({round(t, 6) for t in temps.values()}) >= 2
    fleet = fleet_tables(12_000)[0].slice(0, 3000)
    decisions = TriageEngine(profile, device="cpu").triage(fleet)
    source = column(fleet, "source")
    per_row = np.array([temps.get(s, profile.temperature) for s in source])
    ref = signals_np(logits_of(fleet), per_row)
    # float32 pass against float64 (see test_engine): 2e-5.
    np.testing.assert_allclose(column(decisions, "confidence"), ref["confidence"], atol=2e-5)


def test_profile_toml_is_readable_and_complete(round_trip_profile):
    profile, directory = round_trip_profile
    data = tomllib.loads((directory / "profile.toml").read_text())
    assert data["profile"]["version"] == profile.version
    model = data["model"]
    assert (model["members"], model["classes"], model["dim"]) == (5, 10, 16)
    assert model["class_names"] == ROUND_TRIP_CONFIG["class_names"]
    assert data["config"]["bank"]["k"] == 7
    assert data["bank"]["present"] and data["bank"]["rows"] == 2000
    assert data["temperature"]["global"] == profile.temperature
    assert data["temperature"]["per_source"] == profile.source_temperatures
    for name in ("confidence", "mutual_info", "vote_floor", "ood"):
        assert data["thresholds"][name] == getattr(profile.thresholds, name)
    policy = data["config"]["policy"]
    assert policy["mandatory_categories"] == ["legal"]
    assert policy["category_min_confidence"] == {"medical": 0.9}
    assert policy["category_tier"] == {"legal": "adjudicator"}
    assert data["config"]["tiers"]["order"] == ["general", "specialist", "adjudicator"]
    audit = data["config"]["audit"]
    assert audit["strata"] == ["source", "predicted_class"] and audit["base_rate"] == 0.02
    assert audit["overrides"] == [{"match": {"source": "cam-001"}, "rate": 0.1}]
    assert audit["seed"] == 12345
    fit = data["fit"]
    for side in ("holdout_before", "holdout_after"):
        for metric in ("ece", "nll", "brier", "accuracy"):
            assert 0 <= fit["calibration"][side][metric] < math.inf
    assert len(fit["calibration"]["holdout_after"]["reliability"]["count"]) == 15
    assert fit["thresholds"]["mode"] == "budget"
    assert 0 < fit["expected_rates"]["union_before_policy_and_audit"] < 1
    assert fit["rows"]["used"] == 8000


def test_fitting_twice_gives_the_same_version(round_trip_profile):
    profile, _ = round_trip_profile
    _, _, calibration, bank = fleet_tables(12_000)
    again = Profile.fit(calibration, bank=bank, config=TriageConfig.from_dict(copy.deepcopy(ROUND_TRIP_CONFIG)))
    assert again.version == profile.version


def _copy_profile(directory, destination) -> Path:
    return Path(shutil.copytree(directory, destination))


EDITS = {
    "threshold": ("[thresholds]\nconfidence = ", "[thresholds]\nconfidence = 0.5 #"),
    "class name": ('"class-3"', '"class-three"'),
    "temperature": ("[temperature]\nglobal = ", "[temperature]\nglobal = 1.0 #"),
    "audit rate": ("base_rate = 0.02", "base_rate = 0.2"),
    "version": ('version = "1-', 'version = "2-'),
    "mandatory category": ('mandatory_categories = [\n    "legal",\n]', "mandatory_categories = []"),
}


@pytest.mark.parametrize("edit", sorted(EDITS))
def test_edited_profile_is_refused(round_trip_profile, tmp_path, edit):
    _, directory = round_trip_profile
    copy_dir = _copy_profile(directory, tmp_path / "p")
    path = copy_dir / "profile.toml"
    text = path.read_text()
    old, new = EDITS[edit]
    assert old in text, f"the edit {edit!r} must match: {old!r}"
    path.write_text(text.replace(old, new, 1))  # the first match (class names come twice)
    with pytest.raises(ProfileError, match="profile"):
        Profile.load(copy_dir)


def test_fit_metrics_are_outside_the_version(round_trip_profile, tmp_path):
    """By design (profile.py): metrics describe the fit and change no decision, so editing them
    keeps the version; this pins that scope so a change to it is deliberate."""
    profile, directory = round_trip_profile
    copy_dir = _copy_profile(directory, tmp_path / "p")
    path = copy_dir / "profile.toml"
    text = path.read_text()
    assert "fit_seconds = " in text
    path.write_text(text.replace("fit_seconds = ", "fit_seconds = 1e9 #", 1))
    assert Profile.load(copy_dir).version == profile.version


def _truncations(text: str):
    """Every line boundary, and a cut in the middle of every tenth line."""
    offsets, position = [], 0
    for i, line in enumerate(text.splitlines(keepends=True)):
        offsets.append(position)
        if i % 10 == 5 and len(line) > 4:
            offsets.append(position + len(line) // 2)
        position += len(line)
    return offsets


def _refused(directory, text, offsets):
    path = directory / "profile.toml"
    loaded = []
    for cut in offsets:
        path.write_text(text[:cut])
        try:
            Profile.load(directory)
        except ProfileError:
            continue
        loaded.append(cut)
    return loaded


def test_truncated_profile_is_refused(round_trip_profile, tmp_path):
    _, directory = round_trip_profile
    copy_dir = _copy_profile(directory, tmp_path / "p")
    text = (copy_dir / "profile.toml").read_text()
    offsets = _truncations(text)
    assert len(offsets) > 150
    loaded = _refused(copy_dir, text, offsets)
    assert not loaded, f"{len(loaded)} truncated files loaded, e.g. ending {text[:loaded[0]][-60:]!r}"


def test_truncated_default_profile_is_refused(tmp_path):
    """The default configuration: its [config] tables end with default values, so a cut there
    once loaded silently (the missing keys fell back to defaults that hashed the same)."""
    _, _, calibration, _ = fleet_tables(12_000)
    directory = Profile.fit(calibration).save(tmp_path / "p")
    text = (directory / "profile.toml").read_text()
    config_start = text.index("\n[config")
    offsets = [o for o in _truncations(text) if o > config_start]
    assert len(offsets) > 30
    loaded = _refused(directory, text, offsets)
    assert not loaded, f"{len(loaded)} truncated files loaded, e.g. ending {text[:loaded[0]][-60:]!r}"


def test_edited_bank_vectors_are_refused(round_trip_profile, tmp_path, rng):
    """The bank's vectors are part of the version (once only their count was)."""
    _, directory = round_trip_profile
    copy_dir = _copy_profile(directory, tmp_path / "p")
    vectors_path = copy_dir / "bank" / "vectors.npy"
    vectors = np.load(vectors_path)
    moved = vectors + rng.normal(0, 0.5, vectors.shape).astype(np.float32)
    np.save(vectors_path, moved / np.linalg.norm(moved, axis=1, keepdims=True))
    with pytest.raises(ProfileError, match="version"):
        Profile.load(copy_dir)


def test_missing_profile_directory_is_named(tmp_path):
    with pytest.raises(ProfileError, match=r"profile.*nowhere.*profile\.toml"):
        Profile.load(tmp_path / "nowhere")


def test_new_profile_from_replace_gets_a_new_version(round_trip_profile):
    """dataclasses.replace(profile, ..., version="") is how tests (and feedback) derive one."""
    profile, _ = round_trip_profile
    changed = dataclasses.replace(profile, temperature=profile.temperature * 1.01, version="")
    assert changed.version != profile.version and changed.version.startswith("1-")


@pytest.mark.parametrize("case", ["per-class thresholds", "one member, no bank"])
def test_round_trip_of_other_shapes(tmp_path, rng, case):
    if case == "per-class thresholds":
        _, _, calibration, bank = fleet_tables(12_000)
        fitted = Profile.fit(calibration, bank=bank)
        per_class = rng.uniform(0.4, 0.9, 10).round(4).tolist()
        thresholds = dataclasses.replace(fitted.thresholds, per_class_confidence=per_class)
        profile = dataclasses.replace(fitted, thresholds=thresholds, version="")
        batch = fleet_tables(12_000)[0].slice(0, 2000)
    else:
        logits, labels, _ = known_ensemble(rng, 2000, members=1, classes=3)
        profile = Profile.fit(contract_table(np.arange(2000), logits, label=labels))
        assert profile.dim is None and profile.bank is None and profile.thresholds.mutual_info == math.inf
        batch = contract_table(np.arange(5000, 6000), known_ensemble(rng, 1000, members=1, classes=3)[0])
    loaded = Profile.load(profile.save(tmp_path / "p"))
    assert loaded.version == profile.version and loaded.thresholds == profile.thresholds
    assert (loaded.members, loaded.classes, loaded.dim) == (profile.members, profile.classes, profile.dim)
    assert_tables_equal(TriageEngine(profile, device="cpu").triage(batch),
                        TriageEngine(loaded, device="cpu").triage(batch))


def test_ivf_bank_is_tuned_at_fit_and_keeps_its_nprobe(tmp_path):
    """An IVF bank gets the nprobe whose measured error bound meets bank.max_knn_error; the
    error then holds on fleet rows the tuning never saw (against an exact search of the same
    bank), where the fewest lists would miss it by about 10x; the saved profile keeps nprobe."""
    from hitl_triage.kernels import knn_distance

    fleet, _, calibration, bank = fleet_tables(12_000, bank_rows=40_000)
    config = TriageConfig.from_dict({"bank": {"k": 5, "index": "ivf", "max_knn_error": 0.005}})
    profile = Profile.fit(calibration, bank=bank, config=config)
    report = profile.fit_report["bank"]
    assert profile.bank.kind == "ivf" and report["nprobe"] == profile.bank.nprobe
    assert report["knn_error_bound"] <= 0.005

    queries = np.stack(fleet.column("embedding").to_numpy(zero_copy_only=False)[:4000]).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    exact = np.asarray(knn_distance(queries, profile.bank, 5, backend="torch"), np.float64)

    def error() -> float:
        approx = np.asarray(knn_distance(queries, profile.bank, 5, backend="ivf"), np.float64)
        return float(np.mean(np.abs(approx - exact) / exact))

    # The fleet holds OOD rows the calibration data lacks, and 4,000 other rows: allow 2x the bound.
    assert error() <= 0.01
    loaded = Profile.load(profile.save(tmp_path / "p"))
    assert loaded.bank.kind == "ivf" and loaded.bank.nprobe == profile.bank.nprobe
    profile.bank.nprobe = 1  # the untuned value: the test can tell (about 0.05 here)
    assert error() > 0.01
