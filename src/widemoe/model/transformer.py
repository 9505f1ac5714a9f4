"""The decoder: embedding, decoder layers (attention + dense SwiGLU or MoE), final norm, LM head, MTP.

One model serves every family: what differs (MLA or GQA attention, router scoring, dense-layer
schedule, norms) comes from `ModelConfig`. Parameter names follow transformers' in-memory DeepSeek-V3
names (see docs/internals.md) so checkpoint conversion is a thin mapping.

Multi-Token Prediction follows DeepSeek-V3 (arXiv:2412.19437 §2.2) as real checkpoints lay it out:
module k combines `enorm(embed(t_{i+k+1}))` and `hnorm(h^{k-1}_i)` (embedding first), projects 2D -> D
with `eh_proj`, runs one decoder block, and predicts `t_{i+k+2}` through `shared_head_norm` and the
shared LM head. `h^0` is the main model's last hidden state *before* the final norm.

Shape legend: B batch, T tokens in this call, S keys (cached + T), D hidden, V vocab.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from widemoe.cache import KVCache, LayerCache
from widemoe.config import ModelConfig
from widemoe.model.attention import build_attention
from widemoe.model.deepseek_v4 import V4Model
from widemoe.model.layers import RMSNorm, RotaryEmbedding, SwiGLU
from widemoe.model.loss import IGNORE_INDEX, linear_cross_entropy
from widemoe.model.moe import MoE, RoutingInfo

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


class DecoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then x + ffn(norm(x)); the ffn is dense or MoE."""

    def __init__(self, config: ModelConfig, layer_idx: int, moe: bool | None = None):
        super().__init__()
        self.layer_idx = layer_idx
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = build_attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        use_moe = config.is_moe_layer(layer_idx) if moe is None else moe
        self.mlp: nn.Module = (
            MoE(config, layer_idx) if use_moe else SwiGLU(config.hidden_size, config.intermediate_size)
        )

    @property
    def is_moe(self) -> bool:
        return isinstance(self.mlp, MoE)

    def forward(
        self,
        x_BTD: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask_BTS: torch.Tensor | None,
        cache: LayerCache | None = None,
        token_ids_BT: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, RoutingInfo | None]:
        x_BTD = x_BTD + self.self_attn(self.input_layernorm(x_BTD), cos, sin, mask_BTS, cache)
        h = self.post_attention_layernorm(x_BTD)
        if self.is_moe:
            y, info = self.mlp(h, token_ids_BT)
            return x_BTD + y, info
        return x_BTD + self.mlp(h), None


class MTPModule(nn.Module):
    """One DeepSeek-V3 Multi-Token Prediction depth (embedding and head are the main model's)."""

    def __init__(self, config: ModelConfig, depth: int):
        super().__init__()
        D = config.hidden_size
        self.enorm = RMSNorm(D, config.rms_norm_eps)
        self.hnorm = RMSNorm(D, config.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * D, D, bias=False)
        has_moe = bool(config.moe_layer_indices)
        self.block = DecoderLayer(config, config.num_hidden_layers + depth, moe=has_moe)
        self.shared_head_norm = RMSNorm(D, config.rms_norm_eps)

    def forward(
        self,
        h_prev_BTD: torch.Tensor,
        emb_BTD: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask_BTS: torch.Tensor | None,
        token_ids_BT: torch.Tensor | None,
    ) -> tuple[torch.Tensor, RoutingInfo | None]:
        h = self.eh_proj(torch.cat([self.enorm(emb_BTD), self.hnorm(h_prev_BTD)], dim=-1))
        return self.block(h, cos, sin, mask_BTS, None, token_ids_BT)


def build_mask(
    attention_mask_BS: torch.Tensor | None, B: int, T: int, past: int, device: torch.device
) -> torch.Tensor:
    """Boolean [B, T, S] mask: query slot past+i may see key slot j iff j <= past+i and key j is valid.

    Slots (not position ids) decide causality, so left padding and chunked prefill both work.
    """
    S = past + T
    q_slot = torch.arange(past, S, device=device)
    k_slot = torch.arange(S, device=device)
    causal_TS = k_slot[None, :] <= q_slot[:, None]
    if attention_mask_BS is None:
        return causal_TS.expand(B, T, S)
    if attention_mask_BS.shape != (B, S):
        raise ValueError(
            f"attention_mask has shape {tuple(attention_mask_BS.shape)}; expected (batch={B}, "
            f"cached+new={S}) covering the cached and the new tokens"
        )
    return causal_TS[None] & attention_mask_BS.bool()[:, None, :]


class WideMoeModel(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)
        self.mtp = nn.ModuleList(MTPModule(config, k) for k in range(config.num_nextn_predict_layers))

    def positions(
        self, attention_mask_BS: torch.Tensor | None, B: int, T: int, past: int, device: torch.device
    ) -> torch.Tensor:
        if attention_mask_BS is None:
            return torch.arange(past, past + T, device=device).expand(B, T)
        # Left padding: a row's first real token gets position 0.
        pos_BS = attention_mask_BS.long().cumsum(-1) - 1
        return pos_BS[:, past:].clamp(min=0)

    def forward(
        self,
        input_ids_BT: torch.Tensor,
        attention_mask_BS: torch.Tensor | None = None,
        position_ids_BT: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> tuple[torch.Tensor, list[RoutingInfo], tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
        """Returns (h_pre_norm_BTD, routing, (cos, sin), mask_BTS); the mask is None for plain causal."""
        B, T = input_ids_BT.shape
        past = cache.seq_len if cache is not None else 0
        device = input_ids_BT.device
        if position_ids_BT is None:
            position_ids_BT = self.positions(attention_mask_BS, B, T, past, device)
        # Plain causal attention (no padding, nothing cached) takes SDPA's is_causal fast path.
        plain = attention_mask_BS is None and past == 0
        mask_BTS = None if plain else build_mask(attention_mask_BS, B, T, past, device)
        cos, sin = self.rotary_emb(position_ids_BT)
        x = self.embed_tokens(input_ids_BT)
        routing: list[RoutingInfo] = []
        for i, layer in enumerate(self.layers):
            x, info = layer(
                x, cos, sin, mask_BTS, cache.layer(i) if cache is not None else None, input_ids_BT
            )
            if info is not None:
                routing.append(info)
        if cache is not None:
            cache.advance(T)
        return x, routing, (cos, sin), mask_BTS

    def final_norm(self, h_BTD: torch.Tensor) -> torch.Tensor:
        return self.norm(h_BTD)

    def new_cache(self) -> KVCache:
        return KVCache(self.config.num_hidden_layers)


class WideMoeForCausalLM(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        # DeepSeek-V4 (hyper-connections, compressed attention) has its own model body with the same
        # interface (widemoe.model.deepseek_v4); the head, losses and generation are shared.
        self.model = V4Model(config) if config.is_v4 else WideMoeModel(config)
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
        out = CausalLMOutput(logits=None if fused else self.lm_head(hidden), routing=routing, hidden_states=h)
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


__all__ = [
    "CausalLMOutput",
    "DecoderLayer",
    "IGNORE_INDEX",
    "MTPModule",
    "WideMoeForCausalLM",
    "WideMoeModel",
    "build_mask",
    "build_model",
]
