"""`triage run` stopped by SIGTERM, SIGINT or SIGKILL at random moments (issue 15, item 2).

Each run is a real process (forked by ``offline_signal_runner.py``, which pays the imports once),
on a fleet large enough for the run to take a while (60k rows in 6k-row batches), signalled at a
random moment: while it starts (before its partial file exists), or at a random fraction of a
clean run's duration after its partial file appeared. After SIGTERM and SIGINT the process has
cleaned up: exit 143 or 130, one line on stderr, no partial file, no decisions file unless the
run had finished. After SIGKILL nothing can clean up, so a partial file may be left. After every
stop a rerun (in this process) succeeds and leaves exactly one complete decisions file, equal to
the clean run's, and nothing else; the input never changes.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from engine_fixtures import one_torch_thread  # noqa: F401  (autouse)
from hitl_triage.serve.sim import FleetConfig, simulate_fleet
from test_cli import run_cli

BATCH_ROWS = 6_000


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    d = tmp_path_factory.mktemp("signals")
    simulate_fleet(d / "fleet.parquet", FleetConfig(rows=60_000, sources=3, dim=8, members=2, classes=4,
                                                    calibration_rows=2000, bank_rows=200, row_group_rows=10_000, seed=4))
    code, _ = run_cli("fit", "--calibration", d / "fleet.calibration.parquet", "--out", d / "profile")
    assert code == 0
    work = d / "work"
    work.mkdir()
    started = time.perf_counter()
    code, _ = run_cli(*_argv(d, work / "clean.parquet"))
    assert code == 0
    return d, work, time.perf_counter() - started, pq.read_table(work / "clean.parquet")


def _argv(d: Path, out: Path) -> list:
    return ["run", "--profile", d / "profile", d / "fleet.parquet", "--out", out, "--batch-rows", BATCH_ROWS]


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class Runner:
    """offline_signal_runner.py: ``start(argv, stderr)`` forks a ``triage`` process and returns
    its pid; ``wait(pid)`` returns its exit code (-N when signal N ended it)."""

    def __init__(self):
        env = {**os.environ, "OMP_NUM_THREADS": "1"}  # one torch thread, as in the test process
        self.process = subprocess.Popen([sys.executable, str(Path(__file__).with_name("offline_signal_runner.py"))],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        assert self._line() == "ready"

    def _line(self) -> str:
        line = self.process.stdout.readline()
        assert line, "the runner ended"
        return line.strip()

    def start(self, argv, stderr: Path) -> int:
        self.process.stdin.write("\t".join(["run", str(stderr), *map(str, argv)]) + "\n")
        self.process.stdin.flush()
        word, pid = self._line().split()
        assert word == "pid"
        return int(pid)

    def wait(self, pid: int) -> int:
        word, reaped, status = self._line().split()
        assert (word, int(reaped)) == ("exit", pid)
        return os.waitstatus_to_exitcode(int(status))

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=30)


@pytest.fixture
def runner():
    r = Runner()
    yield r
    r.close()


def _same_table(a: pa.Table, b: pa.Table) -> bool:
    """Equal schemas and values, NaN equal to NaN (``ood_score`` is NaN without a bank)."""
    if a.schema != b.schema or a.num_rows != b.num_rows:
        return False
    for x, y in zip(a.columns, b.columns):
        if pa.types.is_floating(x.type):
            if not np.array_equal(x.to_numpy(), y.to_numpy(), equal_nan=True):
                return False
        elif not x.equals(y):
            return False
    return True


def _wait_for(path: Path, pid: int, timeout: float = 120.0) -> bool:
    """True once ``path`` exists; False if the process ``pid`` ended (a zombie until reaped) first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            return True
        try:
            with open(f"/proc/{pid}/stat") as handle:
                if handle.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return False
        except FileNotFoundError:
            return False
        time.sleep(0.002)
    os.kill(pid, signal.SIGKILL)
    raise AssertionError(f"{path} did not appear within {timeout} s")


def _moments(rng) -> list[tuple[signal.Signals, str, float]]:
    """(signal, when, value): "start-up" stops value seconds after the fork; "writing" stops at
    value times the clean run's duration after the partial file appeared, stratified over [0, 1.5)
    so that early and late moments (some after the run has finished) both occur."""
    rounds = []
    for sig in (signal.SIGTERM, signal.SIGKILL):
        rounds.append((sig, "start-up", float(rng.uniform(0.0, 0.3))))
        rounds += [(sig, "writing", float(1.5 * (k + rng.uniform()) / 2)) for k in range(2)]
    rounds.append((signal.SIGINT, "writing", float(rng.uniform(0.0, 0.8))))
    return rounds


def test_a_stopped_or_killed_run_leaves_nothing_a_rerun_does_not_clean_up(fleet, runner, rng, tmp_path):
    d, work, run_seconds, clean = fleet
    out = work / "decisions.parquet"
    partial = work / "decisions.parquet.partial"
    before = _digest(d / "fleet.parquet")
    stale_partials = 0
    for sig, when, value in _moments(rng):
        out.unlink(missing_ok=True)
        stderr = tmp_path / "stderr"
        pid = runner.start(_argv(d, out), stderr)
        if when == "start-up":
            time.sleep(value)
        elif _wait_for(partial, pid):
            time.sleep(value * run_seconds)
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
        code = runner.wait(pid)
        err = stderr.read_text()
        case = f"{sig.name} at {when} {value:.2f}: exit {code}, stderr {err!r}"
        lines = [line for line in err.splitlines() if line.strip()]
        if code == 128 + sig:  # stopped by the command's handler: cleaned up, one line
            assert sig != signal.SIGKILL, case
            expected = f"triage run: stopped by {sig.name}; no decisions file was written (one appears only when a run completes)"
            assert lines == [expected], case
            assert not partial.exists(), case
        elif code == -sig:  # SIGKILL, or a stop before main installed its handler
            assert sig == signal.SIGKILL or when == "start-up", case
            stale_partials += partial.exists()
        else:
            assert code == 0 and not lines, case  # the run had finished
        if out.exists():  # only ever complete: the rename is the last step
            assert _same_table(pq.read_table(out), clean), case
        # The rerun: one complete decisions file and nothing else, whatever the stop left.
        code, _ = run_cli(*_argv(d, out))
        assert code == 0, case
        assert sorted(p.name for p in work.iterdir()) == ["clean.parquet", "decisions.parquet"], case
        assert _same_table(pq.read_table(out), clean), case
        assert _digest(d / "fleet.parquet") == before, case
    assert stale_partials >= 1, "no SIGKILL landed while the partial file was being written"
