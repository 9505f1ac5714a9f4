"""`widemoe experiment`: seeded grids of training runs judged with statistics, and evaluation-only probes.

    widemoe experiment SUITE [--quick] [--seeds N] [--out DIR]   train every run of a suite
    widemoe experiment report DIR                                noise, intervals, verdicts, figures, page
    widemoe experiment probe MODEL                               shared-expert knockout, top-expert masking

SUITE is a shipped suite's name (seed-claims) or a suite file (TOML; the layout is in
widemoe/experiment/suite.py). Runs are interleaved seed by seed, so a change in machine load hits every
arm alike; an interrupted suite continues where it stopped when run again with the same --out. --quick
trains the suite's [quick] version: a smoke test, not evidence. The report writes DIR/report.md,
DIR/summary.json and DIR/figures/*.png.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from widemoe.commands.eval import positive  # light: argparse and pathlib only at import


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "experiment", help="run a suite of seeded trainings and judge its claims; probes of a checkpoint",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("target", metavar="SUITE|report|probe",
                   help="a suite (shipped name or TOML file) to run, 'report' or 'probe'")
    p.add_argument("path", nargs="?", metavar="DIR|MODEL",
                   help="report: the suite's output directory; probe: the run directory or model")
    p.add_argument("--quick", action="store_true", help="the suite's [quick] version (a smoke test)")
    p.add_argument("--seeds", type=positive, default=None,
                   help="seeds of the fully seeded arms (others are capped at it; default: the suite's)")
    p.add_argument("--out", default=None,
                   help="output directory (default: experiments/<suite>, or experiments/<suite>-quick)")
    p.add_argument("--jobs", type=positive, default=1,
                   help="runs trained at the same time, each in its own process (default 1)")
    p.add_argument("--threads", type=positive, default=None,
                   help="torch threads per run (default: all cores with --jobs 1, else 1)")
    p.add_argument("--keep-checkpoints", action="store_true",
                   help="keep every run's checkpoints (default: deleted once the run is recorded)")
    p.add_argument("--ratios", default="0.05,0.1,0.2",
                   help="probe: fractions of the routed experts masked per token (default %(default)s)")
    p.add_argument("--batches", type=positive, default=None,
                   help="probe: held-out batches per domain (default: all)")
    p.set_defaults(func=run, experiment_parser=p)  # usage errors below: argparse's message and status 2


def run(args: argparse.Namespace) -> int:
    if args.target == "report":
        return _report(args)
    if args.target == "probe":
        return _probe(args)
    if args.path is not None:
        args.experiment_parser.error(f"unexpected argument {args.path!r} after the suite "
                                     "(did you mean 'widemoe experiment report DIR'?)")
    return _run_suite(args)


def _run_suite(args: argparse.Namespace) -> int:
    from widemoe.experiment.runner import SMOKE_LABEL, run_suite
    from widemoe.experiment.suite import load_suite, shipped_suite
    from widemoe.runtime import configure_cpu_runtime

    path = Path(args.target) if args.target.endswith(".toml") or Path(args.target).is_file() else None
    suite = load_suite(path if path is not None else shipped_suite(args.target))
    if args.quick:
        suite = suite.quick()
    out = Path(args.out or f"experiments/{suite.name}{'-quick' if args.quick else ''}")
    threads = args.threads or (1 if args.jobs > 1 else os.cpu_count() or 1)
    configure_cpu_runtime(threads)
    run_suite(suite, out, seeds=args.seeds, jobs=args.jobs, threads=threads,
              keep_checkpoints=args.keep_checkpoints)
    label = f" ({SMOKE_LABEL})" if args.quick else ""
    print(f"suite {suite.name}{label}: every run recorded in {out}; next: widemoe experiment report {out}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from widemoe.experiment.report import write_report

    if args.path is None:
        args.experiment_parser.error("report needs the suite's output directory: "
                                     "widemoe experiment report DIR")
    page = write_report(Path(args.path))
    print(f"wrote {page}")
    return 0


def _probe(args: argparse.Namespace) -> int:
    from widemoe.experiment.probes import parse_ratios, run_probes

    if args.path is None:
        args.experiment_parser.error("probe needs a model: widemoe experiment probe MODEL")
    out = run_probes(args.path, parse_ratios(args.ratios), batches=args.batches)
    print(out)
    return 0
