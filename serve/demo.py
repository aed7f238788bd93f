"""`triage demo` as a library: simulate (or load) a fleet, fit a profile, triage it (through the
service by default: a local `triage serve` with a SQLite review queue, the fleet streamed over
Arrow Flight by several concurrent streams; or offline, with ``offline=True``), and score the
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
    queue_url: str | None = None       # through the service: the review queue it filled
    queue_stats: dict | None = None    # ... and what is in it, per tier
    streams: int = 0                   # ... and the Flight streams the fleet came by


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
    offline: bool = False,
    streams: int = 4,
) -> DemoResult:
    """Run the whole loop in ``out_dir``; ``on_stage(name)`` announces each step."""
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

    t0 = time.perf_counter()
    queue_url = queue_stats = None
    if offline:
        announce("triaging the fleet")
        result = run_offline(profile, [files.fleet], out_dir / "decisions.parquet", device=device, progress=run_progress)
    else:
        announce(f"triaging the fleet through a local triage serve, {streams} Flight streams")
        queue_url = f"sqlite:///{(out_dir / 'review.db').resolve()}"
        result, queue_stats = _through_service(profile_dir, queue_url, files.fleet, out_dir / "decisions.parquet",
                                               device=device, streams=streams, progress=run_progress)
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
        queue_url=queue_url, queue_stats=queue_stats, streams=0 if offline else streams,
    )


def _through_service(profile_dir: Path, queue_url: str, fleet: Path, output: Path, *, device: str | None,
                     streams: int, progress) -> tuple[RunResult, dict]:
    """Start a local server, stream ``fleet`` to it over Flight, write the decisions in order;
    returns what `triage run` would (the summary counts the decisions that came back) and the
    review queue's stats, then stops the server."""
    from hitl_triage.engine.monitoring import TriageSummary

    from .client import TriageClient, local_server

    total = pq.ParquetFile(fleet).metadata.num_rows
    summary = TriageSummary()
    tmp = output.with_name(output.name + ".partial")
    started = time.perf_counter()
    args = ("--device", device) if device else ()
    with local_server(profile_dir, queue_url, args=args) as server, TriageClient(server.flight) as client:
        connected = time.perf_counter()
        writer = None
        done = 0
        try:
            for decisions in client.triage_stream([fleet], streams=streams):
                if writer is None:
                    writer = pq.ParquetWriter(tmp, decisions.schema, compression="zstd")
                writer.write_batch(decisions)
                summary.update(decisions)
                done += decisions.num_rows
                if progress is not None:
                    progress(done, total)
        finally:
            if writer is not None:
                writer.close()
        summary.seconds = time.perf_counter() - connected  # end to end through the service
        stats = client.stats()["queue"]
    tmp.replace(output)
    return RunResult(summary=summary, output=output, stage_seconds={}, wall_seconds=time.perf_counter() - started), stats


def audit_strata_summary(audit_by_stratum: dict[str, int], top: int = 5) -> tuple[int, list[tuple[str, int]], int, int]:
    """(number of strata sampled, the ``top`` largest, smallest count, largest count)."""
    if not audit_by_stratum:
        return 0, [], 0, 0
    counts = np.array(list(audit_by_stratum.values()))
    ranked = sorted(audit_by_stratum.items(), key=lambda kv: -kv[1])[:top]
    return len(audit_by_stratum), ranked, int(counts.min()), int(counts.max())
