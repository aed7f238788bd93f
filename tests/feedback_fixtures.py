"""A small simulated fleet whose deployed model is miscalibrated against its profile, and one
feedback round through a real SQLite review queue worked by simulated reviewers.

The world (serve/sim) is drawn once per seed; its ensemble's logits are scaled by
``overconfidence``. The profile is fitted on calibration rows of the same world at
``overconfidence = 1.2`` (the model before an update), while the fleet runs at 2.5 (the updated
model is overconfident): the profile's temperature is then far from the one the fleet needs,
which is what the audit verdicts must correct. Fleet rows alternate between the stretch that is
triaged and reviewed (even rows) and the fresh rows the tests evaluate on (odd rows), so both
halves come from the same day, drift and burst.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import pyarrow as pa

from hitl_triage.engine.config import AuditConfig, TriageConfig
from hitl_triage.engine.engine import TriageEngine
from hitl_triage.engine.profile import Profile
from hitl_triage.serve.queue import QueueOptions, open_queue
from hitl_triage.serve.sim import FleetConfig, generate_bank_batches, generate_calibration_batches
from hitl_triage.serve.sim.fleet import generate_fleet_with_truth
from hitl_triage.serve.sim.reviewers import SimReviewer, truth_labels, work_queue

FLEET = FleetConfig(rows=50_000, sources=4, seed=5, members=5, classes=6, dim=16, class_dim=8, nuisance_dim=6,
                    calibration_rows=4_000, bank_rows=3_000, overconfidence=2.5, ood_share=0.03,
                    drift_strength=1.0)
BEFORE_UPDATE = 1.2  # the overconfidence of the model the profile was fitted for
BUDGET = 0.10
AUDIT_RATE = 0.06


def table(batches) -> pa.Table:
    return pa.Table.from_batches(list(batches))


@functools.lru_cache(maxsize=2)
def world(seed: int = FLEET.seed):
    """(calibration at the old overconfidence, bank, fleet table, truth table), cached."""
    config = dataclasses.replace(FLEET, seed=seed)
    before = dataclasses.replace(config, overconfidence=BEFORE_UPDATE)
    calibration = table(generate_calibration_batches(before))
    bank = table(generate_bank_batches(config))
    pairs = list(generate_fleet_with_truth(config, batch_rows=1 << 20))
    fleet = pa.Table.from_batches([f for f, _ in pairs])
    truth = pa.Table.from_batches([t for _, t in pairs])
    return calibration, bank, fleet, truth


def halves(t: pa.Table) -> tuple[pa.Table, pa.Table]:
    """(even rows: the reviewed stretch, odd rows: fresh rows)."""
    n = t.num_rows
    return t.take(pa.array(np.arange(0, n, 2))), t.take(pa.array(np.arange(1, n, 2)))


def fitted_profile(calibration: pa.Table, bank: pa.Table, budget: float = BUDGET) -> Profile:
    config = TriageConfig()
    config.thresholds.mode, config.thresholds.budget = "budget", budget
    config.audit = AuditConfig(base_rate=AUDIT_RATE, strata=["source", "predicted_class"])
    return Profile.fit(calibration, bank=bank, config=config)


def crew(error_rate: float = 0.0) -> list[SimReviewer]:
    return [SimReviewer("ann", "general", error_rate=error_rate, seed=1),
            SimReviewer("sam", "specialist", error_rate=error_rate, seed=2),
            SimReviewer("ada", "adjudicator", error_rate=error_rate, seed=3)]


def reviewed_round(profile: Profile, fleet: pa.Table, truth: pa.Table, db_path, *, error_rate: float = 0.0):
    """Triage ``fleet`` with ``profile``, queue the escalations (embeddings kept), let the crew
    work the queue from the truth; returns (decisions, the queue's verdict export)."""
    decisions = TriageEngine(profile, device="cpu").triage(fleet)
    # Not blind: the reviewers see the prediction and answer in batches (blind items go one by one).
    with open_queue(f"sqlite:///{db_path}", QueueOptions(keep_embedding=True, blind_audit=False)) as queue:
        queue.enqueue(decisions, fleet)
        work_queue(queue, crew(error_rate), truth_labels(truth), batch=256)
        verdicts = queue.verdicts()
    return decisions, verdicts
