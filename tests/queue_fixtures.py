"""Review-queue test set-up: decision batches made by hand, and real servers started on free
loopback ports (a redis-server in a temporary directory, stopped after)."""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from hitl_triage.engine.engine import DECISION_SCHEMA
from hitl_triage.engine.policy import Reason

TIERS = ("general", "specialist", "adjudicator")


def decision_batch(rng, rows: int, *, start: int = 0, escalate_share: float = 0.3, members: int = 3,
                   classes: int = 4, tiers=TIERS, priorities=None, audit_only_share: float = 0.0,
                   uri: bool = True) -> tuple[pa.Table, pa.Table]:
    """(decisions, predictions) as the engine would return and receive them: ids
    ``p-{start}``..., a share of rows escalated to random tiers with random priorities (or the
    ``priorities`` given, one per row), and a ``uri`` extra column that must pass through."""
    ids = [f"p-{i}" for i in range(start, start + rows)]
    escalate = rng.random(rows) < escalate_share
    reason = np.where(escalate, rng.choice([1, 2, 8, 1 | 16], rows), 0).astype(np.uint8)
    audit_only = escalate & (rng.random(rows) < audit_only_share)
    reason[audit_only] = int(Reason.AUDIT)
    priority = (rng.random(rows) if priorities is None else np.asarray(priorities)).astype(np.float32)
    priority[~escalate] = 0
    tier = np.where(escalate, rng.choice(list(tiers[:2]), rows), "")
    logits = rng.normal(size=(rows, members, classes)).astype(np.float32)
    predicted = logits.mean(axis=1).argmax(axis=1).astype(np.int32)
    columns = {
        "id": pa.array(ids), "escalate": pa.array(escalate), "reason_mask": pa.array(reason),
        "tier": pa.array([t or None for t in tier], pa.string()), "priority": pa.array(priority),
        "predicted_class": pa.array(predicted), "confidence": pa.array(rng.random(rows).astype(np.float32)),
        "margin": pa.array(rng.random(rows).astype(np.float32)), "mutual_info": pa.array(rng.random(rows).astype(np.float32)),
        "vote_agreement": pa.array(np.ones(rows, np.float32)), "ood_score": pa.array(rng.random(rows).astype(np.float32)),
        "audit_weight": pa.array(np.where(reason & 16, 20.0, 0.0).astype(np.float32)),
        "audit_stratum": pa.array([("source=a" if r & 16 else None) for r in reason], pa.string()),
        "valid": pa.array(np.ones(rows, bool)), "profile_version": pa.array(["v-test"] * rows),
    }
    decisions = pa.table({f.name: columns[f.name].cast(f.type) for f in DECISION_SCHEMA})
    decisions = decisions.append_column("source", pa.array([f"cam-{i % 3}" for i in range(rows)]))
    flat = pa.array(logits.reshape(-1))
    predictions = pa.table({
        "id": pa.array(ids),
        "logits": pa.FixedSizeListArray.from_arrays(pa.FixedSizeListArray.from_arrays(flat, classes), members),
        "source": decisions.column("source"),
        **({"uri": pa.array([f"s3://bucket/{i}.jpg" for i in ids])} if uri else {}),
    })
    return decisions, predictions


def escalated_ids(decisions: pa.Table) -> list[str]:
    return [i for i, e in zip(decisions.column("id").to_pylist(), decisions.column("escalate").to_pylist()) if e]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def redis_server(directory: Path, *, appendfsync: str = "always"):
    """A real redis-server on a free loopback port, data in ``directory``, AOF on; yields its URL."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed (Debian: apt-get install redis-server; .ci/run installs it)")
    port = free_port()
    process = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(directory), "--save", "",
         "--appendonly", "yes", "--appendfsync", appendfsync, "--protected-mode", "yes"],
        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    break
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start on port {port} (exit {process.poll()})")
            time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
