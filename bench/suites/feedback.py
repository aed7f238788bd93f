"""feedback: the cost of a feedback round and of the watch list in the hot path (issue 17).

Data: one simulated day of the fleet (its calibration rows fit the profile, budget mode, audit
base rate 1%). Verdicts: every fleet row of the first N becomes a reviewed item with the verdict a
right reviewer gives from the truth (confirm, correct, or out of scope), with the item's decision
columns, logits and embedding, as ``ReviewQueue.verdicts()`` exports them; so N verdicts hold
about N / 100 audit-sampled ones, and the edge cases the round adds to the bank and the watch
list grow with N. Rows, side by side in one run:

- ``next_profile`` at N verdicts (10k and 100k; 1M in full mode): the whole round (final
  verdicts, the weighted temperature fit, bank and watch list, the split search over 37
  candidates, thresholds, the diff), verdicts per second as the throughput;
- ``engine``: ``TriageEngine.triage`` of a 65,536-row batch with the fitted profile, then with the
  same profile holding a watch list of 1,000 and of 10,000 cases (vectors drawn from the fleet's
  OOD rows); ``ratios``: against the engine without one (below 1: the share the check costs).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from ..factories import fleet_data
from ..report import Row
from ..runner import NotAvailableYet
from .common import failure, time_call

SUITE = "feedback"
TABLE_QUALITY = ("audit", "bank_added", "watch_added", "watch")
TABLE_HIDE = ("dtype", "compile s")
BATCH_ROWS = 65_536


def verdicts_of(fleet, decisions, truth, n: int):
    """The first ``n`` rows as the queue's verdict export after right reviewers."""
    import pyarrow as pa

    fleet, decisions, truth = fleet.slice(0, n), decisions.slice(0, n), truth.slice(0, n)
    label = truth.column("label").to_numpy()
    predicted = decisions.column("predicted_class").to_numpy()
    action = np.where(label < 0, "out_of_scope", np.where(label == predicted, "confirm", "correct"))
    now = pa.array(np.full(n, 1_700_000_000_000_000, np.int64)).cast(pa.timestamp("us", tz="UTC"))
    columns = {
        "id": decisions.column("id"), "label": pa.array(label.astype(np.int32)), "reviewer": pa.array(["r"] * n),
        "tier": decisions.column("tier").fill_null("general"), "action": pa.array(action), "ts": now, "stored_at": now,
    }
    for name in ("reason_mask", "predicted_class", "ood_score", "audit_weight", "source"):
        columns[name] = decisions.column(name)
    columns["logits"], columns["embedding"] = fleet.column("logits"), fleet.column("embedding")
    return pa.table(columns)


def run(ctx) -> None:
    try:
        import pyarrow as pa

        from hitl_triage.engine.config import TriageConfig
        from hitl_triage.engine.engine import TriageEngine
        from hitl_triage.engine.feedback import next_profile
        from hitl_triage.engine.profile import Profile
        from hitl_triage.engine.watchlist import WatchList
    except ImportError as exc:
        raise NotAvailableYet(f"feedback (engine/feedback.py): {exc}") from exc
    counts = (10_000, 100_000) if ctx.quick else (10_000, 100_000, 1_000_000)
    rows = max(counts[-1], BATCH_ROWS)
    data = fleet_data(rows, bank_rows=20_000, calibration_rows=20_000, seed=ctx.seed + 17)
    ctx.note(f"data: {data.origin}: {rows:,} fleet rows; verdicts from the truth (right reviewers)")
    task = ctx.task(SUITE, total=len(counts) + 3)
    try:
        profile = Profile.fit(data.calibration, bank=data.bank.select(["embedding"]), config=TriageConfig())
        engine = TriageEngine(profile, device="cpu")
        decisions = pa.Table.from_batches([engine.triage(b) for b in data.fleet.to_batches(max_chunksize=BATCH_ROWS)])
    except Exception as exc:  # noqa: BLE001 - reported in the table
        ctx.add(Row(SUITE, "fit", "Profile.fit", {"rows": rows}, status=failure(exc)))
        return
    truth = pa.table({"label": pa.array(data.label)})
    for n in counts:
        ctx.progress.update(task, description=f"{SUITE}: next_profile at {n:,} verdicts")
        verdicts = verdicts_of(data.fleet, decisions, truth, n)
        try:
            result = next_profile(profile, verdicts, calibration=data.calibration)
            t = time_call(ctx, lambda: next_profile(profile, verdicts, calibration=data.calibration), warmup=0,
                          budget_s=20.0, full_budget_s=120.0)
        except Exception as exc:  # noqa: BLE001
            ctx.add(Row(SUITE, f"{n:,} verdicts", "next_profile", {"verdicts": n}, status=failure(exc)))
            continue
        r = result.report
        ctx.add(Row(SUITE, f"{n:,} verdicts", "next_profile", {"verdicts": n}, unit="verdicts/s", throughput=n / t.best,
                    seconds=t.best, median_s=t.median, repeats=t.repeats,
                    quality={"audit": r["verdicts"]["audit_items"], "bank_added": r["bank"]["added"],
                             "watch_added": r["watch"]["added"]}))
        ctx.advance(task)
    batch = data.fleet.slice(0, BATCH_ROWS)
    ood = np.flatnonzero(data.is_ood)
    base = None
    for cases in (0, 1_000, 10_000):
        ctx.progress.update(task, description=f"{SUITE}: engine with a watch list of {cases:,}")
        p = profile
        if cases:
            pick = np.random.default_rng(ctx.seed).choice(ood, cases, replace=len(ood) < cases)
            watch = WatchList(data.embedding[pick], [{"id": str(i)} for i in pick])
            p = dataclasses.replace(profile, watch=watch, version="",
                                    thresholds=dataclasses.replace(profile.thresholds, watch_radius=0.3))
        e = TriageEngine(p, device="cpu")
        t = time_call(ctx, lambda: e.triage(batch), budget_s=5.0)
        base = t.best if cases == 0 else base
        ratios = {"vs_no_watch": base / t.best} if cases and base else {}
        ctx.add(Row(SUITE, "engine, 65,536 rows", f"watch list {cases:,}" if cases else "no watch list",
                    {"rows": BATCH_ROWS, "watch": cases}, unit="rows/s", throughput=BATCH_ROWS / t.best, seconds=t.best,
                    median_s=t.median, repeats=t.repeats, ratios=ratios, quality={"watch": cases},
                    notes=f"{(t.best - base) / BATCH_ROWS * 1e6:.2f} us/row for the check" if cases and base else ""))
        ctx.advance(task)
    ctx.progress.remove_task(task)
