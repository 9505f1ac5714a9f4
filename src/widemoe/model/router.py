"""Token-choice top-k router for every supported MoE family.

One `Router` covers the routing math of DeepSeek-V3 / Kimi K2 (sigmoid, selection bias, group-limited
top-k with top-2-sum group scores), DeepSeek-V2 (softmax, greedy or group-limited greedy with max group
scores), DeepSeek-V4 (sqrt-softplus with a selection bias), Qwen3-MoE, Mixtral and OLMoE (softmax top-k,
optional renormalisation). References: shared/reference/architecture.md section (a); transformers 5.24
`DeepseekV3TopkRouter`, `DeepseekV2TopkRouter`, `Qwen3MoeTopKRouter`, `MixtralTopKRouter`,
`OlmoeTopKRouter`; DeepSeek-V3 `inference/model.py` `Gate`.

Numerics are a contract (docs/internals.md): logits, scores, the bias and the returned weights are fp32
even in a bf16 model, and `weight` / `e_score_correction_bias` stay fp32 through `model.to(bf16)`.
The bias only changes *which* experts are chosen; weights are gathered from the unbiased scores.
Dropped groups are masked with -inf, never 0, because biased selection scores can be negative.

Shapes: N tokens (flattened batch), D hidden, E routed experts, G groups, K experts per token.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from widemoe.config import ModelConfig
from widemoe.model.layers import KeepFp32


class RouterOutput(NamedTuple):
    logits: torch.Tensor  # [N, E] fp32
    scores: torch.Tensor  # [N, E] fp32, unbiased affinities (softmax probs / sigmoid / sqrt-softplus)
    topk_ids: torch.Tensor  # [N, K] int64, order within a row unspecified
    topk_weights: torch.Tensor  # [N, K] fp32, combine weights (renormalised and scaled)


def score(logits_NE: torch.Tensor, scoring_func: str) -> torch.Tensor:
    """Affinities from fp32 logits."""
    if scoring_func == "sigmoid":
        return logits_NE.sigmoid()
    if scoring_func == "softmax":
        return logits_NE.softmax(dim=-1, dtype=torch.float32)
    if scoring_func == "sqrtsoftplus":
        return F.softplus(logits_NE).sqrt()
    raise ValueError(f"scoring_func={scoring_func!r} is not supported")


def select_experts(
    sel_NE: torch.Tensor, k: int, topk_method: str, n_group: int, topk_group: int
) -> torch.Tensor:
    """Top-k expert ids from selection scores, optionally limited to the best `topk_group` groups.

    `noaux_tc` ranks groups by the sum of their two best selection scores (DeepSeek-V3),
    `group_limited_greedy` by their best score (DeepSeek-V2), `greedy` has no group stage.
    """
    N, E = sel_NE.shape
    if topk_method != "greedy" and n_group > 1:
        sel_NGe = sel_NE.view(N, n_group, E // n_group)
        if topk_method == "noaux_tc":
            group_NG = sel_NGe.topk(2, dim=-1).values.sum(dim=-1)
        else:  # group_limited_greedy
            group_NG = sel_NGe.amax(dim=-1)
        keep_idx = group_NG.topk(topk_group, dim=-1, sorted=False).indices
        keep_NG = torch.zeros_like(group_NG, dtype=torch.bool).scatter_(1, keep_idx, True)
        # -inf, not 0: s + b may be negative, and a 0 would then outrank every kept expert.
        sel_NE = sel_NGe.masked_fill(~keep_NG.unsqueeze(-1), float("-inf")).view(N, E)
    return sel_NE.topk(k, dim=-1, sorted=False).indices


class Router(KeepFp32, nn.Module):
    """Linear gate without bias + scoring + (group-limited) top-k + renormalisation + scaling.

    `select` picks the experts (override it for another rule, e.g. DeepSeek-V4's hash layers); scores,
    weights and the fp32 contract are shared by every family."""

    # `model.to(torch.bfloat16)` / `.half()`: the gate and the bias stay fp32 as the contract requires
    FP32_PARAMS = ("weight",)
    FP32_BUFFERS = ("e_score_correction_bias",)

    def __init__(self, config: ModelConfig, selection_bias: bool | None = None) -> None:
        super().__init__()
        self.num_experts = config.n_routed_experts
        self.top_k = config.num_experts_per_tok
        self.hidden_size = config.hidden_size
        self.scoring_func = config.scoring_func
        self.topk_method = config.topk_method
        self.n_group = config.n_group
        self.topk_group = config.topk_group
        self.norm_topk_prob = config.norm_topk_prob
        self.routed_scaling_factor = float(config.routed_scaling_factor)
        self.initializer_range = config.initializer_range
        self.weight = nn.Parameter(torch.empty(self.num_experts, self.hidden_size, dtype=torch.float32))
        if config.uses_selection_bias if selection_bias is None else selection_bias:
            # Persistent: it is the checkpoint's `mlp.gate.e_score_correction_bias`.
            bias = torch.zeros(self.num_experts, dtype=torch.float32)
            self.register_buffer("e_score_correction_bias", bias)
        else:
            self.e_score_correction_bias = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=self.initializer_range)
        if self.e_score_correction_bias is not None:
            self.e_score_correction_bias.zero_()

    def select(self, scores_NE: torch.Tensor, token_ids_N: torch.Tensor | None) -> torch.Tensor:
        """Expert ids [N, K] from detached scores: top-k of scores + bias (the bias picks, never weighs)."""
        del token_ids_N  # used by DeepSeek-V4 hash routing (fixed expert ids per token id)
        sel_NE = scores_NE
        if self.e_score_correction_bias is not None:
            sel_NE = sel_NE + self.e_score_correction_bias
        return select_experts(sel_NE, self.top_k, self.topk_method, self.n_group, self.topk_group)

    def forward(self, x_ND: torch.Tensor, token_ids_N: torch.Tensor | None = None) -> RouterOutput:
        logits_NE = F.linear(x_ND.float(), self.weight.float())
        scores_NE = score(logits_NE, self.scoring_func)
        with torch.no_grad():
            ids_NK = self.select(scores_NE.detach(), token_ids_N)
        w_NK = scores_NE.gather(1, ids_NK)  # unbiased scores: the bias never reaches the weights
        if self.norm_topk_prob:
            w_NK = w_NK / (w_NK.sum(dim=-1, keepdim=True) + 1e-20)
        if self.routed_scaling_factor != 1.0:
            w_NK = w_NK * self.routed_scaling_factor
        return RouterOutput(logits_NE, scores_NE, ids_NK, w_NK)

    def extra_repr(self) -> str:
        return (f"E={self.num_experts}, k={self.top_k}, scoring={self.scoring_func}, "
                f"method={self.topk_method}, "
                f"groups={self.topk_group}/{self.n_group}, norm={self.norm_topk_prob}, "
                f"scale={self.routed_scaling_factor}")


__all__ = ["Router", "RouterOutput", "score", "select_experts"]
