"""Service test set-up: a small fitted world and `triage serve` in a subprocess on port 0.

    world = make_world(tmp_path_factory.mktemp("flight"))       # fleet, profile, `triage run` decisions
    with served(world.profile, world.queue_url, world.dir) as server:
        server.flight, server.grpc                              # "127.0.0.1:PORT" of each face
        server.stop()                                           # SIGTERM; returns the exit code

``served`` is ``hitl_triage.serve.client.local_server`` (the server's output goes to a log file,
never an unread pipe, which would block a chatty server; one that does not come up raises with
the log's tail) with a ``[serve]`` table written from a dict.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
import urllib.request
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from hitl_triage.serve.client import LocalServer, local_server
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


@contextlib.contextmanager
def served(profile: Path, queue_url: str | None, tmp: Path, *extra: str, config: dict | None = None,
           env: dict | None = None) -> Iterator[LocalServer]:
    """`triage serve` on port 0 (gRPC and Flight; metrics off unless ``extra`` says otherwise),
    with ``config`` written as the ``[serve]`` table of a triage.toml; stopped with SIGTERM after."""
    args = list(extra)
    if config:
        toml = tmp / f"triage-{time.monotonic_ns()}.toml"
        toml.write_text(_serve_table(config))
        args += ["--config", str(toml)]
    with local_server(profile, queue_url, args=args, directory=tmp, env=env, start_timeout_s=START_TIMEOUT_S,
                      stop_timeout_s=STOP_TIMEOUT_S) as server:
        yield server


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


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The samples of a Prometheus text endpoint: (name, sorted labels) -> value."""
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def total(samples: dict, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples whose labels include ``labels``."""
    return sum(v for (n, ls), v in samples.items() if n == name and all((k, labels[k]) in ls for k in labels))
