"""`triage demo` as a library: simulate (or load) a fleet, fit a profile, triage, and score the
escalations against the truth the simulator knows."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from hitl_triage.engine.config import TriageConfig
from hitl_triage.engine.evaluation import CatchRates, catch_rates, escalate_top
from hitl_triage.engine.profile import Profile

from .sim import FleetConfig, FleetFiles, simulate_fleet
from .offline import RunResult, run_offline

DEMO_POLICY = {
    # Mandatory review for the simulator's high-stakes categories, and a stricter confidence floor
    # for medical rows: the rules a real deployment would start from.
    "policy": {
        "mandatory_categories": ["legal"],
        "category_min_confidence": {"medical": 0.95},
        "category_tier": {"medical": "specialist", "legal": "adjudicator"},
    },
}


@dataclasses.dataclass
class DemoResult:
    files: FleetFiles
    profile: Profile
    profile_dir: Path
    run: RunResult
    policy: CatchRates
    confidence_only: CatchRates
    seconds: dict[str, float]


def demo_config() -> TriageConfig:
    """The embedded defaults of the demo: the library defaults plus DEMO_POLICY."""
    return TriageConfig.from_dict(DEMO_POLICY)


def run_demo(
    out_dir: str | Path,
    *,
    rows: int = 1_000_000,
    data: str = "simulated",
    seed: int = 0,
    sources: int = 8,
    device: str | None = None,
    on_stage=None,
    simulate_progress=None,
    fit_progress=None,
    run_progress=None,
) -> DemoResult:
    """Run the whole offline loop in ``out_dir``; ``on_stage(name)`` announces each step."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    seconds = {}
    announce = on_stage or (lambda name: None)

    t0 = time.perf_counter()
    if data == "simulated":
        announce(f"simulating a fleet of {sources} sources, {rows:,} predictions")
        files = simulate_fleet(out_dir / "fleet.parquet", FleetConfig(rows=rows, sources=sources, seed=seed),
                               progress=simulate_progress)
    elif data == "digits":
        from .sim.digits import make_digits_files

        announce("training a 5-member ensemble on scikit-learn's digits (0-7; 8 and 9 are unseen)")
        files = make_digits_files(out_dir / "fleet.parquet", seed=seed)
    else:
        raise ValueError(f"data: expected 'simulated' or 'digits', found {data!r}")
    seconds["data"] = time.perf_counter() - t0

    announce("fitting a profile on the calibration and bank files")
    t0 = time.perf_counter()
    profile = Profile.fit(
        pq.read_table(files.calibration), bank=pq.read_table(files.bank, columns=["embedding"]),
        config=demo_config(), progress=fit_progress,
    )
    profile_dir = profile.save(out_dir / "profile")
    seconds["fit"] = time.perf_counter() - t0

    announce("triaging the fleet")
    t0 = time.perf_counter()
    result = run_offline(profile, [files.fleet], out_dir / "decisions.parquet", device=device, progress=run_progress)
    seconds["triage"] = time.perf_counter() - t0

    decisions = pq.read_table(result.output, columns=["escalate", "confidence"])
    truth = pq.read_table(files.truth, columns=["is_error", "is_ood"])
    escalate = decisions.column("escalate").to_numpy(zero_copy_only=False)
    is_error = truth.column("is_error").to_numpy(zero_copy_only=False)
    is_ood = truth.column("is_ood").to_numpy(zero_copy_only=False)
    is_error = is_error & ~is_ood  # wrong predictions on known inputs; OOD rows are counted apart
    policy = catch_rates(escalate, is_error, is_ood)
    by_confidence = escalate_top(decisions.column("confidence").to_numpy(zero_copy_only=False), policy.budget,
                                 higher_is_riskier=False)
    return DemoResult(
        files=files, profile=profile, profile_dir=profile_dir, run=result, policy=policy,
        confidence_only=catch_rates(by_confidence, is_error, is_ood), seconds=seconds,
    )


def audit_strata_summary(audit_by_stratum: dict[str, int], top: int = 5) -> tuple[int, list[tuple[str, int]], int, int]:
    """(number of strata sampled, the ``top`` largest, smallest count, largest count)."""
    if not audit_by_stratum:
        return 0, [], 0, 0
    counts = np.array(list(audit_by_stratum.values()))
    ranked = sorted(audit_by_stratum.items(), key=lambda kv: -kv[1])[:top]
    return len(audit_by_stratum), ranked, int(counts.min()), int(counts.max())
