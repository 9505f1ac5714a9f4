"""Attention: Multi-head Latent Attention (MLA, DeepSeek-V2/V3, Kimi K2) and grouped-query attention
(GQA, Qwen3-MoE / Mixtral / OLMoE) with optional qk-norm and bias.

References: DeepSeek-V2 paper (arXiv:2405.04434) section 2.1 and DeepSeek-V3 ``inference/model.py``
(``MLA``, naive and absorbed forms); transformers 5.24 ``DeepseekV3Attention``, ``Qwen3MoeAttention``,
``OlmoeAttention`` (parity references, parameter names as docs/internals.md).

Both modules share ``forward(x_BTD, cos, sin, mask_BTS, cache) -> y_BTD``; mask_BTS is bool
``[B, T, S]``, True = may attend, S = cached + T (or T without a cache). None means causal.

MLA has two forms with equal outputs (tested):
- naive (no cache; training): expand per-head keys/values from the latent through ``kv_b_proj``.
- absorbed (with a cache; decoding): ``kv_b_proj`` viewed ``[H, nope+v, r]`` is split into W_UK and
  W_UV. q_nope is absorbed into W_UK, so scores are taken against the cached normalised latent c_kv
  ``[B, S, r]`` plus q_pe against the cached rotated k_pe ``[B, S, rope]``; the attention output is a
  latent ``[B, T, H, r]`` mapped by W_UV, then o_proj. Keys and values are one shared "head"
  (MQA over ``r + rope`` channels), so the cache holds ``r + rope`` values per token per layer.
  The two are stored as one ``"latent"`` entry ``[c_kv ; k_pe]``: the scores need them concatenated,
  so no per-step concatenation of the history is needed; the same tensor serves as the values and
  the k_pe channels of the output are dropped. With one shared head, attention is two batched GEMMs
  over ``[B, T·H, r + rope]`` query rows in fp32 (`MLAttention._absorbed`), not SDPA.

Numerics: attention math runs in the input dtype through ``F.scaled_dot_product_attention`` with
the boolean mask (softmax accumulates in fp32 inside SDPA). A query row with no allowed key (a
padding position under left padding) would be a 0/0 softmax: such rows are allowed to attend to their
own position instead, so they produce finite values (which callers ignore) and never NaN.
The fused SDPA kernels (flash on CPU and GPU) need equal q/k/v widths; when they differ (naive MLA:
nope+rope vs v) the narrower side is zero-padded, which is exact, instead of falling back to the
math kernel that materialises the [B, H, T, S] scores.

MLA's internal norms (q_a_layernorm, kv_a_layernorm) use eps 1e-6 regardless of ``rms_norm_eps``, as
both DeepSeek's reference and transformers do.

Shapes: B batch, T new tokens, S key positions, D hidden, H query heads, K kv heads (GQA), G = H/K,
d head channels, r kv_lora_rank.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from widemoe.cache import LayerCache
from widemoe.config import ConfigError, ModelConfig
from widemoe.model.layers import RMSNorm, apply_rope, linear, rope_score_factor, softmax_scale, upcast_gemm

_MLA_NORM_EPS = 1e-6
# Up to this many new tokens, query heads sharing one kv head are folded into the query-length dim
# (one SDPA over [B, K, G*T, d]; fastest for decoding). Above it the mask copy that folding needs
# grows with T*S, so SDPA broadcasts the shared keys instead.
_FOLD_MAX_T = 16


def causal_mask(B: int, T: int, S: int, device: torch.device | None = None) -> torch.Tensor:
    """Bool ``[B, T, S]``: query t (at absolute position S-T+t) may attend keys 0..S-T+t."""
    q_pos = torch.arange(S - T, S, device=device)
    k_pos = torch.arange(S, device=device)
    return (k_pos[None, :] <= q_pos[:, None]).expand(B, T, S)


def _guard_empty_rows(mask_BTS: torch.Tensor) -> torch.Tensor:
    """Let rows with no allowed key attend to their own position (S-T+t), so softmax is never 0/0."""
    B, T, S = mask_BTS.shape
    empty_BT1 = ~mask_BTS.any(dim=-1, keepdim=True)
    dev = mask_BTS.device
    own_TS = torch.arange(S, device=dev)[None, :] == torch.arange(S - T, S, device=dev)[:, None]
    return mask_BTS | (empty_BT1 & own_TS)


def _check_mask(mask_BTS: torch.Tensor, B: int, T: int, S: int) -> torch.Tensor:
    if mask_BTS.shape != (B, T, S) or mask_BTS.dtype != torch.bool:
        raise ValueError(f"attend: mask_BTS must be bool [B={B}, T={T}, S={S}], got {mask_BTS.dtype} "
                         f"{tuple(mask_BTS.shape)}")
    return mask_BTS


def attend(q_BTHd: torch.Tensor, k_BSKd: torch.Tensor, v_BSKe: torch.Tensor, mask_BTS: torch.Tensor | None,
           scale: float) -> torch.Tensor:
    """Scaled dot-product attention with K <= H shared kv heads (head h uses kv head h // (H/K)).

    Returns ``[B, T, H, e]``. k/v may be views (e.g. into a cache buffer) and are not copied.
    """
    e_out = v_BSKe.shape[-1]
    if e_out != q_BTHd.shape[-1]:
        # fused SDPA kernels need equal widths (see the module docstring); zero channels are exact
        w = max(e_out, q_BTHd.shape[-1])
        q_BTHd, k_BSKd = F.pad(q_BTHd, (0, w - q_BTHd.shape[-1])), F.pad(k_BSKd, (0, w - k_BSKd.shape[-1]))
        v_BSKe = F.pad(v_BSKe, (0, w - e_out))
        return attend(q_BTHd, k_BSKd, v_BSKe, mask_BTS, scale)[..., :e_out]
    B, T, H, d = q_BTHd.shape
    S, K, e = k_BSKd.shape[1], k_BSKd.shape[2], v_BSKe.shape[-1]
    if H % K:
        raise ValueError(f"attend: {H} query heads are not a multiple of {K} kv heads")
    G = H // K
    if mask_BTS is None:
        if T == S:  # plain causal self-attention (training): let SDPA pick its causal kernel
            if G == 1:
                o = F.scaled_dot_product_attention(q_BTHd.transpose(1, 2), k_BSKd.transpose(1, 2),
                                                   v_BSKe.transpose(1, 2), is_causal=True, scale=scale)
            else:
                o = F.scaled_dot_product_attention(q_BTHd.transpose(1, 2), k_BSKd.transpose(1, 2),
                                                   v_BSKe.transpose(1, 2), is_causal=True, scale=scale,
                                                   enable_gqa=True)
            return o.transpose(1, 2)
        if T > 1:  # else one new token after the cache: it sees every key, no mask at all
            mask_BTS = causal_mask(B, T, S, q_BTHd.device)
    if mask_BTS is not None:
        mask_BTS = _guard_empty_rows(_check_mask(mask_BTS, B, T, S))
    k_BKSd, v_BKSe = k_BSKd.transpose(1, 2), v_BSKe.transpose(1, 2)

    if G > 1 and T <= _FOLD_MAX_T:
        # rows (g, t) of kv head k: the G query heads that share it, folded into the query-length dim
        q_BKMd = q_BTHd.reshape(B, T, K, G, d).permute(0, 2, 3, 1, 4).reshape(B, K, G * T, d)
        m_B1MS = None if mask_BTS is None else mask_BTS[:, None, None].expand(B, 1, G, T, S).reshape(
            B, 1, G * T, S)
        o_BKMe = F.scaled_dot_product_attention(q_BKMd, k_BKSd, v_BKSe, attn_mask=m_B1MS, scale=scale)
        return o_BKMe.view(B, K, G, T, e).permute(0, 3, 1, 2, 4).reshape(B, T, H, e)

    q_BHTd, m_B1TS = q_BTHd.transpose(1, 2), None if mask_BTS is None else mask_BTS[:, None]
    if G == 1:
        o = F.scaled_dot_product_attention(q_BHTd, k_BKSd, v_BKSe, attn_mask=m_B1TS, scale=scale)
    elif K == 1:  # MQA (absorbed MLA): a stride-0 expand, no copy of the shared key/value
        o = F.scaled_dot_product_attention(q_BHTd, k_BKSd.expand(B, H, S, d), v_BKSe.expand(B, H, S, e),
                                           attn_mask=m_B1TS, scale=scale)
    else:
        o = F.scaled_dot_product_attention(q_BHTd, k_BKSd, v_BKSe, attn_mask=m_B1TS, scale=scale,
                                           enable_gqa=True)
    return o.transpose(1, 2)


class MLAttention(nn.Module):
    """Multi-head Latent Attention; naive form without a cache, absorbed form with one."""

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        if not config.is_mla:
            raise ConfigError("MLAttention needs kv_lora_rank set (kv_lora_rank=None selects GQA attention)")
        if config.qk_norm != "none":
            raise ConfigError(f"qk_norm={config.qk_norm!r} is not supported with MLA (kv_lora_rank is set); "
                              "the rule is qk_norm='none' for MLA")
        self.layer_idx = layer_idx
        D, H = config.hidden_size, config.num_attention_heads
        self.num_heads = H
        self.nope, self.rope, self.v_dim = config.qk_nope_head_dim, config.qk_rope_head_dim, config.v_head_dim
        self.kv_lora_rank = r = config.kv_lora_rank
        self.q_lora_rank = config.q_lora_rank
        self.qk_dim = self.nope + self.rope
        bias = config.attention_bias
        if config.q_lora_rank is None:
            self.q_proj = nn.Linear(D, H * self.qk_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(D, config.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(config.q_lora_rank, eps=_MLA_NORM_EPS)
            self.q_b_proj = nn.Linear(config.q_lora_rank, H * self.qk_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(D, r + self.rope, bias=bias)
        self.kv_a_layernorm = RMSNorm(r, eps=_MLA_NORM_EPS)
        self.kv_b_proj = nn.Linear(r, H * (self.nope + self.v_dim), bias=False)
        self.o_proj = nn.Linear(H * self.v_dim, D, bias=bias)
        self.interleave = config.rope_interleave
        self.scale = softmax_scale(config)
        self.rope_factor = rope_score_factor(config)  # 1.0 for every DeepSeek config (see layers.py)

    def forward(self, x_BTD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask_BTS: torch.Tensor | None, cache: LayerCache | None = None) -> torch.Tensor:
        B, T, _ = x_BTD.shape
        H, r = self.num_heads, self.kv_lora_rank
        if self.q_lora_rank is None:
            q = linear(self.q_proj, x_BTD)
        else:
            q = linear(self.q_b_proj, self.q_a_layernorm(linear(self.q_a_proj, x_BTD)))
        q_nope_BTHn, q_pe_BTHp = q.view(B, T, H, self.qk_dim).split([self.nope, self.rope], dim=-1)
        c_kv_BTr, k_pe_BTp = linear(self.kv_a_proj_with_mqa, x_BTD).split([r, self.rope], dim=-1)
        c_kv_BTr = self.kv_a_layernorm(c_kv_BTr)
        # q_pe and k_pe rotated in one call (elementwise, so the same values; half the small ops)
        pe_BTGp = apply_rope(torch.cat([q_pe_BTHp, k_pe_BTp[:, :, None]], dim=2), cos, sin, self.interleave)
        q_pe_BTHp, k_pe_BT1p = pe_BTGp.split([H, 1], dim=2)
        if self.rope_factor != 1.0:
            q_pe_BTHp = q_pe_BTHp * self.rope_factor

        lat_BSx = None
        if cache is not None:
            lat_BSx = cache.append("latent", torch.cat([c_kv_BTr, k_pe_BT1p[:, :, 0]], dim=-1))
        # A prefill into an empty cache uses the naive form too: it costs (nope+v)/r of the absorbed
        # form's attention FLOPs on long prompts; the cache still receives only the latent.
        if lat_BSx is None or (T > 1 and lat_BSx.shape[1] == T):
            kv_BTHx = self.kv_b_proj(c_kv_BTr).view(B, T, H, self.nope + self.v_dim)
            k_nope_BTHn, v_BTHv = kv_BTHx.split([self.nope, self.v_dim], dim=-1)
            q_BTHd = torch.cat([q_nope_BTHn, q_pe_BTHp], dim=-1)
            k_BTHd = torch.cat([k_nope_BTHn, k_pe_BT1p.expand(B, T, H, self.rope)], dim=-1)
            o_BTHv = attend(q_BTHd, k_BTHd, v_BTHv, mask_BTS, self.scale)
        else:
            return linear(self.o_proj, self._absorbed(q_nope_BTHn, q_pe_BTHp, lat_BSx, mask_BTS))
        return self.o_proj(o_BTHv.reshape(B, T, H * self.v_dim))

    def _absorbed(self, q_nope_BTHn: torch.Tensor, q_pe_BTHp: torch.Tensor, lat_BSx: torch.Tensor,
                  mask_BTS: torch.Tensor | None) -> torch.Tensor:
        """Absorbed MLA against the cached latent; returns ``[B, T, H·v]`` (the o_proj input).

        The absorbed projections are batched GEMMs over heads on views of ``kv_b_proj.weight`` (rows:
        the B·T tokens). The latent is one key/value head shared by all heads (MQA), so attention is two
        batched GEMMs over ``[B, T·H, r + rope]`` query rows, with no per-head expand, in fp32 (the
        scores and the softmax, as SDPA's fused kernel accumulates them): at decode sizes this is ~1.1x
        SDPA's time in fp32 and 2-6x faster in bf16 (whose CPU SDPA kernel has no bf16 fast path here),
        and it drops the padding SDPA needs for unequal widths. Values are the whole latent row; its
        k_pe channels are dropped from the output.
        """
        B, T, H, n = q_nope_BTHn.shape
        r, S = self.kv_lora_rank, lat_BSx.shape[1]
        dtype = q_nope_BTHn.dtype
        w_Hxr = self.kv_b_proj.weight.view(H, n + self.v_dim, r)
        q_HMn = q_nope_BTHn.permute(2, 0, 1, 3).reshape(H, B * T, n)
        if upcast_gemm(q_HMn, B * T, w_Hxr):  # bf16 batched GEMMs are emulated on this CPU (layers.linear)
            w_Hxr, q_HMn = w_Hxr.float(), q_HMn.float()
        q_lat_BTHr = torch.bmm(q_HMn, w_Hxr[:, :n]).view(H, B, T, r).permute(1, 2, 0, 3)
        q_BMx = torch.cat([q_lat_BTHr.float(), q_pe_BTHp.float()], dim=-1).view(B, T * H, -1)
        lat32_BSx = lat_BSx.float()
        s_BTHS = torch.bmm(q_BMx, lat32_BSx.transpose(1, 2)).mul_(self.scale).view(B, T, H, S)
        if mask_BTS is not None:
            keep_BT1S = _guard_empty_rows(_check_mask(mask_BTS, B, T, S))[:, :, None]
            s_BTHS = s_BTHS.masked_fill_(~keep_BT1S, float("-inf"))
        elif T > 1:  # None = causal over the cache (one new token sees every key: nothing to mask)
            s_BTHS = s_BTHS.masked_fill_(~causal_mask(1, T, S, s_BTHS.device)[:, :, None], float("-inf"))
        p_BMS = s_BTHS.softmax(dim=-1).view(B, T * H, S)
        o_BMr = torch.bmm(p_BMS, lat32_BSx[:, :, :r]).to(w_Hxr.dtype)
        o_HMr = o_BMr.view(B * T, H, r).transpose(0, 1)
        o_HMv = torch.bmm(o_HMr, w_Hxr[:, n:].transpose(1, 2))
        return o_HMv.transpose(0, 1).reshape(B, T, H * self.v_dim).to(dtype)


class GQAttention(nn.Module):
    """Grouped-query attention with optional qk-norm ("head": Qwen3, "full": OLMoE) and bias."""

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        if config.is_mla:
            raise ConfigError("GQAttention needs kv_lora_rank=None (kv_lora_rank set selects MLA)")
        self.layer_idx = layer_idx
        D, H, K, hd = config.hidden_size, config.num_attention_heads, config.kv_heads, config.gqa_head_dim
        self.num_heads, self.kv_heads, self.head_dim = H, K, hd
        bias = config.attention_bias
        self.q_proj = nn.Linear(D, H * hd, bias=bias)
        self.k_proj = nn.Linear(D, K * hd, bias=bias)
        self.v_proj = nn.Linear(D, K * hd, bias=bias)
        self.o_proj = nn.Linear(H * hd, D, bias=bias)
        self.qk_norm = config.qk_norm
        if config.qk_norm == "head":  # Qwen3: per head over head_dim, before RoPE
            self.q_norm = RMSNorm(hd, eps=config.rms_norm_eps)
            self.k_norm = RMSNorm(hd, eps=config.rms_norm_eps)
        elif config.qk_norm == "full":  # OLMoE: over the whole projection, before reshaping into heads
            self.q_norm = RMSNorm(H * hd, eps=config.rms_norm_eps)
            self.k_norm = RMSNorm(K * hd, eps=config.rms_norm_eps)
        self.interleave = config.rope_interleave
        self.scale = softmax_scale(config)

    def forward(self, x_BTD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask_BTS: torch.Tensor | None, cache: LayerCache | None = None) -> torch.Tensor:
        B, T, _ = x_BTD.shape
        H, K, hd = self.num_heads, self.kv_heads, self.head_dim
        q, k, v = self.q_proj(x_BTD), self.k_proj(x_BTD), self.v_proj(x_BTD)
        if self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        q_BTHd, k_BTKd, v_BTKd = q.view(B, T, H, hd), k.view(B, T, K, hd), v.view(B, T, K, hd)
        if self.qk_norm == "head":
            q_BTHd, k_BTKd = self.q_norm(q_BTHd), self.k_norm(k_BTKd)
        q_BTHd = apply_rope(q_BTHd, cos, sin, self.interleave)
        k_BTKd = apply_rope(k_BTKd, cos, sin, self.interleave)
        if cache is not None:
            k_BTKd, v_BTKd = cache.append("k", k_BTKd), cache.append("v", v_BTKd)
        o_BTHd = attend(q_BTHd, k_BTKd, v_BTKd, mask_BTS, self.scale)
        return self.o_proj(o_BTHd.reshape(B, T, H * hd))


def build_attention(config: ModelConfig, layer_idx: int) -> MLAttention | GQAttention:
    """MLA when ``config.kv_lora_rank`` is set, else GQA."""
    return MLAttention(config, layer_idx) if config.is_mla else GQAttention(config, layer_idx)


__all__ = ["MLAttention", "GQAttention", "build_attention", "attend", "causal_mask"]
