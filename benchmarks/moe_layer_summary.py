"""The README's MoE-layer table from several runs of benchmarks/moe_layer.py: per setting the median over
the runs with the range [min-max] beside it, and the date and commit of each run.

One run's ratios move by 10-30% on this shared 2-core machine (another process on a core slows one
implementation more than the other, although the round-robin timing measures them at the same moment),
so a single run is not a result: run the benchmark at least three times
(`python benchmarks/moe_layer.py --out benchmarks/results/moe_layer_runs/runN.json`) and summarise.

Usage: python benchmarks/moe_layer_summary.py [RUN.json ...]   (default: benchmarks/results/moe_layer_runs/*)
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

RUNS = Path(__file__).resolve().parent / "results" / "moe_layer_runs"


def cell(values: list[float], fmt: str) -> str:
    med = statistics.median(values)
    return f"{fmt.format(med)} [{fmt.format(min(values))}–{fmt.format(max(values))}]"


def main(argv: list[str]) -> int:
    paths = [Path(a) for a in argv] or sorted(RUNS.glob("*.json"))
    if len(paths) < 3:
        print(f"warning: {len(paths)} run(s); publish medians over at least 3", file=sys.stderr)
    runs = [json.loads(p.read_text()) for p in paths]
    for p, r in zip(paths, runs, strict=True):
        print(f"<!-- {p.name}: {r.get('date', '?')}, commit {r.get('commit', '?')}, {r['seconds']:.0f} s -->")
    print("| config | T | dtype | mode | widemoe tok/s | / dense | / transformers | reference loop tok/s |")
    print("|---|---|---|---|---|---|---|---|")
    for i, first in enumerate(runs[0]["results"]):
        rows = [r["results"][i] for r in runs]
        assert all((x["config"], x["T"], x["dtype"], x["mode"]) ==
                   (first["config"], first["T"], first["dtype"], first["mode"]) for x in rows)
        leading = (first["T"], first["dtype"], first["mode"]) == (2048, "float32", "fwd")
        name = first["config"] if leading else first["config"][:1]
        dtype = {"float32": "fp32", "bfloat16": "bf16"}[first["dtype"]]
        mode = "fwd+bwd" if first["mode"] == "fwdbwd" else "fwd"
        tps = [x["tokens_per_s"]["widemoe"] / 1e3 for x in rows]
        ref = [x["tokens_per_s"]["reference"] / 1e3 for x in rows]
        dense = [x["ratio_vs_dense"] for x in rows]
        hf = [x["ratio_vs_fastest_hf"] for x in rows if "ratio_vs_fastest_hf" in x]
        print(f"| {name} | {first['T']} | {dtype} | {mode} | {cell(tps, '{:.1f}k')} | "
              f"{cell(dense, '{:.2f}')} | {cell(hf, '{:.2f}') if hf else '-'} | "
              f"{statistics.median(ref):.1f}k |")
    print()
    print("| T | dtype | mode | E256/E8 tok/s at equal active FLOPs |")
    print("|---|---|---|---|")
    for i, g in enumerate(runs[0]["granularity"]):
        vals = [r["granularity"][i]["fine_over_coarse"] for r in runs]
        dtype = {"float32": "fp32", "bfloat16": "bf16"}[g["dtype"]]
        mode = "fwd+bwd" if g["mode"] == "fwdbwd" else "fwd"
        print(f"| {g['T']} | {dtype} | {mode} | {cell(vals, '{:.2f}')} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
