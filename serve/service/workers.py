"""``triage serve --workers N``: N server processes sharing the gRPC port, one parent over them.

One Python process is bound by its GIL, so the parent starts N ``triage serve`` processes (plain
subprocesses, each a whole server: engine, batcher, queue writer, faces) on the same gRPC port:
grpc sets SO_REUSEPORT and the kernel spreads new connections over the workers. The parent:

- picks the ports first (port 0: it binds a free port with SO_REUSEPORT and holds it until every
  worker has bound it too, so that all of them share one port);
- gives worker i Flight port ``flight_port + i`` (Arrow Flight turns SO_REUSEPORT off, so the
  workers cannot share one; 0: each its own free port; the ready file lists them);
- serves the metrics of all workers on ``metrics_port`` (prometheus-client's multiprocess mode:
  the workers write their counters to files in one directory, the parent adds them up at each
  scrape, so one target counts the whole server whatever N is);
- writes the ready file once every worker is SERVING;
- forwards SIGTERM / SIGINT to the workers, which finish their admitted calls, and exits 0 when
  all of them exited 0;
- restarts nothing: a worker that dies ends the server (the others are stopped; exit 1, with a
  line naming the worker and its exit status).

Each worker watches its parent and stops itself when the parent is gone.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any
from wsgiref.simple_server import WSGIServer

logger = logging.getLogger(__name__)
POLL_S = 0.1


def reserve_port(host: str, port: int) -> tuple[socket.socket, int]:
    """A socket bound (not listening) to host:port with SO_REUSEPORT, and its port (a free one
    for port 0): the workers bind the same port beside it."""
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise OSError(f"serve.port: expected to bind {host}:{port}, found it taken or not allowed ({exc})") from exc
    return sock, sock.getsockname()[1]


def worker_command(args, config, *, port: int, flight_port: int, ready_file: Path) -> list[str]:
    """The ``triage serve`` command line of one worker: the parent's settings, resolved."""
    command = [sys.executable, "-m", "hitl_triage.serve.cli"] + (["-v"] if getattr(args, "verbose", False) else []) + [
        "serve", "--profile", str(args.profile), "--host", config.host, "--port", str(port),
        "--flight-port", str(flight_port), "--metrics-port", str(config.metrics_port), "--workers", "1",
        "--max-batch-rows", str(config.max_batch_rows), "--max-delay-ms", repr(config.max_delay_ms),
        "--max-queue-rows", str(config.max_queue_rows), "--max-message-mb", str(config.max_message_mb),
        "--ready-file", str(ready_file), "--worker-of", str(os.getpid()),
    ]
    for flag, value in (("--queue", args.queue), ("--config", args.config), ("--device", args.device),
                        ("--tls-cert", config.tls_cert or None), ("--tls-key", config.tls_key or None)):
        if value is not None:
            command += [flag, str(value)]
    return command


class _Workers:
    def __init__(self, processes: list[subprocess.Popen]):
        self.processes = processes

    def first_dead(self) -> subprocess.Popen | None:
        for p in self.processes:
            if p.poll() is not None:
                return p
        return None

    def stop(self, grace_s: float) -> list[int | None]:
        """SIGTERM each worker still running; wait for all; SIGKILL those still there after grace_s."""
        for p in self.processes:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        until = time.monotonic() + grace_s
        codes: list[int | None] = []
        for p in self.processes:
            try:
                codes.append(p.wait(max(0.0, until - time.monotonic())))
            except subprocess.TimeoutExpired:
                logger.error("worker %d: still running %.0f s after SIGTERM; killing it", p.pid, grace_s)
                p.kill()
                p.wait()
                codes.append(None)
        return codes


def serve_workers(args, config, *, grace_s: float = 40.0) -> int:
    """Run ``config.workers`` workers until SIGTERM / SIGINT or until one of them dies; returns
    the exit code (0: all stopped cleanly)."""
    n = config.workers
    scratch = Path(tempfile.mkdtemp(prefix="triage-serve-"))
    metrics_dir = scratch / "metrics"
    metrics_dir.mkdir()
    stop = threading.Event()
    received: list[int] = []

    def handle(signum, frame):
        received.append(signum)
        stop.set()

    previous = {sig: signal.signal(sig, handle) for sig in (signal.SIGTERM, signal.SIGINT)}
    held: list[socket.socket] = []
    workers = _Workers([])
    metrics_server: WSGIServer | None = None
    try:
        sock, port = reserve_port(config.host, config.port)
        held.append(sock)
        flight_ports = [-1] * n
        if config.flight_port > 0:
            flight_ports = [config.flight_port + i for i in range(n)]
        elif config.flight_port == 0:
            flight_ports = [0] * n
        env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)}
        ready = [scratch / f"worker-{i}.json" for i in range(n)]
        for i in range(n):
            command = worker_command(args, config, port=port, flight_port=flight_ports[i], ready_file=ready[i])
            workers.processes.append(subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL))
        outcome = _wait(workers, stop, lambda: all(path.exists() for path in ready))
        if outcome != "ready":
            return _died(workers, grace_s, " before it was serving") if outcome == "dead" else _stopped(workers, grace_s)
        for s in held:
            s.close()
        held.clear()
        infos = [json.loads(path.read_text()) for path in ready]
        ports: dict[str, Any] = {"grpc": port}
        if config.flight_port >= 0:
            ports["flight"] = infos[0]["flight"]
            ports["flight_ports"] = [info["flight"] for info in infos]
        if config.metrics_port >= 0:
            from .metrics import multiprocess_registry, serve_metrics

            metrics_server, ports["metrics"] = serve_metrics(config.host, config.metrics_port,
                                                             multiprocess_registry(str(metrics_dir)))
        ports["workers"] = [info["pid"] for info in infos]
        if args.ready_file is not None:
            _write_json(args.ready_file, {"pid": os.getpid(), **ports})
        print(f"triage serve: {n} workers (pids {', '.join(str(p) for p in ports['workers'])}) on {config.host}:{port}"
              + (f", metrics on {config.host}:{ports['metrics']}" if "metrics" in ports else ""), flush=True)
        if _wait(workers, stop, lambda: False) == "dead":
            return _died(workers, grace_s, "")
        logger.warning("signal %d: stopping %d workers", received[0], n)
        return _stopped(workers, grace_s)
    finally:
        for s in held:
            s.close()
        if any(p.poll() is None for p in workers.processes):
            workers.stop(grace_s)
        if metrics_server is not None:
            metrics_server.shutdown()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        shutil.rmtree(scratch, ignore_errors=True)


def _wait(workers: _Workers, stop: threading.Event, ready) -> str:
    """Poll until ``ready()`` ("ready"), a worker dies ("dead") or a signal came ("signal")."""
    while not ready():
        if workers.first_dead() is not None:
            return "dead"
        if stop.wait(POLL_S):
            return "signal"
    return "ready"


def _died(workers: _Workers, grace_s: float, when: str) -> int:
    dead = workers.first_dead()
    assert dead is not None
    print(f"triage serve: worker {dead.pid} exited with status {dead.returncode}{when}; stopping the server "
          "(workers are not restarted)", file=sys.stderr, flush=True)
    workers.stop(grace_s)
    return 1


def _stopped(workers: _Workers, grace_s: float) -> int:
    """SIGTERM to every worker; 0 once all exited 0."""
    codes = workers.stop(grace_s)
    if any(code != 0 for code in codes):
        print(f"triage serve: workers exited with status {codes}", file=sys.stderr, flush=True)
        return 1
    return 0


def watch_parent(parent_pid: int, on_gone) -> None:
    """In a worker: call ``on_gone()`` once the parent ``parent_pid`` is gone (the worker was
    re-parented), so that a killed parent leaves no server behind."""

    def loop() -> None:
        while os.getppid() == parent_pid:
            time.sleep(1.0)
        logger.error("parent %d is gone; stopping", parent_pid)
        on_gone()

    threading.Thread(target=loop, name="watch-parent", daemon=True).start()


def _write_json(path: Path, content: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(content))
    tmp.replace(path)
