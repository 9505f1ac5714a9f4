"""Routing statistics and balancing losses: expert counts, MaxVio, dead experts and the auxiliary losses.

- Losses (returned unweighted; the model adds them with its config coefficients):
  `seq_aux_loss` (DeepSeek-V3 sequence-wise balance loss), `switch_aux_loss` (Switch Transformer / HF
  `load_balancing_loss_func`, normalised so that perfect balance gives 1), `router_z_loss` (ST-MoE / OLMoE).
- Metrics: `max_vio` (paper-LF §4.1: max_i c_i / mean(c) - 1), `dead_experts`, and `LoadTracker`, which
  sums counts over many (eval) batches for MaxVio_global.

The aux-loss-free bias update, a training concern, is `widemoe.train.bias_update.update_expert_bias`.
Reference: shared/reference/architecture.md section (b).
Shapes: B sequences, T tokens per sequence, N = B·T, E experts, K experts per token.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

# --------------------------------------------------------------------------------------------------
# Metrics


def max_vio(counts_E: torch.Tensor) -> float:
    """MaxVio = max(c) / mean(c) - 1 (0 for perfect balance; 0 when nothing was routed)."""
    c = counts_E.detach().double()
    mean = c.mean()
    if mean <= 0:
        return 0.0
    return float(c.max() / mean - 1)


def dead_experts(counts_E: torch.Tensor) -> int:
    """Number of experts that received no token."""
    return int((counts_E.detach() == 0).sum())


class LoadTracker:
    """Sums per-layer expert counts across batches (e.g. a whole validation set) for MaxVio_global.

    Feed it the `RoutingInfo` list of each forward (`model(...).routing`) or raw (layer, counts) pairs.
    """

    def __init__(self) -> None:
        self.counts: dict[int, torch.Tensor] = {}

    def update(self, routing: Iterable) -> None:  # Iterable[RoutingInfo]
        for info in routing:
            self.add(info.layer_idx, info.counts)

    def add(self, layer_idx: int, counts_E: torch.Tensor) -> None:
        c = counts_E.detach().to(torch.float64).cpu()
        if layer_idx in self.counts:
            self.counts[layer_idx] += c
        else:
            self.counts[layer_idx] = c.clone()

    def reset(self) -> None:
        self.counts.clear()

    def max_vio(self) -> dict[int, float]:
        return {i: max_vio(c) for i, c in sorted(self.counts.items())}

    def dead_experts(self) -> dict[int, int]:
        return {i: dead_experts(c) for i, c in sorted(self.counts.items())}

    def summary(self) -> dict[str, float]:
        """Layer-averaged and worst-layer MaxVio_global, total dead experts."""
        v = self.max_vio()
        if not v:
            return {"max_vio_mean": 0.0, "max_vio_max": 0.0, "dead_experts": 0}
        return {"max_vio_mean": sum(v.values()) / len(v), "max_vio_max": max(v.values()),
                "dead_experts": sum(self.dead_experts().values())}


# --------------------------------------------------------------------------------------------------
# Auxiliary losses (unweighted)


def expert_counts(topk_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Assignments per expert, fp32, over all leading dims of `topk_ids [..., K]`."""
    return torch.bincount(topk_ids.reshape(-1), minlength=num_experts).float()


def seq_aux_loss(scores_BTE: torch.Tensor, topk_ids_BTK: torch.Tensor) -> torch.Tensor:
    """DeepSeek-V3 sequence-wise balance loss, averaged over sequences.

    Per sequence: f_i = E/(K·T) · #{t : i ∈ TopK_t}, P_i = mean_t s_{i,t} / Σ_j s_{j,t}; L = Σ_i f_i P_i.
    Perfect balance gives 1.
    """
    B, T, E = scores_BTE.shape
    K = topk_ids_BTK.shape[-1]
    counts_BE = torch.zeros(B, E, dtype=torch.float32, device=scores_BTE.device)
    counts_BE.scatter_add_(1, topk_ids_BTK.reshape(B, T * K),
                           torch.ones(B, T * K, dtype=torch.float32, device=scores_BTE.device))
    f_BE = counts_BE * (E / (K * T))
    p_BE = (scores_BTE / scores_BTE.sum(-1, keepdim=True)).mean(1)
    return (f_BE * p_BE).sum(-1).mean()


def switch_aux_loss(
    scores_NE: torch.Tensor, topk_ids_NK: torch.Tensor, normalize: bool = True
) -> torch.Tensor:
    """Switch-Transformer load-balancing loss E · Σ_i f_i P_i over all tokens.

    f_i = share of the N·K assignments that went to expert i; P_i = mean router probability (scores are
    renormalised per token when `normalize`, which makes sigmoid / sqrt-softplus scores a distribution).
    Perfect balance gives 1. HF's `load_balancing_loss_func` sums f over the K slots, i.e. returns K
    times this value.
    """
    N, E = scores_NE.shape
    K = topk_ids_NK.shape[-1]
    f_E = expert_counts(topk_ids_NK, E) / (N * K)
    p_NE = scores_NE / scores_NE.sum(-1, keepdim=True) if normalize else scores_NE
    return E * (f_E * p_NE.mean(0)).sum()


def router_z_loss(logits_NE: torch.Tensor) -> torch.Tensor:
    """ST-MoE router z-loss: mean over tokens of logsumexp(logits)^2."""
    return torch.logsumexp(logits_NE.float(), dim=-1).square().mean()


__all__ = ["LoadTracker", "dead_experts", "expert_counts", "max_vio", "router_z_loss", "seq_aux_loss",
           "switch_aux_loss"]
