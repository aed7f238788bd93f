"""Faults (issue 21, item 5): the review queue goes away or cannot write, the profile directory is
half-written or corrupted at reload. Calls fail UNAVAILABLE (never decisions whose escalations
were not stored), the old profile keeps serving, and service resumes by itself when the fault
clears, with no restart of `triage serve`.

- Redis stopped mid-stream: a redis-server started here on a fixed port is SIGKILLed, then started
  again on the same port and append-only file.
- SQLite on a full filesystem: a 2 MiB tmpfs mounted by the test (skipped with a message where
  this process may not mount, that is, not as root), filled with a file, then emptied; and on a
  read-only one (mounted read-only before the server starts: Linux refuses to remount a
  filesystem read-only under an open database).
- The profile: its copy in a temporary directory is truncated, then given a new version over a
  bank that does not match; the server's profile watcher and ReloadProfile both fail and the
  old version goes on deciding.

GPU out-of-memory on a large batch is not tested here (no GPU on this machine; see the report).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import grpc
import pyarrow as pa
import pytest

from engine_fixtures import one_torch_thread  # noqa: F401  (autouse)
from hitl_triage.serve.proto.triage.v1 import triage_pb2, triage_pb2_grpc
from hitl_triage.serve.queue.local_redis import free_port
from reliability_fixtures import (grpc_channel, health, reliable_server, same_decisions, shared_world, sqlite_items, via_flight,
                                  via_grpc)

RECOVERY_S = 20.0  # how long a client retries after a fault clears before the test calls it stuck


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return shared_world(tmp_path_factory)


@pytest.fixture(scope="module")
def rows(world) -> pa.RecordBatch:
    return world.table().select(["id", "logits", "embedding", "source"]).slice(0, 64).combine_chunks().to_batches()[0]


def fresh(rows: pa.RecordBatch, prefix: str) -> pa.RecordBatch:
    return rows.set_column(0, "id", pa.array([f"{prefix}-{i}" for i in range(rows.num_rows)]))


def escalated(outcome) -> set[str]:
    d = outcome.decisions
    return {i for i, e in zip(d.column("id").to_pylist(), d.column("escalate").to_pylist()) if e}


def until_ok(send, what: str):
    """``send()`` again until it answers OK (the client's retry); the first OK outcome."""
    deadline = time.monotonic() + RECOVERY_S
    while True:
        got = send()
        if got.code == "OK":
            return got
        assert got.code == "UNAVAILABLE", (what, got)
        assert time.monotonic() < deadline, f"{what}: still {got} {RECOVERY_S} s after the fault cleared"
        time.sleep(0.2)


@contextlib.contextmanager
def redis_on(port: int, directory: Path):
    """redis-server on ``port`` with its append-only file in ``directory`` (fsync always)."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed; .ci/run installs it")
    process = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(directory), "--save", "",
                                "--appendonly", "yes", "--appendfsync", "always"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        import redis

        client = redis.Redis(port=port)
        deadline = time.monotonic() + 20
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                assert process.poll() is None and time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.05)
        yield process
    finally:
        if process.poll() is None:
            process.terminate()
            process.wait(10)


def test_redis_stopped_mid_stream_answers_unavailable_and_resumes_by_itself(world, rows, tmp_path):
    pytest.importorskip("redis")
    import redis

    port, data = free_port(), tmp_path / "redis"
    data.mkdir()
    url = f"redis://127.0.0.1:{port}/0"
    with contextlib.ExitStack() as stack:
        first = stack.enter_context(redis_on(port, data))
        server = stack.enter_context(reliable_server(world, tmp_path / "serve", queue_url=url))
        acked: set[str] = set()
        for face, send in (("grpc", via_grpc), ("flight", via_flight)):
            address = server.grpc if face == "grpc" else server.flight
            got = send(address, fresh(rows, f"before-{face}"))
            assert got.code == "OK", got
            acked |= escalated(got)
        first.send_signal(signal.SIGKILL)
        first.wait(10)
        refused = {}
        for face, send in (("grpc", via_grpc), ("flight", via_flight)):
            address = server.grpc if face == "grpc" else server.flight
            got = send(address, fresh(rows, f"during-{face}"))
            assert got.code == "UNAVAILABLE" and got.decisions is None, got  # never decisions without their items
            assert "review queue" in got.message, got.message
            refused[face] = (send, address)
        assert health(server.grpc) == "SERVING"  # the server itself is fine: it cannot store, and says so
        stack.enter_context(redis_on(port, data))  # back, on the same port and append-only file
        for face, (send, address) in refused.items():
            acked |= escalated(until_ok(lambda: send(address, fresh(rows, f"during-{face}")), face))
        stored = {key.decode() for key in redis.Redis(port=port).hkeys("hitl:items")}
        assert stored == acked


def can_mount(directory: Path) -> bool:
    directory.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(directory)], capture_output=True)
    return result.returncode == 0


def test_sqlite_on_a_full_filesystem_answers_unavailable_and_resumes(world, rows, tmp_path):
    small = tmp_path / "small"
    if not can_mount(small):
        pytest.skip("mount -t tmpfs is not permitted here (run as root, as CI does, to test a full filesystem)")
    try:
        url = f"sqlite:///{small / 'review.db'}"
        with reliable_server(world, tmp_path / "serve", queue_url=url) as server:
            acked: set[str] = set()
            got = via_grpc(server.grpc, fresh(rows, "warm"))
            assert got.code == "OK", got
            acked |= escalated(got)
            # Full: a filler takes the space left; calls are refused until it goes.
            filler = small / "filler"
            with contextlib.suppress(OSError), open(filler, "wb") as out:
                while True:
                    out.write(b"\0" * 4096)
                    out.flush()
            n, outcome = 0, None
            for n in range(200):
                outcome = via_grpc(server.grpc, fresh(rows, f"full-{n}"))
                if outcome.code != "OK":
                    break
                acked |= escalated(outcome)
            assert outcome is not None and outcome.code == "UNAVAILABLE" and outcome.decisions is None, outcome
            assert "review queue" in outcome.message, outcome.message
            assert health(server.grpc) == "SERVING"
            filler.unlink()
            acked |= escalated(until_ok(lambda: via_grpc(server.grpc, fresh(rows, f"full-{n}")), "after full"))
            assert server.stop() == 0
        assert set(sqlite_items(url)) == acked  # every acknowledged escalation, nothing refused
    finally:
        subprocess.run(["umount", str(small)], capture_output=True)


def test_sqlite_on_a_read_only_filesystem_is_refused_at_start_by_name(world, tmp_path):
    """A filesystem cannot be remounted read-only under an open database (EBUSY), so the
    read-only case is a queue whose directory is read-only when the server starts: it refuses
    to start, naming the queue, rather than serve decisions it cannot store."""
    small = tmp_path / "ro"
    if not can_mount(small):
        pytest.skip("mount -t tmpfs is not permitted here (run as root, as CI does)")
    try:
        subprocess.run(["mount", "-o", "remount,ro", str(small)], check=True)
        with pytest.raises(RuntimeError) as refused:
            with reliable_server(world, tmp_path / "serve", queue_url=f"sqlite:///{small / 'review.db'}"):
                pass
        text = str(refused.value)
        assert "expected it SERVING" in text and "review.db" in text and "Traceback" not in text, text[-2000:]
    finally:
        subprocess.run(["umount", str(small)], capture_output=True)


def test_a_half_written_or_corrupt_profile_keeps_the_old_one_serving(world, rows, tmp_path):
    profile = tmp_path / "profile"
    shutil.copytree(world.profile, profile)
    with reliable_server(world, tmp_path / "serve", profile=profile) as server:
        with grpc_channel(server.grpc) as channel:
            stub = triage_pb2_grpc.TriageStub(channel)
            version = stub.GetProfile(triage_pb2.GetProfileRequest(), timeout=30).version
            want = via_grpc(server.grpc, fresh(rows, "p0"))
            text = (profile / "profile.toml").read_text()
            damages = {
                "half-written profile.toml": lambda: (profile / "profile.toml").write_text(text[: len(text) // 2]),
                "a new version over the old bank": lambda: (profile / "profile.toml").write_text(
                    text.replace(version, version[:-4] + "beef")),
                "the bank's vectors truncated": lambda: _truncate_bank(profile),
            }
            for what, damage in damages.items():
                damage()
                if what == "a new version over the old bank":  # what the profile watcher acts on
                    time.sleep(2.2)  # it looks every 2 s (server.RELOAD_POLL_S)
                with pytest.raises(grpc.RpcError) as refused:
                    stub.ReloadProfile(triage_pb2.ReloadRequest(), timeout=60)
                assert refused.value.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION), what
                assert stub.GetProfile(triage_pb2.GetProfileRequest(), timeout=30).version == version, what
                got = via_grpc(server.grpc, fresh(rows, "p0"))
                assert got.code == "OK" and not same_decisions(got.decisions, want.decisions), what
                assert health(server.grpc) == "SERVING"
                shutil.rmtree(profile)
                shutil.copytree(world.profile, profile)  # repaired
            assert stub.ReloadProfile(triage_pb2.ReloadRequest(), timeout=60).version == version
        assert "still serving" in server.output() or "profile reload failed" in server.output()


def _truncate_bank(profile: Path) -> None:
    vectors = next(profile.rglob("*.npy"))
    with open(vectors, "r+b") as handle:
        handle.truncate(os.path.getsize(vectors) // 2)
