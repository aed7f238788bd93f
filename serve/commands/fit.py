"""`triage fit`: make a profile from calibration (and bank) Parquet files."""

from __future__ import annotations

import argparse
from pathlib import Path

# Heavy imports (torch, the engine) happen inside run(), so `triage --help` and the other
# subcommands do not pay for them.


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "fit", help="fit a profile from labelled calibration data",
        description="Fit temperature, thresholds and the k-NN bank; write a versioned profile directory.",
    )
    parser.add_argument("--calibration", required=True, type=Path, metavar="CALIB.parquet",
                        help="labelled predictions (data contract + label column)")
    parser.add_argument("--bank", type=Path, metavar="BANK.parquet", help="in-distribution embeddings for k-NN OOD")
    parser.add_argument("--out", required=True, type=Path, metavar="PROFILE_DIR", help="where to write the profile")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--budget", type=float, metavar="B", help="escalate about this fraction of traffic (e.g. 0.1)")
    mode.add_argument("--target-risk", type=float, metavar="A",
                      help="keep the error rate among auto-accepted predictions <= A (with prob. >= 1-delta)")
    parser.add_argument("--config", type=Path, metavar="triage.toml", help="configuration (every key has a default)")
    parser.set_defaults(handler=run)


def load_config(args):
    from hitl_triage.engine.config import TriageConfig

    config = TriageConfig.from_toml(args.config) if args.config else TriageConfig()
    if args.budget is not None:
        config.thresholds.mode, config.thresholds.budget = "budget", args.budget
    if args.target_risk is not None:
        config.thresholds.mode, config.thresholds.target_risk = "target_risk", args.target_risk
    return config.check()


def run(args: argparse.Namespace) -> int:
    import pyarrow.parquet as pq

    from hitl_triage.engine.profile import Profile

    from .. import report

    config = load_config(args)
    calibration = pq.read_table(args.calibration)
    bank = pq.read_table(args.bank, columns=["embedding"]) if args.bank else None
    with report.stage_progress("fitting profile") as progress:
        profile = Profile.fit(calibration, bank=bank, config=config, progress=progress)
    profile.save(args.out)
    report.print_fit(profile, args.out)
    return 0
