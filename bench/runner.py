"""``python -m bench``: measure our passes and engine against numpy, torch and the peers, side by
side in one run, and write a JSON and a CSV report named ``<machine>-<date>``.

    python -m bench                       # quick mode (the default): under 5 minutes on 2 cores
    python -m bench --full                # every size, bank 1M, all peers
    python -m bench --only signals,knn    # some suites
    python -m bench --out DIR             # default bench/results/

Each suite runs in turn; a suite whose part of the project has not landed yet is reported as
"not available yet: <reason>" and the run goes on. See bench/README.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import logging
import os
import sys
import time
import traceback
from pathlib import Path

from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

# As the `triage` command line does, before torch, numba or FAISS start their OpenMP pools:
# otherwise their idle workers spin after each parallel region and hold a core that the k-NN
# scan's threads need (1,000 queries, 100k bank: 19.5 against 15.5 microseconds a query).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from . import machine  # noqa: E402
from .report import OK, Row, free_stem, suite_table, write_reports  # noqa: E402

logger = logging.getLogger("bench")

SUITES = ("signals", "knn", "calibration", "escalation", "pipeline", "queue", "service", "monitoring", "feedback")
REPO = Path(__file__).resolve().parent.parent


class NotAvailableYet(Exception):
    """The part of the project a suite measures has not landed yet; the message says what."""


@dataclasses.dataclass
class Context:
    """What every suite gets: the mode, where to print, where rows go, shared measurements."""

    mode: str
    console: Console
    progress: Progress
    out_dir: Path
    stem: str
    threads: int
    seed: int
    cuda: bool
    rows: list[Row] = dataclasses.field(default_factory=list)
    rooflines: dict = dataclasses.field(default_factory=dict)
    suite_info: dict = dataclasses.field(default_factory=dict)
    artefacts: list[str] = dataclasses.field(default_factory=list)
    current: str = ""

    @property
    def quick(self) -> bool:
        return self.mode == "quick"

    def add(self, row: Row) -> Row:
        self.rows.append(row)
        if not row.ok:
            logger.debug("%s / %s / %s: %s", row.suite, row.case, row.implementation, row.status)
        return row

    def note(self, text: str) -> None:
        """A sentence about the current suite that belongs in the report (sizes lowered, data used)."""
        self.suite_info.setdefault(self.current, {}).setdefault("notes", []).append(text)
        self.console.print(f"  [dim]note: {escape(text)}[/dim]")

    def task(self, description: str, total: int):
        return self.progress.add_task(description, total=total)

    def advance(self, task, description: str | None = None) -> None:
        if description is not None:
            self.progress.update(task, description=description)
        self.progress.advance(task)


def _import_suite(name: str):
    import importlib

    return importlib.import_module(f"bench.suites.{name}")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Measure hitl-triage's passes and engine against numpy, torch and peer libraries, side by "
        "side in one run, and write a JSON and a CSV report named <machine>-<date> (see bench/README.md).",
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", dest="mode", action="store_const", const="quick",
                      help="smaller sizes and fewer repeats, under 5 minutes on 2 cores (default)")
    mode.add_argument("--full", dest="mode", action="store_const", const="full",
                      help="every size of the issue (bank 1M, 1M-row pipeline); tens of minutes")
    parser.set_defaults(mode="quick")
    parser.add_argument("--only", default="", help=f"comma-separated suites among {', '.join(SUITES)}")
    parser.add_argument("--out", default=str(REPO / "bench" / "results"), help="report folder (default bench/results/)")
    parser.add_argument("--threads", type=int, default=machine.usable_cores(),
                        help="CPU threads for torch and numba (default: the usable cores)")
    parser.add_argument("--seed", type=int, default=0, help="seed of every input factory")
    parser.add_argument("--no-cuda", action="store_true", help="skip the CUDA measurements even when a GPU is present")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    args = parser.parse_args(argv)
    if args.only:
        chosen = [s.strip() for s in args.only.split(",") if s.strip()]
        unknown = [s for s in chosen if s not in SUITES]
        if unknown:
            parser.error(f"--only: expected suites among {', '.join(SUITES)}, found {', '.join(unknown)}")
        args.suites = [s for s in SUITES if s in chosen]
    else:
        args.suites = list(SUITES)
    if args.threads < 1:
        parser.error(f"--threads: expected at least 1, found {args.threads}")
    return args


def _set_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    try:
        import numba

        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    except ImportError:
        pass


def main(argv=None) -> int:
    args = parse_args(argv)
    # Piped output (CI logs, files) gets a wide fixed width so table rows stay on one line.
    console = Console(width=None if sys.stdout.isatty() else 200)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(message)s", handlers=[RichHandler(console=console, show_path=False)],
    )
    _set_threads(args.threads)
    import torch

    started = datetime.datetime.now(datetime.timezone.utc)
    t_start = time.perf_counter()
    load_at_start = _load_average()
    info = machine.machine_info()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = free_stem(out_dir, f"{machine.machine_slug(info)}-{started.date().isoformat()}")
    cuda = torch.cuda.is_available() and not args.no_cuda

    gpu = info["gpu"]
    console.rule(f"hitl-triage benchmarks, {args.mode} mode")
    console.print(
        f"machine: {info['cpu']} ({info['cores']} usable cores, {', '.join(info['cpu_flags']) or 'no AVX2'}), "
        f"{info['memory_gib']} GiB; GPU: {gpu['name'] + ' driver ' + str(gpu['driver']) if gpu else 'none'}"
    )
    console.print(f"threads: {args.threads}; suites: {', '.join(args.suites)}; report: {out_dir / stem}.json/.csv")
    if load_at_start and load_at_start[0] > 0.5 * info["cores"]:
        console.print(f"[yellow]the machine is busy (load average {load_at_start[0]} on {info['cores']} cores): "
                      "absolute numbers will be low and noisy; the ratios of this run still compare like with like[/yellow]")

    progress = Progress(
        SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), console=console, transient=True,
    )
    ctx = Context(mode=args.mode, console=console, progress=progress, out_dir=out_dir, stem=stem,
                  threads=args.threads, seed=args.seed, cuda=cuda)
    with progress:
        for name in args.suites:
            ctx.current = name
            console.rule(f"suite: {name}")
            first_row = len(ctx.rows)
            t0 = time.perf_counter()
            status = OK
            quality_keys, hide = None, ()
            try:
                module = _import_suite(name)
                quality_keys = getattr(module, "TABLE_QUALITY", None)
                hide = getattr(module, "TABLE_HIDE", ())
                module.run(ctx)
            except NotAvailableYet as exc:
                status = f"not available yet: {exc}"
            except Exception as exc:  # noqa: BLE001 - one suite's crash must not lose the others' rows
                status = f"failed: {type(exc).__name__}: {exc}"
                logger.error("suite %s failed:\n%s", name, traceback.format_exc())
            seconds = time.perf_counter() - t0
            ctx.suite_info.setdefault(name, {}).update(status=status, seconds=round(seconds, 2))
            if status != OK:
                ctx.add(Row(suite=name, case="-", implementation="-", status=status))
            rows = ctx.rows[first_row:]
            console.print(suite_table(f"{name} ({seconds:.0f} s)", rows, quality_keys, hide))
            _write(ctx, args, info, started, t_start, load_at_start)  # a crash later keeps these

    json_path, csv_path = _write(ctx, args, info, started, t_start, load_at_start)
    console.rule(f"done in {time.perf_counter() - t_start:.0f} s")
    console.print(f"report: {json_path}\n        {csv_path}")
    for path in ctx.artefacts:
        console.print(f"        {path}")
    return 0


def _load_average() -> list[float] | None:
    """1, 5 and 15-minute load averages: on a shared machine they say how noisy the run was."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def _write(ctx: Context, args, info: dict, started, t_start: float, load_at_start):
    report = {
        "schema": "hitl-triage-bench/1",
        "run": {
            "started": started.isoformat(timespec="seconds"),
            "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "wall_s": round(time.perf_counter() - t_start, 2),
            "mode": ctx.mode,
            "suites": args.suites,
            "argv": sys.argv[1:],
            "threads": ctx.threads,
            "seed": ctx.seed,
            "load_average_at_start": load_at_start,
            "load_average_now": _load_average(),
            "commit": machine.git_commit(REPO),
            "env": {k: v for k, v in os.environ.items() if k.startswith(("HITL_TRIAGE_", "TRITON_", "OMP_", "NUMBA_"))},
        },
        "machine": info,
        "packages": machine.package_versions(),
        "rooflines": {k: v.to_dict() for k, v in ctx.rooflines.items()},
        "suites": ctx.suite_info,
        "artefacts": ctx.artefacts,
    }
    return write_reports(report, ctx.rows, ctx.out_dir, ctx.stem)
