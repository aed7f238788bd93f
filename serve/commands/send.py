"""`triage send`: triage Parquet files on a running server (Arrow Flight, or triage.v1 with --grpc)."""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "send", help="triage Parquet files on a running triage server",
        description="Stream the files' rows to a triage server and write one decision row per input row, in order. "
                    "The server stores every escalation in its review queue before it answers; the decisions "
                    "file appears only when every row has its decision.",
    )
    parser.add_argument("--server", required=True, metavar="HOST:PORT",
                        help="the server's Arrow Flight port (with --grpc: its triage.v1 port); several, "
                             "comma-separated, for the Flight ports of `triage serve --workers N`")
    parser.add_argument("inputs", nargs="+", type=Path, metavar="INPUT.parquet")
    parser.add_argument("--out", required=True, type=Path, metavar="DECISIONS.parquet")
    parser.add_argument("--grpc", action="store_true", help="use triage.v1 (grpcio) instead of Arrow Flight")
    parser.add_argument("--token", default=os.environ.get("TRIAGE_TOKEN"),
                        help="bearer token (default: $TRIAGE_TOKEN; a fleet role may triage)")
    parser.add_argument("--tls-ca", type=Path, default=None, metavar="CA.pem",
                        help="connect over TLS, verifying the server with this CA certificate")
    parser.add_argument("--batch-rows", type=int, default=65_536, help="rows per batch sent (default 65536)")
    parser.add_argument("--streams", type=int, default=None,
                        help="concurrent streams (default: 2, or one per address when several are given)")
    parser.set_defaults(handler=run, stopped="no decisions file was written (one appears only when every row is decided)")


def run(args: argparse.Namespace) -> int:
    import pyarrow.parquet as pq

    from .. import report
    from ..checks import PartialFile, input_file, native_file, output_file, parquet_schema, positive_int
    from ..client import TriageClient, TriageError

    batch_rows = positive_int(args.batch_rows, "--batch-rows")
    addresses = [a.strip() for a in args.server.split(",") if a.strip()]
    if not addresses:
        raise ValueError(f"--server: expected HOST:PORT, found {args.server!r}")
    streams = positive_int(args.streams, "--streams") if args.streams is not None else max(2, len(addresses))
    total = sum(parquet_schema(path, "input")[1] for path in args.inputs)
    tls = input_file(args.tls_ca, "--tls-ca", "a PEM file") if args.tls_ca is not None else None
    output_file(args.out, "--out", inputs=args.inputs)
    partial = PartialFile(args.out, "--out")
    client = TriageClient(addresses, token=args.token, tls=tls, transport="grpc" if args.grpc else "flight",
                          batch_rows=batch_rows)
    rows = escalated = 0
    started = time.perf_counter()
    path = partial.claim()
    try:
        with native_file(path, "wb") as handle, report.row_progress("send", total) as update:
            writer: pq.ParquetWriter | None = None
            try:
                for decisions in client.triage_stream(args.inputs, streams=streams):
                    if writer is None:
                        writer = pq.ParquetWriter(handle, decisions.schema, compression="zstd")
                    writer.write_batch(decisions)
                    rows += decisions.num_rows
                    escalated += int(decisions.column("escalate").to_numpy(zero_copy_only=False).sum())
                    update(rows, total)
            finally:
                if writer is not None:
                    writer.close()
        if rows != total:
            raise RuntimeError(f"server {args.server}: expected decisions for {total:,} rows, found {rows:,}")
        partial.commit()
    except TriageError as exc:
        partial.discard()
        if exc.retryable or exc.code == "DEADLINE_EXCEEDED":  # the server, not the input: exit 1
            raise ConnectionError(f"server {args.server}: {exc.code}: {exc}") from None
        raise
    except BaseException:
        partial.discard()
        raise
    finally:
        client.close()
    seconds = time.perf_counter() - started
    report.console.print(f"{rows:,} rows decided by {args.server} over {'triage.v1' if args.grpc else 'Arrow Flight'}, "
                         f"{escalated:,} escalated ({escalated / rows if rows else 0:.1%}); {seconds:.1f} s, {rows / seconds / 1e6:.2f} M rows/s; decisions written to {args.out}")
    return 0
