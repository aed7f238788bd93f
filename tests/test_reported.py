"""Predictions users challenged (the service's Report call): every row escalates with the
REPORTED bit (32) to ``tiers.reported``, however confident the model was; everything else about
the row is decided as it always is. Oracle: engine_fixtures.expected_rules, written out in numpy."""

from __future__ import annotations

import numpy as np
import pytest

from engine_fixtures import REPORTED, column, expected_rules, fleet_tables, one_torch_thread  # noqa: F401
from hitl_triage.engine.config import TriageConfig
from hitl_triage.engine.engine import TriageEngine
from hitl_triage.engine.profile import Profile


@pytest.fixture(scope="module")
def fitted():
    fleet, _, calibration, bank = fleet_tables(6000, seed=3)
    config = TriageConfig()
    config.tiers.reported = "adjudicator"
    profile = Profile.fit(calibration, bank=bank, config=config)
    return profile, fleet


def test_reported_rows_escalate_with_their_bit_and_tier(fitted):
    profile, fleet = fitted
    engine = TriageEngine(profile, device="cpu")
    plain = engine.triage(fleet)
    reported = engine.triage(fleet, reported=True)
    mask = column(reported, "reason_mask")
    assert (mask & REPORTED).all() and column(reported, "escalate").all()
    assert set(reported.column("tier").to_pylist()) == {"adjudicator"}  # the highest tier, so every row
    # The other bits and the signals are what the row gets unreported.
    assert np.array_equal(mask & np.uint8(0xFF ^ REPORTED), column(plain, "reason_mask"))
    for name in ("confidence", "mutual_info", "ood_score", "audit_weight", "predicted_class"):
        assert reported.column(name).equals(plain.column(name)), name
    # The confident rows the model would have auto-accepted are escalated now, at priority 0.9.
    confident = column(plain, "reason_mask") == 0
    assert confident.sum() > 1000
    assert np.all(column(reported, "priority")[confident] == np.float32(0.9))
    # The numpy oracle agrees on every row.
    category = reported.column("category").to_pylist() if "category" in reported.schema.names else None
    want_mask, want_tier, want_priority = expected_rules(reported, profile, category, reported=True)
    assert np.array_equal(mask, want_mask)
    assert reported.column("tier").to_pylist() == list(want_tier)
    np.testing.assert_allclose(column(reported, "priority"), want_priority, rtol=1e-6, atol=1e-7)


def test_report_tier_is_checked_like_the_others():
    from hitl_triage.engine.config import ConfigError

    config = TriageConfig()
    config.tiers.reported = "nobody"
    with pytest.raises(ConfigError, match="tiers.reported: expected one of"):
        config.check()
