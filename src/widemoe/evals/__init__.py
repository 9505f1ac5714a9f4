"""`widemoe eval`: lm-evaluation-harness on widemoe's own held-out tasks, against `widemoe serve`.

`tasks` knows the shipped tasks (YAML + jsonl in `data/`, built by scripts/make_eval_tasks.py from the
corpus's held-out split) and writes them for lm-eval; `runner` serves the model, runs lm-eval's
`local-completions` model offline and writes its results JSON. lm-eval is the optional `eval` extra.
"""

from widemoe.evals.tasks import UnknownTaskError, known_tasks, parse_tasks

__all__ = ["UnknownTaskError", "known_tasks", "parse_tasks"]
