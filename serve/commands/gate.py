"""`triage gate`: does a candidate model get the reviewed edge cases and the audit sample right?

    triage gate snapshot --queue URL --name NAME --out GATES/NAME.parquet   # freeze a gate set
    triage gate --gate-set GATES/NAME.parquet --predictions CANDIDATE.parquet [--thresholds gate.toml]
    triage gate --queue URL --predictions CANDIDATE.parquet                # against the queue as it is now

Exit code: 0 PASS, 1 FAIL (or no slice could be decided), 2 bad input (one line names the field).
The rule (slices, intervals, INSUFFICIENT) is :mod:`hitl_triage.serve.gate`'s.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "gate", help="check a candidate model's predictions on the frozen gate set (PASS/FAIL for CI)",
        description="Per slice (source x class x reason): accuracy with a Clopper-Pearson interval against the "
                    "thresholds; exit 0 PASS, 1 FAIL, 2 bad input.",
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--gate-set", type=Path, metavar="GATE.parquet", help="a gate set `triage gate snapshot` wrote")
    source.add_argument("--queue", metavar="URL", help="take the gate set from the queue now (not frozen)")
    parser.add_argument("--config", type=Path, metavar="triage.toml",
                        help="the queue's options ([queue]) and the thresholds ([gate])")
    parser.add_argument("--predictions", type=Path, metavar="CANDIDATE.parquet",
                        help="the candidate's predictions: id, predicted_class (and abstain: bool)")
    parser.add_argument("--thresholds", type=Path, metavar="gate.toml", help="a [gate] table (over --config's)")
    parser.add_argument("--min-accuracy", type=float, help="accuracy every slice must be shown to meet (default 0.9)")
    parser.add_argument("--confidence", type=float, help="level of each slice's interval (default 0.95)")
    parser.add_argument("--min-rows", type=int, help="fewer items than this: INSUFFICIENT (default 10)")
    parser.add_argument("--on-insufficient", choices=("ignore", "fail"), help="what an INSUFFICIENT slice does")
    parser.add_argument("--report", type=Path, metavar="SLICES.json", help="write every slice's verdict as JSON")
    parser.set_defaults(handler=run_check)
    commands = parser.add_subparsers(dest="gate_command", metavar="ACTION")
    snap = commands.add_parser("snapshot", help="freeze the queue's reviewed items as a named gate set")
    snap.add_argument("--queue", required=True, metavar="URL", dest="snapshot_queue")
    snap.add_argument("--name", required=True)
    snap.add_argument("--out", required=True, type=Path, metavar="GATE.parquet")
    snap.add_argument("--config", type=Path, metavar="triage.toml", dest="snapshot_config",
                      help="the queue's options ([queue]), as it was worked under")
    snap.set_defaults(handler=run_snapshot, stopped="no gate set was written")


def _table(path: Path | None, name: str) -> dict:
    if path is None:
        return {}
    from ..checks import input_file

    with open(input_file(path, f"--{'thresholds' if name == 'gate' else 'config'}", "a TOML file"), "rb") as handle:
        try:
            return tomllib.load(handle).get(name, {})
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"{path}: expected TOML, found a syntax error: {exc}") from None


def thresholds_from_args(args: argparse.Namespace):
    from hitl_triage.serve.gate import GateThresholds

    table = {**_table(args.config, "gate"), **_table(args.thresholds, "gate")}
    flags = {"min_accuracy": args.min_accuracy, "confidence": args.confidence, "min_rows": args.min_rows,
             "on_insufficient": args.on_insufficient}
    table.update({k: v for k, v in flags.items() if v is not None})
    return GateThresholds.from_dict(table)


def run_snapshot(args: argparse.Namespace) -> int:
    from hitl_triage.serve.gate import gate_set_info, save_gate_set, snapshot

    from .. import report
    from .export import existing_queue
    from .queue import open_from_args

    with open_from_args(existing_queue(args.snapshot_queue), args.snapshot_config) as queue:
        table = snapshot(queue, args.name)
    save_gate_set(table, args.out)
    info = gate_set_info(table)
    report.console.print(f"gate set {info['name']!r}: {info['rows']:,} items, sha256 {info['hash'][:12]}, written to {args.out}")
    return 0


def run_check(args: argparse.Namespace) -> int:
    from rich.table import Table

    from hitl_triage.serve.gate import GateError, check, load_gate_set, snapshot

    from .. import report
    from ..checks import read_table
    from .export import existing_queue
    from .queue import open_from_args

    if args.predictions is None:
        raise ValueError("--predictions: expected the candidate's predictions (a Parquet file), found none")
    if args.gate_set is None and args.queue is None:
        raise ValueError("--gate-set / --queue: expected where the gate set comes from, found neither")
    thresholds = thresholds_from_args(args)
    if args.gate_set is not None:
        gate_set = load_gate_set(args.gate_set)
    else:
        with open_from_args(existing_queue(args.queue), args.config) as queue:
            gate_set = snapshot(queue, "queue-now")
    predictions = read_table(args.predictions, "--predictions")
    try:
        result = check(gate_set, predictions, thresholds)
    except GateError as exc:
        raise ValueError(f"--predictions {args.predictions}: {exc}") from None
    table = Table(title=f"gate set {result.info.get('name')!r} ({str(result.info.get('hash'))[:12]}), "
                        f"{gate_set.num_rows:,} items")
    for column in ("source", "class", "reason", "rows", "accuracy", "interval", "threshold", "status"):
        table.add_column(column, justify="right" if column in ("rows", "accuracy", "threshold") else "left")
    for s in result.slices.to_pylist():
        style = {"PASS": "green", "FAIL": "bold red", "INSUFFICIENT": "yellow"}[s["status"]]
        table.add_row(s["source"], s["class"], s["reason"], f"{s['rows']:,}", f"{s['accuracy']:.3f}",
                      f"[{s['lower']:.3f}, {s['upper']:.3f}]", f"{s['threshold']:.3f}", f"[{style}]{s['status']}[/]")
    report.console.print(table)
    counts = {status: result.slices.column("status").to_pylist().count(status) for status in ("PASS", "FAIL", "INSUFFICIENT")}
    left_out = result.info.get("left_out_out_of_scope", 0)
    report.console.print(f"GATE {result.status}: {counts['PASS']} slices pass, {counts['FAIL']} fail, "
                         f"{counts['INSUFFICIENT']} have too few items to decide"
                         + (f"; {left_out} out-of-scope items left out (no abstain column)" if left_out else ""))
    if args.report is not None:
        from ..checks import output_file

        output_file(args.report, "--report")
        args.report.write_text(json.dumps({"status": result.status, "gate_set": result.info,
                                           "slices": result.slices.to_pylist()}, indent=1))
    return result.exit_code
