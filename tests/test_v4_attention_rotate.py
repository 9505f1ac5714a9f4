"""`V4Context.rotate` (per-token rotation matrices, used when decoding) equals `rope_tail`."""

from __future__ import annotations

import pytest
import torch

from widemoe.model.v4_attention import V4Context, rope_tail


@pytest.mark.parametrize("shape", [(2, 1, 64), (1, 1, 4, 64), (1, 3, 2, 32)])
@pytest.mark.parametrize("inverse", [False, True])
def test_rotate_equals_rope_tail(shape: tuple[int, ...], inverse: bool) -> None:
    torch.manual_seed(0)
    B, T, half = shape[0], shape[1], 8
    pos = torch.randint(0, 20000, (B, T)).float()
    freqs = pos[..., None] * (10000.0 ** -(torch.arange(half) / half))
    cos, sin = freqs.cos(), freqs.sin()
    ctx = V4Context(pos.long(), {"main": (cos, sin)}, None, 0)
    x = torch.randn(shape)
    with torch.no_grad():
        got = ctx.rotate(x, "main", inverse=inverse)
    want = rope_tail(x, cos, -sin if inverse else sin)
    assert got.shape == want.shape
    assert (got - want).abs().max().item() < 1e-5
    nope = shape[-1] - 2 * half
    assert torch.equal(got[..., :nope], x[..., :nope])  # channels without rope pass through exactly
    back = ctx.rotate(got, "main", inverse=not inverse)
    assert (back - x).abs().max().item() < 1e-5
