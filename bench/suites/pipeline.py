"""pipeline: ``triage run`` end to end on the CPU: a Parquet file of fleet predictions (M=5, C=10,
D=128) through a fitted profile (bank 100k; in full mode also a 1M bank) into a decisions file.

Steps: the fleet simulator writes the fleet, calibration and bank files (not timed);
``Profile.fit`` makes the profile, which is saved and loaded back as ``triage run`` would; then
``serve.offline.run_offline`` runs three times: once with ``time_stages=True`` (stages one after
another, so seconds per stage add up: read, decode, signals, knn, audit, policy, output, write),
once as ``triage run`` runs by default (reading, triage and writing overlapped), for the
end-to-end rows/s, and once the same way as ``triage run`` ran before issue 19 (patched in for
that row only: the k-NN distance left approximate, no row re-scored, the IVF scan without the
pre-filter head issue 19 added, and nprobe as `triage fit` tuned it then, on the calibration rows
without the hard rows), so that the cost of exact anomaly decisions is a ratio of one run; the two
overlapped runs alternate, best of several each. The profile (and so the anomaly threshold) is
today's for both: before issue 19 the threshold was chosen on approximate distances, which moves
which rows escalate, not what a row costs.

One row per stage with its seconds and share of the staged run's stage total; the overlapped
rows carry the share of rows re-scored exactly and, for the approximate run, the share of its
throughput the exact run keeps (``throughput_kept``, issue 19's target: at least 0.8) and the
ANOMALY bits that differ from the exact decisions. The machine's load average is noted around
each case (the bench machine is shared; ratios within one run are the comparable figures).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from ..report import Row
from ..runner import NotAvailableYet
from .common import banks_from_env, failure

SUITE = "pipeline"
TABLE_QUALITY = ("share", "fit_s", "bank_index", "rescored", "throughput_kept", "anomaly_bits_differ")
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

    sizes_list = _sizes(ctx.quick)
    if ctx.quick:
        ctx.note(f"quick mode: {sizes_list[0][0]:,} rows instead of 1,000,000 and no 1M bank (run --full for the issue's size)")
    if os.environ.get(BANKS_ENV):
        ctx.note(f"{BANKS_ENV}={os.environ[BANKS_ENV]}: banks {', '.join(f'{b:,}' for _, b in sizes_list)} only")
    config = TriageConfig()  # the defaults a user gets from `triage fit`
    task = ctx.task(SUITE, total=5 * len(sizes_list))  # simulate, fit, then one per row kind
    for rows, bank_rows in sizes_list:
        _run_case(ctx, task, rows, bank_rows, config, Profile, FleetConfig, simulate_fleet, run_offline, pq)
    ctx.progress.remove_task(task)


def _run_case(ctx, task, rows, bank_rows, config, Profile, FleetConfig, simulate_fleet, run_offline, pq) -> None:
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
        ctx.note(f"bank {bank_rows:,}: default TriageConfig; bank index {bank.kind}"
                 + (f" (nlist {bank.nlist}, nprobe {bank.nprobe})" if bank.kind == "ivf" else "")
                 + f", k={profile.k}, T={profile.temperature:.3g}, anomaly threshold {profile.thresholds.ood:.4f}")
        ctx.advance(task)

        before_nprobe = _nprobe_before_issue_19(profile, pq.read_table(files.calibration, columns=["id", "embedding"]))
        if before_nprobe is not None:
            ctx.note(f"bank {bank_rows:,}: the approximate row probes {before_nprobe} lists, as `triage fit` tuned "
                     f"nprobe before issue 19 (calibration rows only; with the hard rows: {bank.nprobe})")
        load_before = os.getloadavg()
        sizes = {"rows": rows, "M": 5, "C": 10, "D": 128, "bank": bank_rows, "file_MB": round(size_mb)}
        case = f"triage run, bank {bank_rows:,}"
        # The staged run once; the two overlapped runs alternate, best of `repeats` each, so that
        # their ratio is not one disturbed run (the machine is shared).
        repeats = 3 if ctx.quick else 2
        runs: dict[tuple[bool, bool], list] = {}
        plan = [(True, False)] + [(False, approximate) for _ in range(repeats) for approximate in (False, True)]
        for staged, approximate in plan:
            label = _label(staged, approximate)
            ctx.progress.update(task, description=f"{SUITE}: bank {bank_rows:,}, triage run, {label}")
            out = tmp / f"decisions-{int(staged)}{int(approximate)}.parquet"
            try:
                with (_approximate_knn(profile.bank, before_nprobe) if approximate else contextlib.nullcontext()):
                    result = run_offline(profile, [files.fleet], out, device="cpu", time_stages=staged)
            except Exception as exc:  # noqa: BLE001 - reported in the table
                runs.setdefault((staged, approximate), []).append(exc)
                continue
            runs.setdefault((staged, approximate), []).append((result, out))
        best: dict[tuple[bool, bool], object] = {}
        for (staged, approximate), results in runs.items():
            row = Row(SUITE, f"{case}, {_label(staged, approximate)}", "total", sizes, "float32", unit="rows/s")
            done = [r for r in results if not isinstance(r, Exception)]
            if not done:
                row.status = failure(results[0])
                ctx.add(row)
                ctx.advance(task)
                continue
            result, out = min(done, key=lambda r: r[0].wall_seconds)
            best[(staged, approximate)] = (result, out)
            row.seconds = result.wall_seconds
            row.repeats = len(done)
            row.median_s = float(np.median([r[0].wall_seconds for r in done]))
            row.throughput = rows / result.wall_seconds
            row.quality = {"fit_s": fit_s, "bank_index": profile.bank.kind if profile.bank is not None else "none",
                           "rescored": result.summary.knn_rescored_share if not approximate else 0.0}
            if approximate and (False, False) in best:
                exact_result, exact_out = best[(False, False)]
                # Exact decisions: the share of the approximate (pre-issue-19) throughput they keep.
                row.quality["throughput_kept"] = result.wall_seconds / exact_result.wall_seconds
                row.quality["anomaly_bits_differ"] = _anomaly_bits_differ(pq, exact_out, out)
            ctx.add(row)
            if staged:
                total = sum(result.stage_seconds.values())
                for stage, seconds in result.stage_seconds.items():
                    ctx.add(Row(SUITE, f"{case}, {_label(staged, approximate)}", stage, {"rows": rows}, seconds=seconds,
                                throughput=rows / seconds if seconds > 0 else None, unit="rows/s",
                                quality={"share": seconds / total if total else float("nan")}))
            ctx.advance(task)
        ctx.note(f"bank {bank_rows:,}: load average (1, 5, 15 min) {_load(load_before)} before the runs, "
                 f"{_load(os.getloadavg())} after, on {os.cpu_count()} CPUs shared with other work")


def _load(averages) -> str:
    return "/".join(f"{a:.1f}" for a in averages)


def _label(staged: bool, approximate: bool) -> str:
    if staged:
        return "stages timed"
    return "overlapped, approximate k-NN (before issue 19)" if approximate else "overlapped (default)"


def _nprobe_before_issue_19(profile, calibration) -> int | None:
    """The nprobe `triage fit` chose before issue 19 for the profile's IVF bank: tuned on the same
    calibration rows as today (those outside the threshold holdout, the split of engine.fit) but
    without the hard rows issue 19 added; None for a flat bank."""
    from hitl_triage.engine.bank import bank_vectors, tune_nprobe
    from hitl_triage.engine.fit import SPLIT_SEED
    from hitl_triage.kernels import audit_uniform

    bank = profile.bank
    if bank is None or bank.kind != "ivf":
        return None
    holdout = profile.config.calibration.holdout
    if holdout > 0:
        import pyarrow as pa

        ids = calibration.column("id").combine_chunks()
        calibration = calibration.filter(pa.array(np.asarray(audit_uniform(ids, SPLIT_SEED)) >= holdout))
    tuned = bank.nprobe
    try:
        return tune_nprobe(bank, bank_vectors(calibration), profile.k, profile.config.bank.max_knn_error,
                           hard_share=0.0)["nprobe"]
    finally:
        bank.nprobe = tuned


@contextlib.contextmanager
def _approximate_knn(bank, nprobe: int | None):
    """The engine's k-NN scoring as it was before issue 19: the backend's distance as it comes,
    no row re-scored, the IVF scan without the pre-filter head that came with the issue, and
    nprobe as it was tuned then (patched into the engine and the index for one run)."""
    import torch

    from hitl_triage.engine import engine as engine_module
    from hitl_triage.kernels.knn import KnnIndex, knn_distance
    from hitl_triage.kernels.knn.exact import no_head as headless

    exact_scores = engine_module.ood_scores
    with_head = KnnIndex.prefilter

    def no_head(index):
        return headless(index.host_unit())

    def approximate_scores(x, bank, k, threshold):
        if x.embedding is None:
            return exact_scores(x, bank, k, threshold)
        scores = torch.as_tensor(knn_distance(x.embedding, bank, k), device=x.logits.device).to(torch.float32)
        if x.embedding_missing is not None:
            scores = torch.where(x.embedding_missing, torch.full_like(scores, float("nan")), scores)
        return scores, torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)

    engine_module.ood_scores = approximate_scores
    KnnIndex.prefilter = no_head  # type: ignore[method-assign]
    tuned = bank.nprobe
    if nprobe is not None:
        bank.nprobe = nprobe
    try:
        yield
    finally:
        engine_module.ood_scores = exact_scores
        KnnIndex.prefilter = with_head  # type: ignore[method-assign]
        if nprobe is not None:
            bank.nprobe = tuned


def _anomaly_bits_differ(pq, exact_path, approximate_path) -> int:
    """Rows whose ANOMALY bit differs between two decisions files of the same input."""
    anomaly = 8
    a = pq.read_table(exact_path, columns=["reason_mask"]).column("reason_mask").to_numpy()
    b = pq.read_table(approximate_path, columns=["reason_mask"]).column("reason_mask").to_numpy()
    return int(np.count_nonzero((a & anomaly) != (b & anomaly)))


BANKS_ENV = "HITL_TRIAGE_BENCH_PIPELINE_BANKS"


def _sizes(quick: bool) -> list[tuple[int, int]]:
    """(rows of the Parquet file, bank rows) per case; only the banks named in
    ``HITL_TRIAGE_BENCH_PIPELINE_BANKS`` (comma-separated) when it is set, e.g. the 1M bank alone
    in full mode."""
    sizes = [(50_000, 100_000)] if quick else [(1_000_000, 100_000), (200_000, 1_000_000)]
    return banks_from_env(BANKS_ENV, sizes, lambda s: s[1])
