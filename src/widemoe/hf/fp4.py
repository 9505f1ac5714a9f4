"""FP4 (e2m1) block-quantised weights, as DeepSeek-V4 stores its routed experts: dequantise on CPU.

Format (shared/reference/deepseek_v4.md section 6): int8 bytes holding two values each (low nibble
first, so the last dim is halved), values {0, .5, 1, 1.5, 2, 3, 4, 6} and their negatives (bit 3 is
the sign), one ue8m0 scale (2^(byte-127)) per 1x32 block along the last dim, a partial last block
allowed. The scale sits next to the weight as ``<name>.scale`` (or ``<name>.weight_scale_inv``).
"""

from __future__ import annotations

import math

import torch

from widemoe.hf.fp8 import scale_to_fp32

FP4_BLOCK = 32
# e2m1 code -> value; bit 3 is the sign
FP4_VALUES = torch.tensor(
    [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]
)


def unpacked_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The logical shape of packed FP4 bytes ``[..., n/2]``: ``[..., n]``."""
    return (*shape[:-1], shape[-1] * 2)


def fp4_scale_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The scale grid of packed FP4 bytes ``[..., n/2]``: one scale per 32 values, ``[..., ceil(n/32)]``."""
    return (*shape[:-1], math.ceil(shape[-1] * 2 / FP4_BLOCK))


def dequantize_fp4(
    packed: torch.Tensor, scale: torch.Tensor, out_dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """e2m1 values two per byte (low nibble first) times one ue8m0 scale per 1x32 block of the last dim.

    ``packed [..., n/2]`` int8/uint8, ``scale [..., ceil(n/32)]`` (F8_E8M0, raw uint8 exponents, or fp32
    multipliers); returns ``[..., n]``.
    """
    b = packed.view(torch.uint8) if packed.dtype == torch.int8 else packed
    if b.dtype != torch.uint8:
        raise ValueError(f"FP4 weights must be stored as int8/uint8 bytes, got {packed.dtype}")
    n = b.shape[-1] * 2
    want = fp4_scale_shape(tuple(b.shape))
    if tuple(scale.shape) != want:
        raise ValueError(
            f"FP4 scale shape {list(scale.shape)} does not match weight {list(b.shape)} "
            f"(two values per byte, one scale per {FP4_BLOCK}: expected {list(want)})"
        )
    codes = torch.stack([b & 0x0F, b >> 4], dim=-1).reshape(*b.shape[:-1], n)
    w = FP4_VALUES[codes.long()]
    s = scale_to_fp32(scale).repeat_interleave(FP4_BLOCK, dim=-1)[..., :n]
    return (w * s).to(out_dtype)


def quantize_fp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed int8 [..., n/2], ue8m0 scale [..., ceil(n/32)]) of ``w [..., n]`` (n even): each block's
    scale is the power of two that maps its largest magnitude to <= 6, values rounded to the nearest
    e2m1 value. The inverse of `dequantize_fp4` up to FP4 rounding (used by tests and tooling)."""
    n = w.shape[-1]
    if n % 2:
        raise ValueError(f"quantize_fp4: last dim {n} must be even (two values per byte)")
    nb = math.ceil(n / FP4_BLOCK)
    pad = nb * FP4_BLOCK - n
    wp = torch.nn.functional.pad(w.float(), (0, pad)).unflatten(-1, (nb, FP4_BLOCK))
    amax = wp.abs().amax(-1).clamp_min(2.0**-120)
    exp = torch.ceil(torch.log2(amax / 6.0)).clamp(-127, 127)
    q = (wp / torch.exp2(exp)[..., None]).flatten(-2)[..., :n]
    mags = FP4_VALUES[:8]
    idx = (q.abs()[..., None] - mags).abs().argmin(-1)
    codes = (idx | ((q < 0).long() << 3)).to(torch.uint8)
    packed = (codes[..., 0::2] | (codes[..., 1::2] << 4)).view(torch.int8)
    return packed, (exp + 127).to(torch.uint8).view(torch.float8_e8m0fnu)


__all__ = ["FP4_BLOCK", "FP4_VALUES", "dequantize_fp4", "fp4_scale_shape", "quantize_fp4", "unpacked_shape"]
