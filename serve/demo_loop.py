"""`triage demo --loop`: the feedback loop on a simulated fleet, through one running service.

The fleet's day is simulated twice as long as asked and cut in two stretches by time. The first
stretch streams through a local `triage serve` (Flight) into its SQLite review queue; simulated
reviewers (:mod:`.sim.reviewers`, answering from the simulator's truth with a configurable error
rate) work the queue by tier; feedback (:func:`hitl_triage.engine.feedback.next_profile`) writes
the next version beside the first; the running server reloads it (Flight action ``reload``), and
the second stretch streams through. Each stretch is scored against the truth: calibration error on
its audit sample (Horvitz-Thompson weighted), escalation rate against the budget, in-distribution
errors and out-of-distribution inputs caught, and, for the second stretch, the escalations the
grown bank removed (ANOMALY under the new thresholds with the old bank, but not with the new
one) and those the watch list added (KNOWN_EDGE_CASE).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from hitl_triage.engine.calibration import calibration_metrics
from hitl_triage.engine.decode import decode_batch
from hitl_triage.engine.engine import TriageEngine
from hitl_triage.engine.evaluation import CatchRates, catch_rates
from hitl_triage.engine.feedback import FeedbackResult, next_profile, write_next
from hitl_triage.engine.policy import Reason
from hitl_triage.engine.profile import Profile

MODEL_BITS = int(Reason.CONFIDENCE | Reason.DISAGREEMENT | Reason.ANOMALY | Reason.KNOWN_EDGE_CASE)
QUEUE_TOML = "[queue]\nkeep_embedding = true  # the bank and the watch list grow from the reviewed embeddings\n"


@dataclasses.dataclass
class StretchScore:
    """One stretch of the fleet against the truth."""

    rows: int
    version: str
    temperature: float
    budget: float
    escalation_rate: float       # rows a budgeted trigger escalated (confidence, disagreement, anomaly, known edge case)
    audit_rows: int
    audit_ece: float             # Horvitz-Thompson weighted ECE of the audit sample's in-scope rows
    caught: CatchRates           # every escalation against in-distribution errors and OOD inputs
    known_edge_cases: int


@dataclasses.dataclass
class LoopResult:
    before: StretchScore
    after: StretchScore
    feedback: FeedbackResult
    new_profile_dir: Path
    reviewed: dict
    bank_removed: int


def split_stretches(fleet: Path, truth: Path, out_dir: Path) -> tuple[tuple[Path, Path], tuple[Path, Path]]:
    """The fleet and truth files cut in two at the middle row (the simulator writes rows in time
    order), as ``stretch1.parquet`` / ``stretch2.parquet`` and their truth files."""
    table, facts = pq.read_table(fleet), pq.read_table(truth)
    half = table.num_rows // 2
    paths = []
    for k, (start, length) in enumerate(((0, half), (half, table.num_rows - half)), start=1):
        f, t = out_dir / f"stretch{k}.parquet", out_dir / f"stretch{k}.truth.parquet"
        pq.write_table(table.slice(start, length), f)
        pq.write_table(facts.slice(start, length), t)
        paths.append((f, t))
    return paths[0], paths[1]


def reload(flight_address: str, directory: Path) -> dict:
    """Ask a running server to switch to the profile in ``directory`` (Flight action ``reload``)."""
    import pyarrow.flight as flight

    client = flight.FlightClient(f"grpc://{flight_address}")
    try:
        results = list(client.do_action(flight.Action("reload", str(directory.resolve()).encode())))
    finally:
        client.close()
    return json.loads(results[0].body.to_pybytes())


def review(queue_url: str, truth: Path, error_rate: float, tiers: list[str], seed: int) -> dict:
    """Simulated reviewers, one per tier, work the queue dry from the truth."""
    from .queue import QueueOptions, open_queue
    from .sim.reviewers import SimReviewer, truth_labels, work_queue

    crew = [SimReviewer(f"reviewer-{tier}", tier, error_rate=error_rate, seed=seed + i) for i, tier in enumerate(tiers)]
    with open_queue(queue_url, QueueOptions(tiers=list(tiers), keep_embedding=True)) as queue:
        return work_queue(queue, crew, truth_labels(pq.read_table(truth, columns=["id", "label"])), batch=512)


def make_next(profile: Profile, queue_url: str, calibration: Path, directory: Path) -> FeedbackResult:
    from .queue import QueueOptions, open_queue

    with open_queue(queue_url, QueueOptions(tiers=list(profile.config.tiers.order), keep_embedding=True)) as queue:
        verdicts = queue.verdicts()
    result = next_profile(profile, verdicts, calibration=pq.read_table(calibration))
    write_next(result, directory)
    return result


def score(decisions_path: Path, fleet: Path, truth: Path, profile: Profile) -> StretchScore:
    decisions = pq.read_table(decisions_path, columns=["reason_mask", "escalate", "audit_weight", "profile_version"])
    facts = pq.read_table(truth, columns=["label", "is_error", "is_ood"])
    mask = decisions.column("reason_mask").to_numpy()
    is_ood = facts.column("is_ood").to_numpy(zero_copy_only=False)
    is_error = facts.column("is_error").to_numpy(zero_copy_only=False) & ~is_ood
    labels = facts.column("label").to_numpy()
    weight = decisions.column("audit_weight").to_numpy(zero_copy_only=False)
    audited = (weight > 0) & (labels >= 0)
    ece = float("nan")
    if audited.any():
        rows = pq.read_table(fleet, columns=["id", "logits"]).filter(pa.array(audited))
        x = decode_batch(rows, device="cpu", embedding="ignore")
        ece = calibration_metrics(x.logits, labels[audited].astype(np.int64), profile.temperature,
                                  sample_weight=weight[audited]).ece
    versions = set(decisions.column("profile_version").to_pylist())
    return StretchScore(
        rows=decisions.num_rows, version=", ".join(sorted(versions)), temperature=profile.temperature,
        budget=profile.config.thresholds.budget, escalation_rate=float(((mask & MODEL_BITS) > 0).mean()),
        audit_rows=int((weight > 0).sum()), audit_ece=ece,
        caught=catch_rates(decisions.column("escalate").to_numpy(zero_copy_only=False), is_error, is_ood),
        known_edge_cases=int(((mask & int(Reason.KNOWN_EDGE_CASE)) > 0).sum()),
    )


def bank_removed(fleet: Path, old: Profile, new: Profile, decisions_path: Path) -> int:
    """Rows of ``fleet`` the new version's thresholds would escalate for ANOMALY with the old
    bank and that the new bank (in-scope edge cases added) no longer does."""
    if old.bank is None or new.bank is None:
        return 0
    with_old_bank = dataclasses.replace(new, bank=old.bank, version="")
    table = pq.read_table(fleet)
    before = TriageEngine(with_old_bank, device="cpu").triage(table).column("reason_mask").to_numpy()
    after = pq.read_table(decisions_path, columns=["reason_mask"]).column("reason_mask").to_numpy()
    anomaly = int(Reason.ANOMALY)
    return int((((before & anomaly) > 0) & ~((after & anomaly) > 0)).sum())


__all__ = ["LoopResult", "QUEUE_TOML", "StretchScore", "bank_removed", "make_next", "reload", "review", "score",
           "split_stretches"]
