"""What the command line shows a person: progress bars and short summary tables (rich)."""

from __future__ import annotations

import contextlib
import math

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from hitl_triage.engine.monitoring import TriageSummary
from hitl_triage.engine.profile import Profile

console = Console(highlight=False)


class Tracker:
    """One live progress display with a bar per step (rich allows one live display at a time)."""

    def __init__(self, bar: Progress):
        self._bar = bar

    def rows(self, description: str, total: int):
        """A bar over rows; returns ``update(done, total)``."""
        task = self._bar.add_task(description, total=total, rate="", stage="")

        def update(done: int, total_rows: int | None = None) -> None:
            elapsed = self._bar.tasks[task].elapsed or 0.0
            rate = f"{done / elapsed / 1e6:.2f} M rows/s" if elapsed > 0 and done else ""
            self._bar.update(task, completed=done, total=total_rows or total, rate=rate)

        return update

    def stages(self, description: str):
        """A bar for multi-stage work; returns ``progress(stage, done, total)``."""
        task = self._bar.add_task(description, total=1, rate="", stage="")

        def progress(stage: str, done: int, total: int) -> None:
            self._bar.update(task, stage=stage, completed=done if stage != "done" else total, total=max(total, 1))

        return progress


@contextlib.contextmanager
def tracker():
    """Yields a :class:`Tracker`; the bars stay on screen when the work ends."""
    with Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}{task.fields[stage]}"), TimeElapsedColumn(), TimeRemainingColumn(),
        console=console, transient=False,
    ) as bar:
        yield Tracker(bar)


@contextlib.contextmanager
def row_progress(description: str, total: int):
    """A single progress bar over rows; yields ``update(done, total)``."""
    with tracker() as t:
        yield t.rows(description, total)


@contextlib.contextmanager
def stage_progress(description: str):
    """A single progress bar over stages; yields ``progress(stage, done, total)``."""
    with tracker() as t:
        yield t.stages(description)


def fmt_rate(x: float) -> str:
    return f"{100 * x:.1f}%"


def print_fit(profile: Profile, directory) -> None:
    """What `triage fit` fitted: temperature, ECE before -> after, thresholds, expected rates."""
    r = profile.fit_report
    cal = r.get("calibration", {})
    before, after = cal.get("holdout_before", {}), cal.get("holdout_after", {})
    table = Table(title=f"Profile {profile.version}", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    rows = r.get("rows", {})
    table.add_row("calibration rows", f"{rows.get('used', 0):,} used of {rows.get('calibration', 0):,} "
                  f"({rows.get('unknown_label', 0):,} unknown label, {rows.get('invalid', 0):,} invalid); "
                  f"{rows.get('temperature_fit', 0):,} fit T, {rows.get('thresholds', 0):,} choose thresholds")
    temp = f"{profile.temperature:.4f}"
    if profile.source_temperatures:
        temp += f" (+{len(profile.source_temperatures)} per-source)"
    table.add_row("temperature", temp)
    if before and after:
        table.add_row("ECE (holdout)", f"{before.get('ece', math.nan):.4f} -> {after.get('ece', math.nan):.4f}")
        table.add_row("NLL (holdout)", f"{before.get('nll', math.nan):.4f} -> {after.get('nll', math.nan):.4f}")
        table.add_row("accuracy (holdout)", fmt_rate(after.get("accuracy", math.nan)))
    th = profile.thresholds
    table.add_row("thresholds", f"confidence < {th.confidence:.4f}; mutual info > {th.mutual_info:.4f}; "
                  f"k-NN distance > {th.ood:.4f} (k={profile.k})" + (f"; vote < {th.vote_floor}" if th.vote_floor else ""))
    mode = r.get("thresholds", {})
    if mode.get("mode") == "target_risk":
        table.add_row("risk guarantee", f"error among auto-accepted <= {profile.config.thresholds.target_risk} with "
                      f"probability >= {1 - profile.config.thresholds.delta:.2f} (bound {mode.get('risk_bound', math.nan):.4f}, "
                      f"coverage {fmt_rate(mode.get('coverage', math.nan))})")
    rates = r.get("expected_rates", {})
    if rates:
        table.add_row("expected escalation", f"{fmt_rate(rates['union_before_policy_and_audit'])} (confidence "
                      f"{fmt_rate(rates['confidence'])}, disagreement {fmt_rate(rates['disagreement'])}, anomaly "
                      f"{fmt_rate(rates['anomaly'])}); with policy {fmt_rate(rates.get('policy', 0.0))} and audit "
                      f"{fmt_rate(rates.get('audit', 0.0))}: {fmt_rate(rates['with_audit'])}")
    if "bank" in r:
        b = r["bank"]
        line = f"{b['kept']:,} vectors, D={b['dim']}, {b['kind']} index" + (f", {b['dropped']} dropped" if b["dropped"] else "")
        if b.get("kind") == "ivf" and "nprobe" in b:
            line += f"; nprobe {b['nprobe']} of {b['nlist']} lists, k-th distance error {b.get('knn_error', math.nan):.2%}"
            if "knn_error_hard" in b:
                line += f" ({b['knn_error_hard']:.2%} on rows between the calibration rows)"
        if "rescored_share" in b:
            line += f"; anomaly decisions exact, {b['rescored_share']:.1%} of the threshold rows re-scored"
        table.add_row("bank", line)
    table.add_row("written to", str(directory))
    console.print(table)


def print_summary(summary: TriageSummary, *, title: str = "Triage summary", top_sources: int = 8) -> None:
    """Rows, escalations by reason, tier and source, audit samples, predictions/s."""
    s = summary
    head = Table(title=title, show_header=False, title_justify="left")
    head.add_column(style="bold")
    head.add_column()
    head.add_row("rows", f"{s.rows:,}")
    head.add_row("escalated", f"{s.escalated:,} ({fmt_rate(s.escalated / s.rows if s.rows else 0)})")
    head.add_row("invalid (escalated)", f"{s.invalid:,}")
    if s.no_embedding:
        head.add_row("no usable embedding (escalated)", f"{s.no_embedding:,}")
    head.add_row("audit samples", f"{s.audit_samples:,}")
    if s.knn_rows:
        head.add_row("k-NN re-scored exactly", f"{s.knn_rescored:,} ({fmt_rate(s.knn_rescored_share)} of rows: near or "
                     "above the anomaly threshold, so their anomaly decision and distance are exact search's)")
    if s.seconds > 0:
        head.add_row("engine throughput", f"{s.rows_per_second / 1e6:.2f} M predictions/s")
    console.print(head)

    reasons = Table(title="By reason (a row can carry several)", title_justify="left")
    reasons.add_column("reason")
    reasons.add_column("rows", justify="right")
    reasons.add_column("share", justify="right")
    for name, count in s.by_reason.items():
        reasons.add_row(name, f"{count:,}", fmt_rate(count / s.rows if s.rows else 0))
    tiers = Table(title="By tier", title_justify="left")
    tiers.add_column("tier")
    tiers.add_column("rows", justify="right")
    for name, count in sorted(s.by_tier.items(), key=lambda kv: -kv[1]):
        tiers.add_row(str(name), f"{count:,}")
    console.print(reasons)
    console.print(tiers)
    if s.rows_by_source:
        sources = Table(title=f"By source (top {top_sources} by escalation rate)", title_justify="left")
        sources.add_column("source")
        sources.add_column("rows", justify="right")
        sources.add_column("escalated", justify="right")
        sources.add_column("rate", justify="right")
        ranked = sorted(s.rows_by_source, key=lambda k: -s.escalated_by_source[k] / max(s.rows_by_source[k], 1))
        for name in ranked[:top_sources]:
            rows = s.rows_by_source[name]
            esc = s.escalated_by_source[name]
            sources.add_row(str(name), f"{rows:,}", f"{esc:,}", fmt_rate(esc / rows if rows else 0))
        console.print(sources)


def print_stages(stage_seconds: dict[str, float]) -> None:
    """Share of time per stage, so the slowest one is visible."""
    total = sum(stage_seconds.values()) or 1.0
    table = Table(title="Time by stage", title_justify="left")
    table.add_column("stage")
    table.add_column("seconds", justify="right")
    table.add_column("share", justify="right")
    for name, seconds in stage_seconds.items():
        table.add_row(name, f"{seconds:.2f}", fmt_rate(seconds / total))
    console.print(table)


def print_monitoring(figures: dict) -> None:
    """The monitoring figures a queue's verdicts give (engine/monitoring_report.py): override
    rates by tier, blind against shown; audited accuracy; kappa; reviewers; alerts."""
    overrides = figures.get("overrides", {}).get("by_tier_view", {})
    if not overrides:
        console.print("monitoring: no verdicts yet")
        return
    table = Table(title="Override rates (verdicts that correct the model or call it out of scope)", title_justify="left")
    for column in ("tier / view", "verdicts", "corrected", "out of scope", "rate", "95% interval"):
        table.add_column(column, justify="left" if column == "tier / view" else "right", no_wrap=column == "tier / view")
    for key, o in sorted(overrides.items()):
        table.add_row(key, f"{o['verdicts']:,}", f"{o['corrected']:,}", f"{o['out_of_scope']:,}", _rate(o["rate"]),
                      f"{_rate(o['low'])} - {_rate(o['high'])}")
    console.print(table)
    audited = figures.get("accuracy", {}).get("fleet", {}).get("audited", {})
    if audited.get("n"):
        console.print(f"audited accuracy of auto-accepted rows: {_rate(audited['value'])} (95% interval "
                      f"{_rate(audited['low'])} - {_rate(audited['high'])}, {audited['n']:,} audit verdicts)")
    agreement = figures.get("agreement", {})
    kappas = [(f"Cohen {k}", v) for k, v in agreement.get("cohen", {}).items()] + \
             [(f"Fleiss {k}", v) for k, v in agreement.get("fleiss", {}).items()]
    if kappas:
        console.print("agreement: " + "; ".join(f"{name} {v['value']:.3f} [{v['low']:.3f}, {v['high']:.3f}] (n {v['n']:,})"
                                                for name, v in kappas if v["n"]))
    reviewers = figures.get("reviewers", {})
    if reviewers:
        table = Table(title="Reviewers", title_justify="left")
        for column in ("reviewer", "gold items", "gold accuracy", "first windows", "latest", "agree with final", "status"):
            table.add_column(column, justify="left" if column in ("reviewer", "status") else "right")
        for name, r in sorted(reviewers.items()):
            table.add_row(name, f"{r['gold']['n']:,}", _rate(r["gold"]["value"]), _rate(r["gold_baseline"]["value"]),
                          _rate(r["gold_recent"]["value"]), _rate(r["adjudicated"]["value"]),
                          "[red]drifting[/red]" if r["drifting"] else "ok")
        console.print(table)
    for alert in figures.get("alerts", []):
        console.print(f"[red]alert[/red] {alert['kind']}: {alert['message']}")


def _rate(x: float) -> str:
    return "-" if x != x else fmt_rate(x)
