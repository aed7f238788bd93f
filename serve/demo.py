"""`triage demo` as a library: simulate (or load) a fleet, fit a profile, triage it (through the
service by default: a local `triage serve` with a SQLite review queue, the fleet streamed over
Arrow Flight by several concurrent streams; or offline, with ``offline=True``), and score the
escalations against the truth the simulator knows. With ``loop=True`` the same server goes on:
simulated reviewers work the queue, feedback makes the next version, the server reloads it and a
second stretch of the fleet streams through (:mod:`.demo_loop`)."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow.parquet as pq

from hitl_triage.engine.config import TriageConfig
from hitl_triage.engine.evaluation import CatchRates, catch_rates, escalate_top
from hitl_triage.engine.profile import Profile

from .sim import FleetConfig, FleetFiles, simulate_fleet
from .offline import RunResult, run_offline

if TYPE_CHECKING:
    from .demo_loop import LoopResult

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
    loop: "LoopResult | None" = None   # with loop=True: before and after feedback
    report: Path | None = None         # the monitoring report (HTML) the demo ends with


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
    loop: bool = False,
    reviewer_error: float = 0.0,
) -> DemoResult:
    """Run the whole loop in ``out_dir``; ``on_stage(name)`` announces each step."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    seconds = {}
    announce = on_stage or (lambda name: None)

    t0 = time.perf_counter()
    if data == "simulated":
        announce(f"simulating a fleet of {sources} sources, {rows:,} predictions")
        # With the loop, a day twice as long, cut in two stretches by time.
        files = simulate_fleet(out_dir / "fleet.parquet",
                               FleetConfig(rows=2 * rows if loop else rows, sources=sources, seed=seed),
                               progress=simulate_progress)
    elif data == "digits":
        from .sim.digits import make_digits_files

        announce("training a 5-member ensemble on scikit-learn's digits (0-7; 8 and 9 are unseen)")
        files = make_digits_files(out_dir / "fleet.parquet", seed=seed)
    else:
        raise ValueError(f"data: expected 'simulated' or 'digits', found {data!r}")
    stretch2: tuple[Path, Path] = (files.fleet, files.truth)  # replaced below with the loop's second stretch
    if loop:
        if offline:
            raise ValueError("--loop: expected the service path (the server reloads the next version), found --offline")
        from .demo_loop import split_stretches

        (fleet1, truth1), stretch2 = split_stretches(files.fleet, files.truth, out_dir)
        files = dataclasses.replace(files, fleet=fleet1, truth=truth1)
        if data == "simulated":
            # The fleet's model was updated after its profile was fitted: the profile comes from
            # calibration rows of the model before (less overconfident), which the loop corrects.
            files = dataclasses.replace(files, calibration=older_model_calibration(
                FleetConfig(rows=2 * rows, sources=sources, seed=seed), out_dir / "calibration.before-update.parquet"))
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
    loop_result = None
    if offline:
        announce("triaging the fleet")
        result = run_offline(profile, [files.fleet], out_dir / "decisions.parquet", device=device, progress=run_progress)
    else:
        announce(f"triaging the fleet through a local triage serve, {streams} Flight streams")
        queue_url = f"sqlite:///{(out_dir / 'review.db').resolve()}"
        result, queue_stats, loop_result = _through_service(
            profile_dir, queue_url, files.fleet, out_dir / "decisions.parquet", device=device, streams=streams,
            progress=run_progress, loop=_Loop(files, stretch2, out_dir, profile, reviewer_error, seed, announce,
                                              seconds) if loop else None)
    seconds["triage"] = time.perf_counter() - t0 - seconds.get("loop", 0.0)

    decisions = pq.read_table(result.output, columns=["escalate", "confidence"])
    truth = pq.read_table(files.truth, columns=["is_error", "is_ood"])
    escalate = decisions.column("escalate").to_numpy(zero_copy_only=False)
    is_error = truth.column("is_error").to_numpy(zero_copy_only=False)
    is_ood = truth.column("is_ood").to_numpy(zero_copy_only=False)
    is_error = is_error & ~is_ood  # wrong predictions on known inputs; OOD rows are counted apart
    policy = catch_rates(escalate, is_error, is_ood)
    by_confidence = escalate_top(decisions.column("confidence").to_numpy(zero_copy_only=False), policy.budget,
                                 higher_is_riskier=False)
    announce("writing the monitoring report" + ("" if queue_url is None or loop else
             ": simulated reviewers first work part of the queue, answering from the simulator's truth"))
    t0 = time.perf_counter()
    from .report_html import report_for_run

    # With the loop, its reviewers have worked the queue already: the report shows their verdicts.
    report_path = report_for_run(out_dir / "report.html", queue_url=queue_url, profile_dir=profile_dir,
                                 decisions=[result.output], calibration=files.calibration,
                                 truth=None if loop else files.truth)
    seconds["report"] = time.perf_counter() - t0
    return DemoResult(
        files=files, profile=profile, profile_dir=profile_dir, run=result, policy=policy,
        confidence_only=catch_rates(by_confidence, is_error, is_ood), seconds=seconds,
        queue_url=queue_url, queue_stats=queue_stats, streams=0 if offline else streams, loop=loop_result,
        report=report_path,
    )


#: Overconfidence of the model the loop's profile was fitted for (the fleet runs the simulator's default, 2.5).
BEFORE_UPDATE_OVERCONFIDENCE = 1.5


def older_model_calibration(config: FleetConfig, path: Path) -> Path:
    """Labelled calibration rows of the same world from the model before its update."""
    import pyarrow as pa

    from .sim import generate_calibration_batches

    before = dataclasses.replace(config, overconfidence=BEFORE_UPDATE_OVERCONFIDENCE)
    pq.write_table(pa.Table.from_batches(list(generate_calibration_batches(before))), path)
    return path


@dataclasses.dataclass
class _Loop:
    """What the loop needs once the first stretch has streamed through."""

    files: FleetFiles
    stretch2: tuple[Path, Path]
    out_dir: Path
    profile: Profile
    reviewer_error: float
    seed: int
    announce: object
    seconds: dict

    def run(self, server, client, queue_url: str, streams: int, first: Path) -> "LoopResult":
        from . import demo_loop as dl

        started = time.perf_counter()
        say = self.announce if callable(self.announce) else (lambda name: None)
        say(f"simulated reviewers (error rate {self.reviewer_error:.0%}) work the review queue by tier")
        reviewed = dl.review(queue_url, self.files.truth, self.reviewer_error, list(self.profile.config.tiers.order),
                             self.seed)
        say("triage feedback: the verdicts make the next profile version")
        new_dir = self.out_dir / "profile.g2"
        feedback = dl.make_next(self.profile, queue_url, self.files.calibration, new_dir)
        dl.reload(server.flight, new_dir)
        say("the server reloaded it; the second stretch of the fleet streams through")
        fleet2, truth2 = self.stretch2
        second = self.out_dir / "decisions.after.parquet"
        _stream(client, fleet2, second, streams=streams, progress=None)
        new = feedback.profile
        result = dl.LoopResult(
            before=dl.score(first, self.files.fleet, self.files.truth, self.profile),
            after=dl.score(second, fleet2, truth2, new), feedback=feedback, new_profile_dir=new_dir,
            reviewed=reviewed, bank_removed=dl.bank_removed(fleet2, self.profile, new, second),
        )
        self.seconds["loop"] = time.perf_counter() - started
        return result


def _through_service(profile_dir: Path, queue_url: str, fleet: Path, output: Path, *, device: str | None,
                     streams: int, progress, loop: _Loop | None = None) -> tuple[RunResult, dict, "LoopResult | None"]:
    """Start a local server, stream ``fleet`` to it over Flight, write the decisions in order;
    returns what `triage run` would (the summary counts the decisions that came back), the
    review queue's stats and, with ``loop``, what the loop did on the same server; then stops
    the server."""
    from .client import TriageClient, local_server

    started = time.perf_counter()
    args: tuple[str, ...] = ("--device", device) if device else ()
    if loop is not None:
        toml = loop.out_dir / "triage.toml"
        from .demo_loop import QUEUE_TOML

        toml.write_text(QUEUE_TOML)
        args += ("--config", str(toml))
    looped = None
    with local_server(profile_dir, queue_url, args=args) as server, TriageClient(server.flight) as client:
        summary = _stream(client, fleet, output, streams=streams, progress=progress)
        stats = client.stats()["queue"]
        if loop is not None:
            looped = loop.run(server, client, queue_url, streams, output)
    result = RunResult(summary=summary, output=output, stage_seconds={}, wall_seconds=time.perf_counter() - started)
    return result, stats, looped


def _stream(client, fleet: Path, output: Path, *, streams: int, progress):
    """Stream ``fleet`` through ``client`` over Flight; the decisions in order to ``output``
    (written as ``.partial`` and renamed whole); returns their summary."""
    from hitl_triage.engine.monitoring import TriageSummary

    total = pq.ParquetFile(fleet).metadata.num_rows
    summary = TriageSummary()
    tmp = output.with_name(output.name + ".partial")
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
    tmp.replace(output)
    return summary


def audit_strata_summary(audit_by_stratum: dict[str, int], top: int = 5) -> tuple[int, list[tuple[str, int]], int, int]:
    """(number of strata sampled, the ``top`` largest, smallest count, largest count)."""
    if not audit_by_stratum:
        return 0, [], 0, 0
    counts = np.array(list(audit_by_stratum.values()))
    ranked = sorted(audit_by_stratum.items(), key=lambda kv: -kv[1])[:top]
    return len(audit_by_stratum), ranked, int(counts.min()), int(counts.max())
