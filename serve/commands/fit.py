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
    parser.set_defaults(handler=run, stopped="no new profile directory was written")


def load_config(args):
    from hitl_triage.engine.config import TriageConfig

    config = TriageConfig.from_toml(args.config) if args.config else TriageConfig()
    if args.budget is not None:
        config.thresholds.mode, config.thresholds.budget = "budget", args.budget
    if args.target_risk is not None:
        config.thresholds.mode, config.thresholds.target_risk = "target_risk", args.target_risk
    return config.check_fit()


def run(args: argparse.Namespace) -> int:
    from hitl_triage.engine.decode import BatchError, check_bank_schema, check_schema, with_context
    from hitl_triage.engine.profile import Profile

    from .. import report
    from ..checks import output_dir, parquet_schema, read_table

    config = load_config(args)
    # Every file is checked from its footer before a row is read or anything is written.
    output_dir(args.out, "--out")
    schema, _ = parquet_schema(args.calibration, "--calibration")
    inputs = f"--calibration {args.calibration}" + (f" or --bank {args.bank}" if args.bank else "")
    if args.bank is not None:
        try:
            dim = check_schema(schema, embedding="optional", label="ignore").dim
        except BatchError as exc:
            raise with_context(exc, f"--calibration {args.calibration}") from None
        try:
            check_bank_schema(parquet_schema(args.bank, "--bank")[0], dim=dim)
        except BatchError as exc:
            raise with_context(exc, f"--bank {args.bank}, with --calibration {args.calibration}") from None
    calibration = read_table(args.calibration, "--calibration")
    bank = read_table(args.bank, "--bank", columns=["embedding"]) if args.bank else None
    with report.stage_progress("fitting profile") as progress:
        try:
            profile = Profile.fit(calibration, bank=bank, config=config, progress=progress)
        except BatchError as exc:
            raise with_context(exc, inputs) from None
    save_whole(profile, args.out)
    report.print_fit(profile, args.out)
    return 0


def save_whole(profile, directory: Path) -> Path:
    """Save ``profile`` into ``directory``; a new directory appears whole or not at all (written as
    ``.NAME.partial`` beside it, then renamed). An existing one is written in place, profile.toml
    last: a stop between the bank and profile.toml leaves a profile that loading refuses (its
    version no longer matches its bank), never one that decides differently from its file."""
    import shutil

    from ..checks import make_dirs, remove_dirs

    if directory.is_dir():
        return profile.save(directory)
    staging = directory.with_name(f".{directory.name}.partial")
    if staging.is_dir():  # left by a fit that was killed; nothing else writes there
        shutil.rmtree(staging)
    created = make_dirs(directory.parent, "--out")
    try:
        profile.save(staging)
        staging.rename(directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        remove_dirs(created)
        raise
    profile.path = directory
    return directory
