"""A reviewer process the kill test (tests/test_reliability_kills.py) SIGKILLs between claim and
verdict.

    python reliability_reviewer.py URL MAX_DELIVERIES TIER[,TIER...]

Imports the queue backends once, then for each ``claim TIER N LEASE REVIEWER`` line read from
stdin forks a child that opens the queue, claims up to N items of TIER for LEASE seconds as
REVIEWER, prints ``claimed ID,ID,...`` (one write) and then waits for its verdicts to be typed,
which never happens: the test kills it there. This process prints ``pid P`` once the child is
forked and ``exit P STATUS`` once it has reaped it.
"""

from __future__ import annotations

import os
import sys
import time
import traceback


def say(line: str) -> None:
    os.write(1, (line + "\n").encode())


def main() -> None:
    url, max_deliveries, tiers = sys.argv[1], int(sys.argv[2]), sys.argv[3].split(",")
    from hitl_triage.serve.queue import QueueOptions, open_queue

    if url.startswith("redis"):
        import hitl_triage.serve.queue.redis  # noqa: F401
    else:
        import hitl_triage.serve.queue.sqlite  # noqa: F401
    say("ready")
    for line in sys.stdin:
        words = line.split()
        if not words or words[0] != "claim":
            continue
        tier, n, lease, reviewer = words[1], int(words[2]), float(words[3]), words[4]
        pid = os.fork()
        if pid == 0:
            try:
                queue = open_queue(url, QueueOptions(tiers=tiers, max_deliveries=max_deliveries))
                items = queue.claim(tier, reviewer, n=n, lease=lease)
                say("claimed " + ",".join(items.column("id").to_pylist()))
                time.sleep(3600)  # "reading the item": the test kills the reviewer here
            except BaseException:  # noqa: BLE001 - the test reads stderr
                traceback.print_exc()
            os._exit(1)
        say(f"pid {pid}")
        _, status = os.waitpid(pid, 0)
        say(f"exit {pid} {status}")


if __name__ == "__main__":
    main()
