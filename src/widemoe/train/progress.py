"""The live progress bar of a training run (rich): ETA, loss, MaxVio and tokens/s of the last step."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

ProgressFn = Callable[[int, dict[str, Any]], None]  # (step, train record) -> None


class TrainProgress:
    """A context manager giving `update(step, rec)`; a no-op when disabled."""

    def __init__(self, enabled: bool, total: int, start: int):
        self.enabled, self.total, self.start = enabled, total, start

    def __enter__(self) -> ProgressFn:
        if not self.enabled:
            return lambda step, rec: None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self._p = Progress(
            TextColumn("train"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[info]}"),
        )
        self._p.__enter__()
        self._task = self._p.add_task("train", total=self.total, completed=self.start, info="")

        def update(step: int, rec: dict[str, Any]) -> None:
            info = (
                f"loss {rec['loss']:.3f}  MaxVio {rec['max_vio_mean']:.2f}  {rec['tokens_per_s']:.0f} tok/s"
            )
            self._p.update(self._task, completed=step, info=info)

        return update

    def __exit__(self, *exc: object) -> bool:
        if self.enabled:
            self._p.__exit__(*exc)
        return False


__all__ = ["ProgressFn", "TrainProgress"]
