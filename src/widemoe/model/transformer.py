"""The generic decoder body: embedding, decoder layers (attention + dense SwiGLU or MoE), final norm, MTP.

One body serves every standard family: what differs (MLA or GQA attention, router scoring, dense-layer
schedule, norms) comes from `ModelConfig`. The LM head, the losses and the choice of body per family
(DeepSeek-V4 has its own, `widemoe.model.deepseek_v4.V4Model`) are in `widemoe.model.causal_lm`; this
skeleton imports no family module. Parameter names follow transformers' in-memory DeepSeek-V3
names (see docs/internals.md) so checkpoint conversion is a thin mapping.

Multi-Token Prediction follows DeepSeek-V3 (arXiv:2412.19437 §2.2) as real checkpoints lay it out:
module k combines `enorm(embed(t_{i+k+1}))` and `hnorm(h^{k-1}_i)` (embedding first), projects 2D -> D
with `eh_proj`, runs one decoder block, and predicts `t_{i+k+2}` through `shared_head_norm` and the
shared LM head (the MTP loss is in `widemoe.model.causal_lm`). `h^0` is the main model's last hidden
state *before* the final norm.

Shape legend: B batch, T tokens in this call, S keys (cached + T), D hidden, V vocab.
"""

from __future__ import annotations

import torch
from torch import nn

from widemoe.cache import KVCache, LayerCache
from widemoe.config import ModelConfig
from widemoe.model.attention import build_attention
from widemoe.model.layers import RMSNorm, RotaryEmbedding, SwiGLU
from widemoe.model.moe import MoE, RoutingInfo


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
        if (T == 1 and past > 0 and attention_mask_BS is not None and attention_mask_BS.shape == (B, past + 1)
                and bool(attention_mask_BS.all())):
            # a decode step without padding: positions are the slots and one new token sees every key,
            # so the mask says nothing (dropping it saves a [B, 1, S] mask and its checks per layer)
            attention_mask_BS = None
        if position_ids_BT is None:
            position_ids_BT = self.positions(attention_mask_BS, B, T, past, device)
        # Plain causal attention (no padding, nothing cached) takes SDPA's is_causal fast path; without
        # padding, one new token after the cache sees every key: no mask either.
        plain = attention_mask_BS is None and (past == 0 or T == 1)
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


__all__ = ["DecoderLayer", "MTPModule", "WideMoeModel", "build_mask"]
