"""`triage export`: every verdict as a labelled training example, written to Parquet.

    triage export --queue URL --out LABELS.parquet [--since ISO-TIME] [--config triage.toml]

The rows, their provenance and the final label after adjudication are :mod:`hitl_triage.serve.export`'s
(the README's "Training data" section is the schema); ``triage queue export`` writes the same file.
"""

from __future__ import annotations

import argparse
import datetime as dt
from pathlib import Path


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "export", help="write every verdict as a labelled training example (Parquet)",
        description="Every stored verdict with its provenance, the item's logits and embedding (when kept) and "
                    "the final label after adjudication. URL: sqlite:///review.db or redis://host:port/0.",
    )
    add_arguments(parser, queue_option=True)
    parser.set_defaults(handler=run, stopped="no export was written")


def add_arguments(parser: argparse.ArgumentParser, *, queue_option: bool) -> None:
    """The export's options (``triage queue export`` takes the URL as its first argument)."""
    if queue_option:
        parser.add_argument("--queue", required=True, metavar="URL", dest="url", help="the review queue")
        parser.add_argument("--config", type=Path, metavar="triage.toml",
                            help="the queue's options ([queue]: tiers, overlap), as it was worked under")
    parser.add_argument("--out", required=True, type=Path, metavar="LABELS.parquet")
    parser.add_argument("--since", default=None, metavar="ISO-TIME", help="only verdicts stored after this time")


def since_seconds(text: str | None) -> float | None:
    """``--since`` as seconds since the epoch (a time without a zone is UTC)."""
    if not text:
        return None
    try:
        moment = dt.datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"--since: expected an ISO 8601 time such as 2026-12-03T10:00:00Z, found {text!r}") from None
    return (moment if moment.tzinfo else moment.replace(tzinfo=dt.timezone.utc)).timestamp()


def existing_queue(url: str, option: str = "queue url") -> str:
    """``url``, refused when it names an SQLite file that is not there: opening it would create an
    empty queue, and a mistyped path would read as "no verdicts"."""
    if url.startswith("sqlite:///") and not Path(url[len("sqlite:///"):]).is_file():
        raise ValueError(f"{option} {url}: expected an existing review queue, found no file at {url[len('sqlite:///'):]}")
    return url


def run(args: argparse.Namespace) -> int:
    from hitl_triage.serve.export import training_examples, write_parquet

    from .. import report
    from ..checks import output_file
    from .queue import open_from_args

    since = since_seconds(args.since)
    output_file(args.out, "--out")
    with open_from_args(existing_queue(args.url), args.config) as queue:
        examples = training_examples(queue, since=since)
    write_parquet(examples, args.out)
    done = int(examples.column("decisive").to_numpy(zero_copy_only=False).sum()) if examples.num_rows else 0
    report.console.print(f"{examples.num_rows:,} verdicts written to {args.out} ({done:,} items with a final label)")
    return 0
