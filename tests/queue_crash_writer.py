"""The writer of the queue crash test (tests/test_queue_crash.py), as a process the test kills.

    python queue_crash_writer.py URL ROWS

Importing the package takes about two seconds (torch), too long to pay at each of the test's
fifty-odd kills, so this process imports once and then forks one writer per command read from
stdin: ``start K`` forks a child that enqueues decision batch K, K+1, ... (``batch(K, ROWS)``:
ids ``p-{K*ROWS}``..., seeded by K so the test can make the same batch again) in a loop and
prints ``done K`` to stdout, flushed, right after each ``enqueue`` returns, until it is
SIGKILLed. This process prints ``pid P`` when the child is forked and ``exit P STATUS`` once it
has reaped it, so every line the child printed comes before that.
"""

from __future__ import annotations

import os
import sys
import traceback

import numpy as np

from queue_fixtures import decision_batch

ESCALATE_SHARE = 0.3


def batch(number: int, rows: int):
    """(decisions, predictions) of batch ``number``: the same on every call."""
    return decision_batch(np.random.default_rng(number), rows, start=number * rows, escalate_share=ESCALATE_SHARE)


def say(line: str) -> None:
    """One line to stdout in one write(2), so that a kill never leaves half a line (print may
    write the text and its newline apart, and both processes share the pipe)."""
    os.write(1, (line + "\n").encode())


def write_forever(url: str, rows: int, first: int) -> None:
    from hitl_triage.serve.queue import open_queue

    with open_queue(url) as queue:
        number = first
        while True:
            queue.enqueue(*batch(number, rows))
            say(f"done {number}")
            number += 1


def main() -> None:
    url, rows = sys.argv[1], int(sys.argv[2])
    # The backend imported once, before any fork.
    if url.startswith("redis"):
        import hitl_triage.serve.queue.redis  # noqa: F401
    else:
        import hitl_triage.serve.queue.sqlite  # noqa: F401

    from hitl_triage.serve.queue import review_items

    review_items(*batch(0, rows))  # the first batch pays for lazy set-up (0.4 s): pay it here, once
    say("ready")
    for line in sys.stdin:
        command, _, argument = line.partition(" ")
        if command != "start":
            continue
        pid = os.fork()
        if pid == 0:
            try:
                write_forever(url, rows, int(argument))
            except BaseException:  # noqa: BLE001 - the test reports what the child wrote
                traceback.print_exc()
                sys.stderr.flush()
            os._exit(1)
        say(f"pid {pid}")
        _, status = os.waitpid(pid, 0)
        say(f"exit {pid} {status}")


if __name__ == "__main__":
    main()
