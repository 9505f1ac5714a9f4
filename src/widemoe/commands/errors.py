"""How a command reports a failure: one `error: ...` line on stderr, and the exit statuses of `widemoe`.

    0    success
    1    a failure: a file, directory, checkpoint or config that cannot be used, a model that does
         not fit; also `inspect` on a directory that would not load
    2    a usage error: argparse's own (a missing argument, an unknown flag, a value of the wrong
         type or out of its range), a flag value the command checks itself (`CostError`), a MODEL
         that is neither a preset nor a path (`UnknownPresetError`, argparse's "invalid choice")
    3    training stopped on a non-finite loss (the run directory stays resumable)
    130  interrupted (Ctrl-C)

An exception class says it is a usage error with a class attribute `exit_status = 2`; every other
user error is a failure. `widemoe.cli.main` applies this to whatever a command raises; commands that
catch their own errors use `report_error`, so that both read the same.
"""

from __future__ import annotations

import sys
from pathlib import Path

from safetensors import SafetensorError

EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_STOPPED = 3
EXIT_INTERRUPTED = 130

# What a user can cause and fix: a value they typed, a file they pointed at (missing, unreadable,
# not JSON, not UTF-8, a damaged safetensors file). The library's own errors (`ConfigError`,
# `SpecError`, `LoadError`, `TokenizerError`, `CostError`, `ReportError`, ...) are `ValueError`s.
# Anything else (`RuntimeError`, `TypeError`, ...) is a bug and keeps its traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError, SafetensorError)


def one_line(e: BaseException) -> str:
    """The message of `e` on one line; an `OSError` as 'permission denied: PATH'."""
    if isinstance(e, FileExistsError) and e.filename is not None and Path(e.filename).is_file():
        # mkdir on a path that is a file (a run or output directory given as a file): say what it is
        text = f"{e.filename} is a file, not a directory"
    elif isinstance(e, OSError) and e.strerror and e.filename is not None:
        text = f"{e.strerror[:1].lower()}{e.strerror[1:]}: {e.filename}"
        if e.filename2 is not None:
            text += f" -> {e.filename2}"
    else:
        text = str(e) or type(e).__name__
    return " ".join(part.strip() for part in text.splitlines() if part.strip())


def exit_status(e: BaseException) -> int:
    """2 for an error class marked as a usage error (`exit_status = 2`), else 1."""
    status = getattr(e, "exit_status", EXIT_FAILURE)
    return status if isinstance(status, int) else EXIT_FAILURE


def report_error(e: BaseException) -> int:
    """Print `error: <one line>` on stderr; the exit status for it."""
    print(f"error: {one_line(e)}", file=sys.stderr)
    return exit_status(e)


__all__ = [
    "EXIT_FAILURE",
    "EXIT_INTERRUPTED",
    "EXIT_STOPPED",
    "EXIT_USAGE",
    "USER_ERRORS",
    "exit_status",
    "one_line",
    "report_error",
]
