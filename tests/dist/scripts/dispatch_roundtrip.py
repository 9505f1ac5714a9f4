"""The all-to-all dispatcher on W ranks (EP = W) against one process, for several routings.

Per scenario (each rank holds `n` tokens of a global batch every rank builds from one seed):
- identity experts: the rows through dispatch -> routing weights -> combine come back as x·Σw (dyadic
  values, so every sum is exact), and the adjoint pairs give dx = gy·Σw and dw_k = <gy, x> exactly;
- SwiGLU experts (`RoutedExperts`, this rank's slice of the experts): output and the gradients of x, the
  routing weights and this rank's expert weights against the same experts on the whole batch in one
  process (`LocalDispatcher`), as max relative differences.
Scenarios: random routing; every token to rank 0's experts; only experts 0 and E-1 used; rank 1 has no
tokens.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from dist_checks import finish, max_over_ranks, rel_diff, report

from widemoe.config import ModelConfig
from widemoe.distributed.dispatcher import AllToAllDispatcher
from widemoe.distributed.env import init_distributed
from widemoe.model.dispatch import LocalDispatcher
from widemoe.model.experts import RoutedExperts

E, K, D, I, N_PER_RANK = 8, 2, 16, 8, 12


def routing(scenario: str, counts: list[int], El: int, g: torch.Generator) -> torch.Tensor:
    n = sum(counts)
    if scenario == "skewed":  # every pair to the experts of rank 0
        pick = torch.rand(n, El, generator=g).argsort(1)[:, :K]
    elif scenario == "sparse":  # experts 0 and E-1 only
        pick = torch.tensor([0, E - 1]).repeat(n, 1)
    else:
        pick = torch.rand(n, E, generator=g).argsort(1)[:, :K]
    return pick


def identity_round_trip(d: AllToAllDispatcher, x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor) -> float:
    """Largest error of y = x·Σw, dx = gy·Σw, dw = <gy, x> through the dispatcher's adjoint pairs."""
    plan = d.plan(ids)
    rows, counts = d.dispatch(x, plan)
    w_R = d.routing_weights(w, plan)
    acc = d.new_accumulator(x, plan).zero_()
    R = rows.num_rows
    d.combine_rows(acc, plan, 0, R, rows.take(0, R), w_R[:, None])
    y = d.combine_finish([acc], plan)
    gy = torch.ones_like(x) * 0.5
    gy_rows, _ = d.dispatch(gy, plan)  # the combine's adjoint
    dacc = d.new_accumulator(x, plan).zero_()
    d.combine_rows(dacc, plan, 0, R, gy_rows.take(0, R) * w_R[:, None], None)
    dx = d.combine_finish([dacc], plan)  # the dispatch's adjoint
    gw = d.weight_grads((gy_rows.take(0, R) * rows.take(0, R)).sum(-1), plan, w.shape)
    assert sum(counts) == R
    errs = [(y - x * w.sum(1, keepdim=True)).abs().max() if len(x) else torch.tensor(0.0),
            (dx - gy * w.sum(1, keepdim=True)).abs().max() if len(x) else torch.tensor(0.0),
            (gw - (gy * x).sum(-1, keepdim=True).expand_as(w)).abs().max() if len(x) else torch.tensor(0.0)]
    return max(float(e) for e in errs)


def main() -> None:
    env = init_distributed()
    rank, W = env.rank, env.world_size
    group = dist.new_group(list(range(W)))
    El = E // W
    cfg = ModelConfig(hidden_size=D, n_routed_experts=E, num_experts_per_tok=K, moe_intermediate_size=I,
                      num_attention_heads=2, n_group=1, topk_group=1)
    for scenario in ("random", "skewed", "sparse", "empty_rank"):
        counts = [N_PER_RANK] * W
        if scenario == "empty_rank":
            counts[1] = 0
        g = torch.Generator().manual_seed(7)
        x_all = torch.randint(-8, 8, (sum(counts), D), generator=g).float() / 8
        ids_all = routing(scenario, counts, El, g)
        w_all = torch.tensor([0.5, 0.25, 0.125, 0.0625])[torch.randint(0, 4, ids_all.shape, generator=g)]
        lo = sum(counts[:rank])
        sl = slice(lo, lo + counts[rank])
        x, ids, w = x_all[sl].clone(), ids_all[sl].clone(), w_all[sl].clone()
        d = AllToAllDispatcher(E, group, rank, W)
        report(f"{scenario}/identity_err", max_over_ranks(identity_round_trip(d, x, ids, w)))

        # SwiGLU experts: this rank's slice vs the whole batch in one process
        torch.manual_seed(0)
        ref = RoutedExperts(cfg)
        ref.impl = "loop"
        xr, wr = x_all.clone().requires_grad_(), w_all.clone().requires_grad_()
        y_ref, _ = ref(xr, ids_all, wr, None, LocalDispatcher(E))
        gy_all = torch.randn(y_ref.shape, generator=torch.Generator().manual_seed(3))
        y_ref.backward(gy_all)
        mine = RoutedExperts(cfg)
        mine.impl = "loop"
        es = slice(rank * El, (rank + 1) * El)
        with torch.no_grad():
            mine.gate_up_proj = torch.nn.Parameter(ref.gate_up_proj[es].detach().clone())
            mine.down_proj = torch.nn.Parameter(ref.down_proj[es].detach().clone())
        xm, wm = x.clone().requires_grad_(), w.clone().requires_grad_()
        y, _ = mine(xm, ids, wm, None, d)
        y.backward(gy_all[sl])
        errs = {
            "y": rel_diff(y, y_ref[sl]) if len(x) else 0.0,
            "dx": rel_diff(xm.grad, xr.grad[sl]) if len(x) else 0.0,
            "dw": rel_diff(wm.grad, wr.grad[sl]) if len(x) else 0.0,
            "dW1": rel_diff(mine.gate_up_proj.grad, ref.gate_up_proj.grad[es]),
            "dW2": rel_diff(mine.down_proj.grad, ref.down_proj.grad[es]),
        }
        for k, v in errs.items():
            report(f"{scenario}/{k}", max_over_ranks(v))
    report("bytes_sent_positive", d.stats.bytes_sent > 0)
    finish()


if __name__ == "__main__":
    main()
