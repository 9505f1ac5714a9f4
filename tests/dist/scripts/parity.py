"""FSDP2 + EP on W ranks against one process on the same global batch (fp32).

Usage: torchrun ... parity.py --eps 1,2 [--families v3,v4]
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
from dist_checks import finish, report

from widemoe.distributed.dims import ParallelDims
from widemoe.distributed.env import init_distributed
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
    ap.add_argument("--eps", default="1", help="EP degrees to check, one layout after the other")
    ap.add_argument("--families", default="v3,v4")
    args = ap.parse_args()
    env = init_distributed()
    for ep in map(int, args.eps.split(",")):
        layout = Layout.build(ParallelDims(env.world_size, ep), "cpu")
        for family in args.families.split(","):
            check_family(f"ep{ep}/{family}", family, layout, env.world_size, env.rank)
    finish()


def check_family(prefix: str, family: str, layout: Layout, W: int, rank: int) -> None:
    """The single-process reference runs on rank 0 only (the comparisons are made there: every rank
    gathers the full tensors, a collective, but only rank 0 reports)."""
    def report_(name: str, value: object) -> None:
        report(f"{prefix}/{name}", value)

    cfg = family_config(family)
    main = rank == 0
    ref = build_model(cfg, seed=0).train() if main else None
    model = parallelize(build_model(cfg, seed=0), layout).train()
    sl = slice(rank * B // W, (rank + 1) * B // W)
    scale = ((B // W) * T) / (B * T)  # n_local / n_global

    # step 0: gradients per tensor
    x, y = batch(0, cfg.vocab_size)
    (model(x[sl], labels=y[sl]).loss * scale).backward()
    got = {n: full(p.grad) for n, p in model.named_parameters() if p.grad is not None}
    norm = clip_grad_norm(model.parameters(), 0.0)
    if main:
        ref(x, labels=y).loss.backward()
        ref_grads = {n: p.grad for n, p in ref.named_parameters() if p.grad is not None}
        report_("grad_names_differ", sorted(set(ref_grads) ^ set(got)))
        # per tensor, relative to its max |g|; a tensor whose gradient is a near-cancellation (V4's
        # hc_scale of the MTP head: max |g| 7e-6 against 1e-1 elsewhere) is measured against 1e-3 of the
        # model's max |g|
        floor = 1e-3 * max(float(g.abs().max()) for g in ref_grads.values())
        errs = {n: float((got[n].double() - ref_grads[n].double()).abs().max())
                / max(float(ref_grads[n].abs().max()), floor) for n in ref_grads}
        worst = max(errs, key=errs.get)
        report_("grad_rel_err", errs[worst])
        report_("grad_worst_tensor", f"{worst} (max |g| {float(ref_grads[worst].abs().max()):.3g})")
        report_("expert_grad_norm_ratio", expert_norm(got) / expert_norm(ref_grads))
        ref_norm = float(torch.nn.utils.clip_grad_norm_(ref.parameters(), 1e9))
        report_("grad_norm_rel_err", abs(norm - ref_norm) / ref_norm)
    sgd_steps(prefix, cfg, ref, model, sl, scale, W)


def sgd_steps(prefix: str, cfg, ref, model, sl: slice, scale: float, W: int) -> None:  # noqa: ANN001
    """10 SGD steps with clipping and the bias update; losses, parameters and biases against `ref`."""
    opts = [torch.optim.SGD(m.parameters(), lr=0.05) for m in (ref, model) if m is not None]
    for o in opts:
        o.zero_grad()
    for m in (list(ref.moe_blocks()) if ref is not None else []) + list(model.moe_blocks()):
        m.tokens_per_expert.zero_()
    loss_err = 0.0
    for step in range(1, STEPS + 1):
        x, y = batch(step, cfg.vocab_size)
        out = model(x[sl], labels=y[sl])
        (out.loss * scale).backward()
        loss = float(all_reduce_sum((out.loss.detach() * scale).reshape(1)))
        clip_grad_norm(model.parameters(), 1.0)
        all_reduce_expert_counts(model)
        update_expert_bias(model)
        if ref is not None:
            ref_loss = ref(x, labels=y).loss
            ref_loss.backward()
            loss_err = max(loss_err, abs(loss - float(ref_loss)))
            torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
            update_expert_bias(ref)
        for o in opts:
            o.step()
            o.zero_grad()
    report(f"{prefix}/loss_abs_err", loss_err)
    params = {n: full(p.detach()) for n, p in model.named_parameters()}
    biases = [b for b in (m.gate.e_score_correction_bias for m in model.moe_blocks()) if b is not None]
    stacked = torch.stack(biases) if biases else torch.zeros(1)
    gathered = [torch.empty_like(stacked) for _ in range(W)]
    dist.all_gather(gathered, stacked)
    if ref is None:
        return
    perr = max(float((params[n] - p.detach()).abs().max()) for n, p in ref.named_parameters())
    report(f"{prefix}/param_abs_err", perr)
    ref_b = [b for b in (m.gate.e_score_correction_bias for m in ref.moe_blocks()) if b is not None]
    report(f"{prefix}/bias_same_on_all_ranks", all(torch.equal(g, gathered[0]) for g in gathered))
    b_err = float((stacked - torch.stack(ref_b)).abs().max()) if ref_b else 0.0
    report(f"{prefix}/bias_abs_err_vs_single", b_err)
    report(f"{prefix}/bias_moved", float(stacked.abs().max()))


if __name__ == "__main__":
    main()
