"""`triage simulate`: write a simulated fleet (predictions, calibration, bank, truth) as Parquet."""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import hashlib
import logging
import os
import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from ..checks import make_dirs, output_file, remove_dirs
from ..sim import FleetConfig, FleetFiles, fleet_paths, simulate_fleet

_DEFAULTS = FleetConfig()
logger = logging.getLogger(__name__)

# glibc mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def _keep_freed_blocks_mapped() -> None:
    """Let glibc reuse freed multi-megabyte blocks instead of returning them to the kernel.

    Why: every generation block allocates a few 2-8 MB arrays and frees them once written. By
    default glibc serves those with fresh mmaps (or trims them off the heap), so each block pays
    its page faults again: on the 2-core VM, 2M rows took 0.61 s of system time and 228k faults,
    against 0.05 s and 16k with these thresholds. This process exists to run this command, so it
    may set them; the library never does. A libc without mallopt (musl, macOS) is left alone."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        logger.debug("no mallopt in this libc: malloc left at its defaults")
        return
    mallopt(_M_MMAP_THRESHOLD, 64 << 20)
    mallopt(_M_TRIM_THRESHOLD, 256 << 20)


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "simulate",
        help="write a simulated fleet's predictions (plus calibration, bank and truth files)",
        description=(
            "Simulate one day of a fleet of deployed models: FLEET.parquet (the predictions to triage) "
            "and, beside it, FLEET.calibration.parquet (labelled, in-distribution), FLEET.bank.parquet "
            "(reference embeddings) and FLEET.truth.parquet (what really happened to each row). "
            "The same seed and arguments give the same files."
        ),
    )
    parser.add_argument("--rows", required=True, type=int, metavar="N", help="fleet predictions to write")
    parser.add_argument("--out", required=True, type=Path, metavar="FLEET.parquet", help="the fleet file")
    parser.add_argument("--sources", type=int, default=_DEFAULTS.sources, metavar="S",
                        help=f"deployed model instances, with unequal traffic (default {_DEFAULTS.sources})")
    parser.add_argument("--seed", type=int, default=_DEFAULTS.seed, help=f"seed (default {_DEFAULTS.seed})")
    parser.add_argument("--members", type=int, default=_DEFAULTS.members, metavar="M",
                        help=f"ensemble members (default {_DEFAULTS.members})")
    parser.add_argument("--classes", type=int, default=_DEFAULTS.classes, metavar="C",
                        help=f"classes (default {_DEFAULTS.classes})")
    parser.add_argument("--dim", type=int, default=_DEFAULTS.dim, metavar="D",
                        help=f"embedding dimension (default {_DEFAULTS.dim})")
    parser.add_argument("--calibration-rows", type=int, default=_DEFAULTS.calibration_rows, metavar="N",
                        help=f"labelled calibration rows (default {_DEFAULTS.calibration_rows})")
    parser.add_argument("--bank-rows", type=int, default=_DEFAULTS.bank_rows, metavar="N",
                        help=f"reference bank rows (default {_DEFAULTS.bank_rows})")
    parser.add_argument("--row-group-rows", type=int, default=_DEFAULTS.row_group_rows, metavar="N",
                        help="rows per Parquet row group; layout only, never the data "
                        f"(default {_DEFAULTS.row_group_rows})")
    parser.set_defaults(handler=run, stopped="no fleet files were written")


def run(args: argparse.Namespace) -> int:
    console = Console(highlight=False)
    config = FleetConfig(  # a ValueError naming the option; the command line prints it on one line
        rows=args.rows, sources=args.sources, seed=args.seed, members=args.members, classes=args.classes,
        dim=args.dim, calibration_rows=args.calibration_rows, bank_rows=args.bank_rows,
        row_group_rows=args.row_group_rows,
    )
    final = fleet_paths(args.out)
    for path in final:
        output_file(path, "--out", partial=False)
    staging = _staging(final)
    for path in staging:  # left by a run that was killed: named after this output, so ours
        path.unlink(missing_ok=True)
    created = make_dirs(final.fleet.parent, "--out")

    _keep_freed_blocks_mapped()
    start = time.perf_counter()
    with Progress(
        TextColumn("[bold]simulating fleet"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(), TimeRemainingColumn(), console=console,
    ) as bar:
        task = bar.add_task("simulate", total=config.rows + config.calibration_rows + config.bank_rows, rate="")

        def progress(done: int, total: int) -> None:
            elapsed = time.perf_counter() - start
            rate = f"{done / elapsed / 1e6:.2f} M rows/s" if done and elapsed > 0 else ""
            bar.update(task, completed=done, total=total, rate=rate)

        try:
            simulate_fleet(staging.fleet, config, progress=progress)
            for written, path in zip(staging, final):
                os.replace(written, path)
        except BaseException:
            for path in staging:
                path.unlink(missing_ok=True)
            remove_dirs(created)
            raise
    files = final
    elapsed = time.perf_counter() - start

    table = Table(title=f"Simulated fleet (seed {config.seed}) in {elapsed:.1f} s", title_justify="left")
    table.add_column("file", style="bold")
    table.add_column("rows", justify="right")
    table.add_column("size", justify="right")
    table.add_column("path")
    for role, path, rows in (
        ("fleet", files.fleet, config.rows),
        ("calibration", files.calibration, config.calibration_rows),
        ("bank", files.bank, config.bank_rows),
        ("truth", files.truth, config.rows),
    ):
        table.add_row(role, f"{rows:,}", _size(path.stat().st_size), str(path))
    console.print(table)
    return 0


def _staging(files: FleetFiles) -> FleetFiles:
    """Where the four files are written before they are renamed into place: hidden names beside
    them, so a failed or stopped run leaves no file that looks like a fleet. The names are ASCII
    (a digest of the final name): the Parquet writer takes a path as UTF-8, and a Linux file name
    need not be."""
    digest = hashlib.blake2b(os.fsencode(files.fleet.name), digest_size=6).hexdigest()
    return fleet_paths(files.fleet.with_name(f".simulate-{digest}.partial.parquet"))


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"
