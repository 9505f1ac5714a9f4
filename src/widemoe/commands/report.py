"""`widemoe report RUN_DIR`: rebuild the routing report (report.html + PNG figures) of a training run."""

from __future__ import annotations

import argparse
import sys

from widemoe.commands.errors import report_error


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("report", help="build the routing report (HTML + PNG) of a training run",
                              description=__doc__)
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory written by `widemoe train`")
    p.add_argument("--out", default=None, help="where to write report.html and the figures "
                   "(default: RUN_DIR/report)")
    p.add_argument("--embed", action="store_true",
                   help="inline the figures as base64: one self-contained file")
    p.add_argument("--quiet", action="store_true", help="print only the paths, not the summary")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from widemoe.report import ReportError, build_report
    from widemoe.report.html import summary_text

    try:
        paths = build_report(args.run_dir, out_dir=args.out, embed=args.embed)
        text = None if args.quiet else summary_text(args.run_dir)
    except ReportError as e:
        return report_error(e)
    for w in paths.warnings:
        print(f"warning: {w}", file=sys.stderr)
    if text:
        print(text)
        print()
    print(f"wrote {paths.html}")
    for path in paths.figures.values():
        print(f"wrote {path}")
    return 0
