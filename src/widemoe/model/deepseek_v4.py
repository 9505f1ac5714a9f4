"""DeepSeek-V4: manifold-constrained hyper-connections, the V4 MoE (sqrt-softplus and hash routing,
SwiGLU clamp), the V4 decoder layer and model, and the MTP block as real checkpoints lay it out.

Parity reference: transformers 5.24 `models/deepseek_v4` (`DeepseekV4HyperConnection`,
`DeepseekV4HyperHead`, `DeepseekV4TopKRouter`, `DeepseekV4HashRouter`, `DeepseekV4MLP`,
`DeepseekV4DecoderLayer`, `DeepseekV4Model`), summarised in shared/reference/deepseek_v4.md; the
attention lives in `widemoe.model.v4_attention`, the cache in `widemoe.model.v4_cache`. Parameter
names are transformers' in-memory names (``model.layers.N.attn_hc.fn``, ``...self_attn.compressor...``,
``model.hc_head.hc_fn``), so transformers' state_dict loads as is.

It is a body for the causal LM of `widemoe.model.causal_lm` (``BODIES["deepseek_v4"]``), in place of the
generic `widemoe.model.transformer.WideMoeModel`; both return ``(h, routing, rope_context, mask)`` and
offer ``final_norm(h)``, ``new_cache()`` and MTP modules with the same call signature, so the LM head,
losses, MTP loss and `generate` are shared. The MoE block is the generic `widemoe.model.moe.MoE` given
V4's parts (`v4_moe_parts`): `V4Router` (the shared `Router` with hash selection), `V4Experts` (a decode
path) and the clamped shared `SwiGLU`.

Hyper-connections (mHC; all in fp32): the residual is ``hc_mult`` streams ``[B, T, n, D]``. Per sublayer,
from ``UnweightedRMSNorm(flatten(X)) @ fn.T``: pre = σ(·)+eps collapses the streams into the sublayer
input, post = 2σ(·) expands its output, and the mixing matrix M = Sinkhorn(softmax(·)) (rows, then
columns, ``hc_sinkhorn_iters`` times) is applied TRANSPOSED: X' = post ⊗ y + Mᵀ X.

Hash routing: the first ``num_hash_layers`` layers choose experts ``tid2eid[token_id]`` (a persistent
``[V, K]`` buffer); the weights still come from the learned gate (sqrt-softplus, renormalised, scaled).
For training from scratch `balanced_tid2eid` builds the table deterministically: token t gets experts
``(t·K + j) mod E`` for j < K, i.e. the vocabulary is dealt round-robin, so the K experts of a token
are distinct, every expert serves ⌊VK/E⌋ or ⌈VK/E⌉ token ids, and ids adjacent in the tokenizer's
merge order (which have similar frequencies) land on different experts.

Shapes: B batch, T tokens, n streams, D hidden, N = B·T, E experts, K experts per token, V vocab.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from widemoe.config import ModelConfig
from widemoe.model.dispatch import LocalDispatcher, TokenDispatcher
from widemoe.model.experts import RoutedExperts
from widemoe.model.layers import KeepFp32, RMSNorm
from widemoe.model.moe import MoE, MoEParts, RoutingInfo, shared_swiglu
from widemoe.model.router import Router
from widemoe.model.v4_attention import V4Attention, V4Context, unweighted_rms, v4_inv_freq
from widemoe.model.v4_cache import V4Cache, V4LayerCache

# ------------------------------------------------------------------------------------------------
# Hyper-connections


class HyperConnection(KeepFp32, nn.Module):
    """One mHC site: ``forward(X) -> (post [B,T,n], comb [B,T,n,n], collapsed [B,T,D])``."""

    FP32_PARAMS = ("fn", "base", "scale")

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        n = config.hc_mult
        self.n, self.iters = n, config.hc_sinkhorn_iters
        self.hc_eps, self.norm_eps = config.hc_eps, config.rms_norm_eps
        self.fn = nn.Parameter(torch.zeros((2 + n) * n, n * config.hidden_size, dtype=torch.float32))
        self.base = nn.Parameter(torch.zeros((2 + n) * n, dtype=torch.float32))
        self.scale = nn.Parameter(torch.ones(3, dtype=torch.float32))

    def forward(self, X_BTnD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B, T, n, _ = X_BTnD.shape
        flat = unweighted_rms(X_BTnD.reshape(B, T, -1).float(), self.norm_eps)
        mix = F.linear(flat, self.fn.float())
        if B * T <= _SMALL_HC and not (torch.is_grad_enabled() and mix.requires_grad):
            post, comb = self._small(mix)
        else:
            pre_w, post_w, comb_w = mix.split([n, n, n * n], dim=-1)
            pre_b, post_b, comb_b = self.base.float().split([n, n, n * n])
            s_pre, s_post, s_comb = self.scale.float().unbind(0)
            pre = torch.sigmoid(pre_w * s_pre + pre_b) + self.hc_eps
            post = 2 * torch.sigmoid(post_w * s_post + post_b)
            comb = torch.softmax(comb_w.view(B, T, n, n) * s_comb + comb_b.view(n, n), dim=-1) + self.hc_eps
            comb = sinkhorn(comb, self.iters, self.hc_eps)
            collapsed = (pre.unsqueeze(-1) * X_BTnD).sum(dim=2).to(X_BTnD.dtype)
            return post, comb, collapsed
        pre = post[..., n:]
        collapsed = torch.matmul(pre.unsqueeze(-2), X_BTnD.float()).squeeze(-2).to(X_BTnD.dtype)
        return post[..., :n], comb, collapsed

    def _small(self, mix_BTm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Decoding (a few tokens, no autograd): pre, post and the Sinkhorn matrix from Python floats (see
        `sinkhorn`): ~30 tensor ops on [1, 1, n(n+2)] values cost far more in dispatch than the
        arithmetic. Returns ([B, T, 2n] = post then pre, comb [B, T, n, n])."""
        n, eps = self.n, self.hc_eps
        base = self.base.tolist()
        s_pre, s_post, s_comb = self.scale.tolist()
        pp, combs = [], []
        for row in mix_BTm.reshape(-1, mix_BTm.shape[-1]).tolist():
            pre = [_sigmoid(row[i] * s_pre + base[i]) + eps for i in range(n)]
            post = [2.0 * _sigmoid(row[n + i] * s_post + base[n + i]) for i in range(n)]
            z = [row[2 * n + j] * s_comb + base[2 * n + j] for j in range(n * n)]
            rows = []
            for i in range(n):  # softmax over each row of the logit matrix
                zi = z[i * n:(i + 1) * n]
                m = max(zi)
                ex = [math.exp(v - m) for v in zi]
                tot = sum(ex)
                rows.append([v / tot + eps for v in ex])
            combs.append(_sinkhorn_lists(list(zip(*rows)), self.iters, eps))
            pp.append(post + pre)
        lead = mix_BTm.shape[:-1]
        post_pre = torch.tensor(pp, dtype=torch.float32, device=mix_BTm.device).view(*lead, 2 * n)
        comb = torch.tensor(combs, dtype=torch.float32, device=mix_BTm.device).view(*lead, n, n)
        return post_pre, comb


_SMALL_HC = 8  # tokens up to which `HyperConnection` computes its weights on Python floats (decoding)


def _sigmoid(z: float) -> float:
    if z >= 0:
        return 1.0 / (1.0 + math.exp(-z))
    e = math.exp(z)  # no overflow for very negative z
    return e / (1.0 + e)


def _sinkhorn_lists(mT: list, iters: int, eps: float) -> list:
    """Sinkhorn on one n x n matrix given TRANSPOSED as n rows of floats; returns it in the original
    orientation. Normalising mT's rows normalises the matrix's columns; each pass transposes (zip), and
    after 2·iters - 1 passes (odd) the matrix is back in its original orientation."""
    if len(mT) == 4:  # hc_mult of the released models
        return _sinkhorn4(mT, iters, eps)
    m = mT
    for _ in range(2 * iters - 1):
        m = list(zip(*[[v / s for v in row] for row in m for s in (sum(row) + eps,)]))
    return m


def _sinkhorn4(mT: list, iters: int, eps: float) -> list:
    """`_sinkhorn_lists` for n = 4 on 16 scalar locals: ~2x faster than the tuple-per-pass loop, bit-equal.
    a_i, b_i, c_i, d_i are M[i][0], M[i][1], M[i][2], M[i][3]."""
    (a0, a1, a2, a3), (b0, b1, b2, b3), (c0, c1, c2, c3), (d0, d1, d2, d3) = mT
    sa = a0 + a1 + a2 + a3 + eps
    sb = b0 + b1 + b2 + b3 + eps
    sc = c0 + c1 + c2 + c3 + eps
    sd = d0 + d1 + d2 + d3 + eps
    a0, a1, a2, a3 = a0 / sa, a1 / sa, a2 / sa, a3 / sa  # columns first
    b0, b1, b2, b3 = b0 / sb, b1 / sb, b2 / sb, b3 / sb
    c0, c1, c2, c3 = c0 / sc, c1 / sc, c2 / sc, c3 / sc
    d0, d1, d2, d3 = d0 / sd, d1 / sd, d2 / sd, d3 / sd
    for _ in range(iters - 1):
        s0 = a0 + b0 + c0 + d0 + eps
        s1 = a1 + b1 + c1 + d1 + eps
        s2 = a2 + b2 + c2 + d2 + eps
        s3 = a3 + b3 + c3 + d3 + eps
        a0, b0, c0, d0 = a0 / s0, b0 / s0, c0 / s0, d0 / s0
        a1, b1, c1, d1 = a1 / s1, b1 / s1, c1 / s1, d1 / s1
        a2, b2, c2, d2 = a2 / s2, b2 / s2, c2 / s2, d2 / s2
        a3, b3, c3, d3 = a3 / s3, b3 / s3, c3 / s3, d3 / s3
        sa = a0 + a1 + a2 + a3 + eps
        sb = b0 + b1 + b2 + b3 + eps
        sc = c0 + c1 + c2 + c3 + eps
        sd = d0 + d1 + d2 + d3 + eps
        a0, a1, a2, a3 = a0 / sa, a1 / sa, a2 / sa, a3 / sa
        b0, b1, b2, b3 = b0 / sb, b1 / sb, b2 / sb, b3 / sb
        c0, c1, c2, c3 = c0 / sc, c1 / sc, c2 / sc, c3 / sc
        d0, d1, d2, d3 = d0 / sd, d1 / sd, d2 / sd, d3 / sd
    return [(a0, b0, c0, d0), (a1, b1, c1, d1), (a2, b2, c2, d2), (a3, b3, c3, d3)]


def sinkhorn(comb: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """Columns, then (rows, columns) x (iters - 1), each normalised as x / (sum + eps) (transformers' order).

    Decoding (a handful of matrices) runs the same arithmetic on Python floats instead:
    `HyperConnection._small` -> `_sinkhorn_lists` (6·iters tensor ops on a [1, 1, n, n] tensor cost ~100x
    more in dispatch than the arithmetic; Python floats are float64, at least as accurate).
    """
    comb = comb / (comb.sum(dim=-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        comb = comb / (comb.sum(dim=-1, keepdim=True) + eps)
        comb = comb / (comb.sum(dim=-2, keepdim=True) + eps)
    return comb


def hc_expand(X_BTnD: torch.Tensor, y_BTD: torch.Tensor, post: torch.Tensor,
              comb: torch.Tensor) -> torch.Tensor:
    """X' = post ⊗ y + Mᵀ X (M is not symmetric: stream i receives Σ_j M[j, i] X_j)."""
    dt = X_BTnD.dtype
    mixed = torch.matmul(comb.to(dt).transpose(-1, -2), X_BTnD)
    return torch.addcmul(mixed, post.to(dt).unsqueeze(-1), y_BTD.unsqueeze(-2))


class HyperHead(KeepFp32, nn.Module):
    """Final collapse of the streams before the last norm (no Sinkhorn)."""

    FP32_PARAMS = ("hc_fn", "hc_base", "hc_scale")

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        n = config.hc_mult
        self.hc_eps, self.norm_eps = config.hc_eps, config.rms_norm_eps
        self.hc_fn = nn.Parameter(torch.zeros(n, n * config.hidden_size, dtype=torch.float32))
        self.hc_base = nn.Parameter(torch.zeros(n, dtype=torch.float32))
        self.hc_scale = nn.Parameter(torch.ones(1, dtype=torch.float32))

    def forward(self, X_BTnD: torch.Tensor) -> torch.Tensor:
        flat = unweighted_rms(X_BTnD.flatten(2).float(), self.norm_eps)
        mix = F.linear(flat, self.hc_fn.float())
        pre = torch.sigmoid(mix * self.hc_scale.float() + self.hc_base.float()) + self.hc_eps
        return (pre.unsqueeze(-1) * X_BTnD).sum(dim=2).to(X_BTnD.dtype)


# ------------------------------------------------------------------------------------------------
# MoE


def balanced_tid2eid(vocab_size: int, num_experts: int, k: int) -> torch.Tensor:
    """Deterministic, balanced hash table ``[V, K]`` int64: token t -> experts (t·K + j) mod E."""
    if k > num_experts:
        raise ValueError(f"balanced_tid2eid: num_experts_per_tok={k} exceeds n_routed_experts={num_experts}")
    t = torch.arange(vocab_size, dtype=torch.int64)[:, None]
    return (t * k + torch.arange(k, dtype=torch.int64)[None, :]) % num_experts


class V4Router(Router):
    """`Router` (sqrt-softplus scores, fp32) with V4's rules: selection by top-k of (scores + bias), or by
    ``tid2eid[token]`` in hash layers (no bias there); weights = the selected unbiased scores, always
    renormalised, × routed_scaling_factor."""

    def __init__(self, config: ModelConfig, hash_layer: bool) -> None:
        self.hash_layer = hash_layer
        super().__init__(config, selection_bias=not hash_layer)
        self.norm_topk_prob = True
        if hash_layer:
            E, K = config.n_routed_experts, config.num_experts_per_tok
            self.register_buffer("tid2eid", balanced_tid2eid(config.vocab_size, E, K))

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.weight)  # transformers' V4 init; the model's init overwrites it
        if self.e_score_correction_bias is not None:
            self.e_score_correction_bias.zero_()

    def select(self, scores_NE: torch.Tensor, token_ids_N: torch.Tensor | None) -> torch.Tensor:
        if not self.hash_layer:
            return super().select(scores_NE, token_ids_N)
        if token_ids_N is None:
            raise ValueError("V4 hash-routed layer needs the token ids (token_ids_BT); the rule is "
                             "experts = tid2eid[token id] in the first num_hash_layers layers")
        return self.tid2eid[token_ids_N.reshape(-1)].long()


class V4Experts(RoutedExperts):
    """`RoutedExperts` (which applies V4's SwiGLU clamp, `swiglu_limit`, on every dispatch path) with a
    decoding fast path: for a few token-expert pairs without autograd, each pair runs its expert's two
    GEMVs on views of the stacked weights (no dispatch plan, no copy of the chosen experts' weights:
    gathering them cost ~3x more, v4-tiny decode, 2-core CPU). Same math, clamp included."""

    FAST_MAX_PAIRS = 16

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        lim, I = config.swiglu_limit, config.moe_intermediate_size
        if lim is not None:  # per-channel bounds of [gate; up]: gate <= L, |up| <= L as one clamp
            self.register_buffer("clamp_lo", torch.tensor([-math.inf] * I + [-lim] * I), persistent=False)
            self.register_buffer("clamp_hi", torch.full((2 * I,), float(lim)), persistent=False)

    def forward(self, x_ND: torch.Tensor, topk_ids_NK: torch.Tensor, topk_weights_NK: torch.Tensor,
                capacity: int | None = None, dispatcher: TokenDispatcher | None = None,
                ) -> tuple[torch.Tensor, int]:
        N, K = topk_ids_NK.shape
        grad = torch.is_grad_enabled() and (x_ND.requires_grad or self.gate_up_proj.requires_grad)
        local = dispatcher is None or isinstance(dispatcher, LocalDispatcher)  # the path skips the dispatch
        if grad or capacity is not None or not local or not 0 < N * K <= self.FAST_MAX_PAIRS:
            return super().forward(x_ND, topk_ids_NK, topk_weights_NK, capacity, dispatcher)
        W1, W2, lim = self.gate_up_proj, self.down_proj, self.swiglu_limit
        I = W2.shape[-1]
        x = x_ND.to(W1.dtype)
        rows = []
        for n, e in enumerate(topk_ids_NK.reshape(-1).tolist()):
            h = torch.mv(W1[e], x[n // K])
            if lim is not None:
                h = h.clamp(self.clamp_lo, self.clamp_hi)
            rows.append(torch.mv(W2[e], F.silu(h[:I]) * h[I:]))
        y_PD = torch.stack(rows).float()
        y_ND = torch.bmm(topk_weights_NK.float().unsqueeze(1), y_PD.view(N, K, -1)).squeeze(1)
        return y_ND.to(x_ND.dtype), 0


def v4_moe_parts(config: ModelConfig, layer_idx: int) -> MoEParts:
    """The widemoe MoE block (dispatch, statistics, aux losses) with V4's router (hash routing in the first
    ``num_hash_layers`` layers), decode-path experts and clamped shared expert."""
    return MoEParts(V4Router(config, hash_layer=layer_idx < config.num_hash_layers), V4Experts(config),
                    shared_swiglu(config), LocalDispatcher(config.n_routed_experts))


# ------------------------------------------------------------------------------------------------
# Layers and model


class V4DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.attn_hc = HyperConnection(config)
        self.ffn_hc = HyperConnection(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = V4Attention(config, layer_idx)
        self.mlp = MoE(config, layer_idx, v4_moe_parts(config, layer_idx))

    def forward(self, X_BTnD: torch.Tensor, ctx: V4Context, cache: V4LayerCache | None = None,
                token_ids_BT: torch.Tensor | None = None) -> tuple[torch.Tensor, RoutingInfo]:
        post, comb, h = self.attn_hc(X_BTnD)
        X_BTnD = hc_expand(X_BTnD, self.self_attn(self.input_layernorm(h), ctx, cache), post, comb)
        post, comb, h = self.ffn_hc(X_BTnD)
        y, info = self.mlp(self.post_attention_layernorm(h), token_ids_BT)
        if self.self_attn.last_index_loss is not None:
            info.aux["index_kl"] = self.self_attn.last_index_loss
        return hc_expand(X_BTnD, y, post, comb), info


class V4MTP(nn.Module):
    """MTP block as checkpoints lay it out (``mtp.0.*``): h = e_proj(enorm(emb)) + h_proj(hnorm(X)) per
    stream, one sliding-only decoder layer with a learned router, its own hc_head and norm. Same call
    signature as `widemoe.model.transformer.MTPModule` (``cos`` carries the V4 context)."""

    def __init__(self, config: ModelConfig, depth: int) -> None:
        super().__init__()
        D = config.hidden_size
        self.enorm = RMSNorm(D, config.rms_norm_eps)
        self.hnorm = RMSNorm(D, config.rms_norm_eps)
        self.e_proj = nn.Linear(D, D, bias=False)
        self.h_proj = nn.Linear(D, D, bias=False)
        self.block = V4DecoderLayer(config, config.num_hidden_layers + depth)
        self.hc_head = HyperHead(config)
        self.norm = RMSNorm(D, config.rms_norm_eps)

    def shared_head_norm(self, X_BTnD: torch.Tensor) -> torch.Tensor:
        return self.norm(self.hc_head(X_BTnD))

    def forward(self, h_prev: torch.Tensor, emb_BTD: torch.Tensor, ctx: V4Context, _sin: object,
                _mask: object, token_ids_BT: torch.Tensor | None) -> tuple[torch.Tensor, RoutingInfo]:
        X = self.e_proj(self.enorm(emb_BTD)).unsqueeze(2) + self.h_proj(self.hnorm(h_prev))
        return self.block(X, ctx, None, token_ids_BT)


class V4Model(KeepFp32, nn.Module):
    FP32_BUFFERS = ("main_inv_freq", "compress_inv_freq")  # rope tables stay fp32 through model.to(bf16)

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(V4DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.hc_head = HyperHead(config)
        self.mtp = nn.ModuleList(V4MTP(config, k) for k in range(config.num_nextn_predict_layers))
        self.register_buffer("main_inv_freq", v4_inv_freq(config, "main"), persistent=False)
        self.register_buffer("compress_inv_freq", v4_inv_freq(config, "compress"), persistent=False)

    def fp32_buffer(self, name: str, buf: torch.Tensor) -> torch.Tensor:
        return v4_inv_freq(self.config, name.removesuffix("_inv_freq")).to(buf.device)  # recomputed, not cast

    @torch.no_grad()
    def reset_extra_parameters(self) -> None:
        """transformers' V4 init for what the generic init gets wrong: sinks, position biases and mHC
        bases start at 0, mHC scales at 1; hash tables get the balanced deterministic table."""
        for name, p in self.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if leaf in ("sinks", "position_bias", "base", "hc_base"):
                p.zero_()
            elif leaf in ("scale", "hc_scale"):
                p.fill_(1.0)
        c = self.config
        for m in self.modules():
            if isinstance(m, V4Router) and m.hash_layer:
                m.tid2eid.copy_(balanced_tid2eid(c.vocab_size, c.n_routed_experts, c.num_experts_per_tok))

    def new_cache(self) -> V4Cache:
        return V4Cache(self.config.num_hidden_layers, self.config.sliding_window)

    def final_norm(self, X_BTnD: torch.Tensor) -> torch.Tensor:
        return self.norm(self.hc_head(X_BTnD))

    def positions(self, attention_mask_BS: torch.Tensor | None, B: int, T: int, past: int,
                  device: torch.device) -> torch.Tensor:
        if attention_mask_BS is None:
            return torch.arange(past, past + T, device=device).expand(B, T)
        return (attention_mask_BS.long().cumsum(-1) - 1)[:, past:].clamp(min=0)  # left padding

    def forward(self, input_ids_BT: torch.Tensor, attention_mask_BS: torch.Tensor | None = None,
                position_ids_BT: torch.Tensor | None = None, cache: V4Cache | None = None,
                ) -> tuple[torch.Tensor, list[RoutingInfo], tuple[V4Context, None], None]:
        """Returns (streams [B, T, n, D] before the head collapse, routing, (context, None), None)."""
        B, T = input_ids_BT.shape
        past = cache.seq_len if cache is not None else 0
        device = input_ids_BT.device
        if attention_mask_BS is not None and attention_mask_BS.shape != (B, past + T):
            raise ValueError(f"attention_mask has shape {tuple(attention_mask_BS.shape)}; expected "
                             f"(batch={B}, cached+new={past + T}) covering the cached and the new tokens")
        default_positions = position_ids_BT is None
        if default_positions:
            position_ids_BT = self.positions(attention_mask_BS, B, T, past, device)
        rope = {}
        for kind in ("main", "compress"):
            freqs = position_ids_BT[..., None].float() * getattr(self, f"{kind}_inv_freq").to(device)
            rope[kind] = (freqs.cos(), freqs.sin())
        ctx = V4Context(position_ids_BT, rope, attention_mask_BS, past,
                        positions_are_slots=attention_mask_BS is None and default_positions)
        emb = self.embed_tokens(input_ids_BT)
        X = emb.unsqueeze(2).expand(-1, -1, self.config.hc_mult, -1).contiguous()
        routing: list[RoutingInfo] = []
        for i, layer in enumerate(self.layers):
            X, info = layer(X, ctx, cache.layer(i) if cache is not None else None, input_ids_BT)
            routing.append(info)
        if cache is not None:
            cache.advance(T)
        return X, routing, (ctx, None), None


__all__ = ["HyperConnection", "HyperHead", "V4DecoderLayer", "V4Experts", "V4MTP", "V4Model", "V4Router",
           "balanced_tid2eid", "hc_expand", "v4_moe_parts"]
