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
import sys

# Before torch, numba or FAISS start their OpenMP pools (see hitl_triage.kernels for why).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

COMMANDS = ("simulate", "fit", "run", "queue", "demo")


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


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if getattr(args, "handler", None) is None:
        parser.print_help()
        return 2
    try:
        return int(args.handler(args) or 0)
    except (ValueError, TypeError, FileNotFoundError, RuntimeError) as exc:
        # Input, configuration and profile errors (BatchError, ConfigError, ProfileError,
        # BackendUnavailable...) name the field, what was expected and what was found: one line
        # is clearer than a traceback. -v shows the traceback too.
        if args.verbose:
            raise
        print(f"triage {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
