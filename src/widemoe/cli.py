"""`widemoe <command>`: the command-line entry point.

Each subcommand lives in `widemoe.commands.<name>` and registers itself with `add_parser(subparsers)`;
imports are deferred to the chosen command where they are heavy (torch, transformers).

Library code raises exceptions, never `SystemExit`. The library's error types (`ConfigError`,
`SpecError`, `TokenizerError`, `LoadError`, `CostError`, `ReportError`, ...) are `ValueError`s;
`main` turns those, an `OSError` (a missing, unreadable or mistyped path) and a damaged safetensors
file into one line `error: <message>` on stderr (`USER_ERRORS`) and exit status 1, or 2 for a usage
error (argparse's own, and error classes marked `exit_status = 2`); Ctrl-C exits 130 (the statuses:
`widemoe.commands.errors`). Any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from widemoe import __version__
from widemoe.commands.errors import EXIT_INTERRUPTED, EXIT_USAGE, USER_ERRORS, exit_status, one_line

# Subcommands in the order `widemoe --help` lists them.
COMMANDS = (
    "train", "generate", "report", "inspect", "convert", "export", "cost", "serve", "eval", "experiment",
)


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
        return EXIT_USAGE
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except USER_ERRORS as e:
        message = one_line(e)
        print(f"error: {message}", file=sys.stderr)
        raise ErrorExit(message, exit_status(e)) from None


class ErrorExit(SystemExit):
    """Raised once `error: <message>` is on stderr: exits with `code` (1 or 2); `str()` is the
    message, which a caller of `main` in-process can match."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


if __name__ == "__main__":
    sys.exit(main())
