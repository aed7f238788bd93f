"""Subcommands of `triage`, one module each with ``register(subparsers)``."""
