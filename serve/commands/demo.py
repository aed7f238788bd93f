"""`triage demo`: the whole offline loop on a simulated fleet (or real digits), nothing to prepare."""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo", help="simulate a fleet, fit a profile, triage it and show what reviewers would get",
        description="Run the offline loop end to end with embedded defaults and score it against the truth.",
    )
    parser.add_argument("--rows", type=int, default=1_000_000, help="fleet predictions to simulate (default 1,000,000)")
    parser.add_argument("--sources", type=int, default=8, help="deployed models in the fleet (default 8)")
    parser.add_argument("--data", choices=("simulated", "digits"), default="simulated",
                        help="simulated fleet (default) or scikit-learn's handwritten digits")
    parser.add_argument("--out", type=Path, default=None, help="working directory (default: a new temporary one)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--offline", action="store_true",
                        help="triage in this process, as `triage run` does, instead of through a local `triage serve`")
    parser.add_argument("--streams", type=int, default=4, help="concurrent Flight streams to the local server (default 4)")
    parser.add_argument("--loop", action="store_true",
                        help="close the loop: simulated reviewers work the queue, `triage feedback` makes the next "
                             "version, the server reloads it and a second stretch of the fleet (--rows more) streams "
                             "through; the summary shows before and after")
    parser.add_argument("--reviewer-error", type=float, default=0.0,
                        help="share of the simulated reviewers' answers that are wrong (default 0: the refit trusts "
                             "the labels, and wrong ones raise the temperature; see the README's Feedback section)")
    parser.set_defaults(handler=run, stopped="the working directory keeps what was finished")


def run(args: argparse.Namespace) -> int:
    from .. import report
    from ..checks import UsageError, check_device, output_dir, positive_int
    from ..demo import run_demo

    # Checked before anything is simulated or fitted, so a wrong option costs no minutes.
    check_device(args.device)
    positive_int(args.rows, "--rows")
    positive_int(args.sources, "--sources")
    positive_int(args.streams, "--streams")
    if args.loop and args.offline:
        raise UsageError("--loop: expected the service path (the server reloads the next version), found --offline")
    if not 0.0 <= args.reviewer_error <= 1.0:
        raise UsageError(f"--reviewer-error: expected a share in [0, 1], found {args.reviewer_error}")
    if args.out is not None:
        output_dir(args.out, "--out")
        try:  # the simulator's Parquet writer takes paths as UTF-8
            str(args.out).encode("utf-8")
        except UnicodeEncodeError:
            raise UsageError(f"--out {args.out}: expected a UTF-8 path, found bytes that are not UTF-8") from None
    console = report.console
    out = args.out or Path(tempfile.mkdtemp(prefix="triage-demo-"))
    what = (f"a simulated fleet: {args.rows:,} predictions from {args.sources} sources" if args.data == "simulated"
            else "scikit-learn's handwritten digits")
    console.print(f"[bold]hitl-triage demo[/bold] on {what}, in {out}")
    started = time.perf_counter()
    with report.tracker() as bars:
        result = run_demo(
            out, rows=args.rows, data=args.data, seed=args.seed, sources=args.sources, device=args.device,
            simulate_progress=bars.rows("simulate fleet", args.rows) if args.data == "simulated" else None,
            fit_progress=bars.stages("fit profile"),
            run_progress=bars.rows("triage" if args.offline else "triage via Flight", args.rows),
            offline=args.offline, streams=args.streams, loop=args.loop, reviewer_error=args.reviewer_error,
            on_stage=(lambda name: console.print(f"[dim]{name}[/dim]")) if args.loop else None,
        )
    wall = time.perf_counter() - started
    print_demo(result, wall)
    if result.loop is not None:
        print_loop(result.loop)
    return 0


def print_loop(loop) -> None:
    """Before and after feedback, each stretch scored against the truth."""
    from rich.table import Table

    from .. import report

    pct = report.fmt_rate
    b, a = loop.before, loop.after
    fb = loop.feedback.report
    table = Table(title="The loop: before and after feedback (each stretch scored against the truth)",
                  title_justify="left")
    table.add_column("")
    table.add_column("first stretch")
    table.add_column("second stretch")
    table.add_row("profile", f"{b.version} (T={b.temperature:.3f})", f"{a.version} (T={a.temperature:.3f}): "
                  f"{fb['temperature']['why']}")
    table.add_row("calibration error", f"ECE {b.audit_ece:.4f} on {b.audit_rows:,} audit rows",
                  f"ECE {a.audit_ece:.4f} on {a.audit_rows:,} audit rows")
    table.add_row("escalation rate", f"{pct(b.escalation_rate)} (budget {pct(b.budget)})",
                  f"{pct(a.escalation_rate)} (budget {pct(a.budget)})")
    table.add_row("errors caught", f"{pct(b.caught.error_recall)} of {b.caught.errors:,}",
                  f"{pct(a.caught.error_recall)} of {a.caught.errors:,}")
    table.add_row("out of distribution caught", f"{pct(b.caught.ood_recall)} of {b.caught.ood:,}",
                  f"{pct(a.caught.ood_recall)} of {a.caught.ood:,}")
    table.add_row("all escalations", f"{b.caught.escalated:,} of {b.rows:,}", f"{a.caught.escalated:,} of {a.rows:,}")
    table.add_row("reviewed", f"{loop.reviewed.get('stored', 0):,} verdicts", "")
    split = fb.get("split")
    if split:
        table.add_row("split", str(split["fixed"]),
                      f"{split['chosen']}: {split['why']}")
    table.add_row("bank", f"{fb['bank']['old_rows']:,} rows",
                  f"{fb['bank']['new_rows']:,} rows: {loop.bank_removed:,} escalations removed")
    radius = fb["watch"].get("radius_new")
    table.add_row("watch list", "none", f"{fb['watch']['new_rows']:,} cases"
                  + (f" within {radius:.3f}" if radius is not None else "")
                  + f": {a.known_edge_cases:,} escalations added (known edge case)")
    table.add_row("next version", "", f"{loop.new_profile_dir} (see FEEDBACK.md there)")
    report.console.print(table)


def print_demo(result, wall: float) -> None:
    """The ten-second read: throughput, what was escalated and why, what it caught."""
    from rich.table import Table

    from .. import report
    from ..demo import audit_strata_summary

    s = result.run.summary
    p, c = result.policy, result.confidence_only
    pct = report.fmt_rate
    table = Table(show_header=False, title="What the review team receives", title_justify="left")
    table.add_column(style="bold")
    table.add_column(overflow="fold")  # long paths fold instead of ending in an ellipsis
    if result.queue_url is None:
        table.add_row("throughput", f"{s.rows_per_second / 1e6:.2f} M predictions/s in the engine; "
                      f"{s.rows / result.seconds['triage'] / 1e6:.2f} M/s end to end (read, triage, write)")
    else:
        table.add_row("throughput", f"{s.rows_per_second / 1e6:.2f} M predictions/s through the service "
                      f"({result.streams} Flight streams, escalations stored before each answer)")
    table.add_row("escalated", f"{s.escalated:,} of {s.rows:,} predictions ({pct(p.budget)} review budget)")
    table.add_row("caught", f"{pct(p.error_recall)} of the {p.errors:,} wrong predictions on known inputs, "
                  f"{pct(p.ood_recall)} of the {p.ood:,} out-of-distribution inputs")
    table.add_row("confidence alone", f"at the same budget: {pct(c.error_recall)} of the wrong predictions, "
                  f"{pct(c.ood_recall)} of the out-of-distribution inputs")
    table.add_row("by reason", " | ".join(f"{name} {count:,}" for name, count in s.by_reason.items()))
    table.add_row("by tier", " | ".join(f"{name} {count:,}" for name, count in sorted(s.by_tier.items(), key=lambda kv: -kv[1])))
    ranked = sorted(s.rows_by_source, key=lambda k: -s.escalated_by_source[k] / max(s.rows_by_source[k], 1))
    table.add_row("by source", " | ".join(
        f"{name} {pct(s.escalated_by_source[name] / s.rows_by_source[name])}" for name in ranked[:4]
    ) + (f" | ... {len(ranked) - 4} more" if len(ranked) > 4 else ""))
    strata, top, low, high = audit_strata_summary(dict(s.audit_by_stratum))
    table.add_row("audit sample", f"{s.audit_samples:,} rows in {strata} strata ({low}-{high} per stratum); "
                  f"largest: " + ", ".join(f"{name} {count}" for name, count in top[:3]))
    if s.invalid or s.no_embedding:
        table.add_row("invalid", f"{s.invalid:,} rows with unusable logits and {s.no_embedding:,} without a "
                      "usable embedding were escalated")
    if result.queue_url is not None and result.queue_stats:
        tiers = result.queue_stats.get("tiers", {})
        table.add_row("review queue", " | ".join(f"{tier} {t['depth']:,}" for tier, t in tiers.items() if t["depth"])
                      + f" waiting, in {result.queue_url} (see `triage queue stats {result.queue_url}`)")
    table.add_row("profile", f"{result.profile_dir} (version {result.profile.version}, T={result.profile.temperature:.3f})")
    table.add_row("decisions", str(result.run.output))
    if result.report is not None:
        table.add_row("report", f"{result.report} (open it in a browser: calibration, escalations, overrides, "
                      "audited accuracy, reviewers, drift, retraining priorities)")
    table.add_row("wall time", f"{wall:.1f} s (data {result.seconds['data']:.1f} s, fit {result.seconds['fit']:.1f} s, "
                  f"triage {result.seconds['triage']:.1f} s" + ("" if result.queue_url is None else
                  ", server start and stop included") + f", report {result.seconds.get('report', 0.0):.1f} s)")
    report.console.print(table)
