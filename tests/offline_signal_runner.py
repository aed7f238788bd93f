"""The process that tests/test_offline_signals.py signals: ``triage run`` commands, forked.

    python offline_signal_runner.py

Importing the package takes two to three seconds (torch), too long to pay at each of the test's
stops, so this process imports the modules once (and runs nothing: no thread pool is started
before a fork) and then, for every line ``run STDERR ARG...`` read from stdin, forks a child that
is ``triage ARG...``: ``hitl_triage.serve.cli.main`` with its stderr in the file STDERR and its
stdout discarded, exiting with main's exit code (the child gets the default signal dispositions,
and main installs its own, as in a fresh process). This process prints ``pid P`` once the child is
forked and ``exit P STATUS`` (os.waitpid's status) once it has reaped it.
"""

from __future__ import annotations

import os
import sys
import traceback


def say(line: str) -> None:
    os.write(1, (line + "\n").encode())  # one write(2): a line is never split


def child(stderr: str, argv: list[str]) -> None:
    fd = os.open(stderr, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 2)
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1)
    code = 1
    try:
        from hitl_triage.serve.cli import main

        code = main(argv)
    except BaseException:  # noqa: BLE001 - the test reads what the child wrote
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def main() -> None:
    import hitl_triage.engine.engine  # noqa: F401  (torch, numba, the kernels' modules)
    import hitl_triage.serve.cli  # noqa: F401
    import hitl_triage.serve.commands.run  # noqa: F401
    import hitl_triage.serve.offline  # noqa: F401
    import hitl_triage.serve.report  # noqa: F401

    say("ready")
    for line in sys.stdin:
        command, stderr, *argv = line.split("\t")
        if command != "run":
            continue
        argv[-1] = argv[-1].rstrip("\n")
        pid = os.fork()
        if pid == 0:
            child(stderr, argv)
        say(f"pid {pid}")
        _, status = os.waitpid(pid, 0)
        say(f"exit {pid} {status}")


if __name__ == "__main__":
    main()
