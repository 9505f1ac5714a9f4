"""Routing report of a training run: statistics (`analysis`), figures (`plots`), report.html (`html`)."""

from widemoe.report.analysis import (
    LayerRouting,
    ReportError,
    RunData,
    RunSummary,
    analyse_routing,
    load_run,
    mutual_information_bits,
    summarise,
    top_n_share,
)
from widemoe.report.html import ReportPaths, build_report, summary_text

__all__ = [
    "LayerRouting", "ReportError", "ReportPaths", "RunData", "RunSummary", "analyse_routing", "build_report",
    "load_run", "mutual_information_bits", "summarise", "summary_text", "top_n_share",
]
