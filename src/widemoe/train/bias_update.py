"""Aux-loss-free load balancing: the per-step update of the routers' selection bias.

The rule of Wang et al. 2024 (arXiv:2408.15664, Algorithm 1) as used by DeepSeek-V3 (arXiv:2412.19437
§2.1.2): after each optimizer step, b_i += u · sign(mean(c) - c_i) from the expert counts summed over every
micro-batch since the last update (`MoE.tokens_per_expert`). Unlike torchtitan we do not re-centre the
update (that departs from the paper). The bias only enters top-k selection.
Reference: shared/reference/architecture.md section (b).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from widemoe.model.balance import dead_experts, max_vio
from widemoe.model.moe import MoE


@torch.no_grad()
def update_expert_bias(
    model: nn.Module,
    speed: float | None = None,
    all_reduce: Callable[[torch.Tensor], None] | None = None,
) -> dict[int, dict[str, float]]:
    """Apply b += speed · sign(mean(c) - c) to every MoE block that has a selection bias; zero its counts.

    Call once per optimizer step, after all gradient-accumulation micro-batches. `speed=None` uses each
    block's `config.bias_update_speed`. Under data parallelism pass `all_reduce` (an in-place SUM over the
    data-parallel group) so that every rank applies the same update from the global counts.
    Returns `{layer_idx: {"max_vio": ..., "dead_experts": ...}}` for the counts that were used.
    Blocks with no counts (nothing routed since the last call) are left unchanged.
    """
    stats: dict[int, dict[str, float]] = {}
    for module in model.modules():
        if not isinstance(module, MoE):
            continue
        c = module.tokens_per_expert
        if all_reduce is not None:
            all_reduce(c)
        stats[module.layer_idx] = {"max_vio": max_vio(c), "dead_experts": dead_experts(c)}
        bias = module.gate.e_score_correction_bias
        if bias is not None and float(c.sum()) > 0:
            u = module.config.bias_update_speed if speed is None else speed
            bias.add_(u * torch.sign(c.mean() - c).to(bias.dtype))
        c.zero_()
    return stats


__all__ = ["update_expert_bias"]
