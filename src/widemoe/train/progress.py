"""The progress of a training run: on a terminal a live rich bar (ETA, loss, MaxVio and tokens/s of the
last step); elsewhere (stdout redirected to a file or a pipe) a plain line every few seconds, so a log
shows the run advancing instead of nothing until the end:

    step 120/300  loss 4.812  MaxVio 0.21  8123 tok/s  ETA 0:03:05

The interval is `interval` seconds, default `$WIDEMOE_PROGRESS_INTERVAL` or 10 (0: every step). Tokens/s
and the ETA are averages since the previous line and since the start.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

ProgressFn = Callable[[int, dict[str, Any]], None]  # (step, train record) -> None

INTERVAL_ENV = "WIDEMOE_PROGRESS_INTERVAL"
DEFAULT_INTERVAL_S = 10.0


def progress_interval(env: dict[str, str] | None = None) -> float:
    """Seconds between plain progress lines: `$WIDEMOE_PROGRESS_INTERVAL`, else 10."""
    raw = (os.environ if env is None else env).get(INTERVAL_ENV)
    if raw is None or raw == "":
        return DEFAULT_INTERVAL_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 <= value < float("inf"):
        raise ValueError(f"{INTERVAL_ENV}={raw!r}: must be a number of seconds >= 0")
    return value


def format_eta(seconds: float) -> str:
    s = max(0, round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


class PlainProgress:
    """`update(step, rec)` writing one line to `stream` when `interval` seconds passed since the last."""

    def __init__(self, total: int, start: int, interval: float, stream: TextIO, clock: Callable[[], float]):
        self.total, self.start, self.interval, self.stream, self.clock = total, start, interval, stream, clock
        self.t0 = self.t_last = clock()
        self.tokens_last: int | None = None

    def __call__(self, step: int, rec: dict[str, Any]) -> None:
        now = self.clock()
        if now - self.t_last < self.interval:
            return
        tokens = int(rec.get("tokens", 0))
        if self.tokens_last is None:  # the first line: the tokens before it are those of these steps
            per_step = tokens / max(1, step)
            self.tokens_last = tokens - round(per_step * (step - self.start))
        elapsed = now - self.t_last
        speed = (tokens - self.tokens_last) / elapsed if elapsed > 0 else rec["tokens_per_s"]
        eta = (now - self.t0) / max(1, step - self.start) * (self.total - step)
        print(
            f"step {step}/{self.total}  loss {rec['loss']:.3f}  MaxVio {rec['max_vio_mean']:.2f}  "
            f"{speed:.0f} tok/s  ETA {format_eta(eta)}",
            file=self.stream,
            flush=True,
        )
        self.t_last, self.tokens_last = now, tokens


class TrainProgress:
    """A context manager giving `update(step, rec)`: a rich bar on a terminal, plain lines elsewhere, a
    no-op when disabled. `stream` (default stdout), `terminal` (default: whether `stream` is a tty),
    `interval` and `clock` are there for tests."""

    def __init__(
        self,
        enabled: bool,
        total: int,
        start: int,
        *,
        interval: float | None = None,
        stream: TextIO | None = None,
        clock: Callable[[], float] = time.monotonic,
        terminal: bool | None = None,
    ):
        self.enabled, self.total, self.start = enabled, total, start
        self.interval, self.stream, self.clock, self.terminal = interval, stream, clock, terminal
        self._p: Any = None

    def __enter__(self) -> ProgressFn:
        if not self.enabled:
            return lambda step, rec: None
        stream = self.stream if self.stream is not None else sys.stdout
        terminal = self.terminal if self.terminal is not None else stream.isatty()
        if not terminal:
            interval = self.interval if self.interval is not None else progress_interval()
            return PlainProgress(self.total, self.start, interval, stream, self.clock)
        return self._rich_bar()

    def _rich_bar(self) -> ProgressFn:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self._p = Progress(
            TextColumn("train"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[info]}"),
        )
        self._p.__enter__()
        task = self._p.add_task("train", total=self.total, completed=self.start, info="")

        def update(step: int, rec: dict[str, Any]) -> None:
            info = (
                f"loss {rec['loss']:.3f}  MaxVio {rec['max_vio_mean']:.2f}  {rec['tokens_per_s']:.0f} tok/s"
            )
            self._p.update(task, completed=step, info=info)

        return update

    def __exit__(self, *exc: object) -> bool:
        if self._p is not None:
            self._p.__exit__(*exc)
            self._p = None
        return False


__all__ = ["DEFAULT_INTERVAL_S", "INTERVAL_ENV", "PlainProgress", "ProgressFn", "TrainProgress",
           "format_eta", "progress_interval"]
