"""`triage serve`, restarted fast, for the kill loop of tests/test_reliability_kills.py.

    python reliability_serve_forker.py PROFILE GRPC_PORT FLIGHT_PORT READY_FILE

PROFILE's directory must hold the world's fleet.parquet (reliability_fixtures.shared_world).

A cold `triage serve` spends seconds importing torch, grpc and pyarrow.flight and loading numba's
kernels: too long to pay at each of a hundred kills. This process pays it once (imports, and an engine built and run
once so that every kernel is compiled in memory), with one torch thread and no thread left
running, then forks one server per ``start QUEUE_URL`` read from stdin. The child runs
`triage serve` itself (``hitl_triage.serve.cli.main(["serve", ...])``, the same code as the
command) on the fixed ports given, so clients reconnect to the same address after each restart,
and writes READY_FILE once SERVING. This process prints ``pid P`` once the child is forked and
``exit P STATUS`` once it has reaped it (the test SIGKILLs the child).
"""

from __future__ import annotations

import faulthandler
import os
import sys
import traceback


def say(line: str) -> None:
    os.write(1, (line + "\n").encode())  # one write(2): a kill never leaves half a line


def main() -> None:
    profile, grpc_port, flight_port, ready = sys.argv[1:5]
    os.environ["OMP_NUM_THREADS"] = "1"
    # numba's OpenMP pool cannot live through a fork ("fork() called from a process already using
    # GNU OpenMP"); its workqueue layer can, and with one thread the kernels compute the same.
    os.environ["NUMBA_THREADING_LAYER"] = "workqueue"
    os.environ["NUMBA_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)
    import pyarrow.flight  # noqa: F401
    from hitl_triage.engine import Profile, TriageEngine  # noqa: F401
    from hitl_triage.serve.cli import main as cli
    from hitl_triage.serve.commands.queue import open_from_args  # noqa: F401
    from hitl_triage.serve.service import flight_server, grpc_server, inference, server  # noqa: F401

    import hitl_triage.serve.queue.redis  # noqa: F401
    import hitl_triage.serve.queue.sqlite  # noqa: F401
    import pyarrow.parquet as pq

    engine = TriageEngine(Profile.load(profile), device="cpu")
    fleet = os.path.join(os.path.dirname(profile.rstrip("/")), "fleet.parquet")
    engine.triage(pq.read_table(fleet, use_threads=False).slice(0, 64))  # every kernel a batch calls, compiled once, here
    del engine
    say("ready")
    argv = ["serve", "--profile", profile, "--host", "127.0.0.1", "--port", grpc_port, "--flight-port", flight_port,
            "--metrics-port", "-1", "--device", "cpu", "--ready-file", ready, "--max-delay-ms", "1"]
    for line in sys.stdin:
        command, _, queue_url = line.strip().partition(" ")
        if command != "start" or not queue_url:
            continue
        pid = os.fork()
        if pid == 0:
            os.dup2(2, 1)  # the server's own lines go to stderr: stdout is this protocol's
            # A child that has not started in 8 s writes every thread's stack to the log (the
            # test replaces such a child: see test_reliability_kills.Forker.start).
            faulthandler.dump_traceback_later(8)
            code = 1
            try:
                code = cli(argv + ["--queue", queue_url])
            except BaseException:  # noqa: BLE001 - the test reads the child's stderr
                traceback.print_exc()
            sys.stderr.flush()
            os._exit(code)
        say(f"pid {pid}")
        _, status = os.waitpid(pid, 0)
        say(f"exit {pid} {status}")


if __name__ == "__main__":
    main()
