"""Building blocks shared by every family: RMSNorm, SwiGLU, rotary positions (RoPE with YaRN), and the
`KeepFp32` mixin (the one mechanism that keeps router, mHC, sink and rope tensors fp32 in a bf16 model).

References:
- RMSNorm: Zhang & Sennrich 2019; numerics as transformers 5.24 (`DeepseekV3RMSNorm`): normalise in
  fp32, cast back to the input dtype, then multiply by the weight.
- SwiGLU: Shazeer 2020, "GLU Variants Improve Transformer": ``down(silu(gate(x)) * up(x))``; optional
  DeepSeek-V4 clamp (transformers 5.24 `DeepseekV4MLP`).
- RoPE: Su et al. 2021. Two channel layouts:
  * interleaved pairs (x0,x1),(x2,x3)... (DeepSeek checkpoints). The output layout is exactly that of
    transformers' ``apply_rotary_pos_emb_interleave``: ``[even-rotated ; odd-rotated]``, i.e. the
    rotated channels come out de-interleaved. q and k get the same permutation, so q.k is unchanged,
    and cached keys are stored in this layout (all widemoe code reads them back through q rotated
    the same way).
  * rotate-half (Qwen3-MoE, Mixtral, OLMoE): pairs (x_i, x_{i+d/2}).
- YaRN: Peng et al. 2023, in the DeepSeek variant (see shared/reference/architecture.md (d)), matched
  operation for operation to transformers 5.24 ``_compute_yarn_parameters`` (including ``truncate``,
  default True, and the ``beta_fast or 32`` / ``beta_slow or 1`` defaults) so inv_freq is bit-equal.

cos/sin are never scaled (the contract in docs/internals.md). transformers multiplies cos/sin by a YaRN
``attention_factor`` = mscale(s, mscale)/mscale(s, mscale_all_dim) (DeepSeek: 1.0, since both are
equal) or mscale(s, 1) when those keys are absent (Qwen3/Mixtral/OLMoE with YaRN: 0.1 ln s + 1).
Since q and k both carry it, it multiplies the rotated part of every score by ``attention_factor**2``;
widemoe folds that into the scores instead: into ``softmax_scale`` for GQA (whole head rotated, so
exact), and as a factor on the rotated query channels for MLA (``rope_score_factor``).

Shapes: B batch, T tokens, H heads, d channels per head.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from widemoe.config import ModelConfig


class RMSNorm(nn.Module):
    """RMSNorm over the last dim, computed in fp32; ``weight * x_normed.to(input_dtype)``."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        in_dtype = x.dtype
        if in_dtype == torch.float32 and self.weight.dtype == torch.float32:
            # the same arithmetic (pow, mean, + eps, rsqrt, x·r, ·w) in one call: fewer dispatches
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        # fp32 normalisation (x·rsqrt(mean(x²) + eps), one call), cast back, then the weight: the
        # reference's order of operations, bit-equal to it (tested), in 4 dispatches instead of 8
        return self.weight * F.rms_norm(x.to(torch.float32), self.weight.shape, None, self.eps).to(in_dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}"


# CPU bf16 GEMMs of at least this many rows run in fp32 where oneDNN has no bf16 kernels (`linear`), for
# weights up to UPCAST_MAX_WEIGHT elements (the fp32 copy is made per call: at most 256 MiB)
UPCAST_MIN_ROWS = 2
UPCAST_MAX_WEIGHT = 1 << 26


@functools.cache
def _cpu_bf16_gemm_is_emulated() -> bool:
    """True where oneDNN has no bf16 GEMM on this CPU (no AVX512-BF16 / AMX): torch then runs bf16
    matrix products with a reference kernel that costs about one GEMV per row."""
    try:
        return not torch.ops.mkldnn._is_mkldnn_bf16_supported()
    except (AttributeError, RuntimeError):
        return False


def upcast_gemm(x: torch.Tensor, rows: int, weight: torch.Tensor) -> bool:
    """Whether an inference product of `rows` bf16 rows of `x` with `weight` should run in fp32 (`linear`)."""
    return (rows >= UPCAST_MIN_ROWS and x.dtype == torch.bfloat16 and x.device.type == "cpu"
            and weight.numel() <= UPCAST_MAX_WEIGHT and not torch.is_grad_enabled()
            and _cpu_bf16_gemm_is_emulated())


def linear(m: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """``m(x)``; for inference on a CPU without bf16 GEMMs, bf16 inputs of several rows are multiplied in
    fp32 (weights cast per call) and cast back. The products are the same (a bf16 product is exact in
    fp32, both kernels accumulate in fp32); only the summation order differs. Why: there, a bf16 GEMM of
    8 rows took 3x the time of casting and multiplying in fp32 (tiny preset shapes, AMD EPYC AVX2, one
    thread: [8, 256] x [768, 256]ᵀ 856 us vs 273 us); one row stays bf16 (a GEMV, faster than the cast)."""
    if upcast_gemm(x, x.numel() // max(1, x.shape[-1]), m.weight):
        b = None if m.bias is None else m.bias.float()
        return F.linear(x.float(), m.weight.float(), b).to(x.dtype)
    return m(x)


class SwiGLU(nn.Module):
    """Dense SwiGLU feed-forward: ``down_proj(silu(gate_proj(x)) * up_proj(x))``, no biases. With a
    ``limit`` (DeepSeek-V4's shared expert): ``down(silu(min(gate, L)) * clamp(up, -L, L))``."""

    def __init__(self, hidden: int, width: int, limit: float | None = None) -> None:
        super().__init__()
        self.limit = limit
        self.gate_proj = nn.Linear(hidden, width, bias=False)
        self.up_proj = nn.Linear(hidden, width, bias=False)
        self.down_proj = nn.Linear(width, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g, u = linear(self.gate_proj, x), linear(self.up_proj, x)
        if self.limit is not None:
            g, u = g.clamp(max=self.limit), u.clamp(min=-self.limit, max=self.limit)
        return linear(self.down_proj, F.silu(g) * u)


class KeepFp32:
    """Mixin: tensors that stay fp32 through ``model.to(bf16)`` / ``.half()`` (which reach every tensor
    through `nn.Module._apply`; the dtype part is undone here, a device move is kept).

    ``FP32_PARAMS``: parameters (and their grads) cast back: router gates, mHC weights, attention sinks
    (transformers keeps these in fp32 too: `_keep_in_fp32_modules_strict`). ``FP32_BUFFERS``: buffers
    restored by `fp32_buffer`, which casts back (exact for counts; the selection bias as before) or, for
    tables a bf16 cast would have rounded (rope inverse frequencies), recomputes.
    """

    FP32_PARAMS: tuple[str, ...] = ()
    FP32_BUFFERS: tuple[str, ...] = ()

    def fp32_buffer(self, name: str, buf: torch.Tensor) -> torch.Tensor:
        """The fp32 value of buffer `name` after a cast left it as `buf`."""
        return buf.float()

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001, ANN202 - signature of nn.Module._apply
        super()._apply(fn, recurse)  # type: ignore[misc]
        for name in self.FP32_PARAMS:
            p = getattr(self, name)
            if p.dtype != torch.float32:
                p.data = p.data.float()
                if p.grad is not None:
                    p.grad = p.grad.float()
        for name in self.FP32_BUFFERS:
            b = getattr(self, name)
            if b is not None and b.dtype != torch.float32:
                setattr(self, name, self.fp32_buffer(name, b))
        return self


# ------------------------------------------------------------------------------------------------
# YaRN helpers


def mscale(scale: float, m: float = 1.0) -> float:
    """YaRN attention temperature: ``0.1 * m * ln(scale) + 1`` for scale > 1, else 1."""
    if scale <= 1:
        return 1.0
    return 0.1 * m * math.log(scale) + 1.0


def _yarn_factor(config: ModelConfig, rs: dict[str, Any]) -> float:
    f = rs.get("factor")
    # transformers: a missing factor falls back to max_position_embeddings / original length
    if f is None:
        return config.max_position_embeddings / rs["original_max_position_embeddings"]
    return float(f)


def rope_attention_factor(config: ModelConfig) -> float:
    """The factor transformers multiplies cos/sin by (``attention_factor`` of YaRN); 1.0 without YaRN.

    widemoe never applies it to cos/sin; see the module docstring for where it goes instead.
    """
    rs = config.yarn
    if rs is None:
        return 1.0
    if rs.get("attention_factor") is not None:
        return float(rs["attention_factor"])
    s = _yarn_factor(config, rs)
    m, m_all = rs.get("mscale"), rs.get("mscale_all_dim")
    if m and m_all:
        return float(mscale(s, m) / mscale(s, m_all))
    return mscale(s)


def rope_score_factor(config: ModelConfig) -> float:
    """Factor on the rotated part of MLA scores (transformers' cos/sin factor, squared); 1.0 for DeepSeek."""
    return rope_attention_factor(config) ** 2


def softmax_scale(config: ModelConfig) -> float:
    """Scale applied to q.k before the softmax.

    MLA (DeepSeek families): ``qk_head_dim**-0.5 * mscale(factor, mscale_all_dim)**2`` under YaRN (as
    transformers' ``yarn_apply_mscale``: nothing when mscale_all_dim is absent or 0).
    GQA (Qwen3/Mixtral/OLMoE): ``head_dim**-0.5 * attention_factor**2`` under YaRN, which is exactly
    transformers' scaling of cos/sin by attention_factor, folded into the scale.
    """
    scale = config.qk_head_dim ** -0.5
    rs = config.yarn
    if rs is None:
        return scale
    if config.is_mla:
        m_all = rs.get("mscale_all_dim") or 0
        if m_all:
            m = mscale(_yarn_factor(config, rs), m_all)
            scale = scale * m * m  # transformers' order of operations, for bit-equal scales
        return scale
    af = rope_attention_factor(config)
    return scale * af * af


def rope_inv_freq(config: ModelConfig, device: torch.device | None = None) -> torch.Tensor:
    """Inverse frequencies ``[rope_dim/2]`` fp32, YaRN-corrected when ``config.rope_scaling`` is YaRN.

    Mirrors transformers 5.24 (default rope and ``_compute_yarn_parameters``) operation by operation.
    """
    dim, base = config.rope_dim, float(config.rope_theta)
    rs = config.yarn
    if rs is None:
        return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float, device=device) / dim))

    factor = _yarn_factor(config, rs)
    L0 = rs["original_max_position_embeddings"]
    beta_fast = rs.get("beta_fast") or 32
    beta_slow = rs.get("beta_slow") or 1
    truncate = rs.get("truncate", True)

    def correction_dim(n_rot: float) -> float:
        # the channel index whose wavelength completes n_rot rotations over the original length
        return (dim * math.log(L0 / (n_rot * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # a hard step (Kimi K2: beta_fast == beta_slow); avoid dividing by zero
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    extrapolation = (1 - ramp).to(device=device, dtype=torch.float)  # 1 = keep the original frequency

    pos_freqs = base ** (torch.arange(0, dim, 2).to(device=device, dtype=torch.float) / dim)
    inv_freq_extrapolation = 1.0 / pos_freqs
    inv_freq_interpolation = 1.0 / (factor * pos_freqs)
    return inv_freq_interpolation * (1 - extrapolation) + inv_freq_extrapolation * extrapolation


class RotaryEmbedding(KeepFp32, nn.Module):
    """Angles of RoPE: ``forward(position_ids_BT) -> (cos, sin)``, each ``[B, T, rope_dim/2]`` fp32.

    inv_freq is a non-persistent fp32 buffer; a dtype cast (``model.to(bf16)``) would round it, so it is
    recomputed in fp32 instead (`KeepFp32`).
    """

    FP32_BUFFERS = ("inv_freq",)
    inv_freq: torch.Tensor

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.register_buffer("inv_freq", rope_inv_freq(config), persistent=False)

    def fp32_buffer(self, name: str, buf: torch.Tensor) -> torch.Tensor:
        return rope_inv_freq(self.config, device=buf.device)

    def forward(self, position_ids_BT: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs_BTF = position_ids_BT[..., None].to(torch.float32) * self.inv_freq.to(position_ids_BT.device)
        return freqs_BTF.cos(), freqs_BTF.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool) -> torch.Tensor:
    """Rotate ``x [B, T, H, d]`` by angles ``cos/sin [B, T, d/2]``; returns x's dtype.

    The rotation is computed in fp32 (as DeepSeek's reference does) and cast back.
    interleave=True: pairs (x[2i], x[2i+1]); output ``[x_even*c - x_odd*s ; x_odd*c + x_even*s]``
    (transformers' ``apply_rotary_pos_emb_interleave`` layout). interleave=False: pairs (x[i], x[i+d/2]),
    output in place (transformers' ``apply_rotary_pos_emb``).
    """
    d = x.shape[-1]
    if cos.shape[-1] * 2 != d:
        raise ValueError(f"apply_rope: x has {d} channels but cos/sin have {cos.shape[-1]}; "
                         "the rule is d == 2 * cos.shape[-1]")
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    xf = x.to(torch.float32)
    if interleave:
        x1, x2 = xf[..., 0::2], xf[..., 1::2]
    else:
        x1, x2 = xf[..., : d // 2], xf[..., d // 2 :]
    out = torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)
    return out.to(x.dtype)


__all__ = [
    "KeepFp32", "RMSNorm", "SwiGLU", "linear", "upcast_gemm", "RotaryEmbedding", "apply_rope",
    "softmax_scale", "mscale", "rope_inv_freq", "rope_attention_factor", "rope_score_factor",
]
