"""FSDP2 + EP on W ranks against one process on the same global batch (fp32).

Usage: torchrun ... parity.py --ep K --family v3|v4
Reports (max over ranks): step-0 gradient error per tensor relative to that tensor's max |g| (worst
tensor), the ratio of the expert-gradient norms (1 when expert gradients are scaled right; EP when the
all-to-all's sum is averaged over too few ranks), the total gradient norm's relative error, the worst
loss difference over 10 SGD steps, the parameter error after them, and whether the balancing bias is
identical on every rank and equal to the single-process one.
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist
from dist_checks import max_over_ranks, rel_diff, report

from widemoe.distributed.dims import ParallelDims
from widemoe.distributed.env import init_distributed, shutdown
from widemoe.distributed.grads import all_reduce_expert_counts, all_reduce_sum, clip_grad_norm
from widemoe.distributed.parallelize import Layout, parallelize
from widemoe.model.causal_lm import build_model
from widemoe.presets import get_preset
from widemoe.train.bias_update import update_expert_bias

B, T, STEPS = 4, 16, 10


def family_config(family: str):  # noqa: ANN201
    if family == "v4":
        return get_preset("v4-tiny", vocab_size=256)
    return get_preset("micro", aux_loss_alpha=0.0, router_aux_loss_coef=0.0)


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def batch(step: int, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    ids = torch.randint(0, vocab, (B, T + 1), generator=g)
    return ids[:, :-1], ids[:, 1:]


def expert_norm(named: dict[str, torch.Tensor]) -> float:
    return float(sum(g.double().pow(2).sum() for n, g in named.items() if ".experts." in n) ** 0.5)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ep", type=int, default=1)
    ap.add_argument("--families", default="v3,v4")
    args = ap.parse_args()
    env = init_distributed()
    layout = Layout.build(ParallelDims(env.world_size, args.ep), "cpu")
    for family in args.families.split(","):
        check_family(family, layout, env.world_size, env.rank)
    shutdown()


def check_family(family: str, layout: Layout, W: int, rank: int) -> None:
    def report_(name: str, value: object) -> None:
        report(f"{family}/{name}", value)

    cfg = family_config(family)
    ref = build_model(cfg, seed=0)
    model = parallelize(build_model(cfg, seed=0), layout)
    ref.train()
    model.train()
    sl = slice(rank * B // W, (rank + 1) * B // W)
    n_global, n_local = B * T, (B // W) * T

    # step 0: gradients per tensor
    x, y = batch(0, cfg.vocab_size)
    ref(x, labels=y).loss.backward()
    (model(x[sl], labels=y[sl]).loss * (n_local / n_global)).backward()
    ref_grads = {n: p.grad for n, p in ref.named_parameters() if p.grad is not None}
    got = {n: full(p.grad) for n, p in model.named_parameters() if p.grad is not None}
    missing = sorted(set(ref_grads) ^ set(got))
    report_("grad_names_differ", missing)
    worst = max(rel_diff(got[n], ref_grads[n]) for n in ref_grads)
    report_("grad_rel_err", max_over_ranks(worst))
    report_("expert_grad_norm_ratio", expert_norm(got) / expert_norm(ref_grads))
    ref_norm = float(torch.nn.utils.clip_grad_norm_(ref.parameters(), 1e9))
    report_("grad_norm_rel_err", abs(clip_grad_norm(model.parameters(), 0.0) - ref_norm) / ref_norm)

    # 10 SGD steps with the bias update; losses and parameters
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.05)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    opt_ref.zero_grad()
    opt.zero_grad()
    for m in list(ref.moe_blocks()) + list(model.moe_blocks()):
        m.tokens_per_expert.zero_()
    loss_err = 0.0
    for step in range(1, STEPS + 1):
        x, y = batch(step, cfg.vocab_size)
        lr_ = ref(x, labels=y).loss
        lr_.backward()
        out = model(x[sl], labels=y[sl])
        (out.loss * (n_local / n_global)).backward()
        loss = float(all_reduce_sum((out.loss.detach() * (n_local / n_global)).reshape(1)))
        loss_err = max(loss_err, abs(loss - float(lr_)))
        clip_grad_norm(model.parameters(), 1.0)
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
        opt_ref.step()
        opt.step()
        opt_ref.zero_grad()
        opt.zero_grad()
        update_expert_bias(ref)
        all_reduce_expert_counts(model)
        update_expert_bias(model)
    report_("loss_abs_err", max_over_ranks(loss_err))
    ref_params = dict(ref.named_parameters())
    perr = max(float((full(p.detach()) - ref_params[n].detach()).abs().max())
               for n, p in model.named_parameters())
    report_("param_abs_err", max_over_ranks(perr))
    biases = [b for b in (m.gate.e_score_correction_bias for m in model.moe_blocks()) if b is not None]
    ref_b = [b for b in (m.gate.e_score_correction_bias for m in ref.moe_blocks()) if b is not None]
    stacked = torch.stack(biases) if biases else torch.zeros(1)
    gathered = [torch.empty_like(stacked) for _ in range(W)]
    dist.all_gather(gathered, stacked)
    report_("bias_same_on_all_ranks", all(torch.equal(g, gathered[0]) for g in gathered))
    report_("bias_abs_err_vs_single", float((stacked - torch.stack(ref_b)).abs().max()) if ref_b else 0.0)
    report_("bias_moved", float(stacked.abs().max()))


if __name__ == "__main__":
    main()
