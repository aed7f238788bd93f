"""`triage feedback`: the verdicts in a review queue make the next profile version."""

from __future__ import annotations

import argparse
from pathlib import Path

# Heavy imports (torch, the engine) happen inside run(), so `triage --help` stays quick.


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "feedback", help="make the next profile version from the review queue's verdicts",
        description="Re-fit the temperature and thresholds on the audit verdicts (Horvitz-Thompson weighted), "
                    "re-choose the budget split, grow the bank with in-scope edge cases and the watch list with "
                    "out-of-scope or wrong ones; write the next version beside the old one with a readable diff "
                    "(FEEDBACK.md). A running `triage serve --profile NEW` switches to it on a reload.",
    )
    parser.add_argument("--profile", required=True, type=Path, metavar="PROFILE_DIR", help="the current version")
    parser.add_argument("--queue", required=True, metavar="URL", help="sqlite:///review.db or redis://host:port/0")
    parser.add_argument("--out", type=Path, metavar="DIR",
                        help="where to write the next version (default: PROFILE_DIR.gN beside it, N its generation)")
    parser.add_argument("--calibration", type=Path, metavar="CALIB.parquet",
                        help="the labelled calibration file the first version was fitted on (first round only: later "
                             "versions keep their refit rows)")
    parser.add_argument("--all", action="store_true",
                        help="read every verdict, not only those stored after the ones the profile was made from")
    parser.add_argument("--config", type=Path, metavar="triage.toml",
                        help="[feedback] (the refit rule's knobs) and [queue] (the queue's options) tables")
    parser.set_defaults(handler=run, stopped="no new profile version was written")


def default_out(profile_dir: Path, generation: int) -> Path:
    """``PROFILE_DIR.gN`` beside the profile (its ``.gM`` suffix, if any, replaced)."""
    stem = profile_dir.name
    head, dot, tail = stem.rpartition(".g")
    if dot and tail.isdigit():
        stem = head
    return profile_dir.with_name(f"{stem}.g{generation}")


def run(args: argparse.Namespace) -> int:
    from hitl_triage.engine.config import FeedbackConfig
    from hitl_triage.engine.feedback import next_profile, verdicts_since
    from hitl_triage.engine.profile import Profile

    from .. import report
    from ..checks import UsageError, output_dir, read_table
    from .fit import save_whole
    from .queue import open_from_args

    config = FeedbackConfig.from_toml(args.config)
    profile = Profile.load(args.profile)
    out = args.out if args.out is not None else default_out(args.profile, profile.generation + 1)
    output_dir(out, "--out")
    if out.exists() and any(out.iterdir()):
        raise UsageError(f"--out {out}: expected a new or empty directory (a version is never overwritten), "
                         "found one with files")
    calibration = read_table(args.calibration, "--calibration") if args.calibration else None
    since = None if args.all else verdicts_since(profile)
    with open_from_args(args.queue, args.config, tiers=list(profile.config.tiers.order)) as queue:
        verdicts = queue.verdicts(since=since)
    result = next_profile(profile, verdicts, calibration=calibration, config=config)
    save_whole(_Writer(result), out)
    report.console.print(result.diff(), markup=False)
    report.console.print(f"next version {result.profile.version} written to {out}")
    return 0


def scheduled_feedback(service, every_s: float, config_path: Path | None) -> None:
    """`triage serve`'s feedback thread ([serve] feedback_every_s): every ``every_s`` seconds, a
    round on the verdicts stored since the serving version was made, when there are at least
    ``[feedback] min_audit_verdicts`` audit-sampled ones; the next version goes beside the serving
    one (``PROFILE_DIR.gN``) and the server switches to it. A failed round is logged, the server
    keeps its version."""
    import logging

    from hitl_triage.engine.config import FeedbackConfig
    from hitl_triage.engine.feedback import next_profile, verdicts_since
    from hitl_triage.engine.feedback_rows import final_verdicts

    from .fit import save_whole

    logger = logging.getLogger(__name__)
    config = FeedbackConfig.from_toml(config_path)
    while not service._stopped.wait(every_s):
        try:
            profile = service.engines.profile
            verdicts = service.queue.verdicts(since=verdicts_since(profile))
            final = final_verdicts(verdicts)
            audited = 0 if final.num_rows == 0 else int((final.column("audit_weight").to_numpy(zero_copy_only=False) > 0).sum())
            if audited < config.min_audit_verdicts:
                continue
            result = next_profile(profile, verdicts, config=config)
            out = default_out(service.engines.profile_dir, profile.generation + 1)
            if out.exists():
                logger.warning("scheduled feedback: %s exists; not overwriting it", out)
                continue
            save_whole(_Writer(result), out)
            previous, version = service.engines.reload(out)
            logger.info("scheduled feedback: %s -> %s (%d audit verdicts), written to %s", previous, version, audited, out)
        except Exception:  # noqa: BLE001 - the server keeps serving its version
            logger.exception("scheduled feedback failed; still serving %s", service.engines.profile.version)


class _Writer:
    """What ``save_whole`` needs of a profile: ``save(directory)`` and ``path``, here writing the
    whole version (profile, refit rows, diff) so that it appears whole or not at all."""

    def __init__(self, result) -> None:
        self.result = result
        self.path: Path | None = None

    def save(self, directory: Path) -> Path:
        from hitl_triage.engine.feedback import write_next

        return write_next(self.result, directory)
