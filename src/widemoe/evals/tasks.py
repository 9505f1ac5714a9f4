"""The lm-eval tasks widemoe ships: YAML + jsonl in `widemoe/evals/data/`, built from the corpus's held-out
split by scripts/make_eval_tasks.py (every example was kept out of training; each YAML says how).

lm-eval resolves a YAML's `data_files` against the working directory, so the shipped YAML names its jsonl
by file name only and `write_task_dir` writes copies whose `data_files` hold absolute paths, for
lm-eval's `TaskManager(include_path=...)`. Nothing here imports lm-eval.
"""

from __future__ import annotations

import json
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent / "data"
ALL = "all"  # --tasks all: every shipped task


class UnknownTaskError(ValueError):
    """A --tasks name widemoe does not ship: a usage error (exit status 2, as argparse's own)."""

    exit_status = 2


def known_tasks() -> tuple[str, ...]:
    """The shipped task names, sorted (one YAML per task, named after it)."""
    return tuple(sorted(p.stem for p in DATA_DIR.glob("*.yaml")))


def parse_tasks(text: str) -> list[str]:
    """`--tasks a,b` (or `all`) -> task names in the order given, duplicates dropped; unknown ones raise
    `UnknownTaskError` listing the known ones."""
    known = known_tasks()
    names = [t.strip() for t in text.split(",") if t.strip()]
    if names == [ALL]:
        return list(known)
    unknown = [t for t in names if t not in known]
    if not names or unknown:
        what = f"unknown task(s) {', '.join(map(repr, unknown))}" if unknown else "no task named"
        raise UnknownTaskError(f"--tasks: {what}; known tasks: {', '.join(known)} (or {ALL})")
    return list(dict.fromkeys(names))


def task_yaml(name: str) -> str:
    """The shipped YAML of task `name` with its jsonl's `data_files` entry made absolute."""
    path = DATA_DIR / f"{name}.yaml"
    text = path.read_text(encoding="utf-8")
    entry = f"test: {name}.jsonl"
    if text.count(entry) != 1:
        raise ValueError(f"{path}: expected exactly one line '{entry}' under dataset_kwargs.data_files")
    data = DATA_DIR / f"{name}.jsonl"
    if not data.is_file():
        raise FileNotFoundError(f"{data}: the task's data is missing (scripts/make_eval_tasks.py writes it)")
    return text.replace(entry, f"test: {json.dumps(str(data))}")  # a JSON string is a YAML string


def write_task_dir(dest: str | Path, names: list[str]) -> Path:
    """Write the YAML of `names`, with absolute data paths, into `dest` (an lm-eval include path)."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    for name in names:
        (dest / f"{name}.yaml").write_text(task_yaml(name), encoding="utf-8")
    return dest


__all__ = ["ALL", "DATA_DIR", "UnknownTaskError", "known_tasks", "parse_tasks", "task_yaml", "write_task_dir"]
