"""`triage run`: triage Parquet files offline with a fitted profile."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "run", help="triage Parquet files with a profile",
        description="Stream row groups through the engine and write one decision row per input row, in order.",
    )
    parser.add_argument("--profile", required=True, type=Path, metavar="PROFILE_DIR")
    parser.add_argument("inputs", nargs="+", type=Path, metavar="INPUT.parquet")
    parser.add_argument("--out", required=True, type=Path, metavar="DECISIONS.parquet")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--batch-rows", type=int, default=None, help="rows per engine batch (default 262144)")
    parser.add_argument("--time-stages", action="store_true",
                        help="report seconds per stage (runs stages one after another)")
    parser.add_argument("--queue", default=None, metavar="URL",
                        help="also enqueue escalations and audit samples for review (sqlite:///review.db or "
                             "redis://host:port/0); a rerun adds nothing")
    parser.add_argument("--queue-config", type=Path, default=None, metavar="triage.toml",
                        help="read the queue's options from this file's [queue] table")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from hitl_triage.engine.profile import Profile

    from .. import report
    from ..offline import count_rows, run_offline

    profile = Profile.load(args.profile)
    total = count_rows(args.inputs)
    review_queue = None
    if args.queue:
        from .queue import open_from_args

        review_queue = open_from_args(args.queue, args.queue_config, tiers=profile.config.tiers.order)
    try:
        with report.row_progress("triage", total) as update:
            options = {"batch_rows": args.batch_rows} if args.batch_rows else {}
            result = run_offline(profile, args.inputs, args.out, device=args.device, progress=update,
                                 time_stages=args.time_stages, review_queue=review_queue, **options)
    finally:
        if review_queue is not None:
            review_queue.close()
    report.print_summary(result.summary)
    if review_queue is not None:
        report.console.print(f"review queue {args.queue}: {result.queued:,} new items "
                             f"({result.summary.escalated:,} escalated rows; items already queued are not added again)")
    report.console.print(f"wall time {result.wall_seconds:.1f} s, {total / result.wall_seconds / 1e6:.2f} M rows/s "
                         f"end to end; decisions written to {result.output}")
    if result.stage_seconds:
        report.print_stages(result.stage_seconds)
    return 0
