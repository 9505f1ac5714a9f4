"""FP8 block-quantised weights (DeepSeek-V3/R1/V3.1, Kimi K2): dequantise on CPU in pure PyTorch.

Format (DeepSeek ``README_WEIGHTS.md``; shared/reference/architecture.md section (f)):
``quantization_config = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128],
"activation_scheme": "dynamic"}`` and optionally ``"scale_fmt": "ue8m0"`` (V3.1: every scale is a power
of two). A weight ``W_q`` is ``float8_e4m3fn [M, N]``; its sibling ``weight_scale_inv`` is fp32
``[ceil(M/128), ceil(N/128)]`` and, despite the name, the **multiplier**:
``W[i, j] = float(W_q[i, j]) * S[i // 128, j // 128]``.

Edge blocks are partial: a 576-row matrix has a 5-row scale grid whose last block covers 64 rows.
So the scale grid is expanded block by block and cropped, never reshaped (transformers 5.24's
``Fp8Dequantize`` reshapes and needs divisibility). Leading batch dims (stacked experts) are allowed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

FP8_MAX = 448.0  # largest finite float8_e4m3fn


@dataclass(frozen=True)
class Fp8Spec:
    block: tuple[int, int] = (128, 128)
    ue8m0: bool = False


def parse_quantization_config(qc: dict[str, Any] | None, *, source: str = "config.json") -> Fp8Spec | None:
    """Fp8Spec from config.json's ``quantization_config`` (None when absent). Other methods are refused."""
    if not qc:
        return None
    method = qc.get("quant_method")
    if method != "fp8":
        raise ValueError(
            f"{source}: quantization_config.quant_method={method!r} is not supported; widemoe reads "
            "unquantised checkpoints and block-FP8 ('fp8', fmt e4m3)"
        )
    fmt = qc.get("fmt", "e4m3")
    if fmt != "e4m3":
        raise ValueError(f"{source}: quantization_config.fmt={fmt!r} is not supported (only 'e4m3')")
    bs = qc.get("weight_block_size")
    if not (isinstance(bs, (list, tuple)) and len(bs) == 2 and all(isinstance(b, int) and b > 0 for b in bs)):
        raise ValueError(
            f"{source}: quantization_config.weight_block_size={bs!r} must be two positive integers "
            "(per-tensor FP8 is not supported)"
        )
    sf = qc.get("scale_fmt")
    if sf not in (None, "ue8m0"):
        raise ValueError(f"{source}: quantization_config.scale_fmt={sf!r} is not supported (null or 'ue8m0')")
    return Fp8Spec(block=(bs[0], bs[1]), ue8m0=sf == "ue8m0")


def scale_grid_shape(shape: tuple[int, ...], block: tuple[int, int]) -> tuple[int, ...]:
    """Shape of the scale grid of a weight: ceil-division of the last two dims."""
    return (*shape[:-2], math.ceil(shape[-2] / block[0]), math.ceil(shape[-1] / block[1]))


def scale_to_fp32(scale: torch.Tensor) -> torch.Tensor:
    """Scales as fp32 multipliers: fp32/bf16 as stored; e8m0 (dtype or raw uint8 exponent) as 2**(x-127)."""
    if scale.dtype == torch.uint8:
        return torch.exp2(scale.to(torch.float32) - 127.0)
    if scale.dtype == getattr(torch, "float8_e8m0fnu", None):
        return torch.exp2(scale.view(torch.uint8).to(torch.float32) - 127.0)
    return scale.to(torch.float32)


def fp8_to(w_q: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Exact e4m3 -> ``dtype`` conversion through a 256-entry table (numpy ``take`` on the raw bytes),
    about twice as fast on CPU as ``Tensor.to``, whose float8 path is scalar."""
    if w_q.dtype != torch.float8_e4m3fn or dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return w_q.to(dtype)
    lut = _LUTS.get(dtype)
    if lut is None:
        vals = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).to(dtype)
        lut = _LUTS[dtype] = vals.numpy() if dtype == torch.float32 else vals.view(torch.int16).numpy()
    out = torch.from_numpy(np.take(lut, w_q.contiguous().view(torch.uint8).numpy()))
    return out if dtype == torch.float32 else out.view(dtype)


_LUTS: dict[torch.dtype, np.ndarray] = {}


def dequantize(
    w_q: torch.Tensor,
    scale_inv: torch.Tensor,
    block: tuple[int, int] = (128, 128),
    out_dtype: torch.dtype = torch.bfloat16,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``w_q * scale_inv`` block-wise, partial edge blocks included, as ``out_dtype`` (or into ``out``).

    The FP8 values are converted exactly to fp32 (table lookup), each row-block is multiplied in
    place by its row of scales, and the result is rounded once into ``out_dtype``: it equals
    ``(float(w_q) * S).to(out_dtype)``. The only temporary is the fp32 copy of this one weight.
    """
    want = scale_grid_shape(tuple(w_q.shape), block)
    if tuple(scale_inv.shape) != want:
        raise ValueError(
            f"weight_scale_inv shape {list(scale_inv.shape)} does not match weight "
            f"{list(w_q.shape)} with block {list(block)} (expected {list(want)})"
        )
    s = scale_to_fp32(scale_inv)
    w = fp8_to(w_q, torch.float32)  # exact; fp32 multiplies vectorise, mixed-dtype in-place ones do not
    _scale_blocks_(w, s, block)
    if out is not None:
        return out.copy_(w)
    return w.to(out_dtype)


def _scale_blocks_(w: torch.Tensor, s: torch.Tensor, block: tuple[int, int]) -> None:
    """``w[..., i, j] *= s[..., i // bm, j // bn]`` in place, in at most four broadcast multiplies.

    The full blocks are one 4-D view (rows split into (grid, bm), columns into (grid, bn)); the
    partial last row-block, last column-block and corner each take one more multiply. Few large ops,
    not one per block: small OpenMP regions are slow on a busy CPU.
    """
    M, N = w.shape[-2], w.shape[-1]
    bm, bn = block
    gm, gn = M // bm, N // bn  # full blocks
    Mf, Nf = gm * bm, gn * bn
    if gm and gn:
        w[..., :Mf, :Nf].unflatten(-1, (gn, bn)).unflatten(-3, (gm, bm)).mul_(s[..., :gm, None, :gn, None])
    if gm and Nf < N:  # right edge: partial columns of full row-blocks
        w[..., :Mf, Nf:].unflatten(-2, (gm, bm)).mul_(s[..., :gm, None, gn : gn + 1])
    if Mf < M and gn:  # bottom edge: partial rows of full column-blocks
        w[..., Mf:, :Nf].unflatten(-1, (gn, bn)).mul_(s[..., gm : gm + 1, :gn, None])
    if Mf < M and Nf < N:  # corner
        w[..., Mf:, Nf:].mul_(s[..., gm : gm + 1, gn : gn + 1])


def quantize(
    w: torch.Tensor, block: tuple[int, int] = (128, 128), ue8m0: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-quantise ``w`` to (float8_e4m3fn weight, fp32 weight_scale_inv); the inverse of dequantize.

    Per block ``S = amax / 448`` (ue8m0: rounded up to a power of two); ``W_q = W / S``. Edge blocks are
    zero-padded for the amax only, then cropped, as DeepSeek's quantiser does. Used by tests/benchmarks.
    """
    M, N = w.shape[-2], w.shape[-1]
    bm, bn = block
    gm, gn = math.ceil(M / bm), math.ceil(N / bn)
    wf = w.to(torch.float32)
    pad = torch.nn.functional.pad(wf.abs(), (0, gn * bn - N, 0, gm * bm - M))
    amax = pad.unflatten(-1, (gn, bn)).unflatten(-3, (gm, bm)).amax(dim=(-3, -1))  # [..., gm, gn]
    s = (amax / FP8_MAX).clamp_min(1e-12)
    if ue8m0:
        s = torch.exp2(torch.ceil(torch.log2(s)))
    s_full = s.repeat_interleave(bm, dim=-2)[..., :M, :].repeat_interleave(bn, dim=-1)[..., :N]
    w_q = (wf / s_full).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return w_q, s.contiguous()


__all__ = [
    "FP8_MAX",
    "Fp8Spec",
    "dequantize",
    "parse_quantization_config",
    "quantize",
    "scale_grid_shape",
    "scale_to_fp32",
]
