"""`widemoe eval MODEL --tasks ...`: score a model with lm-evaluation-harness on widemoe's held-out tasks.

MODEL is anything `widemoe serve` takes: a training run directory (its newest committed checkpoint), a
Hugging Face model directory, a config file or a preset. Without --url the model is served in this process
(`widemoe.serve`, on a free loopback port) for the evaluation; with --url an already running server is
evaluated (MODEL then only names where the results go). lm-eval's `local-completions` model talks to it
offline; the tasks are widemoe's own YAML + jsonl, built from the corpus's held-out split:

    widemoe_austen_cloze       choose a held-out Austen sentence's true ending (acc, acc_norm)
    widemoe_austen_word_order  choose its ending's true word order among shuffles (acc, acc_norm)
    widemoe_code_next_line     choose the next line of held-out stdlib code (acc, acc_norm)
    widemoe_arithmetic         generate the worked answer of an arithmetic problem (exact_match)

Results: lm-eval's results JSON and per-sample logs (loglikelihoods, generations) in --output, by default
RUN/eval/<checkpoint>/ for a run directory (`widemoe report RUN` shows them) and ./eval_results/<name>/
otherwise. --init evaluates the same model at initialisation (the run's config and seed: the weights its
training started from), into RUN/eval/init/, so the table shows what training changed.
"""

from __future__ import annotations

import argparse
from pathlib import Path

DTYPES = ("fp32", "bf16")


def tasks_flag(text: str) -> list[str]:
    """--tasks: names checked against the shipped tasks; an unknown one is a usage error listing them."""
    from widemoe.evals.tasks import UnknownTaskError, parse_tasks

    try:
        return parse_tasks(text)
    except UnknownTaskError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("--tasks: ")) from None


def positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "eval",
        help="score a model with lm-evaluation-harness on widemoe's held-out tasks",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", metavar="MODEL", help="run directory, model directory, config file or preset")
    p.add_argument("--tasks", type=tasks_flag, default="all",
                   help="comma-separated task names, or 'all' (default)")
    p.add_argument("--url", default=None,
                   help="evaluate the server at this base URL (e.g. http://127.0.0.1:8000) instead of "
                   "serving MODEL here")
    p.add_argument("--limit", type=positive, default=None, help="at most this many examples per task")
    p.add_argument("--dtype", choices=DTYPES, default="fp32", help="weights' dtype when serving here")
    p.add_argument("--output", type=Path, default=None,
                   help="results directory (default RUN/eval/<checkpoint>/ for a run directory, else "
                   "./eval_results/<name>/); earlier lm-eval results in it are replaced")
    p.add_argument("--num-concurrent", type=positive, default=8,
                   help="requests lm-eval keeps in flight (default 8; the server batches them)")
    p.add_argument("--init", action="store_true",
                   help="evaluate the model at initialisation (a run's config and seed) instead")
    p.add_argument("--seed", type=int, default=0,
                   help="--init seed for a model directory, config or preset (a run uses its own)")
    p.add_argument("--verbose", action="store_true", help="show lm-eval's log")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from widemoe.evals.runner import EvalSpec, evaluate
    from widemoe.report.evals import load_eval_scores, scores_text, task_scores

    tasks = args.tasks if isinstance(args.tasks, list) else tasks_flag(args.tasks)  # the default is a str
    spec = EvalSpec(model=args.model, tasks=tasks, url=args.url, limit=args.limit, dtype=args.dtype,
                    output=args.output, num_concurrent=args.num_concurrent, init=args.init, seed=args.seed,
                    verbose=args.verbose)
    outcome = evaluate(spec)
    print(f"wrote {outcome.results_file}")
    scores = {outcome.label: task_scores(outcome.results)}
    run_dir = Path(args.model)
    if outcome.output.resolve().parent == (run_dir / "eval").resolve():  # a run's results: side by side
        scores = load_eval_scores(run_dir)
    print(scores_text(scores))
    return 0
