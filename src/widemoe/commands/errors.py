"""How a command reports a failure: one `error: ...` line on stderr, and the exit statuses of `widemoe`.

    0    success
    1    a check ran and said no (`inspect` on a directory that would not load)
    2    an error: a usage error found by argparse, or any `error: ...` message (a bad value, a
         missing or unreadable file, a damaged checkpoint, a model that does not fit)
    3    training stopped on a non-finite loss (the run directory stays resumable)
    130  interrupted (Ctrl-C)

As grep, diff and cmp do: 1 is an answer, 2 is trouble. `widemoe.cli.main` applies this to whatever a
command raises; commands that catch their own errors use `report_error` so that both read the same.
"""

from __future__ import annotations

import sys

from safetensors import SafetensorError

EXIT_CHECK_FAILED = 1
EXIT_ERROR = 2
EXIT_STOPPED = 3
EXIT_INTERRUPTED = 130

# What a user can cause and fix: a value they typed, a file they pointed at (missing, unreadable,
# not JSON, not UTF-8, a damaged safetensors file). The library's own errors (`ConfigError`,
# `SpecError`, `LoadError`, `TokenizerError`, `CostError`, `ReportError`, ...) are `ValueError`s.
# Anything else (`RuntimeError`, `TypeError`, ...) is a bug and keeps its traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError, SafetensorError)


def one_line(e: BaseException) -> str:
    """The message of `e` on one line; an `OSError` as 'permission denied: PATH'."""
    if isinstance(e, OSError) and e.strerror and e.filename is not None:
        text = f"{e.strerror[:1].lower()}{e.strerror[1:]}: {e.filename}"
        if e.filename2 is not None:
            text += f" -> {e.filename2}"
    else:
        text = str(e) or type(e).__name__
    return " ".join(part.strip() for part in text.splitlines() if part.strip())


def report_error(e: BaseException) -> int:
    """Print `error: <one line>` on stderr; the exit status for it."""
    print(f"error: {one_line(e)}", file=sys.stderr)
    return EXIT_ERROR


__all__ = [
    "EXIT_CHECK_FAILED",
    "EXIT_ERROR",
    "EXIT_INTERRUPTED",
    "EXIT_STOPPED",
    "USER_ERRORS",
    "one_line",
    "report_error",
]
