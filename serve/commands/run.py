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
    parser.add_argument("--batch-rows", type=int, default=None, help="rows per engine batch, >= 1 (default 262144)")
    parser.add_argument("--time-stages", action="store_true",
                        help="report seconds per stage (runs stages one after another)")
    parser.add_argument("--queue", default=None, metavar="URL",
                        help="also enqueue escalations and audit samples for review (sqlite:///review.db or "
                             "redis://host:port/0); a rerun adds nothing")
    parser.add_argument("--queue-config", type=Path, default=None, metavar="triage.toml",
                        help="read the queue's options from this file's [queue] table")
    parser.set_defaults(handler=run, stopped="no decisions file was written (one appears only when a run completes)")


def run(args: argparse.Namespace) -> int:
    import contextlib

    from hitl_triage.engine.profile import Profile

    from .. import report
    from ..checks import check_device, output_file, positive_int
    from ..offline import run_offline

    check_device(args.device)
    batch_rows = {} if args.batch_rows is None else {"batch_rows": positive_int(args.batch_rows, "--batch-rows")}
    queue_files = _queue_files(args.queue)
    for path in queue_files:  # the queue's database is neither an input nor the decisions file
        output_file(path, "--queue", inputs=[("--out", args.out), *args.inputs], partial=False)
    profile = Profile.load(args.profile)
    review_queue = None
    if args.queue:
        from .queue import open_from_args

        review_queue = open_from_args(args.queue, args.queue_config, tiers=profile.config.tiers.order)
    with contextlib.ExitStack() as bars:
        update = None

        def progress(done: int, total: int) -> None:
            # The bar opens once every check has passed, so a refused run prints only its error.
            nonlocal update
            if update is None:
                update = bars.enter_context(report.row_progress("triage", total))
            update(done, total)

        try:
            result = run_offline(profile, args.inputs, args.out, device=args.device, progress=progress,
                                 time_stages=args.time_stages, review_queue=review_queue, protect=tuple(queue_files),
                                 **batch_rows)
        finally:
            if review_queue is not None:
                review_queue.close()
    total = result.summary.rows
    report.print_summary(result.summary)
    if review_queue is not None:
        report.console.print(f"review queue {args.queue}: {result.queued:,} new items "
                             f"({result.summary.escalated:,} escalated rows; items already queued are not added again)")
    report.console.print(f"wall time {result.wall_seconds:.1f} s, {total / result.wall_seconds / 1e6:.2f} M rows/s "
                         f"end to end; decisions written to {result.output}")
    if result.stage_seconds:
        report.print_stages(result.stage_seconds)
    return 0


def _queue_files(url: str | None) -> list[Path]:
    """The files of an embedded (SQLite) queue at ``url``: the database and its WAL companions."""
    if not url or not url.startswith("sqlite:///") or len(url) == len("sqlite:///"):
        return []
    db = Path(url[len("sqlite:///"):])
    return [db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")]
