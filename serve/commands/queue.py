"""`triage queue`: look at and work the review queue from a shell, without writing code.

    triage queue stats URL
    triage queue claim URL --tier T --reviewer R [-n N] [--lease S]
    triage queue verdict URL ID --action A [--label L] --reviewer R [--tier T]
    triage queue requeue URL --dead-letter
    triage queue export URL --out LABELS.parquet [--since ISO-TIME]   (the same file as `triage export`)
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from pathlib import Path

from . import export as export_command

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def open_from_args(url: str, config: Path | None, *, tiers: list[str] | None = None):
    """The queue at ``url`` with the options of ``config``'s ``[queue]`` table (a triage.toml),
    the tier order defaulting to ``tiers`` (a profile's)."""
    from hitl_triage.serve.queue import QueueOptions, open_queue

    table: dict = {}
    if config is not None:
        with open(config, "rb") as handle:
            table = tomllib.load(handle).get("queue", {})
    return open_queue(url, QueueOptions.from_dict(table, **({"tiers": list(tiers)} if tiers else {})))


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "queue", help="look at and work the review queue (stats, claim, verdict, requeue, export)",
        description="The review queue from a shell. URL: sqlite:///review.db or redis://host:port/0.",
    )
    parser.add_argument("--config", type=Path, metavar="triage.toml", help="read the queue's options from its [queue] table")
    commands = parser.add_subparsers(dest="queue_command", metavar="ACTION", required=True)

    stats = commands.add_parser("stats", help="depth, in flight, oldest age, done and dead letter per tier")
    stats.add_argument("url")
    stats.set_defaults(handler=run_stats)

    claim = commands.add_parser("claim", help="lease the most urgent items of a tier and print them")
    claim.add_argument("url")
    claim.add_argument("--tier", required=True)
    claim.add_argument("--reviewer", required=True)
    claim.add_argument("-n", type=int, default=10, help="items to claim (default 10)")
    claim.add_argument("--lease", type=float, default=300.0, help="seconds before an unanswered item is offered again (default 300)")
    claim.set_defaults(handler=run_claim)

    verdict = commands.add_parser("verdict", help="submit one reviewer's verdict on one item")
    verdict.add_argument("url")
    verdict.add_argument("id")
    verdict.add_argument("--action", required=True, choices=("confirm", "correct", "escalate", "out_of_scope"))
    verdict.add_argument("--label", type=int, default=None, help="the true class (required for correct)")
    verdict.add_argument("--reviewer", required=True)
    verdict.add_argument("--tier", default=None, help="the reviewer's tier (default: the tier that holds the item)")
    verdict.set_defaults(handler=run_verdict)

    requeue = commands.add_parser("requeue", help="offer dead-lettered items again")
    requeue.add_argument("url")
    requeue.add_argument("--dead-letter", action="store_true", required=True, help="requeue the dead letter list")
    requeue.set_defaults(handler=run_requeue)

    export = commands.add_parser("export", help="write every verdict as a labelled example to Parquet (as triage export)")
    export.add_argument("url")
    export_command.add_arguments(export, queue_option=False)
    export.set_defaults(handler=run_export)


def run_stats(args: argparse.Namespace) -> int:
    from rich.table import Table

    from .. import report

    with open_from_args(args.url, args.config) as queue:
        stats = queue.stats()
        figures = _verdict_figures(queue)
    table = Table(title=f"review queue {args.url}")
    for column in ("tier", "depth", "in flight", "oldest", "done", "dead letter"):
        table.add_column(column, justify="left" if column == "tier" else "right")
    for tier, entry in stats["tiers"].items():
        table.add_row(tier, f"{entry['depth']:,}", f"{entry['in_flight']:,}", _age(entry["oldest_age_s"]),
                      f"{entry['done']:,}", f"{entry['dead']:,}")
    report.console.print(table)
    report.console.print("verdicts: " + ", ".join(f"{k} {v:,}" for k, v in stats["verdicts"].items()))
    report.print_monitoring(figures)
    return 0


def _verdict_figures(queue) -> dict:
    """The monitoring figures of the queue's verdicts alone (no decisions: no escalation rates,
    no label-free estimate, no drift; `triage report` adds them)."""
    from hitl_triage.engine.monitoring_report import compute
    from hitl_triage.engine.monitoring_stats import MonitorStats, StatsConfig

    verdicts = queue.verdicts()
    classes = max([2, *verdicts.column("classes").to_pylist()]) if "classes" in verdicts.schema.names else 2
    return compute(MonitorStats(StatsConfig(classes=int(classes))).update_verdicts(verdicts))


def run_claim(args: argparse.Namespace) -> int:
    from rich.table import Table

    from hitl_triage.engine.policy import reason_names

    from .. import report

    with open_from_args(args.url, args.config) as queue:
        items = queue.claim(args.tier, args.reviewer, n=args.n, lease=args.lease)
    if items.num_rows == 0:
        report.console.print(f"no open items in tier {args.tier!r} for {args.reviewer}")
        return 0
    table = Table(title=f"{items.num_rows} items leased to {args.reviewer} for {args.lease:g} s")
    extras = [n for n in items.schema.names if n in ("uri",)]
    table.add_column("id", no_wrap=True)  # whole, whatever the terminal's width: it is what `verdict` takes
    table.add_column("priority", no_wrap=True)
    for column in ("reasons", "prediction", "source / category", *extras, "history"):
        table.add_column(column, overflow="fold")
    for row in items.to_pylist():
        prediction = "(blind)" if row["blind"] else f"{row['predicted_class']} ({row['confidence']:.3f})"
        where = " / ".join(str(row.get(n)) for n in ("source", "category") if row.get(n))
        table.add_row(row["id"], f"{row['priority']:.3f}", " ".join(reason_names(row["reason_mask"])), prediction,
                      where, *[str(row.get(n) or "") for n in extras], "; ".join(row["history"]))
    report.console.print(table)
    return 0


def run_verdict(args: argparse.Namespace) -> int:
    from hitl_triage.serve.queue import QueueError

    from .. import report

    with open_from_args(args.url, args.config) as queue:
        tier = args.tier or queue.tier_of(args.id)
        if tier is None:
            raise QueueError(f"id: expected an item in the queue, found none with id {args.id!r}")
        counts = queue.submit([{"id": args.id, "label": args.label, "reviewer": args.reviewer, "tier": tier,
                                "action": args.action, "ts": dt.datetime.now(dt.timezone.utc)}])
    outcome = ("already stored (nothing changed)" if counts["duplicates"] else
               "item done" if counts["done"] else "item moved to the next tier" if counts["moved"] else
               "stored; the item waits for another reviewer")
    report.console.print(f"{args.id}: {args.action} by {args.reviewer} at {tier}: {outcome}")
    return 0


def run_requeue(args: argparse.Namespace) -> int:
    from .. import report

    with open_from_args(args.url, args.config) as queue:
        count = queue.requeue_dead()
    report.console.print(f"{count:,} dead-lettered items offered again")
    return 0


def run_export(args: argparse.Namespace) -> int:
    return export_command.run(args)


def _age(seconds: float) -> str:
    if seconds <= 0:
        return "-"
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.0f} s"
