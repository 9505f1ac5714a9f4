"""DCP checkpoints across layouts: save at one (W, EP), load at others, compare with full tensors.

Usage (under torchrun, or as a plain process for W=1):
    ckpt_reshard.py [--load RUN:EP1,EP2 ...] [--damaged RUN] [--save RUN:EP [--crash]]

--save RUN:EP   build the micro model at (W, EP) with the trainer's AdamW (two groups, fused), take 2
                steps on a global batch (each rank its slice), set each group's learning rate, save
                step 2 into RUN with `DCPCheckpointer` (per-rank torch RNG seeded 1000+rank) and write
                the full reference (parameters, balancing bias, optimizer state via `full_tensor()`,
                host state, the losses of 2 more steps) to RUN/ref.pt (rank 0).
--crash         then save step 4 with rank 1 calling os._exit(1) after writing its files, before the
                commit barrier: the launch must end non-zero, RUN's latest must stay step 2.
--damaged RUN   copy RUN's latest checkpoint with rank 1's RNG file truncated: every rank's load raises
                CheckpointDamaged naming it (no rank moves on alone to an older checkpoint).
--load RUN:EPS  for each EP: a model with other weights and a fresh optimizer at (W, EP), load RUN's
                latest checkpoint, compare with RUN/ref.pt bit for bit, check the host state, the RNG
                rule, the notices and the groups' learning rates, take 2 steps and compare the losses.
Loads run before the save, so one launch can check one checkpoint and write the next.
"""

from __future__ import annotations

import argparse
import json
import os
import random
from pathlib import Path

import torch
import torch.distributed as dist
from dist_checks import finish, report

from widemoe.distributed.dims import ParallelDims
from widemoe.distributed.env import init_distributed
from widemoe.distributed.parallelize import Layout, parallelize
from widemoe.model.causal_lm import build_model
from widemoe.presets import get_preset
from widemoe.train.dcp import DCPCheckpointer

B, T, STEP = 4, 16, 2
LRS = [5e-4, 2.5e-4]  # per group at the save


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def all_true(flag: bool) -> bool:
    if not dist.is_initialized():
        return flag
    t = torch.tensor([int(flag)])
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t)


def build(ep: int, seed: int):  # noqa: ANN201
    W = world()[1]
    model = parallelize(build_model(get_preset("micro"), seed=seed), Layout.build(ParallelDims(W, ep), "cpu"))
    model.train()
    # as the trainer builds it (widemoe.train.build.build_optimizer): two groups, fused
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "norm" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "norm" not in n)]
    groups = [{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}]
    return model, torch.optim.AdamW(groups, lr=1e-3, fused=True)


def step(model, opt, k: int) -> float:  # noqa: ANN001
    """One AdamW step on global batch k; the global mean loss."""
    rank, W = world()
    ids = torch.randint(0, 256, (B, T + 1), generator=torch.Generator().manual_seed(100 + k))
    sl = slice(rank * B // W, (rank + 1) * B // W)
    loss = model(ids[sl, :-1], labels=ids[sl, 1:]).loss * (1 / W)
    loss.backward()
    opt.step()
    opt.zero_grad()
    total = loss.detach().clone()
    if dist.is_initialized():
        dist.all_reduce(total)
    return float(total)


def snapshot(model, opt) -> dict[str, torch.Tensor]:  # noqa: ANN001
    """Full tensors by name: parameters, balancing biases, optimizer state (a collective: every rank)."""
    out = {f"p/{n}": full(p.detach()).clone() for n, p in model.named_parameters()}
    out.update({f"b/{n}": full(b).clone() for n, b in model.named_buffers() if "correction_bias" in n})
    for n, p in model.named_parameters():
        for k, v in opt.state[p].items():
            out[f"{k}/{n}"] = full(v).clone()
    return out


def host_state() -> dict:
    rank = world()[0]
    torch.manual_seed(1000 + rank)
    return {"step": STEP, "tokens_seen": STEP * B * T, "scheduler": {"last_epoch": STEP},
            "data": json.dumps({"pos": 11}), "torch_rng": torch.get_rng_state(),
            "python_rng": json.dumps(random.Random(3).getstate()), "train_config": "{}"}


def tokenizer():  # noqa: ANN201
    import tokenizers

    from widemoe.data.tokenizer import EOS_TOKEN, PAD_TOKEN, Tokenizer

    vocab = {EOS_TOKEN: 0, PAD_TOKEN: 1, "a": 2, "b": 3}
    return Tokenizer(tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="a")))


def save(run: Path, ep: int, crash: bool) -> None:
    rank, W = world()
    model, opt = build(ep, seed=0)
    for k in range(STEP):
        step(model, opt, k)
    for g, lr in zip(opt.param_groups, LRS):  # as a schedule would have set them: the load must restore them
        g["lr"] = lr
    ckpt = DCPCheckpointer().save(run, STEP, model, opt, host_state(), tokenizer=tokenizer(), keep_last=2)
    ref = snapshot(model, opt)
    losses = [step(model, opt, STEP + k) for k in range(2)]
    if rank == 0:
        torch.save({"tensors": ref, "losses": losses, "world_size": W, "ep": ep}, run / "ref.pt")
    report(f"save/W{W}-EP{ep}", ckpt.name)
    if crash:
        def die(r: int, tmp: Path) -> None:
            if r == 1:
                os._exit(1)  # a kill: this rank's files are written, the commit never happens

        DCPCheckpointer(after_write=die).save(run, 4, model, opt, host_state())
        report("crash/survived", True)  # not reached: rank 0 waits for rank 1 and the launch ends


def load(run: Path, ep: int) -> None:
    rank, W = world()
    tag = f"load/W{W}-EP{ep}" + ("#P" if run.name == "P" else "")
    ck = DCPCheckpointer()
    ref = torch.load(run / "ref.pt", weights_only=True)
    model, opt = build(ep, seed=1)  # other weights; the optimizer has no state yet
    st = ck.load(ck.latest(run), model, opt)
    got = snapshot(model, opt)
    report(f"{tag}/names_differ", sorted(set(got) ^ set(ref["tensors"])))
    differ = [k for k, v in ref["tensors"].items() if k in got and not torch.equal(got[k], v)]
    report(f"{tag}/not_bit_exact", differ)
    want = host_state()
    host_ok = all(st[k] == want[k] for k in ("step", "tokens_seen", "scheduler", "data", "python_rng"))
    report(f"{tag}/host_state_ok", all_true(host_ok))
    report(f"{tag}/group_lrs", [g["lr"] for g in opt.param_groups])
    # the RNG rule: a rank that existed at save time gets its own state, a new rank rank 0's
    torch.manual_seed(1000 + (rank if rank < ref["world_size"] else 0))
    report(f"{tag}/rng_ok", all_true(torch.equal(st["torch_rng"], torch.get_rng_state())))
    report(f"{tag}/saved_layout", st["saved_layout"])
    report(f"{tag}/notices", st["load_notices"])
    losses = [step(model, opt, STEP + k) for k in range(2)]
    report(f"{tag}/loss_abs_err", max(abs(a - b) for a, b in zip(losses, ref["losses"])))


def damaged(run: Path) -> None:
    """Rank 1's RNG file truncated (a file only rank 1 reads): every rank must raise, none move on alone."""
    import shutil

    from widemoe.train.checkpoint import CheckpointDamaged

    ck = DCPCheckpointer()
    copy = run.with_name(run.name + "-damaged") / "checkpoints" / ck.latest(run).name
    victim = copy / "rng-rank00001.pt"
    if world()[0] == 0:
        shutil.copytree(ck.latest(run), copy)
        victim.write_bytes(victim.read_bytes()[:100])
    dist.barrier()
    model, opt = build(1, seed=1)
    try:
        ck.load(copy, model, opt)
        named = False
    except CheckpointDamaged as e:
        named = str(victim) in str(e)
    report("damaged/every_rank_names_the_file", all_true(named))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--save", default=None)
    ap.add_argument("--crash", action="store_true")
    ap.add_argument("--load", action="append", default=[])
    ap.add_argument("--damaged", default=None, help="a run whose checkpoint is copied and damaged")
    args = ap.parse_args()
    init_distributed()
    for spec in args.load:
        run, eps = spec.rsplit(":", 1)
        for ep in eps.split(","):
            load(Path(run), int(ep))
    if args.damaged:
        damaged(Path(args.damaged))
    if args.save:
        run, ep = args.save.rsplit(":", 1)
        save(Path(run), int(ep), args.crash)
    finish()


if __name__ == "__main__":
    main()
