"""The chunked LM-head + cross-entropy equals the plain head and `F.cross_entropy`, loss and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import widemoe.model.loss as loss_mod
from widemoe.model.causal_lm import build_model
from widemoe.model.loss import IGNORE_INDEX, linear_cross_entropy
from widemoe.presets import get_preset


@pytest.mark.parametrize("chunk_bytes", [1 << 12, 8 << 20])  # many chunks (64 rows each) / one chunk
def test_matches_plain_cross_entropy(monkeypatch: pytest.MonkeyPatch, chunk_bytes: int) -> None:
    monkeypatch.setattr(loss_mod, "_CHUNK_BYTES", chunk_bytes)
    torch.manual_seed(0)
    N, D, V = 200, 24, 50
    h = torch.randn(N, D, requires_grad=True)
    W = torch.randn(V, D, requires_grad=True)
    labels = torch.randint(0, V, (N,))
    labels[::7] = IGNORE_INDEX
    loss, tok = linear_cross_entropy(h, W, labels)
    (loss * 3.0).backward()  # a non-unit incoming gradient
    gh, gW = h.grad.clone(), W.grad.clone()
    h.grad = W.grad = None
    ref_tok = F.cross_entropy(h @ W.t(), labels, ignore_index=IGNORE_INDEX, reduction="none")
    ref = F.cross_entropy(h @ W.t(), labels, ignore_index=IGNORE_INDEX)
    (ref * 3.0).backward()
    assert abs(loss.item() - ref.item()) < 1e-5
    assert torch.allclose(tok, ref_tok.detach(), atol=1e-5)
    assert bool((tok[::7] == 0).all()) and not tok.requires_grad
    assert torch.allclose(gh, h.grad, atol=1e-6) and torch.allclose(gW, W.grad, atol=1e-6)


def test_all_ignored_is_nan_like_cross_entropy_and_no_grad_builds_nothing() -> None:
    h, W = torch.randn(4, 8, requires_grad=True), torch.randn(10, 8, requires_grad=True)
    loss, _ = linear_cross_entropy(h, W, torch.full((4,), IGNORE_INDEX))
    assert torch.isnan(loss)
    with torch.no_grad():
        loss, tok = linear_cross_entropy(h, W, torch.arange(4))
    assert not loss.requires_grad and tok.shape == (4,)


def test_model_fused_loss_equals_plain_head() -> None:
    c = get_preset("micro")  # MTP on: its loss goes through the fused path too
    torch.manual_seed(0)
    x = torch.randint(0, c.vocab_size, (2, 12))
    y = torch.randint(0, c.vocab_size, (2, 12))
    y[0, :3] = IGNORE_INDEX
    grads = []
    for return_logits in (None, True):
        m = build_model(c, seed=0).train()
        out = m(x, labels=y, return_logits=return_logits)
        out.loss.backward()
        assert (out.logits is None) == (return_logits is None)
        grads.append((out.loss.detach(), out.mtp_loss.detach(), out.token_losses,
                      [p.grad.clone() for p in m.parameters() if p.grad is not None]))
    (l1, m1, t1, g1), (l2, m2, t2, g2) = grads
    assert abs(l1.item() - l2.item()) < 1e-5 and abs(m1.item() - m2.item()) < 1e-5
    assert torch.allclose(t1, t2, atol=1e-5) and bool((t1[0, :3] == 0).all())
    assert len(g1) == len(g2)
    assert max((a - b).abs().max().item() for a, b in zip(g1, g2)) < 1e-5


def test_bf16_autocast_close_to_fp32() -> None:
    torch.manual_seed(0)
    h = torch.randn(64, 32, requires_grad=True)
    W = torch.randn(40, 32, requires_grad=True)
    labels = torch.randint(0, 40, (64,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = linear_cross_entropy(h, W, labels)
    loss.backward()
    assert loss.dtype == torch.float32 and h.grad.dtype == torch.float32 and W.grad.dtype == torch.float32
    ref = F.cross_entropy(h.detach() @ W.detach().t(), labels)
    assert abs(loss.item() - ref.item()) < 0.05 * ref.item()
