"""Test oracles: plain, obviously-correct versions of optimised library code (the MoE expert loop)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def reference_moe(
    x_ND: torch.Tensor,
    gate_up_EFD: torch.Tensor,
    down_EDI: torch.Tensor,
    ids_NK: torch.Tensor,
    weights_NK: torch.Tensor,
    swiglu_limit: float | None = None,
) -> torch.Tensor:
    """A plain loop over experts and their tokens, no sorting, fp32 accumulation.
    ``swiglu_limit``: DeepSeek-V4's clamp (gate <= limit, |up| <= limit), out of place (autograd's gradient).

    Uses `unbind(0)` (one view per expert) rather than `W[e]`, so its backward is usable in tests.
    """
    inter = down_EDI.shape[-1]
    y_ND = torch.zeros(x_ND.shape, dtype=torch.float32, device=x_ND.device)
    for e, (wgu, wd) in enumerate(zip(gate_up_EFD.unbind(0), down_EDI.unbind(0))):
        tok, slot = torch.nonzero(ids_NK == e, as_tuple=True)
        if tok.numel() == 0:
            continue
        h = x_ND[tok] @ wgu.t()
        g, u = h[:, :inter], h[:, inter:]
        if swiglu_limit is not None:
            g, u = g.clamp(max=swiglu_limit), u.clamp(min=-swiglu_limit, max=swiglu_limit)
        out = (F.silu(g) * u) @ wd.t()
        y_ND = y_ND.index_add(0, tok, out.float() * weights_NK[tok, slot].float().unsqueeze(-1))
    return y_ND.to(x_ND.dtype)
