"""`widemoe <command>`: the command-line entry point.

Each subcommand lives in `widemoe.commands.<name>` and registers itself with `add_parser(subparsers)`;
imports are deferred to the chosen command where they are heavy (torch, transformers).

Library code raises exceptions, never `SystemExit`. The library's error types (`ConfigError`,
`SpecError`, `TokenizerError`, `LoadError`, `CostError`, `ReportError`, ...) are `ValueError`s;
`main` turns those and a missing file into `error: <message>` on stderr and exit status 1. Any other
exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from widemoe import __version__

# What a user can cause and fix (a wrong spec, a missing file): a message, not a traceback.
USER_ERRORS = (ValueError, FileNotFoundError)
# Subcommands in the order `widemoe --help` lists them.
COMMANDS = ("train", "generate", "report", "inspect", "convert", "cost")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="widemoe",
        description="Build, train, convert, inspect, cost and serve fine-grained sparse MoE language models.",
    )
    parser.add_argument("--version", action="version", version=f"widemoe {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"widemoe.commands.{name}").add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except USER_ERRORS as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    sys.exit(main())
