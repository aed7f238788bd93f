"""`triage serve`: the triage service (triage.v1 gRPC, Arrow Flight, Open Inference Protocol)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "serve", help="serve a profile to fleets over gRPC, Arrow Flight and the Open Inference Protocol",
        description="Decide batches sent by fleets; write escalations to the review queue before answering.",
    )
    parser.add_argument("--profile", required=True, type=Path, metavar="PROFILE_DIR")
    parser.add_argument("--queue", default=None, metavar="URL", help="review queue (sqlite:///review.db or redis://host:port/0)")
    parser.add_argument("--config", type=Path, default=None, metavar="triage.toml", help="its [serve] and [queue] tables")
    parser.add_argument("--host", default=None)
    parser.add_argument("--port", type=int, default=None, help="gRPC port (default 50051; 0: any free port)")
    parser.add_argument("--flight-port", type=int, default=None, help="Arrow Flight port (default 50052; -1: off)")
    parser.add_argument("--metrics-port", type=int, default=None, help="Prometheus metrics port (default 9464; -1: off)")
    parser.add_argument("--max-batch-rows", type=int, default=None)
    parser.add_argument("--max-delay-ms", type=float, default=None)
    parser.add_argument("--max-queue-rows", type=int, default=None)
    parser.add_argument("--max-message-mb", type=int, default=None, help="largest gRPC message either way (default 256)")
    parser.add_argument("--workers", type=int, default=None, help="server processes on the same ports")
    parser.add_argument("--tls-cert", default=None, metavar="CERT.pem", help="TLS certificate chain (with --tls-key)")
    parser.add_argument("--tls-key", default=None, metavar="KEY.pem", help="TLS private key (with --tls-cert)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--ready-file", type=Path, default=None,
                        help="write the bound ports here as JSON once SERVING (for scripts and tests)")
    # internal: set by the parent of --workers N on each worker it starts (serve/service/workers.py)
    parser.add_argument("--worker-of", type=int, default=None, help=argparse.SUPPRESS)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from hitl_triage.serve.service.config import ServeConfig
    from hitl_triage.serve.service.server import Service

    config = ServeConfig.from_toml(
        args.config, host=args.host, port=args.port, flight_port=args.flight_port, metrics_port=args.metrics_port,
        max_batch_rows=args.max_batch_rows, max_delay_ms=args.max_delay_ms, max_queue_rows=args.max_queue_rows,
        workers=args.workers, max_message_mb=args.max_message_mb, tls_cert=args.tls_cert, tls_key=args.tls_key,
    )
    if config.workers > 1 and args.worker_of is None:
        from hitl_triage.serve.service.workers import serve_workers

        return serve_workers(args, config)
    service = Service.start(args.profile, args.queue, config, device=args.device, queue_config=args.config,
                            worker=args.worker_of is not None)
    service.install_signal_handlers()
    if args.worker_of is not None:
        import threading

        from hitl_triage.serve.service.workers import watch_parent

        watch_parent(args.worker_of, lambda: threading.Thread(target=service.stop, name="shutdown").start())
    if args.ready_file is not None:
        service.write_ready_file(args.ready_file)
    if args.worker_of is None:
        print(f"triage serve: profile {service.engines.profile.version}; "
              + ", ".join(f"{face} on {config.host}:{port}" for face, port in service.ports.items()), flush=True)
    service.wait()
    # Everything admitted is answered and stored and the queue is closed. Exit now rather than
    # through interpreter shutdown, which waits on Flight's C++ threads: a client that still holds
    # an idle exchange open would keep the process alive past its stop.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
