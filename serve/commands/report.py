"""`triage report`: the monitoring report, one self-contained HTML file.

    triage report --queue URL --profile DIR --out report.html [--decisions D.parquet ...]
                  [--calibration CAL.parquet] [--config triage.toml] [--windows N]
"""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "report", help="write the monitoring report (HTML: calibration, escalations, overrides, accuracy, reviewers, drift)",
        description="Override rates, audited accuracy against the label-free estimate, reviewer quality and kappa, "
                    "drift per source and retraining priorities, from a review queue's verdicts and the decisions "
                    "of `triage run`, drawn into one self-contained HTML file.",
    )
    parser.add_argument("--queue", required=True, metavar="URL", help="review queue (sqlite:///review.db or redis://host:port/0)")
    parser.add_argument("--profile", required=True, type=Path, metavar="PROFILE_DIR")
    parser.add_argument("--out", required=True, type=Path, metavar="report.html")
    parser.add_argument("--decisions", nargs="*", default=[], type=Path, metavar="DECISIONS.parquet",
                        help="`triage run` outputs, in arrival order (escalation rates, the label-free estimate, drift, slices)")
    parser.add_argument("--calibration", type=Path, default=None, metavar="CAL.parquet",
                        help="labelled data the profile was fitted on: the drift reference (default: each source's first windows)")
    parser.add_argument("--config", type=Path, default=None, metavar="triage.toml", help="the queue's [queue] table")
    parser.add_argument("--windows", type=int, default=None, help="windows the decisions and verdicts are cut into (default 12)")
    parser.add_argument("--device", default=None, help="cpu or cuda, for deciding the calibration file")
    parser.set_defaults(handler=run, stopped="no report was written (one appears only whole)")


def run(args: argparse.Namespace) -> int:
    from hitl_triage.engine.profile import Profile

    from .. import report
    from ..checks import UsageError, output_file, positive_int
    from ..report_html import DEFAULT_WINDOWS, monitoring_of, write_report
    from .queue import open_from_args

    windows = DEFAULT_WINDOWS if args.windows is None else positive_int(args.windows, "--windows")
    for path in [*args.decisions, *([args.calibration] if args.calibration else [])]:
        if not Path(path).is_file():
            raise UsageError(f"{path}: expected a Parquet file, found none")
    profile = Profile.load(args.profile)
    engine = None
    if args.calibration is not None:
        from hitl_triage.engine.engine import TriageEngine

        engine = TriageEngine(profile, device=args.device)
    with open_from_args(args.queue, args.config, tiers=profile.config.tiers.order) as queue:
        figures, stats = monitoring_of(queue, profile, decisions=args.decisions, calibration=args.calibration,
                                       engine=engine, windows=windows)
    out = write_report(output_file(args.out, "--out", inputs=[("--decisions", d) for d in args.decisions],
                                   outside=[args.profile]), figures, stats, profile)
    alerts = figures.get("alerts", [])
    report.console.print(f"report written to {out} ({len(alerts)} alert{'s' if len(alerts) != 1 else ''}"
                         + "".join(f"; {a['message']}" for a in alerts) + ")")
    return 0

