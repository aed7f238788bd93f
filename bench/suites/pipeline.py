"""pipeline: ``triage run`` end to end on the CPU: a Parquet file of fleet predictions (M=5, C=10,
D=128) through a fitted profile (bank 100k) into a decisions file.

Steps: the fleet simulator writes the fleet, calibration and bank files (not timed);
``Profile.fit`` makes the profile, which is saved and loaded back as ``triage run`` would; then
``serve.offline.run_offline`` runs twice: once with ``time_stages=True`` (stages one after another,
so seconds per stage add up: read, decode, signals, knn, audit, policy, output, write) and once
as ``triage run`` runs by default (reading, triage and writing overlapped), for the end-to-end
rows/s. One row per stage with its seconds and share of the staged run's stage total.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from ..report import Row
from ..runner import NotAvailableYet
from .common import failure

SUITE = "pipeline"
TABLE_QUALITY = ("share", "fit_s", "bank_index")
TABLE_HIDE = ("dtype", "compile s")


def run(ctx) -> None:
    try:
        from hitl_triage.engine.config import TriageConfig
        from hitl_triage.engine.profile import Profile
        from hitl_triage.serve.sim import FleetConfig, simulate_fleet
        from hitl_triage.serve.offline import run_offline
    except ImportError as exc:
        raise NotAvailableYet(f"triage run (engine profile, serve.offline, serve.sim): {exc}") from exc
    import pyarrow.parquet as pq

    rows, bank_rows = _sizes(ctx.quick)
    if ctx.quick:
        ctx.note(f"quick mode: {rows:,} rows instead of 1,000,000 (run --full for the issue's size)")
    config = TriageConfig()  # the defaults a user gets from `triage fit`
    task = ctx.task(SUITE, total=4)
    with tempfile.TemporaryDirectory(prefix="hitl-bench-") as tmp:
        tmp = Path(tmp)
        ctx.progress.update(task, description=f"{SUITE}: simulating {rows:,} fleet rows and a bank of {bank_rows:,}")
        files = simulate_fleet(tmp / "fleet.parquet", FleetConfig(rows=rows, bank_rows=bank_rows, seed=ctx.seed + 31))
        size_mb = files.fleet.stat().st_size / 1e6
        ctx.advance(task)

        ctx.progress.update(task, description=f"{SUITE}: Profile.fit (calibration 20k, bank {bank_rows:,})")
        t0 = time.perf_counter()
        profile = Profile.fit(pq.read_table(files.calibration), bank=pq.read_table(files.bank), config=config)
        fit_s = time.perf_counter() - t0
        profile.save(tmp / "profile")
        profile = Profile.load(tmp / "profile")
        bank = profile.bank
        ctx.note(f"profile: default TriageConfig; bank index {bank.kind}"
                 + (f" (nlist {bank.nlist}, nprobe {bank.nprobe})" if bank.kind == "ivf" else "")
                 + f", k={profile.k}, T={profile.temperature:.3g}")
        ctx.advance(task)

        sizes = {"rows": rows, "M": 5, "C": 10, "D": 128, "bank": bank_rows, "file_MB": round(size_mb)}
        for staged in (True, False):
            label = "stages timed" if staged else "overlapped (default)"
            ctx.progress.update(task, description=f"{SUITE}: triage run, {label}")
            row = Row(SUITE, f"triage run, {label}", "total", sizes, "float32", unit="rows/s")
            try:
                result = run_offline(profile, [files.fleet], tmp / f"decisions-{int(staged)}.parquet", device="cpu",
                                     time_stages=staged)
            except Exception as exc:  # noqa: BLE001 - reported in the table
                row.status = failure(exc)
                ctx.add(row)
                ctx.advance(task)
                continue
            row.seconds = result.wall_seconds
            row.throughput = rows / result.wall_seconds
            row.quality = {"fit_s": fit_s, "bank_index": profile.bank.kind if profile.bank is not None else "none"}
            ctx.add(row)
            if staged:
                total = sum(result.stage_seconds.values())
                for stage, seconds in result.stage_seconds.items():
                    ctx.add(Row(SUITE, f"triage run, {label}", stage, {"rows": rows}, seconds=seconds,
                                throughput=rows / seconds if seconds > 0 else None, unit="rows/s",
                                quality={"share": seconds / total if total else float("nan")}))
            ctx.advance(task)
    ctx.progress.remove_task(task)


def _sizes(quick: bool) -> tuple[int, int]:
    """(rows of the Parquet file, bank rows)."""
    return (50_000, 100_000) if quick else (1_000_000, 100_000)
