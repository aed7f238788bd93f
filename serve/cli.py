"""The `triage` command line (subcommands are added as they land)."""

import argparse


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="triage", description="Human-in-the-loop triage engine")
    parser.add_subparsers(dest="command")
    parser.parse_args(argv)
    parser.print_help()
    return 0
