"""A `triage serve` of one's own: started in a subprocess on free loopback ports, stopped after.

For `triage demo` and the benchmarks (and anyone trying the service on one machine); the tests
have their own, with logs kept for failures.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

START_TIMEOUT_S = 180.0
STOP_TIMEOUT_S = 120.0


@dataclasses.dataclass
class LocalServer:
    ports: dict
    process: subprocess.Popen
    host: str = "127.0.0.1"

    @property
    def grpc(self) -> str:
        return f"{self.host}:{self.ports['grpc']}"

    @property
    def flight(self) -> str:
        return f"{self.host}:{self.ports['flight']}"


@contextlib.contextmanager
def local_server(profile_dir: Path, queue_url: str | None, *, device: str | None = None,
                 extra: tuple[str, ...] = ()) -> Iterator[LocalServer]:
    """Yields the running server once it is SERVING; SIGTERM (a graceful stop) after."""
    with tempfile.TemporaryDirectory(prefix="triage-serve-") as tmp:
        ready = Path(tmp) / "ready.json"
        log = Path(tmp) / "serve.log"
        argv = [sys.executable, "-m", "hitl_triage.serve.cli", "serve", "--profile", str(profile_dir), "--port", "0",
                "--flight-port", "0", "--metrics-port", "-1", "--ready-file", str(ready), *extra]
        if queue_url:
            argv += ["--queue", queue_url]
        if device:
            argv += ["--device", device]
        with open(log, "w") as out:
            process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + START_TIMEOUT_S
            while not ready.exists():
                if process.poll() is not None or time.monotonic() > deadline:
                    tail = log.read_text(errors="replace").strip().splitlines()[-1:] or ["no output"]
                    raise RuntimeError(f"triage serve: expected the server to start, found "
                                       f"{'exit ' + str(process.returncode) if process.poll() is not None else 'no answer'}: {tail[0]}")
                time.sleep(0.1)
            yield LocalServer(json.loads(ready.read_text()), process)
        finally:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(STOP_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
