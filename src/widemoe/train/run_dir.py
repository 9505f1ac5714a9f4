"""The guard rails of a run directory: one training at a time (`RunLock`) and one run per directory
(`prepare_run_dir`).

The lock is `RUN/.lock`, created with `O_CREAT | O_EXCL` (atomic: of two processes only one creates it)
and holding the owner's pid, host and start time; it is removed when training ends, also on an
exception. A lock whose process is gone (same host, pid no longer alive) was left by a crash and is
taken over with a notice; a lock of a live process, or of another host (whose processes cannot be
checked from here), refuses the second training with a message naming the owner.

A directory that already holds a run (`metrics.jsonl` or anything under `checkpoints/`) is refused for
a new run: `--resume` continues it, `--fresh` deletes that run's files (`RUN_FILES`, nothing else) and
starts over. `--resume` with no committed checkpoint is an error, never a silent new run.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from widemoe.hf.resolve import STEP_DIR_RE, latest_checkpoint

LOCK_FILE = ".lock"
# What a run writes into its directory; --fresh deletes exactly these.
RUN_FILES = ("metrics.jsonl", "checkpoints", "report", "summary.json", "eval")
# A lock file that cannot be parsed this long after it was written is a crash's leftover.
UNREADABLE_LOCK_GRACE_S = 10.0

Notify = Callable[[str], None]


class RunDirError(ValueError):
    """A run directory that cannot be used as asked (holds another run, nothing to resume, ...)."""


class RunLocked(RunDirError):
    """Another training holds the run directory's lock."""


class ExclusiveFlags(RunDirError):
    """Two flags that cannot be given together: a usage error (exit status 2, as argparse's own)."""

    exit_status = 2


def notice(message: str) -> None:
    """A one-line statement of what training decided (stderr, so stdout stays the result)."""
    print(message, file=sys.stderr, flush=True)


# --- the lock --------------------------------------------------------------------------------------


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def _describe(owner: dict[str, Any]) -> str:
    since = owner.get("since")
    when = "?"
    if isinstance(since, (int, float)):
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since))
    return f"process {owner.get('pid')} on {owner.get('host')} (since {when})"


class RunLock:
    """`with RunLock(run_dir):` holds `run_dir/.lock` for the block (see the module docstring)."""

    def __init__(self, run_dir: str | Path, notify: Notify = notice):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self.notify = notify
        self.held = False

    def acquire(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for _ in range(3):  # a stale lock removed, then another try; a third failure is a live owner
            if self._create():
                self.held = True
                return
            owner = self._owner()
            self._refuse_live(owner)
            self._take_over(owner)
        raise RunLocked(f"{self.path}: could not take the lock (another process keeps taking it)")

    def check(self) -> None:
        """Refuse now if a live training holds the lock; changes nothing (`acquire` takes it later)."""
        if self.path.exists():
            self._refuse_live(self._owner())

    def _refuse_live(self, owner: dict[str, Any] | None) -> None:
        if owner is not None and not self._is_stale(owner):
            raise RunLocked(
                f"{self.run_dir} is in use by another training: {_describe(owner)}; wait for it to "
                f"end, or, if that process is not a widemoe training, delete {self.path}"
            )

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time(), "argv": sys.argv[:8]}
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(me) + "\n")
            f.flush()
            os.fsync(f.fileno())
        return True

    def _owner(self) -> dict[str, Any] | None:
        """The lock's contents; None when it vanished or cannot be parsed yet."""
        try:
            owner = json.loads(self.path.read_text())
            return owner if isinstance(owner, dict) and isinstance(owner.get("pid"), int) else None
        except (OSError, ValueError):
            return None

    def _is_stale(self, owner: dict[str, Any]) -> bool:
        if owner.get("host") != socket.gethostname():
            return False  # another machine's process: it cannot be checked from here
        return not _pid_alive(int(owner["pid"]))

    def _take_over(self, owner: dict[str, Any] | None) -> None:
        if owner is None:  # unparseable: a process between creating and writing it, or a crash there
            try:
                age = time.time() - self.path.stat().st_mtime
            except FileNotFoundError:
                return
            if age < UNREADABLE_LOCK_GRACE_S:
                raise RunLocked(f"{self.path} is being taken by another process; try again in a moment")
            self.notify(f"taking over {self.path}: unreadable and {age:.0f} s old (a crash's leftover)")
        else:
            self.notify(
                f"taking over {self.path} from {_describe(owner)}: that process is no longer running "
                "(it crashed or was killed)"
            )
        if owner is None or self._owner() == owner:  # not meanwhile replaced by a live process's lock
            self.path.unlink(missing_ok=True)

    def release(self) -> None:
        if self.held:
            self.held = False
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


# --- one run per directory -------------------------------------------------------------------------


def held_run(run_dir: str | Path) -> str | None:
    """A description of the run `run_dir` holds ("latest checkpoint step 6"), or None when it holds none."""
    run_dir = Path(run_dir)
    latest = latest_checkpoint(run_dir)
    if latest is not None:
        return f"latest checkpoint step {int(STEP_DIR_RE.match(latest.name).group(1))}"
    ckpts = run_dir / "checkpoints"
    if ckpts.is_dir() and any(ckpts.iterdir()):
        return "no committed checkpoint, only unfinished saves"
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file() and metrics.stat().st_size > 0:
        return f"no checkpoint yet, {metrics.name} from step {_last_metrics_step(metrics)}"
    return None


def _last_metrics_step(path: Path) -> int:
    step = 0
    for line in path.read_text(errors="replace").splitlines():
        try:
            step = max(step, int(json.loads(line).get("step", 0)))
        except (ValueError, TypeError, AttributeError):
            continue
    return step


def prepare_run_dir(run_dir: str | Path, *, resume: bool, fresh: bool, notify: Notify = notice) -> None:
    """Check that `run_dir` may be used as asked (call it holding the lock); with `fresh`, delete the
    old run's files. Raises `RunDirError` naming the directory and the way out."""
    run_dir = Path(run_dir)
    check_run_dir(run_dir, resume=resume, fresh=fresh)
    held = held_run(run_dir)
    if fresh and held is not None:
        for name in RUN_FILES:
            p = run_dir / name
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
        notify(f"--fresh: deleted the previous run in {run_dir} ({held}); starting a new run")


def preflight(run_dir: str | Path, *, resume: bool, fresh: bool) -> None:
    """The refusals a training can make before it prepares data or builds a model (changes nothing):
    another live training's lock, a used directory, nothing to resume."""
    RunLock(run_dir).check()
    check_run_dir(run_dir, resume=resume, fresh=fresh)


def check_run_dir(run_dir: str | Path, *, resume: bool, fresh: bool) -> None:
    """The refusals of `prepare_run_dir` without changing anything (also usable before the lock, to
    refuse early): a used directory without --resume/--fresh, --resume with nothing to resume."""
    run_dir = Path(run_dir)
    if fresh and resume:
        raise ExclusiveFlags("--fresh (start over) and --resume (continue) exclude each other; give one")
    held = held_run(run_dir)
    if resume and latest_checkpoint(run_dir) is None:
        what = f"it holds {held}" if held else "it holds no run"
        raise RunDirError(
            f"--resume: nothing to resume in {run_dir} ({what}); drop --resume to start a new run"
            + (", with --fresh to delete the old files" if held else "")
        )
    if held is not None and not resume and not fresh:
        raise RunDirError(
            f"{run_dir} already holds a run ({held}); continue it with --resume, or start over with "
            "--fresh (deletes its checkpoints and metrics), or choose another --run-dir"
        )


__all__ = [
    "LOCK_FILE",
    "RUN_FILES",
    "RunDirError",
    "RunLock",
    "RunLocked",
    "check_run_dir",
    "held_run",
    "notice",
    "preflight",
    "prepare_run_dir",
]
