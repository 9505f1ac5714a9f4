"""MoE block: router + routed experts + shared experts, with routing statistics and aux losses.

Follows DeepSeek-V3 (arXiv:2412.19437 §2.1; transformers 5.24 `DeepseekV3MoE`, torchtitan `MoE`):
y = Σ_k w_k · Expert_{e_k}(x) + SharedSwiGLU(x), the shared experts being one SwiGLU of width
n_shared_experts · moe_intermediate_size. The routed path is four steps, each in its own file:

    x_ND -> gate (router.py: fp32 scores, bias, top-k) -> dispatcher.plan / dispatch (dispatch.py: sort
         by expert, capacity, padding) -> grouped expert compute on (x_sorted, counts) (experts.py)
         -> dispatcher.combine (dispatch.py: fp32 weights, scatter-add) -> y_ND

`RoutedExperts.forward` runs steps 2-4 (fused per chunk on the CPU workers, see experts.py). The block
receives its parts (`MoEParts`: gate, experts, shared experts, dispatcher); `standard_parts` builds them
for the standard families, `widemoe.model.deepseek_v4.v4_moe_parts` for DeepSeek-V4. The block also

- counts, in training mode only and outside autograd, the tokens each expert received into the
  non-persistent fp32 buffer `tokens_per_expert` (summed over micro-batches until
  `widemoe.train.bias_update.update_expert_bias` consumes and zeroes it; torchtitan keeps the same buffer);
- computes the enabled auxiliary losses (`widemoe.model.balance`), unweighted, into `RoutingInfo.aux`:
  `seq_aux` (aux_loss_alpha > 0), `switch_aux` (router_aux_loss_coef > 0), `z_loss` (router_z_loss_coef > 0);
- applies the optional Switch/GShard capacity in training only (eval never drops).

Shapes: B batch, T tokens, D hidden, E routed experts, K experts per token, N = B·T.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import nn

from widemoe.config import ModelConfig
from widemoe.model.balance import expert_counts, router_z_loss, seq_aux_loss, switch_aux_loss
from widemoe.model.dispatch import LocalDispatcher, TokenDispatcher, capacity_for
from widemoe.model.experts import RoutedExperts
from widemoe.model.layers import KeepFp32, SwiGLU
from widemoe.model.router import Router


@dataclass
class RoutingInfo:
    layer_idx: int
    topk_ids: torch.Tensor  # [N, K] int64
    topk_weights: torch.Tensor  # [N, K] fp32
    counts: torch.Tensor  # [E] fp32, assignments of this forward (before any capacity drop)
    aux: dict[str, torch.Tensor] = field(default_factory=dict)  # unweighted scalar losses
    dropped_fraction: float = 0.0  # share of the N·K pairs dropped by the capacity limit


class MoEParts(NamedTuple):
    """What a MoE block is made of (`standard_parts` for the standard families; DeepSeek-V4 has its own)."""

    gate: nn.Module  # x_ND, token_ids_N -> RouterOutput
    experts: RoutedExperts  # stacked weights; runs dispatch -> grouped compute -> combine
    shared_experts: nn.Module | None  # dense SwiGLU over every token, or None
    dispatcher: TokenDispatcher  # moves rows between token order and expert order


def shared_swiglu(config: ModelConfig) -> SwiGLU | None:
    """The shared experts: one SwiGLU of width n_shared_experts · moe_intermediate_size (with V4's clamp
    when the config has one), or None."""
    width = config.n_shared_experts * config.moe_intermediate_size
    return SwiGLU(config.hidden_size, width, config.swiglu_limit) if width > 0 else None


def standard_parts(config: ModelConfig) -> MoEParts:
    """`Router`, `RoutedExperts`, the shared SwiGLU and the local dispatcher."""
    return MoEParts(Router(config), RoutedExperts(config), shared_swiglu(config),
                    LocalDispatcher(config.n_routed_experts))


class MoE(KeepFp32, nn.Module):
    """Route -> dispatch -> grouped expert compute -> combine, plus the shared experts. The block receives
    its parts (`MoEParts`; default: `standard_parts(config)`)."""

    FP32_BUFFERS = ("tokens_per_expert",)  # counts stay exact through .to(bf16)

    def __init__(self, config: ModelConfig, layer_idx: int, parts: MoEParts | None = None) -> None:
        super().__init__()
        parts = parts if parts is not None else standard_parts(config)
        self.config = config
        self.layer_idx = layer_idx
        self.num_experts = config.n_routed_experts
        self.top_k = config.num_experts_per_tok
        self.gate = parts.gate
        self.experts = parts.experts
        self.shared_experts = parts.shared_experts
        self.dispatcher = parts.dispatcher
        self.register_buffer("tokens_per_expert", torch.zeros(self.num_experts, dtype=torch.float32),
                             persistent=False)

    def forward(
        self, x_BTD: torch.Tensor, token_ids_BT: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, RoutingInfo]:
        B, T, D = x_BTD.shape
        x_ND = x_BTD.reshape(B * T, D)
        token_ids_N = None if token_ids_BT is None else token_ids_BT.reshape(-1)
        r = self.gate(x_ND, token_ids_N)  # 1. route (fp32 scores, top-k)

        capacity = None
        if self.training and self.config.capacity_factor is not None:
            capacity = capacity_for(self.config.capacity_factor, B * T, self.top_k, self.num_experts)
        # 2-4. dispatch -> grouped expert compute -> combine (fp32), see RoutedExperts.forward
        y_ND, dropped = self.experts(x_ND, r.topk_ids, r.topk_weights, capacity, self.dispatcher)
        if self.shared_experts is not None:
            y_ND = y_ND + self.shared_experts(x_ND)

        with torch.no_grad():
            counts_E = expert_counts(r.topk_ids, self.num_experts)
            if self.training:
                self.tokens_per_expert += counts_E
        info = RoutingInfo(
            layer_idx=self.layer_idx,
            topk_ids=r.topk_ids,
            topk_weights=r.topk_weights,
            counts=counts_E,
            aux=self._aux_losses(r.logits, r.scores, r.topk_ids, B, T),
            dropped_fraction=dropped / max(1, r.topk_ids.numel()),
        )
        return y_ND.view(B, T, D).to(x_BTD.dtype), info

    def _aux_losses(self, logits_NE: torch.Tensor, scores_NE: torch.Tensor, ids_NK: torch.Tensor,
                    B: int, T: int) -> dict[str, torch.Tensor]:
        c = self.config
        aux: dict[str, torch.Tensor] = {}
        if c.aux_loss_alpha > 0:
            aux["seq_aux"] = seq_aux_loss(scores_NE.view(B, T, -1), ids_NK.view(B, T, -1))
        if c.router_aux_loss_coef > 0:
            aux["switch_aux"] = switch_aux_loss(scores_NE, ids_NK, normalize=c.scoring_func != "softmax")
        if c.router_z_loss_coef > 0:
            aux["z_loss"] = router_z_loss(logits_NE)
        return aux


__all__ = ["MoE", "MoEParts", "RoutingInfo", "shared_swiglu", "standard_parts"]
