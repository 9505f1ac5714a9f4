"""Multi-process training benchmark (issue 12): bytes on the wire against the formulas, step time at W = 1, 2,
4 ranks on the same global batch, DCP save/load seconds, and (where CUDA exists) W=1 on a GPU with NCCL.

Not a test. Each layout (W ranks, EP) is one `python -m torch.distributed.run --standalone
--nproc-per-node W benchmarks/distributed_worker.py` (gloo, OMP_NUM_THREADS=1 and WIDEMOE_THREADS=1 per
rank; W=1 is torchrun with one process, the same code: `parallelize` leaves a world of one alone). The
model is the `tiny` preset (DeepSeek-V3 style: MLA, E=32 experts top-6, one shared expert, 3 MoE layers +
1 MoE layer in the MTP block), fp32, AdamW, the same global batches at every W. Method per launch
(distributed_worker.py):

1. All-to-all: one step after warm-up with the dispatcher's `CommStats` (bytes each rank sends to other
   ranks) and a count of the (token, expert) pairs each rank sends off-rank. Formula per rank per MoE
   layer: 4·N·K·(EP−1)/EP·D·bytes (rows out and back, forward and backward; N tokens per rank). Besides
   the rows the dispatcher sends one fp32 routing weight per off-rank pair forward and its gradient
   backward (8 bytes per pair, counted), and the [EP, E/EP] counts (uncounted by `CommStats`, seen by
   the hook). The formula assumes (EP−1)/EP of the pairs leave the rank (uniform routing); the measured
   share is printed, and the ratio corrected by it isolates what the dispatcher adds.
2. FSDP2: the same step under a dispatch mode that sees every c10d collective (the ops
   `CommDebugMode` counts) and sizes it from its tensors and process group (bytes this rank sends: an
   all-gather sends its shard to g−1 peers, a reduce-scatter (g−1)/g of its input). Formula from the
   parameter sizes: every FSDP unit all-gathers its parameters (the experts: this rank's E/EP) in the
   forward and again in the backward when it resharded after the forward (every unit but the root),
   and reduce-scatters the fp32 gradients once; (g−1)/g leaves the rank, g = W (dense) or W/EP (experts).
3. Step time: forward + backward + clip + AdamW + expert-count all-reduce + bias update, a barrier before
   each step, the slowest rank's time, median of the timed steps after warm-up; tokens/s of the global
   batch. The machine has 2 cores: W=1 uses one, W=2 both, W=4 is oversubscribed (4 ranks on 2 cores);
   a last row runs W=1 with 2 threads, the one-process use of both cores, for reference. The machine is
   shared with other jobs: each launch waits (up to --max-wait) for the cores to be quiet, and records
   the share of the cores other jobs used while it ran ("others"; timings with a large one are void).
4. DCP: save then load of model + optimizer, twice (the best is printed), the parameters perturbed in
   between and checked bit-exact after the load: widemoe's `DCPCheckpointer` (host state, per-rank RNG,
   config files, fsync, barriers, COMMITTED marker) when it exists, else `torch.distributed.checkpoint` on
   `get_state_dict(model, optimizer)` ("how" in the JSON says which); with the former, the latter too
   ("dcp_direct") for comparison.
5. CUDA (skipped, with a line saying so, without a GPU): W=1 on `cuda` with NCCL, bf16 autocast and
   fp32, batch 32x512; tokens/s and MFU = model FLOPs (widemoe.cost) / the bf16 matmul peak
   measured on the device. `--cuda-only` runs just that (under 3 minutes) and writes the JSON of the
   tree with its "cuda" part replaced.

    .venv/bin/python benchmarks/distributed.py [--quick] [--cuda-only] [--out PATH]

Writes benchmarks/results/distributed.json (~4 minutes here).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from moe_layer import code_version  # benchmarks/ is the script's folder, hence on sys.path

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).resolve().parent / "distributed_worker.py"
RESULTS = Path(__file__).resolve().parent / "results" / "distributed.json"
MARK = "WIDEMOE_BENCH "
CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
# (W, EP, threads per rank); (4, 2) also exercises FSDP over the expert mesh; (1, 1, 2) is the reference
# of one process using both cores (timing only)
LAYOUTS = ((1, 1, 1), (2, 2, 1), (4, 4, 1), (4, 2, 1), (1, 1, 2))


def machine_busy_s() -> float:
    """CPU seconds all processes of the machine have used (/proc/stat; 0 where it does not exist)."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return 0.0
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def wait_for_quiet(max_wait: float, threshold: float = 0.1) -> float:
    """Wait (up to `max_wait` s) until other jobs use under `threshold` of the cores for 3 s; the seconds
    waited. The machine is shared: a timing taken while another job runs measures that job too."""
    t0 = time.perf_counter()
    while True:
        b0 = machine_busy_s()
        time.sleep(3.0)
        if (machine_busy_s() - b0) / (3.0 * CORES) < threshold or time.perf_counter() - t0 > max_wait:
            return time.perf_counter() - t0


def children_cpu_s() -> float:
    """CPU seconds of this process's finished children (torchrun and its ranks)."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def launch(world: int, worker_args: list[str], timeout: float, threads: int = 1, max_wait: float = 0) -> dict:
    """Run the worker on `world` ranks under torchrun; its rank-0 result, or {"error": tail of output}."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}",
           str(WORKER), *worker_args]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "WIDEMOE_THREADS": str(threads),
           "PYTHONUNBUFFERED": "1",  # src/ first: a checkout without an installed widemoe works too
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))}
    waited = wait_for_quiet(max_wait) if max_wait > 0 else 0.0
    t0, busy0, ours0 = time.perf_counter(), machine_busy_s(), children_cpu_s()
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"error": f"ran past {timeout:.0f} s", "launch_s": time.perf_counter() - t0}
    wall = time.perf_counter() - t0
    # CPU seconds the rest of the machine used meanwhile (other agents' jobs share these cores)
    others = max(0.0, (machine_busy_s() - busy0) - (children_cpu_s() - ours0))
    info = {"launch_s": wall, "other_jobs_cpu_share": others / (wall * CORES), "waited_for_quiet_s": waited}
    tail = (res.stdout + res.stderr)[-3000:]
    for line in res.stdout.splitlines():
        if line.startswith(MARK):
            if res.returncode != 0:  # measured, then a rank died on the way out: keep both facts
                print(f"W={world}: exit {res.returncode} after the results: {first_error(tail)}", flush=True)
                info.update({"exit_code": res.returncode, "exit_tail": tail})
            return {**json.loads(line[len(MARK):]), **info}
    return {"error": f"exit {res.returncode}: " + tail, **info}


def first_error(tail: str) -> str:
    """The line of a failed launch's output that says what went wrong, as far as one does."""
    for key in ("terminate called", "Error", "Signal"):
        for line in tail.splitlines():
            if key in line:
                return line.strip()[:200]
    return tail.strip().splitlines()[-1][:200] if tail.strip() else ""


def cpu_part(args: argparse.Namespace) -> list[dict]:
    rows = []
    for world, ep, threads in LAYOUTS:
        with tempfile.TemporaryDirectory(prefix="widemoe_dcp_") as tmp:
            wargs = ["--preset", args.preset, "--batch", str(args.batch), "--seq", str(args.seq), "--ep",
                     str(ep), "--warmup", str(args.warmup), "--steps", str(args.steps)]
            if threads == 1:
                wargs += ["--comm", "--dcp-dir", str(Path(tmp) / "ckpt")]
            r = launch(world, wargs, timeout=240, threads=threads, max_wait=args.max_wait)
        if "error" in r:
            print(f"W={world} EP={ep} threads={threads}: FAILED {r['error']}", flush=True)
            r.update({"world_size": world, "ep": ep, "threads_per_rank": threads})
        else:
            print_layout(r, rows[0] if rows else None)
        rows.append(r)
    return rows


def print_layout(r: dict, base: dict | None) -> None:
    run = r["runs"][0]
    speed = ""
    if base is not None and "runs" in base:
        speed = f"  x{run['tokens_per_s'] / base['runs'][0]['tokens_per_s']:.2f} vs W=1 (1 thread)"
    busy = r["world_size"] * r["threads_per_rank"]
    over = f"  (oversubscribed: {busy} threads on {CORES} cores)" if busy > CORES else ""
    if r.get("other_jobs_cpu_share", 0) > 0.05:
        over += f"  [other jobs used {r['other_jobs_cpu_share']:.0%} of the cores meanwhile]"
    print(f"W={r['world_size']} EP={r['ep']} {r['threads_per_rank']} thread(s)/rank: step "
          f"{run['median_step_s'] * 1e3:7.1f} ms (median of "
          f"{len(run['step_s'])})  {run['tokens_per_s']:7.0f} tok/s{speed}{over}", flush=True)
    c = run.get("comm")
    if c:
        a, f = c["a2a"], c["fsdp"]
        corrected = a["measured_over_formula"] * a["uniform_share"] / max(a["off_rank_pair_share"], 1e-12)
        print(f"    all-to-all  {a['measured_bytes'] / 1e6:7.3f} MB/rank/step  formula "
              f"{a['formula_bytes'] / 1e6:7.3f}  measured/formula {a['measured_over_formula']:.3f}  "
              f"off-rank pairs {a['off_rank_pair_share']:.3f} (uniform {a['uniform_share']:.3f}; "
              f"ratio at the measured share {corrected:.4f}); with the counts exchange "
              f"{a['hooked_bytes_incl_counts'] / 1e6:.3f} MB", flush=True)
        print(f"    FSDP all-gather {f['all_gather_measured'] / 1e6:7.3f} MB/rank/step  formula "
              f"{f['all_gather_formula'] / 1e6:7.3f} ({f['all_gather_ratio'] or 0:.4f});  reduce-scatter "
              f"{f['reduce_scatter_measured'] / 1e6:7.3f}  formula {f['reduce_scatter_formula'] / 1e6:7.3f} "
              f"({f['reduce_scatter_ratio'] or 0:.4f});  {f['units']} units, "
              f"{f['units_resharded_after_forward']} resharded after forward", flush=True)
        print(f"    collectives on rank 0: {c['counts_rank0']}", flush=True)
    d = run.get("dcp")
    if d:
        print(f"    DCP save {min(d['save_s']):.3f} s  load {min(d['load_s']):.3f} s  "
              f"({d['bytes_on_disk'] / 1e6:.1f} MB, reload bit-exact: {d['reload_bit_exact']}; {d['how']})",
              flush=True)
    d = run.get("dcp_direct")
    if d:
        print(f"    torch DCP directly (no fsync/marker/config files): save {min(d['save_s']):.3f} s  "
              f"load {min(d['load_s']):.3f} s", flush=True)


def summary_cells(run: dict) -> list[str]:
    """a2a, a2a at the measured share, off-rank share, AG, RS ratios, DCP save and load seconds."""
    a, f = run.get("comm", {}).get("a2a"), run.get("comm", {}).get("fsdp")
    cells = ["-"] * 7
    if a and f:
        star = a["measured_over_formula"] * a["uniform_share"] / max(a["off_rank_pair_share"], 1e-12)
        cells[:5] = [f"{a['measured_over_formula']:.3f}", f"{star:.4f}", f"{a['off_rank_pair_share']:.3f}",
                     f"{f['all_gather_ratio']:.4f}", f"{f['reduce_scatter_ratio']:.4f}"]
    d = run.get("dcp")
    if d:
        cells[5:] = [f"{min(d['save_s']):.2f}", f"{min(d['load_s']):.2f}"]
    return cells


def print_summary(layouts: list[dict]) -> None:
    print("\nSummary (bytes per rank per step, ratio = measured / formula; a2a* = at the measured off-rank "
          "share; others = share of the cores other jobs used during the launch)")
    heads = ("a2a", "a2a*", "share", "AG", "RS", "save s", "load s", "others")
    print(f"{'W':>2} {'EP':>2} {'thr':>3} {'ms/step':>8} {'tok/s':>7} " + " ".join(f"{h:>6}" for h in heads))
    for r in layouts:
        lead = f"{r['world_size']:>2} {r['ep']:>2} {r['threads_per_rank']:>3}"
        if "runs" not in r:
            print(f"{lead}  failed")
            continue
        run = r["runs"][0]
        others = f"{r.get('other_jobs_cpu_share', 0):.0%}"  # of the cores, used by other jobs meanwhile
        print(f"{lead} {run['median_step_s'] * 1e3:>8.1f} {run['tokens_per_s']:>7.0f} "
              + " ".join(f"{c:>6}" for c in [*summary_cells(run), others]))


def cuda_part(args: argparse.Namespace) -> dict:
    """W=1 on CUDA with NCCL, bf16 autocast then fp32 (one launch each: one failing leaves the other), or
    why it was skipped."""
    if not torch.cuda.is_available():
        print("CUDA: skipped (torch.cuda.is_available() is False on this machine)", flush=True)
        return {"skipped": "torch.cuda.is_available() is False"}
    out: dict = {"preset": args.cuda_preset, "batch": args.cuda_batch, "seq": args.cuda_seq, "runs": []}
    for dtype in ("bf16", "fp32"):
        wargs = ["--preset", args.cuda_preset, "--batch", str(args.cuda_batch), "--seq", str(args.cuda_seq),
                 "--warmup", "3", "--steps", "10", "--dtypes", dtype]
        r = launch(1, wargs, timeout=80)
        if "error" in r:
            print(f"CUDA {dtype}: FAILED {r['error']}", flush=True)
            out["runs"].append({"dtype": dtype, **r})
            continue
        run = r["runs"][0]
        print(f"CUDA W=1 {dtype}: {run['median_step_s'] * 1e3:.1f} ms/step  {run['tokens_per_s']:.0f} tok/s  "
              f"MFU {run['mfu_vs_bf16_peak']:.2%} of the bf16 matmul peak "
              f"{run['bf16_matmul_peak'] / 1e12:.0f} TFLOP/s ({run['gpu']}, {r['backend']})", flush=True)
        out["runs"].append({**run, "backend": r["backend"], "launch_s": r["launch_s"]})
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--batch", type=int, default=16, help="global batch (rows) on CPU, the same at every W")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per layout")
    ap.add_argument("--max-wait", type=float, default=90,
                    help="seconds to wait before each CPU launch for other jobs to leave the cores")
    ap.add_argument("--cuda-preset", default="tiny")
    ap.add_argument("--cuda-batch", type=int, default=32)
    ap.add_argument("--cuda-seq", type=int, default=512)
    ap.add_argument("--quick", action="store_true", help="micro preset, tiny batch: a smoke run")
    ap.add_argument("--cuda-only", action="store_true",
                    help="only the CUDA part; writes the tree's JSON with its 'cuda' part replaced")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    if args.quick:
        args.preset, args.batch, args.seq, args.steps = "micro", 4, 16, 2
        args.cuda_batch, args.cuda_seq = 4, 16
    version = code_version()  # now: src/ may change while the benchmark runs
    t_start = time.perf_counter()
    print(f"torch {torch.__version__}, {platform.machine()}, {CORES} cores, commit {version}, "
          f"preset {args.preset}", flush=True)
    if args.cuda_only:
        out = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
        out["cuda"] = {**cuda_part(args), "commit": version, "torch": torch.__version__,
                       "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    else:
        print(f"CPU, gloo, 1 thread per rank, global batch {args.batch}x{args.seq} tokens, fp32", flush=True)
        layouts = cpu_part(args)
        print_summary(layouts)
        out = {"commit": version, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
               "torch": torch.__version__, "python": sys.version.split()[0], "cores": CORES,
               "preset": args.preset, "batch": args.batch, "seq": args.seq, "warmup": args.warmup,
               "steps": args.steps, "note": "CPU: 1 thread per rank; W=4 is oversubscribed on 2 cores",
               "layouts": layouts, "cuda": cuda_part(args)}
    out["seconds"] = time.perf_counter() - t_start
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out}  ({out['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
