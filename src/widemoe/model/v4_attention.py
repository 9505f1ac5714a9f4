"""DeepSeek-V4 attention: shared-KV MQA with sinks and a sliding window, plus compressed memories.

Follows transformers 5.24 `models/deepseek_v4` (`DeepseekV4Attention`, `DeepseekV4HCACompressor`,
`DeepseekV4CSACompressor`, `DeepseekV4Indexer`), the parity reference, as summarised in
shared/reference/deepseek_v4.md sections 2.4-2.7. Parameter names are transformers' in-memory names.

- queries: low rank (``q_a_proj`` -> ``q_a_norm`` = the "q residual" the indexer reuses -> ``q_b_proj``),
  an unweighted RMSNorm per head, interleaved RoPE on the LAST ``qk_rope_head_dim`` channels;
- one shared K=V head (``kv_proj`` -> ``kv_norm`` -> RoPE); the output is de-rotated at the query
  position (cos, -sin) so its rope part depends on relative distance only;
- per-head sink logits join the softmax and are dropped after it;
- grouped low-rank output: ``o_a_proj`` ``[g·o, H·d/g]`` used block-diagonally, then ``o_b_proj``;
- every layer sees its last W tokens (self included); CSA layers add the compressed entries the
  lightning indexer picks (top ``index_topk``), HCA layers all visible compressed entries. Entry w is
  visible to the query at position t iff ``w < (t + 1) // rate`` (its window has ended).

RoPE here keeps the interleaved layout (``x*cos + rotate_pairs(x)*sin``, transformers' V4 helper), unlike
`widemoe.model.layers.apply_rope` which de-interleaves; V4's values carry RoPE, so the layout reaches
``o_a_proj`` and must match the checkpoint's.

The indexer's own objective (widemoe; transformers leaves the indexer without gradient): in training,
with ``index_loss_coef > 0``, `last_index_loss` holds KL(main || indexer), where "main" is the main
attention's distribution over ALL visible compressed entries (each head's softmax of q·k/sqrt(d) over
them, averaged over heads, no grad; dense even when top-k < entries, as DeepSeek-V3.2's DSA warm-up)
and "indexer" the softmax of the indexer scores over the same entries, computed from detached inputs,
so only the indexer's parameters learn from it. `last_index_recall` monitors the indexer's top-k
recall of the main attention's heaviest entries.

Shapes: B batch, T new tokens, P cached window keys, S = P + T, N compressed entries, H heads,
d head width, r rope width, D hidden, q q_lora_rank, Hi/ci indexer heads/width, C projected channels.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from widemoe.config import V4_LAYER_TYPES, ModelConfig
from widemoe.model.layers import KeepFp32, RMSNorm, rope_inv_freq
from widemoe.model.v4_cache import CompressorState, V4LayerCache

SLIDING, CSA, HCA = V4_LAYER_TYPES
# (entries, bias or None, indexer scores or None, future mask) of `V4Attention._compressed`
_Compressed = tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor]


_ROT_MATRIX_TOKENS = 8  # B·T up to which `V4Context.rotate` uses one rotation matrix per token (decoding)


@dataclass
class V4Context:
    """What every V4 layer needs besides its input: positions, both rope tables, the padding mask."""

    position_ids: torch.Tensor  # [B, T] int64
    rope: dict[str, tuple[torch.Tensor, torch.Tensor]]  # "main" / "compress" -> cos, sin [B, T, r/2] fp32
    pad_mask_BS: torch.Tensor | None  # [B, past + T] bool (True = real token) or None
    past: int  # tokens cached before this call
    # positions are the cache slots (no padding mask, default position ids): then a decoded token sees
    # every stored compressed entry, and the future mask is skipped
    positions_are_slots: bool = False
    _rot: dict[tuple[str, int], torch.Tensor] = field(default_factory=dict)  # (kind, width) -> [B, T, c, c]

    def rotate(self, x: torch.Tensor, kind: str, inverse: bool = False) -> torch.Tensor:
        """`rope_tail` of x ``[B, T, (H,) c]`` with the ``kind`` table (``inverse``: the rotation back).

        For a few tokens (decoding) x is multiplied by a per-token ``[c, c]`` matrix, identity on the
        no-rope channels and 2x2 rotations on the pairs, built once per forward and width and shared by
        every layer: one matmul instead of ~15 small ops per call. The products with the zero entries
        are exact, so the result differs from `rope_tail` by at most the rounding of one addition.
        """
        cos, sin = self.rope[kind]
        if cos.shape[0] * cos.shape[1] > _ROT_MATRIX_TOKENS or (torch.is_grad_enabled() and x.requires_grad):
            return rope_tail(x, cos, -sin if inverse else sin)
        c = x.shape[-1]
        R = self._rot.get((kind, c))
        if R is None:
            R = self._rot[(kind, c)] = rope_matrix(cos, sin, c)
        if inverse:
            R = R.transpose(-1, -2)
        if x.dim() == 3:
            return torch.matmul(x.float().unsqueeze(-2), R).squeeze(-2).to(x.dtype)
        return torch.matmul(x.float(), R).to(x.dtype)


_ROPE_PATTERNS: dict[tuple[int, int, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}


def rope_matrix(cos: torch.Tensor, sin: torch.Tensor, width: int) -> torch.Tensor:
    """``R [B, T, c, c]`` fp32 with ``x @ R == rope_tail(x, cos, sin)`` for x of width c: identity on the
    first c - r channels; for pair (e, o) = (2i, 2i+1) of the last r: R[e,e] = R[o,o] = cos_i,
    R[e,o] = sin_i, R[o,e] = -sin_i. Built as base + [cos, sin] @ pattern (one small GEMM)."""
    B, T, half = cos.shape
    key = (width, half, cos.device)
    if key not in _ROPE_PATTERNS:
        c, nope = width, width - 2 * half
        base = torch.zeros(c, c, device=cos.device)
        base.diagonal()[:nope] = 1.0
        pattern = torch.zeros(2 * half, c, c, device=cos.device)
        for i in range(half):
            e, o = nope + 2 * i, nope + 2 * i + 1
            pattern[i, e, e] = pattern[i, o, o] = 1.0  # cos_i
            pattern[half + i, e, o], pattern[half + i, o, e] = 1.0, -1.0  # sin_i
        _ROPE_PATTERNS[key] = (base, pattern.view(2 * half, c * c))
    base, pattern = _ROPE_PATTERNS[key]
    coef = torch.cat([cos, sin], dim=-1).reshape(B * T, 2 * half).float()
    return (coef @ pattern).view(B, T, width, width) + base


def v4_inv_freq(config: ModelConfig, kind: str) -> torch.Tensor:
    """inv_freq of the "main" rope (rope_theta, no scaling) or the "compress" rope (compress_rope_theta
    with the config's YaRN, attention factor 1), over the r = qk_rope_head_dim rope channels."""
    compress = kind == "compress"
    ns = SimpleNamespace(rope_dim=config.qk_rope_head_dim,
                         rope_theta=config.compress_rope_theta if compress else config.rope_theta,
                         yarn=config.yarn if compress else None,
                         max_position_embeddings=config.max_position_embeddings)
    return rope_inv_freq(ns)  # type: ignore[arg-type]  # duck-typed: only these four fields are read


def rope_tail(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Interleaved RoPE on the last ``2 * cos.shape[-1]`` channels of ``x [B, T, (H,) c]``, in fp32.

    cos/sin ``[B, T, r/2]`` broadcast over a head axis when x has one. Pairs (2i, 2i+1) rotate in place.
    """
    half = cos.shape[-1]
    if x.dim() == 4:
        cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    nope, rope = x[..., : x.shape[-1] - 2 * half], x[..., x.shape[-1] - 2 * half:]
    r = rope.float()
    x1, x2 = r[..., 0::2], r[..., 1::2]
    rot = torch.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).flatten(-2)
    return torch.cat([nope, rot.to(x.dtype)], dim=-1)


def unweighted_rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    if x.dtype == torch.float32:
        return F.rms_norm(x, x.shape[-1:], None, eps)  # same arithmetic, one call
    return x * torch.rsqrt(x.float().square().mean(-1, keepdim=True) + eps).to(x.dtype)


class Compressor(KeepFp32, nn.Module):
    """Softmax-gated pooling of ``rate`` tokens into one entry (HCA), or of 2·rate slots with
    overlapping windows (CSA and the indexer): entry w pools the first ``width`` channels ("Ca") of
    window w-1 and the last ``width`` ("Cb") of window w, per channel. Window 0 of a sequence has no
    predecessor (gate -inf); with a cache the predecessor's Ca half is carried in ``prior_*``."""

    FP32_PARAMS = ("position_bias",)

    def __init__(self, config: ModelConfig, width: int, rate: int, overlap: bool) -> None:
        super().__init__()
        self.width, self.rate, self.overlap = width, rate, overlap
        C = 2 * width if overlap else width
        self.kv_proj = nn.Linear(config.hidden_size, C, bias=False)
        self.gate_proj = nn.Linear(config.hidden_size, C, bias=False)
        self.position_bias = nn.Parameter(torch.zeros(rate, C, dtype=torch.float32))  # native name: ape
        self.kv_norm = RMSNorm(width, config.rms_norm_eps)

    def compress(self, x_BTD: torch.Tensor, rope_inv_freq_F: torch.Tensor,
                 state: CompressorState | None) -> torch.Tensor:
        """New entries from the windows this call completes, ``[B, n, width]`` (RoPE at the window
        starts); with a state, the incomplete tail waits there and the result is ALL stored entries."""
        B = x_BTD.shape[0]
        kv, gate = self.kv_proj(x_BTD), self.gate_proj(x_BTD)
        if state is None:
            usable = (kv.shape[1] // self.rate) * self.rate
            kv, gate, first = kv[:, :usable], gate[:, :usable], 0
        else:
            kv, gate, first = state.take_windows(kv, gate, self.rate)
        n, w, m = kv.shape[1] // self.rate, self.width, self.rate
        if n == 0 and state is not None and state.count:  # no window closed: the stored entries as they are
            stored = state.entries.get("e")
            if stored is not None:
                return stored
        if n == 0:
            new = kv.new_zeros((B, 0, w))
        else:
            kv = kv.view(B, n, m, -1)
            gate = gate.view(B, n, m, -1) + self.position_bias
            if self.overlap:
                prev_kv = kv.new_zeros((B, 1, m, w))
                prev_gate = gate.new_full((B, 1, m, w), float("-inf"))
                if state is not None:
                    if state.prior_kv is not None:
                        prev_kv, prev_gate = state.prior_kv[:, None].to(kv.dtype), state.prior_gate[:, None]
                    state.prior_kv, state.prior_gate = kv[:, -1, :, :w].clone(), gate[:, -1, :, :w].clone()
                kv = torch.cat([torch.cat([prev_kv, kv[:, :-1, :, :w]], dim=1), kv[..., w:]], dim=2)
                gate = torch.cat([torch.cat([prev_gate, gate[:, :-1, :, :w]], dim=1), gate[..., w:]], dim=2)
            pooled = (kv * gate.softmax(dim=2, dtype=torch.float32).to(kv.dtype)).sum(dim=2)
            pooled = self.kv_norm(pooled)
            pos = (torch.arange(n, device=kv.device) * m + first).to(torch.float32)
            freqs = pos[:, None] * rope_inv_freq_F.to(kv.device)
            new = rope_tail(pooled, freqs.cos()[None].expand(B, -1, -1), freqs.sin()[None].expand(B, -1, -1))
        return new if state is None else state.add_entries(new)


class IndexerScorer(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.weights_proj = nn.Linear(config.hidden_size, config.index_n_heads, bias=False)


class Indexer(Compressor):
    """Lightning indexer: its own overlapping compressor at width ci, queries from the q residual, and
    I[t, s] = Σ_h w[t, h] · ReLU(q[t, h] · K[s]) · ci^-1/2 with w = weights_proj(x) · Hi^-1/2."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config, config.index_head_dim, config.compress_rate_csa, overlap=True)
        self.num_heads, self.head_dim = config.index_n_heads, config.index_head_dim
        self.topk = config.index_topk
        self.q_b_proj = nn.Linear(config.q_lora_rank, self.num_heads * self.head_dim, bias=False)
        self.scorer = IndexerScorer(config)

    def scores(self, x_BTD: torch.Tensor, q_res_BTq: torch.Tensor, ctx: V4Context,
               keys_BNc: torch.Tensor) -> torch.Tensor:
        """Index scores ``[B, T, N]`` fp32 (same operation order as transformers, so ties break alike)."""
        B, T, _ = x_BTD.shape
        # rope_tail, not ctx.rotate: the top-k over these scores must break near-ties as transformers does
        cos, sin = ctx.rope["compress"]
        q = rope_tail(self.q_b_proj(q_res_BTq).view(B, T, self.num_heads, self.head_dim), cos, sin)
        s_BTHN = torch.matmul(q.float(), keys_BNc.transpose(-1, -2).float().unsqueeze(1))
        s_BTHN = F.relu(s_BTHN) * self.head_dim ** -0.5
        w_BTH = self.scorer.weights_proj(x_BTD).float() * self.num_heads ** -0.5
        return (s_BTHN * w_BTH.unsqueeze(-1)).sum(dim=2)


class V4Attention(KeepFp32, nn.Module):
    FP32_PARAMS = ("sinks",)  # the sinks and the rope table stay fp32 through model.to(bf16)
    FP32_BUFFERS = ("compress_inv_freq",)

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        types = config.v4_layer_types
        self.layer_type = types[layer_idx] if layer_idx < len(types) else SLIDING  # MTP blocks: sliding only
        self.rope_kind = "main" if self.layer_type == SLIDING else "compress"
        H, d, D, g = config.num_attention_heads, config.gqa_head_dim, config.hidden_size, config.o_groups
        self.num_heads, self.head_dim, self.groups = H, d, g
        self.window = config.sliding_window
        self.eps = config.rms_norm_eps
        self.scale = d ** -0.5
        self.q_a_proj = nn.Linear(D, config.q_lora_rank, bias=False)
        self.q_a_norm = RMSNorm(config.q_lora_rank, config.rms_norm_eps)
        self.q_b_proj = nn.Linear(config.q_lora_rank, H * d, bias=False)
        self.kv_proj = nn.Linear(D, d, bias=False)
        self.kv_norm = RMSNorm(d, config.rms_norm_eps)
        self.o_a_proj = nn.Linear(H * d // g, g * config.o_lora_rank, bias=False)
        self.o_b_proj = nn.Linear(g * config.o_lora_rank, D, bias=False)
        self.sinks = nn.Parameter(torch.zeros(H, dtype=torch.float32))
        self.compressor: Compressor | None = None
        if self.layer_type == CSA:
            self.compressor = Compressor(config, d, config.compress_rate_csa, overlap=True)
            self.compressor.indexer = Indexer(config)
        elif self.layer_type == HCA:
            self.compressor = Compressor(config, d, config.compress_rate_hca, overlap=False)
        self.register_buffer("compress_inv_freq", v4_inv_freq(config, "compress"), persistent=False)
        self.last_index_loss: torch.Tensor | None = None  # indexer objective of the last training forward
        self.last_index_recall: float | None = None  # and the indexer's top-k recall (see `_recall`)

    def fp32_buffer(self, name: str, buf: torch.Tensor) -> torch.Tensor:
        return v4_inv_freq(self.config, "compress").to(buf.device)  # recomputed, not cast

    # --- masks -------------------------------------------------------------------------------------
    def _window_bias(self, ctx: V4Context, T: int, S: int, device: torch.device) -> torch.Tensor | None:
        """Additive ``[B, T, S]`` bias: key slot j (the S keys are slots past+T-S .. past+T-1) is open to
        query slot i iff i - W < j <= i and j is not padding."""
        B = ctx.position_ids.shape[0]
        k_slot = torch.arange(ctx.past + T - S, ctx.past + T, device=device)
        if T == 1 and S <= self.window:  # decoding: the cache keeps exactly the keys inside the window
            if ctx.pad_mask_BS is None:
                return None
            return _neg_inf_where(~ctx.pad_mask_BS[:, k_slot].bool()[:, None, :])
        q_slot = torch.arange(ctx.past, ctx.past + T, device=device)
        ok_TS = (k_slot[None] <= q_slot[:, None]) & (k_slot[None] > q_slot[:, None] - self.window)
        ok = ok_TS[None]
        if ctx.pad_mask_BS is not None:
            ok = ok & ctx.pad_mask_BS[:, k_slot].bool()[:, None, :]
        zero = torch.zeros((), device=device)
        return torch.where(ok, zero, float("-inf")).expand(B, T, S)

    def _compressed(self, x_BTD: torch.Tensor, q_res: torch.Tensor, ctx: V4Context,
                    cache: V4LayerCache | None) -> _Compressed:
        """(entries [B, N, d], bias [B, T, N] or None = all open, indexer scores [B, T, N] when the
        indexer objective needs them, future mask [B, T, N])."""
        comp = self.compressor
        assert comp is not None
        inv = self.compress_inv_freq
        entries = comp.compress(x_BTD, inv, cache.state("compressor") if cache is not None else None)
        B, T, N = x_BTD.shape[0], x_BTD.shape[1], entries.shape[1]
        # decoding one token at slot = position: entry w is visible iff w < (past + 1) // rate = N, i.e. all
        all_visible = T == 1 and cache is not None and ctx.positions_are_slots
        if all_visible:
            future_BTN = torch.zeros((B, T, N), dtype=torch.bool, device=x_BTD.device)
        else:
            thresh_BT1 = ((ctx.position_ids + 1) // comp.rate)[..., None]
            future_BTN = torch.arange(N, device=x_BTD.device)[None, None, :] >= thresh_BT1
        if self.layer_type == HCA:
            if T == 1 or N == 0:
                return entries, None, None, future_BTN
            return entries, _neg_inf_where(future_BTN), None, future_BTN
        # The indexer reads detached inputs: top-k selection passes no gradient anyway, and its own
        # objective must train the indexer only.
        idx = comp.indexer
        xi, qi = x_BTD.detach(), q_res.detach()
        ikeys = idx.compress(xi, inv, cache.state("indexer") if cache is not None else None)
        if N == 0:
            return entries, x_BTD.new_zeros((B, T, 0)), None, future_BTN
        want_loss = self.training and self.config.index_loss_coef > 0 and torch.is_grad_enabled()
        scores = idx.scores(xi, qi, ctx, ikeys) if (idx.topk < N or want_loss) else None
        if idx.topk >= N:  # every visible entry is picked: the indexer changes nothing
            if all_visible:
                return entries, None, None, future_BTN
            keep_BTN = ~future_BTN
        elif T == 1 and not want_loss:  # decoding: gather the picked entries instead of masking the rest
            if not all_visible:
                scores = scores.masked_fill(future_BTN, float("-inf"))
            top_Bk = scores.topk(idx.topk, dim=-1).indices[:, 0]
            picked = entries.gather(1, top_Bk[..., None].expand(-1, -1, entries.shape[-1]))
            if all_visible:
                return picked, None, None, future_BTN
            return picked, _neg_inf_where(future_BTN.gather(-1, top_Bk[:, None])), None, future_BTN
        else:
            top_BTk = scores.detach().masked_fill(future_BTN, float("-inf")).topk(idx.topk, dim=-1).indices
            keep_BTN = torch.zeros((B, T, N), dtype=torch.bool, device=x_BTD.device)
            keep_BTN.scatter_(-1, top_BTk, True)
            keep_BTN &= ~future_BTN
        return entries, _neg_inf_where(~keep_BTN), (scores if want_loss else None), future_BTN

    # --- forward -----------------------------------------------------------------------------------
    def forward(self, x_BTD: torch.Tensor, ctx: V4Context, cache: V4LayerCache | None = None) -> torch.Tensor:
        B, T, _ = x_BTD.shape
        H, d = self.num_heads, self.head_dim
        q_res = self.q_a_norm(self.q_a_proj(x_BTD))
        q = unweighted_rms(self.q_b_proj(q_res).view(B, T, H, d), self.eps)
        q = ctx.rotate(q, self.rope_kind)
        kv = ctx.rotate(self.kv_norm(self.kv_proj(x_BTD)), self.rope_kind)  # [B, T, d]
        keys = cache.update_window(kv) if cache is not None else kv  # [B, S, d]
        bias = self._window_bias(ctx, T, keys.shape[1], x_BTD.device)
        self.last_index_loss = None
        if self.compressor is not None:
            entries, cbias, scores_idx, future = self._compressed(x_BTD, q_res, ctx, cache)
            if entries.shape[1]:
                if bias is not None or cbias is not None:
                    if bias is None:
                        bias = x_BTD.new_zeros((B, T, keys.shape[1]), dtype=torch.float32)
                    cbias = cbias if cbias is not None else bias.new_zeros((B, T, entries.shape[1]))
                    bias = torch.cat([bias, cbias.to(bias.dtype)], dim=-1)
                keys = torch.cat([keys, entries.to(keys.dtype)], dim=1)
            if scores_idx is not None:
                self.last_index_loss = self._index_loss(q, entries, future, scores_idx)
        # One shared K=V head: fold the H query heads into the query axis, no key copies.
        # softmax in fp32 (with the fp32 sinks), also in a bf16 model
        logits = torch.matmul(q.reshape(B, T * H, d), keys.transpose(1, 2)).view(B, T, H, -1)
        logits = logits.float() * self.scale
        if bias is not None:
            logits = logits + bias[:, :, None, :]
        sink = self.sinks.float().view(1, 1, H, 1).expand(B, T, H, 1)
        # (transformers subtracts the max first: softmax does that itself, with the same result)
        probs = torch.cat([logits, sink], dim=-1).softmax(dim=-1)[..., :-1]
        out = torch.matmul(probs.reshape(B, T * H, -1).to(keys.dtype), keys).view(B, T, H, d)
        out = ctx.rotate(out, self.rope_kind, inverse=True)  # undo the values' rotation at the query position
        g = self.groups
        w_gOI = self.o_a_proj.weight.view(g, -1, H * d // g)
        # block-diagonal o_a_proj: group gi's heads through its [o, H·d/g] block, as one batched GEMM
        grouped = torch.bmm(out.reshape(B * T, g, -1).transpose(0, 1), w_gOI.transpose(1, 2))
        return self.o_b_proj(grouped.transpose(0, 1).reshape(B, T, -1))

    def _index_loss(self, q_BTHd: torch.Tensor, entries_BNd: torch.Tensor, future_BTN: torch.Tensor,
                    scores_BTN: torch.Tensor) -> torch.Tensor:
        """KL(target || softmax(indexer scores)) over the visible compressed entries, averaged over the
        queries that see at least one. Target: the main attention's per-head softmax over the same
        entries (dense, as in DSA's warm-up), averaged over heads, without gradient."""
        visible = ~future_BTN
        with torch.no_grad():
            logit = torch.matmul(q_BTHd.float(), entries_BNd.float().transpose(1, 2)[:, None]) * self.scale
            logit = logit.masked_fill(future_BTN[:, :, None, :], float("-inf"))
            has = visible.any(-1)
            target = torch.nan_to_num(logit.softmax(-1), nan=0.0).mean(dim=2)  # [B, T, N]
        logp = scores_BTN.masked_fill(future_BTN, float("-inf")).log_softmax(-1)
        logp = logp.masked_fill(future_BTN, 0.0)
        kl = (target * (torch.log(target.clamp_min(1e-30)) - logp)).sum(-1)
        self.last_index_recall = _recall(scores_BTN.detach(), target, visible)
        return kl[has].mean() if bool(has.any()) else scores_BTN.sum() * 0.0


def _recall(scores_BTN: torch.Tensor, target_BTN: torch.Tensor, visible_BTN: torch.Tensor) -> float | None:
    """Mean share of the main attention's k heaviest visible entries that the indexer's top-k also
    picks, k = max(1, N // 4), over the queries that see at least 2k entries (a monitoring figure)."""
    N = scores_BTN.shape[-1]
    k = max(1, N // 4)
    rows = visible_BTN.sum(-1) >= 2 * k
    if not bool(rows.any()):
        return None
    s = scores_BTN.masked_fill(~visible_BTN, float("-inf"))[rows]
    t = target_BTN.masked_fill(~visible_BTN, -1.0)[rows]
    pick = torch.zeros_like(s, dtype=torch.bool).scatter_(-1, s.topk(k, dim=-1).indices, True)
    best = torch.zeros_like(t, dtype=torch.bool).scatter_(-1, t.topk(k, dim=-1).indices, True)
    return float((pick & best).sum(-1).float().mean() / k)


def _neg_inf_where(mask: torch.Tensor) -> torch.Tensor:
    """0.0 where mask is False, -inf where True (fp32)."""
    return torch.zeros(mask.shape, device=mask.device).masked_fill(mask, float("-inf"))


__all__ = ["Compressor", "Indexer", "V4Attention", "V4Context", "rope_tail", "unweighted_rms",
           "v4_inv_freq"]
