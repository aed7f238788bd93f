"""The `triage` command line: one module per subcommand under ``serve/commands``.

Each command module has ``register(subparsers)``, which adds its parser and sets ``handler`` to a
function ``(args) -> int`` (the exit code). Console output belongs here and in the command
modules, never in the engine or the kernels.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import sys
import threading

# Before torch, numba or FAISS start their OpenMP pools (see hitl_triage.kernels for why).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

COMMANDS = ("simulate", "fit", "run", "serve", "send", "queue", "feedback", "export", "gate", "report", "demo")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="triage",
        description="Human-in-the-loop triage: decide which predictions a person must review.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug detail to stderr")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"{__package__}.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"{__package__}.commands.{name}":
                raise
            continue  # a command not written yet
        module.register(subparsers)
    return parser


class Stopped(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived: raised in the main thread so every ``finally`` cleans up (partial
    files removed, queues closed) exactly as for Ctrl-C."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _stop(signum, frame) -> None:
    # One stop is enough: a second signal must not interrupt the clean-up the first one started.
    for sig in _STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    raise Stopped(signum)


_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns its exit code: 0 done, 2 refused (a path, option, input or
    configuration that is not what it must be: one line on stderr names it), 1 failed for another
    reason (an operating-system error, one line too), 128 + the signal's number when SIGINT (130)
    or SIGTERM (143) stopped it, after cleaning up. ``-v`` shows tracebacks instead."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if getattr(args, "handler", None) is None:
        parser.print_help()
        return 2
    for stream in (sys.stdout, sys.stderr):
        # A path may hold bytes that are not UTF-8 (Linux allows any): printing it must not fail
        # after the work is done.
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None and getattr(stream, "errors", "strict") == "strict":
            reconfigure(errors="backslashreplace")
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = {sig: signal.signal(sig, _stop) for sig in _STOP_SIGNALS} if in_main_thread else {}
    try:
        return int(args.handler(args) or 0)
    except (ValueError, TypeError, FileNotFoundError, RuntimeError) as exc:
        # Input, configuration and profile errors (BatchError, ConfigError, ProfileError,
        # UsageError, BackendUnavailable...) name the field, what was expected and what was found:
        # one line is clearer than a traceback. -v shows the traceback too.
        if args.verbose:
            raise
        _say(args, exc)
        return 2
    except OSError as exc:  # the machine, not the input: a full disk, an I/O error
        if args.verbose:
            raise
        _say(args, exc)
        return 1
    except KeyboardInterrupt as exc:
        signum = exc.signum if isinstance(exc, Stopped) else signal.SIGINT
        what = getattr(args, "stopped", "it did not finish")
        print(f"triage {args.command}: stopped by {signal.Signals(signum).name}; {what}", file=sys.stderr)
        return 128 + signum
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _say(args, exc: BaseException) -> None:
    text = " ".join(str(exc).split()) or type(exc).__name__  # one line, whatever the message holds
    print(f"triage {args.command}: {text}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
