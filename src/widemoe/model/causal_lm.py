"""The causal LM: a decoder body chosen per family, the LM head, the losses (LM, MTP, weighted aux), and
`build_model`.

Bodies: `widemoe.model.transformer.WideMoeModel` (every standard family) and
`widemoe.model.deepseek_v4.V4Model` (hyper-connections, compressed attention), chosen by ``model_type``
in `BODIES`. Both return ``(h, routing, rope_context, mask)`` and offer ``final_norm(h)``, ``new_cache()``
and MTP modules with the same call signature, so the head, the losses and `generate` are shared. A new
family with its own body adds one entry to `BODIES`.

Multi-Token Prediction loss as DeepSeek-V3 (arXiv:2412.19437 §2.2): depth d at position i embeds
t_{i+d} and predicts t_{i+d+1}; `h^0` is the main model's last hidden state *before* the final norm.

Shape legend: B batch, T tokens in this call, S keys (cached + T), D hidden, V vocab.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from widemoe.cache import KVCache
from widemoe.config import ModelConfig
from widemoe.model.deepseek_v4 import V4Model
from widemoe.model.layers import linear
from widemoe.model.loss import IGNORE_INDEX, linear_cross_entropy
from widemoe.model.moe import MoE, RoutingInfo
from widemoe.model.transformer import WideMoeModel

# model_type -> body; every other family uses WideMoeModel
BODIES: dict[str, Callable[[ModelConfig], nn.Module]] = {"deepseek_v4": V4Model}


def build_body(config: ModelConfig) -> nn.Module:
    """The decoder body for `config` (see `BODIES`)."""
    return BODIES.get(config.model_type, WideMoeModel)(config)


AUX_LOSS_COEF_FIELDS = {
    "seq_aux": "aux_loss_alpha",
    "switch_aux": "router_aux_loss_coef",
    "z_loss": "router_z_loss_coef",
    "index_kl": "index_loss_coef",
}


@dataclass
class CausalLMOutput:
    logits: torch.Tensor | None  # [B, T, V] (or the last `logits_to_keep` positions); None: fused loss
    loss: torch.Tensor | None = None  # lm_loss + weighted aux losses + weighted MTP loss
    lm_loss: torch.Tensor | None = None
    mtp_loss: torch.Tensor | None = None  # mean over MTP depths, unweighted
    aux_losses: dict[str, torch.Tensor] = field(default_factory=dict)  # unweighted, mean over MoE layers
    routing: list[RoutingInfo] = field(default_factory=list)  # main layers, then MTP blocks
    hidden_states: torch.Tensor | None = None  # last hidden state before the final norm
    token_losses: torch.Tensor | None = None  # [B, T] fp32, detached, 0 at ignored labels (with labels)


class WideMoeForCausalLM(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = build_body(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.reset_parameters()

    # --- construction ----------------------------------------------------------------------------
    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Normal(0, initializer_range) for matrices and embeddings, ones for norms, zero bias buffers."""
        std = self.config.initializer_range
        for name, p in self.named_parameters():
            if p.is_meta:
                continue
            if p.dim() == 1:
                if name.endswith("bias"):
                    p.zero_()
                else:
                    p.fill_(1.0)  # RMSNorm weights
            else:
                p.normal_(0.0, std)
        for name, buf in self.named_buffers():
            # Balancing state starts neutral: zero selection bias, zero load counts.
            if not buf.is_meta and name.rsplit(".", 1)[-1] in (
                "e_score_correction_bias",
                "tokens_per_expert",
            ):
                buf.zero_()
        extra = getattr(self.model, "reset_extra_parameters", None)
        if extra is not None:
            extra()

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def moe_blocks(self) -> list[MoE]:
        return [m for m in self.modules() if isinstance(m, MoE)]

    def new_cache(self) -> KVCache:
        return self.model.new_cache()

    # --- forward ---------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
        logits_to_keep: int = 0,
        return_logits: bool | None = None,
    ) -> CausalLMOutput:
        """`labels[b, i]` is the token after `input_ids[b, i]` (already shifted); IGNORE_INDEX skips it.

        With labels, while training (train mode, grad enabled) the LM head and the loss run fused and
        chunked (`widemoe.model.loss`): `logits` is None and `token_losses` holds the per-token losses.
        ``return_logits=True`` forces the plain head (logits kept); False forces the fused loss.
        """
        h, routing, (cos, sin), mask = self.model(input_ids, attention_mask, position_ids, cache)
        hidden = self.model.final_norm(h)
        if logits_to_keep > 0:
            hidden = hidden[:, -logits_to_keep:]
        fused = labels is not None and logits_to_keep == 0 and (
            return_logits is False or (return_logits is None and self.training and torch.is_grad_enabled()))
        logits = None if fused else linear(self.lm_head, hidden)  # bf16 inference: see layers.linear
        out = CausalLMOutput(logits=logits, routing=routing, hidden_states=h)
        if labels is None:
            return out

        cfg = self.config
        if fused:
            out.lm_loss, tok = linear_cross_entropy(hidden.flatten(0, 1), self.lm_head.weight,
                                                    labels.flatten())
            out.token_losses = tok.view(labels.shape)
        else:
            tok = F.cross_entropy(out.logits.float().flatten(0, 1), labels.flatten(),
                                  ignore_index=IGNORE_INDEX, reduction="none")
            out.token_losses = tok.detach().view(labels.shape)
            n_valid = (labels != IGNORE_INDEX).sum()
            out.lm_loss = tok.sum() / n_valid  # = the mean reduction (nan when every label is ignored)
        loss = out.lm_loss
        if len(self.model.mtp) > 0 and cfg.mtp_loss_weight > 0:
            out.mtp_loss = self._mtp_loss(h, labels, cos, sin, mask, routing)
            loss = loss + cfg.mtp_loss_weight * out.mtp_loss
        out.aux_losses = self._collect_aux(routing)
        for name, value in out.aux_losses.items():
            loss = loss + getattr(cfg, AUX_LOSS_COEF_FIELDS[name]) * value
        out.loss = loss
        return out

    def _mtp_loss(
        self,
        h_BTD: torch.Tensor,
        labels_BT: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask_BTS: torch.Tensor,
        routing: list[RoutingInfo],
    ) -> torch.Tensor:
        """Depth d (1-based) at position i embeds t_{i+d} = labels[i+d-1] and predicts labels[i+d]."""
        B, T = labels_BT.shape
        losses = []
        h_prev = h_BTD
        for k, module in enumerate(self.model.mtp):
            d = k + 1
            pad = labels_BT.new_full((B, d), IGNORE_INDEX)
            shifted = torch.cat([labels_BT[:, d - 1 :], pad[:, : d - 1]], dim=1)  # t_{i+d}
            target = torch.cat([labels_BT[:, d:], pad], dim=1)[:, :T]  # t_{i+d+1}
            emb_ids = shifted.clamp(min=0)  # ignored positions embed token 0; their targets are ignored
            target = target.masked_fill(shifted == IGNORE_INDEX, IGNORE_INDEX)
            h_prev, info = module(h_prev, self.model.embed_tokens(emb_ids), cos, sin, mask_BTS, emb_ids)
            if info is not None:
                routing.append(info)
            hidden = module.shared_head_norm(h_prev).flatten(0, 1)
            if self.training and torch.is_grad_enabled():
                losses.append(linear_cross_entropy(hidden, self.lm_head.weight, target.flatten())[0])
            else:
                losses.append(F.cross_entropy(self.lm_head(hidden).float(), target.flatten(),
                                              ignore_index=IGNORE_INDEX))
        return torch.stack(losses).mean()

    @staticmethod
    def _collect_aux(routing: list[RoutingInfo]) -> dict[str, torch.Tensor]:
        sums: dict[str, list[torch.Tensor]] = {}
        for info in routing:
            for name, value in info.aux.items():
                sums.setdefault(name, []).append(value)
        return {name: torch.stack(vals).mean() for name, vals in sums.items()}


def build_model(
    config: ModelConfig,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    seed: int | None = None,
) -> WideMoeForCausalLM:
    """Build and initialise a model; `device="meta"` allocates nothing (for counting and loading)."""
    if seed is not None:
        torch.manual_seed(seed)
    with torch.device(device) if device is not None else contextlib.nullcontext():
        model = WideMoeForCausalLM(config)
    if dtype is not None:
        model = model.to(dtype)
    return model


__all__ = ["BODIES", "CausalLMOutput", "IGNORE_INDEX", "WideMoeForCausalLM", "build_body", "build_model"]
