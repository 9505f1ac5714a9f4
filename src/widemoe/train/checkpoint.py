"""Training checkpoints: the `Checkpointer` interface the loop saves and resumes through, and its one
implementation today, `HFCheckpointer`: a crash-safe Hugging Face model directory plus the training state
(a sharded DCP implementation comes with multi-process training).

Layout of one checkpoint, `RUN/checkpoints/step-00000100/`:

    config.json, model*.safetensors, tokenizer*.json   the model, loadable by widemoe and transformers
    trainer_state.pt                                  optimizer, scheduler, data cursor, RNG states, step
    COMMITTED                                         written last; a directory without it is ignored

A checkpoint is written into `step-XXXXXXXX.tmp-<pid>/`, every file fsynced, the directory renamed to
its final name and fsynced, and only then is the `COMMITTED` marker written and fsynced. A process
killed at any moment therefore leaves either the previous checkpoint as the newest committed one or
the new one complete. Retention deletes old committed checkpoints but never the newest one, each one's
marker first, so that `COMMITTED` means complete at every moment, also during a deletion cut short.

The training state is loaded with `torch.load(weights_only=True)`: no pickled code ever runs.
The read side of this layout (`MARKER`, `committed_checkpoints`, `latest_checkpoint`) is in
`widemoe.hf.resolve`, which opens run directories as model specs without importing `train/`.
"""

from __future__ import annotations

import os
import pickle
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from widemoe.hf import load_into, save_pretrained
from widemoe.hf.resolve import MARKER, STEP_DIR_RE, committed_checkpoints, latest_checkpoint

STATE_FILE = "trainer_state.pt"
# What every trainer_state.pt holds (besides the optimizer's state under "optimizer").
STATE_KEYS = ("step", "tokens_seen", "scheduler", "data", "torch_rng", "python_rng")


class CheckpointDamaged(ValueError):
    """A committed checkpoint whose files are missing or unreadable; the message names the file and why."""


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    for p in sorted(path.rglob("*")):
        if p.is_file():
            _fsync_path(p)
    _fsync_path(path)


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step-{step:08d}"


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    write_model: Callable[[Path], None],
    state: dict[str, Any],
    keep_last: int = 2,
    before_commit: Callable[[Path], None] | None = None,
) -> Path:
    """Write one checkpoint atomically; `write_model(dir)` writes the HF model files into `dir`.

    `before_commit` is a test hook called after the rename and before the marker.
    """
    final = checkpoint_dir(Path(run_dir), step)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f"{final.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    write_model(tmp)
    torch.save(state, tmp / STATE_FILE)
    _fsync_tree(tmp)
    if final.exists():  # an uncommitted leftover of a crashed save, or a damaged one set aside on resume
        remove_checkpoint(final)
    os.replace(tmp, final)
    _fsync_path(final.parent)
    if before_commit is not None:
        before_commit(final)
    marker = final / MARKER
    with open(marker, "w") as f:
        f.write(f"{step}\n")
        f.flush()
        os.fsync(f.fileno())
    _fsync_path(final)
    _apply_retention(Path(run_dir), keep_last)
    return final


def remove_checkpoint(ckpt: Path) -> None:
    """Delete a checkpoint directory, its `COMMITTED` marker first (and durably): a kill during the
    deletion leaves an uncommitted directory, never a committed one that lacks files."""
    marker = ckpt / MARKER
    if marker.exists():
        marker.unlink()
        _fsync_path(ckpt)
    shutil.rmtree(ckpt, ignore_errors=True)


def _apply_retention(run_dir: Path, keep_last: int) -> None:
    committed = committed_checkpoints(run_dir)
    newest = committed[-1] if committed else None
    for old in committed[: max(0, len(committed) - max(1, keep_last))]:
        if old != newest:
            remove_checkpoint(old)
    # Leftover temporaries of crashed saves are garbage once a newer checkpoint is committed.
    root = run_dir / "checkpoints"
    for p in root.iterdir():
        if ".tmp-" in p.name or (
            STEP_DIR_RE.match(p.name)
            and not (p / MARKER).exists()
            and newest is not None
            and p.name < newest.name
        ):
            shutil.rmtree(p, ignore_errors=True)


def load_training_state(ckpt: Path) -> dict[str, Any]:
    """The `trainer_state.pt` of a committed checkpoint; `CheckpointDamaged` naming the file if it is
    missing, truncated or lacks a field."""
    path = Path(ckpt) / STATE_FILE
    if not (Path(ckpt) / MARKER).is_file():
        raise FileNotFoundError(f"{ckpt} is not a committed checkpoint (no {MARKER} marker)")
    if not path.is_file():
        raise CheckpointDamaged(f"{path}: missing (the checkpoint is marked {MARKER} but lacks it)")
    try:
        state = torch.load(path, weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointDamaged(f"{path}: unreadable, truncated or corrupt ({first})") from None
    missing = [k for k in STATE_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise CheckpointDamaged(f"{path}: lacks {', '.join(missing)}")
    return state


class Checkpointer(Protocol):
    """How a run saves and restores itself. `state` is the host-side training state (step, counters, data
    cursor, RNG states, scheduler: plain tensors, numbers and strings); the model and optimizer are passed
    as objects so that an implementation can save them sharded (each rank its own part)."""

    def save(
        self, run_dir: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
        state: dict[str, Any], *, tokenizer: Any = None, keep_last: int = 2,
    ) -> Path:
        """Write the checkpoint of `step` (complete, or not visible at all) and prune old ones; its path."""
        ...

    def latest(self, run_dir: Path) -> Path | None:
        """The newest complete checkpoint of the run, or None."""
        ...

    def checkpoints(self, run_dir: Path) -> list[Path]:
        """The run's complete (committed) checkpoints, oldest first."""
        ...

    def read_state(self, path: Path) -> dict[str, Any]:
        """The `state` saved with a checkpoint, without touching a model (`CheckpointDamaged`: unreadable)."""
        ...

    def load(self, path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """Restore the weights and optimizer state in place; return the `state` that was saved.
        `CheckpointDamaged` (naming the file) when a file of it is missing or unreadable."""
        ...


class HFCheckpointer:
    """Checkpoints as Hugging Face model directories (+ tokenizer) with `trainer_state.pt` beside them,
    written by one process (layout and crash safety: this module's docstring)."""

    def save(
        self, run_dir: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
        state: dict[str, Any], *, tokenizer: Any = None, keep_last: int = 2,
    ) -> Path:
        def write_model(d: Path) -> None:
            save_pretrained(model, d)
            if tokenizer is not None:
                tokenizer.save(d)  # tokenizer.json + tokenizer_config.json with the special tokens

        full = {**state, "optimizer": optimizer.state_dict()}
        return save_checkpoint(run_dir, step, write_model, full, keep_last=keep_last)

    def latest(self, run_dir: Path) -> Path | None:
        return latest_checkpoint(run_dir)

    def checkpoints(self, run_dir: Path) -> list[Path]:
        return committed_checkpoints(run_dir)

    def read_state(self, path: Path) -> dict[str, Any]:
        return load_training_state(path)

    def load(self, path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        state = load_training_state(path)  # first: a damaged state file must not cost a model load
        try:
            load_into(model, path, model.config)  # strict, straight into the live parameters
        except (ValueError, OSError) as e:  # a missing or truncated weight file (hf's LoadError family)
            raise CheckpointDamaged(str(e).splitlines()[0]) from None
        if "optimizer" not in state:
            raise CheckpointDamaged(f"{Path(path) / STATE_FILE}: lacks the optimizer state")
        optimizer.load_state_dict(state.pop("optimizer"))
        return state


__all__ = [
    "CheckpointDamaged",
    "Checkpointer",
    "HFCheckpointer",
    "STATE_FILE",
    "checkpoint_dir",
    "load_training_state",
    "remove_checkpoint",
    "save_checkpoint",
]
