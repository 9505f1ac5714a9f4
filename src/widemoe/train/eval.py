"""Held-out evaluation during training: the loss per domain, MaxVio over the whole held-out set (counts
summed over every batch before the ratio: MaxVio_global of Wang et al. 2024), dead experts, and the
domain x expert token counts that `widemoe.report` turns into routing-specialisation figures.

The model is in eval mode, so its MoE blocks do not add these forwards to the counts that drive the
bias update.
"""

from __future__ import annotations

from typing import Any

import torch

from widemoe.model.balance import LoadTracker
from widemoe.model.causal_lm import IGNORE_INDEX, WideMoeForCausalLM
from widemoe.train.parallel import RunContext
from widemoe.train.step import autocast_for

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # input_ids_BT, labels_BT, domain_ids_BT


@torch.no_grad()
def evaluate_heldout(
    model: WideMoeForCausalLM, heldout: dict[str, list[Batch]], bf16: bool, device: torch.device,
    ctx: RunContext | None = None,
) -> dict[str, Any]:
    """The fields of an `eval` record (all but kind, step and tokens) for the held-out batches per domain.
    On several ranks (`ctx`) each evaluates its rows of every batch and the sums are added over ranks."""
    ctx = ctx if ctx is not None else RunContext()
    model.eval()
    n_moe = len(model.config.moe_layer_indices)  # routing of the MTP blocks, after these, is left out
    tracker = LoadTracker()
    losses: dict[str, float] = {}
    domain_expert: dict[str, dict[str, list[float]]] = {}
    for domain, batches in heldout.items():
        total, count = 0.0, 0
        per_layer: dict[int, torch.Tensor] = {}
        for batch in batches:
            x, y, _ = (ctx.local_rows(t).to(device) for t in batch)
            with autocast_for(device, bf16):
                out = model(x, labels=y)
            n = int((y != IGNORE_INDEX).sum())
            total += float(out.lm_loss) * n
            count += n
            for info in out.routing[:n_moe]:
                per_layer[info.layer_idx] = per_layer.get(info.layer_idx, 0) + info.counts
        if ctx.distributed:
            total, count, per_layer = _sum_domain(ctx, total, count, per_layer)
        if count == 0:  # a mean over no tokens would read as a perfect loss of 0
            raise ValueError(f"held-out set of domain {domain!r} has no batches (or no labelled tokens)")
        for layer, counts in per_layer.items():
            tracker.add(layer, counts)
        losses[domain] = total / count
        domain_expert[domain] = {str(k): v.tolist() for k, v in per_layer.items()}
    mv = tracker.max_vio()
    return {
        "heldout_loss": losses,
        "heldout_max_vio": {str(k): v for k, v in mv.items()},
        "heldout_max_vio_mean": sum(mv.values()) / max(1, len(mv)),
        "heldout_dead_experts": {str(k): v for k, v in tracker.dead_experts().items()},
        "domain_expert_counts": domain_expert,
    }


def _sum_domain(ctx: RunContext, total: float, count: int, per_layer: dict[int, torch.Tensor],
                ) -> tuple[float, int, dict[int, torch.Tensor]]:
    """One domain's loss sum, token count and per-layer expert counts, summed over ranks (one all-reduce)."""
    layers = sorted(per_layer)
    flat = torch.cat([torch.tensor([total, float(count)], dtype=torch.float64),
                      *(per_layer[k].double().cpu().reshape(-1) for k in layers)])
    out = ctx.sum(flat)
    E = (len(out) - 2) // max(1, len(layers))
    summed = {k: out[2 + i * E:2 + (i + 1) * E].float() for i, k in enumerate(layers)}
    return float(out[0]), int(out[1]), summed


__all__ = ["evaluate_heldout"]
