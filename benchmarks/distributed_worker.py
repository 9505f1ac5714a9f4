"""One rank of `benchmarks/distributed.py`, started by it under `torchrun --standalone` (W=1 too: a
process group of one, so every W runs the same code; `parallelize` leaves a world of one alone).

Per launch (layout W ranks, EP), on the same global batches at every W:
1. warm-up steps, then one step inside `CommBytesMode` (the c10d collectives `CommDebugMode` counts, per
   phase, each sized from its tensors and process group), with the all-to-all dispatcher's own
   `CommStats` and the (token, expert) pairs each rank sends off-rank; compared with the formulas;
2. timed steps (forward + backward + clip + AdamW + count all-reduce + bias update), a barrier before
   each, the step time of a step = the slowest rank's;
3. DCP save and load of model + optimizer (widemoe's `DCPCheckpointer` when it exists, and
   `torch.distributed.checkpoint` on `get_state_dict` directly), after which the parameters, perturbed
   in between, must come back bit-exact.
On CUDA (NCCL) only 2, plus model FLOP/s and MFU against the bf16 matmul peak measured on the device.
Rank 0 prints one ``WIDEMOE_BENCH {json}`` line with everything.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import statistics
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.debug._comm_mode import c10d_collective_ops
from torch.utils._python_dispatch import TorchDispatchMode

from widemoe.distributed.dims import ParallelDims
from widemoe.distributed.env import init_distributed, shutdown
from widemoe.distributed.grads import all_reduce_expert_counts, clip_grad_norm
from widemoe.distributed.parallelize import Layout, comm_stats, parallelize, reset_comm_stats
from widemoe.model.causal_lm import build_model
from widemoe.presets import get_preset
from widemoe.runtime import configure_cpu_runtime
from widemoe.train.bias_update import update_expert_bias

MARK = "WIDEMOE_BENCH "
C10D = torch.ops.c10d


# --- the collectives' bytes ---------------------------------------------------------------------------
def _group(pg: object) -> dist.ProcessGroup:
    """The ProcessGroup of a c10d op's argument (boxed as a TorchScript object at the dispatcher)."""
    return pg if isinstance(pg, dist.ProcessGroup) else dist.ProcessGroup.unbox(pg)


def sent_off_rank(packet: object, args: tuple) -> tuple[str, int]:
    """(kind, bytes this rank sends to other ranks) of one c10d collective, from its tensors and group:
    all-gather: my shard to g-1 peers; reduce-scatter: (g-1)/g of my input; all-to-all: every split but
    my own; all-reduce: 2(g-1)/g of the buffer (ring). Other collectives are counted, not sized."""
    if packet is C10D._allgather_base_:
        inp, pg = args[1], _group(args[2])
        return "all_gather", inp.nbytes * (pg.size() - 1)
    if packet is C10D._reduce_scatter_base_:
        out, pg = args[0], _group(args[2])
        return "reduce_scatter", out.nbytes * (pg.size() - 1)
    if packet is C10D.alltoall_base_:
        inp, pg, in_splits = args[1], _group(args[2]), args[4]
        g, rank = pg.size(), pg.rank()
        rows = inp.shape[0] if inp.dim() else 0
        row_bytes = inp.nbytes // rows if rows else 0
        own = in_splits[rank] if len(in_splits) else rows // g
        return "all_to_all", (rows - own) * row_bytes
    if packet is C10D.allreduce_:
        tensors, g = args[0], _group(args[1]).size()
        return "all_reduce", int(sum(t.nbytes for t in tensors) * 2 * (g - 1) / g)
    return str(packet).split(".")[-1], 0


class CommBytesMode(TorchDispatchMode):
    """The collectives of the code run under it: calls per c10d op (what `CommDebugMode.comm_counts`
    holds) and the bytes each sends off this rank, per kind and per `phase` (set by the caller).

    Not `CommDebugMode` itself: its module tracker fails on this model in torch 2.13 (IndexError in
    `_fw_set_module_hook`, a forward hook popping an empty parent list), and its forward/backward split
    comes from that tracker; here the caller names the phase. Like it, a call on DTensors is handed to
    DTensor first (NotImplemented) so the collectives it desugars into are seen."""

    def __init__(self) -> None:
        super().__init__()
        self.phase = "forward"
        self.counts: dict[str, int] = defaultdict(int)
        self.bytes: dict[str, int] = defaultdict(int)
        self.calls: dict[str, int] = defaultdict(int)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        if any(issubclass(t, DTensor) for t in types):
            return NotImplemented
        out = func(*args, **(kwargs or {}))
        packet = func._overloadpacket
        if packet in c10d_collective_ops:
            self.counts[str(packet)] += 1
            kind, nbytes = sent_off_rank(packet, args)
            self.bytes[f"{kind}/{self.phase}"] += nbytes
            self.calls[f"{kind}/{self.phase}"] += 1
        return out


# --- the formulas -------------------------------------------------------------------------------------
def fsdp_units(model: torch.nn.Module) -> list[tuple[torch.nn.Module, list[tuple[str, torch.nn.Parameter]]]]:
    """Every FSDP2 unit with the parameters it manages itself (not those of units nested in it), by
    their names in `model`."""
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    owner: dict[int, torch.nn.Module] = {}
    for unit in units:  # modules() is pre-order: an inner unit overwrites its ancestors' claim
        for p in unit.parameters():
            owner[id(p)] = unit
    named = list(model.named_parameters())
    return [(u, [(n, p) for n, p in named if owner.get(id(p)) is u]) for u in units]


def fsdp_formula(model: torch.nn.Module, dims: ParallelDims) -> dict[str, float]:
    """Bytes per rank per step from parameter sizes: each unit all-gathers its parameters (this rank's
    experts: E/EP of them) in the forward and again in the backward when it resharded after the forward
    (not the root: FSDP2 keeps the root unsharded for the backward), and reduce-scatters their fp32
    gradients once; (g-1)/g of each leaves the rank, g = W for dense units and W/EP for the experts."""
    ag = rs = 0.0
    n_units = n_resharding = 0
    for unit, params in fsdp_units(model):
        groups = [g for g in getattr(unit._get_fsdp_state(), "_fsdp_param_groups", [])]
        reshards = any(g.post_forward_mesh_info is not None for g in groups)
        for name, p in params:
            experts = ".experts." in name
            g = dims.efsdp if experts else dims.world_size
            full = p.numel() // (dims.ep if experts else 1) * p.element_size()
            ag += full * (g - 1) / g * (2 if reshards else 1)
            rs += full * (g - 1) / g
        n_units += 1
        n_resharding += int(reshards)
    return {"all_gather": ag, "reduce_scatter": rs, "units": n_units, "units_resharded_after_forward":
            n_resharding}


def a2a_formula(cfg, n_local: int, ep: int, elem: int) -> float:  # noqa: ANN001
    """4·N·K·(EP-1)/EP·D·bytes per MoE layer (dispatch + combine, forward + backward), all layers."""
    return 4 * n_local * cfg.num_experts_per_tok * (ep - 1) / ep * cfg.hidden_size * elem


def record_pairs(model: torch.nn.Module) -> dict[str, int]:
    """Wrap every all-to-all dispatcher's `plan` to count the (token, expert) pairs sent off-rank."""
    pairs = {"off_rank": 0, "total": 0}
    for moe in model.moe_blocks():
        d = moe.dispatcher
        if not hasattr(d, "ep_rank"):  # the local dispatcher (EP = 1) sends nothing
            continue

        def plan(*a, _orig=d.plan, _d=d, **k):  # noqa: ANN002, ANN003, ANN202
            p = _orig(*a, **k)
            pairs["off_rank"] += sum(p.send_splits) - p.send_splits[_d.ep_rank]
            pairs["total"] += sum(p.send_splits)
            return p

        d.plan = plan
    return pairs


# --- the step ---------------------------------------------------------------------------------------
def global_batches(vocab: int, B: int, T: int, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The same `n` global batches on every rank and at every W."""
    g = torch.Generator().manual_seed(1234)
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (B, T + 1), generator=g)
        out.append((ids[:, :-1].contiguous(), ids[:, 1:].contiguous()))
    return out


class Stepper:
    """forward + backward (loss · n_local / n_global: FSDP units sum gradients) + clip + AdamW + the
    once-per-step count all-reduce and bias update, as `widemoe train` does it on several ranks."""

    def __init__(self, model, opt, batches, rank: int, world: int, device: torch.device, bf16: bool):  # noqa: ANN001
        self.model, self.opt, self.batches, self.device, self.bf16 = model, opt, batches, device, bf16
        B = batches[0][0].shape[0]
        self.rows = slice(rank * B // world, (rank + 1) * B // world)
        self.scale = (B // world) / B  # the same number of tokens per row: n_local / n_global
        self.i = 0

    def __call__(self, mode: CommBytesMode | None = None) -> float:
        """One step; with `mode`, its phase follows the step (forward, backward, optimizer)."""
        x, y = self.batches[self.i % len(self.batches)]
        self.i += 1
        x, y = x[self.rows].to(self.device), y[self.rows].to(self.device)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            out = self.model(x, labels=y)
        if mode is not None:
            mode.phase = "backward"
        (out.loss * self.scale).backward()
        if mode is not None:
            mode.phase = "optimizer"
        clip_grad_norm(self.model.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        all_reduce_expert_counts(self.model)
        update_expert_bias(self.model)
        return float(out.loss.detach())


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step: Stepper, n: int, device: torch.device) -> list[float]:
    """Seconds of `n` steps, each the slowest rank's (barrier before, MAX all-reduce after)."""
    times = []
    for _ in range(n):
        dist.barrier()
        sync(device)
        t0 = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - t0)
    t = torch.tensor(times, dtype=torch.float64, device=device if device.type == "cuda" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def mean_over_ranks(values: dict[str, float], device: torch.device) -> dict[str, float]:
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64,
                     device=device if device.type == "cuda" else "cpu")
    dist.all_reduce(t)
    return {k: float(v) / dist.get_world_size() for k, v in zip(keys, t.tolist(), strict=True)}


# --- the measurements -----------------------------------------------------------------------------
def measure_comm(step: Stepper, cfg, dims: ParallelDims, n_local: int, device: torch.device) -> dict:  # noqa: ANN001
    """One step under `CommBytesMode`: bytes off-rank per kind against the formulas (mean over ranks)."""
    model = step.model
    pairs = record_pairs(model)
    reset_comm_stats(model)
    with CommBytesMode() as mode:
        step(mode)
    elem = next(model.parameters()).element_size()
    n_moe = len(model.moe_blocks())
    fsdp = fsdp_formula(model, dims)
    per_rank = {
        "a2a_dispatcher_bytes": comm_stats(model).bytes_sent,
        "a2a_hooked_bytes": mode.bytes["all_to_all/forward"] + mode.bytes["all_to_all/backward"],
        "pairs_off_rank": pairs["off_rank"], "pairs_total": pairs["total"],
        "ag_forward_bytes": mode.bytes["all_gather/forward"],
        "ag_backward_bytes": mode.bytes["all_gather/backward"],
        "rs_bytes": sum(v for k, v in mode.bytes.items() if k.startswith("reduce_scatter/")),
        "all_reduce_bytes": sum(v for k, v in mode.bytes.items() if k.startswith("all_reduce/")),
    }
    m = mean_over_ranks(per_rank, device)
    a2a_formula_bytes = n_moe * a2a_formula(cfg, n_local, dims.ep, elem)
    share = m["pairs_off_rank"] / m["pairs_total"] if m["pairs_total"] else 0.0
    # what the dispatcher sends besides the 4 passes of rows: one fp32 routing weight per off-rank pair
    # forward and its gradient backward (the [EP, E/EP] counts go by the same all-to-all, uncounted)
    rows_bytes = 4 * m["pairs_off_rank"] * cfg.hidden_size * elem
    weight_bytes = 2 * m["pairs_off_rank"] * 4
    ag = m["ag_forward_bytes"] + m["ag_backward_bytes"]
    return {
        "moe_layers": n_moe, "tokens_per_rank": n_local, "bytes_per_element": elem,
        "a2a": {"measured_bytes": m["a2a_dispatcher_bytes"], "formula_bytes": a2a_formula_bytes,
                "measured_over_formula": m["a2a_dispatcher_bytes"] / a2a_formula_bytes
                if a2a_formula_bytes else None,
                "off_rank_pair_share": share, "uniform_share": (dims.ep - 1) / dims.ep,
                "rows_bytes_from_pairs": rows_bytes, "weight_bytes_from_pairs": weight_bytes,
                "dispatcher_over_rows_plus_weights": m["a2a_dispatcher_bytes"] / (rows_bytes + weight_bytes)
                if rows_bytes else None,
                "hooked_bytes_incl_counts": m["a2a_hooked_bytes"]},
        "fsdp": {"all_gather_measured": ag, "all_gather_formula": fsdp["all_gather"],
                 "all_gather_forward": m["ag_forward_bytes"], "all_gather_backward": m["ag_backward_bytes"],
                 "reduce_scatter_measured": m["rs_bytes"], "reduce_scatter_formula": fsdp["reduce_scatter"],
                 "all_gather_ratio": ag / fsdp["all_gather"] if fsdp["all_gather"] else None,
                 "reduce_scatter_ratio": m["rs_bytes"] / fsdp["reduce_scatter"]
                 if fsdp["reduce_scatter"] else None,
                 "units": fsdp["units"],
                 "units_resharded_after_forward": fsdp["units_resharded_after_forward"]},
        "all_reduce_bytes": m["all_reduce_bytes"],
        "counts_rank0": dict(mode.counts),
        "calls_rank0": dict(mode.calls),
    }


def _local(p: torch.Tensor) -> torch.Tensor:
    return p.to_local() if hasattr(p, "to_local") else p


# (how, save(rep) -> the checkpoint's directory, load(that directory))
SaveLoad = tuple[str, Callable[[int], Path], Callable[[Path], object]]


def dcp_direct(model, opt, path: Path) -> SaveLoad:  # noqa: ANN001
    """Save and load with `torch.distributed.checkpoint` directly."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    def save(rep: int) -> Path:
        msd, osd = get_state_dict(model, opt)
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(path / f"rep{rep}"))
        return path / f"rep{rep}"

    def load(ckpt: Path) -> None:
        msd, osd = get_state_dict(model, opt)
        state = {"model": msd, "optim": osd}
        dcp.load(state, checkpoint_id=str(ckpt))
        set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])

    return "torch.distributed.checkpoint save/load of get_state_dict(model, optimizer)", save, load


def dcp_widemoe(model, opt, path: Path) -> SaveLoad | None:  # noqa: ANN001
    """The same through widemoe's `DCPCheckpointer` (None while that module does not exist): its save
    adds the host state, per-rank RNG, config files, fsyncs, the barriers and the COMMITTED marker."""
    try:
        from widemoe.train.dcp import DCPCheckpointer
    except ImportError:
        return None
    ck = DCPCheckpointer()

    def save(rep: int) -> Path:
        state = {"step": rep + 1, "tokens_seen": 0, "scheduler": {}, "data": "{}",
                 "torch_rng": torch.get_rng_state(), "python_rng": json.dumps(random.getstate())}
        return ck.save(path, rep + 1, model, opt, state, keep_last=100)

    return "widemoe.train.dcp.DCPCheckpointer save/load", save, lambda ckpt: ck.load(ckpt, model, opt)


def measure_dcp(model, opt, path: Path, how_save_load: SaveLoad, reps: int = 2) -> dict:  # noqa: ANN001
    """Seconds to save and to load model + optimizer with DCP (reps times, each a fresh checkpoint);
    between save and load the parameters are perturbed, and must come back bit-exact."""
    how, save, load = how_save_load
    saves, loads, exact, ckpt = [], [], True, path
    for r in range(reps):
        before = {n: _local(p).detach().clone() for n, p in model.named_parameters()}
        dist.barrier()
        t0 = time.perf_counter()
        ckpt = save(r)
        dist.barrier()
        saves.append(time.perf_counter() - t0)
        with torch.no_grad():
            for p in model.parameters():
                _local(p).add_(1.0)
        dist.barrier()
        t0 = time.perf_counter()
        load(ckpt)
        dist.barrier()
        loads.append(time.perf_counter() - t0)
        exact &= all(torch.equal(_local(p), before[n]) for n, p in model.named_parameters())
    size = sum(f.stat().st_size for f in Path(ckpt).rglob("*") if f.is_file())
    ok = torch.tensor([float(exact)])
    dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return {"how": how, "save_s": saves, "load_s": loads, "bytes_on_disk": size,
            "reload_bit_exact": bool(ok.item())}


# --- main -------------------------------------------------------------------------------------------
def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="one rank of benchmarks/distributed.py")
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--batch", type=int, default=8, help="global batch (rows)")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--ep", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--comm", action="store_true", help="measure the collectives' bytes (one step)")
    ap.add_argument("--dcp-dir", default="", help="time DCP save/load into this (empty) directory")
    ap.add_argument("--dtypes", default="fp32", help="fp32 and/or bf16 (autocast), comma-separated")
    return ap.parse_args()


def run_dtype(args: argparse.Namespace, cfg, layout: Layout, env, bf16: bool, first: bool) -> dict:  # noqa: ANN001
    """Build, parallelize, warm up, (measure bytes), time; on the first dtype also DCP."""
    W, device = env.world_size, env.device
    model = parallelize(build_model(cfg, seed=0, device=device), layout)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batches = global_batches(cfg.vocab_size, args.batch, args.seq, 8)
    step = Stepper(model, opt, batches, env.rank, W, device, bf16)
    losses = [step() for _ in range(args.warmup)]
    res: dict = {"dtype": "bf16" if bf16 else "fp32", "first_losses": losses}
    if args.comm and first and W > 1:
        res["comm"] = measure_comm(step, cfg, layout.dims, args.batch // W * args.seq, device)
    times = time_steps(step, args.steps, device)
    med = statistics.median(times)
    tokens = args.batch * args.seq
    res.update({"step_s": times, "median_step_s": med, "tokens_per_s": tokens / med})
    if device.type == "cuda":
        from widemoe.train.metrics import measure_matmul_peak, train_flops_per_token

        flops = train_flops_per_token(cfg, args.seq) * tokens / med
        peak = measure_matmul_peak(torch.bfloat16, device="cuda")
        res.update({"model_flops_per_s": flops, "bf16_matmul_peak": peak, "mfu_vs_bf16_peak": flops / peak,
                    "gpu": torch.cuda.get_device_name(device),
                    "max_memory_allocated_gb": torch.cuda.max_memory_allocated(device) / 2**30})
    if args.dcp_dir and first and device.type == "cpu":
        path = Path(args.dcp_dir)
        ours = dcp_widemoe(model, opt, path / "widemoe")
        direct = measure_dcp(model, opt, path, dcp_direct(model, opt, path / "direct"))
        res["dcp"] = measure_dcp(model, opt, path, ours) if ours is not None else direct
        if ours is not None:
            res["dcp_direct"] = direct
        dist.barrier()
        if env.rank == 0:
            shutil.rmtree(path, ignore_errors=True)
    return res


def main() -> None:
    args = parse_args()
    runtime = configure_cpu_runtime()  # as `widemoe train`: allocator fix, $WIDEMOE_THREADS threads
    env = init_distributed()
    if not env.distributed:
        raise SystemExit("run me under torchrun (benchmarks/distributed.py does)")
    cfg = get_preset(args.preset)
    dims = ParallelDims(env.world_size, args.ep)
    dims.check_batch(args.batch)
    dims.check_experts(cfg.n_routed_experts)
    layout = Layout.build(dims, env.device.type)
    out = {"world_size": env.world_size, "ep": args.ep, "backend": env.backend, "device": str(env.device),
           "preset": args.preset, "batch": args.batch, "seq": args.seq,
           "threads_per_rank": torch.get_num_threads(), "runtime": runtime, "runs": []}
    for i, name in enumerate(args.dtypes.split(",")):
        out["runs"].append(run_dtype(args, cfg, layout, env, name == "bf16", i == 0))
    if env.is_main:
        print(MARK + json.dumps(out, default=lambda o: None if isinstance(o, float) and not math.isfinite(o)
                                else str(o)), flush=True)
    shutdown()


if __name__ == "__main__":
    main()
