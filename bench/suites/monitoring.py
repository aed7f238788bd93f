"""monitoring: the cost of monitoring in the hot path (issue 18).

Data: one simulated day of the fleet (its calibration rows fit the profile), cut into engine
batches of 65,536 rows; two cases: a profile without a bank (the fastest engine, where the share
monitoring costs is largest) and one with a 20,000-vector k-NN bank. Rows, side by side in one run:

- ``engine``: ``TriageEngine.triage`` of every batch (what a server decides);
- ``engine + monitoring``: the same, each batch's decisions then added to the monitoring
  statistics (``ServiceMonitor.decided``: per-source escalation and reason counts, the drift
  histograms, the slice sums; what ``triage serve`` does per batch);
- ``monitoring alone``: ``ServiceMonitor.decided`` over the decided batches;
- ``compute``: ``compute`` of the figures once the day is in (what Stats and a metrics refresh
  pay, without reading the queue's verdicts).

``ratios``: ``engine + monitoring`` against ``engine`` (below 1: the share of throughput monitoring
costs).
"""

from __future__ import annotations

from ..factories import fleet_data
from ..report import Row
from ..runner import NotAvailableYet
from .common import failure, time_call

SUITE = "monitoring"
TABLE_QUALITY = ("sources", "keys")
TABLE_HIDE = ("dtype", "compile s")
BATCH_ROWS = 65_536


def run(ctx) -> None:
    try:
        import pyarrow as pa

        from hitl_triage.engine.engine import TriageEngine
        from hitl_triage.engine.monitoring_report import compute
        from hitl_triage.engine.profile import Profile
        from hitl_triage.serve.service.monitoring import ServiceMonitor
    except ImportError as exc:
        raise NotAvailableYet(f"monitoring (engine/monitoring_stats.py, serve/service/monitoring.py): {exc}") from exc
    rows = 131_072 if ctx.quick else 1_048_576
    data = fleet_data(rows, bank_rows=20_000, calibration_rows=20_000, seed=ctx.seed + 31)
    ctx.note(f"data: {data.origin}: {rows:,} rows in batches of {BATCH_ROWS:,}")
    batches = [b for b in pa.Table.from_batches(data.fleet.to_batches()).to_batches(max_chunksize=BATCH_ROWS)]
    sizes = {"rows": rows, "batch": BATCH_ROWS}
    task = ctx.task(SUITE, total=8)
    for case, bank in (("no bank", None), ("bank 20k", data.bank.select(["embedding"]))):
        try:
            profile = Profile.fit(data.calibration, bank=bank)
            engine = TriageEngine(profile, device="cpu")
        except Exception as exc:  # noqa: BLE001 - reported in the table
            ctx.add(Row(SUITE, case, "engine", sizes, status=failure(exc)))
            continue
        decided = [engine.triage(b) for b in batches]  # warm-up, and the monitoring-alone input

        def engine_only():
            for b in batches:
                engine.triage(b)

        def with_monitoring():
            monitor = ServiceMonitor(profile, None)
            for b in batches:
                monitor.decided(engine.triage(b))

        def monitoring_only():
            monitor = ServiceMonitor(profile, None)
            for d in decided:
                monitor.decided(d)
            return monitor

        timings = {}
        for name, fn in (("engine", engine_only), ("engine + monitoring", with_monitoring),
                         ("monitoring alone", monitoring_only)):
            ctx.progress.update(task, description=f"{SUITE}: {case}: {name}")
            timings[name] = time_call(ctx, fn, budget_s=10.0)
            ctx.advance(task)
        monitor = monitoring_only()
        t_compute = time_call(ctx, lambda: compute(monitor.stats), budget_s=5.0)
        ctx.advance(task)
        base = timings["engine"].best
        quality = {"sources": len({k[2] for k in monitor.stats.decisions if k[0] == "rows"}),
                   "keys": len(monitor.stats.decisions)}
        for name, t in timings.items():
            ratios = {"vs_engine": base / t.best} if name == "engine + monitoring" else {}
            ctx.add(Row(SUITE, case, name, sizes, unit="rows/s", throughput=rows / t.best, seconds=t.best,
                        median_s=t.median, repeats=t.repeats, ratios=ratios, quality=quality))
        ctx.add(Row(SUITE, case, "compute (figures of the day)", sizes, unit="calls/s", throughput=1 / t_compute.best,
                    seconds=t_compute.best, median_s=t_compute.median, repeats=t_compute.repeats, quality=quality))
    ctx.progress.remove_task(task)
