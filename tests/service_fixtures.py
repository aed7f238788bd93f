"""Service test set-up: a small fitted world and `triage serve` in a subprocess on port 0.

    world = make_world(tmp_path_factory.mktemp("flight"))       # fleet, profile, `triage run` decisions
    with served(world.profile, world.queue_url, world.dir) as server:
        server.flight, server.grpc                              # "127.0.0.1:PORT" of each face
        server.stop()                                           # SIGTERM; returns the exit code

The server's output goes to a log file (never an unread pipe, which would block a chatty server);
a server that does not come up raises with the log's tail.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from test_cli import run_cli

START_TIMEOUT_S = 180.0  # a cold start imports torch and loads numba kernels: slow on a loaded 2-core VM
STOP_TIMEOUT_S = 60.0


@dataclasses.dataclass(frozen=True)
class World:
    """``dir``: the module's directory; ``fleet``: the fleet Parquet file; ``profile``: a profile
    fitted on its calibration file (bank of D=16); ``decisions``: `triage run` of the fleet file
    with that profile (the oracle); ``queue_url``: a fresh SQLite review queue."""

    dir: Path
    fleet: Path
    profile: Path
    decisions: Path

    @property
    def queue_url(self) -> str:
        return f"sqlite:///{self.dir / 'review.db'}"

    def table(self) -> pa.Table:
        return pq.read_table(self.fleet)

    def offline(self) -> pa.Table:
        return pq.read_table(self.decisions)


def make_world(directory: Path, *, rows: int = 6000, dim: int = 16, seed: int = 4, budget: float | None = None) -> World:
    """Simulate a small fleet, fit a profile on it and decide it offline (`triage run`)."""
    fleet = directory / "fleet.parquet"
    assert run_cli("simulate", "--rows", rows, "--out", fleet, "--calibration-rows", 4000, "--bank-rows", 1000,
                   "--dim", dim, "--sources", 3, "--seed", seed)[0] == 0
    fit = ["fit", "--calibration", directory / "fleet.calibration.parquet", "--bank", directory / "fleet.bank.parquet",
           "--out", directory / "profile"] + (["--budget", budget] if budget is not None else [])
    assert run_cli(*fit)[0] == 0
    decisions = directory / "decisions.parquet"
    assert run_cli("run", "--profile", directory / "profile", fleet, "--out", decisions)[0] == 0
    return World(directory, fleet, directory / "profile", decisions)


@dataclasses.dataclass
class Server:
    """A running `triage serve`: its ports (the ready file), process and log."""

    process: subprocess.Popen
    ports: dict
    log: Path
    host: str = "127.0.0.1"

    @property
    def grpc(self) -> str:
        return f"{self.host}:{self.ports['grpc']}"

    @property
    def flight(self) -> str:
        return f"{self.host}:{self.ports['flight']}"

    @property
    def pid(self) -> int:
        return self.ports["pid"]

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> int:
        """SIGTERM, then the exit code (the process is killed, and an error raised, past ``timeout_s``)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                return self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
                raise AssertionError(f"triage serve did not stop within {timeout_s} s of SIGTERM:\n{self.output()[-3000:]}")
        return self.process.returncode


@contextlib.contextmanager
def served(profile: Path, queue_url: str | None, tmp: Path, *extra: str, config: dict | None = None,
           env: dict | None = None) -> Iterator[Server]:
    """`triage serve` on port 0 (gRPC and Flight; metrics off unless ``extra`` says otherwise),
    with ``config`` written as the ``[serve]`` table of a triage.toml; stopped with SIGTERM after."""
    stamp = time.monotonic_ns()
    ready = tmp / f"ready-{stamp}.json"
    log = tmp / f"serve-{stamp}.log"
    argv = [sys.executable, "-m", "hitl_triage.serve.cli", "serve", "--profile", str(profile), "--port", "0",
            "--flight-port", "0", "--metrics-port", "-1", "--ready-file", str(ready)]
    if queue_url:
        argv += ["--queue", queue_url]
    if config:
        toml = tmp / f"triage-{stamp}.toml"
        toml.write_text(_serve_table(config))
        argv += ["--config", str(toml)]
    argv += list(extra)
    with open(log, "w") as out:
        process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    server = None
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not ready.exists():
            if process.poll() is not None or time.monotonic() > deadline:
                tail = log.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"triage serve did not start ({'exit ' + str(process.returncode) if process.poll() is not None else 'timeout'}):\n{tail}")
            time.sleep(0.1)
        server = Server(process, json.loads(ready.read_text()), log)
        yield server
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _serve_table(values: dict) -> str:
    lines = ["[serve]"]
    tables = []
    for key, value in values.items():
        if isinstance(value, dict):
            tables.append(f"[serve.{key}]\n" + "\n".join(f"{json.dumps(k)} = {json.dumps(v)}" for k, v in value.items()))
        else:
            lines.append(f"{key} = {json.dumps(value)}")
    return "\n".join(lines) + "\n" + "\n".join(tables) + "\n"


def batches(table: pa.Table, size: int) -> list[pa.RecordBatch]:
    """``table`` in record batches of ``size`` rows (the last shorter)."""
    return [table.slice(i, size).combine_chunks().to_batches()[0] for i in range(0, table.num_rows, size)]


def renamed(table: pa.Table, prefix: str) -> pa.Table:
    """``table`` with ``prefix`` before each id (rows the queue has not seen)."""
    import pyarrow.compute as pc

    ids = pc.binary_join_element_wise(prefix, table.column("id").cast(pa.string()), "")
    return table.set_column(table.schema.get_field_index("id"), "id", ids)


def queue_items(queue_url: str) -> int:
    """Items the review queue holds, every state counted (open, leased, done, dead)."""
    from hitl_triage.serve.queue import open_queue

    with open_queue(queue_url) as queue:
        return sum(t["depth"] + t["in_flight"] + t["done"] + t["dead"] for t in queue.stats()["tiers"].values())
